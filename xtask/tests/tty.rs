//! End-to-end tests of the tty device in a real guest (QEMU, the static agent in it, the real
//! vstreamd and vstreamctl): exit statuses, pipes, 16 MiB through `cat`, and `stty size`
//! following the local terminal on a pty. They never skip silently: without QEMU they fail,
//! unless VSTREAM_SKIP_E2E=1 is set.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use xtask::lab::testing::ctl;
use xtask::lab::{self, Lab, LabOptions};
use xtask::pty::PtyProcess;

/// From QEMU's start to the agent's transport being up, under TCG.
const UP_TIMEOUT: Duration = Duration::from_secs(120);

/// One guest for every test here, reached over the virtio port only (the fast transport).
fn shared_lab() -> &'static Lab {
    static LAB: OnceLock<Result<Lab, String>> = OnceLock::new();
    let lab = LAB.get_or_init(|| {
        let lab =
            Lab::boot(LabOptions::virtio_port_only().named("tty")).map_err(|e| e.to_string())?;
        lab.wait_for("the agent's transport to be up", UP_TIMEOUT, |s| {
            lab.mux_transports_up(s)
        })
        .map_err(|e| e.to_string())?;
        Ok(lab)
    });
    match lab {
        Ok(lab) => lab,
        Err(e) => panic!("the tty lab guest did not boot: {e}"),
    }
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or_else(|| {
        panic!(
            "vstreamctl died of signal {:?}: {}",
            out.status.signal(),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn exit_statuses_and_pipes_in_a_real_guest() {
    if !lab::e2e_enabled("exit_statuses_and_pipes_in_a_real_guest") {
        return;
    }
    let lab = shared_lab();
    let t = Duration::from_secs(60);
    let out = ctl(lab, &["exec", "tty", "--", "sh", "-c", "exit 7"], b"", t);
    assert_eq!(code(&out), 7, "{}", String::from_utf8_lossy(&out.stderr));
    let out = ctl(
        lab,
        &["shell", "tty", "--", "sh", "-c", "kill -9 $$"],
        b"",
        t,
    );
    assert_eq!(code(&out), 137);
    let out = ctl(lab, &["shell", "tty", "--", "cat"], b"x", t);
    assert_eq!((code(&out), out.stdout.as_slice()), (0, &b"x"[..]));
    let out = ctl(
        lab,
        &["exec", "tty", "--", "sh", "-c", "hostname; echo err >&2"],
        b"",
        t,
    );
    assert_eq!(out.stdout, b"tty\n");
    assert_eq!(out.stderr, b"err\n");
    let out = ctl(lab, &["exec", "tty", "--", "/nonexistent"], b"", t);
    assert_eq!(code(&out), 127);
}

#[test]
fn sixteen_mib_through_cat_in_a_real_guest() {
    if !lab::e2e_enabled("sixteen_mib_through_cat_in_a_real_guest") {
        return;
    }
    let lab = shared_lab();
    // xorshift64*: incompressible, reproducible bytes.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..16 * 1024 * 1024 / 8)
        .flat_map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()
        })
        .collect();
    let t = Instant::now();
    let out = ctl(
        lab,
        &["exec", "tty", "--", "cat"],
        &data,
        Duration::from_secs(400),
    );
    let took = t.elapsed();
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "the bytes came back changed");
    eprintln!(
        "16 MiB through cat in the guest ({}) and back: {took:?}, {:.2} MiB/s each way",
        lab.accel(),
        16.0 / took.as_secs_f64()
    );
}

/// Sets the size of the terminal that is `pid`'s stdin, as a terminal emulator does when its
/// window is resized: the kernel then sends SIGWINCH to the terminal's foreground group.
fn resize_terminal_of(pid: u32, rows: u16, cols: u16) {
    let tty = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(format!("/proc/{pid}/fd/0"))
        .expect("open the pty of vstreamctl");
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which points to a live local;
    // the descriptor is open for the duration of the call.
    let rc = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
}

#[test]
fn stty_size_follows_the_terminal_in_a_real_guest() {
    if !lab::e2e_enabled("stty_size_follows_the_terminal_in_a_real_guest") {
        return;
    }
    let lab = shared_lab();
    let mut command = lab.ctl_command();
    command.args(["shell", "tty"]);
    // A 40x120 terminal with vstreamctl as its session leader: a login shell on a pty in the guest.
    let mut term = PtyProcess::spawn(command).expect("vstreamctl on a pty");
    let wait = Duration::from_secs(60);
    let m = term.mark();
    term.send(b"echo rea''dy\r").expect("type");
    term.expect_after(m, "ready", wait)
        .unwrap_or_else(|e| panic!("{e}"));
    let m = term.mark();
    term.send(b"stty size\r").expect("type");
    term.expect_after(m, "40 120", wait)
        .unwrap_or_else(|e| panic!("{e}"));
    resize_terminal_of(term.id(), 50, 132);
    let m = term.mark();
    term.send(b"stty size\r").expect("type");
    term.expect_after(m, "50 132", wait)
        .unwrap_or_else(|e| panic!("{e}"));
    term.send(b"exit 3\r").expect("type");
    let status = term.wait_timeout(wait).expect("wait");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(3),
        "{}",
        term.output_text()
    );
}
