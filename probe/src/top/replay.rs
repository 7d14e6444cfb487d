//! `top --replay`: the capture played on its own clock. The frames are
//! read once (their first [`KEEP`] bytes: lengths come from the IP
//! header, so the counts are those of the whole frames), then fed into a
//! [`FlowTable`] through the same ingest path as `flowprobe replay` up to
//! the playback time. Seeking back starts the table again from the first
//! frame. At the end the table holds what `flowprobe replay` reads.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use flowtable::{Connection, FlowTable, FrameStats};
use probe_common::LinkType;

use super::model::{Health, Packets, Playback};
use crate::sources::file::pcap::read_frames;
use crate::sources::ingest;

/// Bytes kept per frame: every header the parser reads fits.
const KEEP: usize = 512;

struct Frame {
    ts_ns: u64,
    iface: u32,
    link: Option<LinkType>,
    data: Vec<u8>,
    wire_len: u32,
}

pub struct Player {
    frames: Vec<Frame>,
    table: FlowTable,
    stats: FrameStats,
    /// Frames fed into the table.
    pos: usize,
    /// Playback time, capture nanoseconds.
    clock: u64,
    first: u64,
    last: u64,
    pub speed: f64,
    /// Files cut short or corrupt: what `flowprobe replay` says about them.
    pub warnings: Vec<String>,
}

impl Player {
    pub fn open(paths: &[PathBuf]) -> anyhow::Result<Player> {
        let mut frames = Vec::new();
        let mut warnings = Vec::new();
        for p in paths {
            let data = std::fs::read(p).with_context(|| format!("{}: cannot read", p.display()))?;
            let before = frames.len();
            let r = read_frames(
                &data,
                |f| {
                    frames.push(Frame {
                        ts_ns: f.ts_ns,
                        iface: f.iface,
                        link: f.link,
                        data: f.data[..f.data.len().min(KEEP)].to_vec(),
                        wire_len: f.wire_len,
                    })
                },
                |_| {},
            );
            if let Err(e) = r {
                if frames.len() == before {
                    anyhow::bail!("{}: {e}", p.display());
                }
                warnings.push(format!("{}: {e}", p.display()));
            }
        }
        let first = frames.iter().map(|f| f.ts_ns).min().unwrap_or(0);
        let last = frames.iter().map(|f| f.ts_ns).max().unwrap_or(0);
        Ok(Player {
            frames,
            table: FlowTable::new(),
            stats: FrameStats::default(),
            pos: 0,
            clock: first,
            first,
            last,
            speed: 1.0,
            warnings,
        })
    }

    /// Before the first frame.
    fn reset(&mut self) {
        self.table = FlowTable::new();
        self.stats = FrameStats::default();
        self.pos = 0;
        self.clock = self.first;
    }

    fn feed_to(&mut self, clock: u64) {
        if clock < self.clock {
            self.reset();
        }
        self.clock = clock.clamp(self.first, self.last);
        while let Some(f) = self.frames.get(self.pos) {
            // Frames in file order; a later file that starts earlier is
            // fed at once, as `flowprobe replay` reads it.
            if f.ts_ns > self.clock && self.clock < self.last {
                break;
            }
            ingest::frame(
                &mut self.table,
                &mut self.stats,
                f.ts_ns,
                f.iface,
                f.link,
                &f.data,
                f.wire_len,
            );
            self.pos += 1;
        }
    }

    /// Plays `real` of wall time at the current speed.
    pub fn advance(&mut self, real: Duration) {
        let step = (real.as_nanos() as f64 * self.speed) as u64;
        self.feed_to(self.clock.saturating_add(step.max(1)));
    }

    /// Up to the next frame's time.
    pub fn step(&mut self) {
        if let Some(f) = self.frames.get(self.pos) {
            self.feed_to(f.ts_ns.max(self.clock));
        }
    }

    /// By `fraction` of the capture's length (negative: back).
    pub fn seek(&mut self, fraction: f64) {
        let d = ((self.last - self.first) as f64 * fraction.abs()) as u64;
        let to = if fraction < 0.0 {
            self.clock.saturating_sub(d.max(1))
        } else {
            self.clock.saturating_add(d.max(1))
        };
        self.feed_to(to);
    }

    pub fn start(&mut self) {
        self.reset();
    }

    pub fn end(&mut self) {
        self.feed_to(self.last);
    }

    pub fn done(&self) -> bool {
        self.pos == self.frames.len()
    }

    pub fn connections(&self) -> Vec<Connection> {
        self.table.connections()
    }

    pub fn playback(&self) -> Playback {
        Playback {
            at_s: (self.clock - self.first) as f64 / 1e9,
            length_s: (self.last - self.first) as f64 / 1e9,
            frame: self.pos,
            frames: self.frames.len(),
            speed: self.speed,
            done: self.done(),
        }
    }

    /// The replay's frame counts in the shape of `/health`.
    pub fn health(&self) -> Health {
        Health {
            backend: "replay".to_owned(),
            connections: self.table.len() as u64,
            packets: Some(Packets {
                tracked: self.stats.tracked,
                duplicate: self.stats.duplicate,
                skipped: self
                    .stats
                    .skipped_by_reason()
                    .map(|(r, n)| (r.name().to_owned(), n))
                    .chain(
                        (self.stats.unsupported_link > 0)
                            .then(|| ("unsupported_link".to_owned(), self.stats.unsupported_link)),
                    )
                    .collect(),
            }),
            ..Health::default()
        }
    }
}
