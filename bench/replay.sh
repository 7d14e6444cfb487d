#!/usr/bin/env bash
# Replay benchmark: `flowprobe replay` against `softflowd -r` on the same
# synthetic captures, interleaved round by round, reported as median wall
# time, Mpps and speed ratio.
#
# Usage: bench/replay.sh [ROUNDS]        (default 7; or ROUNDS=N in the env)
#
# Environment:
#   ROUNDS=7            timed rounds
#   FRAMES=1000000      frames per capture (passed to gen-capture --frames)
#   CONNS=3000          concurrent connections in the "many" capture
#   SKIP_BUILD=1        use the existing target/release binaries
#   REGEN=1             regenerate the captures even if cached
#   SF_EXPORT=127.0.0.1:9   where softflowd sends NetFlow (must be loopback)
#   TIMEOUT=60          seconds before one run is declared hung
#
# Exit status: 0 if flowprobe is at least as fast as softflowd on every
# capture (median vs median), 1 if it is slower on any, 2 on setup/check
# failure (a tool failed, hung, or did not process every frame).
#
# softflowd note: softflowd 1.1.0 never initialises its poll array in -r
# mode but still tests pl[1].revents when a control socket is open. In the
# Debian build that stack slot holds leftover bytes of the control socket
# path, so `-r FILE ... -c PATH` with a PATH of 13+ characters blocks in
# accept() before reading a packet. `-r` alone already disables the control
# socket (-r sets it to NULL; only a later -c re-enables it); we pass
# `-c none` to make that explicit. See bench/README.md.
set -euo pipefail

ROUNDS=${1:-${ROUNDS:-7}}
FRAMES=${FRAMES:-1000000}
CONNS=${CONNS:-3000}
SF_EXPORT=${SF_EXPORT:-127.0.0.1:9}
TIMEOUT=${TIMEOUT:-60}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
data="$here/data"
fp="$root/target/release/flowprobe"
gen="$root/target/release/gen-capture"

die() { echo "replay.sh: $*" >&2; exit 2; }

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$ROUNDS'"
case $SF_EXPORT in
    127.*:*) ;;
    *) die "SF_EXPORT must be a 127.0.0.0/8 address:port, got '$SF_EXPORT'" ;;
esac

# --- tools -----------------------------------------------------------------
need_pkgs=()
command -v softflowd >/dev/null || need_pkgs+=(softflowd)
command -v capinfos  >/dev/null || need_pkgs+=(wireshark-common)
if ((${#need_pkgs[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "installing ${need_pkgs[*]} ..." >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq "${need_pkgs[@]}" >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null && apt-get install -y -qq "${need_pkgs[@]}" >/dev/null; } ||
            die "could not install ${need_pkgs[*]}"
    else
        die "missing: ${need_pkgs[*]} (apt-get install ${need_pkgs[*]})"
    fi
fi
sf_version=$(softflowd -h 2>&1 | sed -n 's/.*softflowd version \([^ .]*\.[^ .]*\.[^ .]*\).*/\1/p' | head -1)

# --- build -----------------------------------------------------------------
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    echo "building release binaries ..." >&2
    (cd "$root" && cargo build --release --quiet -p flowprobe -p flowprobe-bench) ||
        die "cargo build failed"
fi
[[ -x $fp && -x $gen ]] || die "missing $fp or $gen (build first)"

# --- captures --------------------------------------------------------------
mkdir -p "$data"
declare -A frames
for shape in bulk many; do
    f="$data/$shape.pcap"
    params="$shape frames=$FRAMES conns=$CONNS"
    if [[ ${REGEN:-0} == 1 || ! -s $f || $gen -nt $f ||
          "$(cat "$f.params" 2>/dev/null)" != "$params" ]]; then
        echo "generating $f ..." >&2
        args=(--frames "$FRAMES")
        [[ $shape == many ]] && args+=(--conns "$CONNS")
        "$gen" "$shape" "${args[@]}" "$f.tmp" >&2 || die "gen-capture $shape failed"
        mv "$f.tmp" "$f"
        echo "$params" > "$f.params"
    fi
    # Independent frame count (Wireshark's capinfos), used to check both tools.
    n=$(capinfos -c -M -T -r "$f" | awk -F'\t' 'NR==1{print $2}')
    [[ $n =~ ^[0-9]+$ && $n -gt 0 ]] || die "capinfos could not count $f"
    frames[$shape]=$n
done

# --- runners ---------------------------------------------------------------
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

now_us() { local t=${EPOCHREALTIME//[!0-9]/}; echo "$t"; }

# run_fp SHAPE -> prints elapsed microseconds
run_fp() {
    local t0 t1 rc=0
    t0=$(now_us)
    timeout "$TIMEOUT" "$fp" replay --format json --quiet "$data/$1.pcap" >/dev/null 2>"$tmp/fp.err" || rc=$?
    t1=$(now_us)
    ((rc == 0)) || die "flowprobe on $1 failed (rc=$rc): $(head -3 "$tmp/fp.err")"
    echo $((t1 - t0))
}

# run_sf SHAPE -> prints elapsed microseconds; checks every frame was processed.
# -c none keeps the control socket off (see the note at the top); -r already
# runs in the foreground, so no -d or -p. It reads to EOF, flushes all flows
# to SF_EXPORT, prints its statistics on stdout and exits.
run_sf() {
    local t0 t1 rc=0 got
    t0=$(now_us)
    timeout "$TIMEOUT" softflowd -r "$data/$1.pcap" -n "$SF_EXPORT" -c none >"$tmp/sf.out" 2>"$tmp/sf.err" || rc=$?
    t1=$(now_us)
    ((rc != 124)) || die "softflowd on $1 hung (killed after ${TIMEOUT}s)"
    ((rc == 0)) || die "softflowd on $1 failed (rc=$rc): $(head -3 "$tmp/sf.err")"
    got=$(sed -n 's/^Packets processed: *\([0-9]*\).*/\1/p' "$tmp/sf.out")
    [[ $got == "${frames[$1]}" ]] ||
        die "softflowd processed '${got}' packets of $1, expected ${frames[$1]}"
    echo $((t1 - t0))
}

# --- warm-up (untimed): page cache, binaries, and a correctness check -------
for shape in bulk many; do
    f="$data/$shape.pcap"
    cat "$f" >/dev/null
    sum=$(timeout "$TIMEOUT" "$fp" replay --format json "$f" 2>&1 >/dev/null | tail -1) ||
        die "flowprobe warm-up on $shape failed: $sum"
    got=$(sed -n 's/.* \([0-9]*\) frames.*/\1/p' <<<"$sum")
    [[ $got == "${frames[$shape]}" ]] ||
        die "flowprobe read '$got' frames of $shape, expected ${frames[$shape]} ($sum)"
    run_sf "$shape" >/dev/null
    cached=$(fincore -n -o PAGES,SIZE "$f" 2>/dev/null | awk '{print $1}')
    total=$(( ($(stat -c %s "$f") + 4095) / 4096 ))
    echo "warm-up $shape: ${frames[$shape]} frames, both tools checked, page cache ${cached:-?}/$total pages" >&2
done

# --- timed, interleaved rounds ---------------------------------------------
declare -A times
echo "timing $ROUNDS rounds (fp bulk, sf bulk, fp many, sf many) ..." >&2
for ((r = 1; r <= ROUNDS; r++)); do
    a=$(run_fp bulk); b=$(run_sf bulk); c=$(run_fp many); d=$(run_sf many)
    times[fp_bulk]+="$a "; times[sf_bulk]+="$b "
    times[fp_many]+="$c "; times[sf_many]+="$d "
    awk -v r="$r" -v a="$a" -v b="$b" -v c="$c" -v d="$d" 'BEGIN {
        printf "  round %d: fp bulk %.3f  sf bulk %.3f  fp many %.3f  sf many %.3f s\n",
            r, a/1e6, b/1e6, c/1e6, d/1e6 }' >&2
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
spread() { tr ' ' '\n' | grep . | sort -n | awk 'NR==1{lo=$1} {hi=$1} END {printf "%.3f-%.3f", lo/1e6, hi/1e6}'; }

echo
rev=$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)
echo "flowprobe replay ($rev) vs softflowd ${sf_version:-?} -r; $ROUNDS interleaved rounds, median wall time"
printf '%-8s %7s %7s %13s %7s %7s %13s %7s %9s\n' capture fp_s fp_Mpps fp_min-max sf_s sf_Mpps sf_min-max fp/sf "(best)"
status=0
for shape in bulk many; do
    fm=$(median <<<"${times[fp_$shape]}"); sm=$(median <<<"${times[sf_$shape]}")
    n=${frames[$shape]}
    fmin=$(tr ' ' '\n' <<<"${times[fp_$shape]}" | grep . | sort -n | head -1)
    smin=$(tr ' ' '\n' <<<"${times[sf_$shape]}" | grep . | sort -n | head -1)
    awk -v s="$shape" -v n="$n" -v fm="$fm" -v sm="$sm" -v fmin="$fmin" -v smin="$smin" \
        -v fr="$(spread <<<"${times[fp_$shape]}")" -v sr="$(spread <<<"${times[sf_$shape]}")" 'BEGIN {
        printf "%-8s %7.3f %7.2f %13s %7.3f %7.2f %13s %6.2fx %8.2fx\n",
            s, fm/1e6, n/fm, fr, sm/1e6, n/sm, sr, sm/fm, smin/fmin }'
    if awk -v fm="$fm" -v sm="$sm" 'BEGIN { exit !(fm > sm) }'; then
        echo "FAIL: flowprobe is slower than softflowd on $shape" >&2
        status=1
    fi
    if [[ $shape == many ]] && awk -v fm="$fm" -v sm="$sm" 'BEGIN { exit !(sm < 2 * fm) }'; then
        echo "note: goal of 2x softflowd on many connections not met" >&2
    fi
done
echo "fp/sf = flowprobe speed / softflowd speed = softflowd median / flowprobe median (pass/fail uses this);"
echo "(best) = same ratio from each tool's fastest run. Frames: bulk ${frames[bulk]}, many ${frames[many]}"
echo "over $CONNS connections. Times in seconds, wall clock per process, page cache warm."
exit $status
