#!/usr/bin/env bash
# Tandem's main job on one machine: a single-node coordinator with its data in
# ./tandem-data, and examples against it (orders and their events through
# transactional messages; XA transfers between PostgreSQL and MariaDB).
# Stops the node on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prepare-services.sh
cargo build --release -p tandem-coordinator -p tandem-examples
./target/release/tandem serve --data-dir ./tandem-data > tandem-serve.log 2>&1 &
node=$!
trap 'kill $node 2>/dev/null; wait $node 2>/dev/null || true' EXIT
# Ready once the node has elected itself leader.
for _ in $(seq 1 100); do
  ./target/release/tandem cluster status --json 2>/dev/null | grep -q '"leader":[1-9]' && break
  sleep 0.1
done
./target/release/tandem cluster status
echo "dashboard: http://127.0.0.1:7080/ui   API: http://127.0.0.1:7080/openapi.json"
./target/release/quickstart --endpoint 127.0.0.1:7070
./target/release/order-events --endpoint 127.0.0.1:7070 --orders 200 --fail-rate 0.2
./target/release/xa-bank --endpoint 127.0.0.1:7070 --transfers 200 --concurrency 16 --fail-rate 0.1
