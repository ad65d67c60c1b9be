#!/usr/bin/env python3
"""TCP bulk, one stream: what each proxy costs its peers as well as itself.

    sudo python3 benches/bulk_peers.py [--proxies mesh-egress,envoy,haproxy] [--rounds 2] [--duration 4]
                                       [--mesh-binary PATH --mesh-binary PATH ...]

compare.py's "TCP bulk, 1 stream" row: iperf3's client sends to its server through the proxy, the
proxy alone on CPU 1 with one worker, iperf3's client and server on CPU 0. That row's throughput is
CPU 0's: the proxy's core is about half idle. So this prints, per MiB received, the proxy's CPU
and iperf3's server's (utime/stime from /proc/PID/stat), the server's reads and context switches
(/proc/PID/io syscr, /proc/PID/status), both cores' busy and softirq shares (/proc/stat), and
iperf3's own CPU percentages for client and server. With --mesh-binary given more than once,
those builds take turns with the other proxies.

Run `benches/compare.py` once first: this uses what it prepared (release build, Envoy in
target/bench-venv, target/bench/mesh.yaml, envoy.json and haproxy-1.cfg).
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C  # noqa: E402


def per_process(pid):
    """(utime ticks, stime ticks, read system calls, context switches) of `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open(f"/proc/{pid}/io") as f:
        reads = int(next(line.split()[1] for line in f if line.startswith("syscr:")))
    with open(f"/proc/{pid}/status") as f:
        switches = sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
    return int(fields[11]), int(fields[12]), reads, switches


def cores():
    """For CPU 0 and 1: (idle + iowait, all, irq + softirq) ticks from /proc/stat."""
    result = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name in ("cpu0", "cpu1"):
                v = [int(x) for x in values[:8]]
                result[name] = (v[3] + v[4], sum(v), v[5] + v[6])
    return result


def measure(kind, envoy, duration, server_pid):
    port = next(s for s in C.SERVICES if s[0] == "tcp-bulk")[C.PROXIES[kind][1]]
    proxy = C.Proxy(kind, 1, "1", envoy, C.OUT)
    try:
        p0, s0, k0 = C.cpu_seconds(proxy.pid), per_process(server_pid), cores()
        out = subprocess.run(["taskset", "-c", "0", "iperf3", "-c", "127.0.0.1", "-p", str(port), "-t",
                              str(duration), "-J"], capture_output=True, text=True, check=True).stdout
        p1, s1, k1 = C.cpu_seconds(proxy.pid), per_process(server_pid), cores()
    finally:
        proxy.stop()
    end = json.loads(out)["end"]
    mib = end["sum_received"]["bytes"] / 2**20
    tick = 1e6 / C.CLK_TCK / mib  # µs per MiB of one clock tick
    busy = {c: 1 - (k1[c][0] - k0[c][0]) / (k1[c][1] - k0[c][1]) for c in k0}
    irq = {c: (k1[c][2] - k0[c][2]) / (k1[c][1] - k0[c][1]) for c in k0}
    return {
        "rate": mib / end["sum_received"]["seconds"],
        "proxy": (p1[0] - p0[0] + p1[1] - p0[1]) * 1e6 / mib,
        "server": (s1[0] - s0[0] + s1[1] - s0[1]) * tick,
        "server_reads": (s1[2] - s0[2]) / mib,
        "server_switches": (s1[3] - s0[3]) / mib,
        "client_pct": end["cpu_utilization_percent"]["host_total"],
        "server_pct": end["cpu_utilization_percent"]["remote_total"],
        "busy": busy, "irq": irq,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxies", default="mesh-egress,envoy,haproxy")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=4)
    ap.add_argument("--mesh-binary", action="append", default=[], help="a mesh-egress binary; several take turns")
    args = ap.parse_args()
    envoy = os.path.join(C.VENV, "bin", "envoy")
    for path in (C.MESH, envoy, *(os.path.join(C.OUT, f) for f in ("mesh.yaml", "envoy.json", "haproxy-1.cfg"))):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run benches/compare.py once first")
    targets = []
    for kind in args.proxies.split(","):
        if kind == "mesh-egress" and args.mesh_binary:
            targets += [(os.path.relpath(b), kind, os.path.abspath(b)) for b in args.mesh_binary]
        else:
            targets.append((kind, kind, C.MESH))
    server = subprocess.Popen(["taskset", "-c", "0", "iperf3", "-s", "-p", str(C.IPERF)], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        for _ in range(args.rounds):
            for name, kind, binary in targets:  # taking turns, so the VM's drift falls on all
                C.MESH = binary
                r = measure(kind, envoy, args.duration, server.pid)
                print(f"{name:28} {r['rate']:6,.0f} MiB/s | µs/MiB: proxy {r['proxy']:4.0f}, iperf3 server "
                      f"{r['server']:4.0f} | server reads {r['server_reads']:4.1f}/MiB, context switches "
                      f"{r['server_switches']:4.2f}/MiB | iperf3 CPU client {r['client_pct']:3.0f}% server "
                      f"{r['server_pct']:3.0f}% | CPU 0 busy {r['busy']['cpu0']:.2f} (irq {r['irq']['cpu0']:.2f}), "
                      f"CPU 1 busy {r['busy']['cpu1']:.2f} (irq {r['irq']['cpu1']:.2f})", flush=True)
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
