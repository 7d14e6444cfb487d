//! pcap and pcapng files: frames out, with their link type, interface and
//! timestamp in nanoseconds. Block framing is `pcap-file`'s; what it leaves
//! to the caller (pcapng timestamp resolution, lenient length checks, error
//! offsets) is here.

use std::fmt;

use pcap_file::pcap::PcapParser;
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgParser};
use pcap_file::{DataLink, PcapError, TsResolution};
use probe_common::LinkType;

/// One captured frame.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    pub ts_ns: u64,
    /// pcapng interface number (0 for pcap).
    pub iface: u32,
    /// `None` when flowprobe does not parse the interface's link type.
    pub link: Option<LinkType>,
    pub data: &'a [u8],
    /// Length on the wire (`orig_len`), at least `data.len()`.
    pub wire_len: u32,
}

/// Why reading stopped early. Frames before `offset` were delivered.
#[derive(Debug, PartialEq, Eq)]
pub struct ReadError {
    /// Byte offset of the record that could not be read.
    pub offset: usize,
    pub kind: ReadErrorKind,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ReadErrorKind {
    NotACapture { magic: [u8; 4] },
    Truncated,
    Corrupt(String),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ReadErrorKind::NotACapture { magic } => write!(
                f,
                "not a pcap or pcapng file (starts with {:02x}{:02x}{:02x}{:02x})",
                magic[0], magic[1], magic[2], magic[3]
            ),
            ReadErrorKind::Truncated => write!(
                f,
                "file is cut short inside the record at offset {}",
                self.offset
            ),
            ReadErrorKind::Corrupt(why) => {
                write!(f, "corrupt record at offset {}: {why}", self.offset)
            }
        }
    }
}

/// Records larger than this are taken as corruption, not as packets
/// (pcap's own limit for link types with jumbo frames is 256 KiB).
const MAX_RECORD: u32 = 256 * 1024;

const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];
/// Microsecond and nanosecond pcap, either byte order.
const PCAP_MAGICS: [[u8; 4]; 4] = [
    [0xa1, 0xb2, 0xc3, 0xd4],
    [0xd4, 0xc3, 0xb2, 0xa1],
    [0xa1, 0xb2, 0x3c, 0x4d],
    [0x4d, 0x3c, 0xb2, 0xa1],
];

/// Calls `on_frame` for every frame in `data` (a whole file) and
/// `on_progress` with the byte offset now and then.
pub fn read_frames(
    data: &[u8],
    mut on_frame: impl FnMut(&Frame),
    mut on_progress: impl FnMut(usize),
) -> Result<(), ReadError> {
    let magic = magic_of(data);
    if magic == PCAPNG_MAGIC {
        read_pcapng(data, &mut on_frame, &mut on_progress)
    } else if PCAP_MAGICS.contains(&magic) {
        read_pcap(data, &mut on_frame, &mut on_progress)
    } else {
        Err(ReadError {
            offset: 0,
            kind: ReadErrorKind::NotACapture { magic },
        })
    }
}

pub fn link_type(dl: DataLink) -> Option<LinkType> {
    match dl {
        DataLink::ETHERNET => Some(LinkType::Ethernet),
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => Some(LinkType::RawIp),
        DataLink::LINUX_SLL => Some(LinkType::LinuxSll),
        DataLink::LINUX_SLL2 => Some(LinkType::LinuxSll2),
        DataLink::NULL | DataLink::LOOP => Some(LinkType::Null),
        DataLink::NFLOG => Some(LinkType::Nflog),
        _ => None,
    }
}

fn corrupt(offset: usize, e: PcapError) -> ReadError {
    let kind = match e {
        PcapError::IncompleteBuffer => ReadErrorKind::Truncated,
        other => ReadErrorKind::Corrupt(other.to_string()),
    };
    ReadError { offset, kind }
}

const PROGRESS_EVERY: u32 = 1 << 16;

fn read_pcap(
    data: &[u8],
    on_frame: &mut impl FnMut(&Frame),
    on_progress: &mut impl FnMut(usize),
) -> Result<(), ReadError> {
    let (mut rem, parser) = PcapParser::new(data).map_err(|e| corrupt(0, e))?;
    let hdr = parser.header();
    let link = link_type(hdr.datalink);
    let nanos = hdr.ts_resolution == TsResolution::NanoSecond;
    let mut n = 0u32;
    while !rem.is_empty() {
        let offset = data.len() - rem.len();
        let (next, raw) = parser
            .next_raw_packet(rem)
            .map_err(|e| corrupt(offset, e))?;
        if raw.incl_len > MAX_RECORD {
            return Err(ReadError {
                offset,
                kind: ReadErrorKind::Corrupt(format!(
                    "record length {} is over {MAX_RECORD}",
                    raw.incl_len
                )),
            });
        }
        let frac = if nanos {
            raw.ts_frac as u64
        } else {
            raw.ts_frac as u64 * 1000
        };
        let frame = Frame {
            ts_ns: raw.ts_sec as u64 * 1_000_000_000 + frac,
            iface: 0,
            link,
            data: &raw.data,
            wire_len: raw.orig_len.max(raw.incl_len),
        };
        on_frame(&frame);
        rem = next;
        n = n.wrapping_add(1);
        if n.is_multiple_of(PROGRESS_EVERY) {
            on_progress(offset);
        }
    }
    Ok(())
}

fn magic_of(data: &[u8]) -> [u8; 4] {
    let mut m = [0u8; 4];
    for (d, s) in m.iter_mut().zip(data) {
        *d = *s;
    }
    m
}

/// Per-interface facts from an Interface Description Block.
struct Iface {
    link: Option<LinkType>,
    /// `if_tsresol`: timestamp units per second, as a converter to ns.
    res: TsRes,
}

#[derive(Clone, Copy)]
enum TsRes {
    /// Units of 10^-n seconds.
    Dec(u32),
    /// Units of 2^-n seconds.
    Bin(u32),
}

impl TsRes {
    fn from_option(v: u8) -> TsRes {
        if v & 0x80 == 0 {
            TsRes::Dec(v as u32)
        } else {
            TsRes::Bin((v & 0x7f) as u32)
        }
    }

    fn to_ns(self, raw: u64) -> u64 {
        match self {
            TsRes::Dec(n) if n <= 9 => raw.saturating_mul(10u64.pow(9 - n)),
            TsRes::Dec(n) => raw / 10u64.saturating_pow(n - 9),
            TsRes::Bin(n) => ((raw as u128 * 1_000_000_000) >> n.min(127)) as u64,
        }
    }
}

fn read_pcapng(
    data: &[u8],
    on_frame: &mut impl FnMut(&Frame),
    on_progress: &mut impl FnMut(usize),
) -> Result<(), ReadError> {
    let (mut rem, mut parser) = PcapNgParser::new(data).map_err(|e| corrupt(0, e))?;
    let mut ifaces: Vec<Iface> = Vec::new();
    let mut last_ts = 0u64;
    let mut n = 0u32;
    while !rem.is_empty() {
        let offset = data.len() - rem.len();
        let (next, block) = parser.next_block(rem).map_err(|e| corrupt(offset, e))?;
        match block {
            Block::SectionHeader(_) => ifaces.clear(),
            Block::InterfaceDescription(idb) => {
                let mut res = TsRes::Dec(6);
                for opt in &idb.options {
                    if let InterfaceDescriptionOption::IfTsResol(v) = opt {
                        res = TsRes::from_option(*v);
                    }
                }
                ifaces.push(Iface {
                    link: link_type(idb.linktype),
                    res,
                });
            }
            Block::EnhancedPacket(epb) => {
                let Some(iface) = ifaces.get(epb.interface_id as usize) else {
                    return Err(ReadError {
                        offset,
                        kind: ReadErrorKind::Corrupt(format!(
                            "packet names interface {} before its description",
                            epb.interface_id
                        )),
                    });
                };
                // pcap-file hands the raw 64-bit timestamp over as nanoseconds;
                // its unit is really the interface's if_tsresol.
                last_ts = iface.res.to_ns(epb.timestamp.as_nanos() as u64);
                on_frame(&Frame {
                    ts_ns: last_ts,
                    iface: epb.interface_id,
                    link: iface.link,
                    data: &epb.data,
                    wire_len: epb.original_len.max(epb.data.len() as u32),
                });
            }
            Block::SimplePacket(spb) => {
                // No timestamp and always interface 0.
                let link = ifaces.first().and_then(|i| i.link);
                on_frame(&Frame {
                    ts_ns: last_ts,
                    iface: 0,
                    link,
                    data: &spb.data,
                    wire_len: spb.original_len.max(spb.data.len() as u32),
                });
            }
            _ => {}
        }
        rem = next;
        n = n.wrapping_add(1);
        if n.is_multiple_of(PROGRESS_EVERY) {
            on_progress(offset);
        }
    }
    Ok(())
}
