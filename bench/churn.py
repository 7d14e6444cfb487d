#!/usr/bin/env python3
"""Short TCP connections with known byte counts, and the check that every
one of them is in flowprobe's output and export exactly once
(bench/churn.sh, tests/live_tc/churn.rs).

    churn.py server ADDR:PORT READY_FILE
    churn.py client ADDR:PORT RATE N OUT_JSON
    churn.py check MADE_JSON FINAL_JSON EXPORT_JSONL DPORT

Client: N connections, the i-th started at i / RATE seconds (asyncio, one
thread: a thread per connection does not reach 1000 a second on two
CPUs). Connection i writes 1 + i % 1499 bytes and shuts its write side;
the server answers with twice what it read and closes; the client reads
to the end and closes. OUT_JSON gets {"made": [[port, sent, received],
...], "failed": n, "secs": s, "late": s}: a connection counts as made once
both sides are done; `late` is how far behind its schedule the client fell
at most.

Check: compares the multiset of (client port, sent, received) made with
the final output (one JSON connection per line, `run --format json`) and
with the export (delta lines summed per record: 5-tuple, interface,
first_seen), for the TCP connections to DPORT. Prints one JSON object
(counts, and up to 20 examples of each difference); exits 1 if they differ.
"""
import asyncio
import json
import sys
import time
from collections import Counter


def addr(s):
    host, port = s.rsplit(":", 1)
    return host.strip("[]"), int(port)


async def serve(a, ready):
    async def handle(r, w):
        n = 0
        while True:
            b = await r.read(65536)
            if not b:
                break
            n += len(b)
        w.write(b"y" * (2 * n))
        await w.drain()
        w.close()

    host, port = addr(a)
    srv = await asyncio.start_server(handle, host, port, backlog=4096, reuse_address=True)
    open(ready, "w").close()
    async with srv:
        await srv.serve_forever()


async def churn(a, rate, n, out):
    host, port = addr(a)
    loop = asyncio.get_running_loop()
    made, failed, late = [], [0], [0.0]

    async def one(i):
        size = 1 + i % 1499
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
            local = w.get_extra_info("sockname")[1]
            w.write(b"x" * size)
            await w.drain()
            w.write_eof()
            got = 0
            while True:
                b = await asyncio.wait_for(r.read(65536), 30)
                if not b:
                    break
                got += len(b)
            w.close()
            await w.wait_closed()
        except (OSError, asyncio.TimeoutError) as e:
            failed[0] += 1
            print(f"churn: connection {i}: {e!r}", file=sys.stderr)
            return
        made.append([local, size, got])

    t0 = loop.time()
    tasks = []
    for i in range(n):
        at = t0 + (i / rate if rate > 0 else 0)
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late[0] = max(late[0], -delay)
        tasks.append(asyncio.ensure_future(one(i)))
        if len(tasks) >= 4096:
            tasks = [t for t in tasks if not t.done()]
    await asyncio.gather(*tasks)
    with open(out, "w") as f:
        json.dump(
            {"made": made, "failed": failed[0], "secs": loop.time() - t0, "late": late[0]}, f
        )


def records_final(path, dport):
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            c = json.loads(line)
            if c.get("proto") == "tcp" and c.get("dport") == dport:
                out.append((c["sport"], c["sent"]["bytes"], c["received"]["bytes"]))
    return out


def records_export(path, dport):
    """Delta lines summed per record (5-tuple, interface, first_seen)."""
    sums = {}
    lines = 0
    with open(path) as f:
        for line in f:
            c = json.loads(line)
            if c.get("proto") != "tcp" or c.get("dport") != dport:
                continue
            lines += 1
            k = (c["src"], c["sport"], c["dst"], c["dport"], c["iface"], c["first_seen"])
            s = sums.setdefault(k, [0, 0])
            s[0] += c["sent"]["bytes"]
            s[1] += c["received"]["bytes"]
    return [(k[1], s[0], s[1]) for k, s in sums.items()], lines


def diff(made, got):
    m, g = Counter(made), Counter(got)
    missing = m - g
    extra = g - m
    return {
        "records": sum(g.values()),
        "matching": sum((m & g).values()),
        "missing": sum(missing.values()),
        "extra": sum(extra.values()),
        "missing_examples": sorted(missing.elements())[:20],
        "extra_examples": sorted(extra.elements())[:20],
    }


def check(made_path, final_path, export_path, dport):
    with open(made_path) as f:
        m = json.load(f)
    made = [tuple(x) for x in m["made"]]
    res = {
        "made": len(made),
        "failed": m["failed"],
        "secs": round(m["secs"], 1),
        "late": round(m.get("late", 0), 2),
        "reused": len(made) - len({x[0] for x in made}),
    }
    res["final"] = diff(made, records_final(final_path, dport))
    exported, lines = records_export(export_path, dport)
    res["export"] = diff(made, exported)
    res["export"]["lines"] = lines
    print(json.dumps(res))
    ok = all(res[k]["missing"] == 0 and res[k]["extra"] == 0 for k in ("final", "export"))
    return 0 if ok else 1


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "server":
        asyncio.run(serve(sys.argv[2], sys.argv[3]))
    elif mode == "client":
        a = sys.argv[2:]
        asyncio.run(churn(a[0], float(a[1]), int(a[2]), a[3]))
    else:
        sys.exit(check(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
