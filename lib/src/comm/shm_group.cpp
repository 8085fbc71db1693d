// Shared-memory collectives within a host (ShmGroup), and make_group, which builds it or the
// hierarchical group.
#include "comm/shm_group.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <csignal>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "adapter/torch_adapter.h"
#include "comm/hier_group.h"
#include "comm/serial_executor.h"
#include "comm/shm_channel.h"
#include "comm/shm_kernels.h"
#include "comm/shm_segment.h"
#include "core/spin_wait.h"
#include "lockstep/errors.h"
#include "lockstep/log.h"

namespace lockstep {
namespace shm {

using comm::FailStop;
using comm::SerialExecutor;
using detail::concat;

// Note [Shared-memory protocol]
// One POSIX shared-memory segment per group, created by rank 0:
//   header | one cache line per rank (RankLine) | slot 0 .. slot W-1 | result
// Each slot and the result hold slot_bytes(W): about 32 MiB in all, 1 to 8 MiB per slot, so
// that a typical 25 MB DDP bucket takes few steps (every step costs two rendezvous, and on a
// busy machine each rendezvous may wait for a peer to be scheduled). Every collective is split into steps of at most
// one slot per rank, and every step has two phases. A phase ends when every rank has stored
// the phase number into its own `arrive` word; waiting for it spins briefly, then sleeps on
// the peer's `arrive` word with a futex (the arriving rank wakes sleepers only when its
// `waiters` count says there are any).
//   all-reduce step: 1. copy my chunk into my slot; arrive A. 2. after A, reduce my slice
//     (1/W of the chunk) over slots 0..W-1 in that fixed order into the result; arrive B.
//     3. after B, copy the whole result out. Every element is reduced by exactly one rank in
//     one fixed order, so every rank receives the same bits, run after run.
//   broadcast step: the root copies its chunk into its slot; A; the others copy it out; B.
//   all-gather step: each rank copies its chunk into its slot; A; all copy all slots out; B.
//   barrier: A; B.
// Reuse is safe without double buffering: a slot is only read between A and B of a step, and
// its owner writes it again only after B; the result is read after B, and written again only
// after the next A, which no rank reaches before it finished reading.
// Step 0's phase A also publishes each rank's signature (operation, dtype, count, root or op,
// sequence number); a rank that issued a different collective is named instead of silently
// corrupting data.
//
// Note [Shared-memory faults]
// Every wait is bounded by the collective's deadline. While asleep, a waiter wakes at least
// every 20 ms and checks, for the peer it waits on: the group-wide abort word, whether the
// peer left (destroyed its group; `departed`), and whether its process still exists (a pidfd
// opened at rendezvous, else kill(pid, 0)). The first rank that finds a fault records it in
// the abort word (kind, culprit, finder, sequence number) and wakes every sleeper, so every
// survivor fails within milliseconds with a message naming the culprit. After a failure the
// group is unusable; every later collective fails with the same error.
// The segment is mode 0600, named /lockstep-<job>-<random token>, and unlinked by the last
// rank to map it (before the group constructor returns on any rank), so a crash at any later
// point leaves nothing in /dev/shm: the kernel frees the memory with the last mapping.

namespace {

constexpr auto kSpinFor = std::chrono::microseconds(50);
constexpr auto kMaxSleep = std::chrono::milliseconds(20);

// Note [Spinning only on spare cores]
// Spinning before sleeping saves a futex round trip (a few microseconds) only when the peer
// runs on another core at that moment. When the host's ranks already occupy every core (2
// ranks x 1 intra-op thread on 2 cores, the benchmark's setting), a spinning collective thread
// takes the core away from a rank's backward pass, which is the very work the peer is waiting
// for. So the group spins only when the CPUs this process may run on outnumber the threads the
// host's ranks compute with (ranks x intra-op threads); otherwise it goes straight to the futex.
// The sleep itself has no periodic wakeups beyond the liveness check every kMaxSleep: an
// arriving rank wakes sleepers through `waiters` (Note [Shared-memory protocol]).
int usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

std::chrono::microseconds spin_budget(int local_ranks) {
  const int busy = local_ranks * std::max(1, at::get_num_threads());
  return usable_cpus() > busy ? kSpinFor : std::chrono::microseconds(0);
}


enum class OpKind : uint32_t { kNone = 0, kAllreduce, kBroadcast, kAllgather, kBarrier,
                                kAllreduceShared, kGather, kScatter, kAllToAll };
enum class Fault : uint64_t { kNone = 0, kDied, kDeparted, kTimeout, kMismatch };

const char* op_name(OpKind k) {
  switch (k) {
    case OpKind::kAllreduce: return "allreduce";
    case OpKind::kAllreduceShared: return "allreduce (shared buffer)";
    case OpKind::kBroadcast: return "broadcast";
    case OpKind::kAllgather: return "allgather";
    case OpKind::kBarrier: return "barrier";
    case OpKind::kGather: return "gather";
    case OpKind::kScatter: return "scatter";
    case OpKind::kAllToAll: return "all_to_all_single";
    case OpKind::kNone: break;
  }
  return "none";
}


// ShmGroup

class ShmGroup : public ProcessGroup {
 public:
  ShmGroup(int rank, int size, std::chrono::milliseconds timeout, std::shared_ptr<Store> store,
           std::chrono::milliseconds rendezvous_timeout, const std::string& job_id)
      : ProcessGroup(rank, size, timeout, store),
        segment_(rank, size, *store, job_id, rendezvous_timeout),
        job_id_(job_id),
        rendezvous_timeout_(rendezvous_timeout),
        peers_(size) {
    for (int r = 0; r < size; ++r) {
      if (r == rank) continue;
      auto& l = segment_.line(r);
      peers_[r] = std::make_unique<PeerProcess>(l.pid, l.pid_ns);
    }
    if (size <= kChannelMaxRanks) {
      channel_ = std::make_unique<Channel>(rank, size, *store, job_id, rendezvous_timeout,
                                           timeout, spin_, segment_, peers_);
    }
    executor_ = std::make_unique<SerialExecutor>();
  }

  ~ShmGroup() override {
    executor_.reset();  // finishes queued collectives (each bounded by the timeout)
    channel_.reset();   // fails waiting sends and recvs
    auto& me = segment_.line(rank());
    me.departed.store(1);
    futex_wake_all(&me.arrive);
  }

  std::string backend() const override { return "shm"; }

  WorkPtr allreduce(at::Tensor& tensor, ReduceOp op) override {
    check_device("allreduce", tensor);
    check_allreduce(tensor, op);
    ReduceFn fn = pick_kernel(tensor.scalar_type(), op);
    LOCKSTEP_CHECK(fn != nullptr, where(), " allreduce: expected float32, float64, float16, "
                   "bfloat16 or an integer dtype, but got ", tensor.scalar_type(),
                   ". Use LOCKSTEP_TRANSPORT=gloo for other dtypes.");
    const bool avg = op == ReduceOp::kAvg;
    if (!tensor.device().is_cpu()) {  // Note [Device tensors over shared memory]
      std::shared_ptr<adapter::HostStaging> staging = adapter::stage_to_host(tensor);
      Call call = make_call(OpKind::kAllreduce, staging->host(), static_cast<int32_t>(op),
                            to_string(op));
      return post([this, call, staging, fn, avg]() mutable {
        const auto deadline = std::chrono::steady_clock::now() + timeout();
        await_staging(staging->wait_copied(deadline), call, "to host memory");
        at::Tensor host = staging->host();
        run_allreduce(call, host, fn, avg);
        await_staging(staging->copy_back(std::chrono::steady_clock::now() + timeout()), call,
                      "back to the device");
      });
    }
    if (auto buffer = find_buffer(tensor)) {  // Note [Shared reduction buffers]
      Call call = make_call(OpKind::kAllreduceShared, tensor, static_cast<int32_t>(op),
                            concat(to_string(op), ", shared buffer #", buffer->number));
      call.sig.buffer = buffer->number;
      return post([this, call, buffer, fn, avg] { run_allreduce_shared(call, *buffer, fn, avg); });
    }
    Call call = make_call(OpKind::kAllreduce, tensor, static_cast<int32_t>(op), to_string(op));
    at::Tensor t = tensor;
    return post([this, call, t, fn, avg] { run_allreduce(call, t, fn, avg); });
  }

  at::Tensor new_buffer(int64_t numel, const at::TensorOptions& options) override {
    LOCKSTEP_CHECK(numel >= 0, where(), " new_buffer: expected a non-negative element count, "
                   "but got ", numel, ".");
    const auto dtype = c10::typeMetaToScalarType(options.dtype());
    if (!options.device().is_cpu() || pick_kernel(dtype, ReduceOp::kSum) == nullptr) {
      return ProcessGroup::new_buffer(numel, options);
    }
    auto buffer = std::make_shared<SharedBuffer>();
    const size_t es = c10::elementSize(dtype);
    buffer->region_bytes = round_up(std::max<size_t>(1, numel * es), kPage);
    buffer->numel = numel;
    buffer->dtype = dtype;
    buffer->number = ++buffers_created_;
    buffer->mapping = std::make_unique<Mapping>(
        rank(), size(), *store(), concat("buffer", buffer->number), job_id_,
        buffer->region_bytes * size(), rendezvous_timeout_, nullptr);
    char* mine = buffer->region(rank());
    {
      std::lock_guard<std::mutex> lock(buffers_mutex_);
      for (auto it = buffers_.begin(); it != buffers_.end();) {
        it = it->second.expired() ? buffers_.erase(it) : std::next(it);
      }
      buffers_[mine] = buffer;
    }
    // The tensor owns the mapping: it stays mapped while the tensor (or a view) lives, and
    // any collective queued on it holds it too.
    return at::from_blob(
        mine, {numel}, [buffer](void*) mutable { buffer.reset(); },
        at::TensorOptions().dtype(dtype).device(at::kCPU));
  }

  std::string transport_for(const at::Tensor& tensor) override {
    return find_buffer(tensor) ? "shm (in place)" : "shm";
  }

  WorkPtr broadcast(at::Tensor& tensor, int root) override {
    check_device("broadcast", tensor);
    check_broadcast(tensor, root);
    Call call = make_call(OpKind::kBroadcast, tensor, root, concat("root ", root));
    if (!tensor.device().is_cpu()) {  // Note [Device tensors over shared memory]
      at::Tensor host = rank() == root ? tensor.to(at::kCPU)
                                       : at::empty(tensor.sizes(), tensor.options().device(at::kCPU));
      at::Tensor t = tensor;
      return post([this, call, host, t, root]() mutable {
        run_broadcast(call, host, root);
        if (rank() != root) t.copy_(host);
      });
    }
    at::Tensor t = tensor;
    return post([this, call, t, root] { run_broadcast(call, t, root); });
  }

  WorkPtr allgather(std::vector<at::Tensor>& outputs, const at::Tensor& input) override {
    check_device("allgather", input);
    for (const auto& out : outputs) check_device("allgather", out);
    check_allgather(outputs, input);
    Call call = make_call(OpKind::kAllgather, input, 0, "");
    bool on_device = !input.device().is_cpu();
    for (const auto& out : outputs) on_device = on_device || !out.device().is_cpu();
    if (on_device) {  // Note [Device tensors over shared memory]
      at::Tensor in = input.to(at::kCPU);
      std::vector<at::Tensor> host, outs = outputs;
      for (size_t i = 0; i < outputs.size(); ++i) host.push_back(at::empty_like(in));
      return post([this, call, in, host, outs]() mutable {
        run_allgather(call, in, host);
        for (size_t i = 0; i < outs.size(); ++i) outs[i].copy_(host[i]);
      });
    }
    at::Tensor in = input;
    std::vector<at::Tensor> outs = outputs;
    return post([this, call, in, outs] { run_allgather(call, in, outs); });
  }

  // Note [Shared-memory gather, scatter and all-to-all]
  // The arguments were checked and agreed on (Note [Checked collectives]); each step moves at
  // most one slot per rank, in the two phases of Note [Shared-memory protocol]:
  //   gather step: each rank copies its chunk into its slot; A; the root copies every slot
  //     out; B. Only the root reads: (W-1) N bytes copied in, (W-1) N out.
  //   scatter step: the root copies block r's chunk into slot r for every r; A; rank r
  //     copies slot r out; B. Only the root writes slots in this step, and it writes them
  //     again only after B, when nobody reads them.
  //   all-to-all step: each rank's slot is cut into W sub-slots; rank i copies the next
  //     piece of its block for rank j into sub-slot j; A; rank j copies sub-slot j of every
  //     slot out; B. The step count is the largest block's, known to every rank from the
  //     agreed split sizes; a rank's block to itself is copied directly.
  // Non-CPU tensors are staged through host copies (Note [Device tensors over shared memory]).
  WorkPtr run_gather(std::vector<at::Tensor>& outputs, const at::Tensor& input,
                     int root) override {
    if (input.numel() == 0) return PromiseWork::completed();  // every rank agreed on the count
    Call call = make_call(OpKind::kGather, input, root, concat("root ", root));
    at::Tensor in = input.device().is_cpu() ? input : input.to(at::kCPU);
    std::vector<at::Tensor> outs = outputs, host;
    for (const auto& o : outputs) host.push_back(o.device().is_cpu() ? o : at::empty_like(o, at::kCPU));
    return post([this, call, in, outs, host, root]() mutable {
      begin(call);
      const size_t es = in.element_size();
      const char* src = static_cast<const char*>(in.data_ptr());
      if (rank() == root) std::memcpy(host[root].data_ptr(), src, in.numel() * es);
      for_each_step(in.numel(), es, [&](int64_t off, int64_t count, bool first) {
        if (rank() != root) std::memcpy(segment_.slot(rank()), src + off * es, count * es);
        phase(call);
        if (first) verify(call);
        if (rank() == root) {
          for (int r = 0; r < size(); ++r) {
            if (r == root) continue;
            std::memcpy(static_cast<char*>(host[r].data_ptr()) + off * es, segment_.slot(r),
                        count * es);
          }
        }
        phase(call);
      });
      for (size_t i = 0; i < outs.size(); ++i) {
        if (!outs[i].device().is_cpu()) outs[i].copy_(host[i]);
      }
    });
  }

  WorkPtr run_scatter(at::Tensor& output, const std::vector<at::Tensor>& inputs,
                      int root) override {
    if (output.numel() == 0) return PromiseWork::completed();
    Call call = make_call(OpKind::kScatter, output, root, concat("root ", root));
    std::vector<at::Tensor> ins;
    for (const auto& t : inputs) ins.push_back(t.device().is_cpu() ? t : t.to(at::kCPU));
    at::Tensor out = output;
    at::Tensor host = output.device().is_cpu() ? output : at::empty_like(output, at::kCPU);
    return post([this, call, ins, out, host, root]() mutable {
      begin(call);
      const size_t es = host.element_size();
      char* dst = static_cast<char*>(host.data_ptr());
      if (rank() == root) std::memcpy(dst, ins[root].data_ptr(), host.numel() * es);
      for_each_step(host.numel(), es, [&](int64_t off, int64_t count, bool first) {
        if (rank() == root) {
          for (int r = 0; r < size(); ++r) {
            if (r == root) continue;
            std::memcpy(segment_.slot(r), static_cast<const char*>(ins[r].data_ptr()) + off * es,
                        count * es);
          }
        }
        phase(call);
        if (first) verify(call);
        if (rank() != root) std::memcpy(dst + off * es, segment_.slot(rank()), count * es);
        phase(call);
      });
      if (!out.device().is_cpu()) out.copy_(host);
    });
  }

  WorkPtr run_all_to_all(at::Tensor& output, const at::Tensor& input,
                         const std::vector<std::vector<int64_t>>& splits,
                         int64_t row) override {
    const int w = size(), me = rank();
    const int64_t es = static_cast<int64_t>(input.element_size());
    // Bytes from rank i to rank j, and the offsets of my blocks in my input and output.
    int64_t longest = 0;
    for (const auto& s : splits) {
      for (int64_t n : s) longest = std::max(longest, n * row * es);
    }
    if (longest == 0) return PromiseWork::completed();
    std::vector<int64_t> send_off(w), send_len(w), recv_off(w), recv_len(w);
    int64_t at_in = 0, at_out = 0;
    for (int j = 0; j < w; ++j) {
      send_off[j] = at_in;
      send_len[j] = splits[me][j] * row * es;
      at_in += send_len[j];
      recv_off[j] = at_out;
      recv_len[j] = splits[j][me] * row * es;
      at_out += recv_len[j];
    }
    Call call = make_call(OpKind::kAllToAll, input, 0, "");
    call.sig.numel = row;  // the element counts differ between ranks; rows must not
    at::Tensor in = input.device().is_cpu() ? input : input.to(at::kCPU);
    at::Tensor out = output;
    at::Tensor host = output.device().is_cpu() ? output : at::empty_like(output, at::kCPU);
    return post([this, call, in, out, host, longest, send_off, send_len, recv_off,
                 recv_len]() mutable {
      begin(call);
      const int w = size(), me = rank();
      const char* src = static_cast<const char*>(in.data_ptr());
      char* dst = static_cast<char*>(host.data_ptr());
      if (send_len[me] > 0) std::memcpy(dst + recv_off[me], src + send_off[me], send_len[me]);
      const int64_t sub = static_cast<int64_t>(segment_.slot_size()) / w / 64 * 64;
      const int64_t steps = (longest + sub - 1) / sub;
      for (int64_t k = 0; k < steps; ++k) {
        const int64_t lo = k * sub;
        for (int j = 0; j < w; ++j) {
          const int64_t n = std::min(sub, send_len[j] - lo);
          if (j != me && n > 0) std::memcpy(segment_.slot(me) + j * sub, src + send_off[j] + lo, n);
        }
        phase(call);
        if (k == 0) verify(call);
        for (int i = 0; i < w; ++i) {
          const int64_t n = std::min(sub, recv_len[i] - lo);
          if (i != me && n > 0) std::memcpy(dst + recv_off[i] + lo, segment_.slot(i) + me * sub, n);
        }
        phase(call);
      }
      if (!out.device().is_cpu()) out.copy_(host);
    });
  }

  Channel* channel() { return channel_.get(); }

  // Note [Shared-memory channel] (shm_channel.cpp); groups above kChannelMaxRanks through
  // the store (ProcessGroup's default).
  WorkPtr run_send(const at::Tensor& tensor, int dst, int tag) override {
    if (!channel_) return ProcessGroup::run_send(tensor, dst, tag);
    return channel_->send(tensor, dst, tag, channel_send_message(where(), tensor, dst, tag));
  }

  WorkPtr run_recv(at::Tensor& tensor, int src, int tag) override {
    if (!channel_) return ProcessGroup::run_recv(tensor, src, tag);
    return channel_->recv(tensor, src, tag, recv_message(where(), tensor, src, tag));
  }

  // How a recv names itself, and its check of what was sent; `src` numbered as `where` does.
  static ChannelMessage recv_message(const std::string& where, const at::Tensor& tensor, int src,
                                     int tag) {
    const at::ScalarType dtype = tensor.scalar_type();
    const int64_t numel = tensor.numel();
    return {concat(where, " recv from rank ", src, " (tag ", tag, ", ", numel, " x ", dtype,
                   ") via shm"),
            src,
            [where, src, tag, dtype, numel](int sent_tag, int64_t sent_dtype,
                                            int64_t sent_numel) {
              return p2p_mismatch(where, src, tag, dtype, numel, sent_tag, sent_dtype,
                                  sent_numel);
            }};
  }

  // Note [Subgroups]: a new segment among the members.
  ProcessGroupPtr make_subgroup(const std::vector<int>& ranks, int sub_rank, uint64_t /*id*/,
                                const std::shared_ptr<Store>& store) override {
    return std::make_shared<ShmGroup>(sub_rank, static_cast<int>(ranks.size()), timeout(), store,
                                      rendezvous_timeout_, job_id_);
  }

  WorkPtr barrier() override {
    Call call;
    call.sig.kind = static_cast<uint32_t>(OpKind::kBarrier);
    call.seq = next_sequence();
    call.sig.seq = static_cast<uint32_t>(call.seq);
    call.what = concat(where(), " barrier #", call.seq, " via shm");
    return post([this, call]() mutable {
      begin(call);
      phase(call);
      verify(call);
      phase(call);
    });
  }

 private:
  struct Call {
    Signature sig;
    uint64_t seq = 0;
    std::string what;
    std::chrono::steady_clock::time_point deadline;
  };

  // Note [Device tensors over shared memory]
  // A CUDA tensor (a DDP bucket of a model on a GPU, parameters broadcast at construction) is
  // staged through host memory. An all-reduce (DDP's buckets) stages asynchronously (Note
  // [Staging device tensors] in the adapter): the caller's thread only queues a copy into
  // pinned memory on a side stream, ordered after the kernels queued on its current stream,
  // so the autograd thread never waits for the GPU; the executor waits for that copy (within
  // the timeout), reduces, and copies the result back on the same stream, waiting for it, so
  // it is on the device when the Work completes. The other collectives copy on the caller's
  // thread (which orders the copy the same way, but blocks) and back on the executor.
  // Gloo stages CUDA tensors itself. Other devices are rejected.
  void await_staging(bool done, const Call& call, const char* direction) const {
    if (done) return;
    throw TimeoutError(concat(call.what, ": the copy of the CUDA tensor ", direction,
                              " did not finish within ", timeout().count(), " ms (a busy or "
                              "hung GPU). Check nvidia-smi; raise LOCKSTEP_TIMEOUT if the GPU "
                              "is merely slow."));
  }
  void check_device(const char* op, const at::Tensor& t) const {
    check_tensor(op, t);
    LOCKSTEP_CHECK(t.device().is_cpu() || t.device().is_cuda(), where(), " ", op,
                   ": the shared-memory transport takes CPU or CUDA tensors, but got one on ",
                   t.device(), ". Move it to the CPU, or use LOCKSTEP_TRANSPORT=gloo.");
  }

  Call make_call(OpKind kind, const at::Tensor& t, int32_t arg, const std::string& extra) {
    Call c;
    c.seq = next_sequence();
    c.sig.kind = static_cast<uint32_t>(kind);
    c.sig.dtype = static_cast<int32_t>(t.scalar_type());
    c.sig.numel = t.numel();
    c.sig.arg = arg;
    c.sig.seq = static_cast<uint32_t>(c.seq);
    c.what = concat(where(), " ", op_name(kind), " #", c.seq, " (", t.numel(), " x ",
                    t.scalar_type(), extra.empty() ? "" : ", ", extra, ") via shm");
    return c;
  }

  WorkPtr post(std::function<void()> task) { return executor_->post(fail_stop_.wrap(std::move(task))); }

  // --- phases -------------------------------------------------------------------------------

  void begin(Call& call) {
    call.deadline = std::chrono::steady_clock::now() + timeout();
    segment_.line(rank()).sig = call.sig;
  }

  void phase(const Call& call) {
    ++phase_;
    auto& me = segment_.line(rank());
    me.arrive.store(phase_, std::memory_order_seq_cst);
    if (me.waiters.load(std::memory_order_seq_cst) != 0) futex_wake_all(&me.arrive);
    for (int r = 0; r < size(); ++r) {
      if (r != rank()) wait_for(call, r, phase_);
    }
  }

  void wait_for(const Call& call, int peer, uint32_t target) {
    auto& line = segment_.line(peer);
    if (detail::spin_until(
            [&] { return reached(line.arrive.load(std::memory_order_acquire), target); }, spin_,
            [&] { check_abort(call); })) {
      return;
    }
    while (true) {
      if (reached(line.arrive.load(std::memory_order_acquire), target)) return;
      check_abort(call);
      if (line.departed.load()) fail(call, Fault::kDeparted, peer);
      if (peers_[peer] && peers_[peer]->dead()) fail(call, Fault::kDied, peer);
      auto now = std::chrono::steady_clock::now();
      if (now >= call.deadline) fail(call, Fault::kTimeout, peer);
      auto nap = std::min<std::chrono::nanoseconds>(kMaxSleep, call.deadline - now);
      line.waiters.fetch_add(1, std::memory_order_seq_cst);
      uint32_t v = line.arrive.load(std::memory_order_seq_cst);
      if (!reached(v, target) && segment_.header()->abort_word.load() == 0) {
        futex_wait(&line.arrive, v, nap);
      }
      line.waiters.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  void verify(const Call& call) {
    for (int r = 0; r < size(); ++r) {
      if (r == rank()) continue;
      if (!(segment_.line(r).sig == call.sig)) fail(call, Fault::kMismatch, r);
    }
  }

  [[noreturn]] void fail(const Call& call, Fault kind, int culprit) {
    uint64_t word = (static_cast<uint64_t>(kind) << 56) |
                    (static_cast<uint64_t>(culprit & 0xffff) << 40) |
                    (static_cast<uint64_t>(rank() & 0xffff) << 24) | (call.seq & 0xffffff);
    uint64_t expected = 0;
    segment_.header()->abort_word.compare_exchange_strong(expected, word);
    for (int r = 0; r < size(); ++r) futex_wake_all(&segment_.line(r).arrive);
    throw_fault(call, kind, culprit, rank());
  }

  void check_abort(const Call& call) {
    uint64_t word = segment_.header()->abort_word.load(std::memory_order_acquire);
    if (word == 0) return;
    throw_fault(call, static_cast<Fault>(word >> 56), static_cast<int>((word >> 40) & 0xffff),
                static_cast<int>((word >> 24) & 0xffff));
  }

  [[noreturn]] void throw_fault(const Call& call, Fault kind, int culprit, int finder) {
    std::string by = finder == rank() ? "" : concat(" (detected by rank ", finder, ")");
    std::string tail = " The group cannot be used any more; restart the job.";
    switch (kind) {
      case Fault::kDied: {
        int pid = segment_.line(culprit).pid;
        throw CommError(concat(call.what, ": rank ", culprit, " (pid ", pid,
                               ") died while its peers waited for it", by,
                               ". Check rank ", culprit, "'s log (killed, out of memory?).",
                               tail));
      }
      case Fault::kDeparted:
        throw CommError(concat(call.what, ": rank ", culprit,
                               " destroyed its process group (or exited) before taking part", by,
                               ". Every rank must issue the same collectives.", tail));
      case Fault::kTimeout:
        if (finder == rank() && peers_[culprit] && peers_[culprit]->stopped()) {
          throw TimeoutError(concat(call.what, ": rank ", culprit, " (pid ",
                                    segment_.line(culprit).pid, ") did not take part within ",
                                    timeout().count() / 1000.0,
                                    " s: it is stopped (SIGSTOP, Ctrl-Z or a debugger). Resume "
                                    "it with SIGCONT or kill it.", tail));
        }
        if (finder == rank()) {
          throw TimeoutError(concat(call.what, ": rank ", culprit, " did not take part within ",
                                    timeout().count() / 1000.0,
                                    " s (stalled, deadlocked or issuing other collectives). "
                                    "Check rank ", culprit,
                                    "'s log; raise LOCKSTEP_TIMEOUT if it is just slow.", tail));
        }
        throw CommError(concat(call.what, ": rank ", finder, " timed out waiting for rank ",
                               culprit, ".", tail));
      case Fault::kMismatch: {
        const Signature& s = segment_.line(culprit).sig;
        throw CommError(concat(call.what, ": rank ", culprit, " issued ",
                               op_name(static_cast<OpKind>(s.kind)), " #", s.seq, " (", s.numel,
                               " x ", c10::toString(static_cast<at::ScalarType>(
                                          s.dtype < 0 ? 0 : s.dtype)),
                               ", arg ", s.arg,
                               s.buffer != 0 ? concat(", shared buffer #", s.buffer) : "",
                               ") instead", by,
                               ". Every rank must issue the same collectives in the same order "
                               "with the same shapes.", tail));
      }
      case Fault::kNone: break;
    }
    throw InternalError(concat(call.what, ": unknown shared-memory fault ",
                               static_cast<int>(kind), "."));
  }

  // --- collectives --------------------------------------------------------------------------

  // Steps of at most one slot: [offset, offset + count) in elements.
  template <typename F>
  void for_each_step(int64_t numel, size_t elem, F&& f) {
    const int64_t per = static_cast<int64_t>(segment_.slot_size() / elem);
    int64_t offset = 0;
    bool first = true;
    do {
      int64_t count = std::min(per, numel - offset);
      f(offset, count, first);
      offset += count;
      first = false;
    } while (offset < numel);
  }

  void run_allreduce(Call call, const at::Tensor& t, ReduceFn fn, bool avg) {
    begin(call);
    char* data = static_cast<char*>(t.data_ptr());
    const size_t es = t.element_size();
    const int w = size();
    std::vector<const void*> srcs(w);
    for_each_step(t.numel(), es, [&](int64_t off, int64_t count, bool first) {
      // My slice of this step, in whole cache lines where possible.
      int64_t align = std::max<int64_t>(1, 64 / static_cast<int64_t>(es));
      int64_t per = (count + w - 1) / w;
      per = (per + align - 1) / align * align;
      int64_t lo = std::min(count, per * rank());
      int64_t hi = std::min(count, lo + per);
      // Peers read everything but my slice from my slot; I read my slice from my tensor.
      char* chunk = data + off * es;
      std::memcpy(segment_.slot(rank()), chunk, lo * es);
      std::memcpy(segment_.slot(rank()) + hi * es, chunk + hi * es, (count - hi) * es);
      phase(call);
      if (first) verify(call);
      if (hi > lo) {
        for (int r = 0; r < w; ++r) srcs[r] = (r == rank() ? chunk : segment_.slot(r)) + lo * es;
        void* dst = segment_.result() + lo * es;
        fn(&dst, 1, srcs.data(), w, hi - lo, avg);
      }
      phase(call);
      std::memcpy(data + off * es, segment_.result(), count * es);
    });
  }

  // Note [Shared reduction buffers]. The slices are whole cache lines where possible.
  void run_allreduce_shared(Call call, const SharedBuffer& buffer, ReduceFn fn, bool avg) {
    begin(call);
    const int w = size();
    const int64_t n = buffer.numel;
    const size_t es = c10::elementSize(buffer.dtype);
    const int64_t align = std::max<int64_t>(1, 64 / static_cast<int64_t>(es));
    const int64_t per = ((n + w - 1) / w + align - 1) / align * align;
    const int64_t lo = std::min(n, per * rank()), hi = std::min(n, per * (rank() + 1));
    phase(call);  // A: every region holds its rank's contribution
    verify(call);  // the same buffer on every rank, before writing into the peers' regions
    if (w == 1) return;
    check_abort(call);  // a peer that failed after A (the spin in phase() does not look)
    if (hi > lo) {
      std::vector<void*> slices(w);
      for (int q = 0; q < w; ++q) slices[q] = buffer.region(q) + lo * es;
      fn(slices.data(), w, slices.data(), w, hi - lo, avg);
    }
    phase(call);  // B: every region holds every reduced slice; nobody touches a region again
  }

  void run_broadcast(Call call, const at::Tensor& t, int root) {
    begin(call);
    char* data = static_cast<char*>(t.data_ptr());
    const size_t es = t.element_size();
    for_each_step(t.numel(), es, [&](int64_t off, int64_t count, bool first) {
      if (rank() == root) std::memcpy(segment_.slot(root), data + off * es, count * es);
      phase(call);
      if (first) verify(call);
      if (rank() != root) std::memcpy(data + off * es, segment_.slot(root), count * es);
      phase(call);
    });
  }

  void run_allgather(Call call, const at::Tensor& in, const std::vector<at::Tensor>& outs) {
    begin(call);
    const char* src = static_cast<const char*>(in.data_ptr());
    const size_t es = in.element_size();
    if (in.numel() > 0) std::memcpy(outs[rank()].data_ptr(), src, in.numel() * es);
    for_each_step(in.numel(), es, [&](int64_t off, int64_t count, bool first) {
      std::memcpy(segment_.slot(rank()), src + off * es, count * es);
      phase(call);
      if (first) verify(call);
      for (int r = 0; r < size(); ++r) {
        if (r == rank()) continue;
        std::memcpy(static_cast<char*>(outs[r].data_ptr()) + off * es, segment_.slot(r),
                    count * es);
      }
      phase(call);
    });
  }

  // The shared buffer `t` is exactly (all of this rank's region), or null.
  std::shared_ptr<SharedBuffer> find_buffer(const at::Tensor& t) {
    if (!t.defined() || !t.device().is_cpu() || !t.is_contiguous()) return nullptr;
    std::lock_guard<std::mutex> lock(buffers_mutex_);
    auto it = buffers_.find(t.data_ptr());
    if (it == buffers_.end()) return nullptr;
    auto buffer = it->second.lock();
    if (!buffer || buffer->numel != t.numel() || buffer->dtype != t.scalar_type()) return nullptr;
    return buffer;
  }

  Segment segment_;
  std::string job_id_;
  std::chrono::milliseconds rendezvous_timeout_;
  std::mutex buffers_mutex_;
  std::map<const void*, std::weak_ptr<SharedBuffer>> buffers_;
  uint64_t buffers_created_ = 0;
  std::vector<std::unique_ptr<PeerProcess>> peers_;
  uint32_t phase_ = 0;  // only the executor's thread touches it
  std::chrono::microseconds spin_{spin_budget(size())};  // Note [Spinning only on spare cores]
  FailStop fail_stop_;
  std::unique_ptr<Channel> channel_;          // send / recv
  std::unique_ptr<SerialExecutor> executor_;  // last: its thread uses everything above
};


}  // namespace

ChannelMessage channel_send_message(const std::string& where, const at::Tensor& tensor,
                                    int dst, int tag) {
  return {concat(where, " send to rank ", dst, " (tag ", tag, ", ", tensor.numel(), " x ",
                 tensor.scalar_type(), ") via shm"),
          dst, nullptr};
}

ChannelMessage channel_recv_message(const std::string& where, const at::Tensor& tensor,
                                    int src, int tag) {
  return ShmGroup::recv_message(where, tensor, src, tag);
}

Channel* channel_of(ProcessGroup& group) {
  auto* shm = dynamic_cast<ShmGroup*>(&group);
  return shm == nullptr ? nullptr : shm->channel();
}

std::string host_identity() {
  char name[256] = {0};
  gethostname(name, sizeof(name) - 1);
  std::string boot;
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::getline(in, boot);
  return concat(name, "/", boot.empty() ? "no-boot-id" : boot);
}

ProcessGroupPtr make_group(const GroupSpec& spec) {
  LOCKSTEP_ASSERT(static_cast<int>(spec.host_of_rank.size()) == spec.size,
                  "host list of ", spec.host_of_rank.size(), " for ", spec.size, " ranks");
  std::vector<std::vector<int>> hosts;
  std::map<std::string, int> index;
  for (int r = 0; r < spec.size; ++r) {
    auto it = index.emplace(spec.host_of_rank[r], static_cast<int>(hosts.size())).first;
    if (it->second == static_cast<int>(hosts.size())) hosts.emplace_back();
    hosts[it->second].push_back(r);
  }
  if (hosts.size() == 1) {
    return std::make_shared<ShmGroup>(spec.rank, spec.size, spec.timeout,
                                      std::make_shared<Store>(spec.store->prefixed("shm")),
                                      spec.rendezvous_timeout, spec.job_id);
  }
  int host = index.at(spec.host_of_rank[spec.rank]);
  const auto& members = hosts[host];
  int local_rank = static_cast<int>(std::find(members.begin(), members.end(), spec.rank) -
                                    members.begin());
  auto local_store =
      std::make_shared<Store>(spec.store->prefixed(concat("shm/host", host)));
  auto local = std::make_shared<ShmGroup>(local_rank, static_cast<int>(members.size()),
                                          spec.timeout, local_store, spec.rendezvous_timeout,
                                          spec.job_id);
  ProcessGroupPtr leaders;
  if (local_rank == 0) {
    LOCKSTEP_ASSERT(spec.make_leader_group != nullptr, "no leader group factory");
    auto leader_store = std::make_shared<Store>(spec.store->prefixed("hier/leaders"));
    leaders = spec.make_leader_group(host, static_cast<int>(hosts.size()), leader_store);
  }
  log_debug(concat("[rank ", spec.rank, "/", spec.size, "] hierarchical group: host ", host,
                   " of ", hosts.size(), ", local rank ", local_rank, " of ", members.size()));
  return make_hier_group(spec, std::move(hosts), host, std::move(local), std::move(leaders));
}

}  // namespace shm
}  // namespace lockstep
