//! The tags of one process: what every socket it owns says about its end.

use std::collections::BTreeMap;

use super::cgroup;
use super::host::ProcessInfo;

/// Environment variables that name a process's service, in order of
/// precedence (OpenTelemetry's, then Datadog's).
pub const SERVICE_ENV: [&str; 2] = ["OTEL_SERVICE_NAME", "DD_SERVICE"];

/// Long command lines are cut here: a tag is for grouping and reading, and
/// some launchers put whole configurations on the command line.
const CMDLINE_MAX: usize = 256;

/// A process, reduced to its tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub tags: BTreeMap<String, String>,
    /// `comm`, and the container id, for the service rules.
    pub process: String,
    pub container: Option<String>,
    /// From [`SERVICE_ENV`]; user rules come first.
    pub env_service: Option<String>,
}

impl Owner {
    pub fn new(p: &ProcessInfo, user: Option<String>, host: Option<&str>) -> Owner {
        let mut tags = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            tags.insert(k.to_owned(), v);
        };
        put("pid", p.pid.to_string());
        put("process", p.comm.clone());
        if !p.cmdline.is_empty() {
            put("cmdline", cut(&p.cmdline.join(" "), CMDLINE_MAX));
        }
        if let Some(exe) = &p.exe {
            put("exe", exe.clone());
        }
        put("uid", p.uid.to_string());
        if let Some(u) = user {
            put("user", u);
        }
        if let Some(h) = host {
            put("host", h.to_owned());
        }
        let cg = cgroup::parse(&p.cgroup);
        if let Some(c) = &cg.container {
            put("container", c.clone());
        }
        if let Some(r) = cg.runtime {
            put("runtime", r.to_owned());
        }
        if let Some(pod) = cg.pod {
            put("pod", pod);
        }
        if let Some(q) = cg.qos {
            put("qos", q.to_owned());
        }
        let env_service = SERVICE_ENV.iter().find_map(|name| {
            p.env
                .iter()
                .find(|(k, v)| k == name && !v.is_empty())
                .map(|(_, v)| v.clone())
        });
        Owner {
            tags,
            process: p.comm.clone(),
            container: cg.container,
            env_service,
        }
    }
}

/// At most `max` bytes, cut at a character boundary.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_of_a_container_process() {
        let id = "ab".repeat(32);
        let p = ProcessInfo {
            pid: 42,
            comm: "web-front".into(),
            cmdline: vec!["/usr/bin/python3".into(), "front.py".into()],
            exe: Some("/usr/bin/python3.13".into()),
            uid: 1000,
            cgroup: format!("0::/system.slice/docker-{id}.scope\n"),
            env: vec![
                ("DD_SERVICE".into(), "dd-name".into()),
                ("OTEL_SERVICE_NAME".into(), "frontend".into()),
            ],
        };
        let o = Owner::new(&p, Some("alice".into()), Some("node1"));
        let want: BTreeMap<String, String> = [
            ("pid", "42"),
            ("process", "web-front"),
            ("cmdline", "/usr/bin/python3 front.py"),
            ("exe", "/usr/bin/python3.13"),
            ("uid", "1000"),
            ("user", "alice"),
            ("host", "node1"),
            ("container", id.as_str()),
            ("runtime", "docker"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(o.tags, want);
        // OpenTelemetry's name wins over Datadog's.
        assert_eq!(o.env_service.as_deref(), Some("frontend"));
    }

    #[test]
    fn empty_service_variable_is_ignored_and_cmdline_is_cut() {
        let p = ProcessInfo {
            pid: 1,
            comm: "x".into(),
            cmdline: vec!["é".repeat(200)],
            env: vec![
                ("OTEL_SERVICE_NAME".into(), String::new()),
                ("DD_SERVICE".into(), "dd".into()),
            ],
            ..ProcessInfo::default()
        };
        let o = Owner::new(&p, None, None);
        assert_eq!(o.env_service.as_deref(), Some("dd"));
        assert!(o.tags["cmdline"].len() <= CMDLINE_MAX);
        assert!(!o.tags.contains_key("user"));
    }
}
