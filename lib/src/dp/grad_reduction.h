#pragma once
// How DataParallel reduces its replicas' gradients into the primary's .grad. Internal.
//
// The interface is what DataParallel needs from a reducer, so that the implementation behind
// it stays a local change.

#include <ATen/core/Tensor.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace lockstep {
namespace dp {

/// Gradient reduction across the replicas of one DataParallel. `start_step` runs on the
/// caller's thread before the replicas start; replica r's other methods run only on replica
/// r's thread (or while that thread is blocked in backward()).
class GradReduction {
 public:
  virtual ~GradReduction() = default;
  /// A step begins. `base[i]` is the primary's gradient of parameter i from before the step
  /// (undefined where there is none); the result is base + the step's gradient. `active`
  /// replicas have samples and will run backward. The primary's and the other replicas'
  /// .grad must be undefined.
  virtual void start_step(std::vector<at::Tensor> base, std::vector<uint8_t> active) = 0;
  /// Before replica r's backward, when it has samples: `weight` is its share of the batch
  /// (n_r / N, or 1 for summed losses). Returns the factor to multiply its loss by.
  virtual double prepare(int replica, double weight) = 0;
  /// After replica r's backward returned, or instead of it for a replica without samples.
  /// Helps with the reduction and blocks until it is complete. Then the primary's .grad holds
  /// the result; a parameter no replica produced a gradient for keeps an undefined .grad.
  /// Throws CommError after abort().
  virtual void finish(int replica) = 0;
  /// Makes every replica blocked in finish() (now or later in this step) throw CommError.
  virtual void abort(const std::string& reason) = 0;
};

/// How the reduction cuts and schedules its work.
struct ReductionOptions {
  int64_t bucket_bytes = 1 << 20;             ///< the Reducers' bucket cap
  std::chrono::microseconds spin{0};          ///< Note [Spin before blocking]
};

/// The reduction DataParallel uses: one DDP Reducer per replica over an in-process thread
/// group, reducing into replica 0 (see replica_reduction.cpp). params[r] are replica r's
/// trainable parameters (same order and shapes on every replica; replica 0's are the
/// primary's); names for messages.
std::unique_ptr<GradReduction> make_replica_reduction(
    std::vector<std::vector<at::Tensor>> params, std::vector<std::string> names,
    const ReductionOptions& options);

}  // namespace dp
}  // namespace lockstep
