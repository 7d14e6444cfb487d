//! The query flags of `flowprobe replay` (README, "Queries"); the query
//! itself is `flowtable::query`, shared with a later live query.

use flowtable::query::{QueryArgs, QueryError, QuerySpec};

/// Grouped query instead of one row per connection. Any of these flags
/// turns it on; see the README, "Queries".
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
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

    /// The flags given, in their order, as (parameter name, value); `None`
    /// for a switch. The one list [`QueryFlags::params`] (the agent's URL)
    /// and [`QueryFlags::args`] (the command line) are made from, so a new
    /// flag is one line here.
    fn pairs(&self) -> Vec<(&'static str, Option<String>)> {
        let mut p = Vec::new();
        let src = self.src.clone().map(|v| ("src", Some(v)));
        let dst = self.dst.clone().map(|v| ("dst", Some(v)));
        p.extend(src.into_iter().chain(dst));
        p.extend(self.wheres.iter().map(|w| ("where", Some(w.clone()))));
        p.extend(self.sort.clone().map(|v| ("sort", Some(v))));
        p.extend(self.top.map(|v| ("top", Some(v.to_string()))));
        p.extend(self.window.clone().map(|v| ("window", Some(v))));
        p.extend(self.last.clone().map(|v| ("last", Some(v))));
        p.extend(self.raw_ports.then_some(("raw_ports", None)));
        p
    }

    /// The flags as the agent's `/query` parameters (URL-encoded, without
    /// the `?`).
    pub fn params(&self) -> String {
        let enc = crate::agent::client::encode;
        self.pairs()
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_deref().map_or_else(|| "1".to_owned(), enc)))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// The flags as command-line arguments (`--src`, `ip`, ...), as
    /// `flowprobe query` takes them.
    pub fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        for (k, v) in self.pairs() {
            a.push(format!("--{}", k.replace('_', "-")));
            a.extend(v);
        }
        a
    }

    pub fn set_group(&mut self, src: Option<String>, dst: Option<String>) {
        self.src = src;
        self.dst = dst;
    }

    pub fn wheres(&self) -> &[String] {
        &self.wheres
    }

    pub fn set_wheres(&mut self, wheres: Vec<String>) {
        self.wheres = wheres;
    }

    pub fn sort(&self) -> Option<&str> {
        self.sort.as_deref()
    }

    pub fn set_sort(&mut self, sort: Option<String>) {
        self.sort = sort;
    }

    pub fn set_top(&mut self, top: Option<usize>) {
        self.top = top;
    }

    pub fn set_raw_ports(&mut self, raw: bool) {
        self.raw_ports = raw;
    }

    /// The same selection summed into one row: no group-by, no sort, no
    /// top (the totals a UI shows above the rows).
    pub fn totals(&self) -> QueryFlags {
        QueryFlags {
            src: Some(String::new()),
            dst: Some(String::new()),
            sort: None,
            top: None,
            ..self.clone()
        }
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
            conns: conns().into(),
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
