#pragma once
/// \file
/// ZeroRedundancyOptimizer: ZeRO stage 1 (PyTorch's `torch.distributed.optim.
/// ZeroRedundancyOptimizer`). The parameters are sharded across the ranks of a process group,
/// balanced by size, and each rank keeps optimizer state (Adam's moments, SGD's momentum) only
/// for its own shard: about 1/W of a plain optimizer's. After each rank stepped its shard, the
/// updated parameters travel from their owners to every rank, so every rank ends the step with
/// the same parameters a plain optimizer would have produced.
///
/// \code
///   lockstep::DistributedDataParallel ddp(net, pg);
///   lockstep::ZeroRedundancyOptimizer opt(
///       ddp->parameters(), pg,
///       lockstep::optimizer_factory<torch::optim::Adam>(torch::optim::AdamOptions(1e-3)));
///   // per step, exactly as with a plain optimizer:
///   opt.zero_grad();
///   loss_fn(ddp->forward(x), y).backward();      // DDP averages the gradients
///   opt.step();                                   // collective
/// \endcode
///
/// Checkpoints reuse lockstep::train's optimizer format: `consolidate_state_dict(0)` gathers the
/// shards' state on rank 0 into a plain optimizer (`consolidated_optimizer()`) that
/// `train::add_optimizer` writes exactly as a single process's plain optimizer over the same
/// parameters would; `make_full_optimizer()` + `train::load_optimizer` + `load_full_state`
/// restore it at any world size. docs/zero.md has the details and the limits.

#include <ATen/core/Tensor.h>
#include <torch/optim/optimizer.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "lockstep/options.h"
#include "lockstep/process_group.h"

namespace lockstep {

/// Builds a local optimizer over parameter groups (each may carry its own options; groups
/// without options take the factory's defaults). ZeroRedundancyOptimizer calls it with this
/// rank's shard of every group (possibly empty groups), and for the full optimizers of
/// `make_full_optimizer` and `consolidate_state_dict`.
using OptimizerFactory = std::function<std::unique_ptr<torch::optim::Optimizer>(
    std::vector<torch::optim::OptimizerParamGroup>)>;

/// A factory for torch::optim's `Opt` (SGD, Adam, AdamW, Adagrad, RMSprop) with default
/// options `defaults`, e.g. `optimizer_factory<torch::optim::Adam>(AdamOptions(1e-3))`.
template <typename Opt, typename Options>
OptimizerFactory optimizer_factory(Options defaults) {
  return [defaults](std::vector<torch::optim::OptimizerParamGroup> groups)
             -> std::unique_ptr<torch::optim::Optimizer> {
    return std::make_unique<Opt>(std::move(groups), defaults);
  };
}

/// Options of `ZeroRedundancyOptimizer`.
struct ZeroOptions {
  /// Capacity in MiB of one broadcast of updated parameters: each owner packs its shard into
  /// flat buckets of at most this size (a larger parameter travels alone), and at most two
  /// buckets are in flight, so a step allocates at most about twice this much. Default 25.
  LOCKSTEP_ARG(double, bucket_cap_mb) = 25.0;
  /// Verify at construction that every rank passes the same parameters (group structure,
  /// count, shapes, dtypes): two agreement checks (lockstep/agreement.h). Default true.
  LOCKSTEP_ARG(bool, check_parameters) = true;
};

/// Which rank owns each parameter.
struct ZeroShardPlan {
  /// owner[i]: the rank that owns parameter i (global order).
  std::vector<int> owner;
  /// load[r]: the summed sizes of rank r's parameters.
  std::vector<int64_t> load;
};

/// Shards parameters of the given sizes over `world_size` ranks: largest first (ties: lower
/// index first), each to the least-loaded rank so far (ties: lowest rank). Deterministic: the
/// same sizes give the same plan on every rank. Sizes must be >= 0, world_size >= 1 (else
/// InvalidArgument). ZeroRedundancyOptimizer passes each parameter's size in bytes.
ZeroShardPlan plan_zero_shards(const std::vector<int64_t>& sizes, int world_size);

/// ZeRO stage 1 over any torch::optim optimizer (SGD, Adam, AdamW, Adagrad, RMSprop; LBFGS is
/// refused: its state spans all parameters of a group). It is a `torch::optim::Optimizer`
/// whose parameter groups hold all parameters, so `zero_grad()`, learning-rate schedulers
/// and `DistributedDataParallel::step()` work on it as on a plain optimizer; its own state()
/// is empty and the shard's state lives in `local_optimizer()`.
///
/// Threading: one thread at a time, as any torch optimizer. Collectives (construction,
/// `step`, `consolidate_state_dict`) must be called by every rank in the same order.
class ZeroRedundancyOptimizer : public torch::optim::Optimizer {
 public:
  /// Shards `param_groups` (every rank passes the same groups, e.g. over `ddp->parameters()`)
  /// over `group` with `plan_zero_shards` and builds this rank's local optimizer with
  /// `factory` over its shard. Collective (the parameter check of ZeroOptions). Throws
  /// InvalidArgument for a null group or factory, a factory that returns nullptr or an
  /// LBFGS, a parameter that is not a leaf, and ranks that disagree on the parameters.
  ZeroRedundancyOptimizer(std::vector<torch::optim::OptimizerParamGroup> param_groups,
                          ProcessGroupPtr group, OptimizerFactory factory,
                          ZeroOptions options = ZeroOptions());
  /// One parameter group. Collective.
  ZeroRedundancyOptimizer(std::vector<at::Tensor> params, ProcessGroupPtr group,
                          OptimizerFactory factory, ZeroOptions options = ZeroOptions());
  ~ZeroRedundancyOptimizer() override;

  /// Copies every group's hyperparameters (a scheduler's learning rate) to the local
  /// optimizer, steps it (calling `closure`, if any, as it does), then sends every
  /// parameter from its owner to every other rank in buckets (ZeroOptions::bucket_cap_mb).
  /// Returns the local step's result. Collective. Invalidates `consolidated_optimizer()`.
  at::Tensor step(LossClosure closure = nullptr) override;

  /// Refuses: a ZeroRedundancyOptimizer holds only a shard. Throws StateError pointing to
  /// consolidate_state_dict.
  void save(torch::serialize::OutputArchive& archive) const override;
  /// Refuses, as save (use make_full_optimizer and load_full_state).
  void load(torch::serialize::InputArchive& archive) override;

  /// Gathers every rank's optimizer state on `to_rank` into a plain optimizer of the
  /// factory's type over all parameters, in global order, with the current hyperparameters
  /// (PyTorch's consolidate_state_dict). Collective; every rank passes the same `to_rank`
  /// (InvalidArgument naming the ranks otherwise, or when it lies outside [0, world size)).
  /// The shards' state travels serialized by torch's optimizer archives, bounded by the
  /// shard's size (Note [Bounded object collectives]).
  void consolidate_state_dict(int to_rank = 0);
  /// On the rank that consolidate_state_dict gathered to: the full optimizer it built, for
  /// `train::add_optimizer`. Valid until the next step() or consolidate_state_dict(); throws
  /// StateError on other ranks, before consolidation and after a step.
  torch::optim::Optimizer& consolidated_optimizer();

  /// A new plain optimizer of the factory's type over all parameters (the same tensors, same
  /// groups and current hyperparameters), without state: the target for
  /// `train::load_optimizer` before `load_full_state`. Not a collective.
  std::unique_ptr<torch::optim::Optimizer> make_full_optimizer() const;
  /// Takes this rank's shard of `full`'s state (a plain optimizer over all parameters, in
  /// global order, e.g. from make_full_optimizer + train::load_optimizer, saved at any world
  /// size) and every group's hyperparameters; drops any state it had. The shard's state
  /// tensors are shared with `full`, not copied. Validates first (InvalidArgument naming
  /// what differs: optimizer type, group count, parameter count, a parameter's shape or
  /// dtype) and changes nothing unless all match. Not a collective.
  void load_full_state(torch::optim::Optimizer& full);

  /// This rank's optimizer, over its shard only (empty groups when it owns nothing).
  torch::optim::Optimizer& local_optimizer() { return *local_; }
  /// The shard plan (sizes in bytes), parameters in global order (group by group).
  const ZeroShardPlan& plan() const { return plan_; }
  /// Every parameter, in global order.
  const std::vector<at::Tensor>& all_parameters() const { return params_; }
  /// The group parameters are sharded over.
  const ProcessGroupPtr& process_group() const { return group_; }
  /// The options given at construction.
  const ZeroOptions& options() const { return options_; }

 private:
  struct Bucket {
    int owner = 0;
    std::vector<size_t> params;  // global indices
    int64_t numel = 0;
  };

  struct Prepared;  // the checked groups with their resolved options, and the defaults
  static Prepared prepare(std::vector<torch::optim::OptimizerParamGroup> groups,
                          const ProcessGroupPtr& group, const OptimizerFactory& factory);
  ZeroRedundancyOptimizer(Prepared prepared, ProcessGroupPtr group, OptimizerFactory factory,
                          ZeroOptions options);
  std::vector<torch::optim::OptimizerParamGroup> shard_groups(int rank) const;
  void broadcast_parameters();

  ProcessGroupPtr group_;
  OptimizerFactory factory_;
  ZeroOptions options_;
  std::vector<at::Tensor> params_;      // global order
  std::vector<size_t> group_of_;        // params_[i]'s group
  ZeroShardPlan plan_;
  std::vector<Bucket> buckets_;         // broadcast order: owner 0's, then owner 1's, ...
  std::unique_ptr<torch::optim::Optimizer> local_;
  std::unique_ptr<torch::optim::Optimizer> consolidated_;
};

}  // namespace lockstep
