#!/usr/bin/env bash
# A leader killed (-9) at load: a 3-node cluster runs two-step sagas in open
# loop; 7 s into the measured window the leader is killed. Two views:
# * the client's: latency from each saga's scheduled start, so the slowest
#   sagas show how long those in flight at the kill (and those scheduled
#   during the election) waited before they finished;
# * the participant's (its call log): for every saga in flight at the kill —
#   a step called before it and the next step due — when its next call came,
#   counted from the kill. That is "moving again", measured where it
#   happens; sagas in flight and never called again are counted too.
#
#   bash scripts/bench-failover.sh [RATE]        (default 1000 sagas/s)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${TANDEM_BIN:-./target/release/tandem}
if [ "${1:-}" = "--inner" ]; then
  endpoints=$2 rate=$3
  out=$(mktemp) calls=$(mktemp)
  "$bin" bench saga --endpoint "$endpoints" --concurrency 512 --rate "$rate" --duration 15s --log-level error \
    --call-log "$calls" > "$out" 2>&1 &
  bench=$!
  sleep 9
  leader=$("$bin" cluster status --endpoint "$endpoints" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["leader"])')
  pid=$(pgrep -f -- "serve --id $leader " | head -1)
  killed_us=$(date +%s%6N)
  kill -9 "$pid"
  echo "killed the leader, node $leader (pid $pid), at $(date -d "@${killed_us:0:10}" +%T).${killed_us:10:3}"
  wait "$bench" || true
  cat "$out"
  "$bin" cluster status --endpoint "$endpoints" --json | python3 -c 'import json, sys; s = json.load(sys.stdin); print("new leader: node", s["leader"])'
  python3 - "$calls" "$killed_us" <<'PY'
import sys
from collections import defaultdict
path, killed = sys.argv[1], int(sys.argv[2])
calls = defaultdict(list)
last = 0
for line in open(path):
    at, gid, branch, op = line.split()
    calls[gid].append((int(at), branch, op))
    last = max(last, int(at))
# In flight at the kill: its first step was called before the kill and its
# second step (branch "b") had not been called yet.
waits, stuck = [], 0
for cs in calls.values():
    cs.sort()
    before = [c for c in cs if c[0] <= killed]
    if not before or any(b == "b" for _, b, _ in before):
        continue
    later = [at for at, _, _ in cs if at > killed]
    if later:
        waits.append(later[0] - killed)
    elif killed < last - 5_000_000:
        stuck += 1
waits.sort()
ms = lambda us: f"{us / 1000:.0f} ms"
print(f"participant's call log: {sum(map(len, calls.values()))} calls for {len(calls)} sagas")
# The participant's longest silence that ends after the kill: from the
# last call before it (often one the dying leader sent) to the first call
# the new leader's driver made.
times = sorted(at for cs in calls.values() for at, _, _ in cs)
gaps = [(b - a, a, b) for a, b in zip(times, times[1:]) if b > killed]
if gaps:
    gap, start, end = max(gaps)
    print(f"  longest silence at the participant: {ms(gap)}, "
          f"from {(start - killed) / 1000:+.0f} ms to {(end - killed) / 1000:+.0f} ms after the kill")
if waits:
    pct = lambda q: waits[min(len(waits) - 1, int(q * len(waits)))]
    print(f"  {len(waits)} sagas in flight at the kill called again after: "
          f"p50 +{ms(pct(0.5))}, p99 +{ms(pct(0.99))}, max +{ms(waits[-1])}; "
          f"over 2 s: {sum(w > 2_000_000 for w in waits)}")
print(f"  in flight at the kill and never called again: {stuck}")
PY
  rm -f "$out" "$calls"
  exit 0
fi
rate=${1:-1000}
TANDEM_BIN=$bin TANDEM_BENCH_CPU=0 bash scripts/bench-cluster.sh 3 -- bash scripts/bench-failover.sh --inner '$ENDPOINTS' "$rate"
