//! What vstreamctl's verbs share, its own and the devices': tables and sizes for people, and
//! output that a closed pipe ends quietly.

use std::io::{self, Write};

use serde_json::Value;

/// `println!` for a command's output: see [`out`].
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Writes a command's output to stdout. When the reader has gone (`vstreamctl events | head`),
/// the program ends quietly with status 0, as a Unix filter does, where `print!` would panic
/// with a backtrace; another failure ends it with a message and status 1. The program keeps
/// ignoring SIGPIPE, so a socket whose peer closed still fails with an error it can report.
pub fn out(args: std::fmt::Arguments<'_>) {
    let mut stdout = io::stdout().lock();
    match stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: writing to standard output: {e}");
            std::process::exit(1)
        }
    }
}

/// A byte count for people: 512B, 1.5K, 3.2M, 1.0G.
pub fn bytes(v: &Value) -> String {
    let n = v.as_u64().unwrap_or(0) as f64;
    match n {
        n if n >= 1024.0 * 1024.0 * 1024.0 => format!("{:.1}G", n / 1024.0 / 1024.0 / 1024.0),
        n if n >= 1024.0 * 1024.0 => format!("{:.1}M", n / 1024.0 / 1024.0),
        n if n >= 1024.0 => format!("{:.1}K", n / 1024.0),
        n => format!("{n}B"),
    }
}

/// How a column's cells sit in its width.
#[derive(Clone, Copy)]
pub enum Align {
    /// Cells start at the column's left edge.
    Left,
    /// Cells end at its right edge.
    Right,
}

/// `rows` (a header first, if any) as lines whose columns line up whatever the cells' widths:
/// each column as wide as its widest cell, two spaces apart, no trailing blanks. Widths are
/// terminal columns, not bytes or characters: `é` takes one, `漢` two.
pub fn table(align: &[Align], rows: &[Vec<String>]) -> String {
    let len = |cell: &String| unicode_width::UnicodeWidthStr::width(cell.as_str());
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = " ".repeat(widths[i] - len(cell));
            match align.get(i).copied().unwrap_or(Align::Left) {
                Align::Left => line.extend([cell.as_str(), &pad]),
                Align::Right => line.extend([&pad, cell.as_str()]),
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `GUEST:PATH` (scp style: a colon before any slash), or a local path.
pub fn remote_path(arg: &str) -> Option<(&str, &str)> {
    let (guest, path) = arg.split_once(':')?;
    (!guest.is_empty() && !guest.contains('/')).then_some((guest, path))
}

/// Shows a copy's progress on stderr when it is a terminal (never in a pipe or a log), at most
/// ten times a second: bytes, rate, and with a known total a bar and the time left.
pub struct Progress {
    label: String,
    tty: bool,
    start: std::time::Instant,
    last: Option<std::time::Instant>,
}

impl Progress {
    /// Progress of the copy `label`.
    pub fn new(label: String) -> Progress {
        use std::io::IsTerminal;
        Progress {
            label,
            tty: std::io::stderr().is_terminal(),
            start: std::time::Instant::now(),
            last: None,
        }
    }

    /// `done` bytes of `total` (if known) are copied; `last` ends the line.
    pub fn show(&mut self, done: u64, total: Option<u64>, last: bool) {
        if !self.tty {
            return;
        }
        let now = std::time::Instant::now();
        if !last
            && self
                .last
                .is_some_and(|t| now - t < std::time::Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(now);
        let rate = done as f64 / now.duration_since(self.start).as_secs_f64().max(1e-3);
        let size = |n: u64| bytes(&Value::from(n));
        let line = match total {
            Some(t) if t > 0 => {
                let pct = (done as f64 / t as f64 * 100.0).min(100.0);
                let width = 30;
                let fill = (pct / 100.0 * width as f64) as usize;
                let eta = (t.saturating_sub(done) as f64 / rate.max(1.0)).min(359_999.0) as u64;
                format!(
                    "{} [{}{}] {:>3.0}% {}/{} {}/s ETA {}:{:02}:{:02}",
                    self.label,
                    "#".repeat(fill),
                    " ".repeat(width - fill),
                    pct,
                    size(done),
                    size(t),
                    size(rate as u64),
                    eta / 3600,
                    eta / 60 % 60,
                    eta % 60,
                )
            }
            _ => format!("{} {} {}/s", self.label, size(done), size(rate as u64)),
        };
        eprint!("\r{line}\x1b[K");
        if last {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unicode_width::UnicodeWidthStr;

    fn rows(cells: &[&[&str]]) -> Vec<Vec<String>> {
        cells
            .iter()
            .map(|r| r.iter().map(|c| c.to_string()).collect())
            .collect()
    }

    /// Where each column's cell starts or ends on each line, in terminal columns.
    fn edges(table: &str, column: usize, align: Align) -> Vec<usize> {
        table
            .lines()
            .map(|line| {
                let cells: Vec<&str> = line.split("  ").filter(|c| !c.is_empty()).collect();
                let at = line.find(cells[column].trim()).expect("cell");
                let start = line[..at].width();
                match align {
                    Align::Left => start,
                    Align::Right => start + cells[column].trim().width(),
                }
            })
            .collect()
    }

    #[test]
    fn columns_line_up_with_wide_and_narrow_cells() {
        use Align::{Left as L, Right as R};
        let t = table(
            &[L, R, L],
            &rows(&[
                &["NAME", "SIZE", "STATE"],
                &["a", "1", "done"],
                &["a-name-far-wider-than-its-header", "123456789", "partial"],
            ]),
        );
        assert_eq!(
            t,
            "NAME                                   SIZE  STATE\n\
             a                                         1  done\n\
             a-name-far-wider-than-its-header  123456789  partial\n"
        );
        assert!(t.lines().all(|l| l == l.trim_end()));
    }

    #[test]
    fn multibyte_and_double_width_text_lines_up_on_a_terminal() {
        use Align::{Left as L, Right as R};
        let t = table(
            &[L, L, R],
            &rows(&[
                &["TITLE", "OWNER", "SIZE"],
                &["résumé.pdf", "zoë", "12"],
                &["報告書.pdf", "田中", "3456"],
                &["plain", "x", "7"],
            ]),
        );
        // Each column starts (or, right-aligned, ends) at the same terminal column on every
        // line: bytes or chars would misplace the accented and the CJK rows.
        for (column, align) in [(1, L), (2, R)] {
            let at = edges(&t, column, align);
            assert!(
                at.iter().all(|&c| c == at[0]),
                "column {column}: {at:?}\n{t}"
            );
        }
        assert_eq!(t.lines().nth(2), Some("報告書.pdf  田中   3456"), "{t}");
    }

    #[test]
    fn rows_may_be_shorter_than_the_header_and_tables_may_be_empty() {
        let t = table(&[], &rows(&[&["A", "B"], &["only-a"]]));
        assert_eq!(t, "A       B\nonly-a\n");
        assert_eq!(table(&[], &[]), "");
    }
}
