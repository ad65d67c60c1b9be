#!/usr/bin/env python3
"""Soak: mesh-egress under mixed load for a long run, with the configuration reloaded every 10 s.

    sudo python3 benches/soak.py [--minutes 10] [--reload-every 10]

Load, all at once, at a paced rate (this is about leaks and failures, not throughput):
HTTP/1.1 keep-alive (wrk c8, 5 ms think time), HTTP/1.1 over TLS origination (wrk c4), HTTP/2
(h2load c4 m4 at 200 req/s per client) and gRPC unary (the same), and TCP (a new connection every
20 ms, one echo round trip each). The upstreams are the benchmark's own (examples/bench_upstream.rs).
Every reload rewrites the configuration file (a MeshTimeout's value and an extra service appear
and go), so listeners, pools and policies are rebuilt under traffic.

Every 10 s it samples the proxy's RSS and open fds. It reports them over time, the failed
requests of each client (wrk socket errors and non-2xx, h2load failed/errored, TCP round trips
that did not come back), and fails (exit 1) when a request failed, a reload was refused, or RSS
or fds at the end are above their level after the first minute by more than the margins below.
Results: stdout and target/bench/soak.md.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the benchmark's upstreams, config writer and helpers)

ADMIN = 19911
# RSS may grow this much past its level after the first minute (allocator arenas settle); fds
# not at all beyond a small allowance for connections in flight at the sample.
RSS_MARGIN = 0.10
FD_MARGIN = 16
SERVICES = [s for s in compare.SERVICES if s[0] in ("http", "http2", "grpc", "https", "tcp-echo")]


def sample(pid):
    return compare.rss_kib(pid), len(os.listdir(f"/proc/{pid}/fd"))


def metric(name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/metrics", timeout=5).read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name))


def write_config(path, base, generation):
    """The benchmark's services, plus (on odd generations) one more service and another timeout."""
    extra = ""
    if generation % 2:
        extra = ("---\ntype: MeshExternalService\nname: soak-extra\nspec:\n  match: {port: 9999, protocol: http}\n"
                 "  endpoints: [{address: 127.0.0.1, port: 9}]\n")
    timeout = "15s" if generation % 2 else "20s"
    text = base.replace("requestTimeout: 15s", f"requestTimeout: {timeout}") + extra
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def tcp_client(port, stop, counts):
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.settimeout(5)
                s.sendall(b"soak")
                got = b""
                while len(got) < 4:
                    chunk = s.recv(4 - len(got))
                    if not chunk:
                        break
                    got += chunk
                counts["tcp_ok" if got == b"soak" else "tcp_failed"] += 1
        except OSError:
            counts["tcp_failed"] += 1
        time.sleep(0.02)


def wrk_paced(port, conns, seconds, scheme="http"):
    script = os.path.join(compare.OUT, "soak-think.lua")
    with open(script, "w") as f:
        f.write("function delay() return 5 end\n")
    return subprocess.Popen(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-s", script, f"{scheme}://127.0.0.1:{port}/"],
                            stdout=subprocess.PIPE, text=True)


def wrk_failures(out):
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    failed = (sum(int(g) for g in errors.groups()) if errors else 0) + (int(non2xx.group(1)) if non2xx else 0)
    return total, failed


def h2load_paced(port, seconds, grpc):
    cmd = ["h2load", "-t1", "-c4", "-m4", "--rps=200", "-D", str(seconds)]
    url = f"http://127.0.0.1:{port}/"
    if grpc:
        body = os.path.join(compare.OUT, "soak-grpc.bin")
        with open(body, "wb") as f:
            msg = b"0123456789"
            f.write(b"\x00" + len(msg).to_bytes(4, "big") + msg)
        cmd += ["-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers"]
        url = f"http://127.0.0.1:{port}/bench.Echo/Unary"
    return subprocess.Popen(cmd + [url], stdout=subprocess.PIPE, text=True)


def h2load_failures(out):
    m = re.search(r"requests: (\d+) total, \d+ started, \d+ done, \d+ succeeded, (\d+) failed, (\d+) errored", out)
    status = re.search(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not m:
        return 0, 1
    bad_status = sum(int(g) for g in status.groups()) if status else 0
    return int(m.group(1)), int(m.group(2)) + int(m.group(3)) + bad_status


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--reload-every", type=float, default=10)
    args = parser.parse_args()
    seconds = int(args.minutes * 60)
    for tool in ("wrk", "h2load"):
        if not shutil.which(tool):
            if os.geteuid() != 0:
                sys.exit(f"{tool} is missing: run as root (installs wrk, nghttp2-client) or install it")
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk", "nghttp2-client"], check=True)
    subprocess.run(["cargo", "build", "--release", "--bin", "mesh-egress", "--example", "bench_upstream"],
                   cwd=compare.ROOT, check=True)
    os.makedirs(compare.OUT, exist_ok=True)
    children = []
    try:
        ca_file = os.path.join(compare.OUT, "soak-ca.pem")
        up = subprocess.Popen([compare.UPSTREAM, "--http", f"127.0.0.1:{compare.HTTP}", "--https",
                               f"127.0.0.1:{compare.HTTPS}", "--tcp", f"127.0.0.1:{compare.ECHO}", "--ca-out", ca_file],
                              stdout=subprocess.PIPE, text=True)
        children.append(up)
        if up.stdout.readline().strip() != "ready":
            sys.exit("bench_upstream did not start (is an old one still running? pkill -f bench_upstream)")
        with open(ca_file) as f:
            base = compare.mes_yaml(f.read(), SERVICES)
        config = os.path.join(compare.OUT, "soak.yaml")
        write_config(config, base, 0)
        proxy = subprocess.Popen([compare.MESH, "run", "-c", config, "--admin", f"127.0.0.1:{ADMIN}",
                                  "--transparent", "off", "--dns", "off"],
                                 env=dict(os.environ, RUST_LOG="error"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
        children.append(proxy)
        compare.wait_http(f"http://127.0.0.1:{ADMIN}/ready")
        port = {s[0]: s[4] for s in SERVICES}
        clients = {
            "HTTP/1.1 (wrk c8)": (wrk_paced(port["http"], 8, seconds), wrk_failures),
            "HTTP/1.1 over TLS origination (wrk c4)": (wrk_paced(port["https"], 4, seconds), wrk_failures),
            "HTTP/2 (h2load c4 m4)": (h2load_paced(port["http2"], seconds, False), h2load_failures),
            "gRPC unary (h2load c4 m4)": (h2load_paced(port["grpc"], seconds, True), h2load_failures),
        }
        children += [p for p, _ in clients.values()]
        stop, counts = threading.Event(), {"tcp_ok": 0, "tcp_failed": 0}
        tcp = threading.Thread(target=tcp_client, args=(port["tcp-echo"], stop, counts), daemon=True)
        tcp.start()
        started = time.monotonic()
        samples, generation, next_reload = [], 0, started + args.reload_every
        while (elapsed := time.monotonic() - started) < seconds:
            if time.monotonic() >= next_reload:
                generation += 1
                write_config(config, base, generation)
                next_reload += args.reload_every
            if not samples or elapsed - samples[-1][0] >= 10:
                rss, fds = sample(proxy.pid)
                samples.append((elapsed, rss, fds))
                print(f"t={elapsed:5.0f}s rss={rss / 1024:.1f} MiB fds={fds} reloads={generation}", flush=True)
            time.sleep(0.5)
        stop.set()
        tcp.join(10)
        time.sleep(2)  # the last reload lands
        reloads_ok = metric('mesh_egress_config_reloads_total{result="success"}')
        reloads_failed = metric('mesh_egress_config_reloads_total{result="failure"}')
        rss, fds = sample(proxy.pid)
        samples.append((time.monotonic() - started, rss, fds))
        rows, failed_total = [], 0
        for label, (p, parse) in clients.items():
            out, _ = p.communicate(timeout=120)
            total, failed = parse(out)
            failed_total += failed
            rows.append((label, total, failed))
        rows.append(("TCP echo round trips (new connection each)", counts["tcp_ok"] + counts["tcp_failed"], counts["tcp_failed"]))
        failed_total += counts["tcp_failed"]
    finally:
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)
        for c in children:
            try:
                c.wait(10)
            except subprocess.TimeoutExpired:
                c.kill()

    after_minute = next(s for s in samples if s[0] >= 60) if seconds > 60 else samples[0]
    end = samples[-1]
    rss_ok = end[1] <= after_minute[1] * (1 + RSS_MARGIN)
    fds_ok = end[2] <= after_minute[2] + FD_MARGIN
    machine = f"{os.cpu_count()} cores, " + re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read()).group(1)
    lines = [f"Soak, {time.strftime('%Y-%m-%d')}, {machine}: {args.minutes:g} min, configuration reloaded every "
             f"{args.reload_every:g} s ({reloads_ok:.0f} reloads applied, {reloads_failed:.0f} refused). Command: "
             f"`sudo python3 benches/soak.py --minutes {args.minutes:g}`", "",
             "| client | requests | failed |", "|---|---|---|"]
    lines += [f"| {label} | {total:,} | {failed} |" for label, total, failed in rows]
    lines += ["", "| time [min] | RSS [MiB] | open fds |", "|---|---|---|"]
    for t, r, f in samples:
        if abs(t % 60) < 10 or (t, r, f) == end or t < 10:
            lines.append(f"| {t / 60:.1f} | {r / 1024:.1f} | {f} |")
    lines += ["", f"RSS after 1 min {after_minute[1] / 1024:.1f} MiB, at the end {end[1] / 1024:.1f} MiB "
              f"({'flat' if rss_ok else 'GREW'}, margin {RSS_MARGIN:.0%}); fds {after_minute[2]} → {end[2]} "
              f"({'flat' if fds_ok else 'GREW'}); failed requests: {failed_total}."]
    report = "\n".join(lines) + "\n"
    with open(os.path.join(compare.OUT, "soak.md"), "w") as f:
        f.write(report)
    print("\n" + report)
    if failed_total or reloads_failed or not (rss_ok and fds_ok):
        sys.exit(1)


if __name__ == "__main__":
    main()
