#!/usr/bin/env bash
# Starts an N-node Tandem cluster from the release binary in a temporary
# directory (loopback ports 7171..), runs the given command with
# $ENDPOINTS set to the nodes' addresses, then stops the cluster.
#
#   bash scripts/bench-cluster.sh 3 -- ./target/release/tandem bench begin --endpoint '$ENDPOINTS'
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${1:?number of nodes}; shift
[ "${1:-}" = "--" ] && shift
bin=${TANDEM_BIN:-./target/release/tandem}
[ -x "$bin" ] || cargo build --release -p tandem-coordinator
dir=$(mktemp -d)
peers=""
for i in $(seq 1 "$nodes"); do peers+="${peers:+,}$i=127.0.0.1:$((7170 + i))"; done
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null
  # SIGTERM is a graceful stop; give it 5 s, then make sure.
  for _ in $(seq 1 50); do kill -0 "${pids[@]}" 2>/dev/null || break; sleep 0.1; done
  kill -9 "${pids[@]}" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
for i in $(seq 1 "$nodes"); do
  "$bin" serve --id "$i" --listen "127.0.0.1:$((7170 + i))" --http-listen "127.0.0.1:$((7180 + i))" --peers "$peers" \
    --data-dir "$dir/node-$i" --log-level warn ${TANDEM_BENCH_SERVE_ARGS:-} > "$dir/node-$i.log" 2>&1 &
  pids+=($!)
done
ENDPOINTS=$(echo "$peers" | sed 's/[0-9]*=//g')
export ENDPOINTS
for _ in $(seq 1 100); do
  "$bin" cluster status --endpoint "$ENDPOINTS" --json 2>/dev/null | grep -q '"leader":[1-9]' && break
  sleep 0.1
done
cmd="$*"
eval "${cmd//\$ENDPOINTS/$ENDPOINTS}"
