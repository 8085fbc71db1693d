#pragma once
/// \file
/// Communication hooks that compress or skip DDP's gradient reduction, and periodic model
/// averaging for local SGD. Plug a hook in with `DDPOptions().comm_hook(...)`; the hook
/// contract (what a hook must leave in the bucket) is `CommHook`'s in `lockstep/ddp.h`.
///
/// \code
///   lockstep::DistributedDataParallel ddp(net, pg, lockstep::DDPOptions().comm_hook(
///       lockstep::powersgd_hook(lockstep::PowerSGDOptions().matrix_approximation_rank(2))));
/// \endcode
///
/// docs/ddp.md ("Compression hooks") lists the bytes each hook sends and when to use which.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "lockstep/ddp.h"
#include "lockstep/options.h"
#include "lockstep/process_group.h"

namespace lockstep {

// ---------------------------------------------------------------------------------------------
// PowerSGD

/// Options of `powersgd_hook` (PyTorch's PowerSGDState, same names and meaning).
struct PowerSGDOptions {
  /// Rank r of the approximation M ~ P Q^T of each compressed gradient (n x m): higher is
  /// more accurate and sends more, (n + m) * r elements per matrix. At least 1. Default 1.
  LOCKSTEP_ARG(int64_t, matrix_approximation_rank) = 1;
  /// Iterations (synchronized backwards) reduced with a plain all-reduce before compression
  /// starts, as PyTorch: early gradients change fast and compressing them hurts accuracy.
  /// At least 0. Default 10 (PyTorch's default is 1000).
  LOCKSTEP_ARG(int64_t, start_powersgd_iter) = 10;
  /// A gradient is compressed only when n * m > (n + m) * r * min_compression_rate, i.e. when
  /// compression divides its bytes by more than this; others (and every 1-D gradient, e.g.
  /// biases) are all-reduced exactly together with the bucket's control elements. Positive.
  /// Default 2 (PyTorch's).
  LOCKSTEP_ARG(double, min_compression_rate) = 2.0;
  /// Keep, per compressed parameter, what the approximation lost on this rank and add it to
  /// the next iteration's gradient before compressing (error feedback). Costs one gradient's
  /// memory per compressed parameter. Default true.
  LOCKSTEP_ARG(bool, use_error_feedback) = true;
  /// Start each iteration's power step from the last iteration's Q instead of a fresh random
  /// one. Default true.
  LOCKSTEP_ARG(bool, warm_start) = true;
  /// Added to each column's norm in the Gram-Schmidt orthogonalization of P; 0 (default): none
  /// (an all-zero column stays zero instead of becoming NaN). Non-negative.
  LOCKSTEP_ARG(double, orthogonalization_epsilon) = 0.0;
  /// Seed of the random initial Q; must be equal on every rank. Default 0.
  LOCKSTEP_ARG(uint64_t, random_seed) = 0;
};

/// PowerSGD (Vogels et al., 2019; PyTorch's powerSGD_hook): each compressed gradient M
/// (viewed as n x m, n its first dimension) is replaced by a rank-r approximation built from
/// two small all-reduces: P = M Q (summed over ranks), P orthogonalized, Q = M^T P (summed),
/// M ~ P Q^T. The bucket receives the approximation of the *sum* of the ranks' (averaged)
/// contributions, as `allreduce_hook` receives the exact sum. Bucket buffers are keyed by
/// parameter, so a bucket rebuild does not disturb the error or Q state.
///
/// Per bucket and compressed iteration it issues two all-reduces: the uncompressed gradients,
/// the control elements and every P in one, then every Q. The first starts when the bucket is
/// ready, on DDP's group; the second as soon as the first finished, from the hook's worker
/// thread, on a second group over the same ranks that the hook builds with new_group (a
/// collective) at its first compressed bucket: both overlap backward, and the Work completes
/// without wait() (Note [PowerSGD rounds] in lib/src/ddp/comm_hooks.cpp). With a group that
/// cannot build subgroups the second is issued by the Work's `wait()`, which DDP calls for
/// every bucket in bucket order. A hook serves one DDP group at a time.
///
/// Initial Q of a parameter (its index i in `GradBucket::parameter_indices`): float32
/// `randn({m, r})` from a CPU generator seeded with `random_seed + 1000003 * draw + i`, cast
/// to the gradient's dtype and orthogonalized; `draw` is 0 for the first initialization and
/// counts later ones (every compressed iteration without warm_start, or after a non-finite
/// result dropped the state).
class PowerSGDHook : public CommHook {
 public:
  explicit PowerSGDHook(PowerSGDOptions options);
  ~PowerSGDHook() override;
  std::string name() const override { return "powersgd"; }
  WorkPtr reduce(ProcessGroup& group, GradBucket& bucket) override;

  /// The options after validation.
  const PowerSGDOptions& options() const;
  /// Iterations seen so far (buckets with is_last reduced).
  int64_t iteration() const;
  /// The error-feedback memory of parameter `parameter_index` (shaped n x m), or an undefined
  /// tensor when it has none (not compressed yet, or error feedback off). For inspection.
  at::Tensor error(size_t parameter_index) const;
  /// The current Q (m x r) of parameter `parameter_index`, or undefined.
  at::Tensor q(size_t parameter_index) const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

/// A PowerSGD hook; throws InvalidArgument for invalid options (rank below 1, negative
/// start iteration, non-positive compression rate, negative epsilon).
std::shared_ptr<PowerSGDHook> powersgd_hook(PowerSGDOptions options = PowerSGDOptions());

// ---------------------------------------------------------------------------------------------
// int8 quantization

/// Quantizes each rank's bucket gradients to int8 with one scale per rank and bucket
/// (s = max |g| / 127, q = round(g / s)), all-gathers the int8 values with each rank's scale
/// and the control elements (float32), and every rank sums the W dequantized contributions
/// in float in rank order: bitwise the same on every rank; the error of the sum is at most
/// the sum over ranks of s_r / 2 per element. Bytes each rank contributes per bucket:
/// G + 4 * (1 + C) (G gradient elements, C control elements); a ring all-gather sends
/// (W - 1) times that per rank, against 2 (W - 1) / W * 4 G for a float32 ring all-reduce:
/// W/8 of it, 1/4 at two ranks, equal at eight. A non-finite gradient makes the sum NaN
/// (DDP's NonFinite policy then sees it).
CommHookPtr int8_quantize_hook();

// ---------------------------------------------------------------------------------------------
// Local SGD

/// Options of `post_local_sgd_hook` (PyTorch's PostLocalSGDState).
struct PostLocalSGDOptions {
  /// Iterations reduced normally (all-reduce over the whole group) before local SGD starts.
  /// At least 0. Default 0.
  LOCKSTEP_ARG(int64_t, start_local_sgd_iter) = 0;
  /// From then on, gradients are averaged over this subgroup (e.g. the ranks of one host,
  /// from `new_group`), which must contain this rank; nullptr (default): not at all, each
  /// rank steps with its own gradient. Average the models with a `PeriodicModelAverager`.
  LOCKSTEP_ARG(ProcessGroupPtr, subgroup) = nullptr;
};

/// Post-local SGD (Lin et al., 2018; PyTorch's post_localSGD_hook): a plain all-reduce for the
/// first `start_local_sgd_iter` iterations, then gradients stay local (or are averaged over
/// the subgroup) while the bucket's control elements (unused-parameter counts, presence,
/// non-finite marks) are still summed over the whole group, so DDP's bookkeeping (unused
/// parameter errors, join, NonFinite policies) works as before. Pair it with a
/// `PeriodicModelAverager`. Throws InvalidArgument for a negative start iteration or a
/// subgroup this rank is not a member of.
CommHookPtr post_local_sgd_hook(PostLocalSGDOptions options = PostLocalSGDOptions());

/// Periodic model averaging (PyTorch's PeriodicModelAverager): counts calls of
/// `average_parameters` from 0 and, at every count `warmup_steps + k * period` (k >= 0),
/// replaces every given parameter with its average over the group. Call it after each
/// optimizer step, on every rank. Not thread-safe.
class PeriodicModelAverager {
 public:
  /// `period` at least 1, `warmup_steps` at least 0, `group` not null; else InvalidArgument.
  PeriodicModelAverager(ProcessGroupPtr group, int64_t period, int64_t warmup_steps = 0);
  /// Averages `params` in place when this step is due (see the class comment) and counts the
  /// step; returns whether it averaged. The average is one all-reduce per dtype and device of
  /// the concatenated parameters, divided by the world size: bitwise equal on every rank.
  /// Collective (when due): every rank passes parameters of the same shapes in the same order.
  bool average_parameters(const std::vector<at::Tensor>& params);
  /// Steps counted so far.
  int64_t step() const { return step_; }

 private:
  ProcessGroupPtr group_;
  int64_t period_;
  int64_t warmup_steps_;
  int64_t step_ = 0;
};

}  // namespace lockstep
