#!/usr/bin/env bash
# Publishes live scores for the scores demo (/demos/scores): three matches,
# one update per second, each message a match's whole state keyed by match.
#
#   walkie serve --api-key dev &
#   examples/scores.sh [UPDATES]     # default 120; WALKIE_API_KEY (dev), WALKIE_URL
set -euo pipefail
updates=${1:-120}
[[ $updates =~ ^[0-9]+$ ]] || { echo "usage: $0 [UPDATES]" >&2; exit 2; }
export WALKIE_API_KEY=${WALKIE_API_KEY:-dev}
walkie=${WALKIE:-$(dirname "$0")/../target/release/walkie}
[[ -x $walkie ]] || walkie=walkie
matches=("Lions vs Tigers" "Owls vs Hawks" "Sharks vs Whales")
declare -A home away
for m in "${matches[@]}"; do home[$m]=0; away[$m]=0; done
for ((i = 1; i <= updates; i++)); do
  m=${matches[RANDOM % ${#matches[@]}]}
  if ((RANDOM % 4 == 0)); then
    if ((RANDOM % 2)); then home[$m]=$((home[$m] + 1)); else away[$m]=$((away[$m] + 1)); fi
  fi
  minute=$(((i * 90 / updates) + 1))
  data=$(printf '{"match":"%s","home":%d,"away":%d,"minute":%d}' "$m" "${home[$m]}" "${away[$m]}" "$minute")
  "$walkie" publish scores:live "$data" --key "$m" >/dev/null
  sleep 1
done
