//! The architecture test: the invariants ARCHITECTURE.md states, checked on
//! the source text, so that a change that breaks one fails the unit tier.
//!
//! - A packet's way is one-directional: a stage of `flowprobe` imports only
//!   itself and the stages before it (`os` < `sources` < `enrich` <
//!   `export` < `settings` < `run` < `fleet` < `cli` < `top` < `main.rs`).
//! - A source never imports another source (`sources::ebpf`,
//!   `sources::afpacket`, `sources::file`); what they share lives in
//!   `sources/mod.rs` and `sources/ingest.rs`.
//! - `flowtable` does no I/O and reads no clock (everything it asks of the
//!   OS goes through its `Host` trait), and never depends on `aya` or
//!   `libc`; `probe-common` is `no_std` and depends on nothing at run time.

use std::fs;
use std::path::{Path, PathBuf};

/// The stages of the `flowprobe` crate, lowest first.
const STAGES: &[&str] = &[
    "os", "sources", "enrich", "export", "settings", "run", "fleet", "cli", "top", "main",
];
const SOURCES: &[&str] = &["ebpf", "afpacket", "file"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The stage (and, under `sources/`, the source) a file belongs to.
fn place(src: &Path, file: &Path) -> (String, Option<String>) {
    let rel = file.strip_prefix(src).unwrap();
    let parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    let stage = parts[0].clone();
    let source = (stage == "sources" && parts.len() > 1).then(|| parts[1].clone());
    (stage, source)
}

/// `text` without its comment lines (docs may name any module).
fn code(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::a::b` path in `text`, as (a, b).
fn crate_paths(text: &str) -> Vec<(String, String)> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    text.match_indices("crate::")
        .filter(|(i, _)| {
            // Not `probe_common::…` or another crate ending in "crate".
            !text[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_')
        })
        .map(|(i, m)| {
            let rest = &text[i + m.len()..];
            let first = ident(rest);
            let second = rest[first.len()..]
                .strip_prefix("::")
                .map(ident)
                .unwrap_or_default();
            (first, second)
        })
        .collect()
}

fn rank(stage: &str) -> usize {
    STAGES
        .iter()
        .position(|s| *s == stage)
        .unwrap_or_else(|| panic!("{stage} is not a stage; add it to STAGES and ARCHITECTURE.md"))
}

#[test]
fn stages_import_only_earlier_stages() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for f in &files {
        if f.ends_with("architecture.rs") {
            continue;
        }
        let (stage, source) = place(&src, f);
        let text = code(&fs::read_to_string(f).unwrap());
        for (to, sub) in crate_paths(&text) {
            if to.is_empty() || !STAGES.contains(&to.as_str()) {
                continue;
            }
            let name = f.strip_prefix(&src).unwrap().display();
            if rank(&to) > rank(&stage) {
                wrong.push(format!(
                    "{name} ({stage}) imports crate::{to}, a later stage"
                ));
            }
            if let Some(me) = &source {
                if to == "sources" && SOURCES.contains(&sub.as_str()) && sub != *me {
                    wrong.push(format!(
                        "{name} (source {me}) imports crate::sources::{sub}"
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn every_source_file_is_in_a_stage() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for f in &files {
        let (stage, _) = place(&src, f);
        if stage != "architecture" {
            rank(&stage);
        }
    }
}

/// The lines of `text` outside `#[cfg(test)]` modules (which sit at the end
/// of a file by convention here).
fn non_test(text: &str) -> &str {
    text.split("#[cfg(test)]").next().unwrap_or(text)
}

#[test]
fn flowtable_does_no_io_and_reads_no_clock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest = fs::read_to_string(root.join("flowtable/Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .unwrap()
        .split("\n[")
        .next()
        .unwrap();
    for forbidden in ["aya", "libc", "tokio", "nix"] {
        assert!(
            !deps.lines().any(|l| l.trim_start().starts_with(forbidden)),
            "flowtable depends on {forbidden}"
        );
    }
    let mut files = Vec::new();
    rust_files(&root.join("flowtable/src"), &mut files);
    for f in &files {
        if f.ends_with("tests.rs") {
            continue;
        }
        let text = fs::read_to_string(f).unwrap();
        for call in [
            "std::fs",
            "std::net::Tcp",
            "std::net::Udp",
            "std::process",
            "std::env",
            "SystemTime",
            "Instant",
            "libc::",
        ] {
            assert!(
                !non_test(&text).contains(call),
                "{} uses {call}: flowtable reaches the OS only through its Host trait",
                f.display()
            );
        }
    }
}

#[test]
fn probe_common_is_no_std_without_dependencies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../probe-common");
    let lib = fs::read_to_string(root.join("src/lib.rs")).unwrap();
    assert!(lib.contains("#![no_std]"));
    let manifest = fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .map(|d| d.split("\n[").next().unwrap_or(""))
        .unwrap_or("");
    for line in deps.lines().filter(|l| l.contains('=')) {
        assert!(
            line.contains("optional = true"),
            "probe-common's dependency `{line}` is not optional (only the `user` feature may add any)"
        );
    }
}
