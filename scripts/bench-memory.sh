#!/usr/bin/env bash
# Memory per retained finished saga (issue 14's goal: at most 2 KiB): one
# node with retention caps far above what the run fills, two-step sagas
# from `tandem bench saga`, and the node's resident memory (VmRSS) read
# with `tandem_transactions_retained` twice under load; the difference of
# the two readings divided by the difference of the counts is what each
# further retained saga costs, the empty node's memory cancelled out.
#
#   bash scripts/bench-memory.sh [FIRST_S] [MORE_S]     # defaults 2 and 6
#
# Knobs: TANDEM_BIN (the binary; built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
first=${1:-2}
more=${2:-6}
bin=${TANDEM_BIN:-./target/release/tandem}
[ -x "$bin" ] || cargo build --release -p tandem-coordinator
export TANDEM_BIN=$bin
export TANDEM_BENCH_SERVE_ARGS="--finished-bytes-max 4000000000 --finished-max 4000000 ${TANDEM_BENCH_SERVE_ARGS:-}"
export TANDEM_BENCH_CPU=0
reading() {
  local pid retained rss
  pid=$(pgrep -f -- "$bin serve --id 1 " | head -1)
  rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status")
  retained=$(curl -s --max-time 2 http://127.0.0.1:7181/metrics | awk '/^tandem_transactions_retained/ { print $2 }')
  echo "$rss $retained"
}
export -f reading
export bin first more
bash scripts/bench-cluster.sh 1 -- '
  "$bin" bench saga --endpoint "$ENDPOINTS" --concurrency 64 --duration $((first + more + 2))s --warmup 0s --log-level error > /dev/null &
  load=$!
  sleep "$first"; a=$(reading)
  sleep "$more"; b=$(reading)
  wait "$load"
  read -r rss_a n_a <<< "$a"; read -r rss_b n_b <<< "$b"
  awk -v ra="$rss_a" -v rb="$rss_b" -v na="$n_a" -v nb="$n_b" "BEGIN {
    printf \"retained %d -> %d, VmRSS %d kB -> %d kB: %.0f bytes per retained saga\n\", na, nb, ra, rb, (rb - ra) * 1024 / (nb - na)
  }"
'
