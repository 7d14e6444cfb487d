//! User rules that name services: by process name, container, or port.
//!
//! A rule matches an end when every field it sets matches; the first rule
//! that matches names the service, before the process environment is
//! consulted (an operator's explicit word beats what an image baked in).

/// One rule. Unset fields match anything; a rule with no field set
/// matches every attributed end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRule {
    /// Glob on the process name (`comm`): `*` any run, `?` one character.
    pub process: Option<String>,
    /// Glob on the container id (a prefix like `4f2d9b*` is the usual use).
    pub container: Option<String>,
    /// The end's own port.
    pub port: Option<u16>,
    /// The service these ends belong to.
    pub service: String,
}

impl ServiceRule {
    pub fn matches(&self, process: Option<&str>, container: Option<&str>, port: u16) -> bool {
        let field = |pat: &Option<String>, v: Option<&str>| match pat {
            None => true,
            Some(p) => v.is_some_and(|v| glob(p.as_bytes(), v.as_bytes())),
        };
        field(&self.process, process)
            && field(&self.container, container)
            && self.port.is_none_or(|p| p == port)
    }
}

/// The first rule's service that matches.
pub fn service<'a>(
    rules: &'a [ServiceRule],
    process: Option<&str>,
    container: Option<&str>,
    port: u16,
) -> Option<&'a str> {
    rules
        .iter()
        .find(|r| r.matches(process, container, port))
        .map(|r| r.service.as_str())
}

/// Iterative glob with backtracking to the last `*`: linear in practice,
/// no recursion on hostile patterns.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, s, want) in [
            ("nginx", "nginx", true),
            ("nginx", "nginx2", false),
            ("ngi*", "nginx", true),
            ("*x", "nginx", true),
            ("n?inx", "nginx", true),
            ("*", "", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("", "", true),
            ("", "a", false),
        ] {
            assert_eq!(glob(p.as_bytes(), s.as_bytes()), want, "{p} ~ {s}");
        }
    }

    #[test]
    fn first_matching_rule_wins_and_fields_combine() {
        let rules = vec![
            ServiceRule {
                process: Some("python*".into()),
                port: Some(8080),
                service: "api".into(),
                ..ServiceRule::default()
            },
            ServiceRule {
                container: Some("4f2d*".into()),
                service: "db".into(),
                ..ServiceRule::default()
            },
            ServiceRule {
                port: Some(53),
                service: "dns".into(),
                ..ServiceRule::default()
            },
        ];
        assert_eq!(service(&rules, Some("python3"), None, 8080), Some("api"));
        assert_eq!(service(&rules, Some("python3"), None, 8081), None);
        assert_eq!(
            service(&rules, Some("python3"), Some("4f2d00"), 8080),
            Some("api")
        );
        assert_eq!(
            service(&rules, Some("pg"), Some("4f2d00"), 5432),
            Some("db")
        );
        // A container rule does not match an end without a container.
        assert_eq!(service(&rules, Some("pg"), None, 5432), None);
        assert_eq!(service(&rules, None, None, 53), Some("dns"));
    }
}
