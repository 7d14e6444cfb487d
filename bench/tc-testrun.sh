#!/usr/bin/env bash
# In-kernel cost of the tc program on one packet, hot cache, without the
# bpf_stats overhead: BPF_PROG_TEST_RUN (`bpftool prog run ... repeat N`)
# of a 1400-byte TCP data segment through each object, interleaved rounds.
# Each program of each object runs (probe-ebpf: the tc classifier and the
# XDP program). It isolates the program's own instructions from what a live
# load adds
# (cache misses on fresh packets, the entry's cache line moving between
# CPUs); bench/tc.sh measures the live figure.
#
# usage (root): bench/tc-testrun.sh [OBJ...]
#   default: tc-baseline (empty) and probe-ebpf from target/ebpf (release)
#   ROUNDS=5 REPEAT=2000000
#   FRAME=FILE.pcap:N runs frame N (from 0) of that little-endian pcap
#   instead (e.g. fixtures/tunnels/vxlan_two_vnis.pcap:8, a VXLAN-wrapped
#   200-byte TCP segment: the cost on tunnelled traffic)
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
REPEAT=${REPEAT:-2000000}
die() { printf 'testrun: FAIL: %s\n' "$*" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || die "must run as root (bpftool prog load/run)"
for t in bpftool python3; do command -v "$t" >/dev/null || die "$t not found"; done

if [[ $# -eq 0 ]]; then
    cargo xtask build-ebpf --release >/dev/null
    set -- target/ebpf/bpfel-unknown-none/release/tc-baseline \
        target/ebpf/bpfel-unknown-none/release/probe-ebpf
fi

WORK=$(mktemp -d /tmp/flowprobe-testrun.XXXXXX)
PINS=()
cleanup() {
    for p in "${PINS[@]}"; do rm -rf "$p"; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# Ethernet + IPv4 + TCP (ACK|PSH) + 1400 bytes, checksums irrelevant to tc.
python3 - "$WORK/pkt.bin" <<'EOF'
import struct, sys
payload = b"x" * 1400
tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 1, 5 << 4, 0x18, 1000, 0, 0)
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 1, 0x4000, 64, 6, 0,
                 bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
open(sys.argv[1], "wb").write(b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp + payload)
EOF
if [[ -n ${FRAME:-} ]]; then
    python3 - "$WORK/pkt.bin" "${FRAME%:*}" "${FRAME##*:}" <<'EOF'
import struct, sys
b = open(sys.argv[2], "rb").read()
assert struct.unpack_from("<I", b, 0)[0] in (0xa1b2c3d4, 0xa1b23c4d), "not a little-endian pcap"
o, n = 24, int(sys.argv[3])
for _ in range(n):
    o += 16 + struct.unpack_from("<I", b, o + 8)[0]
incl = struct.unpack_from("<I", b, o + 8)[0]
open(sys.argv[1], "wb").write(b[o + 16:o + 16 + incl])
EOF
fi

# Every program of every object is one column: probe-ebpf has the tc
# classifier and the XDP program.
i=0
COLS=()
NAMES=()
for obj in "$@"; do
    [[ -f $obj ]] || die "no such object: $obj"
    pin=/sys/fs/bpf/flowprobe-testrun-$$-$i
    bpftool prog loadall "$obj" "$pin" >/dev/null || die "cannot load $obj"
    PINS+=("$pin")
    for prog in $(ls "$pin"); do
        COLS+=("$pin/$prog")
        NAMES+=("$prog")
    done
    i=$((i + 1))
done

printf '%-8s' round
for name in "${NAMES[@]}"; do printf ' %22s' "$name"; done
echo
declare -A all
for r in $(seq "$ROUNDS"); do
    printf '%-8s' "$r"
    for k in "${!COLS[@]}"; do
        ns=$(bpftool prog run pinned "${COLS[$k]}" data_in "$WORK/pkt.bin" repeat "$REPEAT" 2>&1 |
            sed -n 's/.*average): \([0-9]*\)ns.*/\1/p')
        [[ -n $ns ]] || die "bpftool prog run gave no duration for ${NAMES[$k]}"
        all[$k]+="$ns "
        printf ' %22s' "$ns"
    done
    echo
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
printf '%-8s' median
for k in "${!COLS[@]}"; do printf ' %22s' "$(median <<<"${all[$k]}")"; done
echo
echo "(ns per run; the first column is the yardstick)"
