// The adapter's autograd, optimizer and pickling half. See Note [Torch adapter].
#include "adapter/torch_adapter.h"

#include <ATen/autocast_mode.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/cuda.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/schedulers/lr_scheduler.h>
#include <torch/version.h>

#include <algorithm>
#include <limits>
#include <thread>
#include <type_traits>

#include "lockstep/errors.h"

namespace lockstep {
namespace adapter {

using detail::concat;

// ---------------------------------------------------------------------------------------------
// CUDA devices

int cuda_device_count() { return static_cast<int>(torch::cuda::device_count()); }

void set_current_cuda_device(int index) {
  // The CUDA guard is registered by LibTorch's CUDA library (c10_cuda) when it is loaded; a
  // CPU-only LibTorch has none. The guard's setDevice is cudaSetDevice: per host thread.
  LOCKSTEP_CHECK(c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA),
                 "Expected a LibTorch with CUDA to make cuda:", index, " the current device, "
                 "but this one has no CUDA backend (CPU-only build). Use the CPU, or link a "
                 "CUDA build of LibTorch.");
  c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)
      ->setDevice(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index)));
}

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

// Note [Staging device tensors]
// The shared-memory transport reduces in host memory, so a CUDA tensor (a DDP bucket) has to
// go there and back. Copying it on the caller's thread (tensor.to(kCPU)) blocks that thread
// until the GPU has run everything queued before it: on the autograd thread that serialises
// backward with the GPU (issue 18 measured backward at 242 ms against 1.2 ms over Gloo).
// Instead, on the caller's thread: an event recorded on its current stream, a side stream
// from the device's pool made to wait for it, and an asynchronous copy into pinned host
// memory queued there; the caller returns at once. The collective's own thread then waits
// for the copy (polling the event, bounded by the collective's deadline), reduces, queues the
// copy back on the same side stream and waits for it too, so when the Work completes the
// result is on the device for every stream. record_stream tells the caching allocator that
// the side stream uses the tensor. Only c10's device-generic streams and events are used, so
// this compiles against a CPU-only LibTorch; it has not run on a GPU yet (docs/gpu.md).
namespace {

bool wait_event(const c10::Event& event, std::chrono::steady_clock::time_point deadline) {
  for (int spins = 0; !event.query(); ++spins) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    if (spins < 64) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));  // polling the GPU's event
    }
  }
  return true;
}

class C10HostStaging : public HostStaging {
 public:
  explicit C10HostStaging(const at::Tensor& device_tensor)
      : device_tensor_(device_tensor), copied_(device_tensor.device().type()),
        returned_(device_tensor.device().type()) {
    const at::Device device = device_tensor.device();
    c10::impl::VirtualGuardImpl guard(device.type());
    c10::Stream current = guard.getStream(device);
    side_ = guard.getStreamFromGlobalPool(device);
    c10::Event produced(device.type());
    produced.record(current);
    produced.block(side_);
    host_ = at::empty(device_tensor.sizes(),
                      device_tensor.options().device(at::kCPU).pinned_memory(true));
    {
      c10::StreamGuard on_side(side_);
      host_.copy_(device_tensor, /*non_blocking=*/true);
    }
    device_tensor_.record_stream(side_);
    copied_.record(side_);
  }

  const at::Tensor& host() const override { return host_; }

  bool wait_copied(std::chrono::steady_clock::time_point deadline) override {
    return wait_event(copied_, deadline);
  }

  bool copy_back(std::chrono::steady_clock::time_point deadline) override {
    {
      c10::StreamGuard on_side(side_);
      device_tensor_.copy_(host_, /*non_blocking=*/true);
    }
    returned_.record(side_);
    return wait_event(returned_, deadline);
  }

 private:
  at::Tensor device_tensor_;
  at::Tensor host_;
  c10::Stream side_{c10::Stream::DEFAULT, c10::Device(c10::kCPU)};
  c10::Event copied_;
  c10::Event returned_;
};

}  // namespace

std::unique_ptr<HostStaging> stage_to_host(const at::Tensor& device_tensor) {
  return std::make_unique<C10HostStaging>(device_tensor);
}

}  // namespace adapter
}  // namespace lockstep
