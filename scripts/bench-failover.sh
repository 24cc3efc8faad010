#!/usr/bin/env bash
# A leader killed (-9) at load: a 3-node cluster runs two-step sagas in open
# loop; 7 s into the measured window the leader is killed. Latency is
# measured from each saga's scheduled start, so the slowest sagas show how
# long transactions in flight at the kill (and those scheduled during the
# election) waited before they moved again and finished.
#
#   bash scripts/bench-failover.sh [RATE]        (default 1000 sagas/s)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${TANDEM_BIN:-./target/release/tandem}
if [ "${1:-}" = "--inner" ]; then
  endpoints=$2 rate=$3
  out=$(mktemp)
  "$bin" bench saga --endpoint "$endpoints" --concurrency 512 --rate "$rate" --duration 15s --log-level error > "$out" 2>&1 &
  bench=$!
  sleep 9
  leader=$("$bin" cluster status --endpoint "$endpoints" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["leader"])')
  pid=$(pgrep -f -- "serve --id $leader " | head -1)
  kill -9 "$pid"
  echo "killed the leader, node $leader (pid $pid), at $(date +%T.%N | cut -c1-12)"
  wait "$bench" || true
  cat "$out"; rm -f "$out"
  "$bin" cluster status --endpoint "$endpoints" --json | python3 -c 'import json, sys; s = json.load(sys.stdin); print("new leader: node", s["leader"])'
  exit 0
fi
rate=${1:-1000}
TANDEM_BIN=$bin TANDEM_BENCH_CPU=0 bash scripts/bench-cluster.sh 3 -- bash scripts/bench-failover.sh --inner '$ENDPOINTS' "$rate"
