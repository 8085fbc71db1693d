#pragma once
// How DataParallel reduces its replicas' gradients into the primary's .grad. Internal.
//
// The interface is what DataParallel needs from a reducer, so that the implementation behind
// it (today: BucketedReduction over a thread group; DDP's Reducer over the same group when it
// fits) is a local change.

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

namespace lockstep {
namespace dp {

/// Gradient reduction across the replicas of one DataParallel. Replica r's methods are called
/// only on replica r's thread (or while that thread is blocked in backward()).
class GradReduction {
 public:
  virtual ~GradReduction() = default;
  /// Before replica r's backward: its gradients will be scaled by `weight` (its share of the
  /// batch) and reduced as they become ready.
  virtual void prepare(int replica, double weight) = 0;
  /// After replica r's backward returned, or instead of it for a replica that had no samples
  /// (it contributes zeros). Blocks until the reduction is complete; on replica 0 the reduced
  /// gradient is then in the primary's .grad (replacing the tensor there).
  virtual void finish(int replica) = 0;
  /// Makes every replica blocked in the reduction fail with CommError (a peer died).
  virtual void abort(const std::string& reason) = 0;
  /// After an aborted step: fresh communication state for the next step.
  virtual void reset() = 0;
};

/// Options of the bucketed reduction.
struct BucketOptions {
  int64_t cap_bytes = 1 << 20;
  int64_t first_cap_bytes = 256 << 10;
};

/// Plans buckets: parameters in reverse order (backward produces the last layers' gradients
/// first), grouped by dtype, a bucket closing when it would exceed its cap (the first bucket
/// has the smaller `first_cap_bytes`, so that the first reduction starts early). A parameter
/// larger than the cap gets a bucket of its own. Returns parameter indices per bucket. Pure.
std::vector<std::vector<size_t>> plan_buckets(const std::vector<int64_t>& bytes,
                                              const std::vector<int>& dtypes,
                                              const BucketOptions& options);

/// Bucketed reduction over an in-process thread group: params[r] are replica r's parameters
/// (same order and shapes on every replica; replica 0's are the primary's); names for errors.
std::unique_ptr<GradReduction> make_bucketed_reduction(
    std::vector<std::vector<at::Tensor>> params, std::vector<std::string> names,
    const BucketOptions& options);

}  // namespace dp
}  // namespace lockstep
