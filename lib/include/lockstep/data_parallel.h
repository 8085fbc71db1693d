#pragma once
/// \file
/// DataParallel: one process, several replicas of a module (CUDA devices, or CPU replicas that
/// each own a share of the cores) training on slices of every batch concurrently.
///
/// ```cpp
/// auto net = std::make_shared<Net>();                       // Net : torch::nn::Cloneable<Net>
/// lockstep::DataParallel<Net> dp(net, lockstep::DataParallelOptions().cpu_replicas(2));
/// torch::optim::SGD opt(net->parameters(), 0.1);
/// for (auto& batch : loader) {
///   opt.zero_grad();
///   auto loss = dp.train_step(batch.data, batch.target, [](const at::Tensor& out,
///                                                          const at::Tensor& y) {
///     return torch::nll_loss(out, y);                       // mean over the slice
///   });
///   opt.step();                                             // on the primary module
/// }
/// auto prediction = dp.forward(test_images);                // inference, no autograd graph
/// ```
///
/// Semantics (see Note [DataParallel step] in lib/src/dp/data_parallel.cpp):
/// - The module passed in is the *primary* and is replica 0; the other replicas are created
///   once (clone() or a factory) and kept. Every step refreshes their parameters and buffers
///   by in-place copy from the primary: their storage never changes.
/// - `train_step` splits the batch along dimension 0 (sizes differ by at most one; with fewer
///   samples than replicas the surplus replicas sit the step out), runs forward, the loss and
///   backward of every replica concurrently on its own thread, and sums the replicas'
///   gradients into the primary's `.grad` while backward runs: each replica has a DDP Reducer
///   over an in-process thread group, which reduces complete buckets straight into replica
///   0's gradients (no flat buffers, no copies). The result equals the
///   gradient of the mean loss over the whole batch (with `mean_loss`, the default), and is
///   *added* to `.grad` in place like a plain backward() would (a parameter whose .grad was
///   undefined gets a new tensor).
/// - A parameter that some replicas do not use in their forward contributes zeros from
///   them; one that no replica uses keeps its `.grad` unchanged.
/// - Buffers follow the primary: BatchNorm statistics are computed per replica over its
///   slice (as in PyTorch's DataParallel); the primary's running statistics are updated from
///   replica 0's slice only, and the other replicas' updates are overwritten at the next
///   step. In eval mode every replica uses the primary's running statistics, so results equal
///   the single module's.
/// - Errors: an exception in one replica's forward, loss or backward is rethrown on the
///   caller's thread as lockstep::Error naming the replica (the original is nested:
///   std::rethrow_if_nested). The primary's gradients are left as they were before the step,
///   and the next step works.
/// - Not thread-safe: call `train_step` / `forward` from one thread at a time.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/errors.h"
#include "lockstep/options.h"

namespace lockstep {

/// Options of DataParallel.
struct DataParallelOptions {
  /// Device of each replica; replica 0 is the primary module, which must already live on
  /// devices[0]. Empty (default): `cpu_replicas` CPU replicas when it is set, else every CUDA
  /// device when LibTorch has CUDA and one is present, else one CPU replica per core.
  LOCKSTEP_ARG(std::vector<c10::Device>, devices) = {};
  /// Number of CPU replicas when `devices` is empty; 0 (default): CUDA devices if any, else
  /// one per core (std::thread::hardware_concurrency()).
  LOCKSTEP_ARG(int, cpu_replicas) = 0;
  /// Intra-op threads of each replica's thread (at::set_num_threads on that thread); 0
  /// (default): cores / number of CPU replicas, at least 1; 1 for CUDA replicas.
  LOCKSTEP_ARG(int, threads_per_replica) = 0;
  /// Bucket cap of the replicas' Reducers in MiB: a bucket of gradients is reduced into the
  /// primary as soon as every replica produced it, while backward goes on. Default 1.
  LOCKSTEP_ARG(double, bucket_cap_mb) = 1.0;
  /// true (default): the loss function returns the mean over its samples, and replica
  /// gradients are weighted by their share of the batch, so that the result is the gradient
  /// of the full batch's mean loss. false: the loss is a sum over samples, gradients add up.
  LOCKSTEP_ARG(bool, mean_loss) = true;
  /// true (default): while a step runs on CPU replicas, set OpenBLAS's process-wide thread
  /// count to `threads_per_replica` (restored after the step). With a count above 1,
  /// OpenBLAS runs concurrent GEMMs one at a time under a process-wide lock, so the replicas
  /// would not compute in parallel at all (Note [OpenBLAS and replica threads] in
  /// lib/src/dp/data_parallel.cpp). No effect without OpenBLAS (resolved at run time).
  LOCKSTEP_ARG(bool, scope_blas_threads) = true;
};

namespace detail {

/// Splits `n` samples over `replicas`: the first n % replicas replicas get one more.
std::vector<int64_t> split_sizes(int64_t n, int replicas);

/// Devices the replicas run on (see DataParallelOptions::devices); never empty.
std::vector<c10::Device> resolve_devices(const DataParallelOptions& options);

/// The type-erased engine behind DataParallel<M>: worker threads, parameter refresh,
/// scatter/gather, gradient reduction.
class DataParallelCore {
 public:
  using ForwardFn = std::function<at::Tensor(size_t replica, const at::Tensor& input)>;
  using LossFn = std::function<at::Tensor(const at::Tensor& output, const at::Tensor& target)>;

  /// `replicas[0]` is the primary; all have the same parameters and buffers in the same order.
  DataParallelCore(std::vector<std::shared_ptr<torch::nn::Module>> replicas,
                   std::vector<c10::Device> devices, ForwardFn forward,
                   const DataParallelOptions& options);
  ~DataParallelCore();
  DataParallelCore(const DataParallelCore&) = delete;
  DataParallelCore& operator=(const DataParallelCore&) = delete;

  at::Tensor forward(const at::Tensor& input);
  at::Tensor train_step(const at::Tensor& input, const at::Tensor& target, const LossFn& loss_fn);
  int threads_per_replica() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace detail

/// Single-process data parallelism over replicas of `ModuleType` (any torch::nn::Module with
/// `at::Tensor forward(const at::Tensor&)`). See the file comment for the semantics.
template <typename ModuleType>
class DataParallel {
 public:
  using ReplicaFactory = std::function<std::shared_ptr<ModuleType>()>;
  using LossFn = detail::DataParallelCore::LossFn;

  /// Wraps `module` (the primary, replica 0). The other replicas come from `make_replica`
  /// when given (it must build a module with the same parameters; their values are
  /// overwritten), else from `module->clone(device)`, which needs ModuleType to derive from
  /// torch::nn::Cloneable. Starts one thread per replica after the first (replica 0 runs on
  /// the caller's thread during a step).
  explicit DataParallel(std::shared_ptr<ModuleType> module,
                        DataParallelOptions options = DataParallelOptions(),
                        ReplicaFactory make_replica = nullptr)
      : replicas_{module} {
    LOCKSTEP_CHECK(module != nullptr, "DataParallel: expected a module, but got null.");
    auto devices = detail::resolve_devices(options);
    for (size_t i = 1; i < devices.size(); ++i) replicas_.push_back(make(i, devices[i], make_replica));
    std::vector<std::shared_ptr<torch::nn::Module>> erased(replicas_.begin(), replicas_.end());
    auto replicas = replicas_;
    core_ = std::make_unique<detail::DataParallelCore>(
        std::move(erased), std::move(devices),
        [replicas](size_t i, const at::Tensor& x) { return replicas[i]->forward(x); }, options);
  }
  /// Same, for a TORCH_MODULE holder.
  explicit DataParallel(const torch::nn::ModuleHolder<ModuleType>& module,
                        DataParallelOptions options = DataParallelOptions(),
                        ReplicaFactory make_replica = nullptr)
      : DataParallel(module.ptr(), std::move(options), std::move(make_replica)) {}

  /// Inference: splits `input` along dimension 0, runs every replica's forward concurrently
  /// without an autograd graph, and concatenates the outputs on the primary's device.
  /// Throws InvalidArgument for an empty batch.
  at::Tensor forward(const at::Tensor& input) { return core_->forward(input); }

  /// One training step (forward, loss, backward on every replica, gradients reduced into the
  /// primary's .grad). `target` (may be undefined) is split like `input`; `loss_fn(output,
  /// target)` runs on the replica's thread and must return a scalar. Returns the batch's loss
  /// (the weighted mean of the replicas' losses, detached). The optimizer step is yours.
  at::Tensor train_step(const at::Tensor& input, const at::Tensor& target, const LossFn& loss_fn) {
    return core_->train_step(input, target, loss_fn);
  }

  /// The primary module (replica 0).
  const std::shared_ptr<ModuleType>& module() const { return replicas_[0]; }
  /// Every replica, the primary first. Replicas live as long as this object.
  const std::vector<std::shared_ptr<ModuleType>>& replicas() const { return replicas_; }
  /// Intra-op threads each replica's thread runs with.
  int threads_per_replica() const { return core_->threads_per_replica(); }

 private:
  std::shared_ptr<ModuleType> make(size_t index, const c10::Device& device,
                                   const ReplicaFactory& factory) {
    std::shared_ptr<ModuleType> replica;
    if (factory) {
      replica = factory();
      LOCKSTEP_CHECK(replica != nullptr, "DataParallel: the replica factory returned null for "
                     "replica ", index, ".");
      replica->to(device);
    } else {
      std::shared_ptr<torch::nn::Module> cloned;
      try {
        cloned = replicas_[0]->clone(device);
      } catch (const std::exception& e) {
        throw InvalidArgument(detail::concat(
            "DataParallel: could not clone the module for replica ", index, " (", e.what(),
            "). Derive it from torch::nn::Cloneable<", replicas_[0]->name(),
            "> or pass a replica factory as the third argument."));
      }
      replica = std::dynamic_pointer_cast<ModuleType>(cloned);
      LOCKSTEP_CHECK(replica != nullptr, "DataParallel: clone() of ", replicas_[0]->name(),
                     " returned another type; pass a replica factory instead.");
    }
    return replica;
  }

  std::vector<std::shared_ptr<ModuleType>> replicas_;
  std::unique_ptr<detail::DataParallelCore> core_;
};

}  // namespace lockstep
