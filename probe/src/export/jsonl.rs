//! `flowprobe run --export-jsonl`: at each interval, one JSON line per
//! connection whose counters changed since the previous interval, with the
//! change (README, "JSON-lines export"). Summing a connection's lines gives
//! its totals, because the last lines are written after the final read.
//!
//! An interval's lines are written at once, and only a write that succeeded
//! counts as written: when the file cannot be written (disk full, gone
//! read-only), what was written of the interval is cut off again and the
//! next interval's lines carry the change since the last written one, so a
//! file that can be written again loses nothing. [`Export`] counts the
//! intervals that could not be written (`/health`, `/metrics`).

use std::fs::File;
use std::io::{self, Write};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowtable::delta::{since, Last, Taken};
use flowtable::{Connection, DirStats, Tags};
use serde::Serialize;

/// Retired connections (`Reading::retired`) whose last lines wait while
/// the file cannot be written; beyond this many the oldest are dropped and
/// counted (`ExportStatus::dropped`).
pub const MAX_PENDING: usize = 100_000;

/// Counters at the previous interval written, and the retired connections
/// whose last lines are not written yet.
#[derive(Default)]
pub struct Deltas {
    /// The listed connections of the last interval written (shared with
    /// the agent's snapshot while the writes keep up; held while they
    /// fail), or the saved baseline a restart resumed from.
    written: Last,
    pending: std::collections::VecDeque<Connection>,
    /// Retired connections dropped from `pending`.
    dropped: u64,
    interval: u64,
    /// The records the last write retired, as taken: kept in the saved
    /// baseline one interval longer (a restart may find them in the kernel
    /// again before the source forgets them; then they add nothing).
    last_retired: Vec<Taken>,
    /// Resumed from a saved baseline, not written since.
    resumed: bool,
    /// Grows whenever what [`Deltas::saved`] gives changes.
    version: u64,
}

/// What a restarted run needs to continue the export exactly
/// (docs/restart.md): the file's length when the baseline was taken, the
/// interval number and each record's counters as written.
#[derive(Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Saved {
    pub path: String,
    pub len: u64,
    pub interval: u64,
    pub records: Vec<Taken>,
}

/// One line; fields may be added, never renamed.
#[derive(Serialize)]
struct Line<'a> {
    interval: u64,
    /// When this interval's read was taken, RFC 3339 UTC.
    time: String,
    proto: flowtable::Proto,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    iface: u32,
    first_seen: String,
    last_seen: String,
    /// Change since the previous line of this connection (or its totals on
    /// its first line).
    sent: DirStats,
    received: DirStats,
    #[serde(skip_serializing_if = "Tags::is_empty")]
    src_tags: &'a Tags,
    #[serde(skip_serializing_if = "Tags::is_empty")]
    dst_tags: &'a Tags,
}

impl Deltas {
    /// Writes the lines of this interval, read at `now`, with one
    /// `write_all` of them all; the counters they were taken against move
    /// on only if it succeeds. An interval that could not be written still
    /// takes its number: a gap in `interval` says so. Returns how many
    /// lines it wrote (0: no change, nothing written).
    pub fn write(
        &mut self,
        out: &mut impl Write,
        conns: &Arc<Vec<Connection>>,
        retired: &[Connection],
        now: SystemTime,
    ) -> io::Result<usize> {
        self.interval += 1;
        self.pending.extend(retired.iter().cloned());
        while self.pending.len() > MAX_PENDING {
            self.pending.pop_front();
            self.dropped += 1;
        }
        let time = rfc3339(now);
        let mut buf = Vec::new();
        let changes = since(&mut self.written, conns.iter().chain(&self.pending));
        for ch in &changes {
            let c = ch.conn;
            let line = Line {
                interval: self.interval,
                time: time.clone(),
                proto: c.proto,
                src: c.src,
                sport: c.sport,
                dst: c.dst,
                dport: c.dport,
                iface: c.iface,
                first_seen: at(c.first_seen),
                last_seen: at(c.last_seen),
                sent: ch.sent.clone(),
                received: ch.received.clone(),
                src_tags: &c.src_tags,
                dst_tags: &c.dst_tags,
            };
            serde_json::to_writer(&mut buf, &line)?;
            buf.push(b'\n');
        }
        let n = changes.len();
        drop(changes);
        if n > 0 {
            out.write_all(&buf)?;
            out.flush()?;
        }
        // Written (or nothing to write): their last lines are out, and
        // what the source no longer lists is forgotten.
        self.written = Last::new(Arc::clone(conns));
        let resumed = std::mem::take(&mut self.resumed);
        if n > 0 || resumed || !self.pending.is_empty() || !self.last_retired.is_empty() {
            self.version += 1;
        }
        self.last_retired = self.pending.iter().map(Taken::of).collect();
        self.pending.clear();
        Ok(n)
    }

    /// The baseline: every record as last written, and those retired by
    /// the last write.
    fn saved(&self) -> Vec<Taken> {
        let mut r: Vec<Taken> = self.written.conns().iter().map(Taken::of).collect();
        r.extend(self.last_retired.iter().cloned());
        r
    }

    /// Continues from a saved baseline (records of a protocol a connection
    /// does not have are left out).
    fn resume(&mut self, s: &Saved) {
        self.interval = s.interval;
        let records = s.records.iter().filter_map(Taken::connection).collect();
        self.written = Last::new(Arc::new(records));
        self.resumed = true;
    }

    /// Records remembered, retired ones waiting, retired ones dropped.
    pub fn held(&self) -> (usize, usize, u64) {
        (self.written.conns().len(), self.pending.len(), self.dropped)
    }
}

/// Where the lines go: a file (appended to) or stdout.
enum Out {
    File(File),
    Stdout,
}

impl Write for Out {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Out::File(f) => f.write(b),
            Out::Stdout => io::stdout().lock().write(b),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Out::File(f) => f.flush(),
            Out::Stdout => io::stdout().lock().flush(),
        }
    }
}

/// `--export-jsonl PATH`: the deltas, where they go, and how writing them
/// fared.
pub struct Export {
    path: String,
    deltas: Deltas,
    out: Out,
    status: ExportStatus,
}

/// How writing the export fared, for `/health` (as this JSON) and
/// `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExportStatus {
    /// Intervals whose lines could not be written (each one's change went
    /// with the next interval written).
    pub failed_writes: u64,
    /// The last write failed: changes are waiting for the next one.
    pub behind: bool,
    /// Why the last failed write failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Connections remembered for their next line.
    pub tracked: usize,
    /// Ended connections whose last lines wait for a write that works.
    pub pending: usize,
    /// Ended connections whose last lines were dropped while waiting
    /// (more than `MAX_PENDING`): their final change is not in the file.
    pub dropped: u64,
}

/// What [`Export::write`] has to say on stderr, if anything.
#[derive(Debug, PartialEq, Eq)]
pub enum Said {
    Nothing,
    /// The first failure after writes that worked.
    Failing(String),
    /// Written again after this many intervals that were not.
    Recovered(u64),
}

impl Export {
    /// `--export-jsonl PATH`: appended to (a restart does not lose what an
    /// earlier run wrote); `-` is stdout.
    pub fn open(path: &str) -> anyhow::Result<Export> {
        let out = if path == "-" {
            Out::Stdout
        } else {
            Out::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| anyhow::anyhow!("--export-jsonl {path}: {e}"))?,
            )
        };
        Ok(Export {
            path: path.to_owned(),
            deltas: Deltas::default(),
            out,
            status: ExportStatus::default(),
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn status(&self) -> &ExportStatus {
        &self.status
    }

    /// The baseline to save now (a file only), and a number that changes
    /// whenever it does.
    pub fn saved(&self) -> Option<(Saved, u64)> {
        let Out::File(f) = &self.out else { return None };
        let len = f.metadata().ok()?.len();
        Some((
            Saved {
                path: self.path.clone(),
                len,
                interval: self.deltas.interval,
                records: self.deltas.saved(),
            },
            self.deltas.version,
        ))
    }

    /// Continues the export of a run that is gone from its saved baseline:
    /// what it wrote after the baseline was taken is cut off (this run
    /// writes it again, from the baseline). Returns one line to say.
    pub fn resume(&mut self, s: &Saved) -> anyhow::Result<String> {
        let Out::File(f) = &self.out else {
            return Ok(String::new());
        };
        if s.path != self.path {
            return Ok(format!(
                "the saved export baseline is of {}, not {}: this export starts afresh",
                s.path, self.path
            ));
        }
        let len = f.metadata()?.len();
        let mut line = format!(
            "--export-jsonl {}: continuing after interval {} ({} records)",
            self.path,
            s.interval,
            s.records.len()
        );
        if len > s.len {
            f.set_len(s.len).map_err(|e| {
                anyhow::anyhow!("--export-jsonl {}: cutting to {}: {e}", self.path, s.len)
            })?;
            line += &format!(
                "; {} bytes written after it were cut off, to be written again",
                len - s.len
            );
        } else if len < s.len {
            line += &format!(
                "; the file is shorter than when the baseline was taken ({len} < {} bytes): rotated?",
                s.len
            );
        }
        self.deltas.resume(s);
        Ok(line)
    }

    /// Writes this interval's lines (see [`Deltas::write`]); a failure is
    /// counted, and what it wrote of the lines is cut off the file again.
    pub fn write(
        &mut self,
        conns: &Arc<Vec<Connection>>,
        retired: &[Connection],
        now: SystemTime,
    ) -> Said {
        let len = match &self.out {
            Out::File(f) => f.metadata().ok().map(|m| m.len()),
            Out::Stdout => None,
        };
        let written = self.deltas.write(&mut self.out, conns, retired, now);
        (
            self.status.tracked,
            self.status.pending,
            self.status.dropped,
        ) = self.deltas.held();
        match written {
            // Nothing to write proves nothing.
            Ok(0) => Said::Nothing,
            Ok(_) => {
                let was = std::mem::take(&mut self.status.behind);
                if was {
                    Said::Recovered(self.status.failed_writes)
                } else {
                    Said::Nothing
                }
            }
            Err(e) => {
                if let (Out::File(f), Some(len)) = (&self.out, len) {
                    // Best effort: a half-written line would spoil the file.
                    let _ = f.set_len(len);
                }
                self.status.failed_writes += 1;
                let e = e.to_string();
                self.status.last_error = Some(e.clone());
                if std::mem::replace(&mut self.status.behind, true) {
                    Said::Nothing
                } else {
                    Said::Failing(e)
                }
            }
        }
    }
}

/// RFC 3339 UTC with nanoseconds, as the connection records print time.
fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

fn at(ns: u64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_nanos(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arc(conns: &[Connection]) -> Arc<Vec<Connection>> {
        Arc::new(conns.to_vec())
    }

    fn conn(sport: u16, sent_bytes: u64, recv_bytes: u64) -> Connection {
        Connection {
            proto: flowtable::Proto::Tcp,
            src: IpAddr::from([10, 0, 0, 1]),
            sport,
            dst: IpAddr::from([10, 0, 0, 2]),
            dport: 80,
            iface: 2,
            first_seen: 1_700_000_000_000_000_000,
            last_seen: 1_700_000_001_000_000_000,
            sent: DirStats::counts(sent_bytes / 100, sent_bytes, 0),
            received: DirStats::counts(recv_bytes / 100, recv_bytes, 0),
            rtt: Default::default(),
            src_tags: Default::default(),
            dst_tags: Default::default(),
        }
    }

    fn lines(d: &mut Deltas, conns: &[Connection]) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_002);
        d.write(&mut out, &Arc::new(conns.to_vec()), &[], t)
            .unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn only_changed_connections_with_their_change() {
        let mut d = Deltas::default();
        let first = lines(&mut d, &[conn(40000, 1000, 200), conn(40001, 500, 0)]);
        assert_eq!(first.len(), 2);
        assert_eq!(first[0]["interval"], 1);
        assert_eq!(first[0]["sent"]["bytes"], 1000);
        assert_eq!(first[0]["time"], "2023-11-14T22:13:22.000000000Z");
        assert_eq!(first[0]["first_seen"], "2023-11-14T22:13:20.000000000Z");

        // 40000 grew, 40001 did not, 40002 is new.
        let second = lines(
            &mut d,
            &[
                conn(40000, 1500, 300),
                conn(40001, 500, 0),
                conn(40002, 100, 100),
            ],
        );
        assert_eq!(second.len(), 2);
        assert_eq!(second[0]["interval"], 2);
        assert_eq!(second[0]["sport"], 40000);
        assert_eq!(second[0]["sent"]["bytes"], 500);
        assert_eq!(second[0]["sent"]["packets"], 5);
        assert_eq!(second[0]["received"]["bytes"], 100);
        assert_eq!(second[1]["sport"], 40002);
        assert_eq!(second[1]["sent"]["bytes"], 100);

        assert!(lines(&mut d, &[conn(40000, 1500, 300)]).is_empty());
    }

    #[test]
    fn first_seen_jitter_is_the_same_record_and_a_reuse_is_not() {
        let mut d = Deltas::default();
        let a = conn(40000, 1000, 0);
        assert_eq!(lines(&mut d, std::slice::from_ref(&a)).len(), 1);
        // The same record, read again with its time 20 ns off: no change.
        let mut jittered = a.clone();
        jittered.first_seen -= 20;
        assert!(lines(&mut d, &[jittered.clone()]).is_empty());
        // The 5-tuple reused a second later: a new record, its totals.
        let mut reused = conn(40000, 300, 0);
        reused.first_seen += 1_000_000_000;
        let l = lines(&mut d, &[jittered, reused]);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0]["sent"]["bytes"], 300);
    }

    /// Fails every write while `full`.
    struct Disk {
        full: bool,
        text: Vec<u8>,
    }

    impl Write for Disk {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.full {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.text.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_interval_not_written_goes_with_the_next_one_written() {
        let mut d = Deltas::default();
        let mut disk = Disk {
            full: false,
            text: Vec::new(),
        };
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_002);
        d.write(&mut disk, &arc(&[conn(40000, 100, 10)]), &[], t)
            .unwrap();
        disk.full = true;
        assert!(d
            .write(&mut disk, &arc(&[conn(40000, 250, 20)]), &[], t)
            .is_err());
        assert!(d
            .write(&mut disk, &arc(&[conn(40000, 400, 30)]), &[], t)
            .is_err());
        disk.full = false;
        d.write(
            &mut disk,
            &arc(&[conn(40000, 450, 30), conn(40001, 5, 0)]),
            &[],
            t,
        )
        .unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8(disk.text)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let got: Vec<(u64, u64, u64, u64)> = lines
            .iter()
            .map(|l| {
                let n = |v: &serde_json::Value| v.as_u64().unwrap();
                (
                    n(&l["interval"]),
                    n(&l["sport"]),
                    n(&l["sent"]["bytes"]),
                    n(&l["received"]["bytes"]),
                )
            })
            .collect();
        // Intervals 2 and 3 are missing; 4 carries their change.
        assert_eq!(
            got,
            [(1, 40000, 100, 10), (4, 40000, 350, 20), (4, 40001, 5, 0)]
        );
    }

    #[test]
    fn a_full_disk_is_counted_and_said_once() {
        let mut e = Export::open("/dev/full").unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_002);
        assert!(matches!(
            e.write(&arc(&[conn(40000, 100, 10)]), &[], t),
            Said::Failing(_)
        ));
        assert_eq!(
            e.write(&arc(&[conn(40000, 200, 10)]), &[], t),
            Said::Nothing
        );
        let s = e.status();
        assert_eq!((s.failed_writes, s.behind), (2, true));
        assert!(s.last_error.as_deref().unwrap().contains("No space left"));
        // Nothing to write is no write: still behind.
        assert_eq!(e.write(&arc(&[]), &[], t), Said::Nothing);
    }

    /// A run killed after writing lines it had not saved the baseline of:
    /// the next one cuts them off and writes the change again, so each
    /// connection's lines sum to its totals, once.
    #[test]
    fn a_resumed_export_cuts_what_was_not_saved_and_continues() {
        let path =
            std::env::temp_dir().join(format!("flowprobe-resume-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let p = path.to_str().unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_002);
        let mut e = Export::open(p).unwrap();
        e.write(&arc(&[conn(40000, 100, 10), conn(40001, 50, 0)]), &[], t);
        // 40001 retires with the second interval; the baseline keeps it
        // one interval longer.
        e.write(&arc(&[conn(40000, 300, 10)]), &[conn(40001, 70, 0)], t);
        let (saved, _) = e.saved().unwrap();
        assert_eq!(saved.records.len(), 2);
        let saved_len = saved.len;
        // Written, never saved: the kill came first.
        e.write(&arc(&[conn(40000, 900, 40)]), &[], t);
        drop(e);
        let mut e = Export::open(p).unwrap();
        let said = e.resume(&saved).unwrap();
        assert!(said.contains("cut off"), "{said}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), saved_len);
        // The source lists 40000 again (40001's slot was freed); then 40000
        // ends.
        e.write(&arc(&[conn(40000, 1000, 40)]), &[], t);
        assert_eq!(e.deltas.held().0, 1, "40001 forgotten");
        e.write(&arc(&[]), &[conn(40000, 1200, 50)], t);
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let mut sums = std::collections::BTreeMap::new();
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let s = sums.entry(v["sport"].as_u64().unwrap()).or_insert((0, 0));
            s.0 += v["sent"]["bytes"].as_u64().unwrap();
            s.1 += v["received"]["bytes"].as_u64().unwrap();
        }
        assert_eq!(
            sums.into_iter().collect::<Vec<_>>(),
            [(40000, (1200, 50)), (40001, (70, 0))]
        );
    }

    #[test]
    fn the_lines_of_a_connection_sum_to_its_totals() {
        let mut d = Deltas::default();
        let mut sum = 0;
        for bytes in [100, 100, 250, 1000, 1000, 4096] {
            for l in lines(&mut d, &[conn(40000, bytes, 0)]) {
                sum += l["sent"]["bytes"].as_u64().unwrap();
            }
        }
        assert_eq!(sum, 4096);
    }
}
