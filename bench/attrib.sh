#!/usr/bin/env bash
# Attribution benchmark: what joining connections to processes costs while
# RATE connections per second (default 1000) come and go.
#
#   netns A: load client  ==veth==  netns B: echo server
#   `flowprobe run` in A (every interface), attribution on or off
#
# Each connection sends 100 bytes, reads the echo, stays open HOLD_MS (50)
# and closes. Rounds alternate the MODES (default `on nocg off`): `on`
# attribution with the socket-owner cgroup programs (cgroup/connect4|6,
# sendmsg4|6), `nocg` attribution without them (FLOWPROBE_ATTRIB_CONNECT=off:
# the state before them), `off` none (FLOWPROBE_ATTRIB=off). Per
# round it prints: connections per second achieved; flowprobe's process CPU
# (utime+stime from /proc/PID/stat over the load window, % of one core);
# with attribution on, the resolver's own CPU as the process measures it
# (thread CPU time of its passes, FLOWPROBE_ATTRIB_STATS=1) and the
# fraction of the load's connections whose both ends were attributed; with
# the cgroup programs, their in-kernel cost (kernel.bpf_stats_enabled=1:
# run_time_ns / run_cnt of the flowprobe_* cgroup_sock_addr and sock_ops
# programs, and run_time_ns over the load's connections; any process's
# connects run them, so the second figure is an upper bound).
#
# usage (root): bench/attrib.sh [ROUNDS]   (default 3; SECS=10, RATE=1000, HOLD_MS=50,
#   MODES="on nocg off")
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-${ROUNDS:-3}}
SECS=${SECS:-10}
RATE=${RATE:-1000}
HOLD_MS=${HOLD_MS:-50}
MODES=${MODES:-on nocg off}
NS_A=fp-abench-a-$$
NS_B=fp-abench-b-$$
PY=/usr/bin/python3

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 2; }
[[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces, tc)"
for t in ip tc jq bpftool "$PY"; do command -v "$t" >/dev/null || die "$t not found"; done

log "building flowprobe (release)"
cargo build --release --quiet -p flowprobe
FP=target/release/flowprobe
WORK=$(mktemp -d /tmp/flowprobe-abench.XXXXXX)
SERVER=
# shellcheck source=../scripts/lib/netns.sh
. scripts/lib/netns.sh
cleanup() {
    [[ -n $SERVER ]] && kill "$SERVER" 2>/dev/null || true
    netns_cleanup
    rm -rf "$WORK"
    sysctl -q -w kernel.bpf_stats_enabled="$OLD_STATS" >/dev/null || true
}
OLD_STATS=$(sysctl -n kernel.bpf_stats_enabled)
sysctl -q -w kernel.bpf_stats_enabled=1
trap cleanup EXIT

netns_add "$NS_A" "$NS_B"
netns_veth "$NS_A" fab0 "$NS_B" fab1
netns_addr_up "$NS_A" fab0 10.233.0.1/24
netns_addr_up "$NS_B" fab1 10.233.0.2/24
# Rounds leave 10000s of client sockets in TIME_WAIT (60 s): without these
# the client's port search slows down and later rounds miss the rate.
ip netns exec "$NS_A" sysctl -qw net.ipv4.ip_local_port_range="10000 65000" net.ipv4.tcp_tw_reuse=1
sleep 1

ip netns exec "$NS_B" "$PY" bench/attrib_load.py server 10.233.0.2:8080 "$WORK/ready" &
SERVER=$!
for _ in $(seq 100); do [[ -e $WORK/ready ]] && break; sleep 0.1; done
[[ -e $WORK/ready ]] || die "the server did not start"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)

round() { # MODE N
    local mode=$1 n=$2 attrib=on connect=on
    [[ $mode == off ]] && attrib=off
    [[ $mode == nocg ]] && connect=off
    FLOWPROBE_ATTRIB=$attrib FLOWPROBE_ATTRIB_CONNECT=$connect FLOWPROBE_ATTRIB_STATS=1 \
        ip netns exec "$NS_A" "$FP" run --format json --duration 600 \
        >"$WORK/$mode-$n.json" 2>"$WORK/$mode-$n.err" &
    local fp=$!
    for _ in $(seq 600); do
        ip netns exec "$NS_A" tc filter show dev fab0 egress | grep -q flowprobe_tc && break
        sleep 0.1
    done
    sleep 1
    local c0 t0 c1 t1
    c0=$(cpu_ticks "$fp"); t0=$(date +%s.%N)
    ip netns exec "$NS_A" "$PY" bench/attrib_load.py client 10.233.0.2:8080 "$RATE" "$SECS" "$HOLD_MS" "$WORK/load-$mode-$n.json"
    c1=$(cpu_ticks "$fp"); t1=$(date +%s.%N)
    # The cgroup programs of this run (loaded by it, gone with it).
    local cg
    cg=$(bpftool -j prog show | jq -r '[.[] | select((.type == "cgroup_sock_addr" or .type == "sock_ops")
            and (.name | startswith("flowprobe_")) and .run_cnt != null)]
        | "\(map(.run_time_ns) | add // 0) \(map(.run_cnt) | add // 0)"')
    kill -INT "$fp"; wait "$fp"
    local opened secs pct rate line frac
    opened=$(jq .opened "$WORK/load-$mode-$n.json")
    secs=$(jq .secs "$WORK/load-$mode-$n.json")
    rate=$(awk -v o="$opened" -v s="$secs" 'BEGIN{printf "%.0f", o/s}')
    pct=$(awk -v c="$((c1 - c0))" -v k="$TCK" -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", 100*c/k/(b-a)}')
    if [[ $mode != off ]]; then
        line=$(grep -o 'resolver CPU.*of one core' "$WORK/$mode-$n.err" || echo "resolver CPU ?")
        # Both ends attributed, among the load's connections (port 8080).
        frac=$(jq -s --slurpfile l "$WORK/load-$mode-$n.json" '
            ($l[0].ports | map({key: tostring, value: 1}) | from_entries) as $p
            | map(select(.dport == 8080 and ($p[.sport | tostring] // 0) == 1))
            | (map(select(.src_tags.pid != null and .dst_tags.pid != null)) | length) as $ok
            | "\($ok)/\(length)"' "$WORK/$mode-$n.json" | tr -d '"')
        local prog=""
        if [[ $mode == on ]]; then
            # shellcheck disable=SC2086
            prog=$(awk -v t="${cg% *}" -v c="${cg#* }" -v o="$opened" 'BEGIN{printf "  cgroup programs %.0f ns/call over %d calls, %.0f ns per load connection", (c ? t/c : 0), c, (o ? t/o : 0)}')
        fi
        printf 'round %d %-4s: %5s conn/s  flowprobe CPU %5s%%  %s  attributed (both ends) %s%s\n' "$n" "$mode" "$rate" "$pct" "$line" "$frac" "$prog"
    else
        printf 'round %d off : %5s conn/s  flowprobe CPU %5s%%\n' "$n" "$rate" "$pct"
    fi
}

log "RATE=$RATE/s SECS=$SECS HOLD_MS=$HOLD_MS, $ROUNDS rounds of: $MODES"
for n in $(seq "$ROUNDS"); do
    for m in $MODES; do
        round "$m" "$n"
    done
done
