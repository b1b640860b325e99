//! What vstreamctl's verbs share, its own and the devices': tables and sizes for people.

use serde_json::Value;

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
/// each column as wide as its widest cell, two spaces apart, no trailing blanks.
pub fn table(align: &[Align], rows: &[Vec<String>]) -> String {
    let len = |cell: &String| cell.chars().count();
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
