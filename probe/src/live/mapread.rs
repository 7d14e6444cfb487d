//! The kernel's connection map, read many entries per system call
//! (`BPF_MAP_LOOKUP_BATCH`): the attribution pass (every 20 ms), the drain
//! and every snapshot read the whole map, and one `BPF_MAP_GET_NEXT_KEY` plus
//! one lookup per entry was most of the resolver's cost at 1000 new
//! connections a second (thousands of closed connections wait in the map
//! for `--closed-timeout`). Falls back to one entry at a time where the
//! kernel has no batch operations (before 5.6).

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use probe_common::{ConnKey, FlowEntry};

use super::{Entry, Key};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel's own "not supported" (not in libc: it never reaches
/// userspace through libc calls, but `bpf(2)` returns it).
const ENOTSUPP: i32 = 524;

/// `union bpf_attr`, the `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

pub struct MapReader {
    fd: OwnedFd,
    /// Entries per call; grows when a hash bucket holds more (ENOSPC).
    chunk: usize,
    keys: Vec<u8>,
    values: Vec<u8>,
    /// Set once the kernel refused batches.
    slow: Option<BpfHashMap<MapData, Key, Entry>>,
}

impl MapReader {
    /// A descriptor of its own of `CONNS` of `ebpf` (the resolver thread
    /// reads through one, the run loop through another).
    pub fn open(ebpf: &aya::Ebpf) -> Result<MapReader> {
        let fd = match ebpf.map("CONNS") {
            Some(Map::HashMap(m) | Map::LruHashMap(m)) => m.fd().as_fd().try_clone_to_owned()?,
            _ => bail!("the eBPF object has no hash map CONNS"),
        };
        Ok(MapReader {
            fd,
            chunk: 256,
            keys: Vec::new(),
            values: Vec::new(),
            slow: None,
        })
    }

    /// Every key now in the map, appended to `out`.
    pub fn keys(&mut self, out: &mut Vec<ConnKey>) -> Result<()> {
        self.read(&mut |k, _| out.push(*k))
    }

    /// Every entry now in the map, appended to `out`.
    pub fn entries(&mut self, out: &mut Vec<(ConnKey, FlowEntry)>) -> Result<()> {
        self.read(&mut |k, e| out.push((*k, *e)))
    }

    fn read(&mut self, each: &mut dyn FnMut(&ConnKey, &FlowEntry)) -> Result<()> {
        if let Some(m) = &self.slow {
            for item in m.iter() {
                let (k, e) = item.context("reading the connection map")?;
                each(&k.0, &e.0);
            }
            return Ok(());
        }
        let mut batch = Vec::new();
        match self.batches(&mut batch) {
            Ok(()) => {
                batch.iter().for_each(|(k, e)| each(k, e));
                Ok(())
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)
                ) =>
            {
                let data = MapData::from_fd(self.fd.try_clone()?)
                    .context("opening the connection map again")?;
                self.slow = Some(BpfHashMap::try_from(Map::HashMap(data))?);
                self.read(each)
            }
            Err(e) => Err(e).context("BPF_MAP_LOOKUP_BATCH on the connection map"),
        }
    }

    fn batches(&mut self, out: &mut Vec<(ConnKey, FlowEntry)>) -> io::Result<()> {
        let start = out.len();
        let mut token: u32 = 0;
        let mut first = true;
        loop {
            self.keys.resize(self.chunk * size_of::<ConnKey>(), 0);
            self.values.resize(self.chunk * size_of::<FlowEntry>(), 0);
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    &token as *const u32 as u64
                },
                out_batch: &mut token as *mut u32 as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: self.chunk as u32,
                map_fd: self.fd.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            // SAFETY: `attr` points at buffers of `count` keys and values
            // that live across the call; the kernel writes no further.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &mut attr as *mut BatchAttr,
                    size_of::<BatchAttr>(),
                )
            };
            let err = (r < 0).then(io::Error::last_os_error);
            if err.as_ref().and_then(|e| e.raw_os_error()) == Some(libc::ENOSPC) {
                // One bucket holds more than a chunk: start over, bigger.
                out.truncate(start);
                self.chunk *= 2;
                first = true;
                continue;
            }
            let n = (attr.count as usize).min(self.chunk);
            for i in 0..n {
                let k = i * size_of::<ConnKey>();
                let v = i * size_of::<FlowEntry>();
                // SAFETY: the kernel wrote `n` whole keys and values; both
                // types are POD.
                out.push(unsafe {
                    (
                        std::ptr::read_unaligned(self.keys[k..].as_ptr().cast::<ConnKey>()),
                        std::ptr::read_unaligned(self.values[v..].as_ptr().cast::<FlowEntry>()),
                    )
                });
            }
            match err {
                None => first = false,
                // The last batch, or an empty map.
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Some(e) => return Err(e),
            }
        }
    }
}
