//! Simulated hosts for the fleet benchmark (bench/fleet.sh): `--hosts N`
//! agents, each publishing `--intervals K` interval messages of `--rows M`
//! rows (schema 1 of docs/fleet.md) to the stream, as fast as JetStream
//! acknowledges them. Half of each host's rows are client rows to other
//! simulated hosts' port 5432 (whose server rows they publish too), the
//! rest to addresses no host has. With `--conns N` (more than `--rows`) a
//! host stands for N groups of connections and publishes as an agent with
//! `--fleet-top ROWS` does: the ROWS largest, and the rest summed per view
//! in `folded`. Prints what it sent and how long it took.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use async_nats::jetstream;
use async_nats::HeaderMap;
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Publish simulated fleet hosts' interval messages")]
struct Args {
    /// nats://HOST:PORT
    #[arg(long)]
    nats: String,
    #[arg(long, default_value_t = 1000)]
    hosts: u32,
    /// Rows per interval message (an agent's --fleet-top).
    #[arg(long, default_value_t = 1000)]
    rows: u32,
    /// Groups of connections per host and interval (default: --rows); those
    /// beyond --rows are folded per view, as an agent folds them.
    #[arg(long)]
    conns: Option<u32>,
    #[arg(long, default_value_t = 3)]
    intervals: u32,
    /// Interval length, seconds.
    #[arg(long, default_value_t = 10)]
    interval: u64,
    /// Publishes awaiting their acknowledgement at once.
    #[arg(long, default_value_t = 256)]
    inflight: usize,
}

const T0_S: u64 = 1_800_000_000;

fn host_ip(h: u32) -> String {
    format!(
        "10.{}.{}.{}",
        100 + (h >> 16) % 100,
        (h >> 8) & 255,
        h & 255
    )
}

fn dir(bytes: u64) -> Value {
    json!({"packets": bytes / 1000 + 1, "bytes": bytes, "l3_bytes": bytes + 52 * (bytes / 1000 + 1),
           "retransmits": 0, "retransmitted_bytes": 0, "probes": 0, "gaps": 0})
}

fn row(view: &str, local: (&str, u16, &str), remote: (&str, u16), bytes: u64, t: u64) -> Value {
    json!({
        "view": view, "proto": "tcp",
        "local": {"ip": local.0, "port": local.1, "tags": {"service": local.2, "process": "bench"}},
        "remote": {"ip": remote.0, "port": remote.1},
        "conns": 1, "sent": dir(bytes), "received": dir(bytes / 3),
        "first_seen_ns": t, "last_seen_ns": t + 1_000_000,
        "rtt_dst": {"max_us": 250, "buckets": [[100, 3], [250, 1]]}
    })
}

/// Group `r`'s bytes on host `h` in interval `k`: the first `rows` groups
/// are the largest (an agent publishes those), the rest smaller.
fn group_bytes(a: &Args, h: u32, r: u32, k: u32) -> u64 {
    let b = 1000 + u64::from((h * 7919 + r * 104_729 + k) % 100_000);
    if r < a.rows {
        b + 1_000_000
    } else {
        b
    }
}

/// The sums of what is folded, one view's: groups, and per direction
/// the sums of [`dir`]'s packets, bytes and l3_bytes.
#[derive(Default)]
struct Fold {
    groups: u64,
    sent: [u64; 3],
    received: [u64; 3],
}

fn add_dir(d: &mut [u64; 3], bytes: u64) {
    let packets = bytes / 1000 + 1;
    d[0] += packets;
    d[1] += bytes;
    d[2] += bytes + 52 * packets;
}

fn folded_dir(d: [u64; 3]) -> Value {
    json!({"packets": d[0], "bytes": d[1], "l3_bytes": d[2],
           "retransmits": 0, "retransmitted_bytes": 0, "probes": 0, "gaps": 0})
}

/// Host `h`'s message for interval `k`.
fn message(a: &Args, h: u32, k: u32) -> Vec<u8> {
    let start = (T0_S + u64::from(k) * a.interval) * 1_000_000_000;
    let me = host_ip(h);
    let svc = format!("svc-{}", h % 50);
    let mut rows = Vec::with_capacity(a.rows as usize);
    let (mut client, mut server) = (Fold::default(), Fold::default());
    let conns = a.conns.unwrap_or(a.rows).max(a.rows);
    for r in a.rows..conns {
        let bytes = group_bytes(a, h, r, k);
        let f = if r % 4 == 1 { &mut server } else { &mut client };
        f.groups += 1;
        add_dir(&mut f.sent, bytes);
        add_dir(&mut f.received, bytes / 3);
    }
    for r in 0..a.rows {
        let bytes = group_bytes(a, h, r, k);
        if r % 2 == 0 {
            // A client row to host h+1+r/2 (mod hosts): that host publishes
            // the server row below.
            let peer = (h + 1 + r / 2) % a.hosts;
            rows.push(row(
                "client",
                (&me, 1024, &svc),
                (&host_ip(peer), 5432),
                bytes,
                start,
            ));
        } else if r % 4 == 1 {
            // The server row of host h-1-r/4's client row.
            let peer = (h + a.hosts - 1 - (r / 4) % a.hosts) % a.hosts;
            rows.push(row(
                "server",
                (&me, 5432, &svc),
                (&host_ip(peer), 1024),
                bytes,
                start,
            ));
        } else {
            let ext = format!("192.0.{}.{}", (r >> 8) & 255, r & 255);
            rows.push(row("client", (&me, 1024, &svc), (&ext, 443), bytes, start));
        }
    }
    let mut folded = serde_json::Map::new();
    for (view, f) in [("client", client), ("server", server)] {
        if f.groups > 0 {
            folded.insert(
                view.to_owned(),
                json!({"groups": f.groups, "conns": f.groups,
                       "sent": folded_dir(f.sent),
                       "received": folded_dir(f.received)}),
            );
        }
    }
    serde_json::to_vec(&json!({
        "schema": 1, "host": format!("h{h}"), "network": "default",
        "run": T0_S, "seq": k, "start_ns": start,
        "end_ns": start + a.interval * 1_000_000_000,
        "addresses": [me], "rows": rows, "folded": folded, "spool_dropped": 0
    }))
    .expect("serialises")
}

fn main() -> Result<()> {
    let a = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let c = async_nats::connect(a.nats.as_str())
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let mut js = jetstream::new(c);
        js.set_timeout(Duration::from_secs(30));
        let t = Instant::now();
        let (mut sent, mut bytes, mut build) = (0u64, 0u64, Duration::ZERO);
        let mut pending = std::collections::VecDeque::new();
        for k in 0..a.intervals {
            for h in 0..a.hosts {
                let b = Instant::now();
                let payload = message(&a, h, k);
                build += b.elapsed();
                bytes += payload.len() as u64;
                let mut hd = HeaderMap::new();
                hd.insert("Nats-Msg-Id", format!("h{h}.{T0_S}.{k}").as_str());
                let ack = js
                    .publish_with_headers(format!("flowprobe.rows.h{h}"), hd, payload.into())
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                pending.push_back(ack);
                if pending.len() >= a.inflight {
                    pending
                        .pop_front()
                        .expect("not empty")
                        .await
                        .map_err(|e| anyhow!("{e}"))?;
                }
                sent += 1;
            }
        }
        for ack in pending {
            ack.await.map_err(|e| anyhow!("{e}"))?;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "sent {sent} messages ({} rows, {:.1} MB) in {secs:.2} s: {:.0} messages/s; building them took {:.2} s",
            sent * u64::from(a.rows),
            bytes as f64 / 1e6,
            sent as f64 / secs,
            build.as_secs_f64()
        );
        Ok(())
    })
}
