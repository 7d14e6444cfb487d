//! What `top` shows, as the agent says it: the rows of `/query` (JSON
//! lines, the [query row contract](../../../docs/json-contract.md)), the
//! totals row of the same selection, and `/health`. A replay produces the
//! very same JSON lines from the same query engine, so both modes go
//! through one parse and nothing here computes a number of its own.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// One direction's counters of a row.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Dir {
    pub packets: u64,
    pub bytes: u64,
    pub retransmits: u64,
    pub retransmitted_bytes: u64,
}

/// RTT percentiles of one leg (`None`: no sample).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Rtt {
    pub samples: u64,
    pub p50_us: Option<u64>,
    pub p90_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub max_us: Option<u64>,
}

/// One query row, as `/query?format=json` gives it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Row {
    pub src: BTreeMap<String, Option<String>>,
    pub dst: BTreeMap<String, Option<String>>,
    pub other: bool,
    pub conns: u64,
    pub sent: Dir,
    pub received: Dir,
    pub seconds: f64,
    pub bandwidth_bytes_per_s: Option<f64>,
    /// Each direction's rate and the share retransmitted, as `/query`
    /// gives them (absent from an agent older than these fields).
    #[serde(default)]
    pub sent_bytes_per_s: Option<f64>,
    #[serde(default)]
    pub received_bytes_per_s: Option<f64>,
    #[serde(default)]
    pub retransmit_pct: Option<f64>,
    pub rtt_dst: Rtt,
}

/// A query's answer: the group-by keys (in the query's order, which JSON
/// objects do not keep) and the rows, each with the JSON object it was
/// read from (for the export).
#[derive(Clone, Debug, Default)]
pub struct Answer {
    pub src_keys: Vec<String>,
    pub dst_keys: Vec<String>,
    pub rows: Vec<Row>,
    pub raw: Vec<Value>,
}

impl Answer {
    /// Parses `/query`'s JSON lines.
    pub fn parse(
        src_keys: Vec<String>,
        dst_keys: Vec<String>,
        body: &[u8],
    ) -> Result<Answer, String> {
        let text = std::str::from_utf8(body).map_err(|_| "the answer is not UTF-8".to_owned())?;
        let mut a = Answer {
            src_keys,
            dst_keys,
            ..Answer::default()
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value =
                serde_json::from_str(line).map_err(|e| format!("a row is not JSON: {e}"))?;
            let r: Row = serde_json::from_value(v.clone())
                .map_err(|e| format!("a row is not a query row: {e}"))?;
            a.rows.push(r);
            a.raw.push(v);
        }
        Ok(a)
    }

    /// The row's values of the group-by keys, src keys then dst keys
    /// (`None` for an end without the tag, and in the `other` row).
    pub fn cells(&self, r: &Row) -> Vec<Option<String>> {
        let get = |m: &BTreeMap<String, Option<String>>, k: &String| m.get(k).cloned().flatten();
        self.src_keys
            .iter()
            .map(|k| get(&r.src, k))
            .chain(self.dst_keys.iter().map(|k| get(&r.dst, k)))
            .collect()
    }
}

/// `/health`, the fields `top` shows.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Health {
    pub backend: String,
    pub connections: u64,
    pub interfaces: Vec<Interface>,
    pub map: Option<Map>,
    pub packets: Option<Packets>,
    pub rings: Option<Rings>,
    pub export: Option<Export>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Interface {
    pub iface: String,
    pub mode: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Map {
    pub entries: u64,
    pub capacity: u64,
    pub full: u64,
    pub insert_failed: u64,
    pub contended: u64,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Packets {
    pub tracked: u64,
    pub duplicate: u64,
    pub skipped: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Rings {
    pub packets: u64,
    pub drops: u64,
    pub freezes: u64,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Export {
    pub failed_writes: u64,
    pub behind: bool,
    pub last_error: Option<String>,
}

/// Where a replay is (replay mode only).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Playback {
    /// Capture time played, seconds after the first frame.
    pub at_s: f64,
    /// The capture's length, seconds.
    pub length_s: f64,
    pub frame: usize,
    pub frames: usize,
    pub speed: f64,
    pub done: bool,
}

/// Everything the screen is drawn from besides the view state.
#[derive(Clone, Debug, Default)]
pub struct Data {
    /// `agent 127.0.0.1:9911` or `replay a.pcap b.pcap`.
    pub source: String,
    /// How the shown command starts: `flowprobe query --agent ADDR` or
    /// `flowprobe replay FILE…`.
    pub command: Vec<String>,
    pub answer: Answer,
    /// The same selection without group-by: one row (none when nothing
    /// is selected).
    pub totals: Option<Row>,
    pub health: Health,
    pub playback: Option<Playback>,
    /// The last fetch failed (the rows are the last good ones).
    pub error: Option<String>,
    /// The query changed and its answer has not come yet: no rows are
    /// shown meanwhile, so rows never stand under another query's command.
    pub pending: bool,
}
