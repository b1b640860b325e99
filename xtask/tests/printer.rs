//! End-to-end test of the printer device in a real guest: a 50 MiB PDF printed with busybox
//! `nc 127.0.0.1 9100` arrives byte-identical (sha256 in the guest and on the host) with type
//! pdf; a job cut by killing the agent ends as `.partial` and is reported; a job over the
//! spool quota is refused with a clear error and nothing else in the spool is touched.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use xtask::lab::testing::{bg, print_jobs, sha256_file, wait_out, wait_print_jobs};
use xtask::lab::{self, Lab, LabOptions};

const UP_TIMEOUT: Duration = Duration::from_secs(120);
const QUOTA: u64 = 80_000_000;

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_50_mib_pdf_arrives_whole_a_cut_job_is_partial_and_the_quota_refuses() {
    if !lab::e2e_enabled("a_50_mib_pdf_arrives_whole_a_cut_job_is_partial_and_the_quota_refuses") {
        return;
    }
    let options = LabOptions {
        memory_mib: 768,
        extra_config: format!("\n[guest.printer]\nquota_bytes = {QUOTA}\n"),
        ..LabOptions::virtio_port_only().named("printer")
    };
    let lab = Lab::boot(options).unwrap_or_else(|e| panic!("{e}"));
    lab.wait_for("the mux transports to be up", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let spool = lab.paths().spool_dir("printer");

    // 1. 50 MiB "PDF": header, random body, trailer; printed with busybox nc.
    bg(
        &lab,
        "gen",
        "{ printf '%%PDF-1.4\\n'; head -c 52428800 /dev/urandom; printf '\\n%%%%EOF\\n'; } > /tmp/job.pdf; sha256sum /tmp/job.pdf",
    );
    let made = wait_out(&lab, "gen", "DONE-rc=0", Duration::from_secs(180));
    let guest_sha = made
        .lines()
        .find(|l| l.contains("/tmp/job.pdf"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(guest_sha.len(), 64, "{made}");
    bg(
        &lab,
        "print1",
        "t0=$(cut -d' ' -f1 /proc/uptime); nc 127.0.0.1 9100 < /tmp/job.pdf; echo rc=$?; t1=$(cut -d' ' -f1 /proc/uptime); echo elapsed $t0 $t1",
    );
    let printed = wait_out(&lab, "print1", "DONE-rc=", Duration::from_secs(300));
    assert!(printed.contains("rc=0"), "{printed}");
    let times: Vec<f64> = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("elapsed "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|t| t.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if let [t0, t1] = times[..] {
        let secs = t1 - t0;
        eprintln!(
            "printer: 50 MiB PDF printed in {secs:.2} s in the guest (nc start to close), {:.1} MiB/s",
            50.0 / secs.max(0.01)
        );
    }
    // nc returned: the agent closed the connection after the host's Done.
    assert_eq!(names(&spool), ["job-000001.pdf"]);
    let file = spool.join("job-000001.pdf");
    assert_eq!(
        std::fs::metadata(&file).expect("job").len(),
        52_428_800 + 9 + 7
    );
    assert_eq!(
        sha256_file(&file),
        guest_sha,
        "the spooled job differs from the guest's file"
    );
    let j = print_jobs(&lab);
    assert_eq!(
        (j[0]["state"].as_str(), j[0]["type"].as_str()),
        (Some("done"), Some("pdf")),
        "{j:#?}"
    );
    assert_eq!(j[0]["source"], "tcp-listen:127.0.0.1:9100");

    // 2. A job cut by killing the agent: kept as partial, reported as such.
    bg(
        &lab,
        "cut",
        "{ printf '%%!PS-Adobe-3.0\\n'; head -c 3000000 /dev/urandom; sleep 120; } | nc 127.0.0.1 9100",
    );
    wait_print_jobs(&lab, "the cut job to be arriving", |j| {
        j.iter().any(|j| {
            j["id"] == 2 && j["state"] == "receiving" && j["size"].as_u64() >= Some(3_000_000)
        })
    });
    bg(&lab, "kill", "kill -9 $(cat /run/vstream-agent.pid)");
    let j = wait_print_jobs(&lab, "the cut job to be partial", |j| {
        j.iter().any(|j| j["id"] == 2 && j["state"] == "partial")
    });
    let p = j.iter().find(|j| j["id"] == 2).expect("job 2");
    assert_eq!(p["file"], "job-000002.ps.partial");
    assert_eq!(p["type"], "postscript");
    assert!(p["size"].as_u64().unwrap_or(0) >= 3_000_000, "{p}");
    assert!(!p["reason"].as_str().unwrap_or("").is_empty(), "{p}");
    assert_eq!(names(&spool), ["job-000001.pdf", "job-000002.ps.partial"]);
    let status = lab.status().unwrap_or_else(|e| panic!("{e}"));
    let guest = lab::guest_status(&status, "printer").expect("guest");
    assert_eq!(
        guest["devices"]["printer"]["jobs"]["partial"], 1,
        "{guest:#}"
    );
    let log = lab.daemon_log();
    assert!(
        log.contains("print job cut: kept as partial"),
        "vstreamd did not report the cut job"
    );

    // 3. Over quota (80 MB; 55 MB used): refused, the client's connection is closed, nothing
    // else in the spool is touched.
    lab.wait_for("the restarted agent", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let before: Vec<(String, u64, u64, i64)> = names(&spool)
        .into_iter()
        .map(|n| {
            let m = std::fs::metadata(spool.join(&n)).expect("meta");
            (n, m.ino(), m.len(), m.mtime())
        })
        .collect();
    bg(
        &lab,
        "big",
        "head -c 31457280 /dev/urandom > /tmp/big.bin; nc 127.0.0.1 9100 < /tmp/big.bin; echo nc-rc=$?",
    );
    let refused = wait_out(&lab, "big", "DONE-rc=", Duration::from_secs(300));
    eprintln!("the refused client: {refused}");
    assert!(refused.contains("nc-rc="), "{refused}");
    let j = wait_print_jobs(&lab, "the refused job", |j| {
        j.iter().any(|j| j["state"] == "refused")
    });
    let r = j.iter().find(|j| j["state"] == "refused").expect("refused");
    let reason = r["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("spool quota exceeded for guest printer"),
        "{r}"
    );
    assert!(reason.contains(&format!("quota {QUOTA} bytes")), "{r}");
    let after: Vec<(String, u64, u64, i64)> = names(&spool)
        .into_iter()
        .map(|n| {
            let m = std::fs::metadata(spool.join(&n)).expect("meta");
            (n, m.ino(), m.len(), m.mtime())
        })
        .collect();
    assert_eq!(after, before, "the refused job touched the spool");
    assert_eq!(sha256_file(&file), guest_sha);
    // The agent logged the host's reason (its stderr goes to ttyS0).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lab.guest_console_log().contains("spool quota exceeded") {
        assert!(
            Instant::now() < deadline,
            "the agent did not log the refusal"
        );
        thread::sleep(Duration::from_millis(200));
    }
    let listing = lab.ctl(["jobs", "printer"]).expect("jobs");
    let text = String::from_utf8_lossy(&listing.stdout);
    eprintln!("{text}");
    assert!(
        text.contains("done") && text.contains("partial") && text.contains("refused"),
        "{text}"
    );
}
