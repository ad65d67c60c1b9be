#!/usr/bin/env python3
"""The proxy's CPU for one response whose head an endpoint trickles in.

    python3 benches/slow_head.py BINARY [BINARY ...] [--size 400000] [--tail 3000] [--gap-ms 1] [--empty-lines]

For each mesh-egress binary: an endpoint on 127.0.0.1:18181 answers one GET with a response head
of SIZE bytes (one long header), all but its last TAIL bytes at once, then those a byte per
send, GAP-MS apart (TCP_NODELAY, so each is a segment); a client asks through the proxy (one worker,
a service on that endpoint). With --empty-lines the SIZE bytes are empty lines (CRLF) before the
status line instead, TAIL of them trickled a line per send, then the rest of the head at once. Prints the status, whether the response came whole, the time taken and the proxy's CPU seconds
(utime + stime from /proc/PID/stat) over the exchange. A reader that parses the head again on
every read pays for the whole head at each trickled byte; one that parses again only when new
bytes could end the head pays for the bytes. Compare builds with `git worktree add /tmp/old REV
&& cargo build --release --manifest-path /tmp/old/Cargo.toml`.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import cpu_seconds  # noqa: E402

ENDPOINT = ("127.0.0.1", 18181)
OUTBOUND = 20111
ADMIN = "127.0.0.1:29912"
CONFIG = f"""type: MeshExternalService
name: slow
spec:
  match: {{port: {ENDPOINT[1]}, protocol: http}}
  endpoints: [{{address: {ENDPOINT[0]}, port: {ENDPOINT[1]}}}]
---
type: Dataplane
name: bench
networking:
  outbound:
    - port: {OUTBOUND}
      backendRef: {{kind: MeshExternalService, name: slow}}
"""


def endpoint(listener, bulk, trickle, rest, gap):
    """Sends `bulk` at once, `trickle`'s pieces one per send `gap` apart, then `rest`."""
    conn, _ = listener.accept()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        conn.sendall(bulk)
        for piece in trickle:
            conn.send(piece)
            time.sleep(gap)
        conn.sendall(rest)
        time.sleep(0.5)


def get():
    """One GET through the proxy, read to its end (not curl: it refuses response heads over
    100 KiB)."""
    with socket.create_connection(("127.0.0.1", OUTBOUND), timeout=300) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nhost: slow\r\nconnection: close\r\n\r\n")
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
    return response


def measure(binary, size, tail, gap, empty_lines):
    if empty_lines:
        lines = size // 2
        tail = min(tail // 2, lines)
        parts = (b"\r\n" * (lines - tail), [b"\r\n"] * tail, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    else:
        head = b"HTTP/1.1 200 OK\r\nx-long: " + b"v" * size + b"\r\ncontent-length: 2\r\n\r\nok"
        bulk = len(head) - min(tail, len(head))
        parts = (head[:bulk], [head[i:i + 1] for i in range(bulk, len(head))], b"")
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as listener:
        with open(os.path.join(tmp, "mesh.yaml"), "w") as f:
            f.write(CONFIG)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(ENDPOINT)
        listener.listen()
        threading.Thread(target=endpoint, args=(listener, *parts, gap), daemon=True).start()
        proxy = subprocess.Popen(
            [binary, "run", "-c", os.path.join(tmp, "mesh.yaml"), "--workers", "1", "--admin", ADMIN,
             "--readiness-port", "off", "--transparent", "off", "--dns", "off", "--no-watch", "--state-dir", tmp],
            stderr=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="error"))
        try:
            time.sleep(0.5)
            cpu, started = sum(cpu_seconds(proxy.pid)), time.time()
            response = get()
            status = response.split(b" ", 2)[1].decode() if response.startswith(b"HTTP/1.1 ") else "none"
            whole = "whole" if response.endswith(b"\r\n\r\nok") else "cut"
            took, used = time.time() - started, sum(cpu_seconds(proxy.pid)) - cpu
            print(f"{binary}: HTTP {status}, {len(response):,} bytes ({whole}), {took:.1f} s, proxy CPU {used:.2f} s")
        finally:
            proxy.terminate()
            proxy.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binaries", nargs="+")
    parser.add_argument("--size", type=int, default=400_000, help="bytes of the long header")
    parser.add_argument("--tail", type=int, default=3_000, help="bytes sent one at a time at the end")
    parser.add_argument("--gap-ms", type=float, default=1.0, help="pause between those sends")
    parser.add_argument("--empty-lines", action="store_true", help="the SIZE bytes as empty lines before the status line")
    args = parser.parse_args()
    for binary in args.binaries:
        measure(binary, args.size, args.tail, args.gap_ms / 1000, args.empty_lines)


if __name__ == "__main__":
    main()
