# shellcheck shell=bash
# Throwaway network namespaces for the root scripts (fixtures/capture/capture.sh,
# scripts/ebpf-netns-smoke.sh, bench/*.sh); the shell twin of tests/common/root.rs.
# Source it; nothing here touches the root namespace's interfaces.
#
#   netns_add NAME...              new namespaces, lo up in each; remembered for netns_cleanup
#   netns_cleanup                  kills what still runs in them, deletes them and flowprobe's
#                                  lock and clsact files for them (probe/src/live/stale.rs):
#                                  call it from the script's EXIT trap
#   netns_veth NS DEV PEER_NS PEER a veth pair, DEV in NS and PEER in PEER_NS (created inside NS
#                                  with the peer directly in PEER_NS), both down
#   netns_addr_up NS DEV CIDR...   the addresses (IPv6 without duplicate address detection),
#                                  then DEV up
#   netns_wait_carrier NS DEV...   waits up to 5 s for each DEV's carrier (LOWER_UP); fails
#                                  if one has none
#
# Processes run in a namespace with `ip netns exec NS CMD...`.

NETNS_CREATED=()

netns_add() {
    local ns
    for ns in "$@"; do
        ip netns add "$ns"
        NETNS_CREATED+=("$ns")
        ip -n "$ns" link set lo up
    done
}

netns_cleanup() {
    local ns pid ino
    for ns in "${NETNS_CREATED[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill -9 "$pid" 2>/dev/null || true
        done
        ino=$(stat -L -c %i "/run/netns/$ns" 2>/dev/null || true)
        if [[ -n $ino ]]; then
            rm -f "/run/flowprobe/netns-$ino.lock" "/run/flowprobe/netns-$ino.clsact"
        fi
        ip netns del "$ns" 2>/dev/null || true
    done
    NETNS_CREATED=()
}

netns_veth() { # NS DEV PEER_NS PEER
    ip -n "$1" link add "$2" type veth peer name "$4" netns "$3"
}

netns_addr_up() { # NS DEV CIDR...
    local ns=$1 dev=$2 cidr
    shift 2
    for cidr in "$@"; do
        if [[ $cidr == *:* ]]; then
            ip -n "$ns" addr add "$cidr" dev "$dev" nodad
        else
            ip -n "$ns" addr add "$cidr" dev "$dev"
        fi
    done
    ip -n "$ns" link set "$dev" up
}

netns_wait_carrier() { # NS DEV...
    local ns=$1 dev
    shift
    for dev in "$@"; do
        for _ in $(seq 100); do
            [[ $(ip -n "$ns" link show "$dev") == *LOWER_UP* ]] && break
            sleep 0.05
        done
        [[ $(ip -n "$ns" link show "$dev") == *LOWER_UP* ]] || return 1
    done
}
