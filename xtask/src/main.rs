//! Project tasks that need more than `cargo build`.
//!
//! ```text
//! cargo xtask build-ebpf [--release]   build probe-ebpf for bpfel-unknown-none; prints the object path
//! cargo xtask check-ebpf [--release]   build, then load it into the kernel (bpftool) to run the verifier
//!                                       (XTASK_VERIFIER_LOG=1: with the verifier's log and statistics)
//! cargo xtask clippy-ebpf              clippy -D warnings on probe-ebpf for the BPF target
//! cargo xtask smoke-ebpf [--release]   build, then scripts/ebpf-netns-smoke.sh (veth in throwaway netns)
//! cargo xtask contract [SECTION]       the kernel/userspace contract (probe_common::contract) as text
//! ```
//!
//! Every build checks that the object has each map, program and global
//! `probe_common::contract` names.
//!
//! The eBPF crate is built by a nested nightly cargo (`rustup run nightly
//! cargo …`, toolchain overridable with `FLOWPROBE_EBPF_TOOLCHAIN`) with
//! `-Z build-std=core`, linked by `bpf-linker` with BTF. A fresh machine gets
//! both from `scripts/setup-ebpf-toolchain.sh`.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{bail, Context, Result};
use probe_common::contract::{self, ConnStat};

const TARGET: &str = "bpfel-unknown-none";
/// The classifier `bpftool`/`tc` load; the object is named after the bin.
const EBPF_BIN: &str = "probe-ebpf";
/// The empty classifier used as the yardstick for cost measurements.
const BASELINE_BIN: &str = "tc-baseline";
/// ELF section of the classifier (`#[classifier]`), for `tc … sec`.
const EBPF_SECTION: &str = "classifier";
const BPFFS: &str = "/sys/fs/bpf";

const USAGE: &str = "\
usage: cargo xtask <command> [--release]

commands:
  build-ebpf [--release]  build probe-ebpf for bpfel-unknown-none and print the object path
  check-ebpf [--release]  build-ebpf, then load the object with bpftool so the kernel verifier runs (root)
  clippy-ebpf             cargo clippy for probe-ebpf on the BPF target with -D warnings
  smoke-ebpf [--release]  build-ebpf, then scripts/ebpf-netns-smoke.sh: attach to a veth in throwaway
                          network namespaces, send traffic, check PARSE_STATS, measure ns/packet (root)
  contract [SECTION]      print probe_common::contract, one item a line: `SECTION NAME` for maps,
                          programs, baseline-program and globals, `SECTION INDEX NAME` for parse-stats
                          and conn-stats; with SECTION, only that section's lines, without its name
";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut args = env::args().skip(1);
    let Some(cmd) = args.next() else {
        eprint!("{USAGE}");
        bail!("no command given");
    };
    let mut release = false;
    let mut section = None;
    for a in args {
        match a.as_str() {
            "--release" => release = true,
            s if cmd == "contract" && section.is_none() && !s.starts_with('-') => {
                section = Some(a.clone())
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let profile = if release {
        Profile::Release
    } else {
        Profile::Dev
    };
    match cmd.as_str() {
        "build-ebpf" => {
            let objs = build_ebpf(profile)?;
            println!("{}", objs.program.display());
        }
        "check-ebpf" => {
            let objs = build_ebpf(profile)?;
            check_ebpf(&objs.program)?;
        }
        "clippy-ebpf" => clippy_ebpf()?,
        "smoke-ebpf" => {
            let objs = build_ebpf(profile)?;
            smoke_ebpf(&objs)?;
        }
        "contract" => print_contract(section.as_deref())?,
        "-h" | "--help" | "help" => print!("{USAGE}"),
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Profile {
    Dev,
    Release,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Dev => "debug",
            Profile::Release => "release",
        }
    }
}

struct EbpfObjects {
    program: PathBuf,
    baseline: PathBuf,
}

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn ebpf_dir() -> PathBuf {
    root_dir().join("probe-ebpf")
}

/// Kept inside the workspace's (ignored) `target/`, apart from host builds.
fn ebpf_target_dir() -> PathBuf {
    root_dir().join("target").join("ebpf")
}

fn toolchain() -> String {
    env::var("FLOWPROBE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_owned())
}

/// `rustup run <nightly> cargo <sub> --target bpfel-unknown-none -Z build-std=core`,
/// run in `probe-ebpf/` with an environment that cannot leak the host build's
/// compiler or flags into it.
fn nightly_cargo(sub: &str) -> Result<Command> {
    which("rustup").context(
        "rustup not found: the eBPF build needs the nightly toolchain (run scripts/setup-ebpf-toolchain.sh)",
    )?;
    let mut cmd = Command::new("rustup");
    cmd.args(["run", &toolchain(), "cargo", sub])
        .args(["--target", TARGET, "-Z", "build-std=core", "--target-dir"])
        .arg(ebpf_target_dir())
        .current_dir(ebpf_dir());
    // `cargo xtask` runs under the stable cargo, which exports variables the
    // nested nightly cargo would otherwise pick up.
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
    ] {
        cmd.env_remove(key);
    }
    // The flags (BTF, BPF atomics, unaligned loads) come from
    // probe-ebpf/.cargo/config.toml, which this cargo reads from its
    // directory; an inherited CARGO_ENCODED_RUSTFLAGS would replace them.
    cmd.env_remove("CARGO_ENCODED_RUSTFLAGS");
    Ok(cmd)
}

fn build_ebpf(profile: Profile) -> Result<EbpfObjects> {
    which("bpf-linker").context(
        "bpf-linker not found in PATH (cargo install location): run scripts/setup-ebpf-toolchain.sh",
    )?;
    let mut cmd = nightly_cargo("build")?;
    if let Profile::Release = profile {
        cmd.arg("--release");
    }
    eprintln!("xtask: {}", show(&cmd));
    // Cargo's progress goes to stderr; stdout is kept for the object path.
    let status = cmd
        .stdout(Stdio::inherit())
        .status()
        .context("running the nightly cargo")?;
    if !status.success() {
        bail!("eBPF build failed ({status})");
    }
    let out = ebpf_target_dir().join(TARGET).join(profile.dir());
    let objs = EbpfObjects {
        program: out.join(EBPF_BIN),
        baseline: out.join(BASELINE_BIN),
    };
    for p in [&objs.program, &objs.baseline] {
        if !p.is_file() {
            bail!("build succeeded but {} is missing", p.display());
        }
    }
    check_contract(&objs)?;
    eprintln!(
        "xtask: eBPF object {} (tc section \"{EBPF_SECTION}\")",
        objs.program.display()
    );
    Ok(objs)
}

/// The contract's sections, each line its items: `NAME`, or `INDEX NAME`
/// for the statistics arrays.
fn contract_sections() -> Vec<(&'static str, Vec<String>)> {
    let names = |n: &[&str]| n.iter().map(|n| n.to_string()).collect();
    let parse_stats = (0..contract::PARSE_STATS_LEN as u32)
        .map(|i| format!("{i} {}", contract::parse_stat_name(i).unwrap_or("?")))
        .collect();
    let conn_stats = ConnStat::ALL
        .iter()
        .map(|s| format!("{} {}", s.index(), s.name()))
        .collect();
    vec![
        ("maps", names(&contract::MAPS)),
        ("programs", names(&contract::PROGRAMS)),
        ("baseline-program", names(&[contract::BASELINE_PROGRAM])),
        ("globals", names(&contract::GLOBALS)),
        ("parse-stats", parse_stats),
        ("conn-stats", conn_stats),
    ]
}

/// `cargo xtask contract [SECTION]`: for scripts, which take the names
/// from here rather than keep a copy.
fn print_contract(section: Option<&str>) -> Result<()> {
    let sections = contract_sections();
    match section {
        None => {
            for (name, lines) in &sections {
                for l in lines {
                    println!("{name} {l}");
                }
            }
        }
        Some(want) => {
            let Some((_, lines)) = sections.iter().find(|(name, _)| *name == want) else {
                let known: Vec<&str> = sections.iter().map(|(n, _)| *n).collect();
                bail!(
                    "no contract section {want:?} (sections: {})",
                    known.join(", ")
                );
            };
            for l in lines {
                println!("{l}");
            }
        }
    }
    Ok(())
}

/// What a name of the contract is in an object, as the loader finds it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Item {
    /// A symbol in `.maps`.
    Map,
    /// A function symbol in a section of its own (not `.text`).
    Program,
    /// A data symbol in read-only data (which the loader may override).
    Global,
}

impl Item {
    fn as_str(self) -> &'static str {
        match self {
            Item::Map => "map",
            Item::Program => "program",
            Item::Global => "global",
        }
    }
}

/// The contract's items of an object's symbol table.
fn object_items(path: &Path) -> Result<Vec<(Item, String)>> {
    use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("parsing {} as ELF", path.display()))?;
    let mut items = Vec::new();
    for sym in file.symbols() {
        if !sym.is_global() || sym.is_undefined() {
            continue;
        }
        let (Ok(name), Some(idx)) = (sym.name(), sym.section_index()) else {
            continue;
        };
        let Ok(section) = file
            .section_by_index(idx)
            .and_then(|s| s.name().map(str::to_owned))
        else {
            continue;
        };
        let item = match sym.kind() {
            SymbolKind::Data if section == ".maps" => Item::Map,
            SymbolKind::Data if section.starts_with(".rodata") => Item::Global,
            SymbolKind::Text if section != ".text" => Item::Program,
            _ => continue,
        };
        items.push((item, name.to_owned()));
    }
    Ok(items)
}

/// Fails unless the built objects hold every map, program and global
/// `probe_common::contract` names, each of the kind the loader expects:
/// what userspace would otherwise find missing only when it loads them.
fn check_contract(objs: &EbpfObjects) -> Result<()> {
    let wanted = [
        (&objs.program, Item::Map, &contract::MAPS[..]),
        (&objs.program, Item::Program, &contract::PROGRAMS[..]),
        (&objs.program, Item::Map, &contract::OWNER_MAPS[..]),
        (&objs.program, Item::Program, &contract::OWNER_PROGRAMS[..]),
        (&objs.program, Item::Global, &contract::GLOBALS[..]),
        (
            &objs.baseline,
            Item::Program,
            &[contract::BASELINE_PROGRAM][..],
        ),
    ];
    let mut problems = Vec::new();
    for (path, item, names) in wanted {
        let have = object_items(path)?;
        for name in names {
            if !have.contains(&(item, name.to_string())) {
                let found: Vec<&str> = have
                    .iter()
                    .filter(|(i, _)| *i == item)
                    .map(|(_, n)| n.as_str())
                    .collect();
                problems.push(format!(
                    "{} has no {} {name} (its {}s: {})",
                    path.display(),
                    item.as_str(),
                    item.as_str(),
                    if found.is_empty() {
                        "none".to_owned()
                    } else {
                        found.join(", ")
                    }
                ));
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "the eBPF object does not match probe_common::contract \
             (probe-common/src/contract.rs and probe-ebpf must name the same items):\n  {}",
            problems.join("\n  ")
        );
    }
    eprintln!(
        "xtask: contract: the objects have its {} maps, {} programs and {} globals",
        contract::MAPS.len() + contract::OWNER_MAPS.len(),
        contract::PROGRAMS.len() + contract::OWNER_PROGRAMS.len() + 1,
        contract::GLOBALS.len()
    );
    Ok(())
}

fn clippy_ebpf() -> Result<()> {
    let mut cmd = nightly_cargo("clippy")?;
    cmd.args(["--all-targets", "--", "-D", "warnings"]);
    eprintln!("xtask: {}", show(&cmd));
    let status = cmd.status().context("running the nightly cargo clippy")?;
    if !status.success() {
        bail!("clippy on probe-ebpf failed ({status})");
    }
    Ok(())
}

/// Loads every program of the object with bpftool (which runs the verifier
/// on each: the tc classifier and the XDP program, typed by their ELF
/// sections), then unpins them.
///
/// Without a log first: the verbose log (`bpftool -d`) of this object is
/// over half a gigabyte and takes minutes to write, against two seconds for
/// the load alone. Only a failed load, or `XTASK_VERIFIER_LOG=1` (for the
/// verifier's statistics: instructions processed, stack depth, time), loads
/// again with it, into `<object>.verifier.log`.
fn check_ebpf(obj: &Path) -> Result<()> {
    which("bpftool").context("bpftool not found (Debian package `bpftool`)")?;
    ensure_bpffs()?;
    let want_log = std::env::var_os("XTASK_VERIFIER_LOG").is_some_and(|v| v == "1");
    if !want_log {
        let (loaded, sizes) = load_all(obj, false)?;
        if loaded.success {
            for line in sizes {
                eprintln!("xtask: verifier: {line}");
            }
            eprintln!("xtask: verifier accepted {}", obj.display());
            return Ok(());
        }
        eprintln!("xtask: the kernel rejected it; loading again with the verifier log");
    }
    let (loaded, _) = load_all(obj, true)?;
    let log_path = obj.with_extension("verifier.log");
    fs::write(&log_path, &loaded.log).with_context(|| format!("writing {}", log_path.display()))?;
    let log = String::from_utf8_lossy(&loaded.log);
    if !loaded.success {
        eprintln!("{}", verifier_excerpt(&log));
        bail!(
            "the kernel rejected {} ({}); full log: {}",
            obj.display(),
            loaded.status,
            log_path.display()
        );
    }
    for line in log.lines().filter(|l| {
        l.starts_with("processed ")
            || l.starts_with("stack depth")
            || l.starts_with("verification time")
    }) {
        eprintln!("xtask: verifier: {line}");
    }
    eprintln!(
        "xtask: verifier accepted {} (log: {})",
        obj.display(),
        log_path.display()
    );
    Ok(())
}

/// What one `bpftool prog loadall` did.
struct Loaded {
    success: bool,
    status: std::process::ExitStatus,
    /// bpftool's output (with `-d`: libbpf's debug output and the verifier
    /// log).
    log: Vec<u8>,
}

/// `bpftool [-d] prog loadall OBJ PIN`, then each loaded program's sizes
/// (`bpftool prog show`), then the pins removed.
fn load_all(obj: &Path, debug: bool) -> Result<(Loaded, Vec<String>)> {
    let pin = PathBuf::from(format!("{BPFFS}/flowprobe-check-{}", std::process::id()));
    let mut cmd = Command::new("bpftool");
    if debug {
        // libbpf debug output, which includes the verifier log and its
        // statistics even when the load succeeds.
        cmd.arg("-d");
    }
    cmd.args(["prog", "loadall"]).arg(obj).arg(&pin);
    eprintln!("xtask: {}", show(&cmd));
    let out = cmd.output().context("running bpftool")?;
    let mut log = out.stdout;
    log.extend_from_slice(&out.stderr);
    let success = out.status.success() && pin.exists();
    let mut sizes = Vec::new();
    if pin.exists() {
        let mut progs: Vec<PathBuf> = fs::read_dir(&pin)
            .with_context(|| format!("reading {}", pin.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        progs.sort();
        for p in progs {
            let shown = Command::new("bpftool")
                .args(["prog", "show", "pinned"])
                .arg(&p)
                .output()
                .context("running bpftool prog show")?;
            let text = String::from_utf8_lossy(&shown.stdout);
            // "… xlated 35136B  jited 19976B  memlock …"
            let size: Vec<&str> = text
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .filter(|w| w[0] == "xlated" || w[0] == "jited")
                .flat_map(|w| [w[0], w[1]])
                .collect();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            sizes.push(format!("{}: {}", name.unwrap_or_default(), size.join(" ")));
        }
        fs::remove_dir_all(&pin).with_context(|| format!("removing pins {}", pin.display()))?;
    }
    Ok((
        Loaded {
            success,
            status: out.status,
            log,
        },
        sizes,
    ))
}

/// The part of a failed load a person needs: the kernel's verifier log, or
/// libbpf's last words when the object never reached the kernel.
fn verifier_excerpt(log: &str) -> String {
    const TAIL: usize = 80;
    let lines: Vec<&str> = match log.find("-- BEGIN PROG LOAD LOG --") {
        Some(start) => log[start..].lines().collect(),
        None => log.lines().collect(),
    };
    let skip = lines.len().saturating_sub(TAIL);
    lines[skip..].join("\n")
}

fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next(), f.next(), f.next());
        dir == Some(BPFFS) && fstype == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    eprintln!("xtask: mounting bpffs at {BPFFS}");
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .status()
        .context("running mount")?;
    if !status.success() {
        bail!("mount -t bpf bpf {BPFFS} failed ({status}); are you root?");
    }
    Ok(())
}

fn smoke_ebpf(objs: &EbpfObjects) -> Result<()> {
    let script = root_dir().join("scripts").join("ebpf-netns-smoke.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg(&objs.program).arg(&objs.baseline);
    // The script names PARSE_STATS indices with `$FLOWPROBE_XTASK contract
    // parse-stats`: this very binary, without a nested cargo.
    cmd.env(
        "FLOWPROBE_XTASK",
        env::current_exe().context("finding the xtask binary")?,
    );
    eprintln!("xtask: {}", show(&cmd));
    let status = cmd
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Ok(())
}

fn which(prog: &str) -> Result<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
        .with_context(|| format!("{prog} is not in PATH"))
}

fn show(cmd: &Command) -> String {
    let mut s: Vec<OsString> = vec![cmd.get_program().to_owned()];
    s.extend(cmd.get_args().map(ToOwned::to_owned));
    s.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
