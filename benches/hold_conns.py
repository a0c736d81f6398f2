#!/usr/bin/env python3
"""Holds N client connections open through a proxy and reports its memory (the `mem` mode of
benches/compare.sh).

Half the connections stay idle after connecting; the other half send part of a request head (no
final blank line), as slow clients do. The proxy's RSS (VmRSS summed over PIDS) is read before,
while all are held, and SETTLE seconds after they are closed. Prints one line:
`before_kb during_kb after_kb held` (held: connections the proxy had open at the peak).

    hold_conns.py PORT N SETTLE PID [PID...]
"""

import os
import socket
import sys
import time

PARTIAL_HEAD = b"GET / HTTP/1.1\r\nHost: backend\r\nUser-Agent: hold_conns\r\n"


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


def main():
    port, n, after_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    pids = [int(p) for p in sys.argv[4:]]
    fds_before = open_fds(pids)
    before = settle(pids)
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.connect(("127.0.0.1", port))
        if i % 2 == 1:
            s.sendall(PARTIAL_HEAD)
        socks.append(s)
    # The proxy has accepted them when its descriptor count went up by N (nginx and HAProxy
    # accept in batches; connections still in the accept queue would cost it nothing yet).
    wait_for(lambda: open_fds(pids) >= fds_before + n, 20)
    held = open_fds(pids) - fds_before
    during = settle(pids)
    for s in socks:
        s.close()
    wait_for(lambda: open_fds(pids) <= fds_before + 2, 20)
    time.sleep(after_s)
    after = rss_kb(pids)
    print(before, during, after, held)


if __name__ == "__main__":
    main()
