#!/usr/bin/env bash
# Packs what bench/manycore.sh needs into one archive, for a machine with
# no Rust toolchain, no npm registry and no internet (a lent benchmark
# machine): the release builds of walkie, walkie-bench and the Rust echo
# peers, the Node peers' modules (uWS.js with only the binary for this
# Node), and the node binary itself.
#
#   bench/pack.sh [OUT]            # default target/manycore-pack.tar.xz
#
# On the other machine, from a checkout of the same commit:
#   tar -xJf manycore-pack.tar.xz && PATH=$PWD/.pack-bin:$PATH SCALEOUT=0 bench/manycore.sh 3 2s
#
# Build first: `cargo build --release -p walkie-cli -p walkie-bench`,
# `cargo build --release --manifest-path bench/peers/Cargo.toml` and
# `npm ci` in bench/node.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/manycore-pack.tar.xz}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
need() { [ -e "$1" ] || { echo "bench/pack.sh: $1 is missing: build it first" >&2; exit 2; }; }
mkdir -p "$stage/.pack-bin" "$stage/target/release" "$stage/bench/peers/target/release" \
  "$stage/bench/node/node_modules/uwebsockets"
for b in walkie walkie-bench; do
  need "target/release/$b"
  cp "target/release/$b" "$stage/target/release/"
done
for b in reflector fastwebsockets-echo tokio-websockets-echo yawc-echo; do
  need "bench/peers/target/release/$b"
  cp "bench/peers/target/release/$b" "$stage/bench/peers/target/release/"
done
strip "$stage"/target/release/* "$stage"/bench/peers/target/release/* 2>/dev/null || true
node=$(command -v node) || { echo "bench/pack.sh: node is not on PATH" >&2; exit 2; }
cp "$node" "$stage/.pack-bin/node"
modules=bench/node/node_modules
need "$modules/uwebsockets/uws.js"
for m in ws bufferutil node-gyp-build; do cp -r "$modules/$m" "$stage/$modules/"; done
# uWS.js ships a binary per platform and Node ABI; keep the one this Node loads.
uws=$(node -p "'uws_' + process.platform + '_' + process.arch + '_' + process.versions.modules + '.node'")
need "$modules/uwebsockets/$uws"
cp "$modules/uwebsockets/"{package.json,uws.js,"$uws"} "$stage/$modules/uwebsockets/"
mkdir -p "$(dirname "$out")"
tar -C "$stage" -cf - . | xz -T0 -6 >"$out"
echo "bench/pack.sh: $out ($(du -h "$out" | cut -f1))"
