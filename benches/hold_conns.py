#!/usr/bin/env python3
"""Holds N client connections open through a proxy and reports its memory (the `mem`, `mem-h2c`
and `mem-tls` modes of benches/compare.sh).

    hold_conns.py [--h2c | --tls CA_FILE] PORT N SETTLE PID [PID...]

HTTP/1 (the default) and `--tls`: half the connections stay idle after connecting (over TLS:
after the handshake); the other half send part of a request head (no final blank line), as slow
clients do. The proxy's RSS (VmRSS summed over PIDS) is read before, while all are held, and
SETTLE seconds after they are closed. Prints one line:
`before_kb during_kb after_kb held` (held: connections the proxy had open at the peak).

`--h2c`: every connection sends the HTTP/2 preface and SETTINGS, and acknowledges the proxy's;
RSS is read with them all idle, then again once each has one open stream: a POST to `/hold`
whose head is sent and whose body (content-length 100000) never comes, which the backend holds
too. Prints `before_kb idle_kb streams_kb after_kb held`.
"""

import os
import socket
import ssl
import struct
import sys
import time

PARTIAL_HEAD = b"GET / HTTP/1.1\r\nHost: backend\r\nUser-Agent: hold_conns\r\n"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, HEADERS = 0x4, 0x1
ACK, END_HEADERS = 0x1, 0x4


def rss_kb(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def open_fds(pids):
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


def wait_for(cond, seconds):
    """Polls cond until it holds or the time is up; returns whether it held."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def settle(pids, seconds=3.0):
    """Until RSS stops moving (two reads 0.2 s apart within 64 kB), at most `seconds`."""
    deadline = time.monotonic() + seconds
    last = rss_kb(pids)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = rss_kb(pids)
        if abs(now - last) <= 64:
            return now
        last = now
    return last


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed by the proxy")
        data += chunk
    return data


def ack_settings(s):
    """Reads frames until the proxy's SETTINGS (not an ACK) and acknowledges it."""
    while True:
        head = recv_exact(s, 9)
        length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        recv_exact(s, length)
        if kind == SETTINGS and not flags & ACK:
            s.sendall(frame(SETTINGS, ACK, 0))
            return


def literal(index, value):
    """An HPACK literal field without indexing, its name from the static table (index < 15)."""
    return bytes([index, len(value)]) + value


# POST /hold, http, authority backend, content-length 100000 (RFC 7541 appendix A: 3 is
# `:method POST`, 6 `:scheme http`, 4 `:path`, 1 `:authority`; 28 `content-length`, beyond 15).
HOLD_HEAD = bytes([0x83, 0x86]) + literal(4, b"/hold") + literal(1, b"backend") + bytes([0x0F, 0x0D, 6]) + b"100000"


def main():
    args = sys.argv[1:]
    proto, ca = "http", None
    if args[0] == "--h2c":
        proto, args = "h2c", args[1:]
    elif args[0] == "--tls":
        proto, ca, args = "tls", args[1], args[2:]
    port, n, after_s = int(args[0]), int(args[1]), float(args[2])
    pids = [int(p) for p in args[3:]]
    tls = None
    if ca:
        tls = ssl.create_default_context(cafile=ca)
        tls.minimum_version = ssl.TLSVersion.TLSv1_3
    fds_before = open_fds(pids)
    before = settle(pids)
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if tls:
            s = tls.wrap_socket(s, server_hostname="127.0.0.1")
        if proto == "h2c":
            s.sendall(H2_PREFACE + frame(SETTINGS, 0, 0))
        socks.append(s)
    if proto == "h2c":
        for s in socks:
            s.settimeout(10)
            ack_settings(s)
    else:
        # Once all are connected: 5,000 TLS handshakes take longer than a header timeout.
        for s in socks[1::2]:
            s.sendall(PARTIAL_HEAD)
    # The proxy has accepted them when its descriptor count went up by N (nginx and HAProxy
    # accept in batches; connections still in the accept queue would cost it nothing yet).
    wait_for(lambda: open_fds(pids) >= fds_before + n, 20)
    held = open_fds(pids) - fds_before
    during = settle(pids)
    figures = [before, during]
    # Upstream connections the streams opened (a pool may keep some once the clients are gone).
    kept = 0
    if proto == "h2c":
        fds_idle = open_fds(pids)
        for s in socks:
            s.sendall(frame(HEADERS, END_HEADERS, 1, HOLD_HEAD))
        time.sleep(0.5)
        figures.append(settle(pids))
        kept = max(0, open_fds(pids) - fds_idle)
    for s in socks:
        s.close()
    # A pool may keep some upstream connections: then the wait is shorter.
    wait_for(lambda: open_fds(pids) <= fds_before + 2, 5 if kept else 20)
    time.sleep(after_s)
    figures.append(rss_kb(pids))
    print(*figures, held)


if __name__ == "__main__":
    main()
