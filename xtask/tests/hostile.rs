//! A hostile guest beside a good one against a real vstreamd, each attack for a few seconds
//! (`cargo xtask bench-hostile` runs the same for longer and prints the figures). Asserts the
//! bounds that hold even on a busy two-core machine. Needs vstreamd, vstreamctl and
//! vstream-agent built (`cargo build -p vstream-host -p vstream-agent`); no QEMU.

use std::time::Duration;

use xtask::hostile::{documented_bound, run, Attack, Options};
use xtask::paths;

#[test]
fn a_hostile_guest_costs_bounded_memory_and_log_and_does_not_starve_a_good_one() {
    let opts = Options {
        duration: Duration::from_secs(3),
        attacks: Attack::ALL.to_vec(),
        bin_dir: paths::host_bin_dir(),
    };
    let report = run(&opts).expect("benchmark");
    xtask::hostile::print(&report, &opts);
    assert!(report.burn.bytes_per_sec > 0.0);
    for f in &report.attacks {
        let name = f.attack.name();
        // The documented per-guest bound, plus allocator slack and the good guest's traffic.
        let growth = f.rss_peak - f.rss_start;
        let allowed = documented_bound() as u64 + (32 << 20);
        assert!(
            growth <= allowed,
            "{name}: vstreamd grew by {growth} bytes, more than {allowed}"
        );
        assert!(
            f.log_bytes < 1 << 20,
            "{name}: vstreamd logged {} bytes",
            f.log_bytes
        );
        assert!(
            f.hostile_bytes > 0,
            "{name}: the hostile guest sent nothing"
        );
        if f.attack == Attack::Churn {
            // It does not read our refusals, so we stop reading it: it cannot write much.
            assert!(
                f.hostile_bytes < 16 << 20,
                "churn: vstreamd kept reading a guest that does not read ({} bytes)",
                f.hostile_bytes
            );
        }
        // Not starved: the good guest's echo moved at a tenth of its speed beside a busy core
        // (debug build, shared machine), and never stopped for long.
        assert!(
            f.echo.bytes_per_sec > report.burn.bytes_per_sec / 10.0,
            "{name}: the good guest's echo fell to {:.1} MB/s (beside a busy core: {:.1} MB/s)",
            f.echo.bytes_per_sec / 1e6,
            report.burn.bytes_per_sec / 1e6
        );
        assert!(
            f.echo.longest_stall < Duration::from_secs(2),
            "{name}: the good guest's echo stalled for {:?}",
            f.echo.longest_stall
        );
    }
}
