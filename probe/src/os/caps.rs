//! The capabilities this process has in effect (`CapEff` of
//! `/proc/self/status`): what `run` checks before it loads eBPF, so that
//! root and an unprivileged user with the right capabilities (a systemd
//! unit's `AmbientCapabilities`, a container's `capabilities.add`) are told
//! the same thing: which capability is missing.

use std::io;

/// A capability, by its number in `linux/capability.h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    pub bit: u32,
    pub name: &'static str,
}

impl Cap {
    const fn new(bit: u32, name: &'static str) -> Cap {
        Cap { bit, name }
    }
}

pub const DAC_READ_SEARCH: Cap = Cap::new(2, "CAP_DAC_READ_SEARCH");
pub const NET_ADMIN: Cap = Cap::new(12, "CAP_NET_ADMIN");
pub const SYS_PTRACE: Cap = Cap::new(19, "CAP_SYS_PTRACE");
pub const SYS_ADMIN: Cap = Cap::new(21, "CAP_SYS_ADMIN");
pub const PERFMON: Cap = Cap::new(38, "CAP_PERFMON");
pub const BPF: Cap = Cap::new(39, "CAP_BPF");

/// A set of capabilities as the kernel writes it: one bit per number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    /// This process's effective set.
    pub fn effective() -> io::Result<CapSet> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        CapSet::parse_status(&status, "CapEff")
            .ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))
    }

    /// The `field` line (`CapEff:\t000001ffffffffff`) of a status text.
    pub fn parse_status(status: &str, field: &str) -> Option<CapSet> {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
        u64::from_str_radix(line.trim(), 16).ok().map(CapSet)
    }

    pub fn has(self, c: Cap) -> bool {
        c.bit < 64 && self.0 & (1 << c.bit) != 0
    }
}

/// What loading and attaching the eBPF program needs that `have` lacks:
/// CAP_BPF (maps, programs, `bpf_loop`), CAP_PERFMON (the verifier lets
/// only it read stack slots it cannot prove written, which the program
/// does), CAP_NET_ADMIN (tc and XDP programs, tc filters, XDP links).
/// CAP_SYS_ADMIN stands in for the first two, as in the kernel.
pub fn missing_for_ebpf(have: CapSet) -> Vec<Cap> {
    let admin = have.has(SYS_ADMIN);
    [(BPF, admin), (PERFMON, admin), (NET_ADMIN, false)]
        .into_iter()
        .filter(|&(c, instead)| !(have.has(c) || instead))
        .map(|(c, _)| c)
        .collect()
}

/// `a`, `a and b`, `a, b and c`.
pub fn names(caps: &[Cap]) -> String {
    match caps {
        [] => String::new(),
        [one] => one.name.to_owned(),
        [init @ .., last] => {
            let init: Vec<&str> = init.iter().map(|c| c.name).collect();
            format!("{} and {}", init.join(", "), last.name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tflowprobe\nCapInh:\t0000000000000000\nCapPrm:\t0000008000001000\nCapEff:\t0000008000001000\nCapBnd:\t000001ffffffffff\n";

    #[test]
    fn reads_the_effective_set() {
        let eff = CapSet::parse_status(STATUS, "CapEff").unwrap();
        assert!(eff.has(BPF) && eff.has(NET_ADMIN) && !eff.has(SYS_ADMIN));
        assert_eq!(CapSet::parse_status(STATUS, "CapAmb"), None);
        // CapBnd must not be mistaken for CapEff or the other way round.
        assert_eq!(
            CapSet::parse_status(STATUS, "CapBnd"),
            Some(CapSet(0x1ff_ffff_ffff))
        );
    }

    #[test]
    fn names_what_ebpf_lacks() {
        let set = |caps: &[Cap]| CapSet(caps.iter().map(|c| 1 << c.bit).sum());
        assert!(missing_for_ebpf(CapSet(u64::MAX)).is_empty());
        assert!(missing_for_ebpf(set(&[BPF, PERFMON, NET_ADMIN])).is_empty());
        // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, as in the kernel.
        assert!(missing_for_ebpf(set(&[SYS_ADMIN, NET_ADMIN])).is_empty());
        assert_eq!(missing_for_ebpf(set(&[BPF, NET_ADMIN])), [PERFMON]);
        assert_eq!(missing_for_ebpf(set(&[NET_ADMIN])), [BPF, PERFMON]);
        assert_eq!(missing_for_ebpf(CapSet(0)), [BPF, PERFMON, NET_ADMIN]);
        assert_eq!(
            names(&[BPF, PERFMON, NET_ADMIN]),
            "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"
        );
        assert_eq!(names(&[NET_ADMIN]), "CAP_NET_ADMIN");
    }

    #[test]
    fn this_process_has_a_set() {
        CapSet::effective().unwrap();
    }
}
