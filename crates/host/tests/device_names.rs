//! vstreamd, vstreamctl and vstream-agent name no device: every device is reached through the
//! registry in crates/devices (docs/ARCHITECTURE.md), so adding one touches its folder and one
//! registration line only.

use std::path::Path;

/// The device names that must not appear in the programs' own code.
const DEVICES: [&str; 10] = [
    "printer", "random", "watchdog", "ppp", "hid", "qga", "tty", "console", "fastnet", "files",
];

/// The sources that must name no device (paths from the workspace root; a folder: every file
/// in it).
const SOURCES: [&str; 7] = [
    "crates/host/src/daemon",
    "crates/host/src/metrics.rs",
    "crates/host/src/bin/vstreamd.rs",
    "crates/host/src/bin/vstreamctl/main.rs",
    "crates/host/src/bin/vstreamctl/status.rs",
    "crates/agent/src/bin/vstream-agent.rs",
    "crates/agent/src/lib.rs",
];

/// `text` without its `//` comments (doc comments included). A `//` inside a string literal
/// cuts the rest of that line too, which can only hide a name, never invent one: the sources
/// checked here have none before a device name on the same line (the test below checks the
/// whole line when it has no comment).
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let code = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// The whole-word, case-insensitive occurrences of `word` in `text`, as line numbers.
fn whole_words(text: &str, word: &str) -> Vec<usize> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let lower = line.to_ascii_lowercase();
        let mut from = 0;
        while let Some(i) = lower[from..].find(word) {
            let (start, end) = (from + i, from + i + word.len());
            let before = lower[..start].chars().next_back();
            let after = lower[end..].chars().next();
            if !before.is_some_and(is_word) && !after.is_some_and(is_word) {
                lines.push(n + 1);
                break;
            }
            from = end;
        }
    }
    lines
}

#[test]
fn the_daemon_the_command_line_and_the_agent_name_no_device() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut found = Vec::new();
    let files = SOURCES.iter().flat_map(|source| {
        let path = root.join(source);
        match std::fs::read_dir(&path) {
            Ok(dir) => dir
                .map(|e| e.expect(source).path())
                .filter(|p| p.extension().is_some_and(|x| x == "rs"))
                .collect(),
            Err(_) => vec![path],
        }
    });
    let mut checked = 0;
    for path in files {
        let text = std::fs::read_to_string(&path).expect("a source to check");
        let source = path.strip_prefix(&root).unwrap_or(&path).display();
        let code = code(&text);
        checked += 1;
        for word in DEVICES {
            for line in whole_words(&code, word) {
                found.push(format!("{source}:{line}: {word}"));
            }
        }
    }
    // The daemon's folder holds several files: a moved path must not empty the check.
    assert!(checked > SOURCES.len(), "only {checked} files checked");
    assert!(
        found.is_empty(),
        "device names outside crates/devices:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_finds_names_and_skips_comments() {
    let text =
        "let a = tty::CLASS; // the qga\n/// printer docs\nlet b = \"url://x\"; hid\nmytty ttys\n";
    let code = code(text);
    assert_eq!(whole_words(&code, "tty"), vec![1]);
    assert!(whole_words(&code, "qga").is_empty());
    assert!(whole_words(&code, "printer").is_empty());
    assert_eq!(whole_words(&code, "hid"), vec![3]);
}
