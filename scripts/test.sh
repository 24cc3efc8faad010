#!/usr/bin/env bash
# The whole test suite: prepares the local databases, then runs every test
# (unit, property, and multi-process cluster tests against real PostgreSQL and
# MariaDB) with cargo-nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prepare-services.sh
profile=default
[ "${CI:-}" = "true" ] && profile=ci
if cargo nextest --version >/dev/null 2>&1; then
  # The simulation's checker must catch a bug put in on purpose: the same
  # tests, built with each injected bug, must find it.
  for bug in inject-bug-commit-on-first-vote inject-bug-apply-before-commit inject-bug-stale-read inject-bug-deliver-on-timeout inject-bug-ack-before-durable; do
    cargo nextest run -p tandem-coordinator --test simulation --features "$bug" --profile "$profile"
  done
  cargo nextest run --workspace --profile "$profile" "$@"
else
  echo "cargo-nextest not found; falling back to cargo test" >&2
  cargo test --workspace "$@"
fi
