#!/usr/bin/env bash
# Starts an N-node Tandem cluster from the release binary in a temporary
# directory (loopback ports 7171..), runs the given command with
# $ENDPOINTS set to the nodes' addresses, then stops the cluster.
#
#   bash scripts/bench-cluster.sh 3 -- ./target/release/tandem bench begin --endpoint '$ENDPOINTS'
#
# Knobs (environment): TANDEM_BIN (the node binary), TANDEM_BENCH_SERVE_ARGS
# (more `serve` flags), TANDEM_BENCH_NODE_ENV (environment for the nodes
# only, e.g. TOKIO_WORKER_THREADS=1), TANDEM_BENCH_LOG_LEVEL (warn),
# TANDEM_BENCH_KEEP_LOGS (a directory to copy the nodes' logs to),
# TANDEM_BENCH_CPU=0 (do not print, per node, the CPU, context switches,
# read/write system calls and log fsyncs the command cost).
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
  kill "${pids[@]}" 2>/dev/null || true
  # SIGTERM is a graceful stop; give it 5 s, then make sure.
  for _ in $(seq 1 50); do kill -0 "${pids[@]}" 2>/dev/null || break; sleep 0.1; done
  kill -9 "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ -n "${TANDEM_BENCH_KEEP_LOGS:-}" ]; then cp "$dir"/node-*.log "$TANDEM_BENCH_KEEP_LOGS"/ || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT
for i in $(seq 1 "$nodes"); do
  env ${TANDEM_BENCH_NODE_ENV:-} "$bin" serve --id "$i" --listen "127.0.0.1:$((7170 + i))" --http-listen "127.0.0.1:$((7180 + i))" --peers "$peers" \
    --data-dir "$dir/node-$i" --log-level ${TANDEM_BENCH_LOG_LEVEL:-warn} ${TANDEM_BENCH_SERVE_ARGS:-} > "$dir/node-$i.log" 2>&1 &
  pids+=($!)
done
ENDPOINTS=$(echo "$peers" | sed 's/[0-9]*=//g')
export ENDPOINTS
for _ in $(seq 1 100); do
  "$bin" cluster status --endpoint "$ENDPOINTS" --json 2>/dev/null | grep -q '"leader":[1-9]' && break
  sleep 0.1
done
# CPU seconds (user + system) each node used while the command ran, so a
# run can be read as CPU per operation (TANDEM_BENCH_CPU=0 to skip).
cpu_of() { awk '{ printf "%.2f", ($14 + $15) / '"$(getconf CLK_TCK)"' }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Context switches of all the node's threads (voluntary + not): a count of
# wake-ups that, unlike CPU seconds, does not drift with the machine's speed.
switches_of() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { n += $2 } END { print n + 0 }'; }
# Read- and write-type system calls (sockets and the log alike).
syscalls_of() { awk '/^sysc[rw]/ { n += $2 } END { print n + 0 }' /proc/"$1"/io 2>/dev/null || echo 0; }
# The log's fsyncs, as the node counts them (its /metrics): on this kind
# of virtual machine each costs tens of microseconds of CPU.
fsyncs_of() {
  curl -s --max-time 2 "http://127.0.0.1:$((7180 + $1))/metrics" 2>/dev/null |
    awk '/^tandem_raft_fsync_seconds_count/ { n = $2 } END { print n + 0 }'
}
declare -A cpu_before switches_before syscalls_before fsyncs_before
i=1
for p in "${pids[@]}"; do
  cpu_before[$p]=$(cpu_of "$p"); switches_before[$p]=$(switches_of "$p"); syscalls_before[$p]=$(syscalls_of "$p")
  fsyncs_before[$p]=$(fsyncs_of "$i"); i=$((i + 1))
done
cmd="$*"
eval "${cmd//\$ENDPOINTS/$ENDPOINTS}"
if [ "${TANDEM_BENCH_CPU:-1}" = 1 ]; then
  total=0; i=1
  for p in "${pids[@]}"; do
    used=$(awk -v a="$(cpu_of "$p")" -v b="${cpu_before[$p]}" 'BEGIN { printf "%.2f", a - b }')
    echo "node-$i cpu ${used}s, $(( $(switches_of "$p") - ${switches_before[$p]} )) context switches, $(( $(syscalls_of "$p") - ${syscalls_before[$p]} )) read/write syscalls, $(( $(fsyncs_of "$i") - ${fsyncs_before[$p]} )) fsyncs" >&2
    total=$(awk -v a="$total" -v b="$used" 'BEGIN { printf "%.2f", a + b }'); i=$((i + 1))
  done
  echo "nodes cpu ${total}s" >&2
fi
