//! What a run keeps of connections the source no longer lists
//! (`Reading::retired`), within bounds:
//!
//! - the interval rollups (`flowtable::rollup`), which `/query?last=`
//!   answers from, fed with every reading;
//! - the metric groups' sums of retired connections, so that `/metrics`
//!   counters never go down when connections leave the listing (at most
//!   [`MAX_SERIES`] groups; more are summed into the `other` group);
//! - for the final output, up to `--list-max` retired connections; the
//!   rest are counted and summed in one line.
//!
//! Every bound's fill and what it folded is in [`Bounds`] (`/metrics`,
//! `/health`).

use std::sync::{Arc, Mutex};

use flowtable::query::{QueryResult, QuerySpec};
use flowtable::rollup::{RollupSettings, RollupStats, Rollups};
use flowtable::{Connection, DirStats};

/// Metric groups kept for retired connections.
pub const MAX_SERIES: usize = 10_000;

/// The fills and folds of the bounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bounds {
    /// Connections retired by the source so far.
    pub retired: u64,
    /// Retired connections kept for the final output, and its bound.
    pub listed_ended: usize,
    pub list_max: usize,
    /// Retired connections beyond `list_max`: summed, not listed.
    pub unlisted: u64,
    /// Metric groups folded into `other` by [`MAX_SERIES`].
    pub folded_series: u64,
    pub rollups: RollupStats,
    pub rollup_settings: Option<RollupSettings>,
}

/// The retired connections beyond `--list-max`, summed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unlisted {
    pub conns: u64,
    pub sent: DirStats,
    pub received: DirStats,
}

pub struct History {
    rollups: Arc<Mutex<Rollups>>,
    /// The metric query and its sums over retired connections.
    metrics: Option<(QuerySpec, Arc<QueryResult>)>,
    listed: Vec<Connection>,
    unlisted: Unlisted,
    bounds: Bounds,
}

/// Locks `m` even if a thread panicked while holding it: the rollups are
/// plain sums, still consistent between two updates.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl History {
    /// `metrics`: the query of `/metrics`' groups, when there is an agent.
    pub fn new(rollups: RollupSettings, list_max: usize, metrics: Option<QuerySpec>) -> History {
        History {
            rollups: Arc::new(Mutex::new(Rollups::new(rollups))),
            metrics: metrics.map(|spec| {
                let empty = spec.run(&[], 0);
                (spec, Arc::new(empty))
            }),
            listed: Vec::new(),
            unlisted: Unlisted::default(),
            bounds: Bounds {
                list_max,
                rollup_settings: Some(rollups),
                ..Bounds::default()
            },
        }
    }

    /// One reading at `now_ns` (Unix time): its listed connections
    /// (kept by the rollups until the next) and those it retired.
    pub fn update(&mut self, conns: &Arc<Vec<Connection>>, retired: &[Connection], now_ns: u64) {
        {
            let mut rollups = lock(&self.rollups);
            rollups.update(now_ns, Arc::clone(conns), retired);
            self.bounds.rollups = rollups.stats();
        }
        if retired.is_empty() {
            return;
        }
        self.bounds.retired += retired.len() as u64;
        if let Some((spec, totals)) = &mut self.metrics {
            let t = Arc::make_mut(totals);
            t.absorb(&spec.run(retired, 0));
            self.bounds.folded_series += t.cap(MAX_SERIES) as u64;
        }
        for c in retired {
            if self.listed.len() < self.bounds.list_max {
                self.listed.push(c.clone());
            } else {
                self.unlisted.conns += 1;
                self.unlisted.sent.add(&c.sent);
                self.unlisted.received.add(&c.received);
            }
        }
        self.bounds.listed_ended = self.listed.len();
        self.bounds.unlisted = self.unlisted.conns;
    }

    /// The metric groups' sums over retired connections, to save.
    pub fn saved_metrics(&self) -> Option<Vec<flowtable::query::SavedRow>> {
        self.metrics.as_ref().map(|(_, t)| t.saved_rows())
    }

    /// Continues the sums a run that is gone saved.
    pub fn restore_metrics(&mut self, rows: &[flowtable::query::SavedRow]) {
        if let Some((_, totals)) = &mut self.metrics {
            let t = Arc::make_mut(totals);
            t.restore_rows(rows);
            self.bounds.folded_series += t.cap(MAX_SERIES) as u64;
        }
    }

    pub fn rollups(&self) -> Arc<Mutex<Rollups>> {
        self.rollups.clone()
    }

    /// The metric groups' sums over retired connections.
    pub fn metric_totals(&self) -> Option<Arc<QueryResult>> {
        self.metrics.as_ref().map(|(_, t)| t.clone())
    }

    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    /// The retired connections kept for the final output, and the sum of
    /// the others.
    pub fn into_listed(self) -> (Vec<Connection>, Unlisted) {
        (self.listed, self.unlisted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::agent::metrics::{self, MetricLabels};
    use crate::export::agent::tests::conns;
    use crate::export::agent::Snapshot;
    use crate::sources::{AfpacketHealth, Health, Reading};

    fn reading(conns: Vec<Connection>, retired: Vec<Connection>) -> Reading {
        Reading {
            conns,
            retired,
            health: Health::Afpacket(AfpacketHealth::default()),
            nat: None,
            attrib: None,
        }
    }

    fn snapshot(h: &History, r: &Reading) -> Snapshot {
        Snapshot {
            conns: r.conns.clone().into(),
            rollups: Some(h.rollups()),
            retired_totals: h.metric_totals(),
            bounds: h.bounds(),
            nat: None,
            attrib: None,
            ..Snapshot::default()
        }
    }

    /// A run that restores the saved sums of retired connections serves
    /// the same counters (RTT histograms included) as the run that saved
    /// them.
    #[test]
    fn saved_metric_sums_restore_to_the_same_series() {
        let labels: MetricLabels = "src.ip,dst.port".parse().unwrap();
        let mut h = History::new(RollupSettings::default(), 2, Some(labels.spec()));
        let all = conns();
        let t0 = 1_700_000_000_000_000_000;
        let gone = reading(Vec::new(), all.clone());
        h.update(&Arc::new(gone.conns.clone()), &gone.retired, t0);
        let rows = h.saved_metrics().unwrap();
        let text = serde_json::to_string(&rows).unwrap();
        let mut again = History::new(RollupSettings::default(), 2, Some(labels.spec()));
        again.restore_metrics(&serde_json::from_str::<Vec<_>>(&text).unwrap());
        let empty = reading(Vec::new(), Vec::new());
        let series = |h: &History| -> Vec<String> {
            metrics::encode(&snapshot(h, &empty), &labels)
                .lines()
                .filter(|l| l.starts_with("flowprobe_") && l.contains('{'))
                .filter(|l| !l.contains("rollup") && !l.contains("retired"))
                .map(str::to_owned)
                .collect()
        };
        assert!(series(&h)
            .iter()
            .any(|l| l.starts_with("flowprobe_sent_bytes_total{")));
        assert_eq!(series(&h), series(&again));
    }

    /// Connections leaving the listing leave `/metrics`' counters as they
    /// were, and the final list keeps `--list-max` of them, summing the rest.
    #[test]
    fn retiring_changes_no_counter_and_the_list_is_bounded() {
        let labels: MetricLabels = "src.ip,dst.port".parse().unwrap();
        let mut h = History::new(RollupSettings::default(), 2, Some(labels.spec()));
        let all = conns();
        let t0 = 1_700_000_000_000_000_000;
        let first = reading(all.clone(), Vec::new());
        h.update(&Arc::new(first.conns.clone()), &first.retired, t0);
        let before = metrics::encode(&snapshot(&h, &first), &labels);
        // Three of the five leave the listing.
        let (retired, listed) = all.split_at(3);
        let second = reading(listed.to_vec(), retired.to_vec());
        h.update(
            &Arc::new(second.conns.clone()),
            &second.retired,
            t0 + 1_000_000_000,
        );
        let after = metrics::encode(&snapshot(&h, &second), &labels);
        let series = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| {
                    l.starts_with("flowprobe_sent_bytes_total{")
                        || l.starts_with("flowprobe_connections_total{")
                })
                .map(str::to_owned)
                .collect()
        };
        assert!(!series(&before).is_empty());
        assert_eq!(series(&before), series(&after));
        let b = h.bounds();
        assert_eq!((b.retired, b.listed_ended, b.unlisted), (3, 2, 1));
        let (listed, unlisted) = h.into_listed();
        assert_eq!(listed.len(), 2);
        assert_eq!(unlisted.sent.bytes, retired[2].sent.bytes);
    }
}
