#!/usr/bin/env bash
# Deterministic simulation of a 3-node cluster under faults drawn from each
# seed (coordinator/src/sim/). Prints a line and a replay command per failing
# seed, and last one JSON line: {"seeds":N,"failed":M,"first_failure":S|null}.
#
#   bash scripts/simulate.sh --seeds 10000          # seeds 0..9999
#   bash scripts/simulate.sh --seeds 1000 --start 5000
#   bash scripts/simulate.sh --seed 42              # replay one, with its faults
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p tandem-coordinator --features sim --bin tandem-sim
exec ./target/release/tandem-sim "$@"
