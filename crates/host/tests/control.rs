//! The control socket: status streamed one guest per line (50 guests, two of them with 64
//! channels each), `status GUEST`, and who may do what (peer credentials of real processes
//! running as other uids).

mod common;

use std::io::BufRead;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use vstream_agent::Agent;

use common::{
    connected, ctl_as_async, ctl_async, ctl_input_all_async, ok, spawn_ctl_as, start_daemon,
};

/// `[[guest]]` sections: guest `gN` on its own `unix-listen:DIR/gN.sock`.
fn guests_config(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "[[guest]]\nname = \"g{i}\"\n[[guest.transport]]\nkind = \"mux\"\naddress = \"unix-listen:DIR/g{i}.sock\"\n"
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_streams_fifty_guests_and_shows_one() {
    const N: usize = 50;
    // What fits in an agent's default per-peer bound (docs/PROTOCOL.md §6): about 75 channels.
    const CHANNELS: usize = 64;
    let d = start_daemon(&guests_config(N));
    let agents: Vec<Agent> = (0..N)
        .map(|i| Agent::start(&format!("g{i}"), vec![d.unix(&format!("g{i}.sock"))]))
        .collect();
    let all = d
        .wait_for_within("all 50 guests to connect", Duration::from_secs(60), |s| {
            (0..N).all(|i| connected(s, &format!("g{i}")))
        })
        .await;
    assert_eq!(all["guests"].as_array().map(Vec::len), Some(N));

    // Two guests with 64 channels each: the whole status is far beyond the old single-line
    // limit, and still arrives.
    let mut channels = Vec::new();
    for agent in &agents[..2] {
        for _ in 0..CHANNELS {
            channels.push(agent.mux().open("diag", "echo").await.expect("open"));
        }
    }
    let out = ok(
        &["status", "--json"],
        ctl_async(&d.control, &["status", "--json"]).await,
    );
    assert!(
        out.len() > vstream_host::control::MAX_REQUEST,
        "status is {} bytes",
        out.len()
    );
    let status: serde_json::Value = serde_json::from_str(&out).expect("status --json parses");
    let guests = status["guests"].as_array().expect("guests");
    assert_eq!(guests.len(), N);
    let g0 = guests.iter().find(|g| g["name"] == "g0").expect("g0");
    assert_eq!(g0["channels"].as_array().map(Vec::len), Some(CHANNELS));

    // The table: a header, then one line per guest, all connected.
    let table = ok(&["status"], ctl_async(&d.control, &["status"]).await);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), N + 1, "{table}");
    assert!(lines[0].starts_with("GUEST"), "{table}");
    for i in 0..N {
        let row = lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(&format!("g{i}")))
            .unwrap_or_else(|| panic!("no row for g{i}:\n{table}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[1], "connected", "{row}");
        assert_eq!(cols[2], "1/1", "{row}");
    }
    let g0_row = lines.iter().find(|l| l.starts_with("g0 ")).expect("g0 row");
    assert_eq!(
        g0_row.split_whitespace().nth(7),
        Some(CHANNELS.to_string().as_str()),
        "channels of g0: {g0_row}"
    );

    // One guest: in detail, or as its JSON object.
    let one = ok(
        &["status", "g7"],
        ctl_async(&d.control, &["status", "g7"]).await,
    );
    assert!(one.starts_with("g7  connected"), "{one}");
    assert!(one.contains("mux"), "{one}");
    assert!(!one.contains("g8"), "{one}");
    let json = ok(
        &["status", "g1", "--json"],
        ctl_async(&d.control, &["status", "g1", "--json"]).await,
    );
    let g1: serde_json::Value = serde_json::from_str(&json).expect("one guest's JSON");
    assert_eq!(g1["name"], "g1");
    assert_eq!(g1["connected"], true);
    assert_eq!(g1["channels"].as_array().map(Vec::len), Some(CHANNELS));

    let out = ctl_async(&d.control, &["status", "nope"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no guest named \"nope\""), "{err}");
    drop(channels);
    drop(agents);
}

/// Unused ids: a read-only group, a member of it, and a user in no group of ours.
const READ_GID: u32 = 64_999;
const READER: u32 = 64_998;
const STRANGER: u32 = 64_997;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_does_everything_the_read_only_group_only_watches() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "this test switches to other uids: run it as root"
    );
    let d = start_daemon(&format!(
        r#"
[daemon]
control_read_group = {READ_GID}
[[guest]]
name = "g"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/g.sock"
[[guest.transport]]
kind = "console"
name = "hvc0"
address = "unix-listen:DIR/con.sock"
"#
    ));
    // Other users must be able to reach the socket's directory (a tempdir is 0700).
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    let meta = std::fs::metadata(&d.control).expect("control socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), READ_GID);

    let _agent = Agent::start("g", vec![d.unix("g.sock")]);
    d.wait_connected("g").await;

    // The reader watches: status, one guest, the console's log, events.
    let st = ok(
        &["status", "--json"],
        ctl_as_async(&d.control, READER, READ_GID, &["status", "--json"]).await,
    );
    let st: serde_json::Value = serde_json::from_str(&st).expect("status JSON");
    assert!(connected(&st, "g"), "{st}");
    ok(
        &["status", "g"],
        ctl_as_async(&d.control, READER, READ_GID, &["status", "g"]).await,
    );
    ok(
        &["console", "g", "--tail", "5"],
        ctl_as_async(
            &d.control,
            READER,
            READ_GID,
            &["console", "g", "--tail", "5"],
        )
        .await,
    );
    let mut events = spawn_ctl_as(&d.control, READER, READ_GID, &["events", "g", "--json"]);
    let stdout = events.stdout.take().expect("stdout");
    let first_event = std::thread::spawn(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    });

    // The owner (root) opens a channel: it works, and the reader sees it as an event.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = ctl_input_all_async(&d.control, &["open", "g", "diag", "echo"], b"ping").await;
    assert_eq!(ok(&["open"], out), "ping");
    let line = common::blocking(move || first_event.join().expect("reader"))
        .await
        .expect("an event line");
    let _ = events.kill();
    let _ = events.wait();
    let ev: serde_json::Value = serde_json::from_str(&line).expect("event JSON");
    assert_eq!(ev["event"], "channel-opened", "{ev}");

    // Everything that acts on the guest is refused, and says why.
    for (args, verb) in [
        (&["open", "g", "diag", "echo"][..], "open"),
        (&["exec", "g", "--", "true"][..], "open"),
        (&["console", "g"][..], "console attach"),
        (&["agent", "g", r#"{"execute":"guest-ping"}"#][..], "agent"),
        (&["jobs", "g"][..], "jobs"),
    ] {
        let out = ctl_as_async(&d.control, READER, READ_GID, args).await;
        assert!(!out.status.success(), "{args:?} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        let want =
            format!("uid {READER} is in the read-only group {READ_GID}; {verb} needs the owner");
        assert!(err.contains(&want), "{args:?}: {err}");
    }

    // Someone outside the group cannot even connect (the kernel checks the socket's mode)...
    let out = ctl_as_async(&d.control, STRANGER, STRANGER, &["status"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach vstreamd"), "{err}");
    // ...and if the mode is loosened by hand, vstreamd still refuses them.
    std::fs::set_permissions(&d.control, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = ctl_as_async(&d.control, STRANGER, STRANGER, &["status"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "uid {STRANGER} is neither the owner (uid 0) nor in the read-only group {READ_GID}"
    );
    assert!(err.contains(&want), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_read_group_only_the_owner_gets_in() {
    let d = start_daemon(&guests_config(1));
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    let meta = std::fs::metadata(&d.control).expect("control socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    ok(&["status"], ctl_async(&d.control, &["status"]).await);
    std::fs::set_permissions(&d.control, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = ctl_as_async(&d.control, STRANGER, STRANGER, &["status"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "uid {STRANGER} is not the owner (uid 0) and no read-only group is configured"
        )),
        "{err}"
    );
}
