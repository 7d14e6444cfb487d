//! Numbers for people: the page's cells and the map's labels. Formatting
//! only: every value comes from the query row as `/query` serialises it.

/// Bytes with SI prefixes, three significant digits: `950 B`, `1.23 kB`.
pub fn bytes(v: f64) -> String {
    scaled(v, "B")
}

/// Bytes per second, like [`bytes`]; `—` when there is no rate (a row
/// over an empty span).
pub fn rate(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_owned(), |v| scaled(v, "B/s"))
}

fn scaled(v: f64, unit: &str) -> String {
    const PREFIX: [&str; 7] = ["", "k", "M", "G", "T", "P", "E"];
    let mut x = v;
    let mut i = 0;
    while x >= 999.5 && i + 1 < PREFIX.len() {
        x /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{x:.0} {unit}")
    } else {
        format!("{} {}{unit}", three(x), PREFIX[i])
    }
}

/// Three significant digits of a value in [1, 1000).
fn three(x: f64) -> String {
    if x < 9.995 {
        format!("{x:.2}")
    } else if x < 99.95 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

/// Microseconds as µs, ms or s; `—` without a sample.
pub fn micros(v: Option<u64>) -> String {
    match v {
        None => "—".to_owned(),
        Some(us) if us < 1000 => format!("{us} µs"),
        Some(us) if us < 1_000_000 => format!("{} ms", three(us as f64 / 1e3)),
        Some(us) => format!("{} s", three(us as f64 / 1e6)),
    }
}

/// A percentage with two decimals; `—` when undefined.
pub fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_owned(), |p| format!("{p:.2} %"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(999.0), "999 B");
        assert_eq!(bytes(1000.0), "1.00 kB");
        assert_eq!(bytes(211_584.0), "212 kB");
        assert_eq!(bytes(5_170_711.78), "5.17 MB");
        assert_eq!(rate(Some(12_345.0)), "12.3 kB/s");
        assert_eq!(rate(None), "—");
        assert_eq!(micros(Some(38)), "38 µs");
        assert_eq!(micros(Some(1685)), "1.69 ms");
        assert_eq!(micros(Some(2_500_000)), "2.50 s");
        assert_eq!(percent(Some(3.7037)), "3.70 %");
    }
}
