#pragma once
// How DataParallel reduces its replicas' gradients into the primary's .grad. Internal.
//
// The interface is what DataParallel needs from a reducer, so that the implementation behind
// it (DDP's Reducer over an in-process thread group) stays a local change.

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
  /// Every replica, every step, before its forward (may run a collective).
  virtual void begin_step(int replica) = 0;
  /// Before replica r's backward, when it has samples: `weight` is its share of the batch
  /// (n_r / N, or 1 for summed losses). Returns the factor to multiply its loss by.
  virtual double prepare(int replica, double weight) = 0;
  /// After replica r's backward returned, or instead of it for a replica that had no samples
  /// (it contributes zeros). Blocks until the reduction is complete; on replica 0 the reduced
  /// gradient is then in the primary's .grad; a parameter no replica produced a gradient for
  /// keeps its .grad.
  virtual void finish(int replica) = 0;
  /// Makes every replica blocked in the reduction fail with CommError (a peer died).
  virtual void abort(const std::string& reason) = 0;
  /// After an aborted step: fresh communication state for the next step.
  virtual void reset() = 0;
};

/// Bucket caps of the reduction.
struct BucketOptions {
  int64_t cap_bytes = 1 << 20;
  int64_t first_cap_bytes = 256 << 10;
};

/// The reduction DataParallel uses: one ddp::Reducer per replica over an in-process thread
/// group (see replica_reduction.cpp). params[r] are replica r's trainable parameters (same
/// order and shapes on every replica; replica 0's are the primary's); names for messages.
std::unique_ptr<GradReduction> make_replica_reduction(
    std::vector<std::vector<at::Tensor>> params, std::vector<std::string> names,
    const BucketOptions& options);

}  // namespace dp
}  // namespace lockstep
