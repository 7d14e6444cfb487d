#!/usr/bin/env bash
# What the agent costs, for the resource requests of the DaemonSet
# (dist/kubernetes/flowprobe-daemonset.yaml) and docs/service.md.
#
#   netns A: clients, `flowprobe run --config dist/flowprobe.toml`
#            (tc, the agent on 127.0.0.1:9911)  ==veth==  netns B: servers
#
# First IDLE seconds with no traffic; then for SECS seconds at once: an
# iperf3 TCP stream at BULK bit/s, RATE short TCP connections a second
# (bench/attrib_load.py: 100 bytes each way, held 50 ms) and a scrape of
# /metrics every SCRAPE seconds. Every second it samples flowprobe's RSS
# (VmRSS of /proc/PID/status) and CPU (utime+stime of /proc/PID/stat), and
# prints: idle RSS and CPU; under load the CPU averaged over the load
# window (% of one core) and the highest over any 10 s, RSS at the start
# and end of the load and its highest; the connections the agent reported.
#
# usage (root): bench/service.sh   (SECS=120 IDLE=10 RATE=100 BULK=1G SCRAPE=10)
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${SECS:-120}
IDLE=${IDLE:-10}
RATE=${RATE:-100}
BULK=${BULK:-1G}
SCRAPE=${SCRAPE:-10}
NS_A=fp-sbench-a-$$
NS_B=fp-sbench-b-$$
PY=/usr/bin/python3

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 2; }
[[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces, tc)"
for t in ip tc jq iperf3 curl "$PY"; do command -v "$t" >/dev/null || die "$t not found"; done

log "building flowprobe (release)"
cargo build --release --quiet -p flowprobe
FP=target/release/flowprobe
WORK=$(mktemp -d /tmp/flowprobe-sbench.XXXXXX)
# shellcheck source=../scripts/lib/netns.sh
. scripts/lib/netns.sh
cleanup() {
    netns_cleanup
    rm -rf "$WORK"
}
trap cleanup EXIT

netns_add "$NS_A" "$NS_B"
netns_veth "$NS_A" fsb0 "$NS_B" fsb1
netns_addr_up "$NS_A" fsb0 10.234.0.1/24
netns_addr_up "$NS_B" fsb1 10.234.0.2/24
netns_wait_carrier "$NS_A" fsb0 || die "no carrier"
ip netns exec "$NS_A" sysctl -qw net.ipv4.ip_local_port_range="10000 65000" net.ipv4.tcp_tw_reuse=1

# Servers: killed by netns_cleanup (disowned: no job notice then).
ip netns exec "$NS_B" "$PY" bench/attrib_load.py server 10.234.0.2:8080 "$WORK/ready" &
disown
ip netns exec "$NS_B" iperf3 -s -1 -B 10.234.0.2 >/dev/null &
disown
for _ in $(seq 100); do [[ -e $WORK/ready ]] && break; sleep 0.1; done
[[ -e $WORK/ready ]] || die "the server did not start"

ip netns exec "$NS_A" "$FP" run --config dist/flowprobe.toml >/dev/null 2>"$WORK/fp.err" &
FPID=$!
for _ in $(seq 600); do
    ip netns exec "$NS_A" tc filter show dev fsb0 egress | grep -q flowprobe_tc && break
    sleep 0.1
done
ip netns exec "$NS_A" tc filter show dev fsb0 egress | grep -q flowprobe_tc || die "flowprobe did not attach: $(cat "$WORK/fp.err")"

TCK=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$FPID/stat"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$FPID/status"; }
get() { ip netns exec "$NS_A" curl -sf "http://127.0.0.1:9911$1"; }
# N samples a second apart: "ticks rss_kib" per line.
sample() {
    local i
    for i in $(seq "$1"); do
        echo "$(cpu) $(rss_kib)"
        sleep 1
    done
}

sleep 1
sample "$IDLE" >"$WORK/idle"
ip netns exec "$NS_A" "$PY" bench/attrib_load.py client 10.234.0.2:8080 "$RATE" "$SECS" 50 "$WORK/load.json" &
CHURN=$!
ip netns exec "$NS_A" iperf3 -c 10.234.0.2 -B 10.234.0.1 -t "$SECS" -b "$BULK" >"$WORK/iperf" &
BULKPID=$!
(while kill -0 "$CHURN" 2>/dev/null; do get /metrics >/dev/null || true; sleep "$SCRAPE"; done) &
sample "$SECS" >"$WORK/load"
wait "$CHURN" "$BULKPID"
conns=$(get /health | jq .connections)
kill -INT "$FPID"
wait "$FPID" || die "flowprobe failed: $(cat "$WORK/fp.err")"

awk -v k="$TCK" '
    NR == 1 { c0 = $1 } { c = $1; r = $2 }
    END { printf "idle: RSS %.1f MiB, CPU %.2f %% of one core\n", r / 1024, 100 * (c - c0) / k / (NR - 1) }
' "$WORK/idle"
awk -v k="$TCK" '
    { c[NR] = $1; r[NR] = $2; if ($2 > max) max = $2 }
    END {
        for (i = 11; i <= NR; i++) if (c[i] - c[i - 10] > w) w = c[i] - c[i - 10]
        printf "load: CPU %.1f %% of one core (highest 10 s: %.1f %%); RSS %.1f MiB at start, %.1f MiB at end, %.1f MiB highest\n",
            100 * (c[NR] - c[1]) / k / (NR - 1), 100 * w / k / 10, r[1] / 1024, r[NR] / 1024, max / 1024
    }
' "$WORK/load"
printf 'traffic: %s short connections in %.0f s, bulk %s; the agent reported %s connections\n' \
    "$(jq .opened "$WORK/load.json")" "$(jq .secs "$WORK/load.json")" \
    "$(grep -E 'sender$' "$WORK/iperf" | awk '{print $7, $8}')" "$conns"
