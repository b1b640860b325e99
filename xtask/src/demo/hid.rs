//! The hid device: text typed with `vstreamctl input`, read back from the guest's evdev device.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use super::{ctl_ok, guest_sh};
use crate::lab::Lab;

/// The US-layout character of key `code` (linux/input-event-codes.h), with or without Shift.
fn key_char(code: u16, shift: bool) -> Option<char> {
    let pick = |row: &str, shifted: &str, i: usize| {
        let s = if shift { shifted } else { row };
        s.chars().nth(i)
    };
    match code {
        2..=11 => pick("1234567890", "!@#$%^&*()", usize::from(code - 2)),
        12 => pick("-", "_", 0),
        13 => pick("=", "+", 0),
        15 => Some('\t'),
        16..=25 => pick("qwertyuiop", "QWERTYUIOP", usize::from(code - 16)),
        26 => pick("[", "{", 0),
        27 => pick("]", "}", 0),
        28 => Some('\n'),
        30..=38 => pick("asdfghjkl", "ASDFGHJKL", usize::from(code - 30)),
        39 => pick(";", ":", 0),
        40 => pick("'", "\"", 0),
        41 => pick("`", "~", 0),
        43 => pick("\\", "|", 0),
        44..=50 => pick("zxcvbnm", "ZXCVBNM", usize::from(code - 44)),
        51 => pick(",", "<", 0),
        52 => pick(".", ">", 0),
        53 => pick("/", "?", 0),
        57 => Some(' '),
        _ => None,
    }
}

/// Turns evtest's `EV_KEY code value` lines back into the text they type.
fn decode_keys(evtest: &str) -> String {
    let mut shift = false;
    let mut text = String::new();
    for line in evtest.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let ["EV_KEY", code, value] = f[..] else {
            continue;
        };
        let (Ok(code), Ok(value)) = (code.parse::<u16>(), value.parse::<i32>()) else {
            continue;
        };
        match (code, value) {
            (42 | 54, v) => shift = v != 0,
            (c, 1) => text.extend(key_char(c, shift).or(Some('\u{fffd}'))),
            _ => {}
        }
    }
    text
}

pub(super) fn demo(lab: &Lab) -> Result<String> {
    let name = lab.name();
    let text = "Hello, vstream 42!\n";
    // Two reports a character, four with Shift.
    let reports: usize = text
        .chars()
        .map(|c| {
            if c.is_ascii_uppercase() || "!@#$%^&*()_+{}|:\"<>?~".contains(c) {
                4
            } else {
                2
            }
        })
        .sum();
    let mut out = String::new();
    // The first keyboard report creates the guest's uinput keyboard.
    ctl_ok(lab, &["input", name, "key", "shift"])?;
    let devices = guest_sh(lab, "cat /sys/class/input/*/name")?;
    ensure!(
        devices.lines().any(|l| l == "vstream keyboard"),
        "no \"vstream keyboard\" in the guest's input devices: {devices:?}"
    );
    // An evdev reader in the guest, in its own session (the tty device hangs up a command's
    // session when the command exits); this returns once it listens.
    let listening = guest_sh(
        lab,
        &format!(
            "rm -f /tmp/hid.out; setsid vstream-agent evtest 'vstream keyboard' --reports {reports} \
             --timeout 90 </dev/null >/tmp/hid.out 2>&1 & \
             i=0; until grep -q listening /tmp/hid.out; do i=$((i+1)); \
             [ $i -lt 300 ] || {{ cat /tmp/hid.out; exit 1; }}; sleep 0.1; done; cat /tmp/hid.out"
        ),
    )?;
    out.push_str(&format!(
        "guest: vstream-agent evtest 'vstream keyboard': {}\n",
        listening.trim()
    ));
    let started = Instant::now();
    ctl_ok(lab, &["input", name, "type", text])?;
    let took = started.elapsed();
    out.push_str(&format!(
        "$ vstreamctl input {name} type {text:?}   # returned in {:.0} ms, once the guest wrote the last report\n",
        took.as_secs_f64() * 1000.0
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let seen = guest_sh(lab, "cat /tmp/hid.out")?;
        if seen.contains("done:") {
            break seen;
        }
        ensure!(
            Instant::now() < deadline,
            "the reader in the guest did not finish: {seen}"
        );
        thread::sleep(Duration::from_millis(300));
    };
    let keys = seen.lines().filter(|l| l.starts_with("EV_KEY")).count();
    let typed = decode_keys(&seen);
    let done = seen
        .lines()
        .find(|l| l.starts_with("done:"))
        .unwrap_or_default();
    out.push_str(&format!(
        "guest evdev reader: {done}, {keys} key events, which type {typed:?}\n"
    ));
    ensure!(
        done == format!("done: {reports} reports"),
        "expected {reports} reports: {seen}"
    );
    ensure!(
        typed == text,
        "the guest read {typed:?}, {text:?} was typed:\n{seen}"
    );
    Ok(out)
}
