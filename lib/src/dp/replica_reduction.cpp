// DataParallel's gradient reduction: one DDP Reducer per replica over an in-process thread
// group, reducing into the primary (replica 0).
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>

#include "adapter/torch_adapter.h"
#include "ddp/reducer.h"
#include "dp/grad_reduction.h"
#include "core/spin_wait.h"
#include "lockstep/errors.h"
#include "lockstep/thread_group.h"

namespace lockstep {
namespace dp {

namespace {

using detail::concat;

// Note [DataParallel gradient reduction]
// Replica r owns a ddp::Reducer over rank r of a thread group (Note [Thread group protocol]),
// so DataParallel reduces with DDP's machinery: readiness hooks, buckets launched in order
// while backward runs, the one-time rebuild in replica 0's gradient order, control elements
// for unused parameters, statistics. The Reducers reduce into replica 0 (Note [Reducing into
// a root] in ddp/reducer.h): a bucket is the list of the replicas' own gradients, and the
// thread group sums every replica's slice straight into replica 0's gradient, in replica
// order, with no flat buffer and no copy in or out. In one address space that is what
// matters: the first version (flat buckets, all-reduce, write-back into every replica's
// .grad) cost ~16 passes over the gradients per step; this one costs about 6 (the sum, and
// the base below). Around the Reducers:
//   1. start_step: the primary's gradients from before the step (`base`, what .grad held)
//      are kept aside and every .grad is undefined, so autograd's AccumulateGrad *steals*
//      each new gradient (no copy), and a failed step can leave .grad as it was.
//   2. Each replica's loss is multiplied by its share n_r / N before backward, and the
//      Reducers sum (average off): the result is the gradient of the whole batch's mean loss.
//   3. DataParallel's own hooks call mark_ready only while a step runs on that replica (the
//      Reducers run with install_hooks = false), so a backward() the user runs through the
//      primary outside train_step is not reduced and cannot wait on replicas that never join.
//      finish() calls finalize() on the replica's thread after its backward returned, never
//      inside autograd (two replicas on one GPU share its autograd thread: a blocking wait
//      there would stall the other). A replica without samples calls finalize() without a
//      backward: it joins every bucket's collective with zeros.
//   4. find_unused_parameters is on: a parameter unused on some replicas gets the others'
//      sum; one unused on all keeps an undefined .grad (DataParallel then restores its base).
//   5. When replica 0's Reducer is done, every replica adds a share of the base into the
//      result: base += sum, piece by piece, written into the base tensor so that .grad keeps
//      its identity and its memory from step to step (a new tensor each step made glibc
//      return and re-fault ~1,300 pages per MLP step). Nothing touches the base before every
//      backward is over, so a failed step leaves it unchanged.
//   6. A failure aborts the thread group (the peers' waits throw CommError); the next
//      start_step builds a fresh group and fresh Reducers.
// CUDA replicas take the same path: the thread group's slices run ATen ops on replica 0's
// device, copying the other replicas' pieces there.
class ReducerReduction : public GradReduction {
 public:
  ReducerReduction(std::vector<std::vector<at::Tensor>> params, std::vector<std::string> names,
                   const ReductionOptions& options)
      : params_(std::move(params)),
        names_(std::move(names)),
        options_(options),
        replicas_(static_cast<int>(params_.size())),
        wait_(options.spin) {
    in_step_ = std::make_unique<std::atomic<bool>[]>(replicas_);
    for (int r = 0; r < replicas_; ++r) {
      in_step_[r] = false;
      for (size_t k = 0; k < params_[r].size(); ++k) {
        hooks_.push_back(adapter::add_grad_accumulated_hook(params_[r][k], [this, r, k] {
          if (in_step_[r].load(std::memory_order_relaxed)) reducers_[r]->mark_ready(k);
        }));
      }
    }
    build();
  }

  void start_step(std::vector<at::Tensor> base, std::vector<uint8_t> active) override {
    LOCKSTEP_ASSERT(base.size() == params_[0].size() &&
                    active.size() == static_cast<size_t>(replicas_));
    if (aborted()) build();  // step 6: the last step was aborted
    base_ = std::move(base);
    active_ = std::move(active);
    pieces_.clear();
    for (size_t k = 0; k < base_.size(); ++k) {
      if (!base_[k].defined()) continue;
      const int64_t numel = base_[k].numel();
      const int64_t per = std::max<int64_t>(1, kPieceBytes / base_[k].element_size());
      for (int64_t off = 0; off < numel; off += per) {
        pieces_.push_back({k, off, std::min(per, numel - off)});
      }
    }
    root_done_.store(false, std::memory_order_relaxed);
    next_piece_.store(0, std::memory_order_relaxed);
    pieces_done_.store(0, std::memory_order_relaxed);
    aborted_.store(false, std::memory_order_relaxed);
    // The replica threads are started after this returns (a release/acquire hand-off).
  }

  double prepare(int r, double weight) override {
    reducers_[r]->prepare_for_forward(/*sync=*/true);  // collective only at the rebuild
    in_step_[r].store(true, std::memory_order_relaxed);
    return weight;
  }

  void finish(int r) override {
    if (!active_[r]) reducers_[r]->prepare_for_forward(/*sync=*/true);
    in_step_[r].store(false, std::memory_order_relaxed);
    reducers_[r]->finalize();  // replica 0: the primary's gradients now hold the sum
    if (r == 0) {
      root_done_.store(true, std::memory_order_release);
      wait_.notify();
    } else {
      wait_.wait([&] { return root_done_.load(std::memory_order_acquire) || aborted(); });
    }
    throw_if_aborted();
    // Step 5: base += sum, shared by the replicas.
    const int64_t total = static_cast<int64_t>(pieces_.size());
    for (int64_t p; (p = next_piece_.fetch_add(1, std::memory_order_acq_rel)) < total;) {
      add_base(pieces_[p]);
      if (pieces_done_.fetch_add(1, std::memory_order_acq_rel) + 1 == total) wait_.notify();
    }
    wait_.wait([&] {
      return pieces_done_.load(std::memory_order_acquire) == total || aborted();
    });
    throw_if_aborted();
  }

  void abort(const std::string& reason) override {
    aborted_.store(true, std::memory_order_release);
    abort_thread_groups(groups_[0], reason);
    wait_.notify();
  }

 private:
  static constexpr int64_t kPieceBytes = 256 * 1024;
  struct Piece {
    size_t param;
    int64_t offset;
    int64_t numel;
  };

  void build() {
    reducers_.clear();  // waits for nothing: an aborted group's works have failed
    groups_ = new_thread_groups(replicas_, ThreadGroupOptions().spin(options_.spin));
    ddp::ReducerOptions o;
    o.cap_bytes = options_.bucket_bytes;
    o.first_cap_bytes = std::min<int64_t>(options_.bucket_bytes, 1 << 20);
    o.find_unused_parameters = true;
    o.install_hooks = false;
    o.root = 0;
    o.average = false;
    for (int r = 0; r < replicas_; ++r) {
      reducers_.push_back(std::make_unique<ddp::Reducer>(params_[r], names_, groups_[r], o));
    }
  }

  bool aborted() const { return aborted_.load(std::memory_order_acquire); }

  void throw_if_aborted() const {
    if (aborted()) {
      throw CommError("DataParallel gradient reduction aborted: another replica failed");
    }
  }

  // base[piece] += the primary's new gradient[piece].
  void add_base(const Piece& piece) {
    const at::Tensor& grad = params_[0][piece.param].grad();
    const at::Tensor& base = base_[piece.param];
    if (!grad.defined()) return;  // no replica used it: DataParallel keeps the base
    if (base.device().is_cpu() && grad.device().is_cpu() && base.is_contiguous() &&
        grad.is_contiguous() && base.scalar_type() == grad.scalar_type()) {
      if (base.scalar_type() == at::kFloat) return add_loop<float>(base, grad, piece);
      if (base.scalar_type() == at::kDouble) return add_loop<double>(base, grad, piece);
    }
    at::NoGradGuard no_grad;
    LOCKSTEP_ASSERT(base.is_contiguous(), "the gradient of '", names_[piece.param],
                    "' is not contiguous");
    base.view({-1}).narrow(0, piece.offset, piece.numel)
        .add_(grad.reshape({-1}).narrow(0, piece.offset, piece.numel).to(base.device()));
  }

  template <typename T>
  static void add_loop(const at::Tensor& dst, const at::Tensor& src, const Piece& piece) {
    T* d = dst.data_ptr<T>() + piece.offset;
    const T* a = src.data_ptr<T>() + piece.offset;
    for (int64_t i = 0; i < piece.numel; ++i) d[i] += a[i];
  }

  std::vector<std::vector<at::Tensor>> params_;
  std::vector<std::string> names_;
  const ReductionOptions options_;
  const int replicas_;
  std::vector<ProcessGroupPtr> groups_;
  std::vector<std::unique_ptr<ddp::Reducer>> reducers_;

  // Per step.
  std::vector<at::Tensor> base_;
  std::vector<uint8_t> active_;
  std::vector<Piece> pieces_;
  std::unique_ptr<std::atomic<bool>[]> in_step_;  // per replica: its hooks mark ready
  std::atomic<bool> root_done_{false};
  std::atomic<int64_t> next_piece_{0}, pieces_done_{0};
  std::atomic<bool> aborted_{false};  // until the next start_step, which then rebuilds
  detail::SpinWait wait_;
  std::vector<adapter::HookHandle> hooks_;  // last member: removed first
};

}  // namespace

std::unique_ptr<GradReduction> make_replica_reduction(std::vector<std::vector<at::Tensor>> params,
                                                      std::vector<std::string> names,
                                                      const ReductionOptions& options) {
  LOCKSTEP_ASSERT(!params.empty());
  return std::make_unique<ReducerReduction>(std::move(params), std::move(names), options);
}

}  // namespace dp
}  // namespace lockstep
