#!/usr/bin/env bash
# Smoke test for the flowprobe tc classifier, entirely inside two throwaway
# network namespaces joined by a veth pair (never touches the root namespace's
# interfaces):
#
#   netns A (10.231.0.1, fd00:231::1) va <==veth==> vb (10.231.0.2, fd00:231::2) netns B
#       tc-baseline on va ingress+egress        probe-ebpf on vb ingress+egress
#
# It sends ARP/ND, ICMP (when ping exists), TCP and UDP over IPv4 and IPv6,
# dumps PARSE_STATS of both probe-ebpf instances, fails unless the "tracked"
# counter rose, and prints the per-packet cost from kernel.bpf_stats_enabled
# next to the empty baseline program that saw the same packets.
#
# usage (root): scripts/ebpf-netns-smoke.sh PROBE_OBJ [BASELINE_OBJ]
#   usually via `cargo xtask smoke-ebpf --release`
set -euo pipefail

OBJ=${1:?usage: $0 PROBE_OBJ [BASELINE_OBJ]}
BASE_OBJ=${2:-}
SEC=classifier
NS_A=fp-smoke-a-$$
NS_B=fp-smoke-b-$$
V4_A=10.231.0.1 V4_B=10.231.0.2
V6_A=fd00:231::1 V6_B=fd00:231::2

log() { printf 'smoke: %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# PARSE_STATS index -> name, from probe_common::contract through xtask:
# `cargo xtask smoke-ebpf` passes its own binary as FLOWPROBE_XTASK; run by
# hand, the script asks cargo.
if [[ -n ${FLOWPROBE_XTASK:-} ]]; then
    CONTRACT=$("$FLOWPROBE_XTASK" contract parse-stats) || die "$FLOWPROBE_XTASK contract failed"
else
    CONTRACT=$(cd "$(dirname "$0")/.." && cargo xtask contract parse-stats) ||
        die "cargo xtask contract failed (or set FLOWPROBE_XTASK to the xtask binary)"
fi
NAMES=()
while read -r idx name; do
    NAMES[idx]=$name
done <<<"$CONTRACT"
[[ ${NAMES[0]:-} == tracked ]] || die "xtask contract parse-stats gave no index 0 (tracked)"

[[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces, tc, bpftool)"
for t in ip tc bpftool jq awk; do
    command -v "$t" >/dev/null || die "$t not found (Debian packages: iproute2 bpftool jq gawk)"
done
[[ -f $OBJ ]] || die "no such object: $OBJ"

# shellcheck source=lib/netns.sh
. "$(dirname "$0")/lib/netns.sh"
OLD_STATS=$(sysctl -n kernel.bpf_stats_enabled)
IPERF_PID=
cleanup() {
    [[ -n $IPERF_PID ]] && kill "$IPERF_PID" 2>/dev/null || true
    netns_cleanup
    sysctl -q -w kernel.bpf_stats_enabled="$OLD_STATS" >/dev/null || true
}
trap cleanup EXIT

log "creating netns $NS_A and $NS_B joined by veth va<->vb"
netns_add "$NS_A" "$NS_B"
netns_veth "$NS_A" va "$NS_B" vb
netns_addr_up "$NS_A" va "$V4_A/24" "$V6_A/64"
netns_addr_up "$NS_B" vb "$V4_B/24" "$V6_B/64"

attach() { # ns dev obj
    tc -n "$1" qdisc add dev "$2" clsact
    for dir in ingress egress; do
        tc -n "$1" filter add dev "$2" "$dir" bpf da obj "$3" sec "$SEC" ||
            die "tc could not attach $3 to $2 $dir"
    done
}
prog_id() { # ns dev dir
    tc -n "$1" filter show dev "$2" "$3" | grep -o ' id [0-9]*' | awk 'NR==1 {print $2}'
}

log "attaching $OBJ to vb ingress+egress in $NS_B"
attach "$NS_B" vb "$OBJ"
PROBE_IN=$(prog_id "$NS_B" vb ingress)
PROBE_OUT=$(prog_id "$NS_B" vb egress)
BASE_IN= BASE_OUT=
if [[ -n $BASE_OBJ ]]; then
    log "attaching baseline $BASE_OBJ to va ingress+egress in $NS_A"
    attach "$NS_A" va "$BASE_OBJ"
    BASE_IN=$(prog_id "$NS_A" va ingress)
    BASE_OUT=$(prog_id "$NS_A" va egress)
fi

# Sum of PARSE_STATS over CPUs, one "index count" line per key.
stats() { # prog_id
    local map
    # The program uses several maps: pick PARSE_STATS by name.
    map=$(for id in $(bpftool prog show id "$1" -j | jq '.map_ids[]'); do
        bpftool map show id "$id" -j
    done | jq -s 'map(select(.name == "PARSE_STATS")) | .[0].id')
    bpftool map dump id "$map" -j | jq -r '.[] | .formatted // . | "\(.key) \([.values[].value] | add)"'
}

sysctl -q -w kernel.bpf_stats_enabled=1
log "bpf_stats enabled; sending traffic"

if command -v ping >/dev/null; then
    ip netns exec "$NS_B" ping -c 5 -i 0.2 -W 1 "$V4_A" >/dev/null || die "ping $V4_A"
    ip netns exec "$NS_B" ping -6 -c 5 -i 0.2 -W 1 "$V6_A" >/dev/null || die "ping $V6_A"
    log "ping v4+v6: ok"
else
    log "ping not installed: ICMP skipped"
fi

if command -v iperf3 >/dev/null; then
    for target in "$V4_A" "$V6_A"; do
        ip netns exec "$NS_A" timeout 30 iperf3 -s -1 -B "$target" >/dev/null 2>&1 &
        IPERF_PID=$!
        sleep 0.5
        ip netns exec "$NS_B" timeout 20 iperf3 -c "$target" -n 4M >/dev/null || die "iperf3 TCP to $target"
        wait "$IPERF_PID" || true
        ip netns exec "$NS_A" timeout 30 iperf3 -s -1 -B "$target" >/dev/null 2>&1 &
        IPERF_PID=$!
        sleep 0.5
        ip netns exec "$NS_B" timeout 20 iperf3 -u -c "$target" -b 10M -l 200 -t 1 >/dev/null ||
            die "iperf3 UDP to $target"
        wait "$IPERF_PID" || true
        IPERF_PID=
    done
    log "iperf3 TCP 4 MB + UDP 1 s (200-byte datagrams), v4+v6: ok"
elif command -v python3 >/dev/null; then
    ip netns exec "$NS_A" timeout 20 python3 -c '
import socket
s = socket.create_server(("'"$V4_A"'", 5201)); c, _ = s.accept()
while c.recv(65536): pass' &
    IPERF_PID=$!
    sleep 0.5
    ip netns exec "$NS_B" timeout 20 python3 -c '
import socket
c = socket.create_connection(("'"$V4_A"'", 5201)); c.sendall(b"x" * (4 << 20)); c.close()'
    wait "$IPERF_PID" || true
    IPERF_PID=
    log "python3 TCP 4 MB v4: ok (install iperf3 for UDP and IPv6)"
else
    die "neither iperf3 nor python3 available to generate TCP traffic"
fi

report() { # label prog_id
    local tracked=0
    log "PARSE_STATS of $1 (prog id $2):"
    while read -r idx count; do
        printf '  %-18s %s\n' "${NAMES[$idx]:-index_$idx}" "$count" >&2
        [[ $idx -eq 0 ]] && tracked=$count
    done < <(stats "$2")
    [[ $tracked -gt 0 ]] || die "$1: tracked counter did not rise"
}
report "vb ingress" "$PROBE_IN"
report "vb egress" "$PROBE_OUT"

cost() { # prog_id -> "run_cnt run_time_ns"
    bpftool prog show id "$1" -j | jq -r '"\(.run_cnt // 0) \(.run_time_ns // 0)"'
}
per_packet() { # label id...
    local label=$1 cnt=0 ns=0 c t
    shift
    for id in "$@"; do
        read -r c t < <(cost "$id")
        cnt=$((cnt + c)) ns=$((ns + t))
    done
    [[ $cnt -gt 0 ]] || die "$label: run_cnt is 0"
    printf '%s %s %s\n' "$cnt" "$ns" "$(awk -v n="$ns" -v c="$cnt" 'BEGIN { printf "%.0f", n / c }')"
}
out=$(per_packet probe "$PROBE_IN" "$PROBE_OUT")
read -r P_CNT P_NS P_PER <<<"$out"
log "cost: probe-ebpf    $P_PER ns/packet ($P_CNT runs, $P_NS ns)"
if [[ -n $BASE_IN ]]; then
    out=$(per_packet baseline "$BASE_IN" "$BASE_OUT")
    read -r B_CNT B_NS B_PER <<<"$out"
    log "cost: tc-baseline   $B_PER ns/packet ($B_CNT runs, $B_NS ns)"
    log "cost: ratio probe/baseline $(awk -v p="$P_NS" -v pc="$P_CNT" -v b="$B_NS" -v bc="$B_CNT" \
        'BEGIN { printf "%.2f", (p / pc) / (b / bc) }')x"
fi
log "OK"
