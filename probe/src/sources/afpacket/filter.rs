//! The classic BPF filter on every ring's socket: it cuts each frame to
//! the snap length (AF_PACKET has no other snap-length knob for rings) and,
//! with `--iface`, drops frames of other interfaces in the kernel, before
//! they cost a copy.

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
/// `BPF_LD | BPF_W | BPF_ABS` (0x00 | 0x00 | 0x20).
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JEQ | BPF_K` (0x05 | 0x10 | 0x00).
const BPF_JEQ_K: u16 = 0x15;
/// `BPF_RET | BPF_K` (0x06 | 0x00).
const BPF_RET_K: u16 = 0x06;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// `ret #snaplen` for every frame, or, for the interfaces in `only`:
///
/// ```text
///     ld  ifindex            ; SKF_AD_IFINDEX: the frame's interface
///     jeq #i1, keep          ; one test per interface
///     …
///     ret #0                 ; another interface: not delivered
/// keep:
///     ret #snaplen
/// ```
pub fn program(only: Option<&[u32]>, snaplen: u32) -> Vec<libc::sock_filter> {
    let Some(only) = only else {
        return vec![insn(BPF_RET_K, 0, 0, snaplen)];
    };
    // A jump offset is a u8: more interfaces than that are not a use case
    // for --iface; keep the first 254.
    let only = &only[..only.len().min(254)];
    let n = only.len();
    let mut p = Vec::with_capacity(n + 3);
    p.push(insn(
        BPF_LD_W_ABS,
        0,
        0,
        (libc::SKF_AD_OFF + libc::SKF_AD_IFINDEX) as u32,
    ));
    for (j, &ifindex) in only.iter().enumerate() {
        // From instruction j+1, `keep` (at n+2) is n-j instructions ahead
        // after the implicit +1.
        p.push(insn(BPF_JEQ_K, (n - j) as u8, 0, ifindex));
    }
    p.push(insn(BPF_RET_K, 0, 0, 0));
    p.push(insn(BPF_RET_K, 0, 0, snaplen));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program the way the kernel would, for a frame on `ifindex`.
    fn run(p: &[libc::sock_filter], ifindex: u32) -> u32 {
        let mut a = 0;
        let mut pc = 0;
        loop {
            let i = &p[pc];
            match i.code {
                BPF_LD_W_ABS => a = ifindex,
                BPF_JEQ_K => {
                    pc += if a == i.k { i.jt } else { i.jf } as usize;
                }
                BPF_RET_K => return i.k,
                c => panic!("unexpected opcode {c:#x}"),
            }
            pc += 1;
        }
    }

    #[test]
    fn every_interface_is_cut_to_the_snap_length() {
        let p = program(None, 256);
        assert_eq!(run(&p, 7), 256);
    }

    #[test]
    fn only_the_named_interfaces_pass() {
        let p = program(Some(&[3, 9, 12]), 160);
        for (ifindex, want) in [(3, 160), (9, 160), (12, 160), (1, 0), (4, 0)] {
            assert_eq!(run(&p, ifindex), want, "ifindex {ifindex}");
        }
        assert_eq!(run(&program(Some(&[]), 160), 3), 0);
    }
}
