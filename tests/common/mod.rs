//! Helpers shared by the end-to-end tests.
#![allow(dead_code)] // each test binary uses its own subset

pub mod churn;
pub mod encap;
pub mod root;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs the flowprobe binary built for this test run.
pub fn flowprobe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowprobe"))
        .args(args)
        .output()
        .expect("run flowprobe")
}

/// The value of one series in a Prometheus exposition: `series` is the
/// name with its labels as written (`flowprobe_x{reason="full"}`), or the
/// bare name of an unlabelled series.
pub fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// Parses JSON-lines output.
pub fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// Checks `got` against the golden file `path`, an `expect-test` file
/// (`UPDATE_EXPECT=1` rewrites it with `got`, byte for byte). Returns
/// `false` after printing the diff, so that a data-driven test reports
/// every golden that differs, not only the first.
pub fn golden(path: &Path, got: &str) -> bool {
    let file = expect_test::expect_file![path];
    std::panic::catch_unwind(|| file.assert_eq(got)).is_ok()
}

/// The captures under test, sorted: `fixtures/pcaps`, or the directory in
/// `FLOWPROBE_FIXTURES` (the root tier points it at fresh captures).
pub fn captures() -> Vec<PathBuf> {
    let dir = std::env::var_os("FLOWPROBE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("fixtures/pcaps"));
    let mut v: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("pcap" | "pcapng")
            )
        })
        .collect();
    v.sort();
    v
}

/// The values of every `KEY=` line of the systemd unit
/// `dist/systemd/flowprobe.service`, split on whitespace.
pub fn unit_values(key: &str) -> Vec<String> {
    let unit = fs::read_to_string(repo_root().join("dist/systemd/flowprobe.service")).unwrap();
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

/// The capabilities the service runs with: the unit's
/// `AmbientCapabilities=` (`CAP_BPF`, ...), which tests/service.rs checks
/// against its bounding set, the DaemonSet and docs/service.md, and with
/// which tests/live_caps.rs runs flowprobe.
pub fn service_caps() -> Vec<String> {
    unit_values("AmbientCapabilities")
}
