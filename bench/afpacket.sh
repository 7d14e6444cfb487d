#!/usr/bin/env bash
# Capture-cost benchmark: iperf3 throughput over a veth between two fresh
# network namespaces with no capture, with `flowprobe run --backend
# afpacket` in the receiver's namespace, with `tcpdump -w /dev/null` on the
# receiver's veth, and with `tcpdump -s 256 -w /dev/null` (the snap length
# flowprobe uses); interleaved round by round, reported as medians, ratios
# to no capture, the capturing process's CPU time, and kernel drops.
#
# Usage: sudo bench/afpacket.sh [ROUNDS]     (default 5; or ROUNDS=N)
#
# Environment:
#   ROUNDS=5        timed rounds (each: none, afpacket, tc, tcpdump, tcpdump-s256)
#   SECS=5          iperf3 seconds per run
#   SKIP_BUILD=1    use the existing target/release/flowprobe
#   TC=0            leave out the tc backend (`flowprobe run --backend tc`,
#                   shown for comparison; its cost is in the kernel)
#   OFFLOADS=off    turn TSO/GSO/GRO off on both veth ends, so that every
#                   wire-size frame is a packet (about 40x the packets per
#                   second of the default, where the veth carries 64 KB
#                   GSO super-packets)
#
# Traffic stays inside the two namespaces it creates (fpb-a-PID, fpb-b-PID);
# nothing is attached in the root namespace. Exit 2 on a setup failure or
# a failed run.
set -euo pipefail

ROUNDS=${1:-${ROUNDS:-5}}
SECS=${SECS:-5}
OFFLOADS=${OFFLOADS:-on}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=../scripts/lib/netns.sh
. "$root/scripts/lib/netns.sh"
fp="$root/target/release/flowprobe"

die() { echo "afpacket.sh: $*" >&2; exit 2; }

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$ROUNDS'"
[[ $(id -u) == 0 ]] || die "needs root (network namespaces, AF_PACKET)"
for t in iperf3 tcpdump python3 ip; do
    command -v "$t" >/dev/null || die "needs $t (Debian: apt-get install iperf3 tcpdump)"
done
if [[ ${SKIP_BUILD:-} != 1 ]]; then
    (cd "$root" && cargo build --release -q -p flowprobe) || die "build failed"
fi
[[ -x $fp ]] || die "no $fp"

A=fpb-a-$$
B=fpb-b-$$
work=$(mktemp -d /tmp/flowprobe-afpbench.XXXXXX)
server_pid=
cleanup() {
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    netns_cleanup
    rm -rf "$work"
}
trap cleanup EXIT

netns_add "$A" "$B"
# Offloads stay on (the default).
netns_veth "$A" fpb0 "$B" fpb1
netns_addr_up "$A" fpb0 10.81.0.1/24
netns_addr_up "$B" fpb1 10.81.0.2/24
if [[ $OFFLOADS == off ]]; then
    command -v ethtool >/dev/null || die "OFFLOADS=off needs ethtool"
    ip netns exec "$A" ethtool -K fpb0 tso off gso off gro off >/dev/null
    ip netns exec "$B" ethtool -K fpb1 tso off gso off gro off >/dev/null
fi
netns_wait_carrier "$B" fpb1 || true

ip netns exec "$B" iperf3 -s -B 10.81.0.2 >"$work/server.log" 2>&1 &
server_pid=$!
sleep 0.5

# One iperf3 run: prints the receiver's bits per second.
iperf() {
    ip netns exec "$A" iperf3 -c 10.81.0.2 -t "$SECS" -J >"$work/client.json" 2>&1 ||
        die "iperf3 failed: $(tail -3 "$work/client.json")"
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"])' \
        "$work/client.json"
}

# Waits for N bound ETH_P_ALL packet sockets in namespace $B.
wait_rings() {
    local want=$1
    for _ in $(seq 200); do
        local n
        n=$(ip netns exec "$B" awk 'NR>1 && $4=="0003" && $6=="1"' /proc/net/packet | wc -l)
        ((n >= want)) && return 0
        sleep 0.05
    done
    die "capture did not start"
}

# CPU seconds (user + system, all threads) process $1 has used.
cpu_s() {
    awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"
}

cpus=$(nproc)
declare -A bps drops cpu
run_none() { bps[none]+="$(iperf) "; drops[none]+="0 "; cpu[none]+="0 "; }
run_afpacket() {
    ip netns exec "$B" "$fp" run --backend afpacket --iface fpb1 >/dev/null 2>"$work/fp.err" &
    local pid=$!
    wait_rings "$cpus"
    bps[afpacket]+="$(iperf) "
    cpu[afpacket]+="$(cpu_s "$pid") "
    kill -INT "$pid"
    wait "$pid" || die "flowprobe failed: $(cat "$work/fp.err")"
    # "... kernel: P packets, D dropped, ..."
    local d
    d=$(sed -n 's/.*kernel: [0-9]* packets, \([0-9]*\) dropped.*/\1/p' "$work/fp.err")
    [[ -n $d ]] || die "no drop count in: $(cat "$work/fp.err")"
    drops[afpacket]+="$d "
    echo "  afpacket: $(cat "$work/fp.err")" >&2
}
# The tc backend, for comparison (skipped with TC=0): its per-packet work
# runs in the kernel and is charged to the traffic, not to flowprobe.
run_tc() {
    ip netns exec "$B" "$fp" run --backend tc --iface fpb1 >/dev/null 2>"$work/tc.err" &
    local pid=$!
    for _ in $(seq 200); do
        ip netns exec "$B" tc filter show dev fpb1 egress | grep -q flowprobe_tc && break
        sleep 0.05
    done
    ip netns exec "$B" tc filter show dev fpb1 egress | grep -q flowprobe_tc ||
        die "the tc backend did not attach: $(cat "$work/tc.err")"
    bps[tc]+="$(iperf) "
    cpu[tc]+="$(cpu_s "$pid") "
    kill -INT "$pid"
    wait "$pid" || die "flowprobe --backend tc failed: $(cat "$work/tc.err")"
    # The tc backend never drops a packet; lost counts would be map events.
    drops[tc]+="$(grep -c 'not counted' "$work/tc.err" || true) "
    echo "  tc: $(cat "$work/tc.err")" >&2
}
# run_tcpdump NAME [tcpdump options]
run_tcpdump() {
    local name=$1
    shift
    ip netns exec "$B" tcpdump -i fpb1 "$@" -w /dev/null 2>"$work/td.err" &
    local pid=$!
    wait_rings 1
    bps[$name]+="$(iperf) "
    cpu[$name]+="$(cpu_s "$pid") "
    kill -INT "$pid"
    wait "$pid" || true
    local d
    d=$(sed -n 's/^\([0-9]*\) packets\{0,1\} dropped by kernel.*/\1/p' "$work/td.err")
    [[ -n $d ]] || die "no drop count in: $(cat "$work/td.err")"
    drops[$name]+="$d "
    echo "  $name: $(grep -E 'captured|received|dropped' "$work/td.err" | tr '\n' ' ')" >&2
}

echo "afpacket.sh: $ROUNDS rounds of ${SECS} s iperf3 over a veth (offloads $OFFLOADS), $cpus CPUs, $(uname -r)" >&2
for r in $(seq "$ROUNDS"); do
    echo "round $r" >&2
    run_none
    run_afpacket
    [[ ${TC:-1} == 0 ]] || run_tc
    run_tcpdump tcpdump
    run_tcpdump tcpdump-s256 -s 256
done

modes=(none afpacket)
[[ ${TC:-1} == 0 ]] || modes+=(tc)
modes+=(tcpdump tcpdump-s256)
args=()
for m in "${modes[@]}"; do args+=("$m" "${bps[$m]}" "${cpu[$m]}" "${drops[$m]}"); done
python3 - "${args[@]}" <<'EOF'
import statistics, sys
rows = [sys.argv[i:i + 4] for i in range(1, len(sys.argv), 4)]
base = statistics.median(float(x) for x in rows[0][1].split())
print(f"{'capture':<13} {'Gbit/s':>7} {'min-max':>13} {'vs none':>7} {'CPU s/run':>9} {'drops (max/run)':>15}")
for name, b, c, d in rows:
    b = [float(x) for x in b.split()]
    c = [float(x) for x in c.split()]
    d = [int(x) for x in d.split()]
    m = statistics.median(b)
    print(f"{name:<13} {m/1e9:>7.2f} {min(b)/1e9:>6.2f}-{max(b)/1e9:<6.2f} {m/base:>7.3f} "
          f"{statistics.median(c):>9.2f} {max(d):>15}")
EOF
