//! A console's history outlives vstreamd: a viewer opened after a restart sees the earlier
//! run's output (from the capture log), the marker of the gap, then the live output, once.

mod common;

use std::io::Read;
use std::time::Instant;

use tokio::io::AsyncWriteExt;

use common::{ctl_async, ok, spawn_ctl_as, Daemon, Options, WAIT};

const CONFIG: &str = r#"
[[guest]]
name = "g"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/a.sock"
[[guest.transport]]
kind = "console"
name = "hvc0"
address = "unix:DIR/hvc0.sock"
"#;

/// `vstreamctl console g --tail N`, polled until its output contains `want`.
async fn tail_until(d: &Daemon, lines: usize, want: &str) -> String {
    let n = lines.to_string();
    let args = ["console", "g", "--tail", n.as_str()];
    let started = Instant::now();
    loop {
        let out = ok(&args, ctl_async(&d.control, &args).await);
        if out.contains(want) {
            return out;
        }
        assert!(started.elapsed() < WAIT, "no {want:?} in:\n{out}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_after_a_restart_sees_the_earlier_runs_history() {
    let mut d = Options::config(CONFIG).start();
    // QEMU's side of the console: a listening chardev socket that vstreamd connects to.
    let qemu = tokio::net::UnixListener::bind(d.path("hvc0.sock")).expect("console socket");
    let (mut con, _) = qemu.accept().await.expect("console connection");
    let before: String = (0..200).map(|i| format!("boot line {i}\n")).collect();
    con.write_all(before.as_bytes()).await.expect("output");
    con.write_all(b"login: ").await.expect("output");
    tail_until(&d, 1, "login: ").await;

    d.kill9();
    drop(con);
    d.restart();
    let (mut con, _) = qemu.accept().await.expect("console reconnection");
    con.write_all(b"after the restart\n").await.expect("output");

    // The new vstreamd holds in memory only what came after its start; the history is the log.
    let out = tail_until(&d, 5, "after the restart").await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert_eq!(lines[..2], ["boot line 198", "boot line 199"], "{out}");
    assert_eq!(lines[2], "login: ", "{out}");
    assert!(
        lines[3].starts_with("[vstreamd: console capture interrupted at "),
        "{out}"
    );
    assert_eq!(lines[4], "after the restart", "{out}");
    // All of it, from the first line, when asked for.
    let all = tail_until(&d, 10_000, "after the restart").await;
    assert!(all.starts_with(&before), "{all}");

    // A following viewer: the history, then the live output, each byte once.
    let mut viewer = spawn_ctl_as(
        &d.control,
        0,
        0,
        &["console", "g", "--tail", "2", "--follow"],
    );
    let mut stdout = viewer.stdout.take().expect("stdout");
    let reading = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !seen.ends_with(b"live line\n") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8(seen).expect("utf-8")
    });
    // The viewer is attached once vstreamd counts it.
    let started = Instant::now();
    while d.status().await["guests"][0]["transports"]
        .as_array()
        .expect("transports")
        .iter()
        .all(|t| t["viewers"] != 1)
    {
        assert!(started.elapsed() < WAIT, "the viewer never attached");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    con.write_all(b"live line\n").await.expect("output");
    let seen = common::blocking(move || reading.join().expect("reader")).await;
    let _ = viewer.kill();
    let _ = viewer.wait();
    let marker = lines[3];
    assert_eq!(
        seen,
        format!("{marker}\nafter the restart\nlive line\n"),
        "history then live output, once each"
    );
}
