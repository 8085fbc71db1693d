#!/usr/bin/env bash
# Compiles lockstep's NCCL adapter (lib/src/adapter/c10d_adapter.cpp with LOCKSTEP_WITH_NCCL)
# against the installed LibTorch's ProcessGroupNCCL.hpp, syntax and templates only, where a
# CUDA toolkit with nccl.h is present. A CPU-only LibTorch (Debian's) ships the c10d NCCL
# headers but not the generated c10/cuda/impl/cuda_cmake_macros.h, so a one-line stand-in is
# supplied. This checks the adapter against that LibTorch's c10d API (1.13 here); the real
# build of a CUDA LibTorch is still checked by cmake/LockstepNccl.cmake's try_compile.
#
# usage: scripts/check-nccl-adapter.sh SOURCE_DIR [CXX]
# exit 0: compiles; 1: does not (the compiler's errors); 77: skipped (no nccl.h or no c10d
# NCCL header).
set -euo pipefail
src=${1:?usage: $0 SOURCE_DIR [CXX]}
cxx=${2:-c++}
nccl_dir=""
for d in "${NCCL_INCLUDE_DIR:-}" "${CUDA_HOME:-/usr/local/cuda}/include" /usr/local/cuda/include /usr/include; do
  if [[ -n "$d" && -f "$d/nccl.h" && -f "$d/cuda_runtime_api.h" ]]; then nccl_dir=$d; break; fi
done
torch_inc=""
for d in /usr/include /usr/local/include; do
  if [[ -f "$d/torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp" ]]; then torch_inc=$d; break; fi
done
if [[ -z "$nccl_dir" || -z "$torch_inc" ]]; then
  echo "check-nccl-adapter: skipped (nccl.h with a CUDA toolkit: ${nccl_dir:-absent}; c10d's ProcessGroupNCCL.hpp: ${torch_inc:-absent})"
  exit 77
fi
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
if [[ ! -f "$torch_inc/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$stub/c10/cuda/impl/cuda_cmake_macros.h"
fi
"$cxx" -std=gnu++17 -fsyntax-only -DLOCKSTEP_WITH_NCCL -DUSE_C10D_NCCL -DUSE_C10D_GLOO \
  -DUSE_DISTRIBUTED -I"$src/lib/src" -I"$src/lib/include" -isystem "$stub" \
  -isystem "$torch_inc/torch/csrc/api/include" -isystem "$nccl_dir" \
  "$src/lib/src/adapter/c10d_adapter.cpp"
echo "check-nccl-adapter: c10d_adapter.cpp with LOCKSTEP_WITH_NCCL compiles against $torch_inc's ProcessGroupNCCL and $nccl_dir/nccl.h"
