//! The query language (`--src`, `--dst`, `--where`, `--sort`, `--top`,
//! `--window`, `--last`) from arbitrary strings, run over a fixed set of
//! connections and over rollups of them: a query parses or fails with a
//! message; when it runs, its rows add up to the connections it selected.
#![no_main]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use flowtable::query::{origin, QueryArgs, QuerySpec};
use flowtable::rollup::{RollupSettings, Rollups};
use flowtable::{Connection, DirStats};
use libfuzzer_sys::fuzz_target;

fn conns() -> Vec<Connection> {
    (0..6u8)
        .map(|i| Connection {
            proto: if i % 3 == 0 { flowtable::Proto::Udp } else { flowtable::Proto::Tcp },
            src: IpAddr::from([10, 0, i % 2, 1 + i]),
            sport: 40000 + u16::from(i),
            dst: if i % 2 == 0 {
                IpAddr::from([10, 0, 1, 1])
            } else {
                "fd00::1".parse().unwrap()
            },
            dport: [80, 443, 53][usize::from(i % 3)],
            iface: u32::from(i % 2),
            first_seen: 1_000_000_000 * u64::from(i),
            last_seen: 1_000_000_000 * u64::from(i + 3),
            sent: DirStats::counts(2, 100 * u64::from(i + 1), 0).with_loss(flowtable::Loss {
                retransmits: u64::from(i % 2),
                ..Default::default()
            }),
            received: DirStats::counts(1, 1000, 0),
            rtt: Default::default(),
            src_tags: BTreeMap::from([("service".to_owned(), format!("s{}", i % 3))]).into(),
            dst_tags: BTreeMap::from([("service".to_owned(), "db".to_owned())]).into(),
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\u{1}');
    let mut next = || parts.next().map(str::to_owned);
    let args = QueryArgs {
        src: next(),
        dst: next(),
        wheres: next().into_iter().collect(),
        sort: next(),
        top: next().and_then(|t| t.parse().ok()),
        window: next(),
        last: next(),
        raw_ports: data.first().is_some_and(|b| b & 1 == 1),
    };
    let spec = match QuerySpec::parse(&args) {
        Ok(s) => s,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let c = conns();
    let result = match spec.last {
        None => spec.run(&c, origin(&c)),
        Some(last) => {
            let mut r = Rollups::new(RollupSettings {
                interval: Duration::from_secs(1),
                ..RollupSettings::default()
            });
            r.update(5_000_000_000, c.clone(), &[]);
            r.query(&spec, last)
        }
    };
    let selected = c.iter().filter(|x| spec.filter.matches(x)).count() as u64;
    let rows: u64 = result.rows.iter().map(|r| r.conns).sum();
    if spec.window.is_none() {
        assert_eq!(rows, selected, "{args:?}");
    } else {
        assert!(rows <= selected, "{args:?}");
    }
});
