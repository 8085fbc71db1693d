// See Note [Reducer contract] in reducer.h.
#include "ddp/reducer.h"

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <unordered_map>

#include "adapter/torch_adapter.h"
#include "ddp/bucket_planner.h"
#include "lockstep/errors.h"
#include "lockstep/log.h"

namespace lockstep {
namespace ddp {

using detail::concat;

namespace {

double ms_between(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

template <typename T>
void scale_loop(T* dst, const T* src, int64_t n, T scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * scale;
}

template <typename T>
void scale_inplace(T* data, int64_t n, T scale) {
  for (int64_t i = 0; i < n; ++i) data[i] *= scale;
}

bool same_memory(const at::Tensor& a, const at::Tensor& b) {
  return a.defined() && b.defined() && a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() &&
         a.strides() == b.strides();
}

// A tensor over `buffer`'s storage at `offset` shaped `sizes` (contiguous). Not an autograd
// view: the C++ optimizers' zero_grad() calls grad.detach_(), which views refuse, and a
// gradient that aliases a bucket must survive it (gradient_as_bucket_view).
at::Tensor alias_slice(const at::Tensor& buffer, int64_t offset, at::IntArrayRef sizes) {
  std::vector<int64_t> strides(sizes.size(), 1);
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d) {
    strides[d] = strides[d + 1] * std::max<int64_t>(sizes[d + 1], 1);
  }
  return at::empty({0}, buffer.options())
      .set_(buffer.storage(), buffer.storage_offset() + offset, sizes, strides);
}

void scale_in_place(at::Tensor& t, double scale) {
  if (scale == 1.0) return;
  if (t.device().is_cpu() && t.is_contiguous()) {
    if (t.scalar_type() == at::kFloat) {
      return scale_inplace(t.data_ptr<float>(), t.numel(), static_cast<float>(scale));
    }
    if (t.scalar_type() == at::kDouble) {
      return scale_inplace(t.data_ptr<double>(), t.numel(), scale);
    }
  }
  t.mul_(scale);
}

}  // namespace

void copy_scaled(at::Tensor& dst, const at::Tensor& src, double scale) {
  if (dst.device().is_cpu() && src.device().is_cpu() && src.is_contiguous() &&
      dst.is_contiguous() && src.scalar_type() == dst.scalar_type() &&
      src.numel() == dst.numel()) {
    const int64_t n = src.numel();
    if (scale == 1.0) {
      std::memcpy(dst.data_ptr(), src.data_ptr(), n * src.element_size());
      return;
    }
    if (src.scalar_type() == at::kFloat) {
      return scale_loop(dst.data_ptr<float>(), src.data_ptr<float>(), n,
                        static_cast<float>(scale));
    }
    if (src.scalar_type() == at::kDouble) {
      return scale_loop(dst.data_ptr<double>(), src.data_ptr<double>(), n, scale);
    }
  }
  dst.copy_(src);
  if (scale != 1.0) dst.mul_(scale);
}

// ---------------------------------------------------------------------------------------------
// Chrome trace

// Collects events in memory (bounded) and writes the Trace Event Format: one process per rank,
// track 0 for forward/backward, track 1 + b for bucket b.
class Trace {
 public:
  using Clock = std::chrono::steady_clock;
  Trace(std::string path, int rank) : path_(std::move(path)), rank_(rank), origin_(Clock::now()) {}

  void span(int track, const std::string& name, Clock::time_point begin, Clock::time_point end,
            const std::string& args_json) {
    if (events_.size() >= kMaxEvents) return;
    max_track_ = std::max(max_track_, track);
    std::ostringstream os;
    os << "{\"name\":\"" << name << "\",\"ph\":\"X\",\"pid\":" << rank_ << ",\"tid\":" << track
       << ",\"ts\":" << us(begin) << ",\"dur\":" << std::max(0.0, us(end) - us(begin));
    if (!args_json.empty()) os << ",\"args\":" << args_json;
    os << "}";
    events_.push_back(os.str());
  }

  void instant(int track, const std::string& name, Clock::time_point at) {
    if (events_.size() >= kMaxEvents) return;
    max_track_ = std::max(max_track_, track);
    std::ostringstream os;
    os << "{\"name\":\"" << name << "\",\"ph\":\"i\",\"s\":\"t\",\"pid\":" << rank_
       << ",\"tid\":" << track << ",\"ts\":" << us(at) << "}";
    events_.push_back(os.str());
  }

  void write() {
    std::ofstream out(path_, std::ios::trunc);
    if (!out) {
      log_warn(concat("could not write the DDP trace to ", path_));
      return;
    }
    out << "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n";
    out << "{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":" << rank_
        << ",\"args\":{\"name\":\"rank " << rank_ << "\"}}";
    for (int t = 0; t <= max_track_; ++t) {
      out << ",\n{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":" << rank_ << ",\"tid\":" << t
          << ",\"args\":{\"name\":\"" << (t == 0 ? std::string("step") : concat("bucket ", t - 1))
          << "\"}}";
    }
    for (const auto& e : events_) out << ",\n" << e;
    out << "\n]}\n";
  }

 private:
  static constexpr size_t kMaxEvents = 1000000;
  double us(Clock::time_point t) const {
    return std::chrono::duration<double, std::micro>(t - origin_).count();
  }
  std::string path_;
  int rank_;
  Clock::time_point origin_;
  int max_track_ = 0;
  std::vector<std::string> events_;
};

// ---------------------------------------------------------------------------------------------
// Reducer

Reducer::Reducer(std::vector<at::Tensor> params, std::vector<std::string> names,
                 ProcessGroupPtr group, ReducerOptions options)
    : params_(std::move(params)),
      names_(std::move(names)),
      group_(std::move(group)),
      options_(std::move(options)) {
  LOCKSTEP_CHECK(group_ != nullptr, "Expected a process group for the Reducer, but got null.");
  LOCKSTEP_CHECK(names_.size() == params_.size(), "Expected one name per parameter (",
                 params_.size(), "), but got ", names_.size(), ".");
  std::unordered_map<const void*, size_t> seen;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& p = params_[i];
    LOCKSTEP_CHECK(p.defined() && p.is_leaf() && p.requires_grad(), group_->where(),
                   " Expected parameter '", names_[i],
                   "' to be a leaf tensor that requires grad. Leave frozen parameters out.");
    LOCKSTEP_CHECK(p.layout() == at::kStrided, group_->where(), " Expected parameter '",
                   names_[i], "' to be a dense tensor, but it is ", p.layout(), ".");
    auto inserted = seen.emplace(p.unsafeGetTensorImpl(), i);
    LOCKSTEP_CHECK(inserted.second, group_->where(), " Parameter '", names_[i],
                   "' is the same tensor as '", names_[inserted.first->second],
                   "'; pass shared (tied) parameters once.");
  }
  world_ = group_->size();
  root_mode_ = options_.root >= 0;
  LOCKSTEP_CHECK(options_.root < world_, group_->where(), " Expected the Reducer's root to be "
                 "-1 (all-reduce) or a rank below ", world_, ", but got ", options_.root, ".");
  LOCKSTEP_CHECK(!root_mode_ || !options_.comm_hook, group_->where(), " A Reducer that reduces "
                 "into a root does not take a comm hook (Note [Reducing into a root]).");
  inv_world_ = options_.average ? 1.0 / world_ : 1.0;
  op_ = options_.average ? ReduceOp::kAvg : ReduceOp::kSum;
  hook_ = options_.comm_hook ? options_.comm_hook : allreduce_hook();
  trivial_ = world_ == 1 && !options_.comm_hook;
  fused_average_ = world_ > 1 && !options_.comm_hook;  // Note [Where the average is taken]
  if (!options_.trace_path.empty()) {
    trace_ = std::make_unique<Trace>(options_.trace_path, group_->rank());
  }
  ready_.assign(params_.size(), 0);
  ready_order_.reserve(params_.size());
  build_buckets({});
  if (options_.install_hooks) {
    hooks_.reserve(params_.size());
    for (size_t i = 0; i < params_.size(); ++i) {
      hooks_.push_back(adapter::add_grad_accumulated_hook(params_[i], [this, i] {
        mark_ready(i);
      }));
    }
  }
}

Reducer::~Reducer() {
  hooks_.clear();
  // Do not leave collectives running on buffers we are about to free.
  for (auto& b : buckets_) {
    if (b.work) {
      try {
        b.work->wait();
      } catch (...) {
      }
    }
  }
  if (trace_) trace_->write();
}

void Reducer::build_buckets(const std::vector<size_t>& order) {
  std::vector<ParamSpec> specs;
  specs.reserve(params_.size());
  for (const auto& p : params_) specs.push_back({p.numel(), p.scalar_type(), p.device()});
  auto plan = plan_buckets(specs, order, options_.cap_bytes, options_.first_cap_bytes);

  std::vector<Bucket> buckets(plan.size());
  std::vector<ParamSlot> slots(params_.size());
  for (size_t b = 0; b < plan.size(); ++b) {
    auto& bucket = buckets[b];
    bucket.params = plan[b];
    int64_t numel = 0;
    for (size_t i : bucket.params) numel += params_[i].numel();
    bucket.gradient_numel = numel;
    const auto& first = params_[bucket.params.front()];
    if (trivial_) continue;  // nothing is communicated: no buffers
    if (root_mode_) {  // Note [Reducing into a root]: the gradients are the bucket
      bucket.control = at::zeros({static_cast<int64_t>(bucket.params.size())},
                                 first.options().dtype(at::kFloat).requires_grad(false));
      bucket.inputs.resize(bucket.params.size() + 1);
      bucket.inputs.back() = bucket.control;
      bucket.transport = concat(group_->backend(), " (reduce into rank ", options_.root, ")");
      continue;
    }
    // Note [CUDA buckets]: a CUDA bucket lives on its parameters' device; ProcessGroupGloo
    // stages CUDA tensors through pinned host memory itself, so the same code path serves
    // both. Compiled and run only where LibTorch has CUDA (at::hasCUDA()).
    // The group may hand out memory it reduces faster (Note [Shared reduction buffers] in
    // comm/shm_group.cpp). Collective: every rank plans the same buckets in the same order.
    bucket.buffer = group_->new_buffer(numel + static_cast<int64_t>(bucket.params.size()),
                                       first.options().requires_grad(false));
    bucket.transport = options_.comm_hook
                           ? concat(hook_->name(), " over ", group_->backend())
                           : group_->transport_for(bucket.buffer);
    int64_t offset = 0;
    for (size_t k = 0; k < bucket.params.size(); ++k) {
      size_t i = bucket.params[k];
      auto& slot = slots[i];
      slot.bucket = b;
      slot.position = k;
      slot.offset = offset;
      slot.view = alias_slice(bucket.buffer, offset, params_[i].sizes());
      offset += params_[i].numel();
    }
  }
  for (size_t b = 0; b < plan.size(); ++b) {
    for (size_t k = 0; k < plan[b].size(); ++k) {
      slots[plan[b][k]].bucket = b;
      slots[plan[b][k]].position = k;
    }
  }
  if (!trivial_ && !root_mode_ && options_.gradient_as_bucket_view) {
    // Carry existing gradients into the new views and alias them.
    for (size_t i = 0; i < params_.size(); ++i) {
      auto& grad = params_[i].mutable_grad();
      if (!grad.defined()) continue;
      if (!same_memory(grad, slots[i].view)) slots[i].view.copy_(grad);
      grad = slots[i].view;
    }
  }
  buckets_ = std::move(buckets);
  slots_ = std::move(slots);
  for (auto& b : buckets_) b.pending = b.params.size();
}

void Reducer::prepare_for_forward(bool sync) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (in_backward_) {
    // The previous backward failed before its end-of-backward callback: drop its state.
    log_warn(concat(group_->where(), " DDP: the previous backward did not finish; discarding "
                    "its partial gradient reduction"));
    for (auto& b : buckets_) {
      if (b.work) {
        try {
          b.work->wait();
        } catch (...) {
        }
      }
    }
    reset_iteration();
  }
  sync_ = sync;
  if (sync) rebuild_if_pending();
}

void Reducer::rebuild_if_pending() {
  if (!rebuild_pending_) return;
  rebuild_pending_ = false;
  rebuilt_ = true;
  // Rank 0's ready order, completed with the parameters that never became ready in reverse
  // registration order, is broadcast so every rank plans the same buckets.
  const size_t n = params_.size();
  auto order = at::empty({static_cast<int64_t>(n)}, at::kLong);
  auto* data = order.data_ptr<int64_t>();
  std::vector<uint8_t> listed(n, 0);
  size_t k = 0;
  for (size_t i : ready_order_) {
    if (!listed[i]) {
      listed[i] = 1;
      data[k++] = static_cast<int64_t>(i);
    }
  }
  for (size_t i = n; i-- > 0;) {
    if (!listed[i]) data[k++] = static_cast<int64_t>(i);
  }
  if (world_ > 1) group_->broadcast(order, /*root=*/0)->wait();
  std::vector<size_t> new_order(n);
  for (size_t i = 0; i < n; ++i) new_order[i] = static_cast<size_t>(data[i]);
  build_buckets(new_order);
  ready_order_.clear();
  if (log_level() <= LogLevel::kDebug) {
    log_debug(concat(group_->where(), " DDP: rebuilt ", buckets_.size(),
                     " buckets in rank 0's gradient order"));
  }
}

void Reducer::mark_ready(size_t index) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!sync_) return;
  LOCKSTEP_ASSERT(index < params_.size(), "parameter index ", index, " out of range");
  auto now = Clock::now();
  if (!in_backward_) begin_iteration(now);
  if (ready_[index]) {
    throw StateError(concat(
        group_->where(), " DDP: the gradient hook of parameter '", names_[index],
        "' fired twice in one backward. A parameter must receive its gradient once per "
        "backward: it is probably used in a reentrant backward (e.g. activation checkpointing "
        "with reentrant autograd) or in two backward passes that overlap. Use non-reentrant "
        "checkpointing, or run such steps under no_sync()."));
  }
  ready_[index] = 1;
  if (recording_order_) ready_order_.push_back(index);
  if (trivial_) return;
  copy_in(index, /*have_grad=*/true);
  auto& bucket = buckets_[slots_[index].bucket];
  if (--bucket.pending == 0) bucket.ready = now;
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0) {
    launch(next_launch_++);
  }
  poll_done();
}

void Reducer::begin_iteration(Clock::time_point now) {
  in_backward_ = true;
  backward_start_ = now;
  recording_order_ = options_.rebuild_buckets && !rebuilt_ && !trivial_;
  if (options_.install_hooks) adapter::queue_backward_callback([this] { finalize(); });
}

void Reducer::copy_in(size_t index, bool have_grad) {
  auto& slot = slots_[index];
  auto& grad = params_[index].mutable_grad();
  if (have_grad) {
    LOCKSTEP_CHECK(grad.defined(), group_->where(), " DDP: parameter '", names_[index],
                   "' was marked ready but has no gradient.");
    LOCKSTEP_CHECK(!grad.is_sparse(), group_->where(), " DDP: parameter '", names_[index],
                   "' has a sparse gradient, which DDP does not reduce. Use a dense gradient "
                   "(e.g. Embedding without sparse=true).");
  }
  if (root_mode_) {  // Note [Reducing into a root]: no copy, the gradient is the input
    auto& input = buckets_[slot.bucket].inputs[slot.position];
    const bool root = group_->rank() == options_.root;
    if (have_grad) {
      input = grad.contiguous();  // the gradient itself when it is contiguous
      if (root) grad = input;
    } else if (root) {
      slot.saved = grad;
      slot.replaced = true;
      grad = at::zeros_like(params_[index], at::MemoryFormat::Contiguous);
      input = grad;
    } else {
      if (!slot.zeros.defined()) {
        slot.zeros = at::zeros_like(params_[index], at::MemoryFormat::Contiguous);
      }
      input = slot.zeros;
    }
    return;
  }
  const double scale = fused_average_ ? 1.0 : inv_world_;
  if (options_.gradient_as_bucket_view) {
    if (same_memory(grad, slot.view)) {
      scale_in_place(slot.view, scale);
    } else if (grad.defined()) {
      // The gradient was (re)created by autograd, e.g. after zero_grad set it to None.
      copy_scaled(slot.view, grad, scale);
      grad = slot.view;
    } else {
      slot.view.zero_();
    }
  } else if (grad.defined()) {
    copy_scaled(slot.view, grad, scale);
  } else {
    slot.view.zero_();
  }
}

void Reducer::launch(size_t b) {
  auto& bucket = buckets_[b];
  bucket.launched = Clock::now();
  GradBucket gb;
  gb.index = b;
  gb.buffer = bucket.buffer;
  gb.gradient_numel = bucket.gradient_numel;
  gb.is_last = b + 1 == buckets_.size();
  if (root_mode_) {
    bucket.work = group_->reduce(bucket.inputs, options_.root, op_);
  } else {
    bucket.work = fused_average_ ? group_->allreduce(bucket.buffer, op_)
                                 : hook_->reduce(*group_, gb);
  }
  LOCKSTEP_ASSERT(bucket.work != nullptr, "comm hook '", hook_->name(), "' returned no Work");
}

void Reducer::poll_done() {
  while (next_done_ < next_launch_ && buckets_[next_done_].work->is_completed()) {
    buckets_[next_done_].done = Clock::now();
    buckets_[next_done_].done_seen = true;
    ++next_done_;
  }
}

void Reducer::finalize() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!in_backward_) {
    // With hooks, finalize runs only after a backward began. Without, the owner calls it
    // after every synchronized forward: a rank that ran no backward still joins every
    // bucket's collective, with every parameter missing (Note [Reducer contract]).
    if (options_.install_hooks || !sync_) return;
    begin_iteration(Clock::now());
  }
  const auto compute_end = Clock::now();

  std::vector<std::pair<size_t, int>> missing;  // (parameter, ranks that missed it)
  if (trivial_) {
    for (size_t i = 0; i < params_.size(); ++i) {
      if (!ready_[i]) missing.emplace_back(i, 1);
    }
  } else {
    // Buckets with parameters that got no gradient here: mark them in the control elements
    // (Note [Bucket control elements]) and launch, in order.
    for (size_t b = next_launch_; b < buckets_.size(); ++b) {
      auto& bucket = buckets_[b];
      if (bucket.pending == 0) continue;
      for (size_t k = 0; k < bucket.params.size(); ++k) {
        size_t i = bucket.params[k];
        if (ready_[i]) continue;
        copy_in(i, /*have_grad=*/false);
        if (root_mode_) {
          bucket.control[static_cast<int64_t>(k)].fill_(1);
          bucket.control_set = true;
        } else {
          bucket.buffer[bucket.gradient_numel + static_cast<int64_t>(k)].fill_(1);
        }
      }
      bucket.pending = 0;
      bucket.ready = compute_end;
    }
    while (next_launch_ < buckets_.size()) launch(next_launch_++);

    std::exception_ptr comm_error;
    for (auto& bucket : buckets_) {
      try {
        bucket.work->wait();
      } catch (...) {
        if (!comm_error) comm_error = std::current_exception();
      }
      if (!bucket.done_seen) bucket.done = Clock::now();
    }
    if (comm_error) {
      reset_iteration();
      std::rethrow_exception(comm_error);
    }
    for (size_t b = 0; b < buckets_.size(); ++b) {
      auto& bucket = buckets_[b];
      // Only the root receives the counts (Note [Reducing into a root]); reset_iteration
      // clears the other ranks' controls.
      if (root_mode_ && group_->rank() != options_.root) continue;
      auto control = root_mode_ ? bucket.control
                                : bucket.buffer.narrow(0, bucket.gradient_numel,
                                                       static_cast<int64_t>(bucket.params.size()));
      auto control_cpu = control.device().is_cpu() ? control : control.cpu();
      auto as_float = control_cpu.scalar_type() == at::kFloat ? control_cpu
                                                               : control_cpu.to(at::kFloat);
      const float* c = as_float.data_ptr<float>();
      const float undo =
          fused_average_ && op_ == ReduceOp::kAvg ? static_cast<float>(world_) : 1.0f;
      bool any = false;
      for (size_t k = 0; k < bucket.params.size(); ++k) {
        const float count = c[k] * undo;  // ranks that missed the parameter
        if (count > 0.5f) {
          missing.emplace_back(bucket.params[k], static_cast<int>(std::lround(count)));
          any = true;
        }
      }
      if (any) control.zero_();
      bucket.control_set = false;
    }
  }
  std::sort(missing.begin(), missing.end());

  if (!missing.empty() && !options_.find_unused_parameters) {
    reset_iteration();
    lock.unlock();
    raise_unused(missing);
  }

  // Write the averages back. A parameter missed by every rank keeps its gradient unchanged.
  if (!trivial_) {
    size_t m = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      while (m < missing.size() && missing[m].first < i) ++m;
      bool everywhere_unused = m < missing.size() && missing[m].first == i &&
                               missing[m].second >= world_;
      if (root_mode_) {
        // The result is in place. A zero stand-in that some rank reduced into stays the
        // gradient; reset_iteration restores the .grad it replaced for one nobody used.
        auto& slot = slots_[i];
        if (slot.replaced && !everywhere_unused) {
          slot.saved = at::Tensor();
          slot.replaced = false;
        }
        continue;
      }
      if (everywhere_unused) continue;
      auto& grad = params_[i].mutable_grad();
      auto& view = slots_[i].view;
      if (options_.gradient_as_bucket_view) {
        if (!same_memory(grad, view)) grad = view;
      } else if (grad.defined() && !same_memory(grad, view)) {
        copy_scaled(grad, view, 1.0);
      } else {
        grad = view.clone();
      }
    }
  }

  // Statistics and trace.
  const auto end = Clock::now();
  DDPStats stats;
  stats.iteration = ++iterations_;
  stats.forward_ms = ms_between(forward_start_, forward_end_);
  stats.backward_compute_ms = ms_between(backward_start_, compute_end);
  stats.exposed_comm_ms = ms_between(compute_end, end);
  if (!buckets_.empty() && !trivial_) {
    stats.comm_ms = ms_between(buckets_.front().launched, buckets_.back().done);
  }
  stats.buckets.reserve(buckets_.size());
  for (size_t b = 0; b < buckets_.size(); ++b) {
    const auto& bucket = buckets_[b];
    BucketStats bs;
    bs.index = b;
    bs.numel = bucket.gradient_numel;
    const auto& first = params_[bucket.params.front()];
    bs.bytes = bucket.gradient_numel * static_cast<int64_t>(first.element_size());
    bs.parameters = bucket.params.size();
    bs.dtype = c10::toString(first.scalar_type());
    bs.transport = trivial_ ? "none (world size 1)" : bucket.transport;
    if (!trivial_) {
      bs.ready_ms = ms_between(backward_start_, bucket.ready);
      bs.launched_ms = ms_between(backward_start_, bucket.launched);
      bs.done_ms = ms_between(backward_start_, bucket.done);
    }
    stats.buckets.push_back(std::move(bs));
  }
  if (trace_) {
    auto it = concat("{\"iteration\":", stats.iteration, "}");
    if (forward_end_ > forward_start_) trace_->span(0, "forward", forward_start_, forward_end_, it);
    trace_->span(0, "backward", backward_start_, compute_end, it);
    trace_->span(0, "wait", compute_end, end, it);
    if (!trivial_) {
      for (size_t b = 0; b < buckets_.size(); ++b) {
        const auto& bucket = buckets_[b];
        trace_->instant(static_cast<int>(b) + 1, "ready", bucket.ready);
        trace_->span(static_cast<int>(b) + 1, hook_->name(), bucket.launched, bucket.done,
                     concat("{\"iteration\":", stats.iteration, ",\"bytes\":",
                            stats.buckets[b].bytes, ",\"transport\":\"",
                            stats.buckets[b].transport, "\"}"));
      }
    }
  }
  last_stats_ = std::move(stats);
  if (recording_order_) rebuild_pending_ = true;
  reset_iteration();
}

void Reducer::reset_iteration() {
  std::fill(ready_.begin(), ready_.end(), 0);
  for (auto& b : buckets_) {
    b.pending = b.params.size();
    b.work.reset();
    b.done_seen = false;
    if (root_mode_) {  // drop this iteration's gradient references; clear the controls
      for (size_t k = 0; k + 1 < b.inputs.size(); ++k) b.inputs[k] = at::Tensor();
      if (b.control_set) b.control.zero_();
      b.control_set = false;
    }
  }
  // Root mode: the .grad a zero stand-in replaced, for a parameter no rank used or after a
  // failure.
  for (size_t i = 0; i < slots_.size(); ++i) {
    auto& slot = slots_[i];
    if (!slot.replaced) continue;
    params_[i].mutable_grad() = slot.saved;
    slot.saved = at::Tensor();
    slot.replaced = false;
  }
  next_launch_ = 0;
  next_done_ = 0;
  in_backward_ = false;
  recording_order_ = false;
}

void Reducer::raise_unused(const std::vector<std::pair<size_t, int>>& missing) {
  std::ostringstream names;
  const size_t shown = std::min<size_t>(missing.size(), 20);
  for (size_t k = 0; k < shown; ++k) {
    if (k) names << ", ";
    names << "'" << names_[missing[k].first] << "' (on " << missing[k].second << " of "
          << world_ << " rank" << (world_ == 1 ? "" : "s") << ")";
  }
  if (shown < missing.size()) names << " and " << missing.size() - shown << " more";
  throw InvalidArgument(concat(
      group_->where(), " DDP: expected every parameter to receive a gradient in each backward, "
      "but ", missing.size(), " parameter(s) got none: ", names.str(),
      ". Part of the model did not contribute to the loss. Turn on "
      "DDPOptions().find_unused_parameters(true) to allow this, or make every parameter take "
      "part in the loss (or freeze it with requires_grad(false) before wrapping)."));
}

void Reducer::record_forward(std::chrono::steady_clock::time_point start,
                             std::chrono::steady_clock::time_point end) {
  std::lock_guard<std::mutex> lock(mutex_);
  forward_start_ = start;
  forward_end_ = end;
}

DDPStats Reducer::last_stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return last_stats_;
}

std::vector<BucketInfo> Reducer::buckets() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<BucketInfo> out;
  for (const auto& b : buckets_) {
    BucketInfo info;
    const auto& first = params_[b.params.front()];
    for (size_t i : b.params) info.parameters.push_back(names_[i]);
    info.numel = b.gradient_numel;
    info.bytes = b.gradient_numel * static_cast<int64_t>(first.element_size());
    info.dtype = c10::toString(first.scalar_type());
    info.device = first.device().str();
    out.push_back(std::move(info));
  }
  return out;
}

std::vector<std::vector<size_t>> Reducer::bucket_indices() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::vector<size_t>> out;
  for (const auto& b : buckets_) out.push_back(b.params);
  return out;
}

void Reducer::flush_trace() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (trace_) trace_->write();
}

}  // namespace ddp
}  // namespace lockstep
