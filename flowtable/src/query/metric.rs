//! What rows can be sorted by.

use std::fmt;
use std::str::FromStr;

/// A row metric. Sums are over both directions unless named `sent_` or
/// `received_`; `rtt_*` are of the `dst` leg (capture point → responder →
/// capture point).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Bytes,
    SentBytes,
    ReceivedBytes,
    Packets,
    SentPackets,
    ReceivedPackets,
    Retransmits,
    SentRetransmits,
    ReceivedRetransmits,
    RetransmittedBytes,
    /// Retransmitted bytes over bytes, in percent.
    RetransmitPct,
    Conns,
    Bandwidth,
    RttP50,
    RttP90,
    RttP99,
    RttMax,
}

impl Metric {
    pub const ALL: [Metric; 17] = [
        Metric::Bytes,
        Metric::SentBytes,
        Metric::ReceivedBytes,
        Metric::Packets,
        Metric::SentPackets,
        Metric::ReceivedPackets,
        Metric::Retransmits,
        Metric::SentRetransmits,
        Metric::ReceivedRetransmits,
        Metric::RetransmittedBytes,
        Metric::RetransmitPct,
        Metric::Conns,
        Metric::Bandwidth,
        Metric::RttP50,
        Metric::RttP90,
        Metric::RttP99,
        Metric::RttMax,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Bytes => "bytes",
            Metric::SentBytes => "sent_bytes",
            Metric::ReceivedBytes => "received_bytes",
            Metric::Packets => "packets",
            Metric::SentPackets => "sent_packets",
            Metric::ReceivedPackets => "received_packets",
            Metric::Retransmits => "retransmits",
            Metric::SentRetransmits => "sent_retransmits",
            Metric::ReceivedRetransmits => "received_retransmits",
            Metric::RetransmittedBytes => "retransmitted_bytes",
            Metric::RetransmitPct => "retransmit_pct",
            Metric::Conns => "conns",
            Metric::Bandwidth => "bandwidth",
            Metric::RttP50 => "rtt_p50",
            Metric::RttP90 => "rtt_p90",
            Metric::RttP99 => "rtt_p99",
            Metric::RttMax => "rtt_max",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("--sort: unknown metric `{given}` (one of: {})", Metric::ALL.map(Metric::name).join(", "))]
pub struct MetricError {
    pub given: String,
}

impl FromStr for Metric {
    type Err = MetricError;

    fn from_str(s: &str) -> Result<Metric, MetricError> {
        Metric::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| MetricError {
                given: s.to_owned(),
            })
    }
}

/// A metric and a direction: `bytes` (descending, the default),
/// `bytes:asc`, `bytes:desc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sort {
    pub metric: Metric,
    pub descending: bool,
}

impl Default for Sort {
    fn default() -> Sort {
        Sort {
            metric: Metric::Bytes,
            descending: true,
        }
    }
}

impl FromStr for Sort {
    type Err = MetricError;

    fn from_str(s: &str) -> Result<Sort, MetricError> {
        let (m, descending) = match s.rsplit_once(':') {
            Some((m, "asc")) => (m, false),
            Some((m, "desc")) => (m, true),
            _ => (s, true),
        };
        Ok(Sort {
            metric: m.trim().parse()?,
            descending,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Metric::ALL {
            assert_eq!(m.name().parse::<Metric>().unwrap(), m);
        }
        assert_eq!(
            "conns:asc".parse::<Sort>().unwrap(),
            Sort {
                metric: Metric::Conns,
                descending: false
            }
        );
        let e = "byte".parse::<Sort>().unwrap_err().to_string();
        assert!(
            e.starts_with("--sort: unknown metric `byte` (one of: bytes, "),
            "{e}"
        );
        assert!("bytes:up".parse::<Sort>().is_err());
    }
}
