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
#include <torch/version.h>

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

std::map<std::string, at::Tensor> read_tensor_dict_archive(const std::vector<char>& bytes) {
  c10::IValue value;
  try {
    value = torch::jit::pickle_load(bytes);
  } catch (const std::exception& e) {
    std::string what = e.what();
    what = what.substr(0, what.find("\nException raised from"));
    throw InvalidArgument(concat("is not a torch.save file LibTorch can read (", what,
                                 "). A state_dict saved from Python must be a plain dict: "
                                 "torch.save(dict(model.state_dict()), path)"));
  }
  if (!value.isGenericDict()) {
    throw InvalidArgument(concat("holds a ", value.tagKind(),
                                 ", expected a dict of name -> tensor (a state_dict)"));
  }
  std::map<std::string, at::Tensor> out;
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString() || !item.value().isTensor()) {
      throw InvalidArgument(concat(": entry ", item.key().tagKind(), " -> ",
                                   item.value().tagKind(), " is not a string -> tensor pair"));
    }
    out[item.key().toStringRef()] = item.value().toTensor();
  }
  return out;
}

}  // namespace adapter
}  // namespace lockstep
