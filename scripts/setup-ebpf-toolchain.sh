#!/usr/bin/env bash
# Installs what `cargo xtask build-ebpf|check-ebpf|clippy-ebpf|smoke-ebpf`
# need on a fresh machine of the project's kind (Debian, root, rustup):
#
#   1. the nightly toolchain (only if missing) with rust-src (for
#      -Z build-std=core) and clippy;
#   2. bpf-linker, built against the nightly's own libLLVM (there is no
#      system LLVM of the right version): the feature `llvm-NN` follows the
#      LLVM major that `rustc +nightly -vV` reports, and the binary gets an
#      rpath to the nightly's lib dir;
#   3. bpftool, jq and iperf3 from Debian, if missing (load check and smoke test).
#
# Idempotent: every step says what it found and skips what is already there.
# A bpf-linker linked to another toolchain's libLLVM (nightly was updated) is
# rebuilt. Overrides: FLOWPROBE_EBPF_TOOLCHAIN (default nightly),
# BPF_LINKER_VERSION (default 0.13.0).
set -euo pipefail

TC=${FLOWPROBE_EBPF_TOOLCHAIN:-nightly}
BPF_LINKER_VERSION=${BPF_LINKER_VERSION:-0.13.0}
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
export PATH="$CARGO_BIN:$PATH"

step() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: FAIL: %s\n' "$*" >&2; exit 1; }

command -v rustup >/dev/null || die "rustup not found: install Rust with the machine's rustup first"

# 1. Toolchain.
if rustup run "$TC" rustc --version >/dev/null 2>&1; then
    step "toolchain $TC: present ($(rustup run "$TC" rustc --version))"
else
    step "toolchain $TC: missing, running rustup toolchain install $TC --profile minimal"
    rustup toolchain install "$TC" --profile minimal
fi
step "components: rustup component add rust-src clippy --toolchain $TC"
rustup component add rust-src --toolchain "$TC" 2>&1 | sed 's/^/setup:   /'
rustup component add clippy --toolchain "$TC" 2>&1 | sed 's/^/setup:   /' ||
    step "clippy is not available for this $TC (cargo xtask clippy-ebpf will not work)"

# 2. bpf-linker against the toolchain's libLLVM.
SYSROOT_LIB="$(rustup run "$TC" rustc --print sysroot)/lib"
LLVM_MAJOR=$(rustup run "$TC" rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[[ -n $LLVM_MAJOR ]] || die "could not read the LLVM version from rustc +$TC -vV"
LIBLLVM=$(cd "$SYSROOT_LIB" && ls libLLVM-"$LLVM_MAJOR"*.so 2>/dev/null | head -n1 || true)
[[ -n $LIBLLVM ]] || die "no libLLVM-$LLVM_MAJOR*.so in $SYSROOT_LIB (is this a rustup nightly?)"

linker_ok() {
    command -v bpf-linker >/dev/null || return 1
    bpf-linker --version >/dev/null 2>&1 || return 1
    # Linked to a libLLVM dynamically: it must be the one in this
    # toolchain's lib dir (a stale rpath would not even run, but a second
    # nightly could still provide one).
    local linked
    linked=$(ldd "$(command -v bpf-linker)" 2>/dev/null | awk '/libLLVM/ {print $3; exit}')
    [[ -z $linked || $(realpath "$(dirname "$linked")") == $(realpath "$SYSROOT_LIB") ]]
}

if linker_ok; then
    step "bpf-linker: present ($(bpf-linker --version), $(command -v bpf-linker)); skipping build"
else
    LIBNAME=${LIBLLVM#lib}
    LIBNAME=${LIBNAME%.so}
    step "bpf-linker: building $BPF_LINKER_VERSION with $TC against $SYSROOT_LIB/$LIBLLVM (feature llvm-$LLVM_MAJOR), ~70 s"
    RUSTFLAGS="-L native=$SYSROOT_LIB -l dylib=$LIBNAME -C link-arg=-Wl,-rpath,$SYSROOT_LIB" \
        rustup run "$TC" cargo install bpf-linker --force --version "$BPF_LINKER_VERSION" \
        --no-default-features --features "llvm-$LLVM_MAJOR,no-llvm-linking"
    linker_ok || die "bpf-linker was built but does not run"
    step "bpf-linker: installed ($(bpf-linker --version))"
fi

# 3. Debian tools for the load check and the netns smoke test.
missing=()
for pkg in bpftool jq iperf3; do
    command -v "$pkg" >/dev/null || missing+=("$pkg")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    step "debian tools: bpftool, jq, iperf3 present"
elif [[ $(id -u) -ne 0 ]]; then
    step "debian tools: missing ${missing[*]} (run as root to install them)"
else
    step "debian tools: apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# 4. Build the program once, as a top-level cargo: it fetches the eBPF
# crate's dependencies (and build-std's) into the cargo cache, so that the
# nested build probe/build.rs runs can work offline (a nested cargo that has
# to download waits forever on the outer cargo's package-cache lock).
step "eBPF program: cargo xtask build-ebpf --release (fetches its dependencies)"
(cd "$(dirname "$0")/.." && cargo xtask build-ebpf --release >/dev/null)
step "done: cargo build embeds the program in flowprobe; cargo xtask check-ebpf --release runs the kernel verifier"
