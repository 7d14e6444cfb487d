#!/usr/bin/env python3
"""Connection churn for bench/attrib.sh.

    attrib_load.py server ADDR:PORT READY_FILE
    attrib_load.py client ADDR:PORT RATE SECS HOLD_MS OUT_JSON

The client opens RATE TCP connections per second for SECS seconds, each
sending 100 bytes, reading the echo, then held HOLD_MS before it closes;
it writes {"opened": n, "secs": elapsed, "ports": [...]} to OUT_JSON.
"""
import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def server(a, ready):
    host, port = a.rsplit(":", 1)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, int(port)))
    ls.listen(4096)

    def handle(c):
        with c:
            while True:
                b = c.recv(65536)
                if not b:
                    return
                c.sendall(b)

    open(ready, "w").close()
    while True:
        c, _ = ls.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def client(a, rate, secs, hold_ms, out):
    host, port = a.rsplit(":", 1)
    dest = (host, int(port))
    ports, lock = [], threading.Lock()

    def one():
        c = socket.create_connection(dest)
        p = c.getsockname()[1]
        c.sendall(b"x" * 100)
        got = 0
        while got < 100:
            got += len(c.recv(65536))
        time.sleep(hold_ms / 1000)
        c.close()
        with lock:
            ports.append(p)

    n = int(rate * secs)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(8, int(rate * (hold_ms / 1000 + 0.02) * 2))) as pool:
        for i in range(n):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one)
    elapsed = time.monotonic() - t0
    with open(out, "w") as f:
        json.dump({"opened": len(ports), "secs": elapsed, "ports": ports}, f)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2], sys.argv[3])
    else:
        client(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6])
