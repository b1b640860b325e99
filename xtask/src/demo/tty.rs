//! The tty device: `vstreamctl exec` and `vstreamctl shell`.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use super::ctl;
use crate::lab::testing::pseudo_random;
use crate::lab::Lab;

pub(super) fn demo(lab: &Lab) -> Result<String> {
    let t = Duration::from_secs(60);
    let name = lab.name();
    let mut out = String::new();

    let uname = ctl(lab, &["exec", name, "--", "uname", "-a"], &[], t)?;
    let text = String::from_utf8_lossy(&uname.stdout).into_owned();
    ensure!(
        uname.status.success() && text.starts_with(&format!("Linux {name} ")),
        "uname -a ({}): {text:?} {}",
        uname.status,
        String::from_utf8_lossy(&uname.stderr)
    );
    out.push_str(&format!("$ vstreamctl exec {name} -- uname -a\n{text}"));

    let exit = ctl(lab, &["exec", name, "--", "sh", "-c", "exit 3"], &[], t)?;
    ensure!(
        exit.status.code() == Some(3),
        "`sh -c 'exit 3'` gave {} (stderr {:?})",
        exit.status,
        String::from_utf8_lossy(&exit.stderr)
    );
    out.push_str(&format!(
        "$ vstreamctl exec {name} -- sh -c 'exit 3'; echo $?\n{}\n",
        exit.status.code().unwrap_or(-1)
    ));

    let split = ctl(
        lab,
        &[
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "echo to-stdout; echo to-stderr >&2",
        ],
        &[],
        t,
    )?;
    ensure!(
        split.stdout == b"to-stdout\n" && split.stderr == b"to-stderr\n",
        "stdout {:?}, stderr {:?}",
        String::from_utf8_lossy(&split.stdout),
        String::from_utf8_lossy(&split.stderr)
    );
    out.push_str("stdout and stderr arrive apart: stdout \"to-stdout\", stderr \"to-stderr\"\n");

    let data = pseudo_random(1 << 20, 7);
    let started = Instant::now();
    let cat = ctl(lab, &["exec", name, "--", "cat"], &data, t)?;
    ensure!(
        cat.status.success() && cat.stdout == data,
        "1 MiB through cat came back as {} different bytes ({})",
        cat.stdout.len(),
        cat.status
    );
    out.push_str(&format!(
        "1 MiB through `vstreamctl exec {name} -- cat` and back, identical, in {:.2} s\n",
        started.elapsed().as_secs_f64()
    ));

    let pty = ctl(lab, &["shell", name, "-t", "--", "tty"], &[], t)?;
    let text = String::from_utf8_lossy(&pty.stdout).trim().to_owned();
    ensure!(
        pty.status.success() && text.starts_with("/dev/pts/"),
        "`vstreamctl shell -t -- tty` ({}): {text:?} {}",
        pty.status,
        String::from_utf8_lossy(&pty.stderr)
    );
    out.push_str(&format!("$ vstreamctl shell {name} -t -- tty\n{text}\n"));
    Ok(out)
}
