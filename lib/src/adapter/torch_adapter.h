#pragma once
// The one place that knows which LibTorch version lockstep is built against.
//
// Note [Torch adapter]
// c10d (its stores and ProcessGroupGloo), the autograd engine's hook API, the optimizers'
// state maps and TorchScript's pickler move between LibTorch releases (1.13 here, 2.x in
// Debian 13 and the official archives). Everything that touches them is implemented in
// lib/src/adapter/, behind the version-neutral declarations below. The adapter is a side room:
// it includes nothing of lockstep above core/ (errors, the KeyValueStore interface), so comm,
// ddp and train call down into it and it never calls up. c10d objects cross this boundary
// only as the opaque handles below; their failures cross as the std::exception c10d threw,
// and comm/ translates them into lockstep errors that name rank, operation and peer. Keep it
// that way: a new c10d, autograd or pickling call goes into the adapter, with any #if on
// TORCH_VERSION_* beside it.

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/key_value_store.h"

namespace torch {
namespace optim {
class Optimizer;
class OptimizerParamState;
class LRScheduler;
}  // namespace optim
}  // namespace torch

namespace lockstep {
namespace adapter {

/// LibTorch's version as "major.minor.patch".
std::string torch_version();

// ---------------------------------------------------------------------------------------------
// c10d stores

/// c10d's TCPStore at host:port (hosting it when `is_server`; port 0 binds an ephemeral one).
/// `bound_port` receives the port. Throws c10d's exception when it cannot host or connect.
std::shared_ptr<detail::KeyValueStore> make_c10d_tcp_store(const std::string& host, int port,
                                                           bool is_server,
                                                           std::chrono::milliseconds timeout,
                                                           int* bound_port);

/// c10d's FileStore at `path` for `world_size` processes.
std::shared_ptr<detail::KeyValueStore> make_c10d_file_store(const std::string& path,
                                                            int world_size,
                                                            std::chrono::milliseconds timeout);

/// c10d's HashStore (in-process).
std::shared_ptr<detail::KeyValueStore> make_c10d_hash_store(std::chrono::milliseconds timeout);

// ---------------------------------------------------------------------------------------------
// c10d process groups: ProcessGroupGloo, and ProcessGroupNCCL where LibTorch has it

/// The reductions lockstep asks of c10d's backends. kAvg only of NCCL (Gloo has none: comm
/// divides after a sum).
enum class C10dReduceOp { kSum, kAvg, kMin, kMax, kProduct };

/// A c10d Work. wait() rethrows c10d's exception untranslated.
class C10dWork {
 public:
  virtual ~C10dWork() = default;
  virtual bool is_completed() = 0;
  /// Waits for completion; a positive `timeout` bounds the wait on the CPU (c10d's
  /// Work::wait(timeout), which throws when it passes). 0: c10d's own wait, which for NCCL only
  /// makes the current stream wait.
  virtual void wait(std::chrono::milliseconds timeout = std::chrono::milliseconds(0)) = 0;
};
using C10dWorkPtr = std::shared_ptr<C10dWork>;

/// How Gloo picks the network device.
struct GlooDeviceSpec {
  std::string ifname;    ///< bind to this interface when non-empty
  std::string hostname;  ///< else bind to this host's address when non-empty
};                       ///< else c10d's default device (the hostname, falling back to lo)

/// A c10d process group (ProcessGroupGloo or ProcessGroupNCCL). Each call starts the
/// collective and returns its Work; a failure to start throws c10d's exception. A NCCL Work's
/// wait() makes the calling thread's current CUDA stream wait for the collective (it does not
/// block the CPU), as c10d's does.
class C10dBackend {
 public:
  virtual ~C10dBackend() = default;
  virtual C10dWorkPtr allreduce(at::Tensor& tensor, C10dReduceOp op) = 0;
  virtual C10dWorkPtr broadcast(at::Tensor& tensor, int root) = 0;
  virtual C10dWorkPtr allgather(std::vector<at::Tensor>& outputs,
                                      const at::Tensor& input) = 0;
  virtual C10dWorkPtr barrier() = 0;
  /// c10d gather: `outputs` (size() tensors) on root, empty elsewhere.
  virtual C10dWorkPtr gather(std::vector<at::Tensor>& outputs, at::Tensor& input,
                                   int root) = 0;
  /// c10d scatter: `inputs` (size() tensors) on root, empty elsewhere.
  virtual C10dWorkPtr scatter(at::Tensor& output, std::vector<at::Tensor>& inputs,
                                    int root) = 0;
  /// c10d alltoall_base with explicit split sizes (rows along dim 0).
  virtual C10dWorkPtr alltoall(at::Tensor& output, at::Tensor& input,
                                     std::vector<int64_t> output_splits,
                                     std::vector<int64_t> input_splits) = 0;
  /// c10d send / recv of one contiguous tensor (Gloo: a CPU tensor on slot `tag` >= 0).
  virtual C10dWorkPtr send(at::Tensor& tensor, int dst, int tag) = 0;
  virtual C10dWorkPtr recv(at::Tensor& tensor, int src, int tag) = 0;
};

/// The Gloo device could not be created (no such interface, an unresolvable host).
struct GlooDeviceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Builds the Gloo device (throws GlooDeviceError when the interface or host is unusable),
/// then connects the full mesh of `size` ranks through `store` (collective, bounded by
/// `timeout`); throws c10d's exception on failure.
std::shared_ptr<C10dBackend> make_gloo_backend(std::shared_ptr<detail::KeyValueStore> store,
                                               int rank, int size,
                                               std::chrono::milliseconds timeout, int threads,
                                               const GlooDeviceSpec& device);

/// True when this LibTorch has c10d's ProcessGroupNCCL and lockstep's NCCL adapter compiled
/// against it (CMake's LOCKSTEP_NCCL check, Note [NCCL adapter] in c10d_adapter.cpp).
bool nccl_compiled();

/// Sets c10d's NCCL error handling to "clean up only" (the watchdog aborts a timed-out
/// collective's communicator instead of tearing the process down) unless the user chose one.
/// Call once, early (it sets an environment variable). A no-op without NCCL.
void prepare_nccl_environment();

/// What identifies CUDA device `index` on its host, as NCCL's duplicate-GPU check sees it: its
/// PCI bus id with NCCL compiled in (ranks with their own CUDA_VISIBLE_DEVICES all see
/// cuda:0), else "cuda:<index>".
std::string cuda_device_identity(int index);

/// c10d's ProcessGroupNCCL over `store`; its communicator connects at the first collective,
/// on the device of that collective's tensor. c10d's watchdog gets twice `timeout`, as a
/// backstop behind lockstep's own bounded waits. Throws std::logic_error when
/// nccl_compiled() is false.
std::shared_ptr<C10dBackend> make_nccl_backend(std::shared_ptr<detail::KeyValueStore> store,
                                               int rank, int size,
                                               std::chrono::milliseconds timeout);

// ---------------------------------------------------------------------------------------------
// Device tensors through host memory (Note [Staging device tensors] in torch_adapter.cpp)

/// A copy of a device (CUDA) tensor into pinned host memory, queued on a side stream after the
/// work already queued on the caller's current stream, so the caller never blocks; and the
/// copy of the result back, on the same stream. Device-generic (c10 streams and events), so it
/// compiles against a CPU-only LibTorch; only CUDA tensors use it.
class HostStaging {
 public:
  virtual ~HostStaging() = default;
  /// The pinned host copy (valid once wait_copied returned true).
  virtual const at::Tensor& host() const = 0;
  /// Waits until the copy to host finished, or `deadline`; false on timeout.
  virtual bool wait_copied(std::chrono::steady_clock::time_point deadline) = 0;
  /// Copies host() back into the device tensor on the side stream and waits until it landed,
  /// or `deadline`; false on timeout.
  virtual bool copy_back(std::chrono::steady_clock::time_point deadline) = 0;
};

/// Starts staging `device_tensor` (not on the CPU) to host memory; returns at once.
std::unique_ptr<HostStaging> stage_to_host(const at::Tensor& device_tensor);

// ---------------------------------------------------------------------------------------------
// Autograd

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

// ---------------------------------------------------------------------------------------------
// Optimizer state

/// The optimizer's state for `param`, or nullptr before its first step. (The state map's
/// key type changed from the TensorImpl address as a string in 1.x to a void* in 2.x.)
torch::optim::OptimizerParamState* find_optimizer_state(torch::optim::Optimizer& optimizer,
                                                        const at::Tensor& param);

/// Replaces the optimizer's state for `param`.
void set_optimizer_state(torch::optim::Optimizer& optimizer, const at::Tensor& param,
                         std::unique_ptr<torch::optim::OptimizerParamState> state);

/// The number of times `scheduler.step()` ran (LRScheduler's protected step count).
int64_t scheduler_step_count(torch::optim::LRScheduler& scheduler);

/// Sets that count; `count` must lie in [0, max_scheduler_step_count()].
void set_scheduler_step_count(torch::optim::LRScheduler& scheduler, int64_t count);

/// The largest step count the scheduler can hold.
int64_t max_scheduler_step_count();

// ---------------------------------------------------------------------------------------------
// Autocast (thread-local state; per-device-type calls in 1.x and 2.0-2.3, generic ones in 2.4+)

/// Whether this LibTorch can autocast on `device_type` (CPU and CUDA everywhere).
bool autocast_available(c10::DeviceType device_type);
/// The calling thread's autocast flag for `device_type`.
bool autocast_enabled(c10::DeviceType device_type);
void set_autocast_enabled(c10::DeviceType device_type, bool enabled);
/// The calling thread's autocast lower-precision dtype for `device_type`.
at::ScalarType autocast_dtype(c10::DeviceType device_type);
void set_autocast_dtype(c10::DeviceType device_type, at::ScalarType dtype);
/// Nesting depth of autocast regions (torch.autocast's __enter__/__exit__); the decrement
/// returns the new depth.
int autocast_increment_nesting();
int autocast_decrement_nesting();
/// Drops the casted-weight cache autocast keeps while a region is open.
void clear_autocast_cache();

// ---------------------------------------------------------------------------------------------
// CUDA devices (compiles against a CPU-only LibTorch: no CUDA header is needed)

/// Visible CUDA devices: torch::cuda::device_count(), which honours CUDA_VISIBLE_DEVICES and
/// is 0 on a CPU-only LibTorch.
int cuda_device_count();

/// Makes cuda:`index` the calling thread's current CUDA device (torch.cuda.set_device), through
/// c10's CUDA device guard. Throws InvalidArgument when this LibTorch has no CUDA backend.
void set_current_cuda_device(int index);

// ---------------------------------------------------------------------------------------------
// Pickling (torch.save's zip container)

/// Writes `tensors` (CPU, contiguous) as a plain dict in the zip container torch.save writes,
/// loadable by Python's torch.load(weights_only=True). Throws std::exception on failure.
void write_tensor_dict_archive(const std::string& path,
                               const std::map<std::string, at::Tensor>& tensors);

/// Reads the dict of name -> tensor in `bytes` (a torch.save file: a plain dict or the
/// OrderedDict `model.state_dict()` returns; with a non-empty `key`, the one stored under
/// that key of the saved dict). Builds only containers, numbers and tensors and runs nothing
/// (Note [State dict unpickler]). Throws InvalidArgument saying what the bytes hold instead,
/// without naming a file (the caller adds it).
std::map<std::string, at::Tensor> read_tensor_dict_archive(const std::vector<char>& bytes,
                                                           const std::string& key = "");

}  // namespace adapter
}  // namespace lockstep
