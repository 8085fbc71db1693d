#pragma once
// The shared-memory transport's reduction kernels: pure functions over raw memory, tested
// without processes. Internal to comm/.

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "lockstep/process_group.h"

namespace lockstep {
namespace shm {

/// Reduces `nsrc` arrays of `n` elements at `srcs`, in that order, and writes the result to
/// each of the `ndst` arrays at `dsts`. A destination either is one of the sources (the same
/// address) or overlaps none of them. `avg` divides by `nsrc` (floating types). 16-bit floats
/// accumulate in float, so the result depends only on the values and their order: bitwise
/// the same on every rank, whatever the number of destinations (Note [One pass per element]).
using ReduceFn = void (*)(void* const* dsts, int ndst, const void* const* srcs, int nsrc,
                          int64_t n, bool avg);

/// The kernel for `dtype` and `op` (kAvg: the sum kernel, called with avg), or nullptr for a
/// dtype the transport does not reduce (complex, bool).
ReduceFn pick_kernel(at::ScalarType dtype, ReduceOp op);

}  // namespace shm
}  // namespace lockstep
