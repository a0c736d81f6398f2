#!/usr/bin/env python3
"""A TCP echo backend and the clients that drive it through a proxy (benches/callgrind_tcp.sh).

    tcp_echo.py serve PORT_FILE          echoes every connection's bytes back; writes its port to
                                         PORT_FILE once it listens, then serves until killed
    tcp_echo.py echo PORT N [SIZE]       one connection, N round trips of SIZE bytes (64), one at
                                         a time
    tcp_echo.py conns PORT N [SIZE]      N connections one after another, one round trip each

A client checks every answer and exits non-zero on a short or wrong one.
"""

import asyncio
import os
import socket
import sys


async def serve(port_file):
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with open(port_file + ".tmp", "w") as f:
        f.write(f"{port}\n")
    os.rename(port_file + ".tmp", port_file)
    await server.serve_forever()


def round_trip(s, msg):
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        chunk = s.recv(len(msg) - len(got))
        if not chunk:
            sys.exit(f"connection closed after {len(got)} of {len(msg)} bytes")
        got += chunk
    if got != msg:
        sys.exit("the echo differs from what was sent")


def connect(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def main():
    mode = sys.argv[1]
    if mode == "serve":
        asyncio.run(serve(sys.argv[2]))
        return
    port, n = int(sys.argv[2]), int(sys.argv[3])
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    msg = bytes(i % 251 for i in range(size))
    if mode == "echo":
        with connect(port) as s:
            for _ in range(n):
                round_trip(s, msg)
    elif mode == "conns":
        for _ in range(n):
            with connect(port) as s:
                round_trip(s, msg)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
