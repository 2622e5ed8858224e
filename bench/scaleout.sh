#!/usr/bin/env bash
# Scale-out figures: deliveries per second and publish-to-delivery latency
# through 1 and 3 walkie nodes on each engine (Redis, NATS JetStream), with
# the engine's own CPU, measured by `walkie-bench fanout` (its connections,
# the publisher's included, spread over the nodes in turn).
#
#   bench/scaleout.sh [SUBSCRIBERS] [RATE] [SECONDS]     # defaults 300 1000 5
#
# Needs Redis on 127.0.0.1:6379 and NATS (JetStream) on 127.0.0.1:4222, or
# WALKIE_TEST_REDIS / WALKIE_TEST_NATS. By default every walkie node is
# pinned to core 0 and the load generator to core 1 (as in the suite); on a
# machine with more cores, WALKIE_NODE_CPUS=2,3,4 gives each node its own
# core and WALKIE_LOAD_CPUS=8-15 spreads the generator over those cores (one
# thread each). The engine runs where the system put it, and its CPU is read
# (`walkie-bench cpu-time`: the kernel's process CPU clock, to the
# nanosecond) before and after the whole `walkie-bench fanout` run.
# WALKIE_NO_BUILD=1 uses the binaries already in target/release.
set -euo pipefail
cd "$(dirname "$0")/.."
subs=${1:-300}
rate=${2:-1000}
secs=${3:-5}
redis=${WALKIE_TEST_REDIS:-redis://127.0.0.1:6379}
nats=${WALKIE_TEST_NATS:-nats://127.0.0.1:4222}
node_cpus=${WALKIE_NODE_CPUS:-0}
load_cpus=${WALKIE_LOAD_CPUS:-1}
IFS=, read -r -a node_cpu_list <<<"$node_cpus"
# One generator thread per core in the taskset list (e.g. 8-15,20).
threads=$(python3 -c 'import sys; print(sum(len(range(int(a), int(b) + 1)) if "-" in p else 1 for p in sys.argv[1].split(",") for a, _, b in [p.partition("-")]))' "$load_cpus")
[ -n "${WALKIE_NO_BUILD:-}" ] || cargo build --release -q -p walkie-cli -p walkie-bench
bin=target/release
out=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]+"${pids[@]}"}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$out"; }
trap cleanup EXIT

cpu_of() { # total CPU seconds of a pid (0 without one)
  if [ -n "$1" ]; then "$bin/walkie-bench" cpu-time "$1" || echo 0; else echo 0; fi
}

run() { # engine-name engine-url nodes engine-pid
  local name=$1 url=$2 nodes=$3 epid=$4 addrs=() i port
  local prefix="bench$RANDOM"
  for ((i = 0; i < nodes; i++)); do
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    WALKIE_LOG=warn taskset -c "${node_cpu_list[i % ${#node_cpu_list[@]}]}" "$bin/walkie" serve --bind "127.0.0.1:$port" --engine "$url" \
      --engine-prefix "$prefix" --no-deflate --client-queue 100000 --client-queue-bytes 64M >"$out/node$i.log" 2>&1 &
    pids+=($!)
    addrs+=("127.0.0.1:$port")
  done
  sleep 1.5
  local list; list=$(IFS=,; echo "${addrs[*]}")
  local c0; c0=$(cpu_of "$epid")
  local json
  json=$(taskset -c "$load_cpus" "$bin/walkie-bench" fanout --addr "$list" --path /rooms/scaleout \
    --subscribers "$subs" --rate "$rate" --warmup 2s --duration "${secs}s" --threads "$threads")
  local c1; c1=$(cpu_of "$epid")
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  pids=()
  python3 - "$name" "$nodes" "$c0" "$c1" "$secs" "$json" <<'PY'
import json, sys
name, nodes, c0, c1, secs, raw = sys.argv[1:]
o = json.loads(raw)
engine_cpu = (float(c1) - float(c0)) / (float(secs) + 2)  # window plus warm-up: an upper bound
ms = lambda us: "-" if us is None else f"{us/1000:.1f} ms"
print(f"| {name} | {nodes} | {o['rate']/1000:.0f}k | {o['lost']} | {ms(o['p50_us'])} | {ms(o['p99_us'])} | {engine_cpu*100:.0f}% |")
PY
}

redis_pid=$(pgrep -x redis-server | head -1)
nats_pid=$(pgrep -x nats-server | head -1)
echo "walkie-bench fanout: $subs subscribers spread over the nodes, $rate msg/s of 64 B, ${secs}s measured"
echo "nodes on cores $node_cpus, load generator on cores $load_cpus ($threads threads), $(nproc) cores in all"
echo
echo "| engine | nodes | deliveries/s | lost | p50 | p99 | engine CPU (of one core) |"
echo "|---|---|---|---|---|---|---|"
for n in 1 3; do run redis "$redis" "$n" "$redis_pid"; done
for n in 1 3; do run nats "$nats" "$n" "$nats_pid"; done
