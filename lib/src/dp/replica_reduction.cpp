// DataParallel's gradient reduction: the replicas' gradients summed straight into the
// primary's, piece by piece as backward produces them, by whichever replica thread is idle.
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>

#include "adapter/torch_adapter.h"
#include "dp/grad_reduction.h"
#include "dp/spin_wait.h"
#include "lockstep/errors.h"

namespace lockstep {
namespace dp {

namespace {

using detail::concat;

// Note [DataParallel gradient reduction]
// Replicas live in one address space, so reducing their gradients needs no message: the
// result is a sum of tensors that every thread can read. What costs is memory traffic, and
// the first version (a DDP Reducer per replica over an in-process thread group) paid it
// several times over: autograd's gradient copied (scaled) into each replica's flat bucket,
// the all-reduce summing into replica 0's bucket and copying the sum back into every other
// bucket, the Reducer writing every bucket back into its replica's .grad, and the step
// adding the primary's previous gradient. For the 1.86M-parameter MLP that was about 16 passes
// over its 7.4 MB of gradients per step (10-15% of the step in `perf`). Here the gradients
// autograd produced are the buffers:
//   1. start_step: the primary's previous gradients (`base`, what .grad held) are kept
//      aside and every .grad is undefined, so autograd's AccumulateGrad *steals* each new
//      gradient (no copy).
//   2. Each replica's loss is multiplied by its share n_r / N before backward, so the
//      replicas' gradients only need adding up (no scaling pass).
//   3. A post-hook on every parameter's grad accumulator counts the replicas that produced
//      the gradient; when all replicas with samples did, the parameter's pieces (at most
//      `piece_bytes` each) join the ready queue. Hooks only count and queue: the replica
//      that finished its backward first (or has no samples) takes pieces off the queue while
//      the others still compute, and at the end all of them share what is left, so the
//      largest gradient (usually the first layer's, the last to be ready) is split too.
//   4. The result is base + (g_0 + g_1 + ...), written into the base tensor, so .grad keeps
//      its identity and its memory from step to step (writing it into a new tensor each
//      step and freeing the old one made glibc return and re-fault ~1,300 pages per MLP
//      step). While any backward still runs, a replica may yet fail, and the base must then
//      stay untouched (DataParallel restores it): such a piece only sums the replicas into
//      the primary's new gradient g_0 (one pass), and adds g_0 to the base in a second phase
//      that starts when every backward is over and every first-phase piece is done. A piece
//      run after every backward is over does both in one pass. The sum is evaluated in the
//      same order either way, so the result does not depend on scheduling. Without a base
//      (first step, or .grad set to None) the result is g_0 itself. (An error inside the
//      summing itself after every backward is over, say out of memory on the ATen path,
//      would leave the base partly updated; replicas' failures cannot.)
//   5. A parameter that some replicas with samples gave no gradient (unused in their
//      forward) is summed over those that did, by the last replica to finish backward; one
//      that none did keeps an undefined .grad (DataParallel then restores its base).
//   6. finish() returns when every piece of both phases is done (replica 0's return means
//      the primary's .grad is final); abort() makes it throw instead.
// CUDA replicas take the same path with ATen ops (each piece copied to the primary's device).
class InPlaceReduction : public GradReduction {
 public:
  InPlaceReduction(std::vector<std::vector<at::Tensor>> params, std::vector<std::string> names,
                   const ReductionOptions& options)
      : params_(std::move(params)),
        names_(std::move(names)),
        replicas_(static_cast<int>(params_.size())),
        count_(params_[0].size()),
        wait_(options.spin) {
    // Pieces of every parameter, in order; first_piece_[k] .. first_piece_[k + 1].
    for (size_t k = 0; k < count_; ++k) {
      const auto& p = params_[0][k];
      const int64_t item = static_cast<int64_t>(p.element_size());
      const int64_t per_piece = std::max<int64_t>(1, options.piece_bytes / std::max<int64_t>(item, 1));
      first_piece_.push_back(pieces_.size());
      for (int64_t off = 0; off < p.numel(); off += per_piece) {
        pieces_.push_back({k, off, std::min(per_piece, p.numel() - off)});
      }
    }
    first_piece_.push_back(pieces_.size());
    ready_count_ = std::make_unique<std::atomic<int>[]>(count_);
    in_step_ = std::make_unique<std::atomic<bool>[]>(replicas_);
    seen_.assign(replicas_, std::vector<uint8_t>(count_, 0));
    queue_.reserve(2 * pieces_.size());
    needs_base_.assign(pieces_.size(), 0);
    for (int r = 0; r < replicas_; ++r) {
      in_step_[r] = false;
      for (size_t k = 0; k < count_; ++k) {
        hooks_.push_back(adapter::add_grad_accumulated_hook(params_[r][k], [this, r, k] {
          if (in_step_[r].load(std::memory_order_relaxed)) on_ready(r, k);
        }));
      }
    }
  }

  void start_step(std::vector<at::Tensor> base, std::vector<uint8_t> active) override {
    LOCKSTEP_ASSERT(base.size() == count_ && active.size() == static_cast<size_t>(replicas_));
    base_ = std::move(base);
    active_ = std::move(active);
    active_count_ = static_cast<int>(std::count(active_.begin(), active_.end(), 1));
    for (size_t k = 0; k < count_; ++k) ready_count_[k].store(0, std::memory_order_relaxed);
    for (auto& s : seen_) std::fill(s.begin(), s.end(), 0);
    {
      std::lock_guard<std::mutex> lock(queue_mutex_);
      queue_.clear();
      head_ = 0;
    }
    queued_.store(0, std::memory_order_relaxed);
    claimed_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    finished_.store(0, std::memory_order_relaxed);
    complete_.store(false, std::memory_order_relaxed);
    second_phase_.store(false, std::memory_order_relaxed);
    std::fill(needs_base_.begin(), needs_base_.end(), 0);
    aborted_.store(false, std::memory_order_relaxed);
    abort_reason_.clear();
    // The replica threads are started after this returns (a release/acquire hand-off).
  }

  double prepare(int r, double weight) override {
    in_step_[r].store(true, std::memory_order_relaxed);
    return weight;
  }

  void finish(int r) override {
    in_step_[r].store(false, std::memory_order_relaxed);
    if (finished_.fetch_add(1, std::memory_order_acq_rel) + 1 == replicas_) {
      // Every backward is over: gradients that some replicas did not produce (step 5).
      for (size_t k = 0; k < count_; ++k) {
        const int n = ready_count_[k].load(std::memory_order_acquire);
        if (n > 0 && n < active_count_) reduce_partial(k);
      }
      complete_.store(true, std::memory_order_release);
      wait_.notify();
    }
    while (true) {
      if (aborted_.load(std::memory_order_acquire)) {
        std::lock_guard<std::mutex> lock(queue_mutex_);
        throw CommError(concat("DataParallel gradient reduction aborted: ", abort_reason_));
      }
      int entry = claim();
      if (entry >= 0) {
        run(entry);
        done_.fetch_add(1, std::memory_order_acq_rel);
        if (first_phase_done()) wait_.notify();
        continue;
      }
      const bool second = second_phase_.load(std::memory_order_acquire);  // before queued_
      if (first_phase_done()) {
        if (second) return;
        queue_second_phase();
        continue;
      }
      wait_.wait([&] {
        return aborted_.load(std::memory_order_acquire) || first_phase_done() ||
               queued_.load(std::memory_order_acquire) > claimed_.load(std::memory_order_acquire);
      });
    }
  }

  void abort(const std::string& reason) override {
    {
      std::lock_guard<std::mutex> lock(queue_mutex_);
      if (abort_reason_.empty()) abort_reason_ = reason;
    }
    aborted_.store(true, std::memory_order_release);
    wait_.notify();
  }

 private:
  struct Piece {
    size_t param;
    int64_t offset;
    int64_t numel;
  };

  // Every backward is over and every queued piece done (then the second phase may start;
  // after it, the same condition means the reduction is complete).
  bool first_phase_done() const {
    return complete_.load(std::memory_order_acquire) &&
           done_.load(std::memory_order_acquire) == queued_.load(std::memory_order_acquire);
  }

  // Step 4's second phase: base += g_0 for the pieces the first phase left without the base.
  void queue_second_phase() {
    std::lock_guard<std::mutex> lock(queue_mutex_);
    if (second_phase_.load(std::memory_order_relaxed)) return;
    const int offset = static_cast<int>(pieces_.size());
    for (size_t p = 0; p < pieces_.size(); ++p) {
      if (needs_base_[p]) queue_.push_back(offset + static_cast<int>(p));
    }
    queued_.store(static_cast<int64_t>(queue_.size()), std::memory_order_release);
    second_phase_.store(true, std::memory_order_release);
    wait_.notify();
  }

  // Step 3, on replica r's backward thread.
  void on_ready(int r, size_t k) {
    if (seen_[r][k]) {
      throw StateError(concat(
          "DataParallel: the gradient of parameter '", names_[k], "' on replica ", r,
          " was accumulated twice in one backward. A parameter must receive its gradient "
          "once per step: it is probably used in a reentrant backward (e.g. activation "
          "checkpointing with reentrant autograd)."));
    }
    seen_[r][k] = 1;
    if (ready_count_[k].fetch_add(1, std::memory_order_acq_rel) + 1 != active_count_) return;
    {
      std::lock_guard<std::mutex> lock(queue_mutex_);
      for (size_t p = first_piece_[k]; p < first_piece_[k + 1]; ++p) {
        queue_.push_back(static_cast<int>(p));
      }
      queued_.store(static_cast<int64_t>(queue_.size()), std::memory_order_release);
    }
    wait_.notify();
  }

  int claim() {
    std::lock_guard<std::mutex> lock(queue_mutex_);
    if (head_ >= queue_.size()) return -1;
    claimed_.store(static_cast<int64_t>(head_ + 1), std::memory_order_release);
    return queue_[head_++];
  }

  // Step 4 for queue entry `entry`: piece `entry` of a parameter every active replica
  // produced a gradient for, or (entry >= pieces) the second phase of piece entry - pieces.
  void run(int entry) {
    const bool second = entry >= static_cast<int>(pieces_.size());
    const Piece& piece = pieces_[second ? entry - pieces_.size() : entry];
    const size_t k = piece.param;
    const at::Tensor& g0 = params_[0][k].grad();
    const at::Tensor& base = base_[k];
    LOCKSTEP_ASSERT(g0.defined(), "primary gradient of '", names_[k], "' missing");
    if (second) return add_pieces(base, {g0}, piece);
    std::vector<at::Tensor> others;
    for (int r = 1; r < replicas_; ++r) {
      if (active_[r]) others.push_back(params_[r][k].grad());
    }
    if (!base.defined()) return add_pieces(g0, others, piece);
    // Every backward is over: no replica can fail any more, the base may be written now.
    const bool final = finished_.load(std::memory_order_acquire) == replicas_;
    if (!final) {
      add_pieces(g0, others, piece);
      needs_base_[entry] = 1;
      return;
    }
    if (others.size() == 1) return add_pieces(base, {g0, others[0]}, piece);  // one pass
    add_pieces(g0, others, piece);
    add_pieces(base, {g0}, piece);
  }

  static bool cpu_dense(const at::Tensor& t, const at::Tensor& like) {
    return t.defined() && t.device().is_cpu() && t.is_contiguous() &&
           t.scalar_type() == like.scalar_type() && t.numel() == like.numel() &&
           (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
  }

  // dst[piece] += (g[piece] + ...), summing `from` left to right.
  static void add_pieces(const at::Tensor& dst, const std::vector<at::Tensor>& from, const Piece& piece) {
    if (from.empty()) return;
    bool fast = cpu_dense(dst, dst);
    for (const auto& g : from) fast = fast && cpu_dense(g, dst);
    if (fast && dst.scalar_type() == at::kFloat) return add_loop<float>(dst, from, piece);
    if (fast) return add_loop<double>(dst, from, piece);
    LOCKSTEP_ASSERT(dst.is_contiguous(), "a gradient is not contiguous");
    auto slice = [&](const at::Tensor& t) {
      return t.reshape({-1}).narrow(0, piece.offset, piece.numel);
    };
    auto d = slice(dst);  // a view: add_ writes dst
    if (from.size() == 1) {
      d.add_(slice(from[0]).to(d.device()));
      return;
    }
    auto sum = slice(from[0]).to(d.device(), /*non_blocking=*/false, /*copy=*/true);
    for (size_t i = 1; i < from.size(); ++i) sum.add_(slice(from[i]).to(d.device()));
    d.add_(sum);
  }

  template <typename T>
  static void add_loop(const at::Tensor& dst, const std::vector<at::Tensor>& from, const Piece& piece) {
    T* d = dst.data_ptr<T>() + piece.offset;
    const int64_t n = piece.numel;
    if (from.size() == 1) {
      const T* a = from[0].data_ptr<T>() + piece.offset;
      for (int64_t i = 0; i < n; ++i) d[i] += a[i];
      return;
    }
    // dst += (a + b + ...): the piece is small enough to stay in cache between passes.
    const T* a = from[0].data_ptr<T>() + piece.offset;
    const T* b = from[1].data_ptr<T>() + piece.offset;
    if (from.size() == 2) {
      for (int64_t i = 0; i < n; ++i) d[i] += a[i] + b[i];
      return;
    }
    std::vector<T> sum(a, a + n);
    for (size_t j = 1; j < from.size(); ++j) {
      const T* g = from[j].data_ptr<T>() + piece.offset;
      for (int64_t i = 0; i < n; ++i) sum[i] += g[i];
    }
    for (int64_t i = 0; i < n; ++i) d[i] += sum[i];
  }

  // Step 5: the sum over the replicas that produced parameter k's gradient (rare; whole
  // parameter, on the last replica to finish backward, when no replica can fail any more).
  void reduce_partial(size_t k) {
    at::NoGradGuard no_grad;
    const auto device = params_[0][k].device();
    at::Tensor sum;
    auto add = [&](const at::Tensor& g) {
      if (!g.defined()) return;
      sum = sum.defined() ? sum.add_(g.to(device)) : g.to(device, /*non_blocking=*/false, /*copy=*/true);
    };
    add(params_[0][k].grad());
    for (int r = 1; r < replicas_; ++r) {
      if (active_[r]) add(params_[r][k].grad());
    }
    if (base_[k].defined()) {
      base_[k].add_(sum);
      params_[0][k].mutable_grad() = base_[k];
    } else {
      params_[0][k].mutable_grad() = sum;
    }
  }

  std::vector<std::vector<at::Tensor>> params_;
  std::vector<std::string> names_;
  const int replicas_;
  const size_t count_;
  std::vector<Piece> pieces_;
  std::vector<size_t> first_piece_;

  // Per step.
  std::vector<at::Tensor> base_;
  std::vector<uint8_t> active_;
  int active_count_ = 0;
  std::unique_ptr<std::atomic<int>[]> ready_count_;   // per parameter: replicas that produced it
  std::unique_ptr<std::atomic<bool>[]> in_step_;      // per replica: its hooks count
  std::vector<std::vector<uint8_t>> seen_;            // [replica][parameter], replica's thread only
  std::mutex queue_mutex_;
  std::vector<int> queue_;                            // ready pieces, in readiness order
  size_t head_ = 0;                                   // next piece to claim
  std::atomic<int64_t> queued_{0}, claimed_{0}, done_{0};
  std::atomic<int> finished_{0};
  std::atomic<bool> complete_{false};  // every backward over, partial parameters reduced
  std::atomic<bool> second_phase_{false};  // step 4's second phase queued
  std::vector<uint8_t> needs_base_;    // per piece: first phase left the base to the second
  std::atomic<bool> aborted_{false};
  std::string abort_reason_;           // under queue_mutex_
  SpinWait wait_;
  std::vector<adapter::HookHandle> hooks_;  // last member: removed first
};

}  // namespace

std::unique_ptr<GradReduction> make_replica_reduction(std::vector<std::vector<at::Tensor>> params,
                                                      std::vector<std::string> names,
                                                      const ReductionOptions& options) {
  LOCKSTEP_ASSERT(!params.empty());
  return std::make_unique<InPlaceReduction>(std::move(params), std::move(names), options);
}

}  // namespace dp
}  // namespace lockstep
