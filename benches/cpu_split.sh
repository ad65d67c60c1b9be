#!/bin/bash
# User and system CPU per request of one proxy, alone on CPU 1 with the load generator and the
# bench upstream on CPU 0 (as compare.py's 1-worker rows):
#
#   sudo benches/cpu_split.sh mesh-egress|haproxy http1|h2|grpc
#
# Uses the configurations and builds a `benches/compare.py` run left in target/ (run it once
# first). Prints req/s and the proxy's utime and stime (/proc/PID/stat) per request.
set -euo pipefail
cd "$(dirname "$0")/.."
proxy=$1 workload=$2
case $workload in http1) off=3 ;; h2) off=4 ;; grpc) off=5 ;; *) echo "workload: http1, h2 or grpc" >&2; exit 2 ;; esac
taskset -c 0 target/release/examples/bench_upstream --http 127.0.0.1:18080 --https 127.0.0.1:18443 \
  --tcp 127.0.0.1:18090 --ca-out target/bench/split-ca.pem >/dev/null &
upstream=$!
trap 'kill $upstream ${pid:-} 2>/dev/null' EXIT
sleep 0.5
if [ "$proxy" = haproxy ]; then
  taskset -c 1 haproxy -f target/bench/haproxy-1.cfg -db >/dev/null 2>&1 &
  port=2200$off
else
  RUST_LOG=error taskset -c 1 target/release/mesh-egress run -c target/bench/mesh.yaml --workers 1 \
    --admin 127.0.0.1:29901 --transparent off --dns off --no-watch >/dev/null 2>&1 &
  port=2000$off
fi
pid=$!
sleep 0.7
read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
case $workload in
  http1) n=$(taskset -c 0 wrk -t1 -c64 -d4s "http://127.0.0.1:$port/" | awk '/requests in/{print $1}') ;;
  h2) n=$(taskset -c 0 h2load -t1 -c16 -m10 -D 4 "http://127.0.0.1:$port/" | awk '/^requests:/{print $8}') ;;
  grpc) n=$(taskset -c 0 h2load -t1 -c16 -m10 -D 4 -d target/bench/grpc-body.bin -H 'content-type: application/grpc' \
    -H 'te: trailers' "http://127.0.0.1:$port/bench.Echo/Unary" | awk '/^requests:/{print $8}') ;;
esac
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
tick_us=$((1000000 / $(getconf CLK_TCK)))
python3 -c "n=$n; print(f'$proxy $workload: {n/4:,.0f} req/s, user {($u1-$u0)*$tick_us/n:.2f} µs/req, system {($s1-$s0)*$tick_us/n:.2f} µs/req')"
