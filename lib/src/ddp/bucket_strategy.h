#pragma once
// How a Reducer's buckets hold and reduce gradients. Internal.
//
// Note [Bucket strategies]
// The Reducer (reducer.h) owns what every reduction shares: readiness hooks, bucket order and
// the one-time rebuild, launching complete buckets in order while backward runs, counting the
// ranks that missed each parameter, the unused-parameter error, statistics and the trace. What
// a bucket *is* differs, and is chosen once, at construction, behind this interface:
//   - FlatBuckets (DDP; Note [Bucket control elements]): a bucket is one flat buffer, from
//     ProcessGroup::new_buffer, holding the bucket's gradients and then one control element
//     per parameter; gradients are copied (or, with gradient_as_bucket_view, written by
//     autograd) into it, it is all-reduced (or passed to a comm hook), and the averages are
//     written back.
//   - RootLists (DataParallel; Note [Reducing into a root]): a bucket is the list of the
//     gradient tensors themselves plus one control tensor, reduced into one rank with
//     ProcessGroup::reduce; nothing is copied, and only the root learns the counts.
// The Reducer calls a strategy under its own mutex, in this order per iteration: build (at
// construction and at a rebuild), copy_in per parameter (with or without a gradient),
// mark_missing for the parameters that got none, launch per bucket in order, then, once every
// bucket's Work completed, read_missing per bucket, write_back per parameter, and reset (also
// after a failure).

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lockstep/ddp.h"
#include "lockstep/process_group.h"

namespace lockstep {
namespace ddp {

struct ReducerOptions;

/// What a strategy reads of its Reducer (owned by the Reducer, outliving the strategy).
struct BucketContext {
  const std::vector<at::Tensor>* params = nullptr;
  const std::vector<std::string>* names = nullptr;
  ProcessGroup* group = nullptr;
  const ReducerOptions* options = nullptr;
  CommHook* hook = nullptr;  ///< the comm hook (FlatBuckets only)
  int world = 1;
};

class BucketStrategy {
 public:
  virtual ~BucketStrategy() = default;

  /// (Re)builds every bucket for `plan` (parameter indices per bucket, in launch order) and
  /// returns each bucket's transport (BucketStats::transport). Carries existing gradients
  /// over where they alias bucket memory. Collective where the group allocates buffers.
  virtual std::vector<std::string> build(const std::vector<std::vector<size_t>>& plan) = 0;
  /// Parameter `index`'s gradient enters its bucket (`have_grad`), or, when this rank got
  /// none, what stands for it (zeros).
  virtual void copy_in(size_t index, bool have_grad) = 0;
  /// Records in bucket `b`'s control elements that this rank got no gradient for the bucket's
  /// parameter at `position`.
  virtual void mark_missing(size_t b, size_t position) = 0;
  /// Starts bucket `b`'s reduction; `is_last` for the final bucket.
  virtual WorkPtr launch(size_t b, bool is_last) = 0;
  /// Whether this rank contributes to the launches that follow: false while it shadows the
  /// others after running out of inputs (Note [Join] in reducer.h). Written into each bucket's
  /// presence element at launch.
  virtual void set_present(bool present) = 0;
  /// Zeros bucket `b`'s gradients and control elements: what a joined rank contributes.
  virtual void fill_absent(size_t b) = 0;
  /// After bucket `b`'s reduction completed: how many ranks were present in it.
  virtual int read_present(size_t b) = 0;
  /// After every bucket's reduction completed: appends (parameter, ranks that missed it) for
  /// bucket `b`'s parameters that some rank missed, when this rank learns the counts, and
  /// clears the control elements.
  virtual void read_missing(size_t b, std::vector<std::pair<size_t, int>>& missing) = 0;
  /// Makes parameter `index`'s .grad the reduced gradient; `unused_everywhere`: no rank had a
  /// gradient for it (its .grad must stay as it was before the backward).
  virtual void write_back(size_t index, bool unused_everywhere) = 0;
  /// Drops this iteration's references and control marks and restores any .grad replaced by a
  /// stand-in. Idempotent; also called after a failure.
  virtual void reset() = 0;
};

/// DDP's flat buffers (all-reduce or comm hook).
std::unique_ptr<BucketStrategy> make_flat_buckets(const BucketContext& context);
/// DataParallel's gradient lists reduced into options.root.
std::unique_ptr<BucketStrategy> make_root_lists(const BucketContext& context);

/// Copies `src` into `dst` multiplied by `scale` (one pass on contiguous CPU float/double).
void copy_scaled(at::Tensor& dst, const at::Tensor& src, double scale);

}  // namespace ddp
}  // namespace lockstep
