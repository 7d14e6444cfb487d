#!/usr/bin/env python3
"""Container processes for tests/live_attrib/container_host.rs (stdlib only).

    hostapp.py NAME server ADDR PORT COUNT READY OUT
    hostapp.py NAME client PLAN OUT

Each names itself NAME first (prctl PR_SET_NAME). Its cgroup and network
namespace are the caller's business.

server: listens on ADDR:PORT, writes READY, accepts exactly COUNT
connections (a thread each), then writes OUT (its pid and the records)
and exits. Per connection it
reads the request to its end (the first 4 bytes say how many bytes to
answer), writes the answer, shuts its write side, waits until all it sent
and its FIN are acknowledged, and records its own socket: peer address and
port, bytes written, TCP_INFO tcpi_total_retrans and tcpi_bytes_retrans.

client: PLAN is a JSON list of [local_port, host, port, request, answer];
eight threads open them as fast as they can, each bound to its local port:
write the request (answer size first), shut the write side, read the
answer to EOF, wait until all sent is acknowledged, record TCP_INFO,
close. OUT: per local port, the same fields as the server's.

The kernel's figures are the ground truth: bytes written by the
application, retransmitted segments and bytes of the sending socket.
"""

import ctypes
import json
import os
import queue
import socket
import struct
import sys
import threading
import time

OFF_UNACKED = 24  # u32 tcpi_unacked
OFF_TOTAL_RETRANS = 100  # u32 tcpi_total_retrans
OFF_BYTES_RETRANS = 208  # u64 tcpi_bytes_retrans
WORKERS = 8


def name_self(name):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(15, name.encode()[:15], 0, 0, 0) != 0:
        sys.exit("prctl failed")


def info(s):
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)


def settle(s):
    """Waits until everything sent (FIN included) is acknowledged; the
    socket's retransmit figures."""
    deadline = time.monotonic() + 30
    while True:
        b = info(s)
        if struct.unpack_from("=I", b, OFF_UNACKED)[0] == 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("data still unacknowledged after 30 s")
        time.sleep(0.001)
    return (
        struct.unpack_from("=I", b, OFF_TOTAL_RETRANS)[0],
        struct.unpack_from("=Q", b, OFF_BYTES_RETRANS)[0],
    )


def read_all(s):
    n, first = 0, b""
    while True:
        d = s.recv(65536)
        if not d:
            return n, first
        if len(first) < 4:
            first += d[: 4 - len(first)]
        n += len(d)


def serve(addr, port, count, ready, out):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port))
    ls.listen(1024)
    open(ready, "w").close()
    recs, lock, errors = [], threading.Lock(), []

    def one(c, peer):
        try:
            c.settimeout(60)
            got, first = read_all(c)
            answer = struct.unpack("!I", first)[0]
            c.sendall(b"s" * answer)
            c.shutdown(socket.SHUT_WR)
            retrans, bytes_retrans = settle(c)
            # The client closes after our FIN: wait for it, so that no
            # segment of ours follows the record.
            c.recv(1)
            with lock:
                recs.append(
                    dict(
                        peer=peer[0],
                        peer_port=peer[1],
                        read=got,
                        written=answer,
                        total_retrans=retrans,
                        bytes_retrans=bytes_retrans,
                    )
                )
        except Exception as e:  # noqa: BLE001
            errors.append(f"{peer}: {e!r}")
        finally:
            c.close()

    threads = []
    for _ in range(count):
        c, peer = ls.accept()
        t = threading.Thread(target=one, args=(c, peer))
        t.start()
        threads.append(t)
    ls.close()
    for t in threads:
        t.join()
    if errors:
        sys.exit("server: " + "; ".join(errors[:5]))
    with open(out, "w") as f:
        json.dump(dict(pid=os.getpid(), conns=recs), f)


def client(plan, out):
    todo = queue.Queue()
    for p in json.load(open(plan)):
        todo.put(p)
    recs, lock, errors = {}, threading.Lock(), []

    def work():
        while True:
            try:
                lport, host, port, request, answer = todo.get_nowait()
            except queue.Empty:
                return
            try:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("0.0.0.0", lport))
                s.settimeout(60)
                s.connect((host, port))
                s.sendall(struct.pack("!I", answer) + b"c" * (request - 4))
                s.shutdown(socket.SHUT_WR)
                got, _ = read_all(s)
                if got != answer:
                    raise RuntimeError(f"read {got} of {answer}")
                retrans, bytes_retrans = settle(s)
                s.close()
                with lock:
                    recs[lport] = dict(
                        written=request,
                        read=got,
                        total_retrans=retrans,
                        bytes_retrans=bytes_retrans,
                    )
            except Exception as e:  # noqa: BLE001
                errors.append(f"{lport}: {e!r}")

    threads = [threading.Thread(target=work) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sys.exit("client: " + "; ".join(errors[:5]))
    with open(out, "w") as f:
        json.dump(dict(pid=os.getpid(), conns=recs), f)


def main():
    name_self(sys.argv[1])
    if sys.argv[2] == "server":
        addr, port, count, ready, out = sys.argv[3:8]
        serve(addr, int(port), int(count), ready, out)
    else:
        client(sys.argv[3], sys.argv[4])


if __name__ == "__main__":
    main()
