#!/usr/bin/env bash
# The long nemesis: 3 real tandem nodes running, one after another, runs of
# 200 XA transfers (PostgreSQL <-> MariaDB), saga orders, TCC bookings, 3PC
# orders and order events (transactional messages to NATS, RabbitMQ and a
# webhook),
# while a nemesis kills (-9) and restarts, pauses past the election timeout,
# or cuts off one node at a time, every 0.5-1.5 s. Checks every run from the
# databases' rows, then that every transaction ended and every node holds
# the same ones.
#
#   bash scripts/nemesis.sh [FAULTS] [RUNS]     # defaults: 150 faults, up to 60 runs
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prepare-services.sh
TANDEM_NEMESIS_FAULTS=${1:-150} TANDEM_NEMESIS_RUNS=${2:-60} \
  cargo nextest run -p tandem-coordinator --test nemesis --no-capture \
  --profile long 2>&1 | grep -A3 -E "^nemesis:|PASS|FAIL|panicked|Summary|assert"

