"""Holds N TCP connections open at once (bench/open.sh).

  open.py server ADDR:PORT READY      accepts and holds every connection
  open.py client ADDR:PORT N DONE     opens N connections, each writes 100
                                      bytes, touches DONE, holds them until
                                      stdin closes
"""
import os
import resource
import socket
import sys
import time


def addr(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


def raise_nofile():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def server(a, ready):
    raise_nofile()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(addr(a))
    ls.listen(4096)
    open(ready, "w").close()
    held = []
    while True:
        c, _ = ls.accept()
        held.append(c)


def client(a, n, done):
    raise_nofile()
    held = []
    for _ in range(n):
        s = socket.create_connection(addr(a))
        s.sendall(b"x" * 100)
        held.append(s)
    open(done, "w").close()
    sys.stdin.read()


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2], sys.argv[3])
    else:
        client(sys.argv[2], int(sys.argv[3]), sys.argv[4])
