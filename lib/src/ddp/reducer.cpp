// See Note [Reducer contract] in reducer.h.
#include "ddp/reducer.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <unordered_map>

#include "adapter/torch_adapter.h"
#include "ddp/bucket_planner.h"
#include "ddp/trace.h"
#include "lockstep/errors.h"
#include "lockstep/log.h"

namespace lockstep {
namespace ddp {

using detail::concat;

namespace {

double ms_between(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// One word from every rank, in rank order: the rare agreement steps of Note [Join] and
// Note [Non-finite gradients]. At world size 1 no collective runs.
std::vector<int64_t> allgather_word(ProcessGroup& group, int64_t mine) {
  if (group.size() == 1) return {mine};
  auto word = at::full({1}, mine, at::kLong);
  std::vector<at::Tensor> words;
  for (int r = 0; r < group.size(); ++r) words.push_back(at::empty({1}, at::kLong));
  group.allgather(words, word)->wait();
  std::vector<int64_t> out;
  for (const auto& w : words) out.push_back(w.item<int64_t>());
  return out;
}

}  // namespace

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
  present_ = world_;
  fired_.assign(params_.size(), 0);
  for (int r = 0; r < world_; ++r) authority_.push_back(r);
  LOCKSTEP_CHECK(options_.root < world_, group_->where(), " Expected the Reducer's root to be "
                 "-1 (all-reduce) or a rank below ", world_, ", but got ", options_.root, ".");
  hook_ = options_.comm_hook ? options_.comm_hook : allreduce_hook();
  trivial_ = world_ == 1 && !options_.comm_hook;
  BucketContext context;
  context.params = &params_;
  context.names = &names_;
  context.group = group_.get();
  context.options = &options_;
  context.hook = hook_.get();
  context.world = world_;
  auto strategy = options_.root >= 0 ? make_root_lists(context) : make_flat_buckets(context);
  if (!trivial_) strategy_ = std::move(strategy);  // nothing is communicated: no buckets
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
    for (size_t k = 0; k < bucket.params.size(); ++k) {
      bucket.gradient_numel += params_[bucket.params[k]].numel();
      slots[bucket.params[k]] = {b, k};
    }
    bucket.pending = bucket.params.size();
  }
  if (strategy_) {
    auto transports = strategy_->build(plan);
    for (size_t b = 0; b < plan.size(); ++b) buckets[b].transport = transports[b];
  }
  buckets_ = std::move(buckets);
  slots_ = std::move(slots);
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
  bool complete = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    complete = mark_ready_locked(index);
  }
  if (complete) finalize();  // Note [Static graph]: the last expected firing ends the iteration
}

bool Reducer::mark_ready_locked(size_t index) {
  if (!sync_) return false;
  LOCKSTEP_ASSERT(index < params_.size(), "parameter index ", index, " out of range");
  auto now = Clock::now();
  if (!in_backward_) {
    begin_iteration(now, options_.install_hooks);
    if (options_.static_graph) {
      std::fill(fired_.begin(), fired_.end(), 0);
      remaining_firings_ = expected_total_;
    }
  }
  if (options_.static_graph) {
    const int fired = ++fired_[index];
    if (fired == 1 && recording_order_) ready_order_.push_back(index);
    if (!static_known_) return false;  // first iteration: count; finalize() marks the ready
    if (fired > expected_[index]) {
      throw StateError(concat(
          group_->where(), " DDP static_graph: the gradient hook of parameter '", names_[index],
          "' fired ", fired, " times in this backward but ", expected_[index], " times in the "
          "first one. With static_graph(true) every iteration must use each parameter the "
          "same number of times; turn it off if the graph changes."));
    }
    --remaining_firings_;
    if (fired < expected_[index]) return false;  // more gradient to come for it
  } else if (ready_[index]) {
    throw StateError(concat(
        group_->where(), " DDP: the gradient hook of parameter '", names_[index],
        "' fired twice in one backward. A parameter must receive its gradient once per "
        "backward: it is probably used in a reentrant backward (e.g. activation checkpointing "
        "with reentrant autograd) or in two backward passes that overlap. If every iteration "
        "uses it the same number of times, use DDPOptions().static_graph(true); otherwise use "
        "non-reentrant checkpointing, or run such steps under no_sync()."));
  }
  make_ready(index, now);
  return options_.static_graph && static_known_ && remaining_firings_ == 0;
}

// Parameter `index`'s gradient is final: into its bucket, and launch what is complete.
void Reducer::make_ready(size_t index, Clock::time_point now) {
  ready_[index] = 1;
  if (recording_order_ && !options_.static_graph) ready_order_.push_back(index);
  if (options_.nonfinite != NonFinite::kOff && !all_finite(params_[index].grad())) {
    if (first_bad_local_ < 0) first_bad_local_ = static_cast<int64_t>(index);
    if (!trivial_) strategy_->mark_nonfinite(slots_[index].bucket);
  }
  if (trivial_) return;
  check_gradient(index);
  strategy_->copy_in(index, /*have_grad=*/true);
  auto& bucket = buckets_[slots_[index].bucket];
  if (--bucket.pending == 0) bucket.ready = now;
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0) {
    launch(next_launch_++);
  }
  poll_done();
}

void Reducer::begin_iteration(Clock::time_point now, bool queue_callback) {
  in_backward_ = true;
  backward_start_ = now;
  recording_order_ = options_.rebuild_buckets && !rebuilt_ && !trivial_;
  if (queue_callback) adapter::queue_backward_callback([this] { finalize(); });
}

void Reducer::check_gradient(size_t index) {
  const auto& grad = params_[index].grad();
  LOCKSTEP_CHECK(grad.defined(), group_->where(), " DDP: parameter '", names_[index],
                 "' was marked ready but has no gradient.");
  LOCKSTEP_CHECK(!grad.is_sparse(), group_->where(), " DDP: parameter '", names_[index],
                 "' has a sparse gradient, which DDP does not reduce. Use a dense gradient "
                 "(e.g. Embedding without sparse=true).");
}

void Reducer::launch(size_t b) {
  auto& bucket = buckets_[b];
  bucket.launched = Clock::now();
  bucket.work = strategy_->launch(b, /*is_last=*/b + 1 == buckets_.size());
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
    begin_iteration(Clock::now(), /*queue_callback=*/false);
  }
  if (options_.static_graph) {
    if (static_known_ && remaining_firings_ > 0 && options_.install_hooks) {
      // The end of a reentrant backward inside this one (Note [Static graph]): more
      // firings are due; the last one finalizes.
      return;
    }
    if (!static_known_) {
      // First iteration: every parameter whose hook fired is final now.
      const auto now = Clock::now();
      for (size_t i = 0; i < params_.size(); ++i) {
        if (fired_[i] > 0) make_ready(i, now);
      }
      expected_ = fired_;
      expected_total_ = 0;
      for (int f : expected_) expected_total_ += f;
      static_known_ = true;
    }
  }
  const auto compute_end = Clock::now();
  if (!trivial_) {
    launch_remaining(compute_end);
    wait_for_buckets();
  }
  const Agreement a = agree(lock, [] {});
  write_back(a.missing, a.present, a.scale);
  record_statistics(compute_end);
  if (recording_order_) rebuild_pending_ = true;
  reset_iteration();
}

// After the buckets are reduced, what every rank decides alike from them, in finalize() and
// in a joined rank's shadow_iteration(): the missing parameters, the present ranks and the
// scale (Note [Join]), the non-finite check (Note [Non-finite gradients]) and the
// unused-parameter error. On an error every rank raises the same one, after `restore` and
// reset_iteration(), with the lock released.
Reducer::Agreement Reducer::agree(std::unique_lock<std::mutex>& lock,
                                  const std::function<void()>& restore) {
  Agreement a;
  a.present = world_;
  try {
    a.missing = trivial_ ? missing_locally() : collect_missing();
    if (!trivial_) a.present = update_presence();
    if (a.present > 0 && a.present < world_ && options_.average &&
        !join_options_.divide_by_initial_world_size()) {
      a.scale = static_cast<double>(world_) / a.present;  // Note [Join]
    }
    check_nonfinite(&a.scale);
  } catch (...) {
    restore();
    reset_iteration();
    throw;
  }
  restore();
  if (unused_is_error(a.missing)) {
    reset_iteration();
    lock.unlock();
    raise_unused(a.missing);
  }
  return a;
}

// Parameters some rank got no gradient for are an error unless find_unused_parameters or
// static_graph (Note [Static graph]) allows them. Every rank decides from the same counts.
bool Reducer::unused_is_error(const Missing& missing) const {
  return !missing.empty() && !options_.find_unused_parameters && !options_.static_graph;
}

Reducer::Missing Reducer::missing_locally() const {
  Missing missing;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!ready_[i]) missing.emplace_back(i, 1);
  }
  return missing;
}

// Buckets with parameters that got no gradient here: mark them in the control elements
// (Note [Bucket control elements]) and launch every bucket not launched yet, in order.
void Reducer::launch_remaining(Clock::time_point compute_end) {
  for (size_t b = next_launch_; b < buckets_.size(); ++b) {
    auto& bucket = buckets_[b];
    if (bucket.pending == 0) continue;
    for (size_t k = 0; k < bucket.params.size(); ++k) {
      size_t i = bucket.params[k];
      if (ready_[i]) continue;
      strategy_->copy_in(i, /*have_grad=*/false);
      strategy_->mark_missing(b, k);
    }
    bucket.pending = 0;
    bucket.ready = compute_end;
  }
  while (next_launch_ < buckets_.size()) launch(next_launch_++);
}

// Waits for every bucket; after a failure, drops the iteration and rethrows the first one.
void Reducer::wait_for_buckets() {
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
}

Reducer::Missing Reducer::collect_missing() {
  Missing missing;
  for (size_t b = 0; b < buckets_.size(); ++b) strategy_->read_missing(b, missing);
  std::sort(missing.begin(), missing.end());
  return missing;
}

// Writes the reduced gradients back, multiplied by `scale` (Note [Join], Note [Non-finite
// gradients]). A parameter missed by every present rank keeps its gradient.
void Reducer::write_back(const Missing& missing, int present, double scale) {
  const bool rescale = scale != 1.0;
  size_t m = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    while (m < missing.size() && missing[m].first < i) ++m;
    const bool unused_everywhere =
        m < missing.size() && missing[m].first == i && missing[m].second >= present;
    if (!trivial_) {
      strategy_->write_back(i, unused_everywhere, scale);
    } else if (rescale && !unused_everywhere && params_[i].grad().defined()) {
      params_[i].mutable_grad().mul_(scale);
    }
  }
}

bool Reducer::all_finite(const at::Tensor& t) const {
  if (!t.defined() || !t.is_floating_point()) return true;
  if (t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == at::kFloat) {
    const float* p = t.data_ptr<float>();
    const int64_t n = t.numel();
    bool ok = true;
    for (int64_t i = 0; i < n; ++i) ok &= std::isfinite(p[i]);
    return ok;
  }
  return t.isfinite().all().item<bool>();
}

// Note [Non-finite gradients]: after the reduction, the same decision on every rank.
void Reducer::check_nonfinite(double* scale) {
  last_nonfinite_ = false;
  grad_norm_ = -1;
  const bool policy = options_.nonfinite != NonFinite::kOff;
  const bool clip = options_.max_grad_norm > 0;
  if (!policy && !clip) return;
  int marked = 0;
  if (trivial_) {
    marked = first_bad_local_ >= 0 ? 1 : 0;
  } else {
    for (size_t b = 0; b < buckets_.size(); ++b) marked += strategy_->read_nonfinite(b);
  }
  double norm = 0;
  if (clip) {
    double squares = 0;
    if (trivial_) {
      for (const auto& p : params_) {
        const auto& g = p.grad();
        if (g.defined()) squares += g.to(at::kDouble).pow(2).sum().item<double>();
      }
    } else {
      for (size_t b = 0; b < buckets_.size(); ++b) squares += strategy_->squared_norm(b);
    }
    norm = std::sqrt(squares) * *scale;
    grad_norm_ = norm;
  }
  if (marked == 0 && std::isfinite(norm)) {
    if (clip) {
      const double coefficient = options_.max_grad_norm / (norm + 1e-6);
      if (coefficient < 1.0) *scale *= coefficient;
    }
    return;
  }
  last_nonfinite_ = true;
  if (!policy) return;  // kOff: no clipping of non-finite gradients, nothing else
  const std::vector<int64_t> first = allgather_word(*group_, first_bad_local_);
  std::ostringstream origin;
  int shown = 0;
  for (int r = 0; r < world_; ++r) {
    if (first[r] < 0 || first[r] >= static_cast<int64_t>(params_.size())) continue;
    origin << (shown++ ? ", " : "") << "rank " << r << " parameter '" << names_[first[r]] << "'";
  }
  const std::string where_from =
      shown > 0 ? concat("began on ", origin.str())
                : concat("every rank's local gradients were finite: the reduced gradients "
                         "overflowed (norm ", norm, ")");
  const int64_t iteration = iterations_ + 1;
  if (options_.nonfinite == NonFinite::kAbort) {
    throw NonFiniteError(concat(
        group_->where(), " DDP: non-finite (NaN or Inf) gradient at iteration ", iteration, ": ",
        where_from, ". DDPOptions::nonfinite is kAbort, so every rank stops here. Check that "
        "rank's inputs and loss (e.g. a NaN in the data, a log of 0, a learning rate too "
        "high), or use NonFinite::kSkip to skip such steps."));
  }
  if (group_->rank() == 0) {
    log_warn(concat(group_->where(), " DDP: non-finite (NaN or Inf) gradient at iteration ",
                    iteration, ": ", where_from, "; every rank skips this optimizer step "
                    "(NonFinite::kSkip)."));
  }
}

bool Reducer::last_nonfinite() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return last_nonfinite_;
}

// Note [Join]: reads the count of present ranks from the reduced buckets. When it changed,
// every rank allgathers one word: present, inside a join, and the join options; then every
// rank raises the same error if a present rank is not inside a join, if the ranks' join
// options differ, or if they asked to stop at the first rank that runs out.
int Reducer::update_presence() {
  if (buckets_.empty()) return world_;
  const int present = strategy_->read_present(0);
  LOCKSTEP_ASSERT(present >= 0 && present <= world_, "presence count ", present,
                  " out of range");
  if (present == present_) return present;
  present_ = present;
  presence_changed_at_ = iterations_ + 1;
  if (present == world_ || present == 0) return present;  // nobody, or everybody, joined

  enum : int { kPresent = 1, kInJoin = 2, kThrow = 4, kDivideInitial = 8 };
  const int mine = (joined_ ? 0 : kPresent) | (join_enabled_ ? kInJoin : 0) |
                   (join_options_.throw_on_early_termination() ? kThrow : 0) |
                   (join_options_.divide_by_initial_world_size() ? kDivideInitial : 0);
  const std::vector<int64_t> words = allgather_word(*group_, mine);
  std::vector<int> flags(world_), now, joined, outside;
  for (int r = 0; r < world_; ++r) {
    flags[r] = static_cast<int>(words[r]);
    ((flags[r] & kPresent) ? now : joined).push_back(r);
    if (!(flags[r] & kInJoin)) outside.push_back(r);
  }
  LOCKSTEP_ASSERT(static_cast<int>(now.size()) == present, "presence flags (", now.size(),
                  ") disagree with the presence count (", present, ")");
  authority_ = now;
  auto list = [](const std::vector<int>& ranks) {
    std::ostringstream os;
    for (size_t k = 0; k < ranks.size(); ++k) os << (k ? ", " : "") << ranks[k];
    return os.str();
  };
  if (!outside.empty()) {
    throw StateError(concat(
        group_->where(), " DDP: rank(s) ", list(joined), " ran out of inputs and joined at "
        "iteration ", presence_changed_at_, ", but rank(s) ", list(outside), " are not inside "
        "ddp->join(). Uneven inputs need the join guard on every rank: "
        "`auto join = ddp->join();` before the training loop."));
  }
  for (int r = 1; r < world_; ++r) {
    if ((flags[r] & (kThrow | kDivideInitial)) != (flags[0] & (kThrow | kDivideInitial))) {
      auto describe = [&](int f) {
        return concat("throw_on_early_termination=", (f & kThrow) ? "true" : "false",
                      ", divide_by_initial_world_size=", (f & kDivideInitial) ? "true" : "false");
      };
      throw InvalidArgument(concat(
          group_->where(), " DDP join: the ranks' JoinOptions differ: rank 0 has ",
          describe(flags[0]), " but rank ", r, " has ", describe(flags[r]),
          ". Pass the same JoinOptions to ddp->join() on every rank."));
    }
  }
  if (flags[0] & kThrow) {
    throw StateError(concat(
        group_->where(), " DDP join: rank(s) ", list(joined), " ran out of inputs at iteration ",
        presence_changed_at_, " while rank(s) ", list(now), " still had data; "
        "throw_on_early_termination is set, so every rank stops here. Give every rank the same "
        "number of batches (e.g. drop_last in the sampler), or leave "
        "JoinOptions::throw_on_early_termination off to let the others continue."));
  }
  return present;
}

void Reducer::set_join(bool enabled, JoinOptions options) {
  std::lock_guard<std::mutex> lock(mutex_);
  LOCKSTEP_CHECK(!enabled || options_.root < 0, group_->where(),
                 " Join needs a Reducer that all-reduces (DistributedDataParallel).");
  join_enabled_ = enabled;
  join_options_ = options;
  if (!enabled) joined_ = false;
}

int Reducer::shadow_iteration() {
  std::unique_lock<std::mutex> lock(mutex_);
  LOCKSTEP_CHECK(join_enabled_, group_->where(), " DDP: shadow_iteration outside a join.");
  LOCKSTEP_CHECK(!in_backward_, group_->where(), " DDP join: finish() was called while a "
                 "backward was running; call it after the training loop.");
  if (trivial_) return 0;
  joined_ = true;
  begin_iteration(Clock::now(), /*queue_callback=*/false);
  strategy_->set_present(false);
  const auto restore = [this] { strategy_->set_present(true); };
  try {
    for (size_t b = 0; b < buckets_.size(); ++b) {
      strategy_->fill_absent(b);
      buckets_[b].pending = 0;
    }
    while (next_launch_ < buckets_.size()) launch(next_launch_++);
    wait_for_buckets();
  } catch (...) {
    restore();
    reset_iteration();
    throw;
  }
  const Agreement a = agree(lock, restore);  // the same decisions as the present ranks'
  ++iterations_;  // iterations agree across ranks (Note [Join])
  if (recording_order_) rebuild_pending_ = true;
  reset_iteration();
  return a.present;
}

int Reducer::authoritative_rank() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return authority_.back();
}

void Reducer::record_statistics(Clock::time_point compute_end) {
  const auto end = Clock::now();
  DDPStats stats;
  stats.iteration = ++iterations_;
  stats.forward_ms = ms_between(forward_start_, forward_end_);
  stats.backward_compute_ms = ms_between(backward_start_, compute_end);
  stats.exposed_comm_ms = ms_between(compute_end, end);
  stats.grad_norm = grad_norm_;
  stats.nonfinite = last_nonfinite_;
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
}

void Reducer::reset_iteration() {
  std::fill(ready_.begin(), ready_.end(), 0);
  first_bad_local_ = -1;
  for (auto& b : buckets_) {
    b.pending = b.params.size();
    b.work.reset();
    b.done_seen = false;
  }
  if (strategy_) strategy_->reset();
  next_launch_ = 0;
  next_done_ = 0;
  in_backward_ = false;
  recording_order_ = false;
}

void Reducer::raise_unused(const Missing& missing) {
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
