// The adapter's autograd, optimizer and pickling half. See Note [Torch adapter].
#include "adapter/torch_adapter.h"

#include <ATen/autocast_mode.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/schedulers/lr_scheduler.h>
#include <torch/version.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "lockstep/errors.h"

namespace lockstep {
namespace adapter {

using detail::concat;

// ---------------------------------------------------------------------------------------------
// Autograd

namespace {

class LambdaPostHook : public torch::autograd::FunctionPostHook {
 public:
  explicit LambdaPostHook(std::function<void()> fn) : fn_(std::move(fn)) {}
  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list& outputs,
      const torch::autograd::variable_list& /*inputs*/) override {
    fn_();
    return outputs;
  }

 private:
  std::function<void()> fn_;
};

struct HookRegistration {
  std::shared_ptr<torch::autograd::Node> accumulator;
  uintptr_t key = 0;
  ~HookRegistration() {
    if (accumulator) accumulator->del_post_hook(key);
  }
};

}  // namespace

HookHandle add_grad_accumulated_hook(const at::Tensor& param, std::function<void()> hook) {
  LOCKSTEP_CHECK(param.requires_grad() && param.is_leaf(),
                 "Expected a leaf tensor that requires grad for a gradient hook.");
  auto registration = std::make_shared<HookRegistration>();
  registration->accumulator = torch::autograd::impl::grad_accumulator(param);
  LOCKSTEP_ASSERT(registration->accumulator != nullptr, "parameter has no grad accumulator");
  registration->key = registration->accumulator->add_post_hook(
      std::make_unique<LambdaPostHook>(std::move(hook)));
  return registration;
}

void queue_backward_callback(std::function<void()> callback) {
  torch::autograd::Engine::get_default_engine().queue_callback(std::move(callback));
}

// ---------------------------------------------------------------------------------------------
// Optimizer state

namespace {
#if TORCH_VERSION_MAJOR >= 2
void* optimizer_state_key(const at::Tensor& param) { return param.unsafeGetTensorImpl(); }
#else
std::string optimizer_state_key(const at::Tensor& param) {
  return c10::guts::to_string(param.unsafeGetTensorImpl());
}
#endif
}  // namespace

torch::optim::OptimizerParamState* find_optimizer_state(torch::optim::Optimizer& optimizer,
                                                        const at::Tensor& param) {
  auto& state = optimizer.state();
  auto it = state.find(optimizer_state_key(param));
  return it == state.end() ? nullptr : it->second.get();
}

void set_optimizer_state(torch::optim::Optimizer& optimizer, const at::Tensor& param,
                         std::unique_ptr<torch::optim::OptimizerParamState> state) {
  optimizer.state()[optimizer_state_key(param)] = std::move(state);
}

namespace {
// LRScheduler keeps its step count protected and offers no accessor: a pointer to the member,
// formed through a derived class (never instantiated), reaches it on any scheduler.
struct SchedulerAccess : torch::optim::LRScheduler {
  static auto step_count() { return &SchedulerAccess::step_count_; }
};
using StepCount = std::remove_reference_t<decltype(std::declval<torch::optim::LRScheduler&>().*
                                                   SchedulerAccess::step_count())>;
}  // namespace

int64_t scheduler_step_count(torch::optim::LRScheduler& scheduler) {
  return static_cast<int64_t>(scheduler.*SchedulerAccess::step_count());
}

void set_scheduler_step_count(torch::optim::LRScheduler& scheduler, int64_t count) {
  LOCKSTEP_ASSERT(count >= 0 && count <= max_scheduler_step_count(), "step count out of range");
  scheduler.*SchedulerAccess::step_count() = static_cast<StepCount>(count);
}

int64_t max_scheduler_step_count() {
  return static_cast<int64_t>(std::min<uint64_t>(std::numeric_limits<StepCount>::max(),
                                                 uint64_t{1} << 53));
}

// ---------------------------------------------------------------------------------------------
// Autocast

// LibTorch 2.4 replaced the per-device calls (set_cpu_enabled, set_autocast_gpu_dtype, ...)
// by ones taking the device type, and deprecated the old ones.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
#define LOCKSTEP_GENERIC_AUTOCAST 1
#else
#define LOCKSTEP_GENERIC_AUTOCAST 0
#endif

bool autocast_available(c10::DeviceType device_type) {
#if LOCKSTEP_GENERIC_AUTOCAST
  return at::autocast::is_autocast_available(device_type);
#else
  return device_type == c10::DeviceType::CPU || device_type == c10::DeviceType::CUDA;
#endif
}

#if !LOCKSTEP_GENERIC_AUTOCAST
namespace {
void check_autocast_device(c10::DeviceType device_type) {
  LOCKSTEP_CHECK(autocast_available(device_type),
                 "Expected a CPU or CUDA device for autocast, but got ",
                 c10::DeviceTypeName(device_type), " (LibTorch ", TORCH_VERSION_MAJOR, ".",
                 TORCH_VERSION_MINOR, ").");
}
}  // namespace
#endif

bool autocast_enabled(c10::DeviceType device_type) {
#if LOCKSTEP_GENERIC_AUTOCAST
  return at::autocast::is_autocast_enabled(device_type);
#else
  check_autocast_device(device_type);
  return device_type == c10::DeviceType::CPU ? at::autocast::is_cpu_enabled()
                                             : at::autocast::is_enabled();
#endif
}

void set_autocast_enabled(c10::DeviceType device_type, bool enabled) {
#if LOCKSTEP_GENERIC_AUTOCAST
  at::autocast::set_autocast_enabled(device_type, enabled);
#else
  check_autocast_device(device_type);
  if (device_type == c10::DeviceType::CPU) {
    at::autocast::set_cpu_enabled(enabled);
  } else {
    at::autocast::set_enabled(enabled);
  }
#endif
}

at::ScalarType autocast_dtype(c10::DeviceType device_type) {
#if LOCKSTEP_GENERIC_AUTOCAST
  return at::autocast::get_autocast_dtype(device_type);
#else
  check_autocast_device(device_type);
  return device_type == c10::DeviceType::CPU ? at::autocast::get_autocast_cpu_dtype()
                                             : at::autocast::get_autocast_gpu_dtype();
#endif
}

void set_autocast_dtype(c10::DeviceType device_type, at::ScalarType dtype) {
#if LOCKSTEP_GENERIC_AUTOCAST
  at::autocast::set_autocast_dtype(device_type, dtype);
#else
  check_autocast_device(device_type);
  if (device_type == c10::DeviceType::CPU) {
    at::autocast::set_autocast_cpu_dtype(dtype);
  } else {
    at::autocast::set_autocast_gpu_dtype(dtype);
  }
#endif
}

int autocast_increment_nesting() { return at::autocast::increment_nesting(); }
int autocast_decrement_nesting() { return at::autocast::decrement_nesting(); }
void clear_autocast_cache() { at::autocast::clear_cache(); }

// ---------------------------------------------------------------------------------------------
// Pickling

void write_tensor_dict_archive(const std::string& path,
                               const std::map<std::string, at::Tensor>& tensors) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& kv : tensors) dict.insert(kv.first, kv.second);
  // Note [weights_only export]
  // torch::jit::pickle_save tags containers with torch.jit._pickle.restore_type_tag, which
  // Python's weights_only unpickler refuses. Pickling with tag_aggregates=false gives a plain
  // dict of tensors (rebuilt by torch._utils._rebuild_tensor_v2, which weights_only allows),
  // in the same zip container that torch.save writes.
  std::vector<char> pickled;
  torch::jit::Pickler pickler(
      [&](const char* buf, size_t n) { pickled.insert(pickled.end(), buf, buf + n); },
      /*tensor_table=*/nullptr, /*type_renamer=*/nullptr, /*memoized_class_types=*/nullptr,
      /*get_tensor_id=*/nullptr, /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(c10::IValue(dict));
  pickler.stop();
  caffe2::serialize::PyTorchStreamWriter writer(path);
  torch::jit::writeArchiveAndTensors("data", pickled.data(), pickled.size(), pickler.tensorData(),
                                     writer);
  writer.writeEndOfFile();
}

}  // namespace adapter
}  // namespace lockstep
