//! The command lines' manners, on the built binaries: completion scripts and man pages that
//! know every subcommand, exit codes in `--help`, tables whose columns line up whatever the
//! widths of their cells, `--json` that parses, no colour in a log that is not a terminal, and
//! a quiet end when the reader of the output has gone.

mod common;

use std::process::{Command, Output};

use common::{ctl_async, ok, raw_guest, raw_print, start_daemon, wait_jobs};

fn run(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().expect(bin);
    ok(args, out)
}

fn vstreamctl(args: &[&str]) -> String {
    run(env!("CARGO_BIN_EXE_vstreamctl"), args)
}

/// The subcommands `vstreamctl --help` lists (but `help`).
fn subcommands() -> Vec<String> {
    let help = vstreamctl(&["--help"]);
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(String::from)
        .collect();
    for known in [
        "status",
        "console",
        "exec",
        "shell",
        "jobs",
        "completions",
        "man",
    ] {
        assert!(names.iter().any(|n| n == known), "{known} in {names:?}");
    }
    names
}

#[test]
fn completions_and_man_pages_know_every_subcommand() {
    let names = subcommands();
    for shell in ["bash", "zsh", "fish"] {
        let script = vstreamctl(&["completions", shell]);
        for n in &names {
            assert!(script.contains(n.as_str()), "{shell} completion lacks {n}");
        }
    }
    assert!(vstreamctl(&["completions", "bash"]).contains("complete -F _vstreamctl"));

    let dir = tempfile::tempdir().expect("tempdir");
    let at = dir.path().to_str().expect("utf-8 path");
    vstreamctl(&["man", at]);
    let page = std::fs::read_to_string(dir.path().join("vstreamctl.1")).expect("vstreamctl.1");
    assert!(
        page.contains("\n.TH vstreamctl 1 "),
        "not a roff page:\n{page}"
    );
    assert!(page.contains("\n.SH SUBCOMMANDS\n"), "{page}");
    for n in &names {
        // roff escapes the hyphens of `vstreamctl-time-sync`.
        let entry = format!("vstreamctl\\-{}(1)", n.replace('-', "\\-"));
        assert!(page.contains(&entry), "vstreamctl.1 lacks {entry}");
        let sub = dir.path().join(format!("vstreamctl-{n}.1"));
        assert!(sub.exists(), "no {}", sub.display());
    }
    // The exit codes are in the page, as in --help.
    for text in [page.as_str(), &vstreamctl(&["--help"])] {
        assert!(text.contains("255") && text.contains("128+N"), "{text}");
    }

    let vstreamd = env!("CARGO_BIN_EXE_vstreamd");
    assert!(run(vstreamd, &["--completions", "bash"]).contains("--state-dir"));
    run(vstreamd, &["--man", at]);
    let page = std::fs::read_to_string(dir.path().join("vstreamd.1")).expect("vstreamd.1");
    assert!(page.contains("\n.TH vstreamd 1 "), "{page}");
}

#[test]
fn usage_errors_exit_2_other_errors_1() {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_vstreamctl"))
        .args(["jobs"])
        .output()
        .expect("vstreamctl");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_vstreamctl"))
        .args(["--control", "/nonexistent/control.sock", "status"])
        .output()
        .expect("vstreamctl");
    assert_eq!(out.status.code(), Some(1));
}

/// Output into a pipe nobody reads (`vstreamctl completions bash | true`) ends vstreamctl with
/// status 0 and nothing on stderr, not with a panic.
#[test]
fn a_closed_pipe_on_stdout_ends_quietly() {
    let (read, write) = std::io::pipe().expect("pipe");
    drop(read);
    let out = Command::new(env!("CARGO_BIN_EXE_vstreamctl"))
        .args(["completions", "bash"])
        .stdout(write)
        .output()
        .expect("vstreamctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "{err}");
}

/// Each cell of `line` with where it starts and ends (cells hold no spaces here).
fn cells(line: &str) -> Vec<(usize, usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in line.char_indices().chain([(line.len(), ' ')]) {
        match (c == ' ', start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                out.push((s, i, &line[s..i]));
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// Every row's cells start (left-aligned columns) or end (right-aligned ones) where the
/// header's do; rows may leave trailing columns empty.
fn assert_aligned(table: &str, right: &[&str]) {
    let mut lines = table.lines();
    let header = cells(lines.next().expect("a header"));
    for row in lines {
        let row_cells = cells(row);
        assert!(row_cells.len() <= header.len(), "{table}");
        for ((hs, he, name), (rs, re, cell)) in header.iter().zip(&row_cells) {
            if right.contains(name) {
                assert_eq!(he, re, "{cell} does not end under {name}:\n{table}");
            } else {
                assert_eq!(hs, rs, "{cell} does not start under {name}:\n{table}");
            }
        }
    }
}

const LONG_GUEST: &str = "a-guest-whose-name-is-much-longer-than-twenty-four-characters";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_line_up_with_long_names_and_json_parses() {
    let d = start_daemon(&format!(
        r#"
[[guest]]
name = "p"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/p.sock"
[guest.printer]
spool = "DIR/spool"
[[guest]]
name = "{LONG_GUEST}"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/long.sock"
"#
    ));
    let (mux, _incoming) = raw_guest(&d, "p", "p.sock");
    d.wait_connected("p").await;
    let long_title = "quarterly-report-with-a-file-name-far-wider-than-any-fixed-column.pdf";
    for title in ["a", long_title] {
        let meta = vec![("title".to_owned(), title.to_owned())];
        raw_print(&mux, meta, b"%PDF-1.4\nreport\n%%EOF\n").await;
    }
    wait_jobs(&d.control, "p", "two done jobs", |j| {
        j.len() == 2 && j.iter().all(|j| j["state"] == "done")
    })
    .await;

    let args = ["jobs", "p"];
    let table = ok(&args, ctl_async(&d.control, &args).await);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.contains(long_title), "{table}");
    assert_aligned(&table, &["ID", "SIZE"]);
    let args = ["jobs", "p", "--json"];
    let jobs: serde_json::Value =
        serde_json::from_str(&ok(&args, ctl_async(&d.control, &args).await)).expect("JSON");
    assert_eq!(jobs[1]["title"], long_title);

    let table = ok(&["status"], ctl_async(&d.control, &["status"]).await);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.contains(LONG_GUEST), "{table}");
    assert_aligned(&table, &["SINCE", "IN", "OUT", "CHANS", "ERRORS"]);
    let args = ["status", "--json"];
    let all: serde_json::Value =
        serde_json::from_str(&ok(&args, ctl_async(&d.control, &args).await)).expect("JSON");
    assert_eq!(all["guests"].as_array().map(Vec::len), Some(2));
    let args = ["status", LONG_GUEST, "--json"];
    let one: serde_json::Value =
        serde_json::from_str(&ok(&args, ctl_async(&d.control, &args).await)).expect("JSON");
    assert_eq!(one["name"], LONG_GUEST);

    // vstreamd's log goes to a file here: no colour codes in it.
    let log = d.log();
    assert!(!log.is_empty() && !log.contains('\x1b'), "{log:?}");
    drop(mux);
}
