#!/usr/bin/env python3
"""One proxy alone: CPU, page faults and system calls per request, for telling user from kernel.

    sudo python3 benches/alone.py [--proxy mesh-egress|haproxy|both] [--workload KEY] [--duration 4] [--rounds 2]
                                  [--mesh-binary PATH --mesh-binary PATH ...]

With --mesh-binary given more than once, those mesh-egress binaries take turns instead (an A/B of
two builds, e.g. the `profiling` builds benches/instructions.py leaves in target/profiling and
target/baseline-target/profiling).

KEY is one of compare.py's workloads served by the bench upstream's plain HTTP port (http1-c64,
http1-c64-paced, http2-m10, grpc-unary, tcp-rr-64, ...; `--help` lists them).

Run `benches/compare.py` once first: this uses what it prepared (release builds, the bench
upstream, target/bench/mesh.yaml and haproxy-1.cfg). Each round starts the proxy alone on CPU 1
with one worker (the bench upstream and the load generator on CPU 0), warms it up for 2 s,
measures one run of the workload (utime, stime and minor faults of the proxy from
/proc/PID/stat, divided by the requests counted), then counts its system calls with `strace -c`
over a second run (strace slows the proxy; the counts per request are what it is for). It also
counts the TCP segments the whole machine sent per request (loopback: the load generator's, the
proxy's and the upstream's), which tells whether a proxy makes the kernel send more packets.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C  # noqa: E402

LOAD_CPUS = ["taskset", "-c", "0"]
# compare.py's workloads whose endpoint is the bench upstream's plain HTTP port (the one started here).
WORKLOADS = [w[0] for w in C.workloads(0, LOAD_CPUS) if w[4] == C.HTTP]


def workload(key, secs):
    """compare.py's workload `key` for `secs` seconds: (its service, run(port))."""
    _, _, _, service, _, run = next(w for w in C.workloads(secs, LOAD_CPUS) if w[0] == key)
    return service, run


def minor_faults(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])  # field 10


def tcp_segments():
    """The machine's TCP segments sent so far (/proc/net/snmp's Tcp OutSegs): over a run on
    loopback, every segment the load generator, the proxy and the upstream sent (and any other
    job's: run it on an otherwise quiet machine)."""
    with open("/proc/net/snmp") as f:
        names, values = [line.split() for line in f if line.startswith("Tcp:")][:2]
    return int(values[names.index("OutSegs")])


def syscalls(pid, run):
    """System calls per request over one run, from `strace -c -f` attached to the proxy."""
    with tempfile.NamedTemporaryFile(mode="r", suffix=".strace") as out:
        tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", out.name],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            count = run()["count"]
        finally:
            tracer.terminate()
            tracer.wait()
        calls = {}
        for line in out.read().splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
            if m and m.group(2) != "total":
                calls[m.group(2)] = int(m.group(1)) / count
        return calls


def measure(kind, key, secs):
    service, run = workload(key, secs)
    _, short = workload(key, 2)
    svc = next(s for s in C.SERVICES if s[0] == service)
    port = svc[C.PROXIES[kind][1]]
    proxy = C.Proxy(kind, 1, "1", None, C.OUT)
    try:
        short(port)
        (u0, s0), f0, g0 = proxy.cpu(), minor_faults(proxy.pid), tcp_segments()
        sample = run(port)
        (u1, s1), f1, g1 = proxy.cpu(), minor_faults(proxy.pid), tcp_segments()
        n = sample["count"]
        result = {"rate": sample["rate"], "user": (u1 - u0) * 1e6 / n, "system": (s1 - s0) * 1e6 / n,
                  "minflt": (f1 - f0) / n, "segments": (g1 - g0) / n}
        result["calls"] = syscalls(proxy.pid, lambda: short(port))
        return result
    finally:
        proxy.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy", default="both", choices=["mesh-egress", "haproxy", "both"])
    ap.add_argument("--workload", default="http1-c64", choices=WORKLOADS)
    ap.add_argument("--duration", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mesh-binary", action="append", default=[], help="a mesh-egress binary; several take turns")
    args = ap.parse_args()
    for path in (C.MESH, C.UPSTREAM, os.path.join(C.OUT, "mesh.yaml"), os.path.join(C.OUT, "haproxy-1.cfg")):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run benches/compare.py once first")
    kinds = ["mesh-egress", "haproxy"] if args.proxy == "both" else [args.proxy]
    binaries = {"mesh-egress": C.MESH}
    if args.mesh_binary:
        binaries = {os.path.relpath(b): os.path.abspath(b) for b in args.mesh_binary}
        kinds = list(binaries) + [k for k in kinds if k != "mesh-egress"]
    upstream = subprocess.Popen(["taskset", "-c", "0", C.UPSTREAM, "--http", f"127.0.0.1:{C.HTTP}"],
                                stdout=subprocess.PIPE, text=True)
    try:
        if upstream.stdout.readline().strip() != "ready":
            sys.exit("bench_upstream did not start (is an old one still running? pkill -f bench_upstream)")
        results = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for kind in kinds:  # alternating, so the VM's drift falls on both
                if kind in binaries:
                    C.MESH = binaries[kind]
                r = measure("mesh-egress" if kind in binaries else kind, args.workload, args.duration)
                results[kind].append(r)
                calls = ", ".join(f"{name} {per:.2f}" for name, per in sorted(r["calls"].items(), key=lambda c: -c[1])
                                  if per >= 0.01)
                print(f"{kind:12} {args.workload}: {r['rate']:9,.0f} req/s, user {r['user']:.2f} + system "
                      f"{r['system']:.2f} = {r['user'] + r['system']:.2f} µs/req, minor faults {r['minflt']:.4f}/req, "
                      f"TCP segments {r['segments']:.2f}/req; "
                      f"system calls per request: {calls}", flush=True)
        for kind, rs in results.items():
            med = lambda k: statistics.median(r[k] for r in rs)
            print(f"MEDIAN {kind:12} {med('rate'):9,.0f} req/s, user {med('user'):.2f}, system {med('system'):.2f}, "
                  f"total {statistics.median(r['user'] + r['system'] for r in rs):.2f} µs/req, "
                  f"TCP segments {med('segments'):.2f}/req")
    finally:
        upstream.terminate()


if __name__ == "__main__":
    main()
