//! The query flags of `flowprobe replay` (README, "Queries"); the query
//! itself is `flowtable::query`, shared with a later live query.

use flowtable::query::{QueryArgs, QueryError, QuerySpec};

/// Grouped query instead of one row per connection. Any of these flags
/// turns it on; see the README, "Queries".
#[derive(Clone, clap::Args)]
#[command(next_help_heading = "Query (any of these prints grouped rows)")]
pub struct QueryFlags {
    /// Group by these tag keys of the initiator's end, comma-separated:
    /// ip, ip/NN, port, proto, iface, or any tag (service, process...).
    /// Default: nothing when --dst is given, else `service`.
    #[arg(long, value_name = "TAGS")]
    src: Option<String>,
    /// Group by these tag keys of the responder's end (as --src).
    #[arg(long, value_name = "TAGS")]
    dst: Option<String>,
    /// Only connections matching EXPR, e.g. 'src.ip in 10.0.0.0/8 and
    /// dst.port in (80, 443)'. Repeat to AND several.
    #[arg(long = "where", value_name = "EXPR")]
    wheres: Vec<String>,
    /// Order rows by METRIC, descending (METRIC:asc for ascending):
    /// bytes, sent_bytes, received_bytes, packets, sent_packets,
    /// received_packets, retransmits, sent_retransmits,
    /// received_retransmits, retransmitted_bytes, conns, bandwidth,
    /// rtt_p50, rtt_p90, rtt_p99, rtt_max.
    #[arg(long, value_name = "METRIC")]
    sort: Option<String>,
    /// Keep the first N rows and sum the rest into one `other` row.
    #[arg(long, value_name = "N")]
    top: Option<usize>,
    /// Only connections that overlap START..END, seconds after the first
    /// packet (either may be left out: 2.5.., ..10); bandwidth is over it.
    #[arg(long, value_name = "START..END", allow_hyphen_values = true)]
    window: Option<String>,
    /// Agent only: what the last DURATION (30s, 5m, 1h) added, from the
    /// agent's interval rollups; bandwidth is the rate over it.
    #[arg(long, value_name = "DURATION")]
    last: Option<String>,
    /// Group initiator ports as they are instead of as `ephemeral`.
    #[arg(long)]
    raw_ports: bool,
}

impl QueryFlags {
    pub fn given(&self) -> bool {
        self.src.is_some()
            || self.dst.is_some()
            || !self.wheres.is_empty()
            || self.sort.is_some()
            || self.top.is_some()
            || self.window.is_some()
            || self.last.is_some()
            || self.raw_ports
    }

    /// The flags as the agent's `/query` parameters (URL-encoded, without
    /// the `?`).
    pub fn params(&self) -> String {
        let enc = crate::agent::client::encode;
        let mut p: Vec<String> = Vec::new();
        let mut add = |k: &str, v: &str| p.push(format!("{k}={}", enc(v)));
        if let Some(v) = &self.src {
            add("src", v);
        }
        if let Some(v) = &self.dst {
            add("dst", v);
        }
        for w in &self.wheres {
            add("where", w);
        }
        if let Some(v) = &self.sort {
            add("sort", v);
        }
        if let Some(v) = self.top {
            add("top", &v.to_string());
        }
        if let Some(v) = &self.window {
            add("window", v);
        }
        if let Some(v) = &self.last {
            add("last", v);
        }
        if self.raw_ports {
            add("raw_ports", "1");
        }
        p.join("&")
    }

    pub fn spec(self) -> Result<QuerySpec, QueryError> {
        QuerySpec::parse(&QueryArgs {
            src: self.src,
            dst: self.dst,
            wheres: self.wheres,
            sort: self.sort,
            top: self.top,
            window: self.window,
            last: self.last,
            raw_ports: self.raw_ports,
        })
    }
}

#[cfg(test)]
mod tests {
    use flowtable::query::origin;

    use super::*;
    use crate::export::agent::{self, tests::conns};
    use crate::export::print::{self as output, Format};

    /// `flowprobe query`'s flags, sent as parameters, parse on the agent
    /// to the query they parse to here.
    #[test]
    fn query_flags_survive_the_trip() {
        use clap::Parser;

        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            q: QueryFlags,
        }
        let shared = agent::Latest::default();
        let addr = agent::start(
            "127.0.0.1:0".parse().unwrap(),
            shared.clone(),
            agent::MetricLabels::default(),
        )
        .unwrap();
        shared.publish(agent::Snapshot {
            conns: conns(),
            ..agent::Snapshot::default()
        });
        let c = conns();
        for args in [
            &[
                "--src",
                "ip/24",
                "--dst",
                "ip,port",
                "--where",
                "dst.port in (80, 443)",
            ][..],
            &[
                "--dst",
                "port",
                "--sort",
                "retransmits",
                "--top",
                "1",
                "--raw-ports",
            ],
            &[
                "--src",
                "ip",
                "--where",
                "src.ip in 10.0.0.0/8",
                "--where",
                "dst.port!=443",
            ],
            &["--window", "1..3", "--dst", "ip"],
            &[],
        ] {
            let flags = Cli::try_parse_from([&["t"][..], args].concat()).unwrap().q;
            let path = format!("/query?{}", flags.params());
            let local = flags.spec().unwrap().run(&c, origin(&c));
            let mut want = Vec::new();
            output::write_query(&mut want, Format::Json, &local).unwrap();
            let got = agent::client::get(addr, &path).unwrap();
            assert_eq!(got, want, "{args:?} as {path}");
        }
    }
}
