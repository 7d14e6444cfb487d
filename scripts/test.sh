#!/usr/bin/env bash
# Every test flowprobe has, in tiers. Run as root on a fresh Debian machine of
# the project's kind; it installs what the tiers need.
#
#   1. setup    apt packages (tshark, tcpdump, iptables, systemd's tools, ...) and the eBPF
#               toolchain (nightly rust-src, bpf-linker against nightly's libLLVM)
#   2. lint     cargo fmt --check, clippy -D warnings (workspace and eBPF crate)
#   3. unit     the fuzz targets' corpora and kept crash inputs, replayed
#               (scripts/fuzz.sh 0);
#               cargo test: parser, tracker, etherparse differential property
#               test, replay of every format, golden files, kernel truth, tshark;
#               the service files (tests/service.rs: systemd-analyze verify,
#               the DaemonSet's YAML, completions); the fleet on a loopback
#               nats-server (tests/fleet_replay.rs)
#   4. root     eBPF: the verifier accepts the program (bpftool load) and it
#               counts in a veth pair between two fresh network namespaces;
#               `flowprobe run` there equals each socket's TCP_INFO (tests/live_tc/),
#               with the AF_PACKET backend too, and falls back to it without
#               CAP_BPF (tests/live_afpacket/);
#               a real Prometheus scraping `run --listen` (tests/live_agent.rs);
#               the agent's web page in chromium (tests/live_web.rs);
#               handshake RTT against a known added delay (tests/rtt_delay.rs);
#               each end joined to its process, container and service
#               (tests/live_attrib/);
#               `run` with exactly the service's capabilities, and with one
#               fewer (tests/live_caps.rs);
#               `flowprobe top` in tmux against a live agent (tests/live_top.rs);
#               the fleet: hosts in namespaces publishing to a nats-server,
#               one query over all of them (tests/live_fleet.rs);
#               replay of freshly captured kernel traffic (iptables loss in the
#               receiver's INPUT) equals each socket's TCP_INFO
#
# Without root the root tier is skipped with a message; with CI=true a skipped
# tier is a failure. FLOWPROBE_SKIP_SETUP=1 skips tier 1 (for quick local runs).
set -euo pipefail
cd "$(dirname "$0")/.."

tier() { printf '\n=== %s\n' "$*"; }
K8S_VENV=$PWD/target/venv-k8s
is_root() { [ "$(id -u)" = 0 ]; }
ci() { [ "${CI:-}" = true ]; }

if [ "${FLOWPROBE_SKIP_SETUP:-}" != 1 ]; then
    tier "setup"
    if is_root; then
        # systemd (systemd-analyze), man-db, python3-yaml and python3-venv:
        # tests/service.rs. chromium and chromium-driver: tests/live_web.rs.
        # tmux: tests/live_top.rs. nats-server, openssl: the fleet's tests
        # (tests/fleet_replay.rs, tests/live_fleet.rs).
        pkgs=(tcpdump tshark iptables iproute2 ethtool bpftool iperf3 jq softflowd python3 iputils-ping prometheus
              systemd man-db python3-yaml python3-venv chromium chromium-driver tmux nats-server openssl)
        missing=()
        for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
        if [ ${#missing[@]} -gt 0 ]; then
            echo "apt-get install ${missing[*]}"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq
            apt-get install -y -qq "${missing[@]}" >/dev/null
        fi
        bash scripts/setup-ebpf-toolchain.sh
        # The fuzz targets' regression replay (unit tier) needs cargo-fuzz.
        command -v cargo-fuzz >/dev/null || cargo install --locked -q cargo-fuzz@0.13.2
        # The Kubernetes schemas (bundled in the package) that
        # tests/service.rs checks the DaemonSet against.
        if [ ! -x "$K8S_VENV/bin/kubernetes-validate" ]; then
            /usr/bin/python3 -m venv "$K8S_VENV"
            "$K8S_VENV/bin/pip" install -q kubernetes-validate==1.37.0
        fi
    elif ci; then
        echo "FAIL: CI=true but not root: cannot install packages or run the root tier" >&2
        exit 1
    else
        echo "not root: assuming tshark and the eBPF toolchain are installed"
    fi
fi

tier "lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo xtask clippy-ebpf

tier "unit and replay tests"
if [ -d "$K8S_VENV/bin" ]; then export PATH="$K8S_VENV/bin:$PATH"; fi
cargo test --workspace --locked

# A flowprobe built without the eBPF toolchain: replay works, and run
# --backend tc says in one line what is missing (before needing root). (The
# default, auto, would count with AF_PACKET instead, here in the root
# namespace; tests/live_afpacket/fallback.rs checks that fallback in a namespace.)
FLOWPROBE_NO_EBPF=1 CARGO_TARGET_DIR=target/no-ebpf cargo build --locked -q -p flowprobe
target/no-ebpf/debug/flowprobe replay --quiet fixtures/pcaps/tcp4_clean.pcap >/dev/null
if msg=$(target/no-ebpf/debug/flowprobe run --backend tc --duration 0 2>&1); then
    echo "FAIL: run without an eBPF program succeeded" >&2
    exit 1
fi
case $msg in
*$'\n'*) echo "FAIL: run without an eBPF program said more than one line: $msg" >&2; exit 1 ;;
*"no eBPF program"* | *"needs root"*) echo "without the eBPF toolchain: $msg" ;;
*) echo "FAIL: unexpected message: $msg" >&2; exit 1 ;;
esac

# Every corpus input and kept crash input of the fuzz targets, once each
# (scripts/fuzz.sh 0): what fuzzing found stays fixed.
if command -v cargo-fuzz >/dev/null && rustup toolchain list | grep -q nightly; then
    scripts/fuzz.sh 0
elif ci; then
    echo "FAIL: CI=true and cargo-fuzz or nightly is missing: the fuzz regressions cannot run" >&2
    exit 1
else
    echo "SKIPPED: fuzz regressions (cargo install cargo-fuzz; nightly)"
fi

tier "root: eBPF and live kernel traffic"
if ! is_root; then
    if ci; then
        echo "FAIL: CI=true and the root tier cannot run (not root)" >&2
        exit 1
    fi
    echo "SKIPPED: the root tier needs root (sudo $0)"
    exit 0
fi
cargo xtask check-ebpf --release
cargo xtask smoke-ebpf --release
# `flowprobe run` on a veth in new namespaces against TCP_INFO; it uses the
# object check-ebpf just built (the unit tier skips it without this variable).
# Two tests at a time: each loads the program (about 4 s of verifier time
# on a 2-vCPU VM), and more at once only makes every load, and so every
# wait for an attach, longer.
FLOWPROBE_LIVE_TESTS=1 cargo test --locked -p flowprobe --test live_tc -- --test-threads=2
# `flowprobe run --backend afpacket` beside the tc backend, both against
# TCP_INFO; the fallback to AF_PACKET without CAP_BPF (setpriv, util-linux).
FLOWPROBE_LIVE_TESTS=1 cargo test --locked -p flowprobe --test live_afpacket -- --test-threads=2
# `flowprobe run --listen` scraped by Debian's prometheus in a new namespace:
# PromQL sums = the agent's /query = the bytes the applications wrote.
FLOWPROBE_LIVE_TESTS=1 cargo test --locked -p flowprobe --test live_agent
# The agent's web page in Debian's chromium over WebDriver: the table
# equals /query, group-by, filter, drill-down, the map, hostile values,
# no request outside the agent, 1000-row render (tests/live_web.rs).
FLOWPROBE_LIVE_TESTS=1 cargo test --locked -p flowprobe --test live_web -- --nocapture
# Handshake RTT behind a bridge that adds 100 ms: replay of a capture, and
# the agent of `run --backend afpacket`.
FLOWPROBE_LIVE_TESTS=1 cargo test --locked -p flowprobe --test rtt_delay
# Process attribution: processes in two namespaces and made-up container
# cgroups, 500 short-lived connections; a short-lived client container
# attributed from the cgroup programs' records (tc with cgroupfs visible and
# hidden, XDP); issue 15's container host whole (two containers, NAT, loss,
# 500 connections: once, exact per service pair, both ends attributed, the
# accepting one from sock_ops' listen and accept records; tc and AF_PACKET)
# (tests/live_attrib/).
FLOWPROBE_LIVE_TESTS=1 cargo test --locked -p flowprobe --test live_attrib -- --nocapture
# The service's capability set (dist/systemd/flowprobe.service) under
# setpriv: everything the unit promises, and what one fewer breaks.
FLOWPROBE_LIVE_TESTS=1 cargo test --locked -p flowprobe --test live_caps -- --nocapture
# `flowprobe top --agent` in a tmux pane, typed at: the screen's rows equal
# `flowprobe query`'s for the command it shows; hostile tags stay text.
FLOWPROBE_LIVE_TESTS=1 cargo test --locked -p flowprobe --test live_top -- --test-threads=1 --nocapture
# The fleet: nats-server in its own namespace on a bridge, three hosts with
# `run --fleet`, NATS killed mid-traffic, an agent killed; `flowprobe fleet`
# = the bytes the applications wrote, counted once.
FLOWPROBE_LIVE_TESTS=1 cargo test --locked -p flowprobe --test live_fleet -- --nocapture

fresh=$(mktemp -d /tmp/flowprobe-capture.XXXXXX)
trap 'rm -rf "$fresh"' EXIT
for scenario in tcp4_loss tcp6_loss; do
    bash fixtures/capture/capture.sh "$scenario" "$fresh"
done
FLOWPROBE_FIXTURES="$fresh" cargo test --locked -p flowprobe --test replay_golden -- replay_agrees_with_kernel_truth
FLOWPROBE_FIXTURES="$fresh" cargo test --locked -p flowprobe --test tshark_oracle
echo
echo "all tiers passed"
