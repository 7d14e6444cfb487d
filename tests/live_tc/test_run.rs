//! `BPF_PROG_TEST_RUN`: the fixture captures (and the generated tunnel
//! captures, `fixtures/tunnels/`) pushed frame by frame through the loaded
//! program equal `flowprobe replay` of them. Also the helpers
//! that push frames and read the kernel table, which `full_map` shares.

use std::fs;
use std::path::PathBuf;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::Ebpf;
use serde_json::Value;

use super::ebpf_object;
use crate::common::root::enabled;
use crate::common::{json_lines, repo_root};

/// A kernel table slot as an aya map value (the orphan rule keeps `Pod`
/// off the `probe_common` type).
#[derive(Clone, Copy)]
#[repr(transparent)]
struct SlotPod(probe_common::slots::Slot);
// SAFETY: `repr(C)`, `Copy`, no pointers; padding is explicit fields.
unsafe impl aya::Pod for SlotPod {}

/// The connections in the kernel table, read slot by slot through the
/// `bpf` system call: an independent reader beside `flowprobe`'s mmap one.
pub(super) fn table_entries(ebpf: &Ebpf) -> Vec<(probe_common::ConnKey, probe_common::FlowEntry)> {
    use aya::maps::{Array, MapData};
    let slots: Array<&MapData, SlotPod> =
        Array::try_from(ebpf.map(probe_common::contract::CONNS).unwrap()).unwrap();
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    assert_eq!(
        unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) },
        0
    );
    let tick_ns = res.tv_sec as u64 * 1_000_000_000 + res.tv_nsec as u64;
    (0..slots.len())
        .filter_map(|i| {
            let s = slots.get(&i, 0).unwrap().0;
            (s.state == probe_common::slots::state::LIVE).then(|| {
                let mut e = s.entry;
                e.fold_late();
                e.jiffies_to_ns(tick_ns);
                (s.key, e)
            })
        })
        .collect()
}

/// The frames of a little-endian Ethernet pcap (the fixtures' format; read
/// here by hand because their records may claim more than the snap length,
/// which pcap-file rejects).
fn pcap_frames(b: &[u8]) -> Vec<&[u8]> {
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    assert!(
        matches!(u32_at(0), 0xa1b2_c3d4 | 0xa1b2_3c4d),
        "not a little-endian pcap"
    );
    assert_eq!(u32_at(20), 1, "link type must be Ethernet");
    let mut out = Vec::new();
    let mut o = 24;
    while o + 16 <= b.len() {
        let incl = u32_at(o + 8) as usize;
        out.push(&b[o + 16..o + 16 + incl]);
        o += 16 + incl;
    }
    out
}

/// Loads `flowprobe_tc` and runs every frame of the pcap `cap` through it
/// with `BPF_PROG_TEST_RUN`; returns the number of frames.
pub(super) fn push_frames(ebpf: &mut Ebpf, cap: &[u8]) -> usize {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(probe_common::contract::TC_PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().unwrap();
    run_frames(ebpf, cap)
}

/// Every slot of the kernel table back to empty: a fresh table for the
/// next capture without loading (and verifying) the program again.
fn clear_table(ebpf: &mut Ebpf) {
    use aya::maps::Array;
    let mut slots: Array<_, SlotPod> =
        Array::try_from(ebpf.map_mut(probe_common::contract::CONNS).unwrap()).unwrap();
    let empty = SlotPod(probe_common::slots::Slot::default());
    for i in 0..slots.len() {
        if slots.get(&i, 0).unwrap().0.state != probe_common::slots::state::EMPTY {
            slots.set(i, empty, 0).unwrap();
        }
    }
}

/// Runs every frame of the pcap `cap` through the loaded `flowprobe_tc`.
fn run_frames(ebpf: &mut Ebpf, cap: &[u8]) -> usize {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(probe_common::contract::TC_PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    let mut frames = 0;
    for frame in pcap_frames(cap) {
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..TestRunOptions::default()
            })
            .unwrap();
        assert_eq!(r.return_value, 0, "the program must return TC_ACT_OK");
        frames += 1;
    }
    frames
}

/// The fixture captures pushed frame by frame through the loaded program
/// (`BPF_PROG_TEST_RUN`) give the same connections and counters as
/// `flowprobe replay` of the same file: the kernel runs the same parser,
/// tracker and orientation rule.
#[test]
fn fixtures_through_the_kernel_program_equal_replay() {
    if !enabled("live_tc") {
        return;
    }
    let object = ebpf_object("probe-ebpf");
    assert!(
        object.is_file(),
        "{} missing: cargo xtask build-ebpf --release",
        object.display()
    );
    // The real captures, and the generated tunnels and encapsulations
    // (`tests/common/encap.rs`) that have Ethernet framing, as a tc
    // program sees frames.
    let mut caps: Vec<PathBuf> = ["fixtures/pcaps", "fixtures/tunnels"]
        .iter()
        .flat_map(|d| fs::read_dir(repo_root().join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pcap"))
        .filter(|p| fs::read(p).unwrap()[20..24] == 1u32.to_le_bytes())
        .collect();
    caps.sort();
    assert!(!caps.is_empty());
    // Loaded (and verified) once; the table emptied between captures.
    let mut ebpf = aya::Ebpf::load_file(&object).unwrap();
    let prog: &mut SchedClassifier = ebpf
        .program_mut(probe_common::contract::TC_PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().unwrap();
    for cap in caps {
        clear_table(&mut ebpf);
        let frames = run_frames(&mut ebpf, &fs::read(&cap).unwrap());
        let kernel: Vec<Value> = table_entries(&ebpf)
            .iter()
            .map(|(k, e)| serde_json::to_value(flowtable::Connection::from_entry(k, e, 0)).unwrap())
            .collect();
        let out = crate::common::flowprobe(&[
            "replay",
            "--format",
            "json",
            "--quiet",
            cap.to_str().unwrap(),
        ]);
        assert!(out.status.success());
        let replay = json_lines(&crate::common::stdout(&out));
        // The tags the outer layers give (tunnel, VNI, VLAN ...) tell
        // apart two tunnels carrying one 5-tuple.
        // (BPF_PROG_TEST_RUN gives every skb a socket: its tags are the
        // kernel's alone.)
        let id = |c: &Value| {
            let mut c = c.clone();
            for side in ["src_tags", "dst_tags"] {
                if let Some(t) = c[side].as_object_mut() {
                    t.remove("socket_cookie");
                    t.remove("cgroup_id");
                }
            }
            [
                "proto", "src", "sport", "dst", "dport", "src_tags", "dst_tags",
            ]
            .map(|f| match &c[f] {
                Value::Object(o) if o.is_empty() => "null".to_owned(),
                v => v.to_string(),
            })
            .join(" ")
        };
        assert_eq!(
            kernel.len(),
            replay.len(),
            "{}: connection count",
            cap.display()
        );
        for r in &replay {
            let k = kernel.iter().find(|k| id(k) == id(r)).unwrap_or_else(|| {
                panic!(
                    "{}: kernel lacks {} (has {:?})",
                    cap.display(),
                    id(r),
                    kernel.iter().map(id).collect::<Vec<_>>()
                )
            });
            for dir in ["sent", "received"] {
                assert_eq!(k[dir], r[dir], "{}: {} {dir}", cap.display(), id(r));
            }
        }
        eprintln!(
            "{}: {frames} frames, {} connections equal",
            cap.display(),
            kernel.len()
        );
    }
}
