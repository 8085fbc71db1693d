#!/usr/bin/env bash
# The main job `make run` runs: the Fashion-MNIST recipe (recipes/fashion_mnist) on 2 ranks
# launched by lockstep-run, ending with the test accuracy and the path of the HTML report.
# Extra arguments go to the recipe (e.g. `scripts/run-main-job.sh build --epochs 1`).
# Each invocation is a fresh job (the old checkpoint is removed first); within the job,
# `--max-restarts 1` lets lockstep-run restart the ranks after a failure and the recipe
# resumes from its last checkpoint.
set -euo pipefail
build=${1:-build}
shift || true
out=${LOCKSTEP_MAIN_OUT:-$build/main-job/fashion_mnist}
mkdir -p "$out"
rm -f "$out/checkpoint.lsck"
export OMP_NUM_THREADS=1
exec "$build/apps/run/lockstep-run" --standalone --nproc-per-node 2 --max-restarts 1 \
  "$build/recipes/fashion_mnist/lockstep-fashion-mnist" --out-dir "$out" --threads 1 "$@"
