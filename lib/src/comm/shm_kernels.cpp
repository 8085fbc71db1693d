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

// Note [One pass per element]
// A reduction on a host with spare memory bandwidth and no spare core (two ranks computing on
// two cores) costs what it reads and writes, and every extra pass over a block is paid in
// CPU time taken from backward. So the sums that gradients take (float32, float64, float16,
// bfloat16; sum or average; up to kUnrolledSources sources) read every source element once
// and write every destination element once, in one loop that the compiler unrolls over the
// sources (their count is a template parameter); for float32 and float64 it also vectorises
// over the elements (16-bit floats convert element by element). A destination may be a source
// at the same offset (the in-place all-reduce writes every rank's region); each element is
// read before it is written, in the same iteration, so that aliasing is safe. Other ops,
// integer dtypes and more sources take the blocked loop below. Both loops do the same
// arithmetic in the same order (fold the sources in order in Acc, then divide by the count
// for an average, then cast), so which one runs never changes a result's bits.
// (On the 2-core development machine, the MLP's 2.1 MB half of bucket 0 at two ranks: the
// blocked loop plus a separate gather copy took 400-600 us, one pass writing both regions
// 100-170 us.)
constexpr int kUnrolledSources = 8;

template <typename T, typename Acc, typename Op>
void reduce_blocked(void* const* dsts, int ndst, const void* const* srcs, int nsrc, int64_t n,
                    bool avg) {
  constexpr int64_t kBlock = 1024;
  Acc acc[kBlock];
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
    for (int d = 0; d < ndst; ++d) {
      T* out = static_cast<T*>(dsts[d]) + b;
      for (int64_t i = 0; i < m; ++i) out[i] = static_cast<T>(acc[i]);
    }
  }
}

// NS sources, ND destinations (1, or one per source), all compile-time. Up to two
// destinations the loop stores straight from registers: GCC vectorises it behind a runtime
// check that each destination is either a source at the same address or overlaps none (it
// accepts the in-place case). With more destinations that check grows past what GCC versions
// a loop for, so the sum goes to a tile on the stack (which aliases nothing) and each
// destination is stored from the tile while it is in L1.
template <typename T, typename Acc, int NS, int ND, bool kAvg>
void sum_one_pass(void* const* dsts, const void* const* srcs, int64_t n) {
  const T* s[NS];
  T* d[ND];
  for (int k = 0; k < NS; ++k) s[k] = static_cast<const T*>(srcs[k]);
  for (int q = 0; q < ND; ++q) d[q] = static_cast<T*>(dsts[q]);
  auto fold = [&](int64_t i) {
    Acc a = static_cast<Acc>(s[0][i]);
    for (int k = 1; k < NS; ++k) a = a + static_cast<Acc>(s[k][i]);
    if (kAvg) a /= static_cast<Acc>(NS);
    return static_cast<T>(a);
  };
  if constexpr (ND <= 2) {
    for (int64_t i = 0; i < n; ++i) {
      const T v = fold(i);
      for (int q = 0; q < ND; ++q) d[q][i] = v;
    }
  } else {
    constexpr int64_t kTile = 1024;
    T tile[kTile];
    for (int64_t b = 0; b < n; b += kTile) {
      const int64_t m = std::min(kTile, n - b);
      for (int64_t i = 0; i < m; ++i) tile[i] = fold(b + i);
      for (int q = 0; q < ND; ++q) std::copy(tile, tile + m, d[q] + b);
    }
  }
}

template <typename T, typename Acc, int NS>
bool try_sum_one_pass(void* const* dsts, int ndst, const void* const* srcs, int nsrc,
                      int64_t n, bool avg) {
  if constexpr (NS > kUnrolledSources) {
    return false;
  } else {
    if (nsrc != NS) return try_sum_one_pass<T, Acc, NS + 1>(dsts, ndst, srcs, nsrc, n, avg);
    if (ndst == 1) {
      avg ? sum_one_pass<T, Acc, NS, 1, true>(dsts, srcs, n)
          : sum_one_pass<T, Acc, NS, 1, false>(dsts, srcs, n);
      return true;
    }
    if constexpr (NS > 1) {
      if (ndst == NS) {
        avg ? sum_one_pass<T, Acc, NS, NS, true>(dsts, srcs, n)
            : sum_one_pass<T, Acc, NS, NS, false>(dsts, srcs, n);
        return true;
      }
    }
    return false;
  }
}

template <typename T, typename Acc>
void reduce_sum(void* const* dsts, int ndst, const void* const* srcs, int nsrc, int64_t n,
                bool avg) {
  if (!try_sum_one_pass<T, Acc, 1>(dsts, ndst, srcs, nsrc, n, avg)) {
    reduce_blocked<T, Acc, SumOp>(dsts, ndst, srcs, nsrc, n, avg);
  }
}

template <typename T, typename Acc>
ReduceFn pick_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      if constexpr (std::is_floating_point<Acc>::value) return &reduce_sum<T, Acc>;
      return &reduce_blocked<T, Acc, SumOp>;
    case ReduceOp::kProduct: return &reduce_blocked<T, Acc, ProdOp>;
    case ReduceOp::kMin: return &reduce_blocked<T, Acc, MinOp>;
    case ReduceOp::kMax: return &reduce_blocked<T, Acc, MaxOp>;
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
