// GradScaler (dynamic loss scaling with an agreed found_inf) and AutocastGuard
// (lockstep/grad_scaler.h).
#include "lockstep/grad_scaler.h"

#include <ATen/ATen.h>
#include <torch/optim/optimizer.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <utility>

#include "adapter/torch_adapter.h"
#include "lockstep/errors.h"

namespace lockstep {

using detail::concat;

// Note [GradScaler arithmetic]
// As PyTorch's: the scale is a float32 value (kept here in a double, rounded to float32 after
// every change), the gradients are multiplied by inv = float32(1 / double(scale)), and
// found_inf looks at the gradient values before they are multiplied. update() is
// _amp_update_scale_: on found_inf, scale = float32(scale * backoff) and the tracker resets;
// otherwise the tracker counts up, and when it reaches growth_interval the scale becomes
// float32(scale * growth) if that is finite (else it stays) and the tracker resets.

namespace {

constexpr double kFloat32Max = std::numeric_limits<float>::max();

// v rounded to float32; v must not exceed float32's range (the conversion would be undefined).
double to_float32(double v) { return static_cast<double>(static_cast<float>(v)); }

void check_growth_fields(double growth_factor, double backoff_factor, int64_t growth_interval,
                         const char* where) {
  LOCKSTEP_CHECK(growth_factor > 1.0 && std::isfinite(growth_factor),
                 "Expected growth_factor > 1, but got ", growth_factor, " (", where,
                 "). The scale must grow after good steps; PyTorch's default is 2.");
  LOCKSTEP_CHECK(backoff_factor > 0.0 && backoff_factor < 1.0,
                 "Expected backoff_factor in (0, 1), but got ", backoff_factor, " (", where,
                 "). The scale must shrink after an overflow; PyTorch's default is 0.5.");
  LOCKSTEP_CHECK(growth_interval > 0, "Expected growth_interval > 0, but got ", growth_interval,
                 " (", where, "). PyTorch's default is 2000.");
}

void check_scale(double scale, const char* where) {
  LOCKSTEP_CHECK(scale > 0.0 && scale <= kFloat32Max,
                 "Expected a positive scale that is finite in float32, but got ", scale, " (",
                 where, "). PyTorch's default init_scale is 65536.");
}

// Multiplies data[0, n) by inv (in Math: float for the half types, as ATen's mul) and returns
// whether any value was Inf or NaN before: one pass, testing the exponent bits (all ones
// means Inf or NaN), which the compiler vectorizes.
template <typename T, typename Math, typename Bits>
bool unscale_contiguous(T* data, int64_t n, Math inv, Bits exponent_mask) {
  static_assert(sizeof(T) == sizeof(Bits), "Bits must be T's size");
  Bits non_finite = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T v = data[i];
    Bits bits;
    std::memcpy(&bits, &v, sizeof bits);
    non_finite |= static_cast<Bits>((bits & exponent_mask) == exponent_mask);
    data[i] = static_cast<T>(static_cast<Math>(v) * inv);
  }
  return non_finite != 0;
}

// Unscales one gradient in place; returns whether it held Inf or NaN.
bool unscale_gradient(at::Tensor& grad, float inv) {
  if (grad.is_sparse()) {
    // The values of an uncoalesced gradient may repeat an index; each is checked on its own,
    // as PyTorch does (coalescing could overflow in half precision).
    const bool bad = !at::isfinite(grad._values()).all().item<bool>();
    grad.mul_(static_cast<double>(inv));
    return bad;
  }
  if (grad.device().is_cpu() && grad.is_contiguous()) {
    switch (grad.scalar_type()) {
      case at::kFloat:
        return unscale_contiguous<float, float, uint32_t>(grad.data_ptr<float>(), grad.numel(),
                                                          inv, 0x7f800000u);
      case at::kDouble:
        return unscale_contiguous<double, double, uint64_t>(
            grad.data_ptr<double>(), grad.numel(), static_cast<double>(inv),
            0x7ff0000000000000ull);
      case at::kHalf:
        return unscale_contiguous<at::Half, float, uint16_t>(grad.data_ptr<at::Half>(),
                                                             grad.numel(), inv, 0x7c00u);
      case at::kBFloat16:
        return unscale_contiguous<at::BFloat16, float, uint16_t>(
            grad.data_ptr<at::BFloat16>(), grad.numel(), inv, 0x7f80u);
      default:
        break;
    }
  }
  // Strided or device gradients: ATen, in two passes. The half types are multiplied in float
  // and rounded once, as PyTorch's unscale kernel does (ATen's mul by a scalar would round
  // the scalar to the gradient's dtype first in LibTorch 1.x).
  const bool bad = !at::isfinite(grad).all().item<bool>();
  if (grad.scalar_type() == at::kHalf || grad.scalar_type() == at::kBFloat16) {
    grad.copy_(grad.to(at::kFloat).mul_(static_cast<double>(inv)));
  } else {
    grad.mul_(static_cast<double>(inv));
  }
  return bad;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// GradScalerState

std::map<std::string, at::Tensor> GradScalerState::tensors(const std::string& prefix) const {
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  auto i64 = at::TensorOptions().dtype(at::kLong);
  return {
      {prefix + "scale", at::full({1}, scale, f64)},
      {prefix + "growth_tracker", at::full({1}, growth_tracker, i64)},
      {prefix + "growth_factor", at::full({1}, growth_factor, f64)},
      {prefix + "backoff_factor", at::full({1}, backoff_factor, f64)},
      {prefix + "growth_interval", at::full({1}, growth_interval, i64)},
  };
}

GradScalerState GradScalerState::from_tensors(const std::map<std::string, at::Tensor>& tensors,
                                              const std::string& prefix) {
  auto get = [&](const char* field, at::ScalarType dtype) -> const at::Tensor& {
    auto it = tensors.find(prefix + field);
    LOCKSTEP_CHECK(it != tensors.end(), "Expected the GradScaler state tensor '", prefix, field,
                   "', but the checkpoint has no such tensor (it holds ", tensors.size(),
                   " tensors). Save the scaler with GradScalerState::tensors(\"", prefix,
                   "\"), or do not restore a scaler from a checkpoint written without one.");
    LOCKSTEP_CHECK(it->second.defined() && it->second.numel() == 1 &&
                       it->second.scalar_type() == dtype,
                   "Expected '", prefix, field, "' to hold one ", dtype, " value, but got ",
                   it->second.defined() ? it->second.numel() : 0, " value(s) of ",
                   it->second.defined() ? it->second.scalar_type() : at::kFloat,
                   ". The checkpoint was not written by GradScalerState::tensors().");
    return it->second;
  };
  GradScalerState s;
  s.scale = get("scale", at::kDouble).item<double>();
  s.growth_tracker = get("growth_tracker", at::kLong).item<int64_t>();
  s.growth_factor = get("growth_factor", at::kDouble).item<double>();
  s.backoff_factor = get("backoff_factor", at::kDouble).item<double>();
  s.growth_interval = get("growth_interval", at::kLong).item<int64_t>();
  return s;
}

// ---------------------------------------------------------------------------------------------
// GradScaler

GradScaler::GradScaler(GradScalerOptions options) : options_(std::move(options)) {
  check_scale(options_.init_scale(), "GradScalerOptions::init_scale");
  check_growth_fields(options_.growth_factor(), options_.backoff_factor(),
                      options_.growth_interval(), "GradScalerOptions");
  scale_ = to_float32(options_.init_scale());
}

at::Tensor GradScaler::scale(const at::Tensor& loss) const {
  if (!options_.enabled()) return loss;
  LOCKSTEP_CHECK(loss.defined() && loss.is_floating_point(),
                 "Expected a floating-point loss to scale, but got ",
                 loss.defined() ? c10::toString(loss.scalar_type()) : "an undefined tensor",
                 " (GradScaler::scale).");
  return loss.mul(scale_);
}

void GradScaler::unscale_(torch::optim::Optimizer& optimizer) {
  if (!options_.enabled()) return;
  auto it = records_.find(&optimizer);
  if (it != records_.end()) {
    LOCKSTEP_CHECK_STATE(it->second.stage != Stage::kUnscaled,
                         "Expected one GradScaler::unscale_(optimizer) per iteration, but it "
                         "was already called on this optimizer since the last update(). Call "
                         "unscale_ at most once between update()s (step() unscales only if "
                         "you did not).");
    LOCKSTEP_CHECK_STATE(it->second.stage != Stage::kStepped,
                         "Expected GradScaler::unscale_(optimizer) before step(optimizer), but "
                         "step() was already called on this optimizer since the last update(). "
                         "Call update() to end the iteration first.");
  }
  const float inv = static_cast<float>(1.0 / scale_);
  bool found = false;
  c10::Device device = c10::kCPU;
  bool have_device = false;
  for (auto& group : optimizer.param_groups()) {
    for (auto& param : group.params()) {
      at::Tensor grad = param.grad();
      if (!grad.defined()) continue;
      if (!have_device) {
        device = grad.device();
        have_device = true;
      }
      found = unscale_gradient(grad, inv) || found;
    }
  }
  if (const auto& pg = options_.process_group()) {
    // Note [GradScaler found_inf agreement]: gradients not reduced by DDP may differ.
    at::Tensor flag = at::full({1}, found ? 1.0f : 0.0f, at::TensorOptions().device(device));
    pg->allreduce(flag, ReduceOp::kMax)->wait();
    found = flag.item<float>() > 0.0f;
  }
  records_[&optimizer] = OptimizerRecord{Stage::kUnscaled, found};
}

bool GradScaler::step(torch::optim::Optimizer& optimizer) {
  if (!options_.enabled()) {
    optimizer.step();
    return true;
  }
  auto it = records_.find(&optimizer);
  LOCKSTEP_CHECK_STATE(it == records_.end() || it->second.stage != Stage::kStepped,
                       "Expected one GradScaler::step(optimizer) per iteration, but step() was "
                       "already called on this optimizer since the last update(). Call update() "
                       "after stepping every optimizer.");
  if (it == records_.end()) {
    unscale_(optimizer);
    it = records_.find(&optimizer);
    LOCKSTEP_ASSERT(it != records_.end(), "unscale_ left no record");
  }
  const bool stepped = !it->second.found_inf;
  if (stepped) optimizer.step();
  it->second.stage = Stage::kStepped;
  return stepped;
}

void GradScaler::update() {
  if (!options_.enabled()) return;
  LOCKSTEP_CHECK_STATE(!records_.empty(),
                       "Expected GradScaler::step(optimizer) or unscale_(optimizer) before "
                       "update(), but none was called since the last update(): no Inf/NaN "
                       "check was recorded. Call scaler.step(optimizer) each iteration.");
  bool found = false;
  for (const auto& kv : records_) found = found || kv.second.found_inf;
  records_.clear();
  if (found) {
    scale_ = to_float32(scale_ * options_.backoff_factor());
    growth_tracker_ = 0;
    return;
  }
  if (++growth_tracker_ == options_.growth_interval()) {
    // As _amp_update_scale_: a growth that would overflow float32 leaves the scale as it is.
    const double grown = scale_ * options_.growth_factor();
    if (grown <= kFloat32Max) scale_ = to_float32(grown);
    growth_tracker_ = 0;
  }
}

double GradScaler::get_scale() const { return options_.enabled() ? scale_ : 1.0; }

bool GradScaler::found_inf(const torch::optim::Optimizer& optimizer) const {
  auto it = records_.find(&optimizer);
  return it != records_.end() && it->second.found_inf;
}

GradScalerState GradScaler::state_dict() const {
  GradScalerState s;
  s.scale = scale_;
  s.growth_tracker = growth_tracker_;
  s.growth_factor = options_.growth_factor();
  s.backoff_factor = options_.backoff_factor();
  s.growth_interval = options_.growth_interval();
  return s;
}

void GradScaler::load_state_dict(const GradScalerState& state) {
  check_scale(state.scale, "GradScaler::load_state_dict");
  check_growth_fields(state.growth_factor, state.backoff_factor, state.growth_interval,
                      "GradScaler::load_state_dict");
  LOCKSTEP_CHECK(state.growth_tracker >= 0 && state.growth_tracker < state.growth_interval,
                 "Expected growth_tracker in [0, growth_interval=", state.growth_interval,
                 "), but got ", state.growth_tracker,
                 " (GradScaler::load_state_dict). The state is corrupt or was edited.");
  scale_ = to_float32(state.scale);
  growth_tracker_ = state.growth_tracker;
  options_.growth_factor(state.growth_factor);
  options_.backoff_factor(state.backoff_factor);
  options_.growth_interval(state.growth_interval);
}

// ---------------------------------------------------------------------------------------------
// AutocastGuard

AutocastGuard::AutocastGuard(c10::Device device, at::ScalarType dtype, bool enabled)
    : device_type_(device.type()) {
  LOCKSTEP_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
                 "Expected kHalf or kBFloat16 as the autocast dtype, but got ", dtype,
                 " (AutocastGuard). Autocast lowers precision; for float32 pass enabled=false.");
  LOCKSTEP_CHECK(adapter::autocast_available(device_type_),
                 "Expected a device type with autocast support (CPU or CUDA), but got ",
                 c10::DeviceTypeName(device_type_), " (AutocastGuard, LibTorch ",
                 adapter::torch_version(), ").");
  previous_enabled_ = adapter::autocast_enabled(device_type_);
  previous_dtype_ = adapter::autocast_dtype(device_type_);
  adapter::set_autocast_enabled(device_type_, enabled);
  adapter::set_autocast_dtype(device_type_, dtype);
  adapter::autocast_increment_nesting();
}

AutocastGuard::~AutocastGuard() {
  // As torch.autocast.__exit__: the outermost region drops the casted-weight cache.
  if (adapter::autocast_decrement_nesting() == 0) adapter::clear_autocast_cache();
  adapter::set_autocast_enabled(device_type_, previous_enabled_);
  adapter::set_autocast_dtype(device_type_, previous_dtype_);
}

}  // namespace lockstep
