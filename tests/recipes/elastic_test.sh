#!/usr/bin/env bash
# Elastic membership with a real training run (Note [Elastic membership] in apps/run/rounds.h):
#   A. three launchers (--nnodes 2:3, one worker each) train the recipe with periodic
#      checkpoints; once a checkpoint exists, node 2's launcher is killed with SIGKILL (its
#      worker dies with it). The round fails, the next forms on nodes 0 and 1, the workers
#      resume from the last checkpoint (step S) at world size 2 and finish: exit 0.
#   B. the same training on 3 ranks stopped at step S (--stop-after S: checkpoint, exit 75),
#      then resumed on 2 ranks to the end.
# A's final checkpoint must be byte-identical to B's: losing a node changes nothing but the
# world size from the checkpoint on.
# Usage: elastic_test.sh RECIPE LOCKSTEP_RUN [recipe flags...]
set -euo pipefail
bin=$1 run=$2
shift 2
work=$(mktemp -d "${TMPDIR:-/tmp}/lockstep_elastic.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
export LOCKSTEP_STORE_TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export LOCKSTEP_LOG_LEVEL=warn
recipe=(--progress lines --threads 1 --checkpoint-every 10 "$@")
elastic=(--nnodes 2:3 --run-id elastic --nproc-per-node 1 --max-restarts 1 --rdzv-last-call 1
         --grace-period 5 --rdzv-timeout 60)

echo "== A: three nodes, one lost"
"$run" "${elastic[@]}" --node-rank 0 --master-port 0 -- "$bin" --out-dir "$work/a" "${recipe[@]}" \
  >"$work/node0.out" 2>"$work/node0.err" &
pids+=($!); node0=$!
port=""
for _ in $(seq 600); do  # bounded: 60 s
  port=$(sed -n 's/.*hosting the rendezvous store at 127.0.0.1:\([0-9]*\).*/\1/p' "$work/node0.err" | head -1)
  [ -n "$port" ] && break
  sleep 0.1  # polls node 0's output for its port
done
[ -n "$port" ] || { echo "node 0 never hosted its store"; cat "$work/node0.err"; exit 1; }
for k in 1 2; do
  "$run" "${elastic[@]}" --node-rank $k --master-port "$port" -- "$bin" --out-dir "$work/a" "${recipe[@]}" \
    >"$work/node$k.out" 2>"$work/node$k.err" &
  pids+=($!)
  eval "node$k=$!"
done
for _ in $(seq 1200); do  # bounded: 120 s
  [ -f "$work/a/checkpoint.lsck" ] && break
  sleep 0.1  # polls for the first checkpoint
done
[ -f "$work/a/checkpoint.lsck" ] || { echo "no checkpoint within 120 s"; cat "$work"/node*.err; exit 1; }
kill -9 "$node2"
code0=0; code1=0
wait "$node0" || code0=$?
wait "$node1" || code1=$?
if [ "$code0" != 0 ] || [ "$code1" != 0 ]; then
  echo "the surviving launchers exited $code0 and $code1"; cat "$work"/node0.* "$work"/node1.*; exit 1
fi
grep -q "of world size 2 (2 of 2..3 nodes)" "$work/node0.err" \
  || { echo "no round of 2 nodes:"; cat "$work/node0.err"; exit 1; }
step=$(sed -n 's/.*resumed from .* at step \([0-9]*\) (epoch [0-9]*), written by 3 rank(s); this run has 2.*/\1/p' "$work/node0.out" | tail -1)
[ -n "$step" ] || { echo "the second round did not resume from a 3-rank checkpoint:"; cat "$work/node0.out"; exit 1; }
echo "A resumed at step $step on 2 ranks"

echo "== B: three ranks to step $step, then two ranks to the end"
code=0
"$run" --standalone --nproc-per-node 3 -- "$bin" --out-dir "$work/b" "${recipe[@]}" --stop-after "$step" \
  >"$work/b1.out" 2>&1 || code=$?
[ "$code" = 75 ] || { echo "the 3-rank run to step $step exited $code"; cat "$work/b1.out"; exit 1; }
"$run" --standalone --nproc-per-node 2 -- "$bin" --out-dir "$work/b" "${recipe[@]}" >"$work/b2.out" 2>&1 \
  || { echo "the 2-rank resume failed"; cat "$work/b2.out"; exit 1; }
if cmp "$work/a/checkpoint.lsck" "$work/b/checkpoint.lsck"; then
  echo "PASS: the elastic run's final checkpoint equals the 3-then-2-rank run's (resumed at step $step)"
else
  echo "FAIL: the final checkpoints differ"; exit 1
fi
