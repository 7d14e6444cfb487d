//! Writes deterministic synthetic pcap files for the replay benchmark.
//!
//! `bulk`: one TCP connection moving data one way (ACK every second
//! segment, 1 % of segments sent again). `many`: the same pattern spread
//! round-robin over N concurrent connections, each with handshake and FIN.
//! Frames are cut to a 128-byte snap length, as `tcpdump -s 128` would.

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use etherparse::PacketBuilder;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::DataLink;

#[derive(Clone, Copy, ValueEnum)]
enum Shape {
    Bulk,
    Many,
}

#[derive(Parser)]
#[command(about = "Write a synthetic pcap for the replay benchmark")]
struct Args {
    #[arg(value_enum)]
    shape: Shape,
    /// Frames to write (about; each connection is completed).
    #[arg(long, default_value_t = 1_000_000)]
    frames: u64,
    /// Concurrent connections for `many`.
    #[arg(long, default_value_t = 3000)]
    conns: u32,
    out: PathBuf,
}

const SNAP: usize = 128;
const MSS: u32 = 1448;

struct Conn {
    client: [u8; 4],
    sport: u16,
    seq: u32,
    peer_seq: u32,
    sent: u64,
}

struct Writer {
    w: PcapWriter<BufWriter<File>>,
    t_us: u64,
    frames: u64,
    payload: Vec<u8>,
    buf: Vec<u8>,
}

impl Writer {
    #[allow(clippy::too_many_arguments)]
    fn tcp(
        &mut self,
        from_client: bool,
        c: &Conn,
        seq: u32,
        ack: u32,
        syn: bool,
        fin: bool,
        len: usize,
    ) -> anyhow::Result<()> {
        let server = [10, 200, 0, 1];
        let (s, d, sp, dp) = if from_client {
            (c.client, server, c.sport, 5001)
        } else {
            (server, c.client, 5001, c.sport)
        };
        let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(s, d, 64)
            .tcp(sp, dp, seq, 64000);
        if syn {
            b = b.syn();
        }
        if fin {
            b = b.fin();
        }
        if !(syn && from_client) {
            b = b.ack(ack);
        }
        self.buf.clear();
        b.write(&mut self.buf, &self.payload[..len])?;
        self.t_us += 3;
        let orig = self.buf.len() as u32;
        let cut = &self.buf[..self.buf.len().min(SNAP)];
        self.w.write_packet(&PcapPacket::new(
            Duration::from_micros(self.t_us),
            orig,
            cut,
        ))?;
        self.frames += 1;
        Ok(())
    }

    fn open(&mut self, c: &Conn) -> anyhow::Result<()> {
        self.tcp(true, c, c.seq.wrapping_sub(1), 0, true, false, 0)?;
        self.tcp(false, c, c.peer_seq.wrapping_sub(1), c.seq, true, false, 0)?;
        self.tcp(true, c, c.seq, c.peer_seq, false, false, 0)
    }

    /// Two data segments and an ACK; every 100th segment is sent twice.
    fn burst(&mut self, c: &mut Conn) -> anyhow::Result<()> {
        for _ in 0..2 {
            self.tcp(true, c, c.seq, c.peer_seq, false, false, MSS as usize)?;
            c.sent += 1;
            if c.sent.is_multiple_of(100) {
                self.tcp(true, c, c.seq, c.peer_seq, false, false, MSS as usize)?;
            }
            c.seq = c.seq.wrapping_add(MSS);
        }
        self.tcp(false, c, c.peer_seq, c.seq, false, false, 0)
    }

    fn close(&mut self, c: &Conn) -> anyhow::Result<()> {
        self.tcp(true, c, c.seq, c.peer_seq, false, true, 0)?;
        self.tcp(false, c, c.peer_seq, c.seq.wrapping_add(1), false, true, 0)?;
        self.tcp(
            true,
            c,
            c.seq.wrapping_add(1),
            c.peer_seq.wrapping_add(1),
            false,
            false,
            0,
        )
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let file = BufWriter::with_capacity(1 << 20, File::create(&a.out)?);
    let hdr = PcapHeader {
        datalink: DataLink::ETHERNET,
        snaplen: SNAP as u32,
        ..Default::default()
    };
    let mut w = Writer {
        w: PcapWriter::with_header(file, hdr)?,
        t_us: 1_764_000_000_000_000,
        frames: 0,
        payload: vec![0x42; MSS as usize],
        buf: Vec::with_capacity(2048),
    };
    let n = match a.shape {
        Shape::Bulk => 1,
        Shape::Many => a.conns.max(1),
    };
    let mut conns: Vec<Conn> = (0..n)
        .map(|i| Conn {
            client: [10, 100, (i >> 8) as u8, i as u8],
            sport: 32768 + (i % 28000) as u16,
            // Start near the top of sequence space so wraps happen.
            seq: u32::MAX - 7_000_000u32.wrapping_mul(i + 1),
            peer_seq: 1_000 + i,
            sent: 0,
        })
        .collect();
    for c in &conns {
        w.open(c)?;
    }
    let close_frames = 3 * n as u64;
    'outer: loop {
        for c in conns.iter_mut() {
            if w.frames + close_frames >= a.frames {
                break 'outer;
            }
            w.burst(c)?;
        }
    }
    for c in &conns {
        w.close(c)?;
    }
    eprintln!(
        "{}: {} frames, {} connections",
        a.out.display(),
        w.frames,
        n
    );
    Ok(())
}
