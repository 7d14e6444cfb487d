#!/usr/bin/env bash
# Nothing lost under churn: short TCP connections at a fixed rate through a
# veth, `flowprobe run --export-jsonl F --listen …` counting them, and every
# connection the client made looked for in the final output and in the
# export (delta lines summed per record).
#
#   netns A: churn.py client, flowprobe run --iface fch0  ==veth==  netns B: churn.py server
#
# Connection i writes 1 + i % 1499 bytes, the server answers twice that and
# closes (bench/churn.py, asyncio). The client closes first, so its ports
# go through TIME_WAIT; with net.ipv4.tcp_tw_reuse=1 (TW_REUSE, as on many
# busy hosts) the kernel gives a port in TIME_WAIT to a new connection to
# the same server after a second: at 1000 a second over the default
# 28232 ports, 4-tuples come back within seconds (without it the client
# runs out of ports at about 470 a second). Per round it prints: connections made, found in
# the final output and in the export (exactly once, both byte counts
# equal), what /health counted as lost, flowprobe's CPU over the load
# (utime+stime from /proc/PID/stat, % of one core) and its RSS at the end
# of the load (VmRSS) and at its peak (VmHWM).
#
# usage (root): bench/churn.sh [ROUNDS]   (default 1)
#   RATE=400 SECS=120 BACKENDS="tc afpacket" FPS="target/release/flowprobe"
#   PORTS="32768 60999" (the client's ephemeral range; narrow it to make
#   4-tuples come back sooner), TW_REUSE=1, SKIP_BUILD=1, KEEP=DIR (keep
#   the files), FP_ARGS="--keep-ended 30" (more flags for `run`; each
#   binary in FPS gets them, so leave them out when comparing with one
#   that lacks them).
# The final output must list every connection: --list-max is raised
#   (LIST_MAX, default 100000000; LIST_MAX= leaves the flag out, for
#   builds older than it).
# RSS is also sampled every 10 s of the load ("RSS over time"): flat after
# the first --keep-ended window is the bound working.
# Several binaries in FPS (before/after) run interleaved, round by round.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-${ROUNDS:-1}}
SECS=${SECS:-120}
RATE=${RATE:-400}
BACKENDS=${BACKENDS:-tc}
FPS=${FPS:-target/release/flowprobe}
LIST_MAX=${LIST_MAX-100000000}
PORTS=${PORTS:-32768 60999}
TW_REUSE=${TW_REUSE:-1}
NS_A=fp-churn-a-$$
NS_B=fp-churn-b-$$
PY=/usr/bin/python3
DPORT=8080

log() { printf 'churn: %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 2; }
[[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces, tc)"
for t in ip tc jq curl "$PY"; do command -v "$t" >/dev/null || die "$t not found"; done

if [[ -z ${SKIP_BUILD:-} ]]; then
    log "building flowprobe (release)"
    cargo build --release --quiet -p flowprobe
fi
WORK=${KEEP:-$(mktemp -d /tmp/flowprobe-churn.XXXXXX)}
mkdir -p "$WORK"
SERVER=
# shellcheck source=../scripts/lib/netns.sh
. scripts/lib/netns.sh
cleanup() {
    [[ -n $SERVER ]] && kill "$SERVER" 2>/dev/null || true
    netns_cleanup
    [[ -n ${KEEP:-} ]] || rm -rf "$WORK"
}
trap cleanup EXIT

netns_add "$NS_A" "$NS_B"
netns_veth "$NS_A" fch0 "$NS_B" fch1
netns_addr_up "$NS_A" fch0 10.234.0.1/24
netns_addr_up "$NS_B" fch1 10.234.0.2/24
netns_wait_carrier "$NS_A" fch0 || die "no carrier on fch0"
ip netns exec "$NS_A" sysctl -qw net.ipv4.ip_local_port_range="$PORTS" net.ipv4.tcp_tw_reuse="$TW_REUSE"

ip netns exec "$NS_B" "$PY" bench/churn.py server 10.234.0.2:$DPORT "$WORK/ready" &
SERVER=$!
for _ in $(seq 100); do [[ -e $WORK/ready ]] && break; sleep 0.1; done
[[ -e $WORK/ready ]] || die "the server did not start"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
TCK=$(getconf CLK_TCK)

round() { # FP BACKEND N
    local fp_bin=$1 backend=$2 n=$3 tag
    tag=$(tr -c 'a-zA-Z0-9\n' _ <<<"$fp_bin")-$backend-$n
    rm -f "$WORK/$tag.jsonl"
    ip netns exec "$NS_A" "$fp_bin" run --backend "$backend" --iface fch0 --format json \
        --listen 127.0.0.1:9477 --export-jsonl "$WORK/$tag.jsonl" ${LIST_MAX:+--list-max $LIST_MAX} ${FP_ARGS:-} \
        >"$WORK/$tag.json" 2>"$WORK/$tag.err" &
    local fp=$!
    # Counting from the first connection: the first reading comes after the
    # source started (attached, rings open).
    for _ in $(seq 600); do
        ip netns exec "$NS_A" curl -sf http://127.0.0.1:9477/health 2>/dev/null |
            grep -q "\"backend\":\"$backend\"" && break
        sleep 0.1
    done
    sleep 1
    local c0 t0 c1 t1 rss hwm
    c0=$(cpu_ticks "$fp"); t0=$(date +%s.%N)
    ( while sleep 10; do kb "$fp" VmRSS || break; done ) >"$WORK/$tag.rss" 2>/dev/null &
    local sampler=$!
    ip netns exec "$NS_A" "$PY" bench/churn.py client 10.234.0.2:$DPORT "$RATE" \
        "$(awk -v r="$RATE" -v s="$SECS" 'BEGIN{printf "%d", r*s}')" "$WORK/$tag.made.json" \
        2>"$WORK/$tag.client.err"
    c1=$(cpu_ticks "$fp"); t1=$(date +%s.%N)
    rss=$(kb "$fp" VmRSS)
    kill "$sampler" 2>/dev/null || true
    sleep 4 # the last connections drained (closed timeout 2 s)
    ip netns exec "$NS_A" curl -sf http://127.0.0.1:9477/health >"$WORK/$tag.health" || true
    hwm=$(kb "$fp" VmHWM)
    kill -INT "$fp"; wait "$fp" || die "flowprobe failed: $(cat "$WORK/$tag.err")"
    local res pct
    res=$("$PY" bench/churn.py check "$WORK/$tag.made.json" "$WORK/$tag.json" "$WORK/$tag.jsonl" $DPORT || true)
    echo "$res" >"$WORK/$tag.check.json"
    pct=$(awk -v c="$((c1 - c0))" -v k="$TCK" -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", 100*c/k/(b-a)}')
    printf '%-28s made %6s (%s failed) in %5ss (%s reused ports)  final %6s (missing %4s extra %4s)  export %6s (missing %4s extra %4s)  lost %s  CPU %5s%%  RSS %s MB (peak %s MB)\n' \
        "$tag" "$(jq .made <<<"$res")" "$(jq .failed <<<"$res")" "$(jq .secs <<<"$res")" "$(jq .reused <<<"$res")" \
        "$(jq .final.matching <<<"$res")" "$(jq .final.missing <<<"$res")" "$(jq .final.extra <<<"$res")" \
        "$(jq .export.matching <<<"$res")" "$(jq .export.missing <<<"$res")" "$(jq .export.extra <<<"$res")" \
        "$(jq -c '[.. | objects | to_entries[] | select((.key | test("full|insert_failed|drop|lost|unwritten")) and (.value | type == "number") and .value > 0) | "\(.key)=\(.value)"] | join(",")' "$WORK/$tag.health" 2>/dev/null || echo '?')" \
        "$pct" "$((rss / 1024))" "$((hwm / 1024))"
    printf '%-28s RSS over time (MB, every 10 s): %s\n' "$tag" "$(awk '{printf "%d ", $1/1024}' "$WORK/$tag.rss")"
}

log "RATE=$RATE/s SECS=$SECS PORTS='$PORTS' TW_REUSE=$TW_REUSE BACKENDS='$BACKENDS' FPS='$FPS', $ROUNDS rounds"
for n in $(seq "$ROUNDS"); do
    for fp_bin in $FPS; do
        for b in $BACKENDS; do
            round "$fp_bin" "$b" "$n"
        done
    done
done
