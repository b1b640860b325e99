//! The console capture against a real Unix socket: logs, tails, viewers, typing, freezes.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

use super::*;

#[tokio::test]
async fn captures_logs_and_round_trips_typed_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("con.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let console = Console::start(
        ConsoleSettings {
            name: "hvc0".into(),
            address: format!("unix:{}", sock.display()).parse().expect("address"),
            log: dir.path().join("hvc0.log"),
            log_max_bytes: 1 << 20,
            log_keep: 2,
        },
        None,
    )
    .expect("start");
    let (mut guest, _) = listener.accept().await.expect("accept");
    let mut writer = console.attach(true);
    let reader = console.attach(true);
    assert!(
        writer.is_writer() && !reader.is_writer(),
        "one writer at a time"
    );
    guest
        .write_all(b"Linux version 6.1\nlogin: ")
        .await
        .expect("write");
    let mut seen = Vec::new();
    while !seen.ends_with(b"login: ") {
        if let Ok(Some(b)) = writer.next_output().await {
            seen.extend_from_slice(&b);
        }
    }
    writer
        .type_bytes(Bytes::from_static(b"root\n"))
        .await
        .expect("type");
    let mut typed = [0u8; 5];
    guest.read_exact(&mut typed).await.expect("read");
    assert_eq!(&typed, b"root\n");
    assert!(reader.type_bytes(Bytes::from_static(b"x")).await.is_err());
    assert_eq!(console.tail(1), b"login: ");
    assert_eq!(console.tail(5), b"Linux version 6.1\nlogin: ");
    let log = std::fs::read(dir.path().join("hvc0.log")).expect("log");
    assert_eq!(log, b"Linux version 6.1\nlogin: ");
    drop(writer);
    assert!(
        console.attach(true).is_writer(),
        "the writer role is released on detach"
    );
    // An explicit take-over: the old writer is left watching, its keys refused.
    let holder = console.attach(true);
    let taker = console.take_over();
    assert!(taker.is_writer() && !holder.is_writer());
    assert!(holder.type_bytes(Bytes::from_static(b"x")).await.is_err());
    taker
        .type_bytes(Bytes::from_static(b"id\n"))
        .await
        .expect("type after take-over");
    let mut typed = [0u8; 3];
    guest.read_exact(&mut typed).await.expect("read");
    assert_eq!(&typed, b"id\n");
    drop(holder);
    assert!(taker.is_writer(), "a former writer's detach keeps the role");
}

#[tokio::test]
async fn a_restarted_capture_continues_the_log_after_a_marker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("con.sock");
    let log = dir.path().join("hvc0.log");
    // What an earlier vstreamd captured before it was killed, mid-line.
    std::fs::write(&log, b"boot ok\nhalf a li").expect("old log");
    let listener = UnixListener::bind(&sock).expect("bind");
    let console = Console::start(
        ConsoleSettings {
            name: "hvc0".into(),
            address: format!("unix:{}", sock.display()).parse().expect("address"),
            log: log.clone(),
            log_max_bytes: 1 << 20,
            log_keep: 2,
        },
        None,
    )
    .expect("start");
    let (mut guest, _) = listener.accept().await.expect("accept");
    let mut viewer = console.attach(false);
    guest.write_all(b"after\n").await.expect("write");
    let mut seen = Vec::new();
    while !seen.ends_with(b"after\n") {
        if let Ok(Some(b)) = viewer.next_output().await {
            seen.extend_from_slice(&b);
        }
    }
    let text = String::from_utf8(std::fs::read(&log).expect("log")).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(&lines[..2], ["boot ok", "half a li"]);
    assert!(
        lines[2].starts_with("[vstreamd: console capture interrupted at ")
            && lines[2].contains(" UTC, resumed at "),
        "{text}"
    );
    assert_eq!(lines[3], "after");
    assert_eq!(seen, b"after\n", "viewers see only the guest's output");
}

/// Reads a viewer's output until it ends with `end`.
async fn read_until(viewer: &mut Viewer, end: &[u8]) -> Vec<u8> {
    let mut seen = Vec::new();
    while !seen.ends_with(end) {
        match viewer.next_output().await {
            Ok(Some(b)) => seen.extend_from_slice(&b),
            other => panic!(
                "viewer: {other:?} after {:?}",
                String::from_utf8_lossy(&seen)
            ),
        }
    }
    seen
}

#[tokio::test]
async fn a_frozen_capture_is_adopted_by_a_successor_with_no_byte_lost_and_no_marker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("con.sock");
    let log = dir.path().join("hvc0.log");
    let listener = UnixListener::bind(&sock).expect("bind");
    let settings = ConsoleSettings {
        name: "hvc0".into(),
        address: format!("unix:{}", sock.display()).parse().expect("address"),
        log: log.clone(),
        log_max_bytes: 1 << 20,
        log_keep: 2,
    };
    let first = Console::start(settings.clone(), None).expect("start");
    let (mut guest, _) = listener.accept().await.expect("accept");
    let mut viewer = first.attach(false);
    guest.write_all(b"one\n").await.expect("write");
    read_until(&mut viewer, b"one\n").await;

    // A freeze that is dropped (a failed upgrade): the capture goes on.
    drop(first.freeze().await.expect("freeze"));
    guest.write_all(b"two\n").await.expect("write");
    read_until(&mut viewer, b"two\n").await;

    // Frozen for good: what the guest writes now waits in the connection.
    let frozen = first.freeze().await.expect("freeze");
    guest.write_all(b"three\n").await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        viewer.try_next_output().is_none(),
        "a frozen capture reads nothing"
    );
    assert_eq!(frozen.position.bytes_in, 8);
    assert_eq!(frozen.tail, b"one\ntwo\n");

    // The successor adopts the descriptor; it reads once its viewers are attached.
    let fd = frozen.fd.as_ref().expect("a unix socket has a descriptor");
    let (gate, go) = oneshot::channel();
    let carried = Carried {
        fd: fd.try_clone().expect("dup"),
        position: frozen.position.clone(),
        tail: frozen.tail.clone(),
        go,
    };
    let second = Console::start(settings, Some(carried)).expect("start successor");
    let mut after = second.attach(false);
    drop(gate);
    assert_eq!(read_until(&mut after, b"three\n").await, b"three\n");
    guest.write_all(b"four\n").await.expect("write");
    assert_eq!(read_until(&mut after, b"four\n").await, b"four\n");
    assert_eq!(second.status().bytes_in, 19, "the count goes on");
    assert_eq!(second.tail(10), b"one\ntwo\nthree\nfour\n");
    assert_eq!(
        std::fs::read(&log).expect("log"),
        b"one\ntwo\nthree\nfour\n",
        "every byte once, no marker"
    );
    // Nothing reconnected: the guest's side saw one connection.
    let again = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
    assert!(again.is_err(), "the successor reconnected");
}
