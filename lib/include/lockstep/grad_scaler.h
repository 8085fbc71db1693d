#pragma once
/// \file
/// Mixed precision: `GradScaler`, PyTorch's dynamic loss scaling
/// (`torch.cuda.amp.GradScaler`) for C++ training loops, with the found-inf decision agreed
/// by every rank; and `AutocastGuard`, an RAII form of `torch.autocast` that works on every
/// LibTorch version lockstep supports.
///
/// \code
///   lockstep::DistributedDataParallel ddp(model, pg);
///   torch::optim::SGD opt(model->parameters(), 0.1);
///   lockstep::GradScaler scaler;                    // gradients come from DDP: no collective
///   for (auto& [x, y] : batches) {
///     opt.zero_grad();
///     torch::Tensor loss;
///     {
///       lockstep::AutocastGuard autocast(torch::kCUDA, torch::kHalf);
///       loss = torch::mse_loss(ddp->forward(x), y);
///     }                                             // backward outside autocast, as in PyTorch
///     scaler.scale(loss).backward();
///     scaler.step(opt);                             // skipped on every rank when found_inf
///     scaler.update();
///   }
/// \endcode
///
/// Note [GradScaler found_inf agreement]
/// Every rank must make the same skip decision, or the ranks' weights diverge for good. The
/// gradients DistributedDataParallel leaves in `.grad` after backward are the reduced ones,
/// and they are bitwise identical on every rank (the reducer's parity tests assert this):
/// a NaN or Inf on one rank becomes a NaN or Inf in the reduced gradient of every rank. A
/// local check of the reduced gradients is therefore already the group's decision, and the
/// default scaler (`process_group` null) communicates nothing, as PyTorch's GradScaler under
/// DDP. Gradients that were not reduced by DDP (a model trained without the wrapper, or
/// under `no_sync()` on the step that unscales) differ between ranks; set
/// `GradScalerOptions::process_group` and `unscale_` all-reduces the found_inf flag (max)
/// over it: one 1-element collective per `unscale_`, so every rank must then call
/// `unscale_`/`step` in the same order.
///
/// Interaction with DDPOptions: keep `nonfinite` at kOff (the default; kAbort would throw on
/// the overflows the scaler exists to absorb, kSkip would skip twice) and `max_grad_norm` at
/// 0 (it clips scaled gradients); to clip, call `scaler.unscale_(opt)` and then
/// `torch::nn::utils::clip_grad_norm_`, before `scaler.step(opt)`.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>

#include "lockstep/options.h"
#include "lockstep/process_group.h"

namespace torch {
namespace optim {
class Optimizer;
}
}  // namespace torch

namespace lockstep {

/// Options of `GradScaler`; defaults are PyTorch's.
struct GradScalerOptions {
  /// Initial loss scale. Must be positive and finite. Default 65536 (2^16).
  LOCKSTEP_ARG(double, init_scale) = 65536.0;
  /// Factor the scale grows by after `growth_interval` consecutive steps without Inf/NaN.
  /// Must be greater than 1. Default 2.
  LOCKSTEP_ARG(double, growth_factor) = 2.0;
  /// Factor the scale shrinks by after a step with Inf/NaN. Must lie in (0, 1). Default 0.5.
  LOCKSTEP_ARG(double, backoff_factor) = 0.5;
  /// Consecutive steps without Inf/NaN before the scale grows. Must be positive. Default 2000.
  LOCKSTEP_ARG(int64_t, growth_interval) = 2000;
  /// False: every method is a pass-through (`scale` returns the loss, `step` always steps,
  /// `update` does nothing), so one loop serves both precisions. Default true.
  LOCKSTEP_ARG(bool, enabled) = true;
  /// Group over which `unscale_` all-reduces found_inf (max), for gradients not reduced by
  /// DistributedDataParallel. nullptr (default): no communication; see Note [GradScaler
  /// found_inf agreement].
  LOCKSTEP_ARG(ProcessGroupPtr, process_group) = nullptr;
};

/// What a checkpoint needs to resume a `GradScaler`: PyTorch's `GradScaler.state_dict()`
/// fields. The training checkpoint (lockstep/train/checkpoint.h) stores named tensors, so
/// `tensors()` / `from_tensors()` convert:
/// \code
///   for (auto& kv : scaler.state_dict().tensors()) ckpt.tensors[kv.first] = kv.second;
///   scaler.load_state_dict(lockstep::GradScalerState::from_tensors(ckpt.tensors));
/// \endcode
struct GradScalerState {
  double scale = 65536.0;        ///< the current loss scale
  int64_t growth_tracker = 0;    ///< consecutive steps without Inf/NaN since the last change
  double growth_factor = 2.0;    ///< GradScalerOptions::growth_factor
  double backoff_factor = 0.5;   ///< GradScalerOptions::backoff_factor
  int64_t growth_interval = 2000;///< GradScalerOptions::growth_interval

  /// The fields as float64 / int64 scalar CPU tensors named "<prefix><field>".
  std::map<std::string, at::Tensor> tensors(const std::string& prefix = "scaler.") const;
  /// The inverse of `tensors()`. Throws InvalidArgument naming the missing or malformed key
  /// (a checkpoint written without a scaler, or by another program).
  static GradScalerState from_tensors(const std::map<std::string, at::Tensor>& tensors,
                                      const std::string& prefix = "scaler.");
};

/// Dynamic loss scaling with PyTorch's semantics. Per iteration: `scale(loss).backward()`,
/// optionally `unscale_(opt)` (to clip or inspect true gradients), `step(opt)` for each
/// optimizer, then `update()` once. Not thread-safe; one scaler per rank.
class GradScaler {
 public:
  /// Validates `options` (InvalidArgument naming the field and the value).
  explicit GradScaler(GradScalerOptions options = GradScalerOptions());

  /// `loss * scale` (the loss's dtype and device). Returns `loss` unchanged when disabled.
  at::Tensor scale(const at::Tensor& loss) const;

  /// Multiplies every gradient of `optimizer`'s parameter groups by 1/scale in place and
  /// records whether any was Inf or NaN, in one pass over each gradient. At most once per
  /// optimizer between `update()`s: a second call, or a call after `step(optimizer)`, is a
  /// StateError. Collective over `process_group` when one is set. No-op when disabled.
  void unscale_(torch::optim::Optimizer& optimizer);

  /// Unscales (if `unscale_` was not called), then steps `optimizer` unless a gradient was
  /// Inf or NaN. Returns whether it stepped. Once per optimizer between `update()`s (a
  /// second call is a StateError). When disabled, steps and returns true.
  bool step(torch::optim::Optimizer& optimizer);

  /// Ends the iteration: backs the scale off (and resets the growth tracker) if any
  /// optimizer stepped or unscaled this iteration found Inf/NaN, else counts a good step
  /// and grows the scale after `growth_interval` consecutive ones. A StateError when no
  /// optimizer was unscaled since the last update. No-op when disabled.
  void update();

  /// The current scale (1 when disabled, as PyTorch returns 1.0).
  double get_scale() const;
  /// Consecutive good steps counted towards the next growth.
  int64_t growth_tracker() const { return growth_tracker_; }
  /// Whether the last unscale_ of `optimizer` since `update()` found Inf/NaN (false if none).
  bool found_inf(const torch::optim::Optimizer& optimizer) const;
  bool is_enabled() const { return options_.enabled(); }
  const GradScalerOptions& options() const { return options_; }

  /// The state to checkpoint (see GradScalerState).
  GradScalerState state_dict() const;
  /// Restores `state` (its scale must be positive and finite, its growth fields valid; an
  /// InvalidArgument otherwise). Call between iterations.
  void load_state_dict(const GradScalerState& state);

 private:
  enum class Stage { kReady, kUnscaled, kStepped };
  struct OptimizerRecord {
    Stage stage = Stage::kReady;
    bool found_inf = false;
  };

  GradScalerOptions options_;
  double scale_;
  int64_t growth_tracker_ = 0;
  std::unordered_map<const torch::optim::Optimizer*, OptimizerRecord> records_;
};

/// Sets autocast for `device`'s type on the calling thread for its lifetime, as
/// `with torch.autocast(device_type, dtype, enabled):` does: enabled (or, with `enabled`
/// false, disabled, e.g. for a float32 region inside an autocast one, or one loop for both
/// precisions) with `dtype` (kHalf or kBFloat16). On destruction it restores the previous
/// enabled flag and dtype and, when the outermost guard exits, clears the autocast weight
/// cache (as torch.autocast does). Autocast state is thread-local: the guard affects only the
/// thread that constructed it, and must be destroyed there. CPU (bfloat16; float16 where the
/// LibTorch build has CPU float16 kernels) and CUDA on every LibTorch; on 2.4+ every device
/// type with autocast support. Run backward outside the guard, as in PyTorch.
class AutocastGuard {
 public:
  /// InvalidArgument for a dtype other than kHalf/kBFloat16 or a device type without
  /// autocast.
  AutocastGuard(c10::Device device, at::ScalarType dtype, bool enabled = true);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  c10::DeviceType device_type_;
  bool previous_enabled_ = false;
  at::ScalarType previous_dtype_ = at::kFloat;
};

}  // namespace lockstep
