use std::io::{Read, Write as _};
use std::path::Path;

use flowtable::query::{origin, QueryArgs, QuerySpec};
use flowtable::Connection;

use super::*;
use crate::export::agent::tests::conns;
use crate::export::agent::{client, start, MetricLabels, Snapshot};

/// A golden file under `fixtures/goldens/` (`UPDATE_EXPECT=1` rewrites it).
macro_rules! golden {
    ($name:expr) => {
        expect_test::expect_file![Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/goldens")
            .join($name)]
    };
}

/// What a hostile process can put into its tags.
const HOSTILE: &[&str] = &[
    "<script>window.pwned=1</script>",
    "\"><img src=x onerror=\"window.pwned=1\">",
    "]]><!--",
    "nul\0byte",
    "\x1b[31mred\x1b[0m\x07",
    "=HYPERLINK(\"http://x\")",
    "'; alert(1); '",
];

fn hostile_conns() -> Vec<Connection> {
    let mut c = conns();
    for (i, conn) in c.iter_mut().enumerate() {
        conn.src_tags
            .insert("service".into(), HOSTILE[i % HOSTILE.len()].into());
        conn.dst_tags
            .insert("service".into(), HOSTILE[(i + 3) % HOSTILE.len()].into());
        conn.src_tags.insert("process".into(), "-cmd".into());
    }
    c
}

fn run(c: &[Connection], raw: &str) -> (Params, QueryResult) {
    let p = Params::parse(raw).unwrap();
    let mut a = QueryArgs::default();
    for (k, v) in &p.query {
        match k.as_str() {
            "src" => a.src = Some(v.clone()),
            "dst" => a.dst = Some(v.clone()),
            "where" => a.wheres.push(v.clone()),
            "top" => a.top = Some(v.parse().unwrap()),
            "sort" => a.sort = Some(v.clone()),
            "raw_ports" => a.raw_ports = true,
            _ => panic!("{k}"),
        }
    }
    let r = QuerySpec::parse(&a).unwrap().run(c, origin(c));
    (p, r)
}

/// The map parsed as XML: (edge count, every text of titles and labels).
fn parse_svg(svg: &str) -> (usize, Vec<String>) {
    let doc = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
    let edges = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("edge"))
        .count();
    let texts = doc
        .descendants()
        .filter(|n| n.is_element() && matches!(n.tag_name().name(), "title" | "text"))
        .map(|n| n.text().unwrap_or("").to_owned())
        .collect();
    (edges, texts)
}

#[test]
fn hostile_values_stay_text_in_page_svg_and_csv() {
    let c = hostile_conns();
    let (p, r) = run(&c, "src=service,process&dst=service");
    let page = page::render(&p, Ok(&r));
    for h in HOSTILE {
        if h.contains(['<', '>', '"', '\'', '\0', '\x1b']) {
            assert!(!page.contains(h), "{h:?} came through raw");
        }
    }
    assert!(page.contains("&lt;script&gt;window.pwned=1&lt;/script&gt;"));
    assert!(page.contains("&quot;&gt;&lt;img src=x onerror=&quot;window.pwned=1&quot;&gt;"));
    assert!(page.contains("nul\\x00byte"));
    assert!(page.contains("\\x1b[31mred\\x1b[0m\\x07"));
    assert!(!page.contains(['\0', '\x1b', '\x07']));
    // The only script is ours.
    assert_eq!(page.matches("<script").count(), 1);
    assert_eq!(page.matches("<img").count(), 0);

    let svg = map::svg(&r, &p);
    let (edges, texts) = parse_svg(&svg);
    assert_eq!(edges, r.rows.len());
    let all = texts.join("\n");
    assert!(all.contains("<script>window.pwned=1</script>"), "{all}");
    assert!(all.contains("]]><!--"));
    assert!(all.contains("nul\\x00byte"));
    assert!(!svg.contains("<script") && !svg.contains("<img"));

    let csv = csv(&r);
    assert!(csv.contains("\"'=HYPERLINK(\"\"http://x\"\")\""), "{csv}");
    assert!(csv.contains(",'-cmd,"), "{csv}");
    assert!(!csv.contains(['\0', '\x1b']));
    assert_eq!(csv.lines().count(), r.rows.len() + 1);
}

#[test]
fn the_table_shows_the_numbers_of_query() {
    let c = conns();
    let (p, r) = run(&c, "src=ip&dst=port&view=table");
    let page = page::render(&p, Ok(&r));
    let doc = roxmltree::Document::parse_with_options(
        // The rows' table is well-formed XML on its own.
        &page[page.find("<table").unwrap()..page.find("</table>").unwrap() + 8],
        roxmltree::ParsingOptions::default(),
    )
    .unwrap();
    let rows: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("tr"))
        .skip(1)
        .collect();
    assert_eq!(rows.len(), r.rows.len());
    for (tr, row) in rows.iter().zip(&r.rows) {
        let json = serde_json::to_value(row.json(&r)).unwrap();
        let cell = |c: &str| {
            tr.descendants()
                .find(|n| n.attribute("data-c") == Some(c))
                .and_then(|n| n.attribute("data-v"))
                .unwrap()
                .to_owned()
        };
        assert_eq!(cell("sent"), json["sent"]["bytes"].to_string());
        assert_eq!(cell("received"), json["received"]["bytes"].to_string());
        assert_eq!(
            cell("throughput"),
            json["bandwidth_bytes_per_s"].to_string()
        );
        assert_eq!(cell("conns"), json["conns"].to_string());
        assert_eq!(cell("RTT p99"), json["rtt_dst"]["p99_us"].to_string());
        let ip = tr
            .descendants()
            .find(|n| n.attribute("data-k") == Some("src.ip"))
            .unwrap();
        assert_eq!(ip.text(), json["src"]["ip"].as_str());
    }
    // The first row: 10.0.0.1 → 80, connections 0, 2, 4: 100+300+500 sent.
    assert_eq!(r.rows[0].sent.bytes, 900);
    assert!(page.contains("data-c=\"sent\" data-v=\"900\">900 B</td>"));
    // The CSV: every number of the JSON row, as the JSON writes it.
    let csv = csv(&r);
    let mut lines = csv.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(&head[..3], ["src.ip", "dst.port", "other"]);
    for (line, row) in lines.zip(&r.rows) {
        let json = serde_json::to_value(row.json(&r)).unwrap();
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), head.len());
        for (name, cell) in head.iter().zip(&cells).skip(3) {
            let v = name.split('.').fold(&json, |v, k| &v[k]);
            let want = match v {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s.clone(),
                n => n.to_string(),
            };
            assert_eq!(*cell, want, "{name}");
        }
        assert_eq!(cells[0], json["src"]["ip"].as_str().unwrap());
    }
    // Sorting is a link to the same query with `sort`.
    assert!(page.contains("href=\"/?src=ip&amp;dst=port&amp;sort=sent_bytes:desc\""));
}

#[test]
fn drill_down_selects_the_rows_connections() {
    let c = conns();
    let (p, r) = run(&c, "src=ip&dst=port&where=dst.port+in+(80,+443)");
    let q = p.drill(&r, &r.rows[0]).unwrap();
    let url = p.url_with(&q, View::Table, None);
    assert_eq!(
        url,
        "/?where=dst.port+in+(80,+443)&where=src.ip+=+%2210.0.0.1%22+and+dst.port+=+%2280%22&src=ip,port&dst=ip,port&raw_ports=1"
    );
    let (_, drilled) = run(&c, &url[2..]);
    assert_eq!(drilled.rows.len(), 3);
    assert_eq!(
        drilled.rows.iter().map(|r| r.conns).sum::<u64>(),
        r.rows[0].conns
    );
}

/// Fifty services in a chain: beyond `nodes`, the smallest fold into
/// `(other)`, and the folded edges keep the engine's sums.
#[test]
fn many_nodes_fold_into_other() {
    let c: Vec<Connection> = (0..50u32)
        .map(|i| {
            let mut conn = conns()[0].clone();
            conn.sport = 40000 + i as u16;
            conn.sent.bytes = 1000 * u64::from(i + 1);
            conn.sent.packets = 10;
            conn.sent.set_loss(flowtable::Loss {
                retransmits: u64::from(i % 3),
                ..Default::default()
            });
            conn.src_tags.insert("service".into(), format!("svc{i:02}"));
            if i % 7 != 0 {
                conn.dst_tags
                    .insert("service".into(), format!("svc{:02}", (i + 1) % 50));
            }
            conn
        })
        .collect();
    let (p, r) = run(&c, "nodes=8");
    let svg = map::svg(&r, &p);
    let (edges, texts) = parse_svg(&svg);
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let nodes = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("node"))
        .count();
    assert_eq!(nodes, 8);
    assert!(texts.iter().any(|t| t == "(other)"));
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("(other): 44 nodes folded")),
        "{texts:?}"
    );
    assert!(edges < r.rows.len());
    // Unknown servers: dashed.
    assert!(svg.contains("stroke-dasharray=\"6 4\""));
    // The same input, the same bytes.
    assert_eq!(svg, map::svg(&r, &p));
    golden!("map.synthetic.svg").assert_eq(&svg);

    // Focus: only the edges of one node.
    let (p, r) = run(&c, "nodes=8&focus=svc10");
    let (edges, _) = parse_svg(&map::svg(&r, &p));
    assert_eq!(edges, 2);
}

/// The map of each fixture capture, by address → address and port.
#[test]
fn map_of_the_fixture_captures_golden() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut names: Vec<String> = std::fs::read_dir(root.join("fixtures/pcaps"))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            n.strip_suffix(".pcap").map(str::to_owned)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 5, "{names:?}");
    for name in names {
        let mut table = flowtable::FlowTable::new();
        let mut stats = flowtable::FrameStats::default();
        let file = root.join(format!("fixtures/pcaps/{name}.pcap"));
        crate::sources::file::replay(
            &[file],
            &mut table,
            &mut stats,
            probe_common::Decap::DEFAULT,
        )
        .unwrap();
        let c = table.connections();
        for (suffix, raw) in [
            ("", "src=ip&dst=ip,port"),
            (".rtt", "src=ip&dst=ip&color=rtt"),
        ] {
            let (p, r) = run(&c, raw);
            let svg = map::svg(&r, &p);
            let (edges, _) = parse_svg(&svg);
            assert_eq!(edges, r.rows.len(), "{name}");
            golden!(format!("map.{name}{suffix}.svg")).assert_eq(&svg);
        }
    }
}

/// Over HTTP: the page, its assets, the map and the CSV, each with the
/// content security policy; no asset or reference outside the agent.
#[test]
fn served_by_the_agent() {
    let shared = Latest::default();
    let addr = start(
        "127.0.0.1:0".parse().unwrap(),
        shared.clone(),
        MetricLabels::default(),
    )
    .unwrap();
    // Before the first reading: an empty table and an empty map.
    let empty = client::get(addr, "/map.svg").unwrap();
    let (edges, _) = parse_svg(std::str::from_utf8(&empty).unwrap());
    assert_eq!(edges, 0);
    let page = String::from_utf8(client::get(addr, "/").unwrap()).unwrap();
    assert!(page.contains("0 rows, 0 connections"), "{page}");
    shared.publish(Snapshot {
        conns: hostile_conns().into(),
        ..Snapshot::default()
    });
    let get = |path: &str| -> (String, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        (head.to_ascii_lowercase(), body.to_owned())
    };
    let mut total = 0;
    for (path, ct) in [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/app.css", "text/css"),
        ("/map.svg?src=service&dst=service", "image/svg+xml"),
        ("/query.csv?src=service&dst=service", "text/csv"),
        ("/?view=map&where=src.service~%22*%22", "text/html"),
    ] {
        let (head, body) = get(path);
        assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
        assert!(
            head.contains(&format!("content-type: {ct}")),
            "{path}: {head}"
        );
        assert!(
            head.contains("content-security-policy: default-src 'self'"),
            "{head}"
        );
        // Every reference is to the agent itself.
        for attr in ["src=\"", "href=\"", "data=\""] {
            for (i, _) in body.match_indices(attr) {
                let v = &body[i + attr.len()..];
                assert!(
                    v.starts_with('/') || v.starts_with('#'),
                    "{path}: {}",
                    &v[..v.len().min(40)]
                );
            }
        }
        assert!(!body.contains("url(http"), "{path}");
        if matches!(path, "/" | "/app.js" | "/app.css") {
            total += body.len();
        }
    }
    assert!(total < 200 * 1024, "{total}");
    let (head, body) = get("/?where=src.nope%3D");
    assert!(head.starts_with("http/1.1 400"), "{head}");
    assert!(body.contains("id=\"error\""), "{body}");
    let (head, _) = get("/map.svg?color=blue");
    assert!(head.starts_with("http/1.1 400"), "{head}");
    // The old routes are still there.
    let (head, body) = get("/query?src=ip&format=table");
    assert!(
        head.starts_with("http/1.1 200") && body.contains("10.0.0.1"),
        "{head}"
    );
}
