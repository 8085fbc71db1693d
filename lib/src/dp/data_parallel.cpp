// DataParallel's engine: replica threads, parameter refresh, scatter/gather, error handling.
#include "lockstep/data_parallel.h"

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/DeviceGuard.h>
#include <dlfcn.h>
#include <torch/csrc/autograd/generated/variable_factories.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>

#include "dp/grad_reduction.h"
#include "core/spin_wait.h"
#include "dp/thread_count.h"
#include "lockstep/log.h"

namespace lockstep {

using detail::concat;
using detail::SpinWait;
using dp::blas_threads;
using dp::caller_threads;
using dp::ThreadCountFns;
using dp::ThreadCountScope;

// Note [DataParallel step]
// Replica 0 is the primary module itself; replicas 1..R-1 are created once and kept. Replica
// 0 runs on the caller's thread (its intra-op thread count set to the replicas' for the step,
// then restored: one thread hand-off fewer per step); replicas 1..R-1 each have a persistent
// thread, which at start-up sets its intra-op thread count
// (at::set_num_threads acts per thread under OpenMP: it sets the calling thread's
// omp_set_num_threads; its process-wide default only seeds threads that have not run a
// parallel region yet, so the caller's count is restored after the workers started).
// Thread counts: Note [Caller's intra-op threads] and Note [OpenBLAS and replica threads]
// in dp/thread_count.h.
//
// train_step(x, y, loss_fn):
//   1. caller: check the batch, split it (split_sizes), stash the primary's .grad (so that
//      replica 0's backward starts from none, and the stash is the base the reduction adds
//      to, or what a failed step restores), copy the primary's training mode to the
//      replicas, start the reduction's step.
//   2. every replica thread, concurrently:
//      a. refresh: copy the primary's parameters (unless shared, Note [Shared parameter
//         storage]) and buffers into its own, in place; drop its gradients of the last step;
//      b. forward on its slice, loss_fn; record an exception instead of throwing;
//      c. meet the others at a barrier: if any replica failed, all skip backward, so that
//         no replica waits for gradients that a failed peer will never produce;
//      d. backward of loss * n_r / N; each replica's DDP Reducer launches complete buckets
//         into replica 0's gradients while backward goes on (Note [DataParallel gradient
//         reduction]); finish() finalizes the Reducer, then the replicas share adding the
//         base into the result. A failure here aborts the reduction so that the peers stop
//         waiting.
//   3. caller: restore OpenBLAS, restore the stash where no replica produced a gradient (or
//      everywhere on failure), rethrow the first replica's failure naming it, or return the
//      loss.
// Note [Gradient memory]
// Autograd allocates every gradient anew each step (it steals the matmul's output). Freeing
// the last step's gradients before the new ones exist left glibc's malloc with a large free
// block at the top of the heap, above its trim threshold, which it returned to the kernel;
// the next backward then faulted every page back in (about 1,500 page faults per step on the
// MLP, in OpenBLAS's first write to its output). So each replica drops its last step's
// gradients only at the end of its job, after the new ones were allocated, and replica 0's
// new gradients (the result lives in the stashed .grad) are kept until the end of the next
// step: the allocator then reuses their memory in place (about 550 faults per step remain,
// from the replica threads' arenas). This costs one extra set of gradients per replica in
// memory, as much as the flat buckets of the first version.
//
// A replica with no samples (batch smaller than the number of replicas) skips 2b and the
// backward of 2d but still calls finish(): its Reducer joins every bucket with zeros.
// Every hand-off between the threads spins briefly before it blocks (Note [Spin before
// blocking] in core/spin_wait.h).

namespace {


// Replica threads: run(job) runs job(r) on thread r for every replica and returns when all
// did. Every hand-off spins briefly before blocking (Note [Spin before blocking]).
class ReplicaThreads {
 public:
  ReplicaThreads(const std::vector<c10::Device>& devices, int threads_per_replica,
                 std::chrono::microseconds spin)
      : size_(static_cast<int>(devices.size())),
        threads_per_replica_(threads_per_replica),
        start_(spin),
        done_(spin),
        barrier_(spin) {
    const int caller_threads = at::get_num_threads();
    std::atomic<int> started{0};
    SpinWait started_wait;
    for (size_t r = 1; r < devices.size(); ++r) {
      threads_.emplace_back([this, r, threads_per_replica, &started, &started_wait] {
        at::init_num_threads();
        at::set_num_threads(threads_per_replica);
        started.fetch_add(1, std::memory_order_release);
        started_wait.notify();
        loop(static_cast<int>(r));
      });
    }
    started_wait.wait([&] { return started.load(std::memory_order_acquire) == size_ - 1; });
    at::set_num_threads(caller_threads);  // see Note [DataParallel step]
  }

  ~ReplicaThreads() {
    stop_.store(true, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_acq_rel);
    start_.notify();
    for (auto& t : threads_) t.join();
  }

  // Runs job(0) on the calling thread (with its intra-op thread count set to the replicas'
  // for the duration) and job(r) on thread r. `job` must not throw.
  void run(const std::function<void(int)>& job) {
    job_ = &job;
    remaining_.store(size_ - 1, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_acq_rel);  // publishes job_ and remaining_
    start_.notify();
    {
      ThreadCountScope scope(&caller_threads(), threads_per_replica_);
      job(0);
    }
    done_.wait([&] { return remaining_.load(std::memory_order_acquire) == 0; });
    job_ = nullptr;
  }

  // Barrier among the replica threads within one job.
  void arrive_and_wait() {
    const uint64_t round = barrier_round_.load(std::memory_order_acquire);
    if (barrier_count_.fetch_add(1, std::memory_order_acq_rel) + 1 == size_) {
      barrier_count_.store(0, std::memory_order_relaxed);
      barrier_round_.fetch_add(1, std::memory_order_acq_rel);
      barrier_.notify();
      return;
    }
    barrier_.wait([&] { return barrier_round_.load(std::memory_order_acquire) != round; });
  }

 private:
  void loop(int r) {
    uint64_t seen = 0;
    while (true) {
      start_.wait([&] { return generation_.load(std::memory_order_acquire) != seen; });
      seen = generation_.load(std::memory_order_acquire);
      if (stop_.load(std::memory_order_acquire)) return;
      (*job_)(r);
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) done_.notify();
    }
  }

  int size_;
  int threads_per_replica_;
  std::vector<std::thread> threads_;  // replicas 1..size-1; replica 0 runs on the caller
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> barrier_count_{0};
  std::atomic<uint64_t> barrier_round_{0};
  SpinWait start_, done_, barrier_;
};

// How long a hand-off between replica threads polls before it blocks.
constexpr int kSpinMicroseconds = 50;

std::string describe(std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    return ex.what();
  } catch (...) {
    return "unknown exception";
  }
}

}  // namespace

namespace detail {

std::vector<int64_t> split_sizes(int64_t n, int replicas) {
  LOCKSTEP_ASSERT(replicas >= 1 && n >= 0);
  std::vector<int64_t> sizes(replicas, n / replicas);
  for (int64_t r = 0; r < n % replicas; ++r) ++sizes[r];
  return sizes;
}

std::vector<c10::Device> resolve_devices(const DataParallelOptions& options) {
  if (!options.devices().empty()) return options.devices();
  int n = options.cpu_replicas();
  LOCKSTEP_CHECK(n >= 0, "DataParallelOptions: expected cpu_replicas >= 0, but got ", n, ".");
  std::vector<c10::Device> devices;
  if (n == 0) {
    int gpus = at::detail::getCUDAHooks().getNumGPUs();
    for (int g = 0; g < gpus; ++g) {
      devices.emplace_back(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(g));
    }
    if (!devices.empty()) return devices;
    n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }
  devices.assign(n, c10::Device(c10::DeviceType::CPU));
  return devices;
}

struct DataParallelCore::Impl {
  std::vector<std::shared_ptr<torch::nn::Module>> modules;
  std::vector<c10::Device> devices;
  ForwardFn forward_fn;
  DataParallelOptions options;
  int threads_per_replica = 1;
  bool all_cpu = true;
  std::vector<std::vector<at::Tensor>> params;   // [replica][i], requires_grad only
  std::vector<std::vector<at::Tensor>> buffers;  // [replica][i]
  std::vector<std::vector<at::Tensor>> all_params;  // [replica][i], every parameter
  std::unique_ptr<dp::GradReduction> reduction;
  std::vector<at::Tensor> last_fresh;  // Note [Gradient memory]
  std::unique_ptr<ReplicaThreads> threads;

  int size() const { return static_cast<int>(modules.size()); }

  std::string replica_name(int r) const {
    return concat("replica ", r, "/", size(), " (", devices[r], ")");
  }

  // Step 2a: the primary's parameters and buffers into replica r, in place (Note
  // [Shared parameter storage]).
  void refresh(int r) {
    if (r == 0) return;
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < all_params[r].size(); ++i) {
      auto& mine = all_params[r][i];
      const auto& primary = all_params[0][i];
      if (mine.is_alias_of(primary)) continue;
      mine.copy_(primary, /*non_blocking=*/true);
    }
    for (size_t i = 0; i < buffers[r].size(); ++i) buffers[r][i].copy_(buffers[0][i], /*non_blocking=*/true);
  }

  at::Tensor slice(const at::Tensor& t, const std::vector<int64_t>& sizes, int r) const {
    if (!t.defined()) return t;
    int64_t offset = 0;
    for (int i = 0; i < r; ++i) offset += sizes[i];
    return t.narrow(0, offset, sizes[r]).to(devices[r], /*non_blocking=*/true);
  }

  void check_batch(const char* op, const at::Tensor& input) const {
    LOCKSTEP_CHECK(input.defined() && input.dim() >= 1, "DataParallel::", op,
                   ": expected an input with a batch dimension, but got ",
                   input.defined() ? concat(input.dim(), " dimensions") : std::string("none"), ".");
    LOCKSTEP_CHECK(input.size(0) > 0, "DataParallel::", op, ": expected a non-empty batch, but "
                   "got an input of shape ", input.sizes(), ". Skip empty batches (for example "
                   "the data loader's last one) before calling ", op, ".");
  }

  // Rethrows the first failure (in replica order among those that failed first).
  [[noreturn]] void rethrow(const char* op, int r, std::exception_ptr error) const {
    try {
      std::rethrow_exception(error);
    } catch (...) {
      std::throw_with_nested(Error(concat("DataParallel::", op, ": ", replica_name(r),
                                          " failed: ", describe(error))));
    }
  }

  // OpenBLAS's process-wide thread count for a step (Note [DataParallel step]): the
  // replicas' count while the step runs on CPU replicas, unless the option is off.
  const ThreadCountFns* blas_for_step() const {
    return options.scope_blas_threads() && all_cpu ? &blas_threads() : nullptr;
  }
};

DataParallelCore::DataParallelCore(std::vector<std::shared_ptr<torch::nn::Module>> replicas,
                                   std::vector<c10::Device> devices, ForwardFn forward,
                                   const DataParallelOptions& options)
    : impl_(std::make_unique<Impl>()) {
  auto& m = *impl_;
  LOCKSTEP_CHECK(!devices.empty() && replicas.size() == devices.size(),
                 "DataParallel: expected one replica per device, but got ", replicas.size(),
                 " replicas for ", devices.size(), " devices.");
  m.modules = std::move(replicas);
  m.devices = std::move(devices);
  m.forward_fn = std::move(forward);
  m.options = options;
  LOCKSTEP_CHECK(options.bucket_cap_mb() > 0, "DataParallelOptions: expected bucket_cap_mb > 0, "
                 "but got ", options.bucket_cap_mb(), ".");
  int cpu_replicas = 0;
  for (const auto& d : m.devices) {
    LOCKSTEP_CHECK(d.is_cpu() || d.is_cuda(), "DataParallel: expected CPU or CUDA devices, but "
                   "got ", d, ".");
    cpu_replicas += d.is_cpu() ? 1 : 0;
  }
  m.all_cpu = cpu_replicas == m.size();
  m.threads_per_replica = options.threads_per_replica();
  LOCKSTEP_CHECK(m.threads_per_replica >= 0, "DataParallelOptions: expected threads_per_replica "
                 ">= 0, but got ", m.threads_per_replica, ".");
  if (m.threads_per_replica == 0) {
    int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    m.threads_per_replica = cpu_replicas > 0 ? std::max(1, cores / cpu_replicas) : 1;
  }

  std::vector<std::string> names;
  for (int r = 0; r < m.size(); ++r) {
    auto named = m.modules[r]->named_parameters(/*recurse=*/true);
    std::vector<at::Tensor> all, trainable;
    for (const auto& item : named) {
      all.push_back(item.value());
      if (item.value().requires_grad()) {
        trainable.push_back(item.value());
        if (r == 0) names.push_back(item.key());
      }
      LOCKSTEP_CHECK(item.value().device() == m.devices[r], "DataParallel: expected parameter '",
                     item.key(), "' of ", m.replica_name(r), " on ", m.devices[r],
                     ", but it is on ", item.value().device(), ". Move the primary module to "
                     "devices[0] before wrapping it.");
    }
    std::vector<at::Tensor> bufs;
    for (const auto& b : m.modules[r]->buffers(/*recurse=*/true)) bufs.push_back(b);
    if (r > 0) {
      LOCKSTEP_CHECK(all.size() == m.all_params[0].size() && bufs.size() == m.buffers[0].size(),
                     "DataParallel: expected ", m.replica_name(r), " to have the primary's ",
                     m.all_params[0].size(), " parameters and ", m.buffers[0].size(),
                     " buffers, but it has ", all.size(), " and ", bufs.size(),
                     ". The replica factory must build the same architecture.");
      for (size_t i = 0; i < all.size(); ++i) {
        LOCKSTEP_CHECK(all[i].sizes() == m.all_params[0][i].sizes() &&
                           all[i].scalar_type() == m.all_params[0][i].scalar_type(),
                       "DataParallel: parameter ", i, " of ", m.replica_name(r), " is ",
                       all[i].sizes(), " ", all[i].scalar_type(), " but the primary's is ",
                       m.all_params[0][i].sizes(), " ", m.all_params[0][i].scalar_type(), ".");
      }
    }
    m.all_params.push_back(std::move(all));
    m.params.push_back(std::move(trainable));
    m.buffers.push_back(std::move(bufs));
  }
  // Note [Shared parameter storage]
  // A replica on the primary's device only reads its parameters during a step, and the
  // optimizer updates the primary's in place between steps; so such replicas' parameters
  // share the primary's storage (distinct leaf tensors with their own .grad, same data): the
  // per-step refresh of parameters costs nothing and the replicas take no parameter memory.
  // `refresh` still copies where the storage is not shared (other devices, or an optimizer
  // that replaced a parameter's data). Buffers are never shared: replicas update their
  // BatchNorm statistics concurrently, and they are copied from the primary every step.
  {
    at::NoGradGuard no_grad;
    for (int r = 1; r < m.size(); ++r) {
      if (m.devices[r] != m.devices[0]) continue;
      for (size_t i = 0; i < m.all_params[r].size(); ++i) {
        m.all_params[r][i].set_data(m.all_params[0][i]);
      }
    }
  }
  for (int r = 0; r < m.size(); ++r) m.refresh(r);

  // Note [Spin before blocking]: only when every replica thread has a hardware thread.
  const int hardware = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const auto spin = m.size() * (m.all_cpu ? m.threads_per_replica : 1) <= hardware
                        ? std::chrono::microseconds(kSpinMicroseconds)
                        : std::chrono::microseconds(0);
  dp::ReductionOptions reduction_options;
  reduction_options.bucket_bytes = static_cast<int64_t>(options.bucket_cap_mb() * 1024 * 1024);
  reduction_options.spin = spin;
  if (!m.params[0].empty()) {
    m.reduction = dp::make_replica_reduction(m.params, std::move(names), reduction_options);
  }
  m.threads = std::make_unique<ReplicaThreads>(m.devices, m.threads_per_replica, spin);
}

DataParallelCore::~DataParallelCore() = default;

int DataParallelCore::threads_per_replica() const { return impl_->threads_per_replica; }

at::Tensor DataParallelCore::forward(const at::Tensor& input) {
  auto& m = *impl_;
  m.check_batch("forward", input);
  auto sizes = split_sizes(input.size(0), m.size());
  for (int r = 1; r < m.size(); ++r) m.modules[r]->train(m.modules[0]->is_training());
  std::vector<at::Tensor> outputs(m.size());
  std::vector<std::exception_ptr> errors(m.size());
  {
    ThreadCountScope blas(m.blas_for_step(), m.threads_per_replica);
    m.threads->run([&](int r) {
      try {
        c10::DeviceGuard guard(m.devices[r]);
        at::NoGradGuard no_grad;
        m.refresh(r);
        if (sizes[r] == 0) return;
        outputs[r] = m.forward_fn(static_cast<size_t>(r), m.slice(input, sizes, r));
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (int r = 0; r < m.size(); ++r) {
    if (errors[r]) m.rethrow("forward", r, errors[r]);
  }
  std::vector<at::Tensor> parts;
  for (int r = 0; r < m.size(); ++r) {
    if (sizes[r] > 0) parts.push_back(outputs[r].to(m.devices[0]));
  }
  return parts.size() == 1 ? parts[0] : at::cat(parts, 0);
}

at::Tensor DataParallelCore::train_step(const at::Tensor& input, const at::Tensor& target,
                                        const LossFn& loss_fn) {
  auto& m = *impl_;
  m.check_batch("train_step", input);
  LOCKSTEP_CHECK(loss_fn != nullptr, "DataParallel::train_step: expected a loss function.");
  const int64_t n = input.size(0);
  LOCKSTEP_CHECK(!target.defined() || (target.dim() >= 1 && target.size(0) == n),
                 "DataParallel::train_step: expected the target's first dimension to match the "
                 "input's batch of ", n, ", but got a target of shape ", target.sizes(), ".");
  auto sizes = split_sizes(n, m.size());
  for (int r = 1; r < m.size(); ++r) m.modules[r]->train(m.modules[0]->is_training());

  // Step 1: stash the primary's gradients; they are the base of the reduction.
  std::vector<at::Tensor> stash;
  for (auto& p : m.params[0]) {
    stash.push_back(p.grad());
    p.mutable_grad().reset();
  }
  if (m.reduction) {
    std::vector<uint8_t> active(m.size());
    for (int r = 0; r < m.size(); ++r) active[r] = sizes[r] > 0 ? 1 : 0;
    m.reduction->start_step(stash, std::move(active));
  }

  std::vector<at::Tensor> losses(m.size());
  std::vector<std::exception_ptr> errors(m.size());
  std::mutex first_mutex;
  int first_failure = -1;
  auto record = [&](int r, std::exception_ptr e) {
    errors[r] = e;
    std::lock_guard<std::mutex> lock(first_mutex);
    if (first_failure < 0) first_failure = r;
  };
  std::atomic<bool> forward_failed{false};
  std::atomic<bool> backward_failed{false};
  {
    ThreadCountScope blas(m.blas_for_step(), m.threads_per_replica);
    m.threads->run([&](int r) {
      c10::DeviceGuard guard(m.devices[r]);
      at::Tensor loss;
      // The last step's gradients of replica r, released when this job ends (Note [Gradient
      // memory]).
      std::vector<at::Tensor> last;
      // Steps 2a and 2b.
      try {
        m.refresh(r);
        if (r > 0) {
          last.reserve(m.params[r].size());
          for (auto& p : m.params[r]) last.push_back(std::move(p.mutable_grad()));
        }
        if (sizes[r] > 0) {
          auto out = m.forward_fn(static_cast<size_t>(r), m.slice(input, sizes, r));
          loss = loss_fn(out, m.slice(target, sizes, r));
          LOCKSTEP_CHECK(loss.defined() && loss.numel() == 1,
                         "DataParallel::train_step: expected the loss function to return a "
                         "scalar, but got ", loss.defined() ? concat("shape ", loss.sizes())
                                                            : std::string("an undefined tensor"),
                         ".");
          LOCKSTEP_CHECK(loss.requires_grad(), "DataParallel::train_step: expected a loss that "
                         "requires grad, but it does not: is the module in no-grad mode, or "
                         "are its parameters frozen?");
          losses[r] = loss.detach();
        }
      } catch (...) {
        record(r, std::current_exception());
        forward_failed = true;
      }
      // Step 2c.
      m.threads->arrive_and_wait();
      if (forward_failed) return;
      // Step 2d.
      try {
        double weight = m.options.mean_loss() ? static_cast<double>(sizes[r]) / n : 1.0;
        if (sizes[r] > 0) {
          double scale = m.reduction ? m.reduction->prepare(r, weight) : 1.0;
          (scale == 1.0 ? loss.reshape({}) : loss.reshape({}) * scale).backward();
        }
        if (m.reduction) m.reduction->finish(r);
      } catch (...) {
        bool first = !backward_failed.exchange(true);
        record(r, std::current_exception());
        if (first && m.reduction) m.reduction->abort(concat(m.replica_name(r), " failed in backward"));
      }
    });
  }

  // Step 3.
  if (first_failure >= 0) {
    for (size_t i = 0; i < m.params[0].size(); ++i) m.params[0][i].mutable_grad() = stash[i];
    m.rethrow("train_step", first_failure, errors[first_failure]);
  }
  std::vector<at::Tensor> fresh;  // replica 0's gradients of this step, where not the result
  for (size_t i = 0; i < m.params[0].size(); ++i) {
    // The reduction wrote base + step into the stashed tensor (undefined: no replica used
    // the parameter, and the stash is unchanged).
    auto& grad = m.params[0][i].mutable_grad();
    if (!stash[i].defined()) continue;
    if (grad.defined()) fresh.push_back(std::move(grad));
    grad = stash[i];
  }
  m.last_fresh = std::move(fresh);  // releases the previous step's (Note [Gradient memory])
  at::Tensor total;
  for (int r = 0; r < m.size(); ++r) {
    if (!losses[r].defined()) continue;
    double weight = m.options.mean_loss() ? static_cast<double>(sizes[r]) / n : 1.0;
    auto part = losses[r].to(m.devices[0]).reshape({}) * weight;
    total = total.defined() ? total + part : part;
  }
  return total;
}

}  // namespace detail
}  // namespace lockstep
