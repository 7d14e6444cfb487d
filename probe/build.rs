//! Builds the tc eBPF program (`probe-ebpf/`) and hands it to `src/live.rs`
//! to embed, so that `cargo build` gives a `flowprobe` that can `run`.
//!
//! The program needs the nightly toolchain with `rust-src` and `bpf-linker`
//! (`scripts/setup-ebpf-toolchain.sh`). Without them this still succeeds:
//! it embeds nothing and records why, `replay` works, and `run` says in one
//! line what is missing. The nested nightly cargo is the one `cargo xtask
//! build-ebpf --release` runs (same target directory, `target/ebpf`, so the
//! two share their work).
//!
//! Environment: `FLOWPROBE_EBPF_OBJECT=PATH` embeds that object instead of
//! building; `FLOWPROBE_NO_EBPF=1` embeds none; `FLOWPROBE_EBPF_TOOLCHAIN`
//! names the nightly toolchain (default `nightly`).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("probe/ is one level down")
        .to_path_buf();
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    for p in [
        "probe-ebpf/src",
        "probe-ebpf/Cargo.toml",
        "probe-ebpf/.cargo/config.toml",
        "probe-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    for v in [
        "FLOWPROBE_EBPF_OBJECT",
        "FLOWPROBE_NO_EBPF",
        "FLOWPROBE_EBPF_TOOLCHAIN",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    let embedded = out.join("probe-ebpf.o");
    let missing = match object(&root) {
        Ok(obj) => {
            fs::copy(&obj, &embedded).expect("copying the eBPF object into OUT_DIR");
            String::new()
        }
        Err(why) => {
            println!("cargo:warning=flowprobe is built without its eBPF program: {why}");
            fs::write(&embedded, b"").expect("writing OUT_DIR");
            if env::var_os("FLOWPROBE_NO_EBPF").is_none_or(|v| v != "1") {
                // A path that never exists: cargo then runs this script at
                // every build until the program builds, so that installing
                // the toolchain and building again is enough.
                println!(
                    "cargo:rerun-if-changed={}",
                    out.join("retried-until-the-ebpf-program-builds").display()
                );
            }
            why
        }
    };
    println!("cargo:rustc-env=FLOWPROBE_EBPF_MISSING={missing}");
}

/// The object to embed, or why there is none.
fn object(root: &Path) -> Result<PathBuf, String> {
    if let Some(p) = env::var_os("FLOWPROBE_EBPF_OBJECT") {
        let p = PathBuf::from(p);
        println!("cargo:rerun-if-changed={}", p.display());
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "FLOWPROBE_EBPF_OBJECT={} is not a file",
                p.display()
            ))
        };
    }
    if env::var_os("FLOWPROBE_NO_EBPF").is_some_and(|v| v == "1") {
        return Err("FLOWPROBE_NO_EBPF=1 was set when it was built".into());
    }
    let toolchain = env::var("FLOWPROBE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let setup = "run scripts/setup-ebpf-toolchain.sh, then cargo build again";
    if !on_path("bpf-linker") {
        return Err(format!("bpf-linker is not installed ({setup})"));
    }
    let target_dir = root.join("target").join("ebpf");
    let mut cmd = Command::new("rustup");
    // Offline: a nested cargo that has to download waits forever on the
    // package-cache lock the outer cargo holds. The set-up script builds
    // the program once at top level, which fetches what this needs.
    cmd.args([
        "run",
        &toolchain,
        "cargo",
        "build",
        "--release",
        "--offline",
    ])
    .args(["--target", TARGET, "-Z", "build-std=core", "--target-dir"])
    .arg(&target_dir)
    .current_dir(root.join("probe-ebpf"));
    // Only what a nested cargo needs: the variables cargo sets for build
    // scripts (RUSTC, CARGO_*, TARGET, profile flags …) would steer the
    // nightly build.
    cmd.env_clear();
    for key in ["PATH", "HOME", "CARGO_HOME", "RUSTUP_HOME", "TMPDIR"] {
        if let Some(v) = env::var_os(key) {
            cmd.env(key, v);
        }
    }
    // The flags (BTF, BPF atomics, unaligned loads) come from
    // probe-ebpf/.cargo/config.toml, as for `cargo xtask build-ebpf`.
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run rustup ({e}); {setup}"))?;
    if !output.status.success() {
        let log = String::from_utf8_lossy(&output.stderr);
        if log.contains("offline") {
            return Err(format!(
                "the eBPF crate's dependencies are not in the cargo cache yet ({setup}, \
                 or run `cargo xtask build-ebpf --release` once)"
            ));
        }
        let last = log
            .lines()
            .rev()
            .find(|l| l.contains("error"))
            .unwrap_or("no error line");
        return Err(format!(
            "the nightly eBPF build failed ({}): {}; {setup}",
            output.status,
            last.trim()
        ));
    }
    let obj = target_dir.join(TARGET).join("release").join("probe-ebpf");
    if obj.is_file() {
        Ok(obj)
    } else {
        Err(format!("the eBPF build left no {}", obj.display()))
    }
}

fn on_path(bin: &str) -> bool {
    env::var_os("PATH").is_some_and(|path| env::split_paths(&path).any(|d| d.join(bin).is_file()))
}
