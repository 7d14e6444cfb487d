#!/usr/bin/env bash
# Userspace memory per connection open at once (issue 16's bound: 256
# bytes): N TCP connections opened through a veth and held, `flowprobe run
# --listen` counting them in netns A. Per mode it prints the agent's RSS
# before the connections (after its first readings) and with all N open
# (after TICKS readings), and the difference per connection; softflowd on
# the same interface is the peer (its flow table holds the same N flows).
# Modes run interleaved, round by round; quote the medians.
#
#   netns A: open.py client, flowprobe run --iface fop0  ==veth==  netns B: open.py server
#
# usage (root): bench/open.sh [ROUNDS]   (default 3)
#   N=20000 MODES="tc afpacket softflowd" FP=target/release/flowprobe
#   TICKS=25 SAMPLES=5 SKIP_BUILD=1 FP_ARGS="..." (more flags for `run`)
# With N open, RSS is read SAMPLES times a second apart: the median is the
# figure, the largest is said beside it.
# TICKS (seconds, one reading each) spans two of attribution's socket dumps
# (every 10 s), which meet every socket: fewer can miss what they keep.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-${ROUNDS:-3}}
N=${N:-20000}
MODES=${MODES:-tc afpacket softflowd}
FP=${FP:-target/release/flowprobe}
TICKS=${TICKS:-25}
SAMPLES=${SAMPLES:-5}
NS_A=fp-open-a-$$
NS_B=fp-open-b-$$
PY=/usr/bin/python3
log() { printf 'open: %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 2; }
[[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces, tc)"
for t in ip curl "$PY"; do command -v "$t" >/dev/null || die "$t not found"; done
if [[ $MODES == *softflowd* ]] && ! command -v softflowd >/dev/null; then
    die "softflowd not found (apt-get install softflowd), or leave it out of MODES"
fi
[[ -n ${SKIP_BUILD:-} ]] || cargo build --release --quiet -p flowprobe
# A process may hold fewer descriptors than N (20000 here, without
# CAP_SYS_RESOURCE): the connections are spread over CHUNK-sized pairs of
# processes, one server port each.
CHUNK=8000
CHUNKS=$(((N + CHUNK - 1) / CHUNK))

WORK=$(mktemp -d /tmp/flowprobe-open.XXXXXX)
SERVERS=()
# shellcheck source=../scripts/lib/netns.sh
. scripts/lib/netns.sh
cleanup() {
    for p in "${SERVERS[@]}"; do kill "$p" 2>/dev/null || true; done
    netns_cleanup
    rm -rf "$WORK"
}
trap cleanup EXIT

netns_add "$NS_A" "$NS_B"
netns_veth "$NS_A" fop0 "$NS_B" fop1
netns_addr_up "$NS_A" fop0 10.233.0.1/24
netns_addr_up "$NS_B" fop1 10.233.0.2/24
netns_wait_carrier "$NS_A" fop0 || die "no carrier on fop0"
ip netns exec "$NS_A" sysctl -qw net.ipv4.ip_local_port_range="10000 60999"
# Servers of one round (they hold what they accept until killed).
start_servers() {
    SERVERS=()
    rm -f "$WORK"/ready*
    for c in $(seq 0 $((CHUNKS - 1))); do
        ip netns exec "$NS_B" "$PY" bench/open.py server 10.233.0.2:$((7000 + c)) "$WORK/ready$c" &
        SERVERS+=($!)
        for _ in $(seq 100); do [[ -e $WORK/ready$c ]] && break; sleep 0.1; done
        [[ -e $WORK/ready$c ]] || die "server $c did not start"
    done
}
stop_servers() {
    for p in "${SERVERS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${SERVERS[@]}"; do wait "$p" 2>/dev/null || true; done
}

kb() { awk '$1 == "VmRSS:" {print $2}' "/proc/$1/status"; }

round() { # MODE
    local mode=$1 pid before after
    start_servers
    case $mode in
    softflowd)
        # -d: foreground; flows expire only after a day, so all N stay.
        ip netns exec "$NS_A" softflowd -d -i fop0 -n 127.0.0.1:9 -m $((N * 2)) \
            -t general=86400 -t tcp=86400 >/dev/null 2>&1 &
        pid=$!
        sleep 3
        ;;
    *)
        ip netns exec "$NS_A" "$FP" run --backend "$mode" --iface fop0 --format json --quiet \
            --listen 127.0.0.1:9478 ${FP_ARGS:-} >/dev/null 2>"$WORK/$mode.err" &
        pid=$!
        for _ in $(seq 600); do
            ip netns exec "$NS_A" curl -sf http://127.0.0.1:9478/health 2>/dev/null |
                grep -q "\"backend\":\"$mode\"" && break
            sleep 0.1
        done
        sleep 2
        ;;
    esac
    before=$(kb "$pid")
    rm -f "$WORK"/done*
    mkfifo "$WORK/hold" 2>/dev/null || true
    local clients=() c n left=$N
    for c in $(seq 0 $((CHUNKS - 1))); do
        n=$((left < CHUNK ? left : CHUNK)); left=$((left - n))
        ip netns exec "$NS_A" "$PY" bench/open.py client 10.233.0.2:$((7000 + c)) "$n" "$WORK/done$c" <"$WORK/hold" &
        clients+=($!)
    done
    exec 7>"$WORK/hold"
    for c in $(seq 0 $((CHUNKS - 1))); do
        for _ in $(seq 1200); do [[ -e $WORK/done$c ]] && break; sleep 0.1; done
        [[ -e $WORK/done$c ]] || die "client $c did not open its connections"
    done
    sleep "$TICKS"
    # The median of SAMPLES readings a second apart: one reading can fall
    # in a tick (two listings held) or a socket dump; the largest is said
    # too.
    local samples=() i
    for i in $(seq "$SAMPLES"); do
        samples+=("$(kb "$pid")")
        [[ $i -eq $SAMPLES ]] || sleep 1
    done
    after=$(printf '%s\n' "${samples[@]}" | sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}')
    most=$(printf '%s\n' "${samples[@]}" | sort -n | tail -1)
    exec 7>&-
    for c in "${clients[@]}"; do wait "$c" || true; done
    # SIGTERM: softflowd's SIGINT handling ends this script too.
    kill "$pid"; wait "$pid" || true
    stop_servers
    printf '%-10s N %6d  RSS before %7d kB  with N open %7d kB  per open connection %6d bytes (largest of %d readings: %d)\n' \
        "$mode" "$N" "$before" "$after" "$(((after - before) * 1024 / N))" "$SAMPLES" "$(((most - before) * 1024 / N))"
    sleep 3
}

log "N=$N MODES='$MODES' FP=$FP TICKS=$TICKS, $ROUNDS rounds"
for _ in $(seq "$ROUNDS"); do
    for m in $MODES; do round "$m"; done
done
