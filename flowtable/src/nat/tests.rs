//! The join on a fake conntrack table: a container host with MASQUERADE to
//! an uplink (container 10.90.0.2 → outside 192.0.2.2, seen as 192.0.2.1
//! after the uplink) and a published port (192.0.2.1:8080 → container
//! 10.90.0.3:5001).

use std::io;
use std::net::SocketAddr;

use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Entries by either direction's tuple, as the kernel's lookup finds them.
#[derive(Default)]
struct Fake {
    entries: Vec<Translation>,
    fail: bool,
    asked: u64,
}

impl Conntrack for Fake {
    fn lookup(
        &mut self,
        proto: Proto,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<Option<Translation>> {
        self.asked += 1;
        if self.fail {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        Ok(self
            .entries
            .iter()
            .find(|t| t.proto == proto && (t.orig == (src, dst) || t.reply == (src, dst)))
            .copied())
    }
}

fn entry(orig: (&str, &str), reply: (&str, &str)) -> Translation {
    Translation {
        proto: Proto::Tcp,
        orig: (addr(orig.0), addr(orig.1)),
        reply: (addr(reply.0), addr(reply.1)),
    }
}

fn host() -> Fake {
    Fake {
        entries: vec![
            // MASQUERADE: the reply comes back to the uplink's address.
            entry(
                ("10.90.0.2:40020", "192.0.2.2:5001"),
                ("192.0.2.2:5001", "192.0.2.1:40020"),
            ),
            // DNAT of the published port.
            entry(
                ("192.0.2.2:40030", "192.0.2.1:8080"),
                ("10.90.0.3:5001", "192.0.2.2:40030"),
            ),
            // Routed without translation: conntrack tracks it all the same.
            entry(
                ("10.90.0.2:40040", "192.0.2.9:22"),
                ("192.0.2.9:22", "10.90.0.2:40040"),
            ),
        ],
        ..Fake::default()
    }
}

fn dir(packets: u64, bytes: u64) -> DirStats {
    DirStats::counts(packets, bytes, bytes + 52 * packets)
}

fn conn(src: &str, dst: &str, iface: u32, sent: &DirStats, received: &DirStats) -> Connection {
    let (s, d) = (addr(src), addr(dst));
    Connection {
        proto: crate::Proto::Tcp,
        src: s.ip(),
        sport: s.port(),
        dst: d.ip(),
        dport: d.port(),
        iface,
        first_seen: 1_000,
        last_seen: 2_000,
        sent: sent.clone(),
        received: received.clone(),
        rtt: Default::default(),
        src_tags: Default::default(),
        dst_tags: Default::default(),
    }
}

fn tags(pairs: &[(&str, &str)]) -> crate::Tags {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn masquerade_is_one_connection_with_both_addresses() {
    let mut ct = host();
    let mut j = NatJoin::new(1024);
    let (up, down) = (dir(10, 9000), dir(8, 300));
    let mut conns = vec![
        // The container's bridge port: before the translation.
        conn("10.90.0.2:40020", "192.0.2.2:5001", 3, &up, &down),
        // The uplink: after it, every packet again.
        conn("192.0.2.1:40020", "192.0.2.2:5001", 5, &up, &down),
    ];
    let st = j.undo(&mut ct, &mut conns, &mut Vec::new());
    assert_eq!(conns.len(), 1, "{conns:#?}");
    let c = &conns[0];
    assert_eq!(
        (c.src, c.sport, c.iface),
        (addr("10.90.0.2:1").ip(), 40020, 3)
    );
    assert_eq!((c.sent.clone(), c.received.clone()), (up, down));
    assert_eq!(
        c.src_tags,
        tags(&[("nat.ip", "192.0.2.1"), ("nat.port", "40020")])
    );
    assert!(c.dst_tags.is_empty(), "{c:?}");
    assert_eq!(beyond(c), (addr("192.0.2.1:40020"), addr("192.0.2.2:5001")));
    assert_eq!(
        (
            st.translated,
            st.folded,
            st.duplicate_packets,
            st.unresolved
        ),
        (1, 1, 18, 0)
    );
}

#[test]
fn dnat_keeps_the_published_address_and_names_the_actual_destination() {
    let mut ct = host();
    let mut j = NatJoin::new(1024);
    let (req, resp) = (dir(3, 200), dir(5, 7000));
    let mut conns = vec![
        // Translated view first, and oriented from the responder (its SYN
        // was not seen): both are undone.
        conn("10.90.0.3:5001", "192.0.2.2:40030", 4, &resp, &req),
        conn("192.0.2.2:40030", "192.0.2.1:8080", 5, &req, &resp),
    ];
    let st = j.undo(&mut ct, &mut conns, &mut Vec::new());
    assert_eq!(conns.len(), 1, "{conns:#?}");
    let c = &conns[0];
    assert_eq!(
        (
            SocketAddr::new(c.src, c.sport),
            SocketAddr::new(c.dst, c.dport),
            c.iface
        ),
        (addr("192.0.2.2:40030"), addr("192.0.2.1:8080"), 5)
    );
    assert_eq!((c.sent.clone(), c.received.clone()), (req, resp));
    assert!(c.src_tags.is_empty());
    assert_eq!(
        c.dst_tags,
        tags(&[("nat.ip", "10.90.0.3"), ("nat.port", "5001")])
    );
    // Where the server's socket is: bound to 10.90.0.3:5001.
    assert_eq!(beyond(c), (addr("192.0.2.2:40030"), addr("10.90.0.3:5001")));
    assert_eq!((st.folded, st.duplicate_packets), (1, 8));
}

#[test]
fn untranslated_connections_are_left_alone_and_asked_about_once() {
    let mut ct = host();
    let mut j = NatJoin::new(1024);
    let both = (dir(1, 10), dir(1, 10));
    let make = || {
        vec![
            conn("10.90.0.2:40040", "192.0.2.9:22", 3, &both.0, &both.1),
            conn("10.90.0.2:40050", "10.90.0.3:5001", 3, &both.0, &both.1),
        ]
    };
    let mut conns = make();
    let st = j.undo(&mut ct, &mut conns, &mut Vec::new());
    assert_eq!(conns, make());
    assert_eq!((st.translated, st.folded, st.duplicate_packets), (0, 0, 0));
    // Routed: found at once; bridged: not found either way.
    assert_eq!(ct.asked, 3);
    let mut conns = make();
    j.undo(&mut ct, &mut conns, &mut Vec::new());
    assert_eq!(ct.asked, 3, "asked again");
    // One way only: maybe not confirmed yet, asked again next time.
    let mut conns = vec![conn(
        "10.90.0.2:40060",
        "10.90.0.3:5001",
        3,
        &dir(1, 0),
        &dir(0, 0),
    )];
    j.undo(&mut ct, &mut conns, &mut Vec::new());
    j.undo(&mut ct, &mut conns, &mut Vec::new());
    assert_eq!(ct.asked, 7);
}

/// With the last reading kept, a settled untranslated record's answer is
/// that reading, not an entry of the join's own; a translated one's is
/// kept.
#[test]
fn the_last_reading_answers_for_untranslated_records() {
    let mut ct = host();
    let mut j = NatJoin::new(1024);
    let both = (dir(1, 10), dir(1, 10));
    let make = || {
        vec![
            conn("10.90.0.2:40040", "192.0.2.9:22", 3, &both.0, &both.1),
            conn("192.0.2.2:5001", "192.0.2.1:40020", 2, &both.1, &both.0),
        ]
    };
    j.remember(Arc::new(Vec::new()));
    let mut conns = make();
    let st = j.undo(&mut ct, &mut conns, &mut Vec::new());
    assert_eq!(st.translated, 1);
    assert_eq!(st.cache_entries, 2, "the translation's answer and join");
    let asked = ct.asked;
    j.remember(Arc::new(conns.clone()));
    for _ in 0..2 {
        let mut next = make();
        let st = j.undo(&mut ct, &mut next, &mut Vec::new());
        assert_eq!(next, conns);
        assert_eq!((ct.asked, st.cache_entries), (asked, 2));
        j.remember(Arc::new(next));
    }
    // Retired: its answer from the last reading too.
    let mut retired = make();
    j.undo(&mut ct, &mut Vec::new(), &mut retired);
    assert_eq!((ct.asked, retired), (asked, conns));
}

/// XDP sees what each interface receives: the request before the
/// translation (container's bridge port), the answer after it (uplink).
#[test]
fn a_direction_only_the_translated_view_saw_is_taken_from_it() {
    let mut ct = host();
    let mut j = NatJoin::new(1024);
    let (up, down) = (dir(10, 9000), dir(8, 300));
    let mut conns = vec![
        conn(
            "10.90.0.2:40020",
            "192.0.2.2:5001",
            0,
            &up,
            &DirStats::default(),
        ),
        conn(
            "192.0.2.1:40020",
            "192.0.2.2:5001",
            0,
            &DirStats::default(),
            &down,
        ),
    ];
    let st = j.undo(&mut ct, &mut conns, &mut Vec::new());
    assert_eq!(conns.len(), 1);
    assert_eq!(
        (conns[0].sent.clone(), conns[0].received.clone()),
        (up, down)
    );
    assert_eq!(st.duplicate_packets, 0);
}

/// The two views end together but may be retired a reading apart.
#[test]
fn views_retired_in_different_readings_still_count_once() {
    let mut ct = host();
    let mut j = NatJoin::new(1024);
    let (up, down) = (dir(10, 9000), dir(8, 300));
    let x = || conn("10.90.0.2:40020", "192.0.2.2:5001", 3, &up, &down);
    let y = || conn("192.0.2.1:40020", "192.0.2.2:5001", 5, &up, &down);
    let mut conns = vec![x(), y()];
    j.undo(&mut ct, &mut conns, &mut Vec::new());
    // The original view retires first…
    let (mut conns, mut retired) = (vec![y()], vec![x()]);
    let st = j.undo(&mut ct, &mut conns, &mut retired);
    assert!(conns.is_empty(), "{conns:#?}");
    assert_eq!(retired.len(), 1);
    assert_eq!(st.duplicate_packets, 18);
    // …the translated one a reading later: still a duplicate.
    let (mut conns, mut retired) = (Vec::new(), vec![y()]);
    let st = j.undo(&mut ct, &mut conns, &mut retired);
    assert!(retired.is_empty(), "{retired:#?}");
    assert_eq!(st.duplicate_packets, 18, "counted once, and never less");
    // And then forgotten: nothing is listed any more.
    for _ in 0..GRACE_READINGS + 1 {
        let st = j.undo(&mut ct, &mut Vec::new(), &mut Vec::new());
        assert_eq!(st.duplicate_packets, 18);
    }
    // Once packet time has moved on too (a one-way packet: not remembered).
    let mut later = conn(
        "10.90.0.2:40070",
        "10.90.0.3:5001",
        3,
        &dir(1, 1),
        &dir(0, 0),
    );
    later.last_seen = 2_000 + GRACE_NS;
    let st = j.undo(&mut ct, &mut vec![later], &mut Vec::new());
    assert_eq!(st.cache_entries, 0, "{st:?}");
}

/// Only the uplink watched (`--iface`): the translated view is all there
/// is, listed under the original tuple.
#[test]
fn a_translated_view_alone_is_kept_under_the_original_tuple() {
    let mut ct = host();
    let mut j = NatJoin::new(1024);
    let (up, down) = (dir(10, 9000), dir(8, 300));
    let mut conns = vec![conn("192.0.2.1:40020", "192.0.2.2:5001", 5, &up, &down)];
    let st = j.undo(&mut ct, &mut conns, &mut Vec::new());
    assert_eq!(conns.len(), 1);
    let c = &conns[0];
    assert_eq!(SocketAddr::new(c.src, c.sport), addr("10.90.0.2:40020"));
    assert_eq!((c.sent.clone(), c.received.clone()), (up, down));
    assert_eq!(c.src_tags["nat.ip"], "192.0.2.1");
    assert_eq!((st.translated, st.folded, st.duplicate_packets), (1, 0, 0));
}

#[test]
fn what_could_not_be_asked_is_counted_and_left_as_it_was() {
    let mut ct = host();
    ct.fail = true;
    let mut j = NatJoin::new(1024);
    let (up, down) = (dir(10, 9000), dir(8, 300));
    let make = || {
        vec![
            conn("10.90.0.2:40020", "192.0.2.2:5001", 3, &up, &down),
            conn("192.0.2.1:40020", "192.0.2.2:5001", 5, &up, &down),
        ]
    };
    let mut conns = make();
    let st = j.undo(&mut ct, &mut conns, &mut Vec::new());
    assert_eq!(conns, make());
    assert_eq!((st.unresolved, st.lookup_errors), (2, 2));
    // Once it can be read again, it is undone.
    ct.fail = false;
    let st = j.undo(&mut ct, &mut conns, &mut Vec::new());
    assert_eq!((conns.len(), st.unresolved, st.folded), (1, 0, 1));
}

#[test]
fn the_memory_is_bounded_and_says_when_it_was_full() {
    let mut ct = host();
    let mut j = NatJoin::new(4);
    let mut conns: Vec<Connection> = (0..10)
        .map(|i| {
            conn(
                &format!("10.90.0.2:{}", 41000 + i),
                "10.90.0.3:5001",
                3,
                &dir(1, 1),
                &dir(1, 1),
            )
        })
        .collect();
    let st = j.undo(&mut ct, &mut conns, &mut Vec::new());
    assert!(st.cache_entries <= 8, "{st:?}");
    assert!(st.cache_cleared >= 2, "{st:?}");
    assert_eq!(st.cache_max, 4);
    assert_eq!(conns.len(), 10);
}

#[test]
fn ipv6_masquerade_is_undone_too() {
    let mut ct = Fake {
        entries: vec![Translation {
            proto: Proto::Udp,
            orig: (addr("[fd00:92::2]:53000"), addr("[2001:db8::53]:53")),
            reply: (addr("[2001:db8::53]:53"), addr("[2001:db8:1::1]:53000")),
        }],
        ..Fake::default()
    };
    let mut j = NatJoin::new(16);
    let (q, a) = (dir(1, 40), dir(1, 120));
    let mut conns = vec![
        conn("[fd00:92::2]:53000", "[2001:db8::53]:53", 3, &q, &a),
        conn("[2001:db8:1::1]:53000", "[2001:db8::53]:53", 5, &q, &a),
    ];
    for c in &mut conns {
        c.proto = crate::Proto::Udp;
    }
    let st = j.undo(&mut ct, &mut conns, &mut Vec::new());
    assert_eq!(conns.len(), 1, "{conns:#?}");
    assert_eq!(conns[0].src_tags["nat.ip"], "2001:db8:1::1");
    assert_eq!((st.translated, st.duplicate_packets), (1, 2));
}

/// tc: the answer reached the uplink (translated view) but not yet the
/// container's port (original view) when the reading was taken.
#[test]
fn a_direction_borrowed_for_one_reading_is_the_original_views_own_at_the_next() {
    let mut ct = host();
    let mut j = NatJoin::new(1024);
    let (syn, synack) = (dir(1, 0), dir(1, 0));
    let mut conns = vec![
        conn(
            "10.90.0.2:40020",
            "192.0.2.2:5001",
            3,
            &syn,
            &DirStats::default(),
        ),
        conn("192.0.2.1:40020", "192.0.2.2:5001", 5, &syn, &synack),
    ];
    let st = j.undo(&mut ct, &mut conns, &mut Vec::new());
    assert_eq!(
        (conns[0].sent.clone(), conns[0].received.clone()),
        (syn, synack)
    );
    assert_eq!(st.duplicate_packets, 1);
    let (up, down) = (dir(10, 9000), dir(8, 300));
    let mut conns = vec![
        conn("10.90.0.2:40020", "192.0.2.2:5001", 3, &up, &down),
        conn("192.0.2.1:40020", "192.0.2.2:5001", 5, &up, &down),
    ];
    let st = j.undo(&mut ct, &mut conns, &mut Vec::new());
    assert_eq!(
        (conns[0].sent.clone(), conns[0].received.clone()),
        (up, down)
    );
    assert_eq!(st.duplicate_packets, 18);
}
