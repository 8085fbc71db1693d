#pragma once
// The one place that knows which LibTorch version lockstep is built against.
//
// Note [Torch adapter]
// c10d (stores, ProcessGroupGloo, Work) and the autograd engine's hook API move between
// LibTorch releases (1.13 here, 2.x in Debian 13 and the official archives). Everything that
// touches them is implemented in torch_adapter.cpp, behind the version-neutral declarations
// below; the rest of lockstep includes only this header. Keep it that way: a new c10d or
// autograd call goes into torch_adapter.cpp, with any #if on TORCH_VERSION_* beside it.

#include <ATen/core/Tensor.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "lockstep/process_group.h"
#include "lockstep/store.h"

namespace lockstep {
namespace adapter {

/// LibTorch's version as "major.minor.patch".
std::string torch_version();

/// How Gloo picks the network device.
struct GlooDeviceSpec {
  std::string ifname;    ///< bind to this interface when non-empty
  std::string hostname;  ///< else bind to this host's address when non-empty
};                       ///< else c10d's default device (the hostname, falling back to lo)

/// A ProcessGroupGloo over `store` (the caller scopes the store). Connects the full mesh, so
/// it is collective and bounded by the store's timeout.
ProcessGroupPtr make_gloo_group(int rank, int size, const std::shared_ptr<Store>& store,
                                std::chrono::milliseconds timeout, int threads,
                                const GlooDeviceSpec& device);

/// Keeps a hook registered (and the grad accumulator alive) while held; dropping the last
/// copy removes the hook.
using HookHandle = std::shared_ptr<void>;

/// Calls `hook` every time autograd has accumulated a gradient into `param.grad()` (the
/// grad accumulator's post hook), on the autograd engine's thread. `param` must be a leaf
/// that requires grad.
HookHandle add_grad_accumulated_hook(const at::Tensor& param, std::function<void()> hook);

/// Queues `callback` to run when the current backward pass finishes (on the engine's
/// thread, before backward() returns). Must be called from within backward.
void queue_backward_callback(std::function<void()> callback);

}  // namespace adapter
}  // namespace lockstep

namespace torch {
namespace optim {
class Optimizer;
class OptimizerParamState;
}  // namespace optim
}  // namespace torch

namespace lockstep {
namespace adapter {

/// The optimizer's state for `param`, or nullptr before its first step. (The state map's
/// key type changed from the TensorImpl address as a string in 1.x to a void* in 2.x.)
torch::optim::OptimizerParamState* find_optimizer_state(torch::optim::Optimizer& optimizer,
                                                        const at::Tensor& param);

/// Replaces the optimizer's state for `param`.
void set_optimizer_state(torch::optim::Optimizer& optimizer, const at::Tensor& param,
                         std::unique_ptr<torch::optim::OptimizerParamState> state);

}  // namespace adapter
}  // namespace lockstep
