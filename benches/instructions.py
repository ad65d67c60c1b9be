#!/usr/bin/env python3
"""Instructions per request (callgrind), mesh-egress against a baseline revision.

    sudo python3 benches/instructions.py [--baseline REV | --baseline-binary PATH] [--binary PATH]
                                         [--requests 2000] [--haproxy] [--loaded] [--cache]

Counts the instructions mesh-egress executes per request for HTTP/1.1, h2 and gRPC unary, the
same way for this tree and for a baseline revision (default: the merge base with the last
landed main, `origin/main` if there is one, else HEAD~1). Each binary is the `profiling` build
(the release build with line tables), unless given (--binary, --baseline-binary). Each workload runs the proxy under
`valgrind --tool=callgrind` twice, once with a short warm-up only and once with the warm-up plus
--requests more, with one worker, and reports (Ir(warm-up + N) - Ir(warm-up)) / N, so start-up,
configuration loading, the warm-up and shutdown cancel out. Instruction counts do not depend
on the machine's load or clock, so unlike throughput they compare across runs and machines.
The client is h2load (HTTP/1.1 with --h1), one connection, requests one after another.

--haproxy adds HAProxy (Debian's, one thread, `http-reuse always`, h2 to the endpoint for the
h2 and gRPC services, as benches/compare.py configures it) under the same harness: the user-space
instructions of the two proxies, which unlike their CPU time do not move with this VM's mode.
--loaded sends at the bench's concurrency instead (HTTP/1.1 64 connections, h2 and gRPC 16
connections of 10 streams each; --requests defaults to 20,000 then), where a connection's
wake-ups and system calls are shared by several requests.
--binary PATH measures a given mesh-egress binary as this tree's (the profile-guided build,
target/pgo/mesh-egress, say), --baseline-binary PATH one as the baseline instead of building a
revision (target/release/mesh-egress, the plain release build); --cache adds callgrind's simulated
first-level instruction cache misses per request (--cache-sim=yes, a 32 KiB 8-way cache of
64-byte lines whatever the machine's), which tell how much code a
request runs through, where the instruction count tells only how much of it.
Results: stdout and target/bench/instructions.md.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from compare import grpc_request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "target", "bench")
UPSTREAM = os.path.join(ROOT, "target", "release", "examples", "bench_upstream")
HTTP = 18180
ADMIN = 29911
WARMUP = 200
# HAProxy's configuration for --haproxy: the same services on the same ports.
HAPROXY_CFG = f"""global
    nbthread 1
defaults
    timeout connect 5s
    timeout client 1h
    timeout server 15s
frontend monitor
    bind 127.0.0.1:{ADMIN}
    mode http
    monitor-uri /ready
"""
SERVICES = [("http", "http", 20101), ("http2", "http2", 20102), ("grpc", "grpc", 20103)]
WORKLOADS = [
    ("HTTP/1.1 keep-alive", "http", ["--h1"]),
    ("HTTP/2", "http2", []),
    ("gRPC unary", "grpc", "grpc"),
]


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def haproxy_config(directory):
    text = HAPROXY_CFG
    for name, protocol, port in SERVICES:
        h2 = protocol != "http"
        text += (f"listen {name}\n    bind 127.0.0.1:{port}{' proto h2' if h2 else ''}\n    mode http\n"
                 f"    http-reuse always\n    server s0 127.0.0.1:{HTTP}{' proto h2' if h2 else ''}\n")
    path = os.path.join(directory, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(text)
    return path


def prepare(baseline, haproxy, binary=None, baseline_binary=None):
    tools = ("h2load", "valgrind") + (("haproxy",) if haproxy else ())
    if not all(shutil.which(tool) for tool in tools):
        if os.geteuid() != 0:
            sys.exit("missing h2load, valgrind or haproxy: run as root (it installs them)")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nghttp2-client", "valgrind"] + (["haproxy"] if haproxy else []),
                       check=True)
    os.makedirs(OUT, exist_ok=True)
    if binary is None:
        subprocess.run(["cargo", "build", "--profile", "profiling", "--bin", "mesh-egress"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "--example", "bench_upstream"], cwd=ROOT, check=True)
    current = binary or os.path.join(ROOT, "target", "profiling", "mesh-egress")
    if baseline_binary:
        return current, (os.path.relpath(baseline_binary, ROOT), baseline_binary)
    # The baseline in a worktree of its own, built into its own target directory (kept, so a
    # second run does not build it again).
    rev = sh(["git", "rev-parse", "--short", baseline], cwd=ROOT).strip()
    tree = os.path.join(ROOT, "target", "baseline", rev)
    if not os.path.isdir(tree):
        subprocess.run(["git", "worktree", "add", "--detach", tree, rev], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--profile", "profiling", "--bin", "mesh-egress"], cwd=tree, check=True,
                   env=dict(os.environ, CARGO_TARGET_DIR=os.path.join(ROOT, "target", "baseline-target")))
    base = os.path.join(ROOT, "target", "baseline-target", "profiling", "mesh-egress")
    return current, (rev, base)


def config(directory):
    docs = []
    outbounds = []
    for name, protocol, port in SERVICES:
        docs.append(f"type: MeshExternalService\nname: {name}\nspec:\n  match: {{port: {HTTP}, protocol: {protocol}}}\n"
                    f"  endpoints: [{{address: 127.0.0.1, port: {HTTP}}}]\n")
        outbounds.append(f"    - port: {port}\n      backendRef: {{kind: MeshExternalService, name: {name}}}\n")
    docs.append("type: Dataplane\nname: bench\nnetworking:\n  outbound:\n" + "".join(outbounds))
    path = os.path.join(directory, "mesh.yaml")
    with open(path, "w") as f:
        f.write("---\n".join(docs))
    return path


def wait_ready(proc, timeout=120.0):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError("the proxy exited under valgrind")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError("not ready under valgrind")


def h2load(port, n, extra, loaded=False):
    conns, streams = ((64, 1) if extra == ["--h1"] else (16, 10)) if loaded else (1, 1)
    cmd = ["h2load", "-n", str(n), "-c", str(conns), "-m", str(streams)]
    url = f"http://127.0.0.1:{port}/"
    if extra == "grpc":
        args, url = grpc_request(port)
        cmd += args
    else:
        cmd += extra
    out = sh(cmd + [url])
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if not done or int(done.group(2)) != n:
        raise RuntimeError(f"h2load did not get {n} answers:\n{out}")


def mesh_command(binary, config_path, state_dir):
    return [binary, "run", "-c", config_path, "--workers", "1", "--admin", f"127.0.0.1:{ADMIN}", "--readiness-port",
            "off", "--transparent", "off", "--dns", "off", "--no-watch", "--state-dir", state_dir]


def instructions(command, port, extra, n, loaded=False, cache=False):
    """Total instructions of one proxy run (start, the warm-up, then n more requests, stop) and,
    with `cache`, its simulated first-level instruction cache misses: {"Ir": .., "I1mr": ..}.
    `command(state_dir)`: the proxy's command line."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "callgrind.out")
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}"]
            + (["--cache-sim=yes", "--I1=32768,8,64"] if cache else []) + command(tmp),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ, RUST_LOG="error"))
        try:
            wait_ready(proc)
            h2load(port, WARMUP * 10 if loaded else WARMUP, extra, loaded)
            if n:
                h2load(port, n, extra, loaded)
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=120)
        events = re.search(r"Events *: ([\w ]+)\n", err)
        total = re.search(r"Collected : ([\d ]+)\n", err)
        if not events or not total:
            raise RuntimeError(f"no callgrind total:\n{err[-2000:]}")
        return dict(zip(events.group(1).split(), map(int, total.group(1).split())))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--baseline", default=None, help="revision to compare against")
    parser.add_argument("--requests", type=int, default=None, help="requests measured (2,000; 20,000 with --loaded)")
    parser.add_argument("--haproxy", action="store_true", help="also HAProxy, under the same harness")
    parser.add_argument("--loaded", action="store_true", help="the bench's concurrency, not one request at a time")
    parser.add_argument("--binary", help="measure this mesh-egress binary as this tree's (e.g. target/pgo/mesh-egress)")
    base.add_argument("--baseline-binary", help="measure this mesh-egress binary as the baseline, not a revision")
    parser.add_argument("--cache", action="store_true",
                        help="also simulated instruction-cache misses per request (callgrind --cache-sim=yes)")
    args = parser.parse_args()
    if args.requests is None:
        args.requests = 20000 if args.loaded else 2000
    baseline = args.baseline
    if baseline is None and not args.baseline_binary:
        has_origin = subprocess.run(["git", "rev-parse", "--verify", "-q", "origin/main"], cwd=ROOT,
                                    capture_output=True).returncode == 0
        baseline = sh(["git", "merge-base", "HEAD", "origin/main"], cwd=ROOT).strip() if has_origin else "HEAD~1"
    binary = os.path.abspath(args.binary) if args.binary else None
    baseline_binary = os.path.abspath(args.baseline_binary) if args.baseline_binary else None
    current, (base_rev, base) = prepare(baseline, args.haproxy, binary, baseline_binary)
    head = os.path.relpath(binary, ROOT) if binary else sh(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT).strip()
    events = ["Ir", "I1mr"] if args.cache else ["Ir"]
    up = subprocess.Popen([UPSTREAM, "--http", f"127.0.0.1:{HTTP}"], stdout=subprocess.PIPE, text=True)
    try:
        if up.stdout.readline().strip() != "ready":
            sys.exit("bench_upstream did not start")
        with tempfile.TemporaryDirectory() as tmp:
            config_path = config(tmp)
            # Keyed by role, not revision: a baseline that is HEAD must not overwrite this tree's.
            targets = [("tree", lambda d, b=current: mesh_command(b, config_path, d)),
                       ("baseline", lambda d, b=base: mesh_command(b, config_path, d))]
            if args.haproxy:
                haproxy_cfg = haproxy_config(tmp)
                targets.append(("HAProxy", lambda d: ["haproxy", "-db", "-f", haproxy_cfg]))
            rows = []
            for label, service, extra in WORKLOADS:
                port = next(p for name, _, p in SERVICES if name == service)
                per = {}
                for name, command in targets:
                    without = instructions(command, port, extra, 0, args.loaded, args.cache)
                    with_n = instructions(command, port, extra, args.requests, args.loaded, args.cache)
                    per[name] = {e: (with_n[e] - without[e]) / args.requests for e in events}
                rows.append((label, per))
                names = {"tree": head, "baseline": base_rev, "HAProxy": "HAProxy"}
                print(f"{label}: " + ", ".join(
                    f"{n['Ir']:,.0f} instructions/request at {names[role]}"
                    + (f" ({n['I1mr']:,.0f} I1 misses)" if args.cache else "") for role, n in per.items()), flush=True)
    finally:
        up.terminate()
    flags = ((f" --binary {head}" if binary else "") + (f" --baseline-binary {base_rev}" if baseline_binary else f" --baseline {base_rev}")
             + (" --haproxy" if args.haproxy else "") + (" --loaded" if args.loaded else "") + (" --cache" if args.cache else ""))
    load = ("HTTP/1.1 over 64 connections, h2 and gRPC over 16 connections of 10 streams" if args.loaded
            else "one connection, one request at a time")
    lines = [
        f"Instructions per request (callgrind, 1 worker, {args.requests} requests after a warm-up, {load}). "
        f"Command: `sudo python3 benches/instructions.py{flags}`",
        "",
    ]
    for event in events:
        what = {"Ir": "instructions", "I1mr": "I1 misses (simulated first-level instruction cache)"}[event]
        lines += [
            f"| {what} | {head}{'' if binary else ' (this tree)'} | {base_rev} (baseline) | change |" + (" HAProxy | this tree / HAProxy |" if args.haproxy else ""),
            "|---|---|---|---|" + ("---|---|" if args.haproxy else ""),
        ]
        for label, per in rows:
            now, before = per["tree"][event], per["baseline"][event]
            line = f"| {label} | {now:,.0f} | {before:,.0f} | {(now / before - 1) * 100:+.1f}% |"
            if args.haproxy:
                line += f" {per['HAProxy'][event]:,.0f} | {now / per['HAProxy'][event]:.2f} |"
            lines.append(line)
        lines.append("")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(OUT, "instructions.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
