#!/usr/bin/env bash
# The fleet at scale (no root): a nats-server -js on a free loopback port
# with its store in a temp dir, `flowprobe fleet` consuming, and
# `fleet-load` publishing HOSTS simulated hosts × INTERVALS intervals of
# ROWS rows each (docs/fleet.md's schema 1; half the rows have a
# counterpart on another simulated host). With CONNS (> ROWS) each host
# stands for CONNS groups of connections and folds those beyond ROWS, as
# an agent with --fleet-top ROWS does. Reports the publish rate, the time
# until the fleet holds everything, the fleet's CPU seconds, peak RSS and
# memory per row held, and the latency of `flowprobe query` (median of
# QUERIES) over the joined window; the bounds in /metrics must show
# nothing refused. FP= another flowprobe binary (a before/after).
#
#   bash bench/fleet.sh                       # 1000 hosts x 300 rows x 3
#   HOSTS=1000 CONNS=10000 ROWS=1000 INTERVALS=3 bash bench/fleet.sh
set -euo pipefail
cd "$(dirname "$0")/.."

HOSTS=${HOSTS:-1000}
ROWS=${ROWS:-300}
CONNS=${CONNS:-$ROWS}
INTERVALS=${INTERVALS:-3}
QUERIES=${QUERIES:-5}
FP=${FP:-target/release/flowprobe}
LOAD=${LOAD:-target/release/fleet-load}
[ -x "$FP" ] || cargo build --release -q -p flowprobe
[ -x "$LOAD" ] || cargo build --release -q -p flowprobe-bench --bin fleet-load
command -v nats-server >/dev/null || { echo "needs nats-server (apt-get install nats-server)" >&2; exit 1; }

tmp=$(mktemp -d /tmp/flowprobe-fleet-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NP=$(free_port)
HP=$(free_port)
nats-server -js -a 127.0.0.1 -p "$NP" -sd "$tmp/js" >"$tmp/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NP") 2>/dev/null && break; sleep 0.1; done

# The stream holds every message (about 0.55 kB per row), so that none
# goes before the fleet read it.
"$FP" fleet --nats "nats://127.0.0.1:$NP" --listen "127.0.0.1:$HP" --window 3600 \
    --max-hosts $((HOSTS + 10)) --stream-max-bytes $(((1 << 30) + HOSTS * ROWS * INTERVALS * 1000)) \
    2>"$tmp/fleet.err" &
fleet=$!
pids+=($fleet)
get() { python3 -c "import sys,urllib.request; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$HP$1', timeout=60).read().decode())"; }
for _ in $(seq 100); do get /health >/dev/null 2>&1 && break; sleep 0.1; done
# The fleet makes the stream when it connects.
for _ in $(seq 100); do get /health 2>/dev/null | grep -q '"connected":true' && break; sleep 0.1; done

cpu() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }
cpu0=$(cpu "$fleet")
rss0=$(awk '/VmRSS/ {print $2 / 1024}' "/proc/$fleet/status")
t0=$(date +%s.%N)
"$LOAD" --nats "nats://127.0.0.1:$NP" --hosts "$HOSTS" --rows "$ROWS" --conns "$CONNS" \
    --intervals "$INTERVALS" | tee "$tmp/load.out"
want=$((HOSTS * INTERVALS))
while :; do
    n=$(get /health | python3 -c 'import json,sys; print(json.load(sys.stdin)["stats"]["accepted"])')
    [ "$n" -ge "$want" ] && break
    sleep 0.2
done
# The answer is rebuilt after the last message: wait until it has every
# row (each is counted and tagged one way, or left to its client's row).
joined() {
    get /metrics | awk '/^flowprobe_fleet_(remote_ends|joined_rows)[{ ]/ {s += $NF} END {printf "%d\n", s}'
}
while [ "$(joined)" -lt $((HOSTS * ROWS * INTERVALS)) ]; do sleep 0.2; done
t1=$(date +%s.%N)
sleep 1
cpu1=$(cpu "$fleet")
lat=()
for _ in $(seq "$QUERIES"); do
    s=$(date +%s.%N)
    "$FP" query --agent "127.0.0.1:$HP" --src service --dst service --top 20 >/dev/null
    e=$(date +%s.%N)
    lat+=("$(echo "$e - $s" | bc)")
done
med=$(printf '%s\n' "${lat[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
rss=$(awk '/VmHWM/ {print $2 / 1024}' "/proc/$fleet/status")
# ANSWERS=FILE: the answers to compare between two binaries (same load).
if [ -n "${ANSWERS:-}" ]; then
    for q in "--src service --dst service" "--src host,view --dst host --top 50" \
        "--src service --dst service,unresolved --sort rtt_p99" "--src ip --dst ip,port --top 200"; do
        echo "# $q"
        # shellcheck disable=SC2086
        "$FP" query --agent "127.0.0.1:$HP" $q --format json
    done >"$ANSWERS"
fi
get /metrics >"$tmp/metrics"
refused=$(grep -E '^flowprobe_fleet_(hosts_refused|too_old|endpoints_refused)_total |^flowprobe_fleet_rejected_total' "$tmp/metrics" | awk '{s += $2} END {print s + 0}')
folded=$(awk '/^flowprobe_fleet_folded_groups / {print $2}' "$tmp/metrics")
rows=$((HOSTS * ROWS * INTERVALS))
# Only a fleet with the packed store says these.
packed=$(awk '/^flowprobe_fleet_row_bytes / {print $2}' "$tmp/metrics")
sets=$(awk '/^flowprobe_fleet_tag_sets / {print $2}' "$tmp/metrics")
echo
printf 'hosts %s x %s groups of connections, rows per message %s, intervals %s: %s rows\n' \
    "$HOSTS" "$CONNS" "$ROWS" "$INTERVALS" "$rows"
printf 'all consumed and joined %.1f s after publishing began; fleet CPU %.1f s; fleet peak RSS %.0f MiB (idle before: %.0f MiB)\n' \
    "$(echo "$t1 - $t0" | bc)" "$(echo "$cpu1 - $cpu0" | bc)" "$rss" "$rss0"
printf 'memory per row held: %.0f bytes (peak RSS less idle, over rows); packed rows: %s bytes per row; tag sets: %s\n' \
    "$(echo "($rss - $rss0) * 1048576 / $rows" | bc -l)" \
    "$([ -n "$packed" ] && echo "scale=1; $packed / $rows" | bc || echo n/a)" "${sets:-n/a}"
printf 'query --src service --dst service --top 20: median %.3f s of %s\n' "$med" "$QUERIES"
printf 'refused or rejected: %s; groups folded by --max-groups: %s; consumer sessions started again: %s\n' \
    "$refused" "$folded" "$(grep -c 'trying again' "$tmp/fleet.err" || true)"
[ "$refused" = 0 ] || { echo "FAIL: a bound refused messages" >&2; exit 1; }
