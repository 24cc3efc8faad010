#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets/) for SECONDS each
# (default 30): log entries, snapshots, API requests, participant answers.
# A crash stops it with the failing input saved under fuzz/artifacts/ and
# cargo-fuzz's command to replay it.
#
#   bash scripts/fuzz.sh            # 30 s per target (what CI runs)
#   bash scripts/fuzz.sh 600        # longer
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
# cargo-fuzz passes the sanitizer and coverage flags that rustc keeps
# behind its unstable switch; the stable toolchain takes them with this.
export RUSTC_BOOTSTRAP=1
# No AddressSanitizer: the targets are safe Rust (the node's `unsafe` blocks
# are plain system calls with no pointers — setpriority, prctl,
# sync_file_range — that no target reaches), and what they hunt is a panic, a hang
# or unbounded memory, which libFuzzer catches by itself. Many codegen units:
# the instrumented release build of the whole dependency tree was 80 % of
# this script's time with one unit per crate on two cores (10.5 min against
# 6.5 min with 16 and no sanitizer, same machine).
flags=(--sanitizer none --codegen-units 16)
cargo fuzz build "${flags[@]}"
for target in $(cargo fuzz list); do
  echo "== fuzz $target for ${secs}s"
  # libFuzzer's progress lines (#N NEW ...) left out; pipefail keeps its status.
  if ! cargo fuzz run "${flags[@]}" "$target" -- -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1 \
    | grep -vE '^#[0-9]+'; then
    echo "fuzz target $target failed; the input is under fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
