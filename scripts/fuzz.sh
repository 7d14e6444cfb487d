#!/usr/bin/env bash
# The fuzz targets (fuzz/fuzz_targets/): the frame parser with the tracker
# and flow table (parse_frame), the pcap/pcapng reader (capture), the query
# language with the rollups (query) and the config file (config).
#
#   scripts/fuzz.sh [RUNS]     # default 10000000 executions per target
#   scripts/fuzz.sh 0          # replay the corpora and crash inputs only
#                              # (the regression check scripts/test.sh runs)
#
# Needs nightly and cargo-fuzz (`cargo install cargo-fuzz`). Corpora live in
# fuzz/corpus/TARGET (seeded from fixtures/ on first use, then what
# libFuzzer found, minimised with `cargo fuzz cmin`); any crash input is kept
# in fuzz/regressions/TARGET and replayed by every later run. Prints, per
# target, the executions done and the crashes found (the script fails on any).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-10000000}
TARGETS=${TARGETS:-parse_frame capture query config}

seed() { # TARGET
    local dir=fuzz/corpus/$1
    [ -n "$(ls -A "$dir" 2>/dev/null)" ] && return 0
    mkdir -p "$dir"
    case $1 in
    capture) cp fixtures/pcaps/tcp4_keepalive.pcap fixtures/pcaps/tcp4_synfin_drop.pcap "$dir/" ;;
    config) cp dist/flowprobe.toml "$dir/" ;;
    query) printf 'service\001port\001dst.port in (80, 443)\001bytes\0013\0011..3' >"$dir/q1"
           printf 'ip/24\001\001src.ip in 10.0.0.0/8 and not dst.service = db\001rtt_p99:asc\001\001\0015m' >"$dir/q2" ;;
    parse_frame) : ;;
    esac
}

cargo +nightly fuzz build -O >/dev/null
failed=0
for t in $TARGETS; do
    seed "$t"
    mkdir -p "fuzz/regressions/$t"
    # Earlier crash inputs first: each must pass now.
    if [ -n "$(ls -A "fuzz/regressions/$t")" ]; then
        cargo +nightly fuzz run -O "$t" "fuzz/regressions/$t" -- -runs=0 >/dev/null 2>"target/fuzz-$t.log" ||
            { echo "fuzz $t: a kept crash input fails again (target/fuzz-$t.log)"; failed=1; continue; }
    fi
    log=target/fuzz-$t.log
    if cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" -- -runs="$RUNS" -artifact_prefix="fuzz/regressions/$t/" \
        >"$log" 2>&1; then
        done_runs=$(grep -oE 'Done [0-9]+ runs' "$log" | tail -1 | grep -oE '[0-9]+' || echo 0)
        if [ "$RUNS" = 0 ]; then
            echo "fuzz $t: the corpus ($(ls "fuzz/corpus/$t" | wc -l) inputs) and kept crash inputs pass"
        else
            echo "fuzz $t: $done_runs executions, 0 crashes (corpus: $(ls "fuzz/corpus/$t" | wc -l) inputs)"
        fi
    else
        echo "fuzz $t: CRASH, input kept in fuzz/regressions/$t/ ($log)"
        failed=1
    fi
done
exit $failed
