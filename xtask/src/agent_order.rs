//! `cargo xtask agent-order`: the functions the shipped agent runs at start, at rest and for a
//! QGA workload, as the link order of its code (`crates/agent/symbol-order.txt`, read by
//! `crates/agent/build.rs`). Code the agent runs then sits together at the start of `.text`,
//! so the kernel's fault-around (64 KiB around each fault, of a binary that in the guest is
//! always in the page cache) maps little code that never runs. See docs/PERFORMANCE.md.
//!
//! The agent runs on the host under `valgrind --tool=callgrind`, set up as in the lab's guest:
//! its settings from a kernel command line (`--cmdline`), two transports to a debug vstreamd
//! (Unix sockets here, a virtio-serial port and a serial line there), QGA on a raw transport
//! of its own, every device on but the random one (it would feed the host's entropy pool;
//! ppp asks and vstreamd, with no `[guest.ppp]`, refuses, as in the lab). It serves QGA on its
//! own socket and through vstreamd: guest-sync, guest-info, pings, a file read in 4 MiB reads,
//! /proc reads, guest-exec; then rests 35 s (heartbeats, a memory-trim tick).
//!
//! The guest halves that find their devices only in a guest (the watchdog, the random feeder,
//! virtio-serial ports, ...) run code no host profile sees. So the agent, relinked with the
//! host's order, then runs in bench-qga's lab guest with the kernel's fault-around off
//! (`fault_around_bytes` 4096, the agent restarted by the lab's init), serves the same
//! workload through vstreamd, rests, and every function on a code page it touched (its
//! `/proc/PID/pagemap`) joins the order: page-exact, so a few functions it did not run come
//! along with each page.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use xtask::paths;
use xtask::process;
use xtask::qga_lab::{QgaConn, QgaLab};

/// Where the ordering goes, relative to the workspace.
const ORDER_FILE: &str = "crates/agent/symbol-order.txt";

/// The file the guest's workload reads, in the guest's tmpfs.
const GUEST_FILE: &str = "/tmp/agent-order.bin";

/// The agent at rest long enough for its periodic work (the memory trim runs every 30 s).
const AT_REST: Duration = Duration::from_secs(35);

/// Waits for `path` to exist (a socket a process binds).
fn wait_for(path: &Path, what: &str) -> Result<()> {
    if !process::wait_for_path(path, Duration::from_secs(60)) {
        bail!("{what} did not create {} within 60 s", path.display());
    }
    Ok(())
}

/// The QGA requests a client of the guest makes (bench-qga's, the lab's).
fn workload(conn: &mut QgaConn, pings: usize, file: &Path) -> Result<()> {
    conn.call(&json!({"execute": "guest-info"}))?;
    for _ in 0..pings {
        conn.call(&json!({"execute": "guest-ping"}))?;
    }
    let file = file.to_str().context("a UTF-8 temporary path")?;
    for depth in [1, 4] {
        conn.read_file_b64(file, 4 << 20, depth, &mut |_| Ok(()))?;
    }
    conn.read_small("/proc/self/status")?;
    conn.read_small("/proc/self/stat")?;
    let (code, _) = conn.exec("sh", &["-c", "echo $PPID"])?;
    if code != 0 {
        bail!("guest-exec of sh exited with {code}");
    }
    Ok(())
}

/// The functions a callgrind profile saw run, once each, sorted. Their names are as in the
/// binary's symbol table (`--demangle=no`); callgrind's `'N` marks recursion depths, and
/// `0x...` and `(below main)` are not symbols.
fn functions(profile: &str) -> Vec<String> {
    let mut names: Vec<String> = profile
        .lines()
        .filter_map(|l| l.strip_prefix("fn=(").or_else(|| l.strip_prefix("cfn=(")))
        .filter_map(|l| l.split_once(") ").map(|(_, name)| name))
        .map(|name| match name.rsplit_once('\'') {
            Some((base, depth)) if depth.bytes().all(|b| b.is_ascii_digit()) => base,
            _ => name,
        })
        .filter(|name| !name.starts_with("0x") && !name.starts_with('('))
        .map(str::to_owned)
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Markers of glibc's per-instruction-set variants of a string function (`__memchr_avx2`,
/// `__memchr_evex`, `__memchr_sse2`, ...). The CPU picks one at start (an IFUNC): the profile
/// saw those of the machine it ran on, under valgrind (no AVX-512); a guest's CPU picks others.
const ISA_MARKERS: [&str; 5] = ["_sse2", "_ssse3", "_sse4", "_avx", "_evex"];

/// The function a glibc variant is one of (`__memchr` for `__memchr_avx2`), if it is one.
fn variant_of(name: &str) -> Option<&str> {
    if !name.starts_with("__") {
        return None;
    }
    let at = ISA_MARKERS.iter().filter_map(|m| name.find(m)).min()?;
    Some(&name[..at])
}

/// `names`, plus every other variant in `symbols` of the glibc string functions among them.
fn with_other_variants(mut names: Vec<String>, symbols: &[String]) -> Vec<String> {
    let used: std::collections::BTreeSet<&str> =
        names.iter().filter_map(|n| variant_of(n)).collect();
    let others: Vec<String> = symbols
        .iter()
        .filter(|s| variant_of(s).is_some_and(|v| used.contains(v)))
        .cloned()
        .collect();
    names.extend(others);
    names.sort_unstable();
    names.dedup();
    names
}

/// The text symbols of a binary, from `nm`.
fn text_symbols(binary: &Path) -> Result<Vec<String>> {
    let out = Command::new("nm")
        .arg("--defined-only")
        .arg(binary)
        .output()
        .context("running nm (binutils)")?;
    if !out.status.success() {
        bail!(
            "nm {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [_, "t" | "T" | "w" | "W", name] => Some(name.to_owned()),
            _ => None,
        })
        .collect())
}

/// Prints the file offset of every present page of the agent's code mapping (busybox sh).
const CODE_PAGES: &str = r#"p=$(cat /run/vstream-agent.pid)
grep ' r-xp .*/vstream-agent$' /proc/$p/maps | while read range perm off rest; do
  lo=$((0x${range%-*})); hi=$((0x${range#*-}))
  dd if=/proc/$p/pagemap bs=8 skip=$((lo / 4096)) count=$(((hi - lo) / 4096)) 2>/dev/null |
    od -An -v -tx8 -w8 |
    awk -v o=$((0x$off)) '$1 ~ /^[89a-f]/ { printf "%x\n", o + (NR - 1) * 4096 }'
done"#;

/// The file offsets of the code pages the agent touches in a lab guest, page-exact.
fn guest_code_pages(file: &Path) -> Result<Vec<u64>> {
    let q = QgaLab::boot("agent-order", 1024).context("booting the lab")?;
    let name = q.lab.name().to_owned();
    let pid = |conn: &mut QgaConn| -> Result<String> {
        let (_, out) = conn.exec("cat", &["/run/vstream-agent.pid"])?;
        Ok(String::from_utf8_lossy(&out).trim().to_owned())
    };
    let mut conn = q.connect(&name)?;
    let (code, _) = conn.exec(
        "sh",
        &["-c", "mount -t debugfs none /sys/kernel/debug 2>/dev/null; echo 4096 > /sys/kernel/debug/fault_around_bytes"],
    )?;
    if code != 0 {
        bail!("cannot turn fault-around off in the guest (debugfs)");
    }
    let old = pid(&mut conn)?;
    // The reply never comes: the agent that would send it is gone.
    conn.send(&json!({"execute": "guest-exec", "arguments": {"path": "kill", "arg": [old]}}))?;
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut conn = loop {
        std::thread::sleep(Duration::from_secs(2));
        if let Ok(mut c) = q.connect(&name) {
            if pid(&mut c).is_ok_and(|p| !p.is_empty() && p != old) {
                break c;
            }
        }
        if Instant::now() > deadline {
            bail!("the guest's agent did not come back within 120 s of being stopped");
        }
    };
    let guest_file = file.to_str().context("a UTF-8 temporary path")?;
    let (code, _) = conn.exec(
        "sh",
        &[
            "-c",
            &format!("head -c 16777216 /dev/urandom > {guest_file}"),
        ],
    )?;
    if code != 0 {
        bail!("cannot write {guest_file} in the guest");
    }
    workload(&mut conn, 500, file)?;
    std::thread::sleep(AT_REST);
    let (code, out) = conn.exec("sh", &["-c", CODE_PAGES])?;
    if code != 0 {
        bail!("reading the agent's pagemap in the guest failed");
    }
    String::from_utf8_lossy(&out)
        .lines()
        .map(|l| u64::from_str_radix(l.trim(), 16).context("a page offset"))
        .collect()
}

/// The functions (named in `binary`'s symbol table) on the code pages at `pages` (file offsets).
fn functions_on(binary: &Path, pages: &[u64]) -> Result<Vec<String>> {
    // File offset -> address: the executable LOAD segment's VirtAddr - Offset.
    let out = Command::new("readelf")
        .arg("-lW")
        .arg(binary)
        .output()
        .context("running readelf (binutils)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let delta = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find_map(|f| match f[..] {
            ["LOAD", off, vaddr, _, _, _, "R", "E", _] => Some((
                u64::from_str_radix(off.trim_start_matches("0x"), 16).ok()?,
                u64::from_str_radix(vaddr.trim_start_matches("0x"), 16).ok()?,
            )),
            _ => None,
        })
        .map(|(off, vaddr)| vaddr.wrapping_sub(off))
        .context("no executable LOAD segment in the agent")?;
    let out = Command::new("nm")
        .args(["--defined-only", "-S"])
        .arg(binary)
        .output()
        .context("running nm (binutils)")?;
    let touched: std::collections::BTreeSet<u64> =
        pages.iter().map(|p| p.wrapping_add(delta) / 4096).collect();
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [addr, size, "t" | "T" | "w" | "W" | "i", name] => {
                let a = u64::from_str_radix(addr, 16).ok()?;
                let n = u64::from_str_radix(size, 16).ok()?.max(1);
                (a / 4096..=(a + n - 1) / 4096)
                    .any(|p| touched.contains(&p))
                    .then(|| name.to_owned())
            }
            _ => None,
        })
        .collect())
}

pub fn run(args: &[String]) -> Result<()> {
    if let Some(a) = args.first() {
        bail!("agent-order takes no arguments, got {a:?}");
    }
    if paths::which("valgrind").is_none() {
        bail!("agent-order needs valgrind (./x.sh setup installs it)");
    }
    let vstreamd = paths::host_bin("vstreamd");
    if !vstreamd.exists() {
        bail!("no {} (cargo build -p vstream-host)", vstreamd.display());
    }
    crate::build_agent()?;
    let dir = std::env::temp_dir().join(format!("vstream-agent-order.{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = profile(&dir, &vstreamd);
    let _ = std::fs::remove_dir_all(&dir);
    let host = with_other_variants(functions(&result?), &text_symbols(&paths::agent_bin())?);
    write_order(&host)?;
    crate::build_agent()?;
    let pages = guest_code_pages(Path::new(GUEST_FILE))?;
    let mut names = host;
    names.extend(functions_on(&paths::agent_bin(), &pages)?);
    names.sort_unstable();
    names.dedup();
    write_order(&names)?;
    eprintln!(
        "agent-order: {} code pages touched in the guest",
        pages.len()
    );
    eprintln!("agent-order: rebuild the agent to link with it (cargo xtask agent)");
    Ok(())
}

/// Writes the order file.
fn write_order(names: &[String]) -> Result<()> {
    let order = paths::workspace_root().join(ORDER_FILE);
    let mut text = String::from(
        "# The agent's code in link order: the functions it runs at start, at rest and for QGA.\n\
         # Generated by `cargo xtask agent-order` (see docs/PERFORMANCE.md); do not edit.\n",
    );
    for n in names {
        text.push_str(n);
        text.push('\n');
    }
    std::fs::write(&order, text).with_context(|| format!("writing {}", order.display()))?;
    eprintln!(
        "agent-order: {} functions -> {}",
        names.len(),
        order.display()
    );
    Ok(())
}

/// Runs vstreamd and the agent under callgrind in `dir`, drives the workload, returns the
/// profile's text.
fn profile(dir: &Path, vstreamd: &Path) -> Result<String> {
    let up = dir.join("up.sock");
    let up2 = dir.join("up2.sock");
    let control = dir.join("control.sock");
    let qga = dir.join("qga.sock");
    let config = dir.join("vstreamd.toml");
    std::fs::write(
        &config,
        format!(
            "[[guest]]\nname = \"g\"\n[[guest.transport]]\nkind = \"mux\"\naddress = \"unix-listen:{}\"\n\
             [[guest.transport]]\nkind = \"mux\"\naddress = \"unix-listen:{}\"\n",
            up.display(),
            up2.display()
        ),
    )?;
    let cmdline = dir.join("cmdline");
    std::fs::write(
        &cmdline,
        format!(
            "console=hvc0 vstream.name=g vstream.connect=unix:{} vstream.connect=unix:{} vstream.qga=unix-listen:{}\n",
            up.display(),
            up2.display(),
            qga.display()
        ),
    )?;
    let mut daemon = Command::new(vstreamd);
    daemon
        .arg("--control")
        .arg(&control)
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut daemon = process::spawn(daemon)?;
    let out = dir.join("callgrind.out");
    let mut agent = Command::new("valgrind");
    agent
        .arg("--tool=callgrind")
        .arg("--demangle=no")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(paths::agent_bin())
        .arg("--no-random")
        .arg("--cmdline")
        .arg(&cmdline)
        .arg(format!(
            "--printer=unix-listen:{}",
            dir.join("printer.sock").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let driven = (|| -> Result<()> {
        wait_for(&control, "vstreamd")?;
        let mut agent = process::spawn(agent)?;
        let run = (|| -> Result<()> {
            wait_for(&qga, "the agent")?;
            let file = dir.join("data.bin");
            std::fs::write(
                &file,
                (0..16u32 << 20).map(|i| i as u8).collect::<Vec<u8>>(),
            )?;
            workload(&mut QgaConn::direct(&qga)?, 500, &file)?;
            workload(&mut QgaConn::via_control(&control, "g")?, 50, &file)?;
            std::thread::sleep(AT_REST);
            Ok(())
        })();
        // SIGTERM: the agent stops as it does in a guest, and callgrind writes its profile.
        process::terminate(&mut agent, Duration::from_secs(120));
        run
    })();
    process::terminate(&mut daemon, Duration::from_secs(10));
    driven?;
    std::fs::read_to_string(&out).with_context(|| format!("no profile at {}", out.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn functions_are_the_symbols_callgrind_names_once_each() {
        let profile = "fn=(1) main\ncalls=1 0\ncfn=(2) _ZN3foo3bar17h0123456789abcdefE\n\
                       fn=(2)\ncfn=(3) _ZN3foo3bar17h0123456789abcdefE'2\nfn=(4) 0x0000000000401000\n\
                       fn=(5) (below main)\nfn=(6) memcpy\nob=(1) /bin/agent\n";
        assert_eq!(
            super::functions(profile),
            ["_ZN3foo3bar17h0123456789abcdefE", "main", "memcpy"]
        );
    }

    #[test]
    fn every_variant_of_a_string_function_the_profile_saw_is_kept_together() {
        let symbols = [
            "__memchr_avx2",
            "__memchr_evex",
            "__memchr_sse2",
            "__strlen_evex",
            "__printf_fp",
            "main",
        ]
        .map(String::from);
        let seen = vec!["__memchr_avx2".to_owned(), "main".to_owned()];
        assert_eq!(
            super::with_other_variants(seen, &symbols),
            ["__memchr_avx2", "__memchr_evex", "__memchr_sse2", "main"]
        );
    }
}
