#!/usr/bin/env bash
# Tandem beside a peer in one sitting: two-step sagas with no-op HTTP
# branches, closed loop, the same load generator (`tandem bench saga`) for
# both, rounds interleaved so that the machine's drift hits both alike:
#   Tandem, 3 nodes (every decision fsync'd on a majority)
#   Tandem, 1 node  (fsync'd)
#   dtmrs 0.13 on Redis (Redis as installed: no fsync per write)
# The peer is a benchmark dependency only: installed here, under
# target/peer, never needed to build or test Tandem. It needs Redis on
# 127.0.0.1:6379 (uses database 9, flushed before each of its rounds).
#
#   bash scripts/bench-peer-dtmrs.sh [ROUNDS] [DURATION]     (default 3 rounds of 15s)
#
# Knob: TANDEM_BENCH_CONCURRENCY (64).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3} duration=${2:-15s}
concurrency=${TANDEM_BENCH_CONCURRENCY:-64}
bin=${TANDEM_BIN:-./target/release/tandem}
[ -x "$bin" ] || cargo build --release -p tandem-coordinator
peer=target/peer/bin/dtmrs
if [ ! -x "$peer" ]; then
  cargo install dtmrs --version 0.13.0 --locked --features redis --root target/peer
fi
redis-cli -n 9 ping > /dev/null || { echo "Redis is not answering on 127.0.0.1:6379" >&2; exit 1; }
peer_pid=""
stop_peer() {
  if [ -n "$peer_pid" ]; then kill "$peer_pid" 2>/dev/null || true; wait "$peer_pid" 2>/dev/null || true; fi
  peer_pid=""
}
trap stop_peer EXIT
cpu_of() { awk '{ printf "%.2f", ($14 + $15) / '"$(getconf CLK_TCK)"' }' "/proc/$1/stat" 2>/dev/null || echo 0; }
redis_pid=$(pgrep -x redis-server | head -1 || true)
bench="$bin bench saga --concurrency $concurrency --duration $duration --log-level error"
for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  echo "-- Tandem, 3 nodes"
  TANDEM_BIN=$bin bash scripts/bench-cluster.sh 3 -- "$bench --endpoint '\$ENDPOINTS'"
  echo "-- Tandem, 1 node"
  TANDEM_BIN=$bin bash scripts/bench-cluster.sh 1 -- "$bench --endpoint '\$ENDPOINTS'"
  echo "-- dtmrs 0.13 + Redis"
  redis-cli -n 9 flushdb > /dev/null
  DTMRS_DB=redis://127.0.0.1:6379/9 DTMRS_ADDR=127.0.0.1:36789 DTMRS_GRPC_ADDR=127.0.0.1:36790 \
    RUST_LOG=warn "$peer" > /dev/null 2>&1 &
  peer_pid=$!
  for _ in $(seq 1 100); do curl -sf http://127.0.0.1:36789/health > /dev/null && break; sleep 0.1; done
  before_peer=$(cpu_of "$peer_pid") before_redis=$([ -n "$redis_pid" ] && cpu_of "$redis_pid" || echo 0)
  $bench --peer-dtm http://127.0.0.1:36789
  used_peer=$(awk -v a="$(cpu_of "$peer_pid")" -v b="$before_peer" 'BEGIN { printf "%.2f", a - b }')
  used_redis=$([ -n "$redis_pid" ] && awk -v a="$(cpu_of "$redis_pid")" -v b="$before_redis" 'BEGIN { printf "%.2f", a - b }' || echo "?")
  echo "dtmrs cpu ${used_peer}s, redis cpu ${used_redis}s" >&2
  stop_peer
done
