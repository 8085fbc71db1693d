// DataParallel's gradient reduction: one DDP Reducer per replica over an in-process thread
// group, driven by DataParallel's own gradient hooks.
#include <ATen/ATen.h>

#include "adapter/torch_adapter.h"
#include "ddp/reducer.h"
#include "dp/grad_reduction.h"
#include "lockstep/errors.h"
#include "lockstep/thread_group.h"

namespace lockstep {
namespace dp {

namespace {

// Note [DataParallel gradient reduction]
// Replica r owns a ddp::Reducer over rank r of a thread group (Note [Thread group protocol]),
// so DataParallel reduces exactly as DDP does: gradients are copied into flat buckets as
// autograd accumulates them, complete buckets are all-reduced while backward goes on, in
// bucket order, and the buckets are rebuilt once in replica 0's gradient order. Differences
// from DDP's use:
//   - The Reducers run with install_hooks = false: DataParallel's own hooks call mark_ready
//     only while a step is running on that replica, so a backward() the user runs through the
//     primary module outside train_step (evaluation, a second loss) is not reduced and cannot
//     wait on replicas that never join. finish() calls finalize() after backward returned.
//   - The Reducer averages over replicas; replicas' slices may differ in size, so replica r's
//     loss is multiplied by R * n_r / N before backward: the average is then the gradient of
//     the mean loss over the whole batch.
//   - A replica without samples marks every parameter ready with a zero gradient, so that it
//     joins every bucket's collective (contributing nothing).
//   - find_unused_parameters is on: a parameter unused on some replicas is reduced with their
//     zeros; one unused on all keeps the primary's gradient unchanged (undefined).
//   - After a replica failed mid-backward the thread group is aborted (its peers' waits throw)
//     and reset() builds a fresh group and fresh Reducers.
class ReducerReduction : public GradReduction {
 public:
  ReducerReduction(std::vector<std::vector<at::Tensor>> params, std::vector<std::string> names,
                   const BucketOptions& options)
      : params_(std::move(params)), names_(std::move(names)), options_(options) {
    const size_t replicas = params_.size();
    active_.assign(replicas, 0);
    for (size_t r = 0; r < replicas; ++r) {
      for (size_t k = 0; k < params_[r].size(); ++k) {
        hooks_.push_back(adapter::add_grad_accumulated_hook(params_[r][k], [this, r, k] {
          if (active_[r]) reducers_[r]->mark_ready(k);
        }));
      }
    }
    build();
  }

  void begin_step(int r) override { reducers_[r]->prepare_for_forward(/*sync=*/true); }

  double prepare(int r, double weight) override {
    active_[r] = 1;
    return weight * static_cast<double>(params_.size());
  }

  void finish(int r) override {
    if (!active_[r]) {
      for (size_t k = params_[r].size(); k-- > 0;) {
        params_[r][k].mutable_grad() = at::zeros_like(params_[r][k]);
        reducers_[r]->mark_ready(k);
      }
    }
    active_[r] = 0;
    reducers_[r]->finalize();
  }

  void abort(const std::string& reason) override { abort_thread_groups(groups_[0], reason); }

  void reset() override {
    std::fill(active_.begin(), active_.end(), 0);
    build();
  }

 private:
  void build() {
    reducers_.clear();
    groups_ = new_thread_groups(static_cast<int>(params_.size()));
    ddp::ReducerOptions o;
    o.cap_bytes = options_.cap_bytes;
    o.first_cap_bytes = options_.first_cap_bytes;
    o.find_unused_parameters = true;
    o.install_hooks = false;
    for (size_t r = 0; r < params_.size(); ++r) {
      reducers_.push_back(std::make_unique<ddp::Reducer>(params_[r], names_, groups_[r], o));
    }
  }

  std::vector<std::vector<at::Tensor>> params_;
  std::vector<std::string> names_;
  BucketOptions options_;
  std::vector<uint8_t> active_;  // per replica; written and read on the replica's thread
  std::vector<ProcessGroupPtr> groups_;
  std::vector<std::unique_ptr<ddp::Reducer>> reducers_;
  std::vector<adapter::HookHandle> hooks_;  // last member: removed first
};

}  // namespace

std::unique_ptr<GradReduction> make_replica_reduction(std::vector<std::vector<at::Tensor>> params,
                                                      std::vector<std::string> names,
                                                      const BucketOptions& options) {
  LOCKSTEP_ASSERT(!params.empty());
  return std::make_unique<ReducerReduction>(std::move(params), std::move(names), options);
}

}  // namespace dp
}  // namespace lockstep
