// PowerSGD, int8 quantization, post-local SGD and periodic model averaging
// (lockstep/comm_hooks.h).
#include "lockstep/comm_hooks.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "comm/serial_executor.h"
#include "lockstep/errors.h"

namespace lockstep {

using detail::concat;

namespace {

// Iterations are counted as PyTorch's hooks count them: one per bucket marked is_last.
int64_t count_iteration(std::mutex& mutex, int64_t& iteration, bool is_last) {
  std::lock_guard<std::mutex> lock(mutex);
  const int64_t now = iteration;
  if (is_last) ++iteration;
  return now;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// PowerSGD

// Note [PowerSGD rounds]
// The bucket holds A_r = g_r / W (+ e_r, the error feedback) on rank r, and the hook must
// leave the sum S = sum_r A_r there (Note [Where the average is taken] in reducer.h). For each
// compressed gradient (A viewed as n x m, rank r = min(n, m, matrix_approximation_rank)):
//   1. in reduce(): A += e; P = A Q; round 1 all-reduces, in ONE flat tensor, the
//      uncompressed gradients, the bucket's control elements and every P (sum over ranks);
//   2. in wait(): uncompressed gradients and controls are copied back; P is orthogonalized
//      (modified Gram-Schmidt, the same on every rank since every rank holds the same sum);
//      Q = A^T P; round 2 all-reduces every Q (sum); then A_approx = P Q^T, which is
//      P P^T S: the projection of the sum onto span(P), in the units allreduce_hook leaves;
//   3. error feedback: e_r = A_r - A_approx / W, so that sum_r e_r = S - A_approx is exactly
//      what the approximation lost (PyTorch keeps M_r - approx in unscaled units, the same
//      thing times W); the next iteration adds e_r to A_r before compressing.
// Round 2 needs round 1's result, so it cannot be issued when the bucket is launched; and a
// collective issued from whichever thread happens to observe round 1 complete would land at
// different points of the group's collective sequence on different ranks. So the hook state
// owns a second group, new_group over every rank of the DDP group (collective; made by the
// first compressed reduce(), which every rank reaches at the same point of its sequence), and
// one worker thread. reduce() issues round 1 on the DDP group and queues the bucket's rest on
// the worker, which runs buckets in issue order: wait for round 1, orthogonalize, Q = A^T P,
// all-reduce Q on the second group, wait, write the approximation and the error feedback. On
// each group every rank issues the same collectives in the same order (round 1s in bucket
// order on the DDP group, round 2s in bucket order on the second), so round 2 overlaps the
// rest of backward and the Work completes without anyone calling wait(); wait() only waits.
// A group that cannot build a subgroup (ProcessGroup::make_subgroup not implemented: every
// rank sees the same StateError) falls back to issuing round 2 from wait(), in bucket order
// (CommHook's contract). A non-finite Q (a NaN or Inf gradient
// somewhere) drops that parameter's Q and error so the next iteration starts clean; the NaN
// still reaches the bucket, where DDP's NonFinite policy sees it.

namespace {

struct PowerParam {
  at::Tensor q;      // m x r, warm start
  at::Tensor error;  // n x m, error feedback
  int64_t draws = 0;
};

void orthogonalize(at::Tensor& p, double epsilon) {
  const int64_t cols = p.size(1);
  for (int64_t i = 0; i < cols; ++i) {
    auto col = p.narrow(1, i, 1);
    auto norm = col.norm();
    if (epsilon > 0) {
      col.div_(norm + epsilon);
    } else {
      // An all-zero column stays zero (PyTorch would divide by zero).
      col.div_(at::clamp_min(norm, std::numeric_limits<float>::min()));
    }
    if (i + 1 < cols) {
      auto rest = p.narrow(1, i + 1, cols - i - 1);
      rest.sub_((col * rest).sum(0, /*keepdim=*/true) * col);
    }
  }
}

struct Compressed {
  size_t position;      // in the bucket
  size_t parameter;     // GradBucket::parameter_indices
  int64_t n, m, r;
  int64_t p_offset;     // in round 1
  int64_t q_offset;     // in round 2
  PowerParam* state;
};

}  // namespace

namespace {

// Everything after round 1 of one bucket (Note [PowerSGD rounds], steps 2 and 3).
struct PowerSGDRound2 {
  WorkPtr round1;
  at::Tensor buffer, r1, r2;
  std::vector<at::Tensor> gradients;
  std::vector<Compressed> compressed;
  std::vector<size_t> uncompressed;
  int64_t gradient_numel;
  PowerSGDOptions options;

  // Waits for round 1, all-reduces Q on `group` and writes the bucket and the state.
  void run(ProcessGroup& group, int world) {
    round1->wait();
    at::NoGradGuard no_grad;
    int64_t offset = 0;
    for (size_t k : uncompressed) {
      auto& g = gradients[k];
      g.view({-1}).copy_(r1.narrow(0, offset, g.numel()));
      offset += g.numel();
    }
    const int64_t controls = buffer.numel() - gradient_numel;
    buffer.narrow(0, gradient_numel, controls).copy_(r1.narrow(0, offset, controls));
    std::vector<at::Tensor> ps, qs, ms;
    for (const auto& c : compressed) {
      auto p = r1.narrow(0, c.p_offset, c.n * c.r).view({c.n, c.r});
      orthogonalize(p, options.orthogonalization_epsilon());
      auto q = r2.narrow(0, c.q_offset, c.m * c.r).view({c.m, c.r});
      auto m = gradients[c.position].view({c.n, c.m});
      at::mm_out(q, m.t(), p);
      ps.push_back(p);
      qs.push_back(q);
      ms.push_back(m);
    }
    if (!compressed.empty()) group.allreduce(r2, ReduceOp::kSum)->wait();
    const double inv_world = 1.0 / world;
    for (size_t k = 0; k < compressed.size(); ++k) {
      auto& state = *compressed[k].state;
      auto approx = at::mm(ps[k], qs[k].t());
      if (!at::isfinite(qs[k]).all().item<bool>()) {
        state.q = at::Tensor();
        state.error = at::Tensor();
      } else {
        if (options.use_error_feedback()) {
          if (!state.error.defined()) state.error = at::empty_like(ms[k]);
          at::sub_out(state.error, ms[k], approx, inv_world);
        }
        if (options.warm_start()) state.q.copy_(qs[k]);
      }
      ms[k].copy_(approx);
    }
  }
};

}  // namespace

struct PowerSGDHook::State {
  PowerSGDOptions options;
  std::mutex mutex;
  int64_t iteration = 0;
  std::unordered_map<size_t, PowerParam> params;  // by parameter index; references stay valid
  struct Buffers {
    at::Tensor round1, round2;
  };
  std::vector<Buffers> buckets;  // by bucket index
  // Note [PowerSGD rounds]: the group round 2 runs on, made for `parent`; no worker after a
  // fallback (round 2 then runs on the parent, from wait()).
  const ProcessGroup* parent = nullptr;
  ProcessGroupPtr second;
  std::unique_ptr<comm::SerialExecutor> worker;  // last: its tasks use the members above

  PowerParam& param(size_t index) {
    std::lock_guard<std::mutex> lock(mutex);
    return params[index];
  }

  // Collective over `group` the first time (and whenever DDP's group changes).
  void prepare(ProcessGroup& group) {
    if (parent == &group) return;
    worker.reset();  // finishes the previous group's buckets
    second.reset();
    parent = nullptr;  // set once the second group exists, or is known not to be possible
    std::vector<int> all(group.size());
    for (int r = 0; r < group.size(); ++r) all[r] = r;
    try {
      second = new_group(group, all);
    } catch (const StateError&) {  // on every rank: the transport builds no subgroups
      parent = &group;
      return;
    }
    // Any other failure (a timeout, /dev/shm full) propagates from this reduce(), and the
    // next one tries again instead of silently keeping the wait() fallback.
    parent = &group;
    worker = std::make_unique<comm::SerialExecutor>();
  }
};

namespace {

// The Work of a compressed bucket: the worker's task (Note [PowerSGD rounds]).
class PowerSGDWork : public Work {
 public:
  PowerSGDWork(WorkPtr inner, std::shared_ptr<void> owner)
      : owner_(std::move(owner)), inner_(std::move(inner)) {}
  bool is_completed() override { return inner_->is_completed(); }
  void wait() override { inner_->wait(); }

 private:
  std::shared_ptr<void> owner_;  // the hook's state, which the task points into
  WorkPtr inner_;
};

// The fallback: round 2 on the DDP group, issued by the first wait().
class PowerSGDWaitWork : public Work {
 public:
  PowerSGDWaitWork(ProcessGroup* group, std::shared_ptr<PowerSGDRound2> job,
                   std::shared_ptr<void> owner)
      : owner_(std::move(owner)), group_(group), job_(std::move(job)) {}

  bool is_completed() override { return done_.load(); }

  void wait() override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!done_.load()) {
      try {
        job_->run(*group_, group_->size());
      } catch (...) {
        error_ = std::current_exception();
      }
      done_.store(true);
    }
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::shared_ptr<void> owner_;
  ProcessGroup* group_;
  std::shared_ptr<PowerSGDRound2> job_;
  std::mutex mutex_;
  std::atomic<bool> done_{false};
  std::exception_ptr error_;
};

}  // namespace

PowerSGDHook::PowerSGDHook(PowerSGDOptions options) : state_(std::make_shared<State>()) {
  const auto& o = options;
  LOCKSTEP_CHECK(o.matrix_approximation_rank() >= 1,
                 "PowerSGDOptions: expected matrix_approximation_rank of at least 1, but got ",
                 o.matrix_approximation_rank(), ". Use 1 (the default) or more; a higher rank "
                 "is more accurate and sends more.");
  LOCKSTEP_CHECK(o.start_powersgd_iter() >= 0,
                 "PowerSGDOptions: expected start_powersgd_iter of at least 0, but got ",
                 o.start_powersgd_iter(), ". It counts the iterations reduced exactly before "
                 "compression starts (0: compress from the first).");
  LOCKSTEP_CHECK(o.min_compression_rate() > 0,
                 "PowerSGDOptions: expected a positive min_compression_rate, but got ",
                 o.min_compression_rate(), ". Use e.g. 2 (the default): compress a gradient "
                 "only when that divides its bytes by more than 2.");
  LOCKSTEP_CHECK(o.orthogonalization_epsilon() >= 0,
                 "PowerSGDOptions: expected a non-negative orthogonalization_epsilon, but got ",
                 o.orthogonalization_epsilon(), ". Use 0 (the default) or a small positive "
                 "value such as 1e-8.");
  state_->options = std::move(options);
}

PowerSGDHook::~PowerSGDHook() = default;

const PowerSGDOptions& PowerSGDHook::options() const { return state_->options; }

int64_t PowerSGDHook::iteration() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->iteration;
}

at::Tensor PowerSGDHook::error(size_t parameter_index) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  auto it = state_->params.find(parameter_index);
  return it == state_->params.end() ? at::Tensor() : it->second.error;
}

at::Tensor PowerSGDHook::q(size_t parameter_index) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  auto it = state_->params.find(parameter_index);
  return it == state_->params.end() ? at::Tensor() : it->second.q;
}

WorkPtr PowerSGDHook::reduce(ProcessGroup& group, GradBucket& bucket) {
  auto& s = *state_;
  const auto& o = s.options;
  const int64_t iteration = count_iteration(s.mutex, s.iteration, bucket.is_last);
  if (iteration < o.start_powersgd_iter() || !bucket.buffer.is_floating_point()) {
    return group.allreduce(bucket.buffer, ReduceOp::kSum);
  }
  LOCKSTEP_CHECK(bucket.gradients.size() == bucket.parameter_indices.size() &&
                     !bucket.gradients.empty(),
                 group.where(), " powersgd_hook: bucket ", bucket.index, " has ",
                 bucket.gradients.size(), " gradient views and ", bucket.parameter_indices.size(),
                 " parameter indices; expected one of each per parameter (a GradBucket built "
                 "by DistributedDataParallel has them).");
  s.prepare(group);  // Note [PowerSGD rounds]: collective the first time
  at::NoGradGuard no_grad;
  // Plan: which gradients are compressed, and where each piece lives in the two rounds.
  std::vector<Compressed> compressed;
  std::vector<size_t> uncompressed;
  int64_t uncompressed_numel = 0, p_numel = 0, q_numel = 0;
  for (size_t k = 0; k < bucket.gradients.size(); ++k) {
    const auto& g = bucket.gradients[k];
    if (g.dim() >= 2 && g.numel() > 0) {
      const int64_t n = g.size(0), m = g.numel() / n;
      const int64_t r = std::min({n, m, o.matrix_approximation_rank()});
      if (static_cast<double>(n) * m >
          static_cast<double>(n + m) * r * o.min_compression_rate()) {
        compressed.push_back({k, bucket.parameter_indices[k], n, m, r, 0, q_numel, nullptr});
        q_numel += m * r;
        p_numel += n * r;
        continue;
      }
    }
    uncompressed.push_back(k);
    uncompressed_numel += g.numel();
  }
  const int64_t controls = bucket.buffer.numel() - bucket.gradient_numel;
  const int64_t r1_numel = uncompressed_numel + controls + p_numel;
  if (s.buckets.size() <= bucket.index) s.buckets.resize(bucket.index + 1);
  auto& cache = s.buckets[bucket.index];
  const auto options = bucket.buffer.options();
  if (!cache.round1.defined() || cache.round1.numel() != r1_numel ||
      cache.round1.options().dtype() != options.dtype() ||
      cache.round1.device() != bucket.buffer.device()) {
    cache.round1 = at::empty({r1_numel}, options);
  }
  if (!cache.round2.defined() || cache.round2.numel() != q_numel ||
      cache.round2.options().dtype() != options.dtype() ||
      cache.round2.device() != bucket.buffer.device()) {
    cache.round2 = at::empty({q_numel}, options);
  }
  auto& r1 = cache.round1;
  int64_t offset = 0;
  for (size_t k : uncompressed) {
    const auto& g = bucket.gradients[k];
    r1.narrow(0, offset, g.numel()).copy_(g.reshape({-1}));
    offset += g.numel();
  }
  r1.narrow(0, offset, controls).copy_(bucket.buffer.narrow(0, bucket.gradient_numel, controls));
  offset += controls;
  for (auto& c : compressed) {
    c.p_offset = offset;
    offset += c.n * c.r;
    c.state = &s.param(c.parameter);
    auto& st = *c.state;
    auto m = bucket.gradients[c.position].view({c.n, c.m});
    if (o.use_error_feedback() && st.error.defined()) m.add_(st.error);
    if (!st.q.defined() || !o.warm_start()) {
      auto gen = at::detail::createCPUGenerator(o.random_seed() + 1000003ULL * st.draws +
                                                c.parameter);
      ++st.draws;
      auto q = at::randn({c.m, c.r}, gen, at::TensorOptions().dtype(at::kFloat))
                   .to(options.dtype())
                   .to(bucket.buffer.device());
      orthogonalize(q, o.orthogonalization_epsilon());
      st.q = q;
    }
    auto p = r1.narrow(0, c.p_offset, c.n * c.r).view({c.n, c.r});
    at::mm_out(p, m, st.q);
  }
  auto job = std::make_shared<PowerSGDRound2>(PowerSGDRound2{
      group.allreduce(r1, ReduceOp::kSum), bucket.buffer, r1, cache.round2, bucket.gradients,
      std::move(compressed), std::move(uncompressed), bucket.gradient_numel, o});
  if (!s.worker) return std::make_shared<PowerSGDWaitWork>(&group, std::move(job), state_);
  ProcessGroup* second = s.second.get();
  return std::make_shared<PowerSGDWork>(
      s.worker->post([job, second] { job->run(*second, second->size()); }), state_);
}

std::shared_ptr<PowerSGDHook> powersgd_hook(PowerSGDOptions options) {
  return std::make_shared<PowerSGDHook>(std::move(options));
}

// ---------------------------------------------------------------------------------------------
// int8 quantization

// Note [int8 quantization]
// Gloo sums int8 with wrap-around, so the ranks cannot all-reduce int8 values. Each rank
// instead sends one byte tensor: a float32 header (its scale s_r, then the bucket's C control
// elements as float32) followed by its G gradients as int8 q = round(g / s_r), |q| <= 127.
// One all-gather moves W of them; every rank then computes sum_r q_r * s_r in the bucket's
// dtype in rank order, and sums the controls (small integers: exact). The same inputs and
// the same order give bitwise the same result on every rank. Rounding costs at most s_r / 2
// per element and rank. A rank whose gradients hold a NaN or Inf sends scale NaN and zeros:
// the sum becomes NaN, which DDP's non-finite checks see.

namespace {

class Int8QuantizeHook : public CommHook {
 public:
  std::string name() const override { return "int8"; }

  WorkPtr reduce(ProcessGroup& group, GradBucket& bucket) override {
    if (!bucket.buffer.is_floating_point()) return group.allreduce(bucket.buffer, ReduceOp::kSum);
    at::NoGradGuard no_grad;
    const int world = group.size();
    const int64_t g_numel = bucket.gradient_numel;
    const int64_t controls = bucket.buffer.numel() - g_numel;
    const int64_t header = 4 * (1 + controls);
    if (cache_.size() <= bucket.index) cache_.resize(bucket.index + 1);
    auto& slot = cache_[bucket.index];
    const auto bytes_options = bucket.buffer.options().dtype(at::kByte);
    if (!slot.bytes.defined() || slot.bytes.numel() != header + g_numel ||
        slot.bytes.device() != bucket.buffer.device() ||
        static_cast<int>(slot.gathered.size()) != world) {
      slot.bytes = at::empty({header + g_numel}, bytes_options);
      slot.gathered.clear();
      for (int r = 0; r < world; ++r) slot.gathered.push_back(at::empty_like(slot.bytes));
    }
    auto grads = bucket.buffer.narrow(0, 0, g_numel);
    auto head = slot.bytes.narrow(0, 0, header).view(at::kFloat);
    auto body = slot.bytes.narrow(0, header, g_numel).view(at::kChar);
    const double amax = g_numel > 0 ? grads.abs().max().item<double>() : 0.0;
    float scale = static_cast<float>(amax / 127.0);
    if (!std::isfinite(amax)) {
      scale = std::numeric_limits<float>::quiet_NaN();
      body.zero_();
    } else if (scale == 0.0f) {
      body.zero_();
    } else {
      body.copy_(grads.div(static_cast<double>(scale)).round_().clamp_(-127, 127));
    }
    head.narrow(0, 0, 1).fill_(scale);
    head.narrow(0, 1, controls).copy_(bucket.buffer.narrow(0, g_numel, controls));
    auto work = group.allgather(slot.gathered, slot.bytes);
    std::vector<at::Tensor> parts = slot.gathered;
    at::Tensor out = bucket.buffer;
    return then_work(std::move(work), [out, parts, g_numel, header, controls]() mutable {
      at::NoGradGuard guard;
      auto grads_out = out.narrow(0, 0, g_numel);
      auto controls_out = out.narrow(0, g_numel, controls);
      for (size_t r = 0; r < parts.size(); ++r) {
        auto h = parts[r].narrow(0, 0, header).view(at::kFloat).to(out.scalar_type());
        auto q = parts[r].narrow(0, header, g_numel).view(at::kChar).to(out.scalar_type());
        auto contribution = q.mul_(h.narrow(0, 0, 1));
        if (r == 0) {
          grads_out.copy_(contribution);
          controls_out.copy_(h.narrow(0, 1, controls));
        } else {
          grads_out.add_(contribution);
          controls_out.add_(h.narrow(0, 1, controls));
        }
      }
    });
  }

 private:
  struct Slot {
    at::Tensor bytes;
    std::vector<at::Tensor> gathered;
  };
  std::vector<Slot> cache_;
};

}  // namespace

CommHookPtr int8_quantize_hook() { return std::make_shared<Int8QuantizeHook>(); }

// ---------------------------------------------------------------------------------------------
// Post-local SGD

// Note [Post-local SGD]
// After start_local_sgd_iter the bucket's gradient part, which holds g_r / W, must become
// this rank's own gradient g_r (no subgroup: multiply by W, nothing sent) or the subgroup's
// average (all-reduce over the S ranks of the subgroup, then multiply by W / S). The control
// elements (one per parameter, presence, non-finite) are still all-reduced over the whole
// group in a separate small collective: DDP reads whole-group counts from them (unused
// parameter errors, join, NonFinite). Both collectives are issued in reduce(), in bucket
// order, each on its own group.

namespace {

class PostLocalSGDHook : public CommHook {
 public:
  explicit PostLocalSGDHook(PostLocalSGDOptions options) : options_(std::move(options)) {}
  std::string name() const override { return "post_local_sgd"; }

  WorkPtr reduce(ProcessGroup& group, GradBucket& bucket) override {
    const int64_t iteration = count_iteration(mutex_, iteration_, bucket.is_last);
    if (iteration < options_.start_local_sgd_iter() || !bucket.buffer.is_floating_point()) {
      return group.allreduce(bucket.buffer, ReduceOp::kSum);
    }
    at::NoGradGuard no_grad;
    const int64_t g_numel = bucket.gradient_numel;
    const int64_t controls = bucket.buffer.numel() - g_numel;
    if (cache_.size() <= bucket.index) cache_.resize(bucket.index + 1);
    auto& ctrl = cache_[bucket.index];
    if (!ctrl.defined() || ctrl.numel() != controls ||
        ctrl.device() != bucket.buffer.device() ||
        ctrl.scalar_type() != bucket.buffer.scalar_type()) {
      ctrl = at::empty({controls}, bucket.buffer.options());
    }
    auto controls_in = bucket.buffer.narrow(0, g_numel, controls);
    ctrl.copy_(controls_in);
    std::vector<WorkPtr> works{group.allreduce(ctrl, ReduceOp::kSum)};
    auto grads = bucket.buffer.narrow(0, 0, g_numel);
    const double world = group.size();
    double factor = world;
    const auto& sub = options_.subgroup();
    if (sub && sub->size() > 1) {
      works.push_back(sub->allreduce(grads, ReduceOp::kSum));
      factor = world / sub->size();
    } else {
      grads.mul_(factor);
      factor = 1.0;
    }
    at::Tensor c = ctrl;
    return then_work(std::move(works), [grads, controls_in, c, factor]() mutable {
      at::NoGradGuard guard;
      controls_in.copy_(c);
      if (factor != 1.0) grads.mul_(factor);
    });
  }

 private:
  PostLocalSGDOptions options_;
  std::mutex mutex_;
  int64_t iteration_ = 0;
  std::vector<at::Tensor> cache_;
};

}  // namespace

CommHookPtr post_local_sgd_hook(PostLocalSGDOptions options) {
  LOCKSTEP_CHECK(options.start_local_sgd_iter() >= 0,
                 "PostLocalSGDOptions: expected start_local_sgd_iter of at least 0, but got ",
                 options.start_local_sgd_iter(), ". It counts the iterations reduced over the "
                 "whole group before local SGD starts (0: local from the first).");
  const auto& sub = options.subgroup();
  LOCKSTEP_CHECK(!sub || sub->is_member(), sub ? sub->where() : std::string(),
                 " PostLocalSGDOptions: expected a subgroup this rank belongs to, but this "
                 "rank is not a member of it. Pass each rank the subgroup new_group() returned "
                 "as a member (e.g. the group of its own host), or nullptr for pure local SGD.");
  return std::make_shared<PostLocalSGDHook>(std::move(options));
}

// ---------------------------------------------------------------------------------------------
// PeriodicModelAverager

PeriodicModelAverager::PeriodicModelAverager(ProcessGroupPtr group, int64_t period,
                                             int64_t warmup_steps)
    : group_(std::move(group)), period_(period), warmup_steps_(warmup_steps) {
  LOCKSTEP_CHECK(group_ != nullptr,
                 "PeriodicModelAverager: expected a process group, but got null. Pass the "
                 "group to average over (e.g. the one DDP uses).");
  LOCKSTEP_CHECK(period_ >= 1, group_->where(),
                 " PeriodicModelAverager: expected a period of at least 1 step, but got ",
                 period_, ". Average every `period` optimizer steps, e.g. 4.");
  LOCKSTEP_CHECK(warmup_steps_ >= 0, group_->where(),
                 " PeriodicModelAverager: expected warmup_steps of at least 0, but got ",
                 warmup_steps_, ".");
}

bool PeriodicModelAverager::average_parameters(const std::vector<at::Tensor>& params) {
  const bool due = step_ >= warmup_steps_ && (step_ - warmup_steps_) % period_ == 0;
  ++step_;
  if (!due || group_->size() == 1) return due;
  at::NoGradGuard no_grad;
  // One flat tensor per (dtype, device), in parameter order.
  std::map<std::tuple<int, int, int>, std::vector<at::Tensor>> groups;
  for (const auto& p : params) {
    LOCKSTEP_CHECK(p.defined(), group_->where(),
                   " PeriodicModelAverager: expected defined parameters, but got an undefined "
                   "tensor.");
    groups[{static_cast<int>(p.scalar_type()), static_cast<int>(p.device().type()),
            p.device().index()}]
        .push_back(p);
  }
  const double world = group_->size();
  for (auto& kv : groups) {
    std::vector<at::Tensor> flat_parts;
    for (const auto& p : kv.second) flat_parts.push_back(p.detach().reshape({-1}));
    auto flat = at::cat(flat_parts);
    group_->allreduce(flat, ReduceOp::kSum)->wait();
    flat.div_(world);
    int64_t offset = 0;
    for (const auto& p : kv.second) {
      auto target = p.detach();
      target.copy_(flat.narrow(0, offset, p.numel()).view(p.sizes()));
      offset += p.numel();
    }
  }
  return true;
}

}  // namespace lockstep
