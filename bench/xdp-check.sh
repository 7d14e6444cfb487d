#!/usr/bin/env bash
# Repeats what `bench/tc.sh`'s `xdp` mode checks, printing each run's data
# connection as flowprobe reported it, to study the rounds where its byte
# check fails (bench/README.md, session 4): `b` is every payload byte XDP
# saw, `new` those not counted as retransmitted, `iperf` what iperf3 sent
# (b = iperf + 37 means XDP saw each byte once, so new < b is a tracker
# error).
#
# usage (root): bench/xdp-check.sh [FLOWPROBE] [ROUNDS]
#   FLOWPROBE defaults to target/release/flowprobe (build it first);
#   PIN="taskset -c 0" runs both iperf3 ends on one CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
FP=${1:-target/release/flowprobe}
ROUNDS=${2:-5}
PIN=${PIN:-}
[[ $(id -u) -eq 0 ]] || { echo "xdp-check: must run as root" >&2; exit 2; }
A=fp-xdpc-a-$$ B=fp-xdpc-b-$$
WORK=$(mktemp -d /tmp/flowprobe-xdpc.XXXXXX)
SERVER=
cleanup() {
    [[ -n $SERVER ]] && kill "$SERVER" 2>/dev/null || true
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "$A"
ip netns add "$B"
ip -n "$A" link add va type veth peer name vb netns "$B"
ip -n "$A" addr add 10.233.0.1/24 dev va
ip -n "$B" addr add 10.233.0.2/24 dev vb
for n in "$A" "$B"; do ip -n "$n" link set lo up; done
ip -n "$A" link set va up
ip -n "$B" link set vb up
# shellcheck disable=SC2086
ip netns exec "$B" $PIN iperf3 -s -B 10.233.0.2 >/dev/null 2>&1 &
SERVER=$!
sleep 0.5
for r in $(seq "$ROUNDS"); do
    ip netns exec "$B" "$FP" run --backend xdp --iface vb --format json \
        >"$WORK/fp.json" 2>"$WORK/fp.err" &
    fp=$!
    # The program shows on the link before the veth passes traffic through
    # it again (attaching XDP restarts the veth's queues): give it time.
    sleep 2.5
    # shellcheck disable=SC2086
    ip netns exec "$A" $PIN iperf3 -c 10.233.0.2 -t 5 -J >"$WORK/iperf.json"
    kill -INT "$fp"
    wait "$fp"
    sent=$(jq '.end.sum_sent.bytes' "$WORK/iperf.json")
    jq -c --argjson s "$sent" --arg r "$r" \
        'select(.dport == 5201 and .sent.packets > 1000)
         | {round: $r, packets: .sent.packets, b: .sent.bytes, new: (.sent.bytes - .sent.retransmitted_bytes),
            retransmits: .sent.retransmits, gaps: .sent.gaps, iperf: $s}' "$WORK/fp.json"
done
