#!/usr/bin/env bash
# The benchmark suite and the scale-out figures on a machine with many cores
# (12 or more), where the load generator must not be the bottleneck: the
# server under test on core 0 and the load generator on cores 4-11 (one
# thread each); for scale-out, walkie nodes on cores 0, 1 and 2 and the
# engine on core 3. Uses binaries already built (target/release,
# bench/peers/target/release, bench/node/node_modules, node on PATH) and
# starts Redis and NATS (redis-server, nats-server on PATH) unless they run.
#
#   bench/manycore.sh [RUNS] [DURATION]      # defaults 3 3s
#   SCALEOUT=0 bench/manycore.sh 3 2s        # the suite's cases only: about 8 minutes
#
# bench/pack.sh packs the binaries for a machine that cannot build them.
#
# Reports go to $WALKIE_BENCH_OUT (default target/bench-manycore).
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
dur=${2:-3s}
n=$(nproc)
if [ "$n" -lt 12 ]; then
  echo "bench/manycore.sh: needs 12 cores or more (this machine has $n)" >&2
  exit 2
fi
out=${WALKIE_BENCH_OUT:-target/bench-manycore}
mkdir -p "$out"
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "== $n cores, kernel $(uname -r),$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), open files $(ulimit -n)"
suite() { # out-subdir peers cases
  target/release/walkie-bench suite --no-build --out "$out/$1" --peers "$2" --cases "$3" \
    --runs "$runs" --duration "$dur" --warmup 1s --server-cpu 0 --load-cpus 4-11
}
suite fanout walkie,uws "${FANOUT_CASES:-fanout-1k,fanout-10k,fanout-ws-1k}"
suite echo "${PEERS:-walkie,uws,fastwebsockets,yawc,reflector}" "${ECHO_CASES:-cpu-100x32,echo-1000x32,echo-100x32}"
suite more "${MORE_PEERS:-walkie,uws,fastwebsockets,yawc}" "${MORE_CASES:-echo-1x32,echo-100x16k,pipe-100x32}"
suite cpu16k "${CPU16K_PEERS:-walkie,uws,fastwebsockets,tokio-websockets,yawc,reflector}" cpu-100x16k
if [ "${SCALEOUT:-1}" = 0 ]; then exit 0; fi
started=()
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  taskset -c 3 redis-server --port 6379 --save '' --appendonly no >"$out/redis.log" 2>&1 &
  started+=($!)
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
  taskset -c 3 nats-server -js -p 4222 -sd "$out/nats" >"$out/nats.log" 2>&1 &
  started+=($!)
fi
sleep 1
WALKIE_NO_BUILD=1 WALKIE_NODE_CPUS=0,1,2 WALKIE_LOAD_CPUS=4-11 \
  bench/scaleout.sh "${SUBS:-1000}" "${RATE:-1000}" 5
for p in "${started[@]+"${started[@]}"}"; do kill "$p" 2>/dev/null; done
