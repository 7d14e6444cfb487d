//! The file source of `flowprobe replay`: pcap and pcapng files ([`pcap`])
//! through the same parser and tracker as live capture.

pub mod pcap;

use std::fs::File;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use flowtable::{FlowTable, FrameStats};
use indicatif::{ProgressBar, ProgressStyle};
use probe_common::Decap;

use self::pcap::{read_frames, ReadError};
use crate::sources::ingest;

/// Files at least this large get a progress bar (when stderr is a terminal).
const PROGRESS_MIN_BYTES: u64 = 64 << 20;

/// What became of one input file.
pub struct FileOutcome {
    pub path: PathBuf,
    pub frames: u64,
    /// Reading stopped here; the frames before were counted.
    pub error: Option<ReadError>,
}

/// Replays `paths` in order into one table, looking into the tunnels
/// `decap` names.
pub fn replay(
    paths: &[PathBuf],
    table: &mut FlowTable,
    stats: &mut FrameStats,
    decap: Decap,
) -> anyhow::Result<Vec<FileOutcome>> {
    replay_timed(paths, table, stats, decap, &mut |_, _| {})
}

/// [`replay`], calling `before(table, ts_ns)` before each frame is counted:
/// where a consumer of packet time (the fleet's intervals) reads the table.
pub fn replay_timed(
    paths: &[PathBuf],
    table: &mut FlowTable,
    stats: &mut FrameStats,
    decap: Decap,
    before: &mut dyn FnMut(&FlowTable, u64),
) -> anyhow::Result<Vec<FileOutcome>> {
    paths
        .iter()
        .map(|p| replay_file(p, table, stats, decap, before))
        .collect()
}

fn replay_file(
    path: &Path,
    table: &mut FlowTable,
    stats: &mut FrameStats,
    decap: Decap,
    before: &mut dyn FnMut(&FlowTable, u64),
) -> anyhow::Result<FileOutcome> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("{}: cannot stat", path.display()))?
        .len();
    let map;
    let data: &[u8] = if len == 0 {
        &[]
    } else {
        // SAFETY: the map is read-only and private to this process. A file
        // truncated by another process while mapped would raise SIGBUS; that
        // is the accepted cost of not copying multi-gigabyte captures.
        map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("{}: cannot map", path.display()))?;
        &map
    };

    let bar = (len >= PROGRESS_MIN_BYTES && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(len);
        b.set_style(
            ProgressStyle::with_template(
                "{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("static template"),
        );
        b.set_message(path.display().to_string());
        b
    });

    let frames_before = stats.frames;
    let result = read_frames(
        data,
        |f| {
            before(table, f.ts_ns);
            ingest::frame(
                table, stats, f.ts_ns, f.iface, f.link, f.data, f.wire_len, decap,
            )
        },
        |off| {
            if let Some(b) = &bar {
                b.set_position(off as u64);
            }
        },
    );
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(FileOutcome {
        path: path.to_path_buf(),
        frames: stats.frames - frames_before,
        error: result.err(),
    })
}
