//! The service files of dist/ and what flowprobe generates for packaging,
//! checked without root (tests/live_caps.rs runs the capability set live):
//!
//! - the systemd unit passes `systemd-analyze verify` (its `ExecStart` at
//!   the binary under test, its `Documentation=` the page `flowprobe man`
//!   writes), is hardened, and grants the same capabilities in its
//!   bounding and ambient sets as the DaemonSet and docs/service.md;
//! - the DaemonSet parses as YAML (Debian's python3-yaml) and has what
//!   docs/service.md says: host network and PIDs, the capabilities and no
//!   privileged mode, probes on /health, resource requests, the mounts; it
//!   validates strictly against the Kubernetes schemas of 1.30 (the first
//!   with `appArmorProfile`) and of the latest release `kubernetes-validate`
//!   bundles (the PyPI package, which scripts/test.sh installs in a venv);
//! - bash completes commands and flags with `flowprobe completions bash`.
//!
//! A tool that is missing (systemd-analyze, python3-yaml,
//! kubernetes-validate) skips its check
//! with a message; with `CI=true` that is a failure (scripts/test.sh
//! installs both).

mod common;

use std::fs;
use std::process::Command;

use common::{repo_root, service_caps, unit_values};
use serde_json::Value;

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Whether `tool` runs (`--version`); else skips, or fails under CI.
fn have(tool: &str, check: &mut Command) -> bool {
    if check.output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    assert!(
        !ci(),
        "CI=true and {tool} is missing (scripts/test.sh installs it)"
    );
    eprintln!("skipped: {tool} is missing");
    false
}

fn unit_value(key: &str) -> String {
    let v = unit_values(key);
    assert!(!v.is_empty(), "no {key}= in the unit");
    v.join(" ")
}

#[test]
fn the_unit_verifies() {
    if !have(
        "systemd-analyze",
        Command::new("systemd-analyze").arg("--version"),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = fs::read_to_string(repo_root().join("dist/systemd/flowprobe.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/flowprobe run "), "{unit}");
    // verify checks that ExecStart's program exists and that man can find
    // each man: page of Documentation=.
    let unit = unit.replace("/usr/bin/flowprobe", env!("CARGO_BIN_EXE_flowprobe"));
    let path = dir.path().join("flowprobe.service");
    fs::write(&path, unit).unwrap();
    let man = dir.path().join("man");
    let st = Command::new(env!("CARGO_BIN_EXE_flowprobe"))
        .arg("man")
        .arg("--dir")
        .arg(man.join("man1"))
        .output()
        .unwrap();
    assert!(st.status.success());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("MANPATH", &man)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Other units of the machine may draw remarks; ours may not.
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("flowprobe")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {err}"
    );
    eprintln!("systemd-analyze verify: ok");
}

#[test]
fn the_unit_is_hardened() {
    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("DynamicUser", "yes"),
        ("RuntimeDirectory", "flowprobe"),
        ("RuntimeDirectoryPreserve", "yes"),
        ("Restart", "on-failure"),
        ("RestartSec", "5s"),
    ] {
        assert_eq!(unit_value(key), want, "{key}");
    }
    assert_eq!(
        unit_value("ExecStart"),
        "/usr/bin/flowprobe run --config /etc/flowprobe/flowprobe.toml"
    );
    assert_eq!(
        unit_values("CapabilityBoundingSet"),
        unit_values("AmbientCapabilities")
    );
}

/// The capability set, as docs/service.md lists it and every file uses it.
#[test]
fn one_capability_set_everywhere() {
    let caps = service_caps();
    assert_eq!(
        caps,
        [
            "CAP_BPF",
            "CAP_PERFMON",
            "CAP_NET_ADMIN",
            "CAP_SYS_ADMIN",
            "CAP_SYS_PTRACE",
            "CAP_DAC_READ_SEARCH"
        ]
    );
    let doc = fs::read_to_string(repo_root().join("docs/service.md")).unwrap();
    for c in &caps {
        assert!(
            doc.contains(&format!("| `{c}` |")),
            "docs/service.md: no row for {c}"
        );
    }
}

/// The DaemonSet as JSON, through python3-yaml; `None` (skipped) without it.
fn daemonset() -> Option<Value> {
    let py = "/usr/bin/python3";
    if !have("python3-yaml", Command::new(py).args(["-c", "import yaml"])) {
        return None;
    }
    let file = repo_root().join("dist/kubernetes/flowprobe-daemonset.yaml");
    let out = Command::new(py)
        .args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let ds: Vec<Value> = docs
        .into_iter()
        .filter(|d| d["kind"] == "DaemonSet")
        .collect();
    assert_eq!(ds.len(), 1, "one DaemonSet");
    Some(ds[0].clone())
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

#[test]
fn the_daemonset_has_what_the_docs_say() {
    let Some(ds) = daemonset() else { return };
    assert_eq!(ds["apiVersion"], "apps/v1");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        (&pod["hostNetwork"], &pod["hostPID"]),
        (&Value::Bool(true), &Value::Bool(true))
    );
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"],
        ds["spec"]["template"]["metadata"]["labels"]
    );
    let c = &pod["containers"][0];
    let sec = &c["securityContext"];
    assert_ne!(sec["privileged"], Value::Bool(true), "privileged");
    assert_eq!(sec["allowPrivilegeEscalation"], Value::Bool(false));
    assert_eq!(strs(&sec["capabilities"]["drop"]), ["ALL"]);
    let want: Vec<String> = service_caps()
        .iter()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    assert_eq!(strs(&sec["capabilities"]["add"]), want);

    let args = strs(&c["args"]).join(" ");
    assert!(
        args.starts_with("run ") && args.contains("--backend tc"),
        "{args}"
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], "/health", "{probe}");
        assert!(
            args.contains(&format!(
                "--listen {}:{}",
                get["host"].as_str().unwrap(),
                get["port"]
            )),
            "{probe} {get} vs {args}"
        );
    }
    for r in ["cpu", "memory"] {
        assert!(c["resources"]["requests"][r].is_string(), "requests.{r}");
    }
    assert!(
        c["resources"]["limits"]["memory"].is_string(),
        "limits.memory"
    );

    // The host's directories, each mounted where flowprobe looks.
    let volumes = pod["volumes"].as_array().unwrap();
    let mounts = c["volumeMounts"].as_array().unwrap();
    for dir in ["/sys/fs/bpf", "/sys/fs/cgroup", "/run/flowprobe"] {
        let v = volumes
            .iter()
            .find(|v| v["hostPath"]["path"] == dir)
            .unwrap_or_else(|| panic!("no hostPath volume {dir}"));
        let m = mounts
            .iter()
            .find(|m| m["name"] == v["name"])
            .unwrap_or_else(|| panic!("volume {dir} not mounted"));
        assert_eq!(m["mountPath"], dir);
    }
}

#[test]
fn the_daemonset_validates_against_the_kubernetes_schemas() {
    let tool = "kubernetes-validate";
    if !have(tool, Command::new(tool).arg("--version")) {
        return;
    }
    let file = repo_root().join("dist/kubernetes/flowprobe-daemonset.yaml");
    for version in [Some("1.30.0"), None] {
        let mut cmd = Command::new(tool);
        cmd.arg("--strict");
        if let Some(v) = version {
            cmd.args(["-k", v]);
        }
        let out = cmd.arg(&file).output().unwrap();
        let text = format!(
            "{}{}",
            common::stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains(" passed "),
            "{tool} {version:?}: {text}"
        );
        eprintln!("{}", text.trim());
    }
}

#[test]
fn bash_completes_commands_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("flowprobe.bash");
    let out = common::flowprobe(&["completions", "bash"]);
    assert!(out.status.success());
    fs::write(&script, &out.stdout).unwrap();
    let complete = |words: &[&str]| -> Vec<String> {
        let line = words.join(" ");
        let out = Command::new("bash")
            .arg("-c")
            .arg(
                "source \"$1\"; shift; COMP_WORDS=(\"$@\"); COMP_CWORD=$(($# - 1)); \
                 COMP_LINE=\"$*\"; COMP_POINT=${#COMP_LINE}; \
                 _flowprobe flowprobe \"${COMP_WORDS[-1]}\" \"${COMP_WORDS[-2]}\"; \
                 printf '%s\\n' \"${COMPREPLY[@]}\"",
            )
            .arg("bash")
            .arg(&script)
            .args(words)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        common::stdout(&out).lines().map(str::to_owned).collect()
    };
    assert_eq!(complete(&["flowprobe", "r"]), ["replay", "run"]);
    assert_eq!(complete(&["flowprobe", "run", "--back"]), ["--backend"]);
    assert_eq!(
        complete(&["flowprobe", "run", "--backend", ""]),
        ["auto", "tc", "afpacket", "xdp"]
    );
}
