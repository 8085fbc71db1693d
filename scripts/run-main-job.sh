#!/usr/bin/env bash
# The main job `make run` runs: a 2-rank all-reduce smoke run on loopback, under lockstep-run
# when it is built (LOCKSTEP_BUILD_APPS), else with the variables set by hand.
set -euo pipefail
build=${1:-build}
if [ -x "$build/apps/run/lockstep-run" ]; then
  exec "$build/apps/run/lockstep-run" --standalone --nproc-per-node 2 -- "$build/apps/smoke/lockstep-smoke"
fi
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 29517)
pids=()
for r in 0 1; do
  RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    "$build/apps/smoke/lockstep-smoke" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
