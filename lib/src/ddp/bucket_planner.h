#pragma once
// The bucket planner: a pure function from parameter sizes to buckets, tested without any
// communication (tests/ddp/test_bucket_planner.cpp).
//
// Note [Bucket planning]
// Gradients become ready roughly in reverse registration order (the last layer's first), so
// the planner walks the parameters in a given order (reverse registration order at first,
// the observed ready order after the rebuild, see Note [Bucket rebuild] in reducer.h) and
// keeps one open bucket per (dtype, device): a bucket holds one dtype on one device because
// it is a single flat tensor. A bucket closes as soon as its bytes reach its cap; the first
// bucket of each (dtype, device) uses `first_cap_bytes` (small, so the first all-reduce starts
// early), later ones `cap_bytes`. A parameter larger than the cap gets a bucket of its own;
// zero-size parameters join a bucket like any other (they still have to be marked ready).
// Finally buckets are sorted by the position of their first parameter in the walk order, so
// launching buckets in index order follows the order gradients arrive. This is c10d's
// compute_bucket_assignment_by_size, minus its per-tensor size limits.

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace lockstep {
namespace ddp {

/// What the planner needs to know about one parameter.
struct ParamSpec {
  int64_t numel = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;
  c10::Device device = c10::Device(c10::DeviceType::CPU);
};

/// Groups parameters into buckets. `order` lists every index of `params` exactly once, in the
/// order gradients are expected to become ready; empty means reverse registration order.
/// Returns buckets in launch order, each a list of parameter indices in `order`'s order.
/// Caps are in bytes; a cap <= 0 puts every parameter of a (dtype, device) in one bucket
/// (first_cap_bytes <= 0 means "same as cap_bytes"). Throws InvalidArgument when `order` is
/// not a permutation.
std::vector<std::vector<size_t>> plan_buckets(const std::vector<ParamSpec>& params,
                                              const std::vector<size_t>& order,
                                              int64_t cap_bytes, int64_t first_cap_bytes);

/// Bytes of `mb` MiB, as the options spell caps.
int64_t mib_to_bytes(double mb);

}  // namespace ddp
}  // namespace lockstep
