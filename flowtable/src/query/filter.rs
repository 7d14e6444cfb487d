//! `--where` expressions: a small hand-written tokenizer and parser.
//!
//! ```text
//! expr   := clause ( "and" clause )*
//! clause := field op value
//!         | field ["not"] "in" ( CIDR | "(" item ( "," item )* ")" )
//! field  := ("src" | "dst") "." KEY | "proto" | "iface"
//! op     := "=" | "!=" | "~" | "!~"
//! ```
//!
//! `=` and `!=` compare exactly; `~` and `!~` match a glob (`*` any run of
//! characters, `?` one character). For `ip`, values are parsed as addresses
//! (so `fd77:0::1` = `fd77::1`) and `in` accepts CIDR networks besides
//! addresses. A value with spaces or any of `()=,!~"` is written in double
//! quotes (`\"` and `\\` inside). A tag the end lacks compares as the empty
//! string (`src.service = ""` selects connections without one). Ports
//! compare raw: the ephemeral collapse applies to grouping only.
//!
//! Errors name the offending token and its column (1-based, in characters).

use std::fmt;
use std::net::IpAddr;

use super::tag::{value, IpNet, Side, TagKey};
use crate::conn::Connection;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("--where {expr:?}: {message} at column {column} (`{token}`)")]
pub struct FilterError {
    pub expr: String,
    pub column: usize,
    /// The token as written, or `end of expression`.
    pub token: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    /// Unquoted word: a field, keyword, or value.
    Word(String),
    /// Quoted string: always a value.
    Str(String),
    Op(Op),
    Open,
    Close,
    Comma,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Glob,
    NotGlob,
}

/// A token and the column it starts at.
#[derive(Clone, Debug)]
struct Spanned {
    tok: Tok,
    col: usize,
    text: String,
}

fn is_word_char(c: char) -> bool {
    !c.is_whitespace() && !matches!(c, '(' | ')' | '=' | ',' | '!' | '~' | '"')
}

fn tokenize(expr: &str) -> Result<Vec<Spanned>, FilterError> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        let start = i;
        let tok = match c {
            _ if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '(' => {
                i += 1;
                Tok::Open
            }
            ')' => {
                i += 1;
                Tok::Close
            }
            ',' => {
                i += 1;
                Tok::Comma
            }
            '=' => {
                i += 1;
                Tok::Op(Op::Eq)
            }
            '~' => {
                i += 1;
                Tok::Op(Op::Glob)
            }
            '!' => match chars.get(i + 1) {
                Some('=') => {
                    i += 2;
                    Tok::Op(Op::Ne)
                }
                Some('~') => {
                    i += 2;
                    Tok::Op(Op::NotGlob)
                }
                _ => {
                    return Err(err(expr, col, "!", "`!` must be followed by `=` or `~`"));
                }
            },
            '"' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => {
                            let text: String = chars[start..].iter().collect();
                            return Err(err(expr, col, &text, "unterminated quoted string"));
                        }
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some('\\') if matches!(chars.get(i + 1), Some('"' | '\\')) => {
                            s.push(chars[i + 1]);
                            i += 2;
                        }
                        Some(&c) => {
                            s.push(c);
                            i += 1;
                        }
                    }
                }
                Tok::Str(s)
            }
            _ => {
                while i < chars.len() && is_word_char(chars[i]) {
                    i += 1;
                }
                Tok::Word(chars[start..i].iter().collect())
            }
        };
        out.push(Spanned {
            tok,
            col,
            text: chars[start..i].iter().collect(),
        });
    }
    Ok(out)
}

fn err(expr: &str, column: usize, token: &str, message: impl Into<String>) -> FilterError {
    FilterError {
        expr: expr.to_owned(),
        column,
        token: token.to_owned(),
        message: message.into(),
    }
}

/// What a field refers to: a tag of one end.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Field {
    side: Side,
    key: TagKey,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Item {
    Exact(String),
    Addr(IpAddr),
    Net(IpNet),
}

impl Item {
    fn matches(&self, v: &str) -> bool {
        match self {
            Item::Exact(s) => s == v,
            Item::Addr(a) => v.parse::<IpAddr>().is_ok_and(|b| b == *a),
            Item::Net(n) => v.parse::<IpAddr>().is_ok_and(|b| n.contains(b)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Test {
    Is(Item),
    Glob(String),
    In(Vec<Item>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Clause {
    field: Field,
    test: Test,
    negate: bool,
}

impl Clause {
    fn matches(&self, c: &Connection) -> bool {
        let v = value(c, self.field.side, &self.field.key, false).unwrap_or_default();
        let hit = match &self.test {
            Test::Is(item) => item.matches(&v),
            Test::Glob(p) => glob(p, &v),
            Test::In(items) => items.iter().any(|i| i.matches(&v)),
        };
        hit != self.negate
    }
}

/// Clauses that must all hold. The empty filter selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    clauses: Vec<Clause>,
}

impl Filter {
    /// Parses one `--where` expression.
    pub fn parse(expr: &str) -> Result<Filter, FilterError> {
        Parser {
            expr,
            toks: tokenize(expr)?,
            pos: 0,
        }
        .expr()
    }

    /// Several expressions, all of which must hold (repeated `--where`).
    pub fn parse_all<S: AsRef<str>>(exprs: &[S]) -> Result<Filter, FilterError> {
        let mut f = Filter::default();
        for e in exprs {
            f.clauses.extend(Filter::parse(e.as_ref())?.clauses);
        }
        Ok(f)
    }

    pub fn matches(&self, c: &Connection) -> bool {
        self.clauses.iter().all(|cl| cl.matches(c))
    }

    pub fn is_empty(&self) -> bool {
        self.clauses.is_empty()
    }
}

struct Parser<'a> {
    expr: &'a str,
    toks: Vec<Spanned>,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Spanned> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Spanned> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    /// An error at the current token (or at the end).
    fn fail(&self, message: impl Into<String>) -> FilterError {
        match self.toks.get(self.pos) {
            Some(t) => err(self.expr, t.col, &t.text, message),
            None => err(
                self.expr,
                self.expr.chars().count() + 1,
                "end of expression",
                message,
            ),
        }
    }

    fn fail_at(&self, t: &Spanned, message: impl Into<String>) -> FilterError {
        err(self.expr, t.col, &t.text, message)
    }

    fn keyword(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Spanned { tok: Tok::Word(w), .. }) if w.eq_ignore_ascii_case(kw))
    }

    fn expr(&mut self) -> Result<Filter, FilterError> {
        let mut clauses = vec![self.clause()?];
        while self.pos < self.toks.len() {
            if !self.keyword("and") {
                return Err(self.fail("expected `and` between conditions"));
            }
            self.pos += 1;
            clauses.push(self.clause()?);
        }
        Ok(Filter { clauses })
    }

    fn field(&mut self) -> Result<Field, FilterError> {
        let Some(t) = self.next() else {
            self.pos -= 1;
            return Err(self.fail("expected a field such as src.ip or dst.port"));
        };
        let Tok::Word(w) = &t.tok else {
            return Err(self.fail_at(&t, "expected a field such as src.ip or dst.port"));
        };
        let (side, key) = match w.split_once('.') {
            Some(("src", k)) => (Side::Src, k),
            Some(("dst", k)) => (Side::Dst, k),
            // Both ends share them, so the side may be left out.
            None if w == "proto" || w == "iface" => (Side::Src, w.as_str()),
            _ => return Err(self.fail_at(&t, "a field is src.KEY or dst.KEY (or proto, iface)")),
        };
        let key: TagKey = key.parse().map_err(|e| self.fail_at(&t, format!("{e}")))?;
        Ok(Field { side, key })
    }

    fn clause(&mut self) -> Result<Clause, FilterError> {
        let field = self.field()?;
        let negate_in = self.keyword("not");
        if negate_in {
            self.pos += 1;
            if !self.keyword("in") {
                return Err(self.fail("expected `in` after `not`"));
            }
        }
        if self.keyword("in") {
            self.pos += 1;
            let items = if matches!(self.peek(), Some(Spanned { tok: Tok::Open, .. })) {
                self.pos += 1;
                let mut items = vec![self.item(&field, true)?];
                loop {
                    match self.next() {
                        Some(Spanned {
                            tok: Tok::Comma, ..
                        }) => items.push(self.item(&field, true)?),
                        Some(Spanned {
                            tok: Tok::Close, ..
                        }) => break,
                        _ => {
                            self.pos -= 1;
                            return Err(self.fail("expected `,` or `)` in the list"));
                        }
                    }
                }
                items
            } else {
                if field.key != TagKey::Ip {
                    return Err(self.fail(format!(
                        "`in` takes a parenthesised list (a bare network is only for ip, not {})",
                        field.key
                    )));
                }
                let t = self.peek().cloned();
                match self.item(&field, true)? {
                    net @ Item::Net(_) => vec![net],
                    _ => {
                        let t = t.expect("item() consumed a token");
                        return Err(self.fail_at(&t, "expected a network such as 10.0.0.0/8"));
                    }
                }
            };
            return Ok(Clause {
                field,
                test: Test::In(items),
                negate: negate_in,
            });
        }
        let op = match self.next() {
            Some(Spanned {
                tok: Tok::Op(op), ..
            }) => op,
            _ => {
                self.pos -= 1;
                return Err(self.fail("expected an operator: =, !=, ~, !~, in or not in"));
            }
        };
        let (test, negate) = match op {
            Op::Eq | Op::Ne => (Test::Is(self.item(&field, false)?), op == Op::Ne),
            Op::Glob | Op::NotGlob => (Test::Glob(self.text()?), op == Op::NotGlob),
        };
        Ok(Clause {
            field,
            test,
            negate,
        })
    }

    /// A value token as text; an unquoted keyword is still a value here.
    fn text(&mut self) -> Result<String, FilterError> {
        match self.next() {
            Some(Spanned {
                tok: Tok::Word(s) | Tok::Str(s),
                ..
            }) => Ok(s),
            _ => {
                self.pos -= 1;
                Err(self.fail("expected a value"))
            }
        }
    }

    fn item(&mut self, field: &Field, allow_net: bool) -> Result<Item, FilterError> {
        let at = self.pos;
        let s = self.text()?;
        if field.key != TagKey::Ip {
            return Ok(Item::Exact(s));
        }
        // An ip field holds addresses: compare them as addresses, so that
        // every spelling of one matches, and tell a typo early.
        if let Ok(a) = s.parse::<IpAddr>() {
            return Ok(Item::Addr(a));
        }
        if allow_net {
            if let Ok(n) = s.parse::<IpNet>() {
                return Ok(Item::Net(n));
            }
        }
        if s.is_empty() {
            return Ok(Item::Exact(s));
        }
        let t = self.toks[at].clone();
        Err(self.fail_at(
            &t,
            if allow_net {
                "expected an IP address or a network such as 10.0.0.0/8 (with its host bits zero)"
            } else {
                "expected an IP address (use `in` for a network)"
            },
        ))
    }
}

/// Glob match: `*` any run of characters (also none), `?` exactly one.
pub fn glob(pattern: &str, s: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = s.chars().collect();
    // Classic greedy match with one backtrack point: linear in practice,
    // never exponential.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.side.name(), self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DirStats;
    use std::collections::BTreeMap;

    fn conn(src: &str, sport: u16, dst: &str, dport: u16) -> Connection {
        Connection {
            proto: crate::Proto::Tcp,
            src: src.parse().unwrap(),
            sport,
            dst: dst.parse().unwrap(),
            dport,
            iface: 2,
            first_seen: 0,
            last_seen: 0,
            sent: DirStats::default(),
            received: DirStats::default(),
            rtt: Default::default(),
            src_tags: BTreeMap::from([("service".to_owned(), "web frontend".to_owned())]).into(),
            dst_tags: Default::default(),
        }
    }

    /// `(expression, whether it selects the sample connection)`.
    #[test]
    fn good_expressions() {
        let c = conn("10.1.2.3", 40000, "fd77::2", 5001);
        let cases = [
            ("src.ip = 10.1.2.3", true),
            ("src.ip != 10.1.2.3", false),
            ("dst.ip = fd77:0:0::2", true),
            ("src.ip in 10.0.0.0/8", true),
            ("src.ip in 10.1.3.0/24", false),
            ("src.ip not in 10.1.3.0/24", true),
            ("dst.ip in fd77::/16", true),
            ("dst.ip in (10.0.0.0/8, fd77::2)", true),
            ("src.ip/16 = 10.1.0.0/16", true),
            ("dst.port = 5001", true),
            ("dst.port in (80, 443)", false),
            ("dst.port not in (80,443)", true),
            ("src.port = 40000", true), // raw, not `ephemeral`
            ("proto = tcp and iface = 2", true),
            ("src.proto = udp", false),
            ("src.service ~ web*", true),
            ("src.service = \"web frontend\"", true),
            ("src.service !~ \"*front*\"", false),
            ("dst.service = \"\"", true), // missing tag
            ("dst.service != \"\"", false),
            ("dst.port ~ 50?1 AND src.ip in 10.0.0.0/8", true),
            ("dst.port ~ 50?1 and src.ip in 11.0.0.0/8", false),
        ];
        for (e, want) in cases {
            let f = Filter::parse(e).unwrap_or_else(|x| panic!("{e}: {x}"));
            assert_eq!(f.matches(&c), want, "{e}");
        }
        let all = Filter::parse_all(&["proto = tcp", "dst.port = 80"]).unwrap();
        assert!(!all.matches(&c));
        assert!(Filter::default().matches(&c));
    }

    #[test]
    fn bad_expressions_name_the_token() {
        let cases = [
            ("", "end of expression", 1, "expected a field"),
            ("src.ip", "end of expression", 7, "expected an operator"),
            ("src.ip == 1.2.3.4", "=", 9, "expected a value"),
            ("src.ip = 1.2.3", "1.2.3", 10, "expected an IP address"),
            ("src.ip in 10.1.0.0/8", "10.1.0.0/8", 11, "host bits zero"),
            (
                "src.ip = 10.0.0.0/8",
                "10.0.0.0/8",
                10,
                "use `in` for a network",
            ),
            ("dst.port in 80", "80", 13, "parenthesised list"),
            ("host = a", "host", 1, "src.KEY or dst.KEY"),
            ("src.ip/200 = x", "src.ip/200", 1, "prefix length"),
            (
                "dst.port = 80 or dst.port = 443",
                "or",
                15,
                "expected `and`",
            ),
            ("dst.port in (80 443)", "443", 17, "expected `,` or `)`"),
            (
                "dst.port in (80,",
                "end of expression",
                17,
                "expected a value",
            ),
            ("dst.port ! 80", "!", 10, "`!` must be followed"),
            ("src.service = \"abc", "\"abc", 15, "unterminated"),
            (
                "src.ip not 1.2.3.4",
                "1.2.3.4",
                12,
                "expected `in` after `not`",
            ),
        ];
        for (e, token, column, msg) in cases {
            let x = Filter::parse(e).expect_err(e);
            assert_eq!((x.token.as_str(), x.column), (token, column), "{e}: {x}");
            assert!(x.message.contains(msg), "{e}: {x}");
        }
        assert_eq!(
            Filter::parse("dst.port = 80 or x").unwrap_err().to_string(),
            "--where \"dst.port = 80 or x\": expected `and` between conditions at column 15 (`or`)"
        );
    }

    /// Every sequence of up to four pieces parses or fails with an error
    /// that points into the expression; none panics.
    #[test]
    fn never_panics_on_token_soup() {
        let pieces = [
            "src.ip",
            "dst.port",
            "proto",
            "=",
            "!=",
            "~",
            "!",
            "in",
            "not",
            "(",
            ")",
            ",",
            "and",
            "10.0.0.0/8",
            "\"x",
            "80",
            " ",
            "é",
        ];
        let c = conn("10.1.2.3", 40000, "fd77::2", 5001);
        let mut stack = vec![String::new()];
        let mut n = 0;
        while let Some(e) = stack.pop() {
            match Filter::parse(&e) {
                Ok(f) => {
                    f.matches(&c);
                }
                Err(x) => assert!(
                    x.column >= 1 && x.column <= e.chars().count() + 1,
                    "{e:?}: {x}"
                ),
            }
            n += 1;
            if e.matches(' ').count() < 4 {
                for p in pieces {
                    stack.push(format!("{e} {p}"));
                }
            }
        }
        assert!(n > 50_000, "{n}");
    }

    #[test]
    fn globs() {
        for (p, s, want) in [
            ("*", "", true),
            ("a*", "abc", true),
            ("*c", "abc", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*b*b*", "abab", true),
            ("*b*b*", "ab", false),
            ("a*b*c", "aXbYbZc", true),
            ("", "a", false),
        ] {
            assert_eq!(glob(p, s), want, "{p} {s}");
        }
    }
}
