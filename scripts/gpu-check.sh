#!/usr/bin/env bash
# Issue 18's GPU checks, for a machine with a CUDA GPU, pip LibTorch 2.x and nvcc but none of
# lockstep's header packages (carry .device/deps, made by scripts/gpu-deps.sh). Two calls, each
# under 10 minutes (the lent machine's per-command limit); the build folder stays between them
# while the machine is warm:
#   scripts/gpu-check.sh build   configure against the pip LibTorch (LOCKSTEP_NCCL=ON: a NCCL
#                                adapter that does not compile fails loudly) and build
#   scripts/gpu-check.sh test    the whole test_ddp and test_data_parallel binaries (their CUDA
#                                cases included), the transport-selection tests, and
#                                lockstep-bench --device cuda
# Everything lands in $OUT (default out/gpu): summary.txt, then one log per step. Each step is
# bounded; a failing step is recorded and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: $0 build|test}
out=${OUT:-out/gpu}
deps=${LOCKSTEP_GPU_DEPS:-$PWD/.device/deps}
mkdir -p "$out"
summary="$out/summary.txt"
note() { echo "[gpu-check $(date +%T)] $*" | tee -a "$summary"; }
step() {  # step NAME LIMIT_S COMMAND...: runs it, logs to $out/NAME.log, notes the exit status
  local name=$1 limit=$2 rc=0
  shift 2
  timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1 || rc=$?
  note "$name: exit $rc$([[ $rc -eq 124 || $rc -eq 137 ]] && echo " (timed out after ${limit} s)")"
  tail -5 "$out/$name.log" | sed 's/^/    /' | tee -a "$summary"
  return 0
}
case "$mode" in
build)
  nvidia-smi -L >"$out/gpus.txt" 2>&1
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
              "gpus", torch.cuda.device_count())' 2>&1 | tee -a "$summary"
  torch_dir=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
  nccl_inc=$(python3 -c 'import os, nvidia.nccl as n; print(os.path.join(list(n.__path__)[0], "include"))' 2>/dev/null)
  flags=""
  [[ -d "$torch_dir/include/gloo" ]] || flags="-isystem $deps/gloo"
  zlib=()
  if [[ ! -f /usr/include/zlib.h ]]; then  # headers from the deps, the machine's libz.so.1
    lib=$(ldconfig -p 2>/dev/null | awk '/libz\.so\.1 / {print $NF; exit}')
    zlib=(-DZLIB_INCLUDE_DIR="$deps/zlib" -DZLIB_LIBRARY="${lib:-/lib/x86_64-linux-gnu/libz.so.1}")
  fi
  generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  step configure 150 cmake -S . -B build-gpu "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
    -DLOCKSTEP_HEADER_DEPS_DIR="$deps/include" -DLOCKSTEP_GTEST_SOURCE_DIR="$deps/googletest" \
    -DLOCKSTEP_NCCL=ON ${nccl_inc:+-DLOCKSTEP_NCCL_INCLUDE_DIR="$nccl_inc"} \
    -DCMAKE_CXX_FLAGS="$flags" "${zlib[@]}"
  grep "lockstep:" "$out/configure.log" | tee -a "$summary"
  if [[ -f build-gpu/lockstep_nccl_check.log ]]; then
    cp build-gpu/lockstep_nccl_check.log "$out/"
    grep -m 10 "error" build-gpu/lockstep_nccl_check.log | tee -a "$summary"
  fi
  step build 420 cmake --build build-gpu -j "$(nproc)" --target lockstep test_ddp \
    test_data_parallel test_shm_threads lockstep-bench
  grep -m 20 -E "error|Error" "$out/build.log" >>"$summary"
  ;;
test)
  bin=build-gpu/tests
  step test_ddp 200 "$bin/ddp/test_ddp"
  step test_data_parallel 150 "$bin/dp/test_data_parallel"
  step test_shm_threads 40 "$bin/shm/test_shm_threads" --gtest_filter='ShmSelection.*:CudaRoute.*'
  bench=build-gpu/apps/bench/lockstep-bench
  if "$bench" --help 2>/dev/null | grep -q -- "--device"; then
    step bench_cuda 180 "$bench" --device cuda --model wide,deep --repeats 1 --steps 20 \
      --json "$out/bench.json" --markdown "$out/bench.md"
  else
    note "bench_cuda: skipped (this lockstep-bench has no --device)"
  fi
  ;;
*)
  echo "usage: $0 build|test" >&2
  exit 2
  ;;
esac
note "$mode done"
