#pragma once
/// \file
/// SyncBatchNorm: batch normalization whose training-mode statistics are taken over the
/// whole process group, as PyTorch's `torch.nn.SyncBatchNorm`; and
/// `convert_sync_batchnorm`, which swaps the BatchNorm layers of an existing module tree.
///
/// \code
///   auto pg = lockstep::init_process_group();
///   auto net = torch::nn::Sequential(torch::nn::Conv2d(3, 16, 3),
///                                    lockstep::SyncBatchNorm(lockstep::SyncBatchNormOptions(16, pg)),
///                                    torch::nn::ReLU());
///   // or, for an existing model whose BatchNorm layers live in containers:
///   lockstep::convert_sync_batchnorm(model.ptr(), pg);
///   lockstep::DistributedDataParallel ddp(model, pg);   // convert first, then wrap
/// \endcode
///
/// In training mode every rank's forward is a collective: the rank-local sums of x and x^2
/// and the sample count are all-reduced in one float64 all-reduce of 2C+1 values, so the
/// output equals BatchNorm's on the concatenation of all ranks' batches (which may differ in
/// size; a rank may even bring an empty batch). The backward all-reduces 2C values (the
/// sums of dy and dy*(x-mean)), so the input gradient also equals the concatenated batch's.
/// The weight and bias gradients stay rank-local, as in PyTorch: their sum over ranks is the
/// concatenated batch's gradient, and DistributedDataParallel averages them like any other
/// parameter. In eval mode the layer normalizes with its running statistics and communicates
/// nothing. Details and caveats: docs/sync-batch-norm.md.

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <memory>
#include <ostream>

#include "lockstep/options.h"
#include "lockstep/process_group.h"

namespace lockstep {

/// Options of `SyncBatchNorm`: those of `torch::nn::BatchNormOptions` plus the group.
struct SyncBatchNormOptions {
  /// `num_features` channels (dimension 1 of the input), statistics over `process_group`.
  /* implicit */ SyncBatchNormOptions(int64_t num_features,
                                      ProcessGroupPtr process_group = nullptr);
  /// Number of channels C of an input shaped (N, C, ...). Must be positive.
  LOCKSTEP_ARG(int64_t, num_features);
  /// Added to the variance for numerical stability. Default 1e-5.
  LOCKSTEP_ARG(double, eps) = 1e-5;
  /// Weight of the new batch in the running statistics; nullopt: a cumulative average over
  /// all batches seen (1 / num_batches_tracked). Default 0.1.
  LOCKSTEP_ARG(c10::optional<double>, momentum) = 0.1;
  /// Learnable per-channel weight and bias. Default true.
  LOCKSTEP_ARG(bool, affine) = true;
  /// Keep running statistics (used in eval mode). Without them every forward, eval
  /// included, normalizes with batch statistics; in eval mode those are the rank's own
  /// batch's (no communication), as in PyTorch. Default true.
  LOCKSTEP_ARG(bool, track_running_stats) = true;
  /// The group whose ranks share statistics. Required (a null group is an InvalidArgument);
  /// a single process can use `new_thread_groups(1)[0]`. Default: none.
  LOCKSTEP_ARG(ProcessGroupPtr, process_group) = nullptr;
};

/// Batch normalization over (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W) inputs (any
/// input with at least two dimensions) with statistics over every rank of the group in
/// training mode. Parameters and buffers are named and initialized as `torch::nn::BatchNorm*`'s
/// (`weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked`), so checkpoints
/// of either load into the other.
///
/// Collective in training mode (when batch statistics are used and the group has more than
/// one rank): every rank calls forward on its layers in the same order, and every rank runs
/// the backward of every such forward whose input requires grad (the backward all-reduces
/// too). The first synchronized forward of a layer also checks that every rank built it
/// alike (num_features, eps, momentum, affine, track_running_stats) with one small
/// all-gather. Errors of the collectives (CommError, TimeoutError) propagate from forward and
/// backward. Not thread-safe: one rank's layer is used by one thread at a time.
class SyncBatchNormImpl : public torch::nn::Cloneable<SyncBatchNormImpl> {
 public:
  /// A layer with weight 1, bias 0, running mean 0 and running variance 1. Throws
  /// InvalidArgument for a non-positive num_features, a negative eps or a null group.
  explicit SyncBatchNormImpl(SyncBatchNormOptions options);

  /// (Re)creates the parameters and buffers (called by the constructor and by clone()).
  void reset() override;
  /// Running mean 0, running variance 1, num_batches_tracked 0 (when tracked).
  void reset_running_stats();
  /// reset_running_stats(), weight 1 and bias 0 (when affine).
  void reset_parameters();

  /// Normalizes `input` (N, C, ...); see the class comment for when this is collective.
  /// Throws InvalidArgument for fewer than 2 dimensions, a channel count other than
  /// num_features, a non-floating dtype, or (training) at most one value per channel over
  /// the whole group.
  at::Tensor forward(const at::Tensor& input);

  /// Prints `lockstep::SyncBatchNorm(C, eps=..., momentum=..., affine=..., ...)`.
  void pretty_print(std::ostream& stream) const override;

  /// The options this layer was built with (eps and momentum may be changed later).
  SyncBatchNormOptions options;
  /// Learnable weight (C); undefined unless affine.
  at::Tensor weight;
  /// Learnable bias (C); undefined unless affine.
  at::Tensor bias;
  /// Running mean (C); undefined unless track_running_stats.
  at::Tensor running_mean;
  /// Running unbiased variance (C); undefined unless track_running_stats.
  at::Tensor running_var;
  /// Number of training forwards (a 0-d int64 tensor); undefined unless track_running_stats.
  at::Tensor num_batches_tracked;

 private:
  friend struct SyncBatchNormAccess;
  // Tensors reset() registers instead of fresh ones, once (see convert_sync_batchnorm).
  struct Adopted {
    bool pending = false;
    at::Tensor weight, bias, running_mean, running_var, num_batches_tracked;
  };
  SyncBatchNormImpl(SyncBatchNormOptions options, Adopted adopted);
  void check_options() const;

  Adopted adopted_;
  bool group_checked_ = false;  // the ranks' layers were compared (first synchronized forward)
};

/// Holder of a `SyncBatchNormImpl` (`lockstep::SyncBatchNorm(SyncBatchNormOptions(C, pg))`).
TORCH_MODULE(SyncBatchNorm);

/// Replaces every `torch::nn::BatchNorm1d`, `BatchNorm2d` and `BatchNorm3d` layer in the
/// tree under `module` with a `SyncBatchNorm` over `group`, as PyTorch's
/// `SyncBatchNorm.convert_sync_batchnorm`: the new layer takes over the old one's options and
/// training mode and *the same* weight, bias, running_mean, running_var and
/// num_batches_tracked tensors (so an optimizer built before the conversion keeps working).
/// Returns the converted module: `module` itself, changed in place, or a new SyncBatchNorm
/// when `module` is itself a BatchNorm layer. A layer registered at several places becomes
/// one SyncBatchNorm at all of them.
///
/// Layers are replaced where the module tree holds them: a registered child
/// (`replace_module`), and an element of a `Sequential`, `ModuleList` or `ModuleDict`
/// (whose forward and iteration use their own element lists). A C++ module cannot be
/// redirected through a member field, though: in a custom module that keeps
/// `torch::nn::BatchNorm2d bn` as a member and calls `bn(x)` in forward, the member would
/// still run the old layer. Such a layer is detected (it is referenced from outside the tree)
/// and the conversion throws InvalidArgument naming it, before changing anything: build that
/// module with `SyncBatchNorm` instead, or keep its normalization layers in a container.
/// Also throws InvalidArgument for a null module or group. Not collective. Convert before
/// wrapping the module in DistributedDataParallel.
std::shared_ptr<torch::nn::Module> convert_sync_batchnorm(std::shared_ptr<torch::nn::Module> module,
                                                          ProcessGroupPtr group);

}  // namespace lockstep
