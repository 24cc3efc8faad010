#!/usr/bin/env bash
# Every workload with its database killed under it (RELIABILITY.md, "The
# databases crash"): on a one-node cluster, ROUNDS rounds of the saga,
# TCC, 3PC and transactional-message examples (200 orders each), each run
# twice — once with MariaDB, once with PostgreSQL killed (SIGKILL) 0.3 s in
# and started again a second after its last process is gone. Each example
# checks its own invariants at the end and exits non-zero on a violation.
# The XA workload has its own: scripts/xa-soak.sh --kill-db. With --stall,
# the server is frozen instead (SIGSTOP for 2-9 s, then SIGCONT,
# scripts/stall-db.sh): open connections that answer nothing.
#
#   bash scripts/db-kill.sh 5          # kills this machine's database servers
#   bash scripts/db-kill.sh 5 --stall  # freezes them
#
# Prints one line per run and, last, {"runs":…,"failed_runs":…}.
set -uo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
fault=killed
case "${2:-}" in
  "") ;;
  --stall) fault=stalled ;;
  *) echo "db-kill.sh: unknown argument $2 (expected --stall)" >&2; exit 2 ;;
esac

bash scripts/prepare-services.sh > /dev/null
cargo build --release -q -p tandem-coordinator -p tandem-examples || exit 1
dir=$(mktemp -d)
./target/release/tandem serve --id 1 --listen 127.0.0.1:7371 --http-listen 127.0.0.1:7381 \
  --peers 1=127.0.0.1:7371 --data-dir "$dir/node-1" > "$dir/node-1.log" 2>&1 &
node=$!
trap 'kill $node 2>/dev/null' EXIT
for _ in $(seq 1 100); do
  ./target/release/tandem cluster status --endpoint 127.0.0.1:7371 --json 2>/dev/null | grep -q '"leader":1' && break
  sleep 0.1
done

runs=0 failed=0
for round in $(seq 1 "$rounds"); do
  for example in saga-order tcc-travel three-phase order-events; do
    count=--orders
    [ "$example" = tcc-travel ] && count=--bookings
    for process in mariadbd postgres; do
      (
        sleep 0.3
        if [ "$fault" = killed ]; then
          bash scripts/crash-db.sh "$process" 1 > "$dir/restart.log" 2>&1
        else
          bash scripts/stall-db.sh "$process" "$((2 + RANDOM % 8)).$((RANDOM % 10))" > "$dir/restart.log" 2>&1
        fi
      ) &
      killer=$!
      out="$dir/$round-$example-$process.out"
      timeout 300 "./target/release/$example" --endpoint 127.0.0.1:7371 "$count" 200 > "$out" 2>&1
      rc=$?
      wait "$killer" || { echo "$process did not come back (see $dir/restart.log)" >&2; exit 1; }
      runs=$((runs + 1))
      if [ "$rc" = 0 ]; then
        echo "round $round, $example, $process $fault: $(tail -1 "$out")"
        rm -f "$out"
      else
        failed=$((failed + 1))
        echo "round $round, $example, $process $fault: FAILED (exit $rc); output kept in $out" >&2
      fi
    done
  done
done
[ "$failed" = 0 ] && rm -rf "$dir"
echo "{\"runs\":$runs,\"failed_runs\":$failed}"
[ "$failed" = 0 ]
