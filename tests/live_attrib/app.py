#!/usr/bin/env python3
"""Stand-in for a containerised service, for tests/live_attrib/processes.rs.

    app.py NAME CGROUP_PROCS server --tcp ADDR:PORT [--udp ADDR:PORT] --ready FILE
    app.py NAME CGROUP_PROCS client --server IP [--loop ADDR:PORT]
        [--long N] [--udp N] [--short N] [--short-ms MS] [--parallel P] --out FILE

First it moves itself into the cgroup (writes its pid to CGROUP_PROCS) and
names itself NAME (prctl PR_SET_NAME: /proc/<pid>/comm), before it opens any
socket. The client writes the local ports it used, per kind, as JSON.
"""
import argparse
import ctypes
import json
import os
import socket
import sys
import threading
import time


def become(name, procs):
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(15, name.encode()[:15], 0, 0, 0) != 0:  # PR_SET_NAME
        sys.exit("prctl failed")


def addr(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


def serve_tcp(a):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(addr(a))
    ls.listen(1024)

    def handle(c):
        with c:
            while True:
                b = c.recv(65536)
                if not b:
                    return
                c.sendall(b)

    def loop():
        while True:
            c, _ = ls.accept()
            threading.Thread(target=handle, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def serve_udp(a):
    us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    us.bind(addr(a))

    def loop():
        while True:
            b, peer = us.recvfrom(65536)
            us.sendto(b, peer)

    threading.Thread(target=loop, daemon=True).start()


def tcp_exchange(server, hold_s):
    c = socket.create_connection(server)
    port = c.getsockname()[1]
    c.sendall(b"x" * 100)
    got = 0
    while got < 100:
        got += len(c.recv(65536))
    time.sleep(hold_s)
    c.close()
    return port


def main():
    name, procs, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    p = argparse.ArgumentParser()
    p.add_argument("--tcp")
    p.add_argument("--udp")
    p.add_argument("--ready")
    p.add_argument("--server")
    p.add_argument("--loop")
    p.add_argument("--long", type=int, default=0)
    p.add_argument("--udp-n", type=int, default=0)
    p.add_argument("--short", type=int, default=0)
    p.add_argument("--short-ms", type=float, default=50)
    p.add_argument("--parallel", type=int, default=10)
    p.add_argument("--out")
    a = p.parse_args(sys.argv[4:])
    become(name, procs)
    if mode == "server":
        serve_tcp(a.tcp)
        if a.udp:
            serve_udp(a.udp)
        open(a.ready, "w").close()
        while True:
            time.sleep(3600)
    out = {"pid": os.getpid(), "long": [], "udp": [], "loop": [], "short": []}
    srv = (a.server, 8080)
    for _ in range(a.long):
        out["long"].append(tcp_exchange(srv, 0.3))
    for _ in range(a.udp_n):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.connect((a.server, 5353))
        u.send(b"ping")
        u.recv(100)
        out["udp"].append(u.getsockname()[1])
        # A socket that lives less than a pass interval (20 ms) may never
        # be seen; this test wants every end attributed.
        time.sleep(0.3)
        u.close()
    if a.loop:
        for _ in range(2):
            out["loop"].append(tcp_exchange(addr(a.loop), 0.3))
    # Short-lived: `parallel` workers, each connection held short_ms.
    ports, lock = [], threading.Lock()
    per = [a.short // a.parallel + (1 if i < a.short % a.parallel else 0) for i in range(a.parallel)]

    def worker(n):
        for _ in range(n):
            port = tcp_exchange(srv, a.short_ms / 1000)
            with lock:
                ports.append(port)

    ts = [threading.Thread(target=worker, args=(n,)) for n in per if n]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out["short"] = ports
    with open(a.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
