#pragma once
/// \file
/// DistributedDataParallel: wraps any `torch::nn::Module` so that, when `backward()` returns,
/// every parameter's `.grad` holds the average over all ranks of the process group. Gradients
/// are copied into flat buckets while backward runs and each bucket is all-reduced as soon as
/// it is complete, overlapping communication with the rest of backward.
///
/// \code
///   auto pg = lockstep::init_process_group();
///   auto net = std::make_shared<Net>();            // or a TORCH_MODULE holder
///   lockstep::DistributedDataParallel ddp(net, pg, lockstep::DDPOptions().bucket_cap_mb(25));
///   torch::optim::SGD opt(ddp->parameters(), 0.1);
///   // per step:
///   opt.zero_grad();
///   auto loss = loss_fn(ddp->forward(x), y);
///   loss.backward();                              // gradients are averaged when it returns
///   opt.step();
/// \endcode
///
/// Construction and every forward are *collective*: all ranks construct their DDP objects in
/// the same order and call forward/backward the same number of times. See the README's DDP
/// section for the full semantics.

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/optim/optimizer.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "lockstep/options.h"
#include "lockstep/process_group.h"

namespace lockstep {

// ---------------------------------------------------------------------------------------------
// Communication hooks

/// One bucket handed to a communication hook.
struct GradBucket {
  /// Position of the bucket in launch order (0 is launched first).
  size_t index = 0;
  /// The flat bucket: this rank's gradients already divided by the world size, followed by
  /// one control element per parameter of the bucket (see Note [Bucket control elements] in
  /// lib/src/ddp/reducer.h). A hook must leave in it the elementwise *sum* over ranks.
  at::Tensor buffer;
  /// Number of leading elements of `buffer` that are gradients.
  int64_t gradient_numel = 0;
  /// True for the last bucket of the iteration.
  bool is_last = false;
  /// One tensor per parameter of the bucket, in bucket order, shaped as the parameter: views
  /// of `buffer`'s gradient part (writing one writes the buffer). Built once per bucket plan
  /// and reused; a hook must not replace them.
  std::vector<at::Tensor> gradients;
  /// Each parameter's position in the list DDP reduces (the wrapped module's parameters that
  /// require grad and are not ignored, in registration order). Stable across bucket rebuilds:
  /// key per-parameter state by it.
  std::vector<size_t> parameter_indices;
  /// Each parameter's name, as in the wrapped module's named_parameters().
  std::vector<std::string> parameter_names;
};

/// Reduces buckets across ranks. The default all-reduces in the bucket's dtype; lockstep also
/// ships fp16 and bf16 compression here and PowerSGD, int8 quantization and post-local SGD in
/// `lockstep/comm_hooks.h`. Implement your own by deriving from it.
///
/// Contract: `reduce` is called once per bucket per synchronized backward, in bucket order, on
/// the autograd engine's thread, while backward continues; it must not block on communication
/// but return a Work that, once `wait()` returned, has left the elementwise sum over all
/// ranks in `bucket.buffer`. Every rank calls it for the same buckets in the same order, so a
/// hook may issue collectives. DDP calls `wait()` on every bucket's Work in bucket order, and
/// only after it launched every bucket of the iteration, so a hook may also issue a further
/// collective from inside `wait()` (PowerSGD's second round); never from `is_completed()`,
/// which DDP polls at moments that differ between ranks. One hook object serves one DDP
/// instance (it may cache buffers per bucket index).
class CommHook {
 public:
  virtual ~CommHook() = default;
  /// Short name for statistics and traces, e.g. "allreduce", "fp16".
  virtual std::string name() const = 0;
  /// Starts the reduction of `bucket` on `group`; see the class comment.
  virtual WorkPtr reduce(ProcessGroup& group, GradBucket& bucket) = 0;
};
using CommHookPtr = std::shared_ptr<CommHook>;

/// Plain all-reduce (sum) in the bucket's dtype. The default.
CommHookPtr allreduce_hook();
/// Casts the bucket to float16, all-reduces it, and casts back: half the bytes on the wire.
CommHookPtr fp16_compress_hook();
/// Casts the bucket to bfloat16 (float32's range, 8 bits of mantissa) and, because Gloo in
/// LibTorch 1.13 cannot sum bfloat16, all-gathers the bf16 values and sums the W contributions
/// in float32 in rank order (bitwise the same on every rank). Bytes each rank sends: W/4 of a
/// float32 ring all-reduce's, so half at 2 ranks, equal at 4 and twice as many at 8: use it
/// for its range at small world sizes, and fp16_compress_hook() to save bandwidth beyond.
CommHookPtr bf16_compress_hook();

// then_work (process_group.h) chains a post-processing step onto a hook's reduction.

// ---------------------------------------------------------------------------------------------
// Options and statistics

/// What DistributedDataParallel does when a reduced gradient is NaN or Inf. The decision is
/// the same on every rank (the reduced gradients are), so ranks never diverge.
enum class NonFinite {
  kOff,    ///< nothing: NaN spreads to every rank's weights (PyTorch's behaviour)
  kSkip,   ///< `step()` skips the optimizer step on every rank; a warning names where it began
  kAbort,  ///< backward throws NonFiniteError on every rank naming the step, rank and parameter
};

/// Options of `DistributedDataParallel`.
struct DDPOptions {
  /// Bucket capacity in MiB: a bucket closes once its gradients reach this size. Default 25.
  LOCKSTEP_ARG(double, bucket_cap_mb) = 25.0;
  /// Capacity of the first bucket in MiB (the last gradients of backward), kept small so the
  /// first all-reduce starts early. Default 1.
  LOCKSTEP_ARG(double, first_bucket_mb) = 1.0;
  /// Broadcast buffers (e.g. BatchNorm running statistics) from rank 0 before each forward
  /// in training mode that follows a synchronized one, as PyTorch's DDP does. Forwards in
  /// evaluation mode (`module->eval()`) neither broadcast nor change this schedule. Default
  /// true.
  LOCKSTEP_ARG(bool, broadcast_buffers) = true;
  /// Allow parameters that get no gradient on some or all ranks in an iteration. Off
  /// (default): such a parameter is an error naming it. On: it contributes zero, and a
  /// parameter unused on every rank keeps its `.grad` unchanged. Costs nothing extra.
  LOCKSTEP_ARG(bool, find_unused_parameters) = false;
  /// Make every parameter's `.grad` alias its bucket, so that gradients exist only once in
  /// memory and are never copied in or back. Default true (PyTorch's default is false: in
  /// Python a view gradient breaks `grad.detach_()`; lockstep's aliases survive the C++
  /// optimizers' `zero_grad()`, and a gradient that autograd re-creates, e.g. after
  /// `zero_grad(/*set_to_none=*/true)`, is copied into the bucket and aliased again). False:
  /// `.grad` stays its own tensor and receives a copy of the average.
  LOCKSTEP_ARG(bool, gradient_as_bucket_view) = true;
  /// After the first synchronized iteration rebuild the buckets once in the order gradients
  /// became ready on rank 0. Default true.
  LOCKSTEP_ARG(bool, rebuild_buckets) = true;
  /// Verify at construction that all ranks have the same parameters (count, names, shapes,
  /// dtypes). One extra allgather. Default true.
  LOCKSTEP_ARG(bool, check_parameters) = true;
  /// Broadcast parameters and buffers from rank 0 at construction. Default true.
  LOCKSTEP_ARG(bool, broadcast_parameters) = true;
  /// NaN/Inf policy (see NonFinite). kSkip and kAbort read each local gradient once while
  /// backward runs and carry one flag per bucket in its reduction; no extra collective
  /// unless a non-finite value is found. Default kOff.
  LOCKSTEP_ARG(NonFinite, nonfinite) = NonFinite::kOff;
  /// Global gradient-norm clipping after reduction: when the 2-norm of all reduced gradients
  /// exceeds it, they are scaled by max_grad_norm / (norm + 1e-6), as
  /// `torch::nn::utils::clip_grad_norm_` after a normal step. Each bucket's squared norm is
  /// taken as its reduction completes. 0 (default): off.
  LOCKSTEP_ARG(double, max_grad_norm) = 0;
  /// The graph is the same every iteration (PyTorch's static_graph): a parameter's gradient
  /// hook may then fire several times per backward (a layer shared by activation-checkpointed
  /// segments with reentrant backward), and parameters unused in the first iteration are
  /// unused in all. The first iteration reduces at its end; later ones overlap as usual.
  /// Default false.
  LOCKSTEP_ARG(bool, static_graph) = false;
  /// Names (as in the wrapped module's named_parameters() / named_buffers(), e.g.
  /// "encoder.weight") of parameters and buffers that DDP leaves alone: not checked, not
  /// broadcast at construction or before forwards, not reduced (their .grad stays this
  /// rank's own). PyTorch's `_set_params_and_buffers_to_ignore_for_model`. An unknown name is
  /// an InvalidArgument. Default: none.
  LOCKSTEP_ARG(std::vector<std::string>, ignore) = {};
  /// How buckets are reduced; nullptr (default): `allreduce_hook()`. Giving
  /// `allreduce_hook()` explicitly is the same as the default, fast path included.
  LOCKSTEP_ARG(CommHookPtr, comm_hook) = nullptr;
  /// Chrome trace output path; "" (default): the LOCKSTEP_TRACE environment variable, and no
  /// trace when that is unset. With more than one rank each rank writes `<stem>-rank<r><ext>`.
  LOCKSTEP_ARG(std::string, trace_path) = "";
};

/// Options of `DistributedDataParallelBase::join()` (uneven inputs), as PyTorch's `Join`.
struct JoinOptions {
  /// While some ranks have joined, divide the summed gradients by the initial world size (the
  /// joined ranks count as zeros; default, as PyTorch) or, when false, by the number of ranks
  /// that contributed in that iteration.
  LOCKSTEP_ARG(bool, divide_by_initial_world_size) = true;
  /// Raise on every rank, naming the ranks that ran out, as soon as one rank joins, instead
  /// of shadowing. Default false.
  LOCKSTEP_ARG(bool, throw_on_early_termination) = false;
};

/// Timeline of one bucket in one iteration; times in milliseconds since the iteration's
/// first gradient hook.
struct BucketStats {
  size_t index = 0;           ///< launch position
  int64_t numel = 0;          ///< gradient elements
  int64_t bytes = 0;          ///< gradient bytes
  size_t parameters = 0;      ///< parameters in the bucket
  std::string dtype;          ///< e.g. "Float"
  std::string transport;      ///< how it travelled: "shm (in place)", "gloo", "fp16 over shm", ...
  double ready_ms = 0;        ///< last gradient of the bucket arrived
  double launched_ms = 0;     ///< reduction started
  double done_ms = 0;         ///< reduction observed complete
};

/// Statistics of one synchronized iteration (forward + backward).
struct DDPStats {
  int64_t iteration = 0;            ///< 1-based count of synchronized backwards
  double forward_ms = 0;            ///< time inside the wrapper's forward
  double backward_compute_ms = 0;   ///< first gradient hook to the end of backward compute
  double comm_ms = 0;               ///< first bucket launched to last bucket done
  double exposed_comm_ms = 0;       ///< time backward waited for communication at its end
  /// 2-norm of the reduced gradients before clipping; -1 when neither clipping nor a
  /// non-finite policy asked for it.
  double grad_norm = -1;
  bool nonfinite = false;           ///< a reduced gradient was NaN or Inf
  std::vector<BucketStats> buckets; ///< one entry per bucket, in launch order
  /// The statistics as a JSON object.
  std::string to_json() const;
};

/// Description of one bucket of the current plan.
struct BucketInfo {
  std::vector<std::string> parameters;  ///< parameter names in bucket order
  int64_t numel = 0;                    ///< gradient elements
  int64_t bytes = 0;                    ///< gradient bytes
  std::string dtype;                    ///< e.g. "Float"
  std::string device;                   ///< e.g. "cpu"
};

// ---------------------------------------------------------------------------------------------
// The wrapper

namespace ddp {
class Reducer;
}

/// Non-template part of `DistributedDataParallelImpl<M>`, compiled into the library.
class DistributedDataParallelBase : public torch::nn::Module {
 public:
  ~DistributedDataParallelBase() override;

  /// RAII guard returned by `no_sync()`: while it lives, backward passes started by forwards
  /// inside it do not communicate; gradients accumulate locally and the next synchronized
  /// backward reduces the accumulated sum. Not a collective.
  class NoSync {
   public:
    NoSync(NoSync&& other) noexcept;
    NoSync(const NoSync&) = delete;
    NoSync& operator=(const NoSync&) = delete;
    NoSync& operator=(NoSync&&) = delete;
    ~NoSync();

   private:
    friend class DistributedDataParallelBase;
    explicit NoSync(DistributedDataParallelBase* owner);
    DistributedDataParallelBase* owner_;
    bool previous_;
  };

  /// Disables gradient synchronization until the returned guard is destroyed.
  NoSync no_sync();

  /// Guard returned by `join()`: ranks may run different numbers of iterations while it
  /// lives. A rank that runs out of inputs calls `finish()` (or lets the guard go out of scope
  /// normally): it then shadows the other ranks' gradient reductions and buffer broadcasts
  /// with zeros until every rank has finished, and finally every rank receives the model
  /// (parameters and buffers) of the highest rank among the last to finish. While every rank
  /// still has data a join costs no extra collective: presence travels in the buckets.
  /// Every rank must create the guard; forwards inside it must be training forwards of the
  /// same kind on every rank (Note [Join] in lib/src/ddp/reducer.h and docs/ddp.md).
  class Join {
   public:
    Join(Join&& other) noexcept;
    Join(const Join&) = delete;
    Join& operator=(const Join&) = delete;
    Join& operator=(Join&&) = delete;
    /// Calls finish() unless it ran or an exception is unwinding the scope; rethrows what
    /// finish() throws (a communication failure, or the early-termination error).
    ~Join() noexcept(false);
    /// This rank has no more inputs: shadow the others until every rank has finished, then
    /// take the final model. Collective. Idempotent.
    void finish();

   private:
    friend class DistributedDataParallelBase;
    Join(DistributedDataParallelBase* owner, JoinOptions options);
    DistributedDataParallelBase* owner_;
    bool finished_ = false;
    int uncaught_ = 0;
  };

  /// Starts uneven-input training (PyTorch's `ddp.join()`): see `Join`. Not a collective.
  Join join(JoinOptions options = JoinOptions());
  /// Whether forwards started now will synchronize their backward.
  bool require_gradient_sync() const { return require_sync_; }
  /// Sets the flag `no_sync()` toggles.
  void set_require_gradient_sync(bool sync) { require_sync_ = sync; }

  /// The process group gradients are averaged over.
  const ProcessGroupPtr& process_group() const { return pg_; }
  /// The options after resolution (trace path filled in from the environment).
  const DDPOptions& options() const { return options_; }
  /// Statistics of the last synchronized iteration. Thread-safe copy.
  DDPStats last_stats() const;
  /// Steps `optimizer` unless the last synchronized backward produced a NaN or Inf gradient
  /// under NonFinite::kSkip (then every rank skips); returns whether it stepped.
  bool step(torch::optim::Optimizer& optimizer);
  /// Optimizer steps skipped by step() because of non-finite gradients.
  int64_t skipped_steps() const { return skipped_steps_; }
  /// The current bucket plan, in launch order.
  std::vector<BucketInfo> buckets() const;
  /// Writes the Chrome trace collected so far (also written at destruction). No-op without a
  /// trace path.
  void flush_trace();

  /// Called around the wrapped forward; public for wrappers with their own forward.
  /// `begin_forward` is collective in training mode (buffer broadcast, bucket rebuild); a
  /// forward in evaluation mode under `torch::NoGradGuard` communicates nothing and may run on
  /// any subset of ranks.
  void begin_forward();
  void end_forward();

 protected:
  DistributedDataParallelBase(std::shared_ptr<torch::nn::Module> module, ProcessGroupPtr pg,
                              DDPOptions options);

  /// Times the wrapped forward and calls begin/end_forward.
  class ForwardScope {
   public:
    explicit ForwardScope(DistributedDataParallelBase& owner) : owner_(owner) {
      owner_.begin_forward();
    }
    ~ForwardScope() { owner_.end_forward(); }
    ForwardScope(const ForwardScope&) = delete;
    ForwardScope& operator=(const ForwardScope&) = delete;

   private:
    DistributedDataParallelBase& owner_;
  };

 private:
  void shadow_until_all_finished();

  std::shared_ptr<torch::nn::Module> module_;
  ProcessGroupPtr pg_;
  DDPOptions options_;
  bool require_sync_ = true;
  bool joining_ = false;  // inside a Join guard
  int64_t skipped_steps_ = 0;
  bool require_forward_buffer_sync_ = true;
  std::chrono::steady_clock::time_point forward_start_;
  std::unique_ptr<ddp::Reducer> reducer_;
  std::vector<at::Tensor> buffers_;
  std::vector<at::Tensor> state_;  // every parameter and buffer, each tensor once
};

/// The module behind `DistributedDataParallel<M>`: registers the wrapped module as submodule
/// "module" (so `parameters()` and `named_parameters()` are the wrapped module's, with the
/// "module." prefix in names, as PyTorch's DDP) and forwards any `forward(...)` signature.
template <typename M>
class DistributedDataParallelImpl : public DistributedDataParallelBase {
  static_assert(std::is_base_of<torch::nn::Module, M>::value,
                "DistributedDataParallel wraps a torch::nn::Module");

 public:
  DistributedDataParallelImpl(std::shared_ptr<M> module, ProcessGroupPtr pg,
                              DDPOptions options = DDPOptions())
      : DistributedDataParallelBase(module, std::move(pg), std::move(options)),
        module_(std::move(module)) {}

  /// Runs the wrapped module's forward with any arguments; returns what it returns.
  /// Collective (see `begin_forward`).
  template <typename... Args>
  auto forward(Args&&... args)
      -> decltype(std::declval<M&>().forward(std::forward<Args>(args)...)) {
    ForwardScope scope(*this);
    return module_->forward(std::forward<Args>(args)...);
  }

  /// The wrapped module.
  const std::shared_ptr<M>& module() const { return module_; }

 private:
  std::shared_ptr<M> module_;
};

/// Holder of a `DistributedDataParallelImpl<M>`, like a TORCH_MODULE holder: copyable, shares
/// one wrapper. `M` is deduced from a `std::shared_ptr<M>` or a `TORCH_MODULE` holder of `M`.
template <typename M>
class DistributedDataParallel : public torch::nn::ModuleHolder<DistributedDataParallelImpl<M>> {
  using Holder = torch::nn::ModuleHolder<DistributedDataParallelImpl<M>>;

 public:
  /// Wraps `module`; collective (see the file comment).
  DistributedDataParallel(std::shared_ptr<M> module, ProcessGroupPtr pg,
                          DDPOptions options = DDPOptions())
      : Holder(std::make_shared<DistributedDataParallelImpl<M>>(std::move(module), std::move(pg),
                                                               std::move(options))) {}
  /// Wraps the module held by a `TORCH_MODULE` holder; collective.
  DistributedDataParallel(const torch::nn::ModuleHolder<M>& module, ProcessGroupPtr pg,
                          DDPOptions options = DDPOptions())
      : DistributedDataParallel(module.ptr(), std::move(pg), std::move(options)) {}
  /// An empty holder.
  /* implicit */ DistributedDataParallel(std::nullptr_t) : Holder(nullptr) {}
  /// Holds an existing wrapper.
  /* implicit */ DistributedDataParallel(std::shared_ptr<DistributedDataParallelImpl<M>> impl)
      : Holder(std::move(impl)) {}

  /// `ddp(x...)` is `ddp->forward(x...)` (ModuleHolder's operator() cannot see a template
  /// forward).
  template <typename... Args>
  decltype(auto) operator()(Args&&... args) {
    return this->get()->forward(std::forward<Args>(args)...);
  }
};

template <typename M>
DistributedDataParallel(std::shared_ptr<M>, ProcessGroupPtr) -> DistributedDataParallel<M>;
template <typename M>
DistributedDataParallel(std::shared_ptr<M>, ProcessGroupPtr, DDPOptions)
    -> DistributedDataParallel<M>;
template <typename M>
DistributedDataParallel(torch::nn::ModuleHolder<M>, ProcessGroupPtr)
    -> DistributedDataParallel<M>;
template <typename M>
DistributedDataParallel(torch::nn::ModuleHolder<M>, ProcessGroupPtr, DDPOptions)
    -> DistributedDataParallel<M>;

}  // namespace lockstep
