//! What a new viewer sees before the live output: the last lines of the capture log (which
//! outlives vstreamd, so a viewer opened after a restart still sees the earlier run's output),
//! read with one bounded seek from the end, never the whole file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The most history a viewer gets, whatever it asks for: 4 times the in-memory tail, the
/// size of the consoles elsewhere replay (a cloud serial console's 1 MB, a 1 MiB ring).
pub(super) const HISTORY_BYTES: u64 = 1024 * 1024;

/// The last `lines` lines of `buf`; a trailing partial line counts as one.
pub(super) fn last_lines(buf: &[u8], lines: usize) -> &[u8] {
    if lines == 0 {
        return &[];
    }
    let mut seen = 0;
    for (i, c) in buf.iter().enumerate().rev() {
        if *c == b'\n' && i + 1 != buf.len() {
            seen += 1;
            if seen == lines {
                return &buf[i + 1..];
            }
        }
    }
    buf
}

/// The last `lines` lines of a stream stored in `parts` (oldest first: a rotated log file, then
/// the current one), each `(file, end)` read up to `end`, from at most the stream's last `max`
/// bytes.
///
/// `end` is where the caller's view of a file stops (its length when the viewer subscribed to
/// the live output), so that history and live output neither overlap nor leave a gap; a file
/// may have grown since, been renamed by a rotation (the open file is still the one read) or
/// truncated (what is left of the window is read). When the window starts inside a line, that
/// partial line is dropped; inside a line longer than the window, the cut moves to the next
/// UTF-8 character. Other bytes pass untouched (a console is a byte stream).
pub(super) fn read_tail(parts: &[(&File, u64)], lines: usize, max: u64) -> io::Result<Vec<u8>> {
    let total: u64 = parts.iter().map(|(_, end)| end).sum();
    let start = total.saturating_sub(max);
    let mut buf = Vec::new();
    let mut offset = 0;
    for (file, end) in parts {
        let from = start.max(offset);
        if from < offset + end {
            read_range(file, from - offset, offset + end - from, &mut buf)?;
        }
        offset += end;
    }
    let mut out = last_lines(&buf, lines);
    if start > 0 && out.len() == buf.len() {
        out = match out.iter().position(|b| *b == b'\n') {
            Some(i) if i + 1 < out.len() => &out[i + 1..],
            _ => {
                let continuation = out.iter().take(3).take_while(|b| **b & 0xC0 == 0x80);
                &out[continuation.count()..]
            }
        };
    }
    Ok(out.to_vec())
}

/// Appends `len` bytes of `file` from `at` to `buf`, fewer if the file is shorter now.
fn read_range(file: &File, at: u64, len: u64, buf: &mut Vec<u8>) -> io::Result<()> {
    let old = buf.len();
    // `len` is at most the caller's `max`.
    buf.resize(old + usize::try_from(len).map_err(io::Error::other)?, 0);
    let mut got = old;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], at + (got - old) as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::{self, OpenOptions};
    use std::time::Instant;

    use super::*;

    fn file_with(path: &std::path::Path, data: &[u8]) -> (File, u64) {
        fs::write(path, data).expect("write");
        let f = File::open(path).expect("open");
        let len = f.metadata().expect("meta").len();
        (f, len)
    }

    #[test]
    fn last_lines_counts_a_trailing_partial_line() {
        assert_eq!(last_lines(b"a\nb\nc", 1), b"c");
        assert_eq!(last_lines(b"a\nb\nc\n", 1), b"c\n");
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc\n", 9), b"a\nb\nc\n");
        assert_eq!(last_lines(b"a\nb\n", 0), b"");
    }

    #[test]
    fn a_huge_log_is_read_from_its_end_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hvc0.log");
        let f = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        // 64 GiB, sparse: reading it whole would not fit in memory, nor in the test's time.
        let size = 64 << 30;
        f.set_len(size).expect("sparse");
        f.write_all_at(b"\nboot line 1\nboot line 2\nlogin: ", size)
            .expect("append");
        let end = f.metadata().expect("meta").len();
        let started = Instant::now();
        let tail = read_tail(&[(&f, end)], 2, HISTORY_BYTES).expect("read");
        assert_eq!(tail, b"boot line 2\nlogin: ");
        // Asked for more lines than the window holds: the window, no more, from a line start
        let tail = read_tail(&[(&f, end)], 1_000_000, HISTORY_BYTES).expect("read");
        // (the megabyte of NULs before is one partial line, dropped).
        assert_eq!(tail, b"boot line 1\nboot line 2\nlogin: ");
        assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
    }

    #[test]
    fn the_cut_drops_a_partial_first_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (f, end) = file_with(&dir.path().join("l"), b"0123456789\nabc\ndef\n");
        // The window starts inside "0123456789": that line is not shown half.
        assert_eq!(
            read_tail(&[(&f, end)], 10, 12).expect("read"),
            b"abc\ndef\n"
        );
        // Only up to `end`, as the viewer's cut says, though the file goes on.
        assert_eq!(
            read_tail(&[(&f, 15)], 10, 100).expect("read"),
            b"0123456789\nabc\n"
        );
    }

    #[test]
    fn a_log_without_newlines_is_cut_at_a_character() {
        let dir = tempfile::tempdir().expect("tempdir");
        let line = "é".repeat(3 << 20);
        let (f, end) = file_with(&dir.path().join("l"), line.as_bytes());
        // An odd window starts inside a two-byte character; the cut moves past it.
        let tail = read_tail(&[(&f, end)], 5, HISTORY_BYTES + 1).expect("read");
        assert_eq!(tail.len() as u64, HISTORY_BYTES);
        assert!(std::str::from_utf8(&tail).is_ok());
        assert_eq!(read_tail(&[(&f, end)], 5, 3).expect("read"), "é".as_bytes());
    }

    #[test]
    fn invalid_utf8_passes_through_and_bounds_the_character_skip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = [b"x\n".as_slice(), &[0xFF, 0xFE, b'\n'], &[0x80; 8]].concat();
        let (f, end) = file_with(&dir.path().join("l"), &data);
        assert_eq!(read_tail(&[(&f, end)], 2, 100).expect("read"), &data[2..]);
        // Nothing but continuation bytes in the window: at most 3 are skipped, no loop.
        assert_eq!(read_tail(&[(&f, end)], 1, 6).expect("read"), [0x80; 3]);
    }

    #[test]
    fn a_rotated_file_and_the_current_one_read_as_one_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (old, old_end) = file_with(&dir.path().join("l.1"), b"one\ntwo\nthr");
        let (new, new_end) = file_with(&dir.path().join("l"), b"ee\nfour\n");
        let parts = [(&old, old_end), (&new, new_end)];
        // The rotation cut a line in two: it reads whole.
        assert_eq!(read_tail(&parts, 2, 100).expect("read"), b"three\nfour\n");
        // The window reaches back into the rotated file only as far as `max`.
        assert_eq!(read_tail(&parts, 9, 12).expect("read"), b"three\nfour\n");
        assert_eq!(
            read_tail(&parts, 9, 100).expect("read"),
            b"one\ntwo\nthree\nfour\n"
        );
    }

    #[test]
    fn a_rotated_or_truncated_log_gives_what_the_open_file_has() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hvc0.log");
        let (f, end) = file_with(&path, b"one\ntwo\nthree\n");
        // Rotated after the cut: the open file is the renamed one, read as it was.
        fs::rename(&path, dir.path().join("hvc0.log.1")).expect("rotate");
        fs::write(&path, b"new\n").expect("new log");
        assert_eq!(
            read_tail(&[(&f, end)], 2, 100).expect("read"),
            b"two\nthree\n"
        );
        // Truncated after the cut (a log kept without rotated files): what is left.
        let w = OpenOptions::new()
            .write(true)
            .open(dir.path().join("hvc0.log.1"))
            .expect("open");
        w.set_len(8).expect("truncate");
        assert_eq!(
            read_tail(&[(&f, end)], 2, 100).expect("read"),
            b"one\ntwo\n"
        );
        w.set_len(0).expect("truncate");
        assert_eq!(read_tail(&[(&f, end)], 2, 100).expect("read"), b"");
    }
}
