// The shared-memory transport's reduction kernels (see shm_kernels.h).
#include "comm/shm_kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

namespace lockstep {
namespace shm {

namespace {

// Accumulate in Acc (float for 16-bit floats), in the order of `srcs`.
struct SumOp {
  template <typename A>
  A operator()(A a, A b) const { return a + b; }
};
struct ProdOp {
  template <typename A>
  A operator()(A a, A b) const { return a * b; }
};
struct MinOp {
  template <typename A>
  A operator()(A a, A b) const { return b < a ? b : a; }
};
struct MaxOp {
  template <typename A>
  A operator()(A a, A b) const { return a < b ? b : a; }
};

template <typename T, typename Acc, typename Op>
void reduce_kernel(void* dst, const void* const* srcs, int nsrc, int64_t n, bool avg) {
  constexpr int64_t kBlock = 1024;
  Acc acc[kBlock];
  T* out = static_cast<T*>(dst);
  Op op;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    const T* s0 = static_cast<const T*>(srcs[0]) + b;
    for (int64_t i = 0; i < m; ++i) acc[i] = static_cast<Acc>(s0[i]);
    for (int k = 1; k < nsrc; ++k) {
      const T* sk = static_cast<const T*>(srcs[k]) + b;
      for (int64_t i = 0; i < m; ++i) acc[i] = op(acc[i], static_cast<Acc>(sk[i]));
    }
    if constexpr (std::is_floating_point<Acc>::value) {
      if (avg) {
        const Acc w = static_cast<Acc>(nsrc);
        for (int64_t i = 0; i < m; ++i) acc[i] /= w;
      }
    }
    for (int64_t i = 0; i < m; ++i) out[b + i] = static_cast<T>(acc[i]);
  }
}

template <typename T, typename Acc>
ReduceFn pick_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg: return &reduce_kernel<T, Acc, SumOp>;
    case ReduceOp::kProduct: return &reduce_kernel<T, Acc, ProdOp>;
    case ReduceOp::kMin: return &reduce_kernel<T, Acc, MinOp>;
    case ReduceOp::kMax: return &reduce_kernel<T, Acc, MaxOp>;
  }
  return nullptr;
}

}  // namespace

ReduceFn pick_kernel(at::ScalarType dtype, ReduceOp op) {
  switch (dtype) {
    case at::kFloat: return pick_op<float, float>(op);
    case at::kDouble: return pick_op<double, double>(op);
    case at::kHalf: return pick_op<c10::Half, float>(op);
    case at::kBFloat16: return pick_op<c10::BFloat16, float>(op);
    case at::kLong: return pick_op<int64_t, int64_t>(op);
    case at::kInt: return pick_op<int32_t, int32_t>(op);
    case at::kShort: return pick_op<int16_t, int16_t>(op);
    case at::kChar: return pick_op<int8_t, int8_t>(op);
    case at::kByte: return pick_op<uint8_t, uint8_t>(op);
    default: return nullptr;
  }
}

}  // namespace shm
}  // namespace lockstep
