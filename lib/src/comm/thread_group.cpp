// In-process process groups: ranks are threads, collectives are memory reductions.
#include "lockstep/thread_group.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <numeric>

#include "core/spin_wait.h"
#include "lockstep/errors.h"

namespace lockstep {

using detail::concat;

namespace {

// Note [Thread group protocol]
// Ranks are threads sharing one `GroupState`. Collective number s of every rank meets in one
// `Op`, created by whichever rank arrives first:
//   1. A rank validates its own arguments (throwing InvalidArgument on its thread, and marking
//      the op failed so that its peers fail fast instead of timing out), records its tensors
//      in the op and returns a Work at once.
//   2. The last rank to arrive checks that all ranks agree (operation, element count, dtype,
//      op, root) and marks the op ready; a disagreement fails every rank's Work, naming the
//      ranks and both values.
//   3. The work is cut into slices (`slice_bytes`; one per rank for allgather and
//      reduce_scatter). The last rank claims slices until none is left, inline; ranks blocked
//      in `wait()` claim slices too, so idle ranks help. A slice of an all-reduce reduces
//      ranks 0, 1, ..., size-1 in that order into rank 0's tensor and copies the result to the
//      others, so every rank holds bitwise the same values whoever ran the slice.
//   4. The rank finishing the last slice marks the op done and wakes the waiters.
// `abort` fails every op still waiting for arrivals and every later one: a rank whose thread
// failed mid-iteration uses it so that its peers stop waiting.

enum class Kind { kAllreduce, kBroadcast, kAllgather, kReduceScatter, kReduce, kBarrier,
                  kGather, kScatter, kAllToAll };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kAllreduce: return "allreduce";
    case Kind::kBroadcast: return "broadcast";
    case Kind::kAllgather: return "allgather";
    case Kind::kReduceScatter: return "reduce_scatter";
    case Kind::kReduce: return "reduce";
    case Kind::kBarrier: return "barrier";
    case Kind::kGather: return "gather";
    case Kind::kScatter: return "scatter";
    case Kind::kAllToAll: return "all_to_all_single";
  }
  return "?";
}

struct Op {
  Kind kind = Kind::kBarrier;
  ReduceOp reduce = ReduceOp::kSum;
  int root = 0;
  uint64_t sequence = 0;
  std::vector<bool> arrived;
  std::vector<Kind> kinds;
  std::vector<at::Tensor> tensors;               // allreduce, broadcast: each rank's tensor;
                                                 // allgather: each rank's input;
                                                 // reduce_scatter: each rank's output
  std::vector<std::vector<at::Tensor>> lists;    // allgather outputs / reduce_scatter inputs /
                                                 // reduce tensors
  struct Piece {
    size_t tensor;
    int64_t offset, numel;
  };
  std::vector<Piece> pieces;                     // reduce: slice s is pieces[s]
  std::vector<ReduceOp> reduces;
  std::vector<int> roots;
  std::vector<std::vector<int64_t>> splits;      // all_to_all_single: rank i's input splits
  int64_t row = 0;                               // all_to_all_single: elements per row
  int count = 0;
  int64_t slices = 0;
  int64_t slice_numel = 0;
  std::atomic<int64_t> next_slice{0};
  std::atomic<int64_t> done_slices{0};
  bool ready = false;
  bool done = false;
  std::atomic<bool> finished{false};  // `done`, readable without the lock (spinning waiters)
  std::exception_ptr error;
  std::condition_variable cv;
};

// Note [Thread group messages]
// send and recv meet in per-(source, destination) queues of GroupState: whichever arrives
// second finds the other at the front of its queue, checks that tag, dtype and element count
// agree, copies the payload (under the state lock) and completes both Works; messages between
// two ranks therefore match in order. A mismatch fails the recv (naming what was sent) and
// completes the send, like the other transports. A recv or send that times out leaves its
// queue, so a late peer never matches a Work nobody waits for.
class P2PWork : public Work {
 public:
  P2PWork(std::chrono::milliseconds timeout, std::string what)
      : timeout_(timeout), what_(std::move(what)) {}
  bool is_completed() override {
    std::lock_guard<std::mutex> lock(mutex_);
    return done_;
  }
  void wait() override;
  void complete(std::exception_ptr error) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (done_) return;
      done_ = true;
      error_ = std::move(error);
    }
    cv_.notify_all();
  }
  std::function<bool()> withdraw;  // removes this Work from its queue; false if already matched

 private:
  std::chrono::milliseconds timeout_;
  std::string what_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
};

struct Message {
  int tag = 0;
  at::Tensor tensor;
  std::shared_ptr<P2PWork> work;
  std::string where;  // the posting rank's where()
};

struct GroupState {
  int size = 0;
  std::map<std::pair<int, int>, std::deque<Message>> sends, recvs;  // (src, dst)
  ThreadGroupOptions options;
  std::mutex mutex;
  std::map<uint64_t, std::shared_ptr<Op>> pending;  // ops still waiting for arrivals
  std::vector<uint64_t> issued;                     // per rank: collectives issued
  std::exception_ptr aborted;
  std::map<uint64_t, std::shared_ptr<GroupState>> subgroups;  // by new_group id

  void abort(std::exception_ptr error) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!aborted) aborted = error;
    for (auto& kv : pending) {
      if (!kv.second->done) {
        kv.second->error = error;
        kv.second->done = true;
        kv.second->finished.store(true, std::memory_order_release);
        kv.second->cv.notify_all();
      }
    }
    pending.clear();
    for (auto* queues : {&sends, &recvs}) {
      for (auto& kv : *queues) {
        for (auto& m : kv.second) m.work->complete(error);
      }
      queues->clear();
    }
  }
};

void P2PWork::wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!cv_.wait_for(lock, timeout_, [&] { return done_; })) {
    lock.unlock();
    if (withdraw && withdraw()) {
      throw TimeoutError(concat(what_, " timed out after ", timeout_.count() / 1000.0,
                                " s: the peer did not post the matching ",
                                what_.find(" send ") != std::string::npos ? "recv" : "send",
                                ". Check that it does, and its log."));
    }
    lock.lock();
    cv_.wait(lock, [&] { return done_; });  // matched while timing out: done under the lock
  }
  if (error_) std::rethrow_exception(error_);
}

void combine(at::Tensor& acc, const at::Tensor& x, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg: acc.add_(x); break;
    case ReduceOp::kProduct: acc.mul_(x); break;
    case ReduceOp::kMin: at::minimum_out(acc, acc, x); break;
    case ReduceOp::kMax: at::maximum_out(acc, acc, x); break;
  }
}

at::Tensor on(const at::Tensor& t, const at::Device& device) {
  return t.device() == device ? t : t.to(device);
}

// Runs slice `s` of a ready op (see Note [Thread group protocol], step 3).
void run_slice(Op& op, int size, int64_t s) {
  auto flat_slice = [&](const at::Tensor& t) {
    int64_t lo = s * op.slice_numel;
    int64_t len = std::min(op.slice_numel, t.numel() - lo);
    return t.view({-1}).narrow(0, lo, len);
  };
  switch (op.kind) {
    case Kind::kAllreduce: {
      auto acc = flat_slice(op.tensors[0]);
      for (int r = 1; r < size; ++r) combine(acc, on(flat_slice(op.tensors[r]), acc.device()), op.reduce);
      if (op.reduce == ReduceOp::kAvg) acc.div_(size);
      for (int r = 1; r < size; ++r) flat_slice(op.tensors[r]).copy_(acc);
      break;
    }
    case Kind::kBroadcast: {
      auto src = flat_slice(op.tensors[op.root]);
      for (int r = 0; r < size; ++r) {
        if (r != op.root) flat_slice(op.tensors[r]).copy_(src);
      }
      break;
    }
    case Kind::kAllgather: {  // slice s: rank s's input into everyone's outputs[s]
      for (int r = 0; r < size; ++r) op.lists[r][s].copy_(op.tensors[s].view(op.lists[r][s].sizes()));
      break;
    }
    case Kind::kReduceScatter: {  // slice s: rank s's output = reduction of inputs[*][s]
      auto& out = op.tensors[s];
      out.copy_(op.lists[0][s]);
      for (int r = 1; r < size; ++r) combine(out, on(op.lists[r][s], out.device()), op.reduce);
      if (op.reduce == ReduceOp::kAvg) out.div_(size);
      break;
    }
    case Kind::kReduce: {  // root's piece += every other rank's, in rank order
      const auto& piece = op.pieces[s];
      auto part = [&](int r) {
        return op.lists[r][piece.tensor].view({-1}).narrow(0, piece.offset, piece.numel);
      };
      auto acc = part(op.root);
      for (int r = 0; r < size; ++r) {
        if (r != op.root) combine(acc, on(part(r), acc.device()), op.reduce);
      }
      if (op.reduce == ReduceOp::kAvg) acc.div_(size);
      break;
    }
    case Kind::kGather: {  // slice s: rank s's input into root's outputs[s]
      auto& out = op.lists[op.root][s];
      out.copy_(op.tensors[s].view(out.sizes()));
      break;
    }
    case Kind::kScatter: {  // slice s: root's inputs[s] into rank s's output
      auto& out = op.tensors[s];
      out.copy_(op.lists[op.root][s].view(out.sizes()));
      break;
    }
    case Kind::kAllToAll: {  // slice s: every rank's block for rank s into rank s's output
      auto out = op.lists[s][0].view({-1});
      int64_t at_out = 0;
      for (int src = 0; src < size; ++src) {
        const auto& sp = op.splits[src];
        const int64_t from = std::accumulate(sp.begin(), sp.begin() + s, int64_t{0}) * op.row;
        const int64_t n = sp[s] * op.row;
        if (n > 0) {
          out.narrow(0, at_out, n).copy_(op.tensors[src].view({-1}).narrow(0, from, n));
        }
        at_out += n;
      }
      break;
    }
    case Kind::kBarrier: break;
  }
}

class ThreadGroup;

class ThreadWork : public Work {
 public:
  // `kind`: what this rank issued (the op's own kind is set only once every rank arrived).
  ThreadWork(std::shared_ptr<GroupState> state, std::shared_ptr<Op> op, std::string where,
             Kind kind)
      : state_(std::move(state)), op_(std::move(op)), where_(std::move(where)), kind_(kind) {}

  bool is_completed() override {
    std::lock_guard<std::mutex> lock(state_->mutex);
    return op_->done;
  }

  void wait() override {
    help(*state_, op_);
    // Poll briefly before blocking (ThreadGroupOptions::spin); an op that becomes ready
    // meanwhile is helped with below, once the spin is over.
    detail::spin_until([&] { return op_->finished.load(std::memory_order_acquire); },
                       state_->options.spin());
    std::unique_lock<std::mutex> lock(state_->mutex);
    auto deadline = std::chrono::steady_clock::now() + state_->options.timeout();
    while (!op_->done) {
      if (op_->ready && op_->next_slice.load() < op_->slices) {
        lock.unlock();
        help(*state_, op_);
        lock.lock();
        continue;
      }
      if (op_->cv.wait_until(lock, deadline) == std::cv_status::timeout && !op_->done) {
        std::string missing;
        for (int r = 0; r < state_->size; ++r) {
          if (!op_->arrived[r]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
        }
        throw TimeoutError(concat(
            where_, " ", kind_name(kind_), " #", op_->sequence, " (thread group) timed out "
            "after ", state_->options.timeout().count() / 1000.0, " s",
            missing.empty() ? std::string(": every rank arrived but the reduction did not finish")
                            : concat(" waiting for rank(s) ", missing, " to reach it"),
            ". Every rank's thread must issue the same collectives in the same order."));
      }
    }
    if (op_->error) std::rethrow_exception(op_->error);
  }

  // Claims and runs slices of a ready op until none is left (step 3); marks it done (step 4).
  static void help(GroupState& state, const std::shared_ptr<Op>& op) {
    {
      std::lock_guard<std::mutex> lock(state.mutex);
      if (!op->ready || op->done) return;
    }
    while (true) {
      int64_t s = op->next_slice.fetch_add(1);
      if (s >= op->slices) return;
      std::exception_ptr error;
      try {
        run_slice(*op, state.size, s);
      } catch (...) {
        error = std::current_exception();
      }
      bool last = op->done_slices.fetch_add(1) + 1 == op->slices;
      if (error || last) {
        std::lock_guard<std::mutex> lock(state.mutex);
        if (error && !op->error) op->error = error;
        if (last) {
          op->done = true;
          op->finished.store(true, std::memory_order_release);
          op->cv.notify_all();
        }
      }
    }
  }

 private:
  std::shared_ptr<GroupState> state_;
  std::shared_ptr<Op> op_;
  std::string where_;
  Kind kind_;
};

class ThreadGroup : public ProcessGroup {
 public:
  ThreadGroup(int rank, std::shared_ptr<GroupState> state, std::shared_ptr<Store> store)
      : ProcessGroup(rank, state->size, state->options.timeout(), std::move(store)),
        state_(std::move(state)) {}

  std::string backend() const override { return "threads"; }

  WorkPtr allreduce(at::Tensor& tensor, ReduceOp op) override {
    return issue(Kind::kAllreduce, [&](Op& o) {
      check_allreduce(tensor, op);
      o.tensors[rank()] = tensor;
      o.reduces[rank()] = op;
    });
  }

  WorkPtr broadcast(at::Tensor& tensor, int root) override {
    return issue(Kind::kBroadcast, [&](Op& o) {
      check_broadcast(tensor, root);
      o.tensors[rank()] = tensor;
      o.roots[rank()] = root;
    });
  }

  WorkPtr allgather(std::vector<at::Tensor>& outputs, const at::Tensor& input) override {
    return issue(Kind::kAllgather, [&](Op& o) {
      check_allgather(outputs, input);
      o.tensors[rank()] = input;
      o.lists[rank()] = outputs;
    });
  }

  WorkPtr reduce_scatter(at::Tensor& output, const std::vector<at::Tensor>& inputs,
                         ReduceOp op) override {
    return issue(Kind::kReduceScatter, [&](Op& o) {
      check_reduce_scatter(output, inputs, op);
      o.tensors[rank()] = output;
      o.lists[rank()] = inputs;
      o.reduces[rank()] = op;
    });
  }

  WorkPtr reduce(std::vector<at::Tensor>& tensors, int root, ReduceOp op) override {
    return issue(Kind::kReduce, [&](Op& o) {
      check_reduce(tensors, root, op);
      o.lists[rank()] = tensors;
      o.reduces[rank()] = op;
      o.roots[rank()] = root;
    });
  }

  WorkPtr barrier() override {
    return issue(Kind::kBarrier, [](Op&) {});
  }

 protected:
  WorkPtr run_gather(std::vector<at::Tensor>& outputs, const at::Tensor& input,
                     int root) override {
    return issue(Kind::kGather, [&](Op& o) {
      o.tensors[rank()] = input;
      o.lists[rank()] = outputs;
      o.roots[rank()] = root;
    });
  }

  WorkPtr run_scatter(at::Tensor& output, const std::vector<at::Tensor>& inputs,
                      int root) override {
    return issue(Kind::kScatter, [&](Op& o) {
      o.tensors[rank()] = output;
      o.lists[rank()] = inputs;
      o.roots[rank()] = root;
    });
  }

  WorkPtr run_all_to_all(at::Tensor& output, const at::Tensor& input,
                         const std::vector<std::vector<int64_t>>& splits,
                         int64_t row) override {
    return issue(Kind::kAllToAll, [&](Op& o) {
      o.tensors[rank()] = input;
      o.lists[rank()] = {output};
      o.splits = splits;
      o.row = row;
    });
  }

  // Note [Subgroups]: the member threads share a new state, created by the first to arrive.
  ProcessGroupPtr make_subgroup(const std::vector<int>& ranks, int sub_rank, uint64_t id,
                                const std::shared_ptr<Store>& store) override {
    std::shared_ptr<GroupState> child;
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      auto& slot = state_->subgroups[id];
      if (!slot) {
        slot = std::make_shared<GroupState>();
        slot->size = static_cast<int>(ranks.size());
        slot->options = state_->options;
        slot->issued.assign(ranks.size(), 0);
      }
      child = slot;
    }
    return std::make_shared<ThreadGroup>(sub_rank, child, store);
  }

  // Note [Thread group messages]
  WorkPtr run_send(const at::Tensor& tensor, int dst, int tag) override {
    return post(/*send=*/true, tensor, dst, tag);
  }

  WorkPtr run_recv(at::Tensor& tensor, int src, int tag) override {
    return post(/*send=*/false, tensor, src, tag);
  }

 public:

  const std::shared_ptr<GroupState>& state() const { return state_; }

 private:
  WorkPtr post(bool is_send, const at::Tensor& tensor, int peer, int tag) {
    const auto key = is_send ? std::make_pair(rank(), peer) : std::make_pair(peer, rank());
    auto work = std::make_shared<P2PWork>(
        state_->options.timeout(),
        concat(where(), is_send ? " send to rank " : " recv from rank ", peer, " (tag ", tag,
               ", ", tensor.numel(), " x ", tensor.scalar_type(), ", thread group)"));
    Message mine{tag, tensor, work, where()};
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (state_->aborted) {
      work->complete(state_->aborted);
      return work;
    }
    auto& others = is_send ? state_->recvs[key] : state_->sends[key];
    if (others.empty()) {
      auto& queue = is_send ? state_->sends[key] : state_->recvs[key];
      queue.push_back(mine);
      std::weak_ptr<GroupState> weak = state_;
      P2PWork* raw = work.get();
      work->withdraw = [weak, key, is_send, raw] {
        auto state = weak.lock();
        if (!state) return false;
        std::lock_guard<std::mutex> lock(state->mutex);
        auto& q = is_send ? state->sends[key] : state->recvs[key];
        for (auto it = q.begin(); it != q.end(); ++it) {
          if (it->work.get() == raw) {
            q.erase(it);
            return true;
          }
        }
        return false;
      };
      return work;
    }
    Message other = others.front();
    others.pop_front();
    const Message& send = is_send ? mine : other;
    const Message& recv = is_send ? other : mine;
    std::string wrong = p2p_mismatch(recv.where, key.first, recv.tag,
                                     recv.tensor.scalar_type(), recv.tensor.numel(), send.tag,
                                     static_cast<int64_t>(send.tensor.scalar_type()),
                                     send.tensor.numel());
    if (!wrong.empty()) {
      recv.work->complete(std::make_exception_ptr(InvalidArgument(wrong)));
      send.work->complete(nullptr);
      return work;
    }
    std::exception_ptr error;
    try {
      if (recv.tensor.numel() > 0) {
        at::Tensor dst = recv.tensor;
        dst.copy_(send.tensor.view(dst.sizes()));
      }
    } catch (...) {
      error = std::current_exception();
    }
    recv.work->complete(error);
    send.work->complete(error);
    return work;
  }

  // Steps 1 and 2 of Note [Thread group protocol].
  template <typename Fill>
  WorkPtr issue(Kind kind, Fill&& fill) {
    std::shared_ptr<Op> op;
    std::exception_ptr local_error;
    bool complete = false;
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      if (state_->aborted) {
        auto failed = std::make_shared<PromiseWork>();
        failed->set_error(state_->aborted);
        return failed;
      }
      uint64_t seq = ++state_->issued[rank()];
      auto& slot = state_->pending[seq];
      if (!slot) {
        slot = std::make_shared<Op>();
        slot->sequence = seq;
        slot->arrived.assign(size(), false);
        slot->kinds.assign(size(), kind);
        slot->tensors.resize(size());
        slot->lists.resize(size());
        slot->reduces.assign(size(), ReduceOp::kSum);
        slot->roots.assign(size(), 0);
      }
      op = slot;
      op->kinds[rank()] = kind;
      try {
        fill(*op);
      } catch (...) {
        local_error = std::current_exception();
        if (!op->error) {
          op->error = std::make_exception_ptr(InvalidArgument(concat(
              where(), " ", kind_name(kind), " #", seq, ": rank ", rank(),
              " passed invalid arguments (see its error), so this collective failed.")));
        }
      }
      op->arrived[rank()] = true;
      if (++op->count == size()) {
        state_->pending.erase(seq);
        if (!op->error) validate(*op);
        if (op->error || op->slices == 0) {
          op->done = true;
          op->finished.store(true, std::memory_order_release);
          op->cv.notify_all();
        } else {
          op->ready = true;
          op->cv.notify_all();
          complete = true;
        }
      }
    }
    if (local_error) std::rethrow_exception(local_error);
    if (complete) ThreadWork::help(*state_, op);
    return std::make_shared<ThreadWork>(state_, op, where(), kind);
  }

  // Checks that all ranks agree and plans the slices. Called with the state lock held.
  void validate(Op& op) {
    const int n = size();
    auto fail = [&](const std::string& what) {
      op.error = std::make_exception_ptr(InvalidArgument(concat(
          "[thread group of ", n, "] collective #", op.sequence, ": ", what,
          ". Every rank must issue the same collectives in the same order with matching "
          "tensors.")));
    };
    for (int r = 1; r < n; ++r) {
      if (op.kinds[r] != op.kinds[0]) {
        return fail(concat("rank 0 issued ", kind_name(op.kinds[0]), " but rank ", r,
                           " issued ", kind_name(op.kinds[r])));
      }
    }
    op.kind = op.kinds[0];
    op.reduce = op.reduces[0];
    op.root = op.roots[0];
    for (int r = 1; r < n; ++r) {
      if (op.kind == Kind::kBarrier) break;
      if (op.roots[r] != op.root) {
        return fail(concat(kind_name(op.kind), ": rank 0 names root ", op.root, " but rank ", r,
                           " names root ", op.roots[r]));
      }
      if (op.reduces[r] != op.reduce) {
        return fail(concat(kind_name(op.kind), ": rank 0 reduces with ", to_string(op.reduce),
                           " but rank ", r, " with ", to_string(op.reduces[r])));
      }
      if (op.kind == Kind::kAllToAll) continue;  // sizes differ; agree() checked the splits
      if (op.kind == Kind::kReduce) {
        const auto& a = op.lists[0];
        const auto& b = op.lists[r];
        if (a.size() != b.size()) {
          return fail(concat("reduce: rank 0 passes ", a.size(), " tensors but rank ", r,
                             " passes ", b.size()));
        }
        for (size_t i = 0; i < a.size(); ++i) {
          if (a[i].numel() != b[i].numel() || a[i].scalar_type() != b[i].scalar_type()) {
            return fail(concat("reduce: tensor ", i, " is ", a[i].numel(), " x ",
                               a[i].scalar_type(), " on rank 0 but ", b[i].numel(), " x ",
                               b[i].scalar_type(), " on rank ", r));
          }
        }
        continue;
      }
      const auto& a = op.tensors[0];
      const auto& b = op.tensors[r];
      if (a.numel() != b.numel() || a.scalar_type() != b.scalar_type()) {
        return fail(concat(kind_name(op.kind), ": rank 0 has ", a.numel(), " x ",
                           a.scalar_type(), " but rank ", r, " has ", b.numel(), " x ",
                           b.scalar_type()));
      }
    }
    switch (op.kind) {
      case Kind::kAllreduce:
      case Kind::kBroadcast: {
        int64_t numel = op.tensors[0].numel();
        int64_t item = static_cast<int64_t>(op.tensors[0].element_size());
        op.slice_numel = std::max<int64_t>(1, state_->options.slice_bytes() / item);
        op.slices = (numel + op.slice_numel - 1) / op.slice_numel;
        break;
      }
      case Kind::kAllgather:
      case Kind::kGather:
      case Kind::kScatter:
      case Kind::kReduceScatter: op.slices = op.tensors[0].numel() == 0 ? 0 : n; break;
      case Kind::kAllToAll: op.slices = n; break;
      case Kind::kReduce: {
        op.pieces.clear();
        for (size_t i = 0; i < op.lists[0].size(); ++i) {
          const auto& t = op.lists[0][i];
          const int64_t item = static_cast<int64_t>(t.element_size());
          const int64_t per = std::max<int64_t>(1, state_->options.slice_bytes() / item);
          for (int64_t lo = 0; lo < t.numel(); lo += per) {
            op.pieces.push_back({i, lo, std::min(per, t.numel() - lo)});
          }
        }
        op.slices = static_cast<int64_t>(op.pieces.size());
        break;
      }
      case Kind::kBarrier: op.slices = 0; break;
    }
  }

  std::shared_ptr<GroupState> state_;
};

}  // namespace

std::vector<ProcessGroupPtr> new_thread_groups(int size, const ThreadGroupOptions& options) {
  LOCKSTEP_CHECK(size >= 1, "new_thread_groups: expected size >= 1, but got ", size, ".");
  LOCKSTEP_CHECK(options.timeout().count() > 0 && options.slice_bytes() > 0,
                 "new_thread_groups: expected a positive timeout and slice_bytes, but got ",
                 options.timeout().count(), " ms and ", options.slice_bytes(), " bytes.");
  auto state = std::make_shared<GroupState>();
  state->size = size;
  state->options = options;
  state->issued.assign(size, 0);
  auto store = std::make_shared<Store>(Store::hash());
  std::vector<ProcessGroupPtr> groups;
  for (int r = 0; r < size; ++r) groups.push_back(std::make_shared<ThreadGroup>(r, state, store));
  return groups;
}

void abort_thread_groups(const ProcessGroupPtr& group, const std::string& reason) {
  auto* tg = dynamic_cast<ThreadGroup*>(group.get());
  LOCKSTEP_CHECK(tg != nullptr, "abort_thread_groups: expected a group from new_thread_groups, "
                 "but got backend '", group ? group->backend() : std::string("null"), "'.");
  tg->state()->abort(std::make_exception_ptr(
      CommError(concat("[thread group of ", tg->size(), "] aborted: ", reason))));
}

}  // namespace lockstep
