#!/usr/bin/env bash
# Issue 18's GPU checks in one run, for a machine with a CUDA GPU, pip LibTorch 2.x and nvcc,
# but none of lockstep's header packages (carry .device/deps made by scripts/gpu-deps.sh).
# Builds against the pip LibTorch, then runs the whole test_ddp and test_data_parallel
# binaries (their CUDA cases included), the transport-selection tests and, when the bench has
# it, `lockstep-bench --device cuda`. Everything lands in $OUT (default out/gpu): summary.txt
# first. Each step is bounded; a failing step is recorded and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/gpu}
deps=${LOCKSTEP_GPU_DEPS:-$PWD/.device/deps}
mkdir -p "$out"
summary="$out/summary.txt"
note() { echo "[gpu-check $(date +%T)] $*" | tee -a "$summary"; }
step() {  # step NAME LIMIT_S COMMAND...: runs it, logs to $out/NAME.log, notes the exit status
  local name=$1 limit=$2 rc=0
  shift 2
  timeout "$limit" "$@" >"$out/$name.log" 2>&1 || rc=$?
  note "$name: exit $rc$([[ $rc -eq 124 ]] && echo " (timed out after ${limit} s)")"
  tail -5 "$out/$name.log" | sed 's/^/    /' | tee -a "$summary"
  return 0
}
nvidia-smi -L >"$out/gpus.txt" 2>&1
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
            "gpus", torch.cuda.device_count())' | tee -a "$summary"
torch_dir=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
flags=""
[[ -d "$torch_dir/include/gloo" ]] || flags="-isystem $deps/gloo"
generator=""
command -v ninja >/dev/null && generator="-G Ninja"
step configure 300 cmake -S . -B build-gpu $generator -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  -DLOCKSTEP_HEADER_DEPS_DIR="$deps/include" -DLOCKSTEP_GTEST_SOURCE_DIR="$deps/googletest" \
  -DCMAKE_CXX_FLAGS="$flags"
grep "lockstep:" "$out/configure.log" | tee -a "$summary"
cp build-gpu/lockstep_nccl_check.log "$out/" 2>/dev/null
step build 420 cmake --build build-gpu -j "$(nproc)" --target lockstep test_ddp \
  test_data_parallel test_shm_threads lockstep-bench
grep -E "error|Error" "$out/build.log" | head -20 >>"$summary"
bin=build-gpu/tests
step test_ddp 300 "$bin/ddp/test_ddp"
step test_data_parallel 240 "$bin/dp/test_data_parallel"
step test_shm_threads 120 "$bin/shm/test_shm_threads" --gtest_filter='ShmSelection.*:CudaRoute.*'
bench=build-gpu/apps/bench/lockstep-bench
if "$bench" --help 2>/dev/null | grep -q -- "--device"; then
  step bench_cuda 300 "$bench" --device cuda --model wide,deep --repeats 1 --steps 20 \
    --json "$out/bench.json" --markdown "$out/bench.md"
else
  note "bench_cuda: skipped (this lockstep-bench has no --device)"
fi
note "done"
