//! `e` in `top`: the rows on the screen to a file, as JSON lines (each
//! row's object exactly as `/query` gave it) or CSV (`.csv`, the agent's
//! `/query.csv` columns, [`crate::export::csv`]).

use std::io::Write;
use std::path::Path;

use super::model::Answer;

/// The text of the file: `rows` (indexes into `a.rows`, in screen order).
pub fn render(a: &Answer, rows: &[usize], csv: bool) -> String {
    if csv {
        return crate::export::csv::rows(&a.src_keys, &a.dst_keys, rows.iter().map(|&i| &a.raw[i]));
    }
    let mut out = String::new();
    for &i in rows {
        out.push_str(&a.raw[i].to_string());
        out.push('\n');
    }
    out
}

/// Writes the rows to `path`; CSV when it ends in `.csv`.
pub fn write(path: &Path, a: &Answer, rows: &[usize]) -> std::io::Result<()> {
    let csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let mut f = std::fs::File::create(path)?;
    f.write_all(render(a, rows, csv).as_bytes())?;
    f.sync_all()
}
