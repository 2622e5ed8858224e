#!/usr/bin/env bash
# One fan-out run at any rate, with the server's CPU sampled over exactly the
# measured window (the suite's fan-out cases have fixed rates), to the
# nanosecond: `walkie-bench cpu-time` reads the kernel's process CPU clock
# (all threads), falling back to /proc ticks with a note on stderr.
#
#   bench/fanout-cpu.sh PEER SUBSCRIBERS RATE [ws]   # PEER: walkie, walkie-durable or uws
#
# `walkie` runs the suite's `--in-memory` server; `walkie-durable` the
# default engine (history in redb, in a fresh data directory). With `ws`
# (walkie only), subscribers and publisher use the Walkie protocol at /ws
# on channel `fanout:bench` (`bench/walkie-fanout.toml`), as the suite's
# `fanout-ws-1k` case does; otherwise they are members of /rooms/fanout.
#
# The server is pinned to core 0 and the generator to core 1; needs
# `cargo build --release -p walkie-cli -p walkie-bench` and, for uws,
# `npm ci` in bench/node.
set -euo pipefail
cd "$(dirname "$0")/.."
peer=${1:?give walkie, walkie-durable or uws}
subs=${2:-1000}
rate=${3:-1000}
mode=(--path /rooms/fanout)
config=()
if [ "${4:-}" = ws ]; then
  mode=(--path /ws --channel fanout:bench)
  config=(--config bench/walkie-fanout.toml)
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
tmp=$(mktemp -d)
case $peer in
  walkie|walkie-durable)
    engine=(--in-memory)
    [ "$peer" = walkie-durable ] && engine=(--data-dir "$tmp/data")
    WALKIE_LOG=warn taskset -c 0 target/release/walkie serve --bind "127.0.0.1:$port" "${engine[@]}" "${config[@]}" \
      --no-deflate --room-history 1 --client-queue 100000 --client-queue-bytes 64M >/dev/null 2>&1 & ;;
  uws) taskset -c 0 node bench/node/uws-fanout.js "$port" >/dev/null 2>&1 & ;;
  *) echo "bench/fanout-cpu.sh: PEER is walkie, walkie-durable or uws, not $peer" >&2; exit 2 ;;
esac
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$tmp"' EXIT
sleep 1.5
cpu() { target/release/walkie-bench cpu-time "$server"; }
taskset -c 1 target/release/walkie-bench fanout --addr "127.0.0.1:$port" "${mode[@]}" \
  --subscribers "$subs" --rate "$rate" --size 64 --sources 127.0.0.2-127.0.0.41 \
  --warmup 2s --duration 5s --announce |
  while read -r line; do
    case $line in
      start) cpu >"$tmp/c0" ;;
      end) cpu >"$tmp/c1" ;;
      *) echo "$line" >"$tmp/out.json" ;;
    esac
  done
python3 - "$peer" "$subs" "$rate" "$tmp" <<'PY'
import json, sys
peer, subs, rate, tmp = sys.argv[1:]
o = json.load(open(f"{tmp}/out.json"))
cpu = float(open(f"{tmp}/c1").read()) - float(open(f"{tmp}/c0").read())  # seconds
ms = lambda us: "-" if us is None else f"{us / 1000:.1f} ms"
print(f"{peer}: {subs} subscribers x {rate}/s: {o['rate'] / 1000:.0f}k deliveries/s, lost {o['lost']}, "
      f"p50 {ms(o['p50_us'])}, p99 {ms(o['p99_us'])}, server core {cpu / o['seconds'] * 100:.0f}% busy, "
      f"{cpu * 1e6 / max(1, o['deliveries']):.2f} us per delivery")
PY
