#!/usr/bin/env bash
# Stalls one of this machine's database servers: SIGSTOP to every process of
# PROCESS (mariadbd or postgres), SECONDS seconds frozen — connections stay
# open, nothing answers, nothing resets — then SIGCONT. The fault a crash
# does not show: a server that hangs rather than dies (a stuck disk, a
# paused VM). Used by scripts/xa-soak.sh --stall-db and scripts/db-kill.sh
# ROUNDS --stall.
#
#   bash scripts/stall-db.sh mariadbd 8
set -uo pipefail
process=${1:?mariadbd or postgres}
seconds=${2:-5}
case "$process" in
  mariadbd | postgres) ;;
  *) echo "stall-db.sh: unknown server process $process (expected mariadbd or postgres)" >&2; exit 2 ;;
esac
# Whatever happens to this script, the server is let go again.
trap 'pkill -CONT -x "$process"' EXIT
pkill -STOP -x "$process"
sleep "$seconds"
