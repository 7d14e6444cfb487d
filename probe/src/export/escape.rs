//! Tag values come from the host (process names, command lines,
//! environment variables): anyone who can start a process chooses them. So
//! every value is text wherever it goes: escaped for HTML, for XML (the
//! map) and for CSV, and its control characters are shown, never sent.

use std::fmt::Write;

/// A control character (C0, DEL, C1) or a code point XML 1.0 forbids,
/// written as `\xNN` (`\u{FFFE}` beyond a byte): a terminal escape shows as
/// text, and the XML stays well-formed (XML 1.0 has no way to write NUL or
/// ESC, not even as a character reference).
fn visible(c: char, out: &mut String) -> bool {
    let n = c as u32;
    if n < 0x20 || (0x7f..=0x9f).contains(&n) {
        let _ = write!(out, "\\x{n:02x}");
        true
    } else if c == '\u{fffe}' || c == '\u{ffff}' {
        let _ = write!(out, "\\u{{{n:x}}}");
        true
    } else {
        false
    }
}

/// Text for HTML element content and double-quoted attribute values.
pub fn html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if visible(c, &mut out) => {}
            c => out.push(c),
        }
    }
    out
}

/// Text for XML content and attributes: the same rules as [`html`] (the
/// five entities are XML's own), so one function serves both.
pub fn xml(s: &str) -> String {
    html(s)
}

/// One CSV field (RFC 4180): quoted when it holds a comma, a quote or a
/// line break; a value a spreadsheet would run as a formula (starting with
/// `=`, `+`, `-`, `@`, tab or carriage return) gets a leading `'`; control
/// characters are shown as `\xNN` (so also never start a field).
pub fn csv(s: &str) -> String {
    let mut v = String::with_capacity(s.len() + 2);
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        v.push('\'');
    }
    for c in s.chars() {
        if !visible(c, &mut v) {
            v.push(c);
        }
    }
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v
    }
}

/// A value for a `--where` filter: always double-quoted, `\` and `"`
/// escaped (filter.rs's rule), so any value is one token.
pub fn filter_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_values_are_text() {
        assert_eq!(
            html("<script>alert(1)</script>"),
            "&lt;script&gt;alert(1)&lt;/script&gt;"
        );
        assert_eq!(
            html("\"><img src=x onerror=alert(1)>"),
            "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"
        );
        assert_eq!(html("a'b&c"), "a&#39;b&amp;c");
        assert_eq!(xml("]]>\0\x1b[31mred"), "]]&gt;\\x00\\x1b[31mred");
        assert_eq!(xml("\u{9b}\u{7f}\u{fffe}é"), "\\x9b\\x7f\\u{fffe}é");
        assert_eq!(html("tab\there\nnl"), "tab\\x09here\\x0anl");
    }

    #[test]
    fn csv_fields() {
        assert_eq!(csv("web"), "web");
        assert_eq!(csv("a,b"), "\"a,b\"");
        assert_eq!(csv("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv("+1"), "'+1");
        assert_eq!(csv("-1"), "'-1");
        assert_eq!(csv("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv("\tcmd"), "'\\x09cmd");
        assert_eq!(csv("a\nb\x1b"), "a\\x0ab\\x1b");
    }

    #[test]
    fn filter_values_are_one_token() {
        assert_eq!(filter_value("web"), "\"web\"");
        assert_eq!(filter_value("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
