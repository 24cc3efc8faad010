#!/usr/bin/env bash
# Crashes one of this machine's database servers and starts it again:
# SIGKILL to every process of PROCESS (mariadbd or postgres), a wait until
# none is left (a postmaster refuses to start while its killed predecessor
# still holds the socket), DOWN more seconds down, then
# scripts/prepare-services.sh starts it (crash recovery included). Used by
# scripts/xa-soak.sh --kill-db, scripts/db-kill.sh and the SDK's restart
# test. Exits non-zero if the server did not come back.
#
#   bash scripts/crash-db.sh mariadbd 1.5
set -uo pipefail
cd "$(dirname "$0")/.."
process=${1:?mariadbd or postgres}
down=${2:-1}
case "$process" in
  mariadbd | postgres) ;;
  *) echo "crash-db.sh: unknown server process $process (expected mariadbd or postgres)" >&2; exit 2 ;;
esac
pkill -9 -x "$process"
for _ in $(seq 1 100); do pgrep -x "$process" > /dev/null || break; sleep 0.1; done
sleep "$down"
bash scripts/prepare-services.sh
