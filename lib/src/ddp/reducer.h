#pragma once
// The Reducer: averages the gradients of a list of parameters over a ProcessGroup while
// backward runs. DistributedDataParallel owns one.
//
// Note [Reducer contract]
// A Reducer works over ANY lockstep::ProcessGroup (Gloo, shared memory, an in-process group
// whose ranks are threads) and ANY list of distinct leaf parameters that require grad. The
// owner promises:
//   1. Every rank constructs its Reducer with parameters that correspond one to one (same
//      count, shapes, dtypes, order) over the same group, at the same point of the collective
//      sequence. The Reducer issues no collective in its constructor; checking that ranks
//      agree is the owner's job (DistributedDataParallel does it, see ddp.cpp).
//   2. Before each forward whose backward may run, the owner calls `prepare_for_forward(sync)`
//      on every rank with the same `sync`. It is collective only when a bucket rebuild is
//      pending (one broadcast of rank 0's order after the first synchronized backward).
//   3. backward runs on the thread(s) autograd chooses; the Reducer's hooks (installed on the
//      parameters' grad accumulators via the torch adapter) copy each gradient into its bucket
//      and launch complete buckets; the end-of-backward callback it queues waits for all
//      buckets and writes the averages back. When backward() returns, gradients are averaged.
//   4. One backward per prepared forward is synchronized; further backwards before the next
//      `prepare_for_forward` are synchronized too (each is a full iteration), so the owner
//      must make every rank run the same number of backwards.
// `install_hooks = false` leaves the autograd hooks out: the owner then calls `mark_ready(i)`
// after parameter i's gradient is final and `finalize()` after the last one (tests, or an
// owner that drives reduction itself); it calls finalize() after every synchronized forward,
// also on a rank that ran no backward (every parameter then counts as missing there). The Reducer is not copyable; destroy it only when no
// backward is running. Every public method is thread-safe.
//
// Note [Bucket control elements]
// Each bucket is one flat tensor: the gradients of its parameters (averaged by the reduction;
// Note [Where the average is taken]) followed by one control element per
// parameter, 1 when this rank got no gradient for that parameter in this backward and 0
// otherwise. The control elements travel in the same all-reduce, so after it every rank knows,
// with no extra collective, how many ranks missed each parameter: with
// find_unused_parameters off any nonzero count raises the same error on every rank (naming
// the parameters) instead of a hang; with it on, a parameter missed by every rank keeps its
// .grad unchanged, as in single-process training. Buckets with a parameter that got no
// gradient are launched by the end-of-backward callback, still in bucket order.
//
// Note [Where the average is taken]
// With a comm hook, each gradient is divided by the world size as it enters its bucket (the
// compression hooks need averages: summing half-precision values first could overflow). With
// the default all-reduce, nothing is scaled on the way in and the bucket is all-reduced with
// ReduceOp::kAvg instead: the shared-memory group divides inside its reduction pass (in
// place, so with gradient_as_bucket_view no pass over the gradients remains at all), Gloo
// divides after its sum. The control elements are averaged too; they are multiplied back by
// the world size before they are read (exact: counts are small integers).
//
// Note [Reducing into a root]
// With ReducerOptions::root = r >= 0 the Reducer reduces into rank r instead of all-reducing:
// only rank r's gradients receive the result; the other ranks' gradients are only read.
// Buckets are then not flat buffers but lists of the gradient tensors themselves (and one
// control tensor per bucket): a complete bucket is reduced with ProcessGroup::reduce, which
// the in-process thread group runs straight from every rank's gradients into rank r's, with
// no copy in or out (DataParallel: one Reducer per replica over a thread group, root 0, the
// primary). Everything else is the same: readiness hooks, bucket order and rebuild, launch
// while backward runs, control elements for unused parameters, statistics and trace. What
// differs: only the root learns which ranks missed a parameter, so only the root raises the
// unused-parameter error; a parameter this rank got no gradient for contributes zeros (on
// the root a zero tensor becomes its .grad, and its old .grad is restored if every rank
// missed it); comm hooks and gradient_as_bucket_view do not apply (the gradients are the
// buckets already). With `average` false the result is the sum instead of the average.
//
// Which of the two (flat buckets or gradient lists into a root) is chosen once, at
// construction: Note [Bucket strategies] in bucket_strategy.h.
//
// Note [Join]
// Uneven inputs (DistributedDataParallelBase::join, PyTorch's DDP.join): a rank that ran out
// of inputs calls shadow_iteration() once per synchronized iteration of the others, and in it
// launches every bucket filled with zeros, so the collective sequence stays the same on every
// rank. Each flat bucket ends in one presence element, 1 from a rank that contributes and 0
// from a joined one; it travels in the bucket's own reduction, so while every rank still has
// data joining costs no collective at all (PyTorch all-reduces a flag every iteration). After
// a reduction every rank reads the same count P of present ranks:
//   - P equal to the last count: nothing changed.
//   - P changed to neither 0 nor world: every rank (joined or not) allgathers one word (present,
//     inside a join, the join options): once per change, so fewer than world-size times in a
//     run. Every rank then raises the same error, naming the ranks, if some rank is not
//     inside a join, if the ranks' JoinOptions differ, or with throw_on_early_termination.
//   - 0 < P < world: the average divides by the initial world size (joined ranks contributed
//     zeros) or, with divide_by_initial_world_size off, by P.
//   - P = 0: every rank has joined; the shadowing ends.
// A joined rank contributes no missing-parameter marks, so "unused on every rank" means on
// every present rank. The ranks present in the last reduction with P > 0 are the authority:
// buffers are broadcast from the highest of them (as PyTorch's join does) and, when all have
// joined, the final model. Joined ranks' .grad is not meaningful while they shadow (with
// gradient_as_bucket_view it aliases the zeroed buckets).
//
// Note [Non-finite gradients]
// With a policy (NonFinite::kSkip or kAbort) each rank checks every local gradient once as
// its hook fires and, when one holds a NaN or Inf, sets its bucket's non-finite element (after
// the presence element) and remembers the first such parameter. The element travels in the
// bucket's reduction, so every rank learns that some rank had one with no extra collective;
// only then do the ranks allgather their first bad parameter, so that the warning (kSkip) or
// the NonFiniteError (kAbort) names the step, the rank(s) and the parameter(s) where it began.
// With max_grad_norm each bucket's squared 2-norm (accumulated in double) is read once after
// the reductions completed; the total decides the clip coefficient, applied as the gradients
// are written back (no pass of its own with a copy-back; one in place with bucket views, only
// when it clips). A reduced gradient that overflowed although every local one was finite shows
// up as a non-finite norm and is handled by the same policy. At world size 1 the same checks
// run on the gradients themselves.
//
// Note [Static graph]
// With static_graph the graph is promised to be the same every iteration, and a parameter's
// hook may fire more than once per backward (a parameter used in several reentrant backward
// passes, e.g. a layer shared by two activation-checkpointed segments: each segment's inner
// backward accumulates into .grad and fires the hook). The first iteration only counts the
// firings per parameter; at its end every parameter that fired is final, and all buckets are
// launched then (nothing overlaps in that one iteration). From the second iteration on, a
// parameter is ready at its expected firing count, and the last expected firing anywhere
// finalizes the iteration from inside that hook; an end-of-backward callback that runs while
// firings are still due belongs to a reentrant inner backward and is ignored. More firings
// than expected raise a StateError naming the parameter. Parameters that never fired are
// unused in every iteration: no error, as with find_unused_parameters. The first gradient of
// the first iteration must not come from inside a reentrant segment (its callback would end
// the iteration early): true when the output layer is not checkpointed.
//
// Note [Bucket rebuild]
// The first plan assumes gradients arrive in reverse registration order. During the first
// synchronized backward the Reducer records the order in which they actually arrived; at the
// next prepare_for_forward rank 0's order is broadcast and every rank re-plans with it (once),
// so all ranks keep identical buckets. Gradients held in bucket views are carried over.

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ddp/bucket_strategy.h"
#include "lockstep/ddp.h"
#include "lockstep/process_group.h"

namespace lockstep {
namespace ddp {

/// Configuration of a Reducer (DDPOptions, resolved).
struct ReducerOptions {
  int64_t cap_bytes = 25 * 1024 * 1024;       ///< bucket cap
  int64_t first_cap_bytes = 1 * 1024 * 1024;  ///< first bucket cap
  bool find_unused_parameters = false;
  bool gradient_as_bucket_view = false;
  bool rebuild_buckets = true;
  CommHookPtr comm_hook;      ///< nullptr: allreduce_hook()
  bool install_hooks = true;  ///< see Note [Reducer contract]
  int root = -1;              ///< -1: all-reduce; r: reduce into rank r (Note [Reducing into a root])
  bool average = true;        ///< false: sum over ranks instead of the average
  NonFinite nonfinite = NonFinite::kOff;  ///< Note [Non-finite gradients]
  double max_grad_norm = 0;               ///< Note [Non-finite gradients]; 0: no clipping
  std::string trace_path;     ///< Chrome trace file for this rank; "" for none
  bool static_graph = false;  ///< Note [Static graph]
};

class Trace;

class Reducer {
 public:
  /// `params` are distinct leaf tensors requiring grad; `names` name them in messages.
  Reducer(std::vector<at::Tensor> params, std::vector<std::string> names, ProcessGroupPtr group,
          ReducerOptions options);
  ~Reducer();
  Reducer(const Reducer&) = delete;
  Reducer& operator=(const Reducer&) = delete;

  /// See Note [Reducer contract], step 2. `sync` false: the next backward accumulates
  /// locally (no_sync). Also recovers from a backward that failed midway.
  void prepare_for_forward(bool sync);
  /// Parameter `index`'s gradient is final for this backward.
  void mark_ready(size_t index);

  /// End of backward: launches what is left, waits, writes averaged gradients back.
  void finalize();

  /// Note [Join]: enables (or disables) uneven inputs on this rank.
  void set_join(bool enabled, JoinOptions options = JoinOptions());
  /// Note [Join]: one iteration in which this rank only shadows the others' reductions.
  /// Returns the number of ranks that were present (0: every rank has joined).
  int shadow_iteration();
  /// Note [Join]: the highest rank present in the last reduction that had any (rank
  /// world-1 before anyone joined).
  int authoritative_rank() const;
  /// Note [Non-finite gradients]: whether the last synchronized backward had a NaN or Inf.
  bool last_nonfinite() const;

  /// Records the forward duration for the statistics of the iteration it belongs to.
  void record_forward(std::chrono::steady_clock::time_point start,
                      std::chrono::steady_clock::time_point end);
  /// Statistics of the last synchronized iteration.
  DDPStats last_stats() const;
  /// The current bucket plan.
  std::vector<BucketInfo> buckets() const;
  /// Parameter indices per bucket, in launch order (tests).
  std::vector<std::vector<size_t>> bucket_indices() const;
  /// Writes the trace (no-op without a trace path).
  void flush_trace();
  /// True when nothing needs communicating (world size 1 with the default hook).
  bool trivial() const { return trivial_; }

 private:
  using Clock = std::chrono::steady_clock;
  struct Bucket {
    std::vector<size_t> params;     // parameter indices, bucket order
    int64_t gradient_numel = 0;
    std::string transport;          // BucketStats::transport
    size_t pending = 0;             // parameters not yet ready this backward
    WorkPtr work;
    Clock::time_point ready, launched, done;
    bool done_seen = false;
  };
  struct ParamSlot {
    size_t bucket = 0;
    size_t position = 0;  // index within the bucket
  };
  using Missing = std::vector<std::pair<size_t, int>>;  // (parameter, ranks that missed it)

  void build_buckets(const std::vector<size_t>& order);
  void check_gradient(size_t index);
  void launch(size_t bucket_index);
  void poll_done();
  void reset_iteration();
  void begin_iteration(Clock::time_point now, bool queue_callback);
  bool mark_ready_locked(size_t index);
  void make_ready(size_t index, Clock::time_point now);
  void rebuild_if_pending();
  // The steps of finalize(), in order.
  Missing missing_locally() const;
  void launch_remaining(Clock::time_point compute_end);
  void wait_for_buckets();
  Missing collect_missing();
  bool unused_is_error(const Missing& missing) const;
  struct Agreement {
    Missing missing;      // parameters some rank got no gradient for
    int present = 0;      // ranks with data (Note [Join])
    double scale = 1.0;   // applied as gradients are written back
  };
  Agreement agree(std::unique_lock<std::mutex>& lock, const std::function<void()>& restore);
  int update_presence();
  void check_nonfinite(double* scale);
  bool all_finite(const at::Tensor& t) const;
  void write_back(const Missing& missing, int present, double scale);
  void record_statistics(Clock::time_point compute_end);
  [[noreturn]] void raise_unused(const Missing& missing);

  std::vector<at::Tensor> params_;
  std::vector<std::string> names_;
  ProcessGroupPtr group_;
  ReducerOptions options_;
  CommHookPtr hook_;
  int world_ = 1;
  bool trivial_ = false;
  std::unique_ptr<BucketStrategy> strategy_;  // Note [Bucket strategies]; null when trivial

  mutable std::mutex mutex_;
  std::vector<Bucket> buckets_;
  std::vector<ParamSlot> slots_;
  std::vector<uint8_t> ready_;
  size_t next_launch_ = 0;
  size_t next_done_ = 0;
  bool sync_ = true;
  bool in_backward_ = false;
  int64_t iterations_ = 0;

  bool join_enabled_ = false;          // Note [Join]
  JoinOptions join_options_;
  bool joined_ = false;                // this rank shadows
  int present_ = 1;                    // ranks present in the last reduction
  std::vector<int> authority_;         // ranks present in the last reduction with any
  int64_t presence_changed_at_ = 0;    // iteration of the last change

  std::vector<int> fired_;             // Note [Static graph]: hook firings this backward
  std::vector<int> expected_;          // ... and in the first one
  int64_t expected_total_ = 0;
  int64_t remaining_firings_ = 0;
  bool static_known_ = false;

  int64_t first_bad_local_ = -1;       // Note [Non-finite gradients]
  bool last_nonfinite_ = false;
  double grad_norm_ = -1;

  bool recording_order_ = false;
  bool rebuild_pending_ = false;
  bool rebuilt_ = false;
  std::vector<size_t> ready_order_;

  Clock::time_point backward_start_;
  Clock::time_point forward_start_, forward_end_;
  DDPStats last_stats_;

  std::vector<std::shared_ptr<void>> hooks_;
  std::unique_ptr<Trace> trace_;
};

}  // namespace ddp
}  // namespace lockstep
