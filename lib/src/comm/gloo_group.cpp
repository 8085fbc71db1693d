// The Gloo process group (see gloo_group.h).
#include "comm/gloo_group.h"

#include <unistd.h>

#include <ATen/ATen.h>

#include <cstdio>
#include <map>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

#include "comm/foreign_error.h"
#include "comm/serial_executor.h"
#include "comm/shm_group.h"
#include "comm/shm_segment.h"
#include "comm/store_impl.h"
#include "lockstep/errors.h"

namespace lockstep {
namespace comm {

using detail::concat;

namespace {

adapter::C10dReduceOp to_gloo(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:  // Gloo has no average: sum, then divide (then_work in allreduce).
      return adapter::C10dReduceOp::kSum;
    case ReduceOp::kMin: return adapter::C10dReduceOp::kMin;
    case ReduceOp::kMax: return adapter::C10dReduceOp::kMax;
    case ReduceOp::kProduct: return adapter::C10dReduceOp::kProduct;
  }
  return adapter::C10dReduceOp::kSum;
}

// Note [Naming the peer of a Gloo failure]
// Gloo reports a lost peer by its socket address ("Read error [127.0.0.1]:29083: Connection
// reset by peer"), which names no rank. So before connecting, every rank publishes
// "peer/<rank>" = "<pid> <pid namespace> <host identity>" in the group's store, and after the
// mesh is connected (every rank got past publishing) reads its peers'. When a collective fails
// with anything but a timeout, the failing rank checks the peers on its own host (same host
// identity and pid namespace) with PeerProcess (pidfd, else kill(pid, 0)) for up to
// kDeathGrace, in 20 ms slices (a process closes its sockets a moment before it becomes a
// zombie), and names every rank it found dead with its pid and host. Peers on other hosts
// cannot be checked without a network round trip that a dead host would not answer; the
// message then lists them so the user knows whose logs to read.
// A survivor that lost a connection itself exits too, so a third rank may find two dead
// peers: the victim and a survivor that already gave up. Every rank that sees a failure first
// sets "failed/<rank>", so the ranks found dead without that key are named as the cause and
// the others as having failed after them.
constexpr auto kDeathGrace = std::chrono::milliseconds(1000);

struct PeerInfo {
  std::string host;                      // host identity ("" when unknown)
  int pid = -1;
  std::unique_ptr<shm::PeerProcess> process;  // null when not on this host
};

class PeerTable {
 public:
  PeerTable(int rank, int size, std::shared_ptr<Store> store)
      : rank_(rank), peers_(size), store_(std::move(store)) {}

  static std::string my_entry() {
    return concat(getpid(), " ", shm::pid_namespace(), " ", shm::host_identity());
  }

  // After the mesh is connected; never fails (a peer without an entry stays unknown).
  void read() {
    Store& store = *store_;
    const std::string me = shm::host_identity();
    for (size_t r = 0; r < peers_.size(); ++r) {
      if (static_cast<int>(r) == rank_) continue;
      try {
        auto key = concat("peer/", r);
        if (!store.check({key})) continue;
        std::string v = store.get(key);
        long long pid = 0;
        unsigned long long ns = 0;
        int used = 0;
        if (sscanf(v.c_str(), "%lld %llu %n", &pid, &ns, &used) != 2) continue;
        peers_[r].pid = static_cast<int>(pid);
        peers_[r].host = v.substr(used);
        if (peers_[r].host == me) {
          auto process = std::make_unique<shm::PeerProcess>(static_cast<int>(pid), ns);
          if (process->pid() > 0) peers_[r].process = std::move(process);  // else not checkable
        }
      } catch (const std::exception&) {
      }
    }
  }

  struct Diagnosis {
    std::string cause;   // who died, or who may have
    std::string advice;  // whose log to read
  };

  // The peers on this host that are stopped (SIGSTOP, Ctrl-Z, a debugger), named for a
  // timeout's message; "" when none is, or none can be checked.
  std::string stopped_peers() const {
    std::string who;
    int n = 0;
    for (size_t r = 0; r < peers_.size(); ++r) {
      if (!peers_[r].process || !peers_[r].process->stopped()) continue;
      who += concat(n++ == 0 ? "" : ", ", "rank ", r, " (pid ", peers_[r].pid, ")");
    }
    if (n == 0) return "";
    return concat(who, n == 1 ? " is" : " are",
                  " stopped (SIGSTOP, Ctrl-Z or a debugger): resume with SIGCONT or kill it");
  }

  // Who among the peers died, as the cause of a lost connection.
  Diagnosis diagnose() const {
    try {
      store_->set(concat("failed/", rank_), "1");
    } catch (const std::exception&) {  // the store went with a dead peer: nothing to record
    }
    auto until = std::chrono::steady_clock::now() + kDeathGrace;
    std::vector<int> dead;
    bool checkable = false;
    for (const auto& p : peers_) checkable = checkable || p.process != nullptr;
    while (checkable) {
      for (size_t r = 0; r < peers_.size(); ++r) {
        if (peers_[r].process && peers_[r].process->dead()) dead.push_back(static_cast<int>(r));
      }
      if (!dead.empty() || std::chrono::steady_clock::now() >= until) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));  // polling pidfds
    }
    std::vector<int> followers;
    for (auto it = dead.begin(); it != dead.end() && dead.size() > 1;) {
      bool gave_up = false;
      try {
        gave_up = store_->check({concat("failed/", *it)});
      } catch (const std::exception&) {
      }
      if (gave_up) {
        followers.push_back(*it);
        it = dead.erase(it);
      } else {
        ++it;
      }
    }
    std::string after;
    for (int r : followers) {
      after += concat(after.empty() ? "; " : ", ", "rank ", r, " (pid ", peers_[r].pid,
                      ") failed after it");
    }
    if (!dead.empty()) {
      std::string who;
      for (size_t i = 0; i < dead.size(); ++i) {
        const auto& p = peers_[dead[i]];
        who += concat(i == 0 ? "" : (i + 1 == dead.size() ? " and " : ", "), "rank ", dead[i],
                      " (pid ", p.pid, " on ", host_name(p.host), ")");
      }
      return {concat(who, dead.size() == 1 ? " died while its peers waited for it"
                                           : " died while their peers waited for them",
                     after),
              concat("Check rank ", dead.front(), "'s log (killed, out of memory?)")};
    }
    std::string remote;
    std::vector<int> remote_ranks;
    for (size_t r = 0; r < peers_.size(); ++r) {
      if (static_cast<int>(r) == rank_ || peers_[r].process) continue;
      remote_ranks.push_back(static_cast<int>(r));
      remote += concat(remote.empty() ? "" : ", ", "rank ", r,
                       peers_[r].host.empty() ? "" : concat(" on ", host_name(peers_[r].host)));
    }
    if (remote.empty()) {
      return {"a peer closed its connection, but no rank on this host died (a peer may have "
              "failed and exited)",
              "Check the other ranks' logs"};
    }
    // Note [Naming a lost peer on another host]: every surviving rank that sees the failure
    // records "failed/<rank>" (above), so the remote ranks that record nothing within the
    // grace are the likely lost ones.
    std::vector<int> silent = remote_ranks;
    const auto quiet_until = std::chrono::steady_clock::now() + kDeathGrace;
    while (!silent.empty()) {
      for (auto it = silent.begin(); it != silent.end();) {
        bool reported = false;
        try {
          reported = store_->check({concat("failed/", *it)});
        } catch (const std::exception&) {  // the store went too: nothing more to learn
          silent.clear();
          break;
        }
        it = reported ? silent.erase(it) : it + 1;
      }
      if (silent.empty() || std::chrono::steady_clock::now() >= quiet_until) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));  // polling the store
    }
    if (!silent.empty() && silent.size() < remote_ranks.size()) {
      std::string who;
      for (size_t i = 0; i < silent.size(); ++i) {
        const auto& p = peers_[silent[i]];
        who += concat(i == 0 ? "" : ", ", "rank ", silent[i], " (pid ", p.pid, " on ",
                      host_name(p.host), ")");
      }
      return {concat("a peer closed its connection; no rank on this host died, and the other "
                     "remote ranks reported the failure within ", kDeathGrace.count() / 1000.0,
                     " s while ", who, silent.size() == 1 ? " did not: it" : " did not: they",
                     " probably died or lost the network"),
              concat("Check rank ", silent.front(), "'s log and host")};
    }
    return {concat("a peer closed its connection, and no rank on this host died; the lost peer "
                   "is among ", remote, " (their liveness cannot be checked from here)"),
            "Check their logs"};
  }

 private:
  static std::string host_name(const std::string& identity) {  // "name/boot-id" -> "name"
    auto slash = identity.find('/');
    return identity.empty() ? "an unknown host" : identity.substr(0, slash);
  }

  int rank_;
  std::vector<PeerInfo> peers_;
  std::shared_ptr<Store> store_;
};

// A c10d Work whose failure becomes a lockstep error naming the operation (`what`) and, for
// a lost connection, the peer (Note [Naming the peer of a Gloo failure]).
class GlooWork : public Work {
 public:
  GlooWork(adapter::C10dWorkPtr work, std::string what,
           std::shared_ptr<const PeerTable> peers)
      : work_(std::move(work)), what_(std::move(what)), peers_(std::move(peers)) {}

  bool is_completed() override { return work_->is_completed(); }

  void wait() override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (error_) std::rethrow_exception(error_);
    if (done_) return;
    try {
      work_->wait();
      done_ = true;
    } catch (const std::exception& e) {
      std::string msg = concat(what_, " failed: ", brief(e));
      if (looks_like_timeout(e.what())) {
        std::string stopped = peers_ ? peers_->stopped_peers() : "";
        error_ = std::make_exception_ptr(TimeoutError(
            stopped.empty()
                ? msg + ". A peer did not take part in time (stalled, stopped or deadlocked). "
                        "Check the other ranks' logs; raise LOCKSTEP_TIMEOUT if the operation "
                        "is slow."
                : concat(msg, ". ", stopped, ".")));
      } else {
        PeerTable::Diagnosis d{"a peer probably died or closed its connection",
                               "Check the other ranks' logs"};
        if (peers_) d = peers_->diagnose();
        error_ = std::make_exception_ptr(CommError(
            concat(what_, ": ", d.cause, " (Gloo: ", brief(e), "). ", d.advice,
                   ". The group cannot be used any more; restart the job.")));
      }
      std::rethrow_exception(error_);
    }
  }

 private:
  adapter::C10dWorkPtr work_;
  std::string what_;
  std::shared_ptr<const PeerTable> peers_;
  std::mutex mutex_;
  bool done_ = false;
  std::exception_ptr error_;
};

class GlooGroup : public ProcessGroup {
 public:
  GlooGroup(int rank, int size, std::chrono::milliseconds timeout, std::shared_ptr<Store> store,
            std::shared_ptr<adapter::C10dBackend> backend, std::shared_ptr<const PeerTable> peers,
            int threads, adapter::GlooDeviceSpec device)
      : ProcessGroup(rank, size, timeout, std::move(store)), backend_(std::move(backend)),
        peers_(std::move(peers)), threads_(threads), device_(std::move(device)) {}

  std::string backend() const override { return "gloo"; }

  WorkPtr allreduce(at::Tensor& tensor, ReduceOp op) override {
    check_allreduce(tensor, op);
    auto what = describe("allreduce", tensor, to_string(op));
    auto work = start(what, [&] { return backend_->allreduce(tensor, to_gloo(op)); });
    if (op != ReduceOp::kAvg) return work;
    at::Tensor t = tensor;
    const int n = size();
    return then_work(std::move(work), [t, n]() mutable { t.div_(n); });
  }

  WorkPtr broadcast(at::Tensor& tensor, int root) override {
    check_broadcast(tensor, root);
    auto what = describe("broadcast", tensor, concat("root ", root));
    return start(what, [&] { return backend_->broadcast(tensor, root); });
  }

  WorkPtr allgather(std::vector<at::Tensor>& outputs, const at::Tensor& input) override {
    check_allgather(outputs, input);
    auto what = describe("allgather", input, "");
    // Gloo 1.13 divides by the element count and dies of SIGFPE on an empty allgather;
    // there is nothing to exchange, so complete locally (every rank takes this branch).
    if (input.numel() == 0) return PromiseWork::completed();
    return start(what, [&] { return backend_->allgather(outputs, input); });
  }

  WorkPtr barrier() override {
    auto what = concat(where(), " barrier #", next_sequence());
    return start(what, [&] { return backend_->barrier(); });
  }

 protected:
  // The arguments were checked and agreed on (Note [Checked collectives]). Empty payloads
  // complete locally on every rank alike: Gloo 1.13 divides by the element count in places.
  WorkPtr run_gather(std::vector<at::Tensor>& outputs, const at::Tensor& input,
                     int root) override {
    auto what = describe("gather", input, concat("root ", root));
    if (input.numel() == 0) return PromiseWork::completed();
    at::Tensor in = input;
    return start(what, [&] { return backend_->gather(outputs, in, root); });
  }

  WorkPtr run_scatter(at::Tensor& output, const std::vector<at::Tensor>& inputs,
                      int root) override {
    auto what = describe("scatter", output, concat("root ", root));
    if (output.numel() == 0) return PromiseWork::completed();
    std::vector<at::Tensor> ins = inputs;
    return start(what, [&] { return backend_->scatter(output, ins, root); });
  }

  WorkPtr run_all_to_all(at::Tensor& output, const at::Tensor& input,
                         const std::vector<std::vector<int64_t>>& splits,
                         int64_t row) override {
    auto what = describe("all_to_all_single", input, "");
    int64_t total = 0;
    for (const auto& s : splits) total += std::accumulate(s.begin(), s.end(), int64_t{0});
    if (total == 0 || row == 0) return PromiseWork::completed();
    std::vector<int64_t> out_splits;
    for (const auto& s : splits) out_splits.push_back(s[rank()]);
    at::Tensor in = input;
    return start(what, [&] {
      return backend_->alltoall(output, in, out_splits, splits[rank()]);
    });
  }

  // Note [Subgroups]: a new mesh among the members, on the same device and thread count.
  ProcessGroupPtr make_subgroup(const std::vector<int>& ranks, int sub_rank, uint64_t /*id*/,
                                const std::shared_ptr<Store>& store) override {
    return make_gloo_group(sub_rank, static_cast<int>(ranks.size()), store, timeout(), threads_,
                           device_);
  }

  // Note [Gloo messages]
  // A message is two Gloo messages on lockstep's own slots: a header (int64 magic, tag, dtype,
  // element count) on kHeaderSlot, then the payload on kPayloadSlot (none when empty). Gloo
  // matches each slot's messages from one peer in order, so the user's tag is checked against
  // the header instead of choosing a slot. recv posts the header's recv at once (so recvs
  // from one peer match in call order) and, on one thread per source rank, waits for the
  // header, checks it against its tensor and only then posts the payload's recv, so a
  // mismatched message is never written into the caller's tensor: it is drained into scratch
  // memory (the sender's send completes) and the recv fails naming what was sent. One thread
  // per source keeps a recv from a slow peer from delaying a recv from another.
  static constexpr int kHeaderSlot = 0x4c530001;
  static constexpr int kPayloadSlot = 0x4c530002;
  static constexpr int64_t kMagic = 0x4c53503250ll;  // "LSP2P"

  WorkPtr run_send(const at::Tensor& tensor, int dst, int tag) override {
    auto what = describe("send", tensor, concat("to rank ", dst, ", tag ", tag));
    auto header = at::tensor({kMagic, static_cast<int64_t>(tag),
                              static_cast<int64_t>(tensor.scalar_type()), tensor.numel()},
                             at::kLong);
    std::vector<WorkPtr> works = {
        start(what, [&] { return backend_->send(header, dst, kHeaderSlot); })};
    at::Tensor payload = tensor.device().is_cpu() ? tensor : tensor.to(at::kCPU);
    if (payload.numel() > 0) {
      works.push_back(start(what, [&] { return backend_->send(payload, dst, kPayloadSlot); }));
    }
    return then_work(std::move(works), [header, payload] {});
  }

  WorkPtr run_recv(at::Tensor& tensor, int src, int tag) override {
    auto what = describe("recv", tensor, concat("from rank ", src, ", tag ", tag));
    auto header = at::zeros({4}, at::kLong);
    WorkPtr header_work = start(what, [&] { return backend_->recv(header, src, kHeaderSlot); });
    at::Tensor t = tensor;
    const std::string me = where();
    auto task = [this, what, header, header_work, t, src, tag, me]() mutable {
      header_work->wait();
      const int64_t* h = header.data_ptr<int64_t>();
      if (h[0] != kMagic) {
        throw CommError(concat(what, ": rank ", src, " sent a malformed message header. Are "
                               "the ranks running the same lockstep build?"));
      }
      std::string wrong = p2p_mismatch(me, src, tag, t.scalar_type(), t.numel(),
                                       static_cast<int>(h[1]), h[2], h[3]);
      if (!wrong.empty()) {
        const bool known = h[2] >= 0 && h[2] < static_cast<int64_t>(at::ScalarType::NumOptions);
        if (h[3] > 0 && known) {  // drain, so the sender's send completes
          auto scratch = at::empty({h[3]}, at::TensorOptions().dtype(
                                               static_cast<at::ScalarType>(h[2])));
          start(what, [&] { return backend_->recv(scratch, src, kPayloadSlot); })->wait();
        }
        throw InvalidArgument(wrong);
      }
      if (t.numel() == 0) return;
      at::Tensor host = t.device().is_cpu() ? t : at::empty_like(t, at::kCPU);
      start(what, [&] { return backend_->recv(host, src, kPayloadSlot); })->wait();
      if (!t.device().is_cpu()) t.copy_(host);
    };
    return executor_for(src).post(std::move(task));
  }

 private:
  comm::SerialExecutor& executor_for(int src) {
    std::lock_guard<std::mutex> lock(executors_mutex_);
    auto& e = recv_executors_[src];
    if (!e) e = std::make_unique<comm::SerialExecutor>();
    return *e;
  }

  std::string describe(const char* op, const at::Tensor& t, const std::string& extra) {
    return concat(where(), " ", op, " #", next_sequence(), " (", t.numel(), " x ",
                  t.scalar_type(), extra.empty() ? "" : ", ", extra, ")");
  }

  template <typename F>
  WorkPtr start(const std::string& what, F&& f) {
    try {
      return std::make_shared<GlooWork>(f(), what, peers_);
    } catch (const lockstep::Error&) {
      throw;
    } catch (const std::exception& e) {
      throw CommError(concat(what, " could not start: ", brief(e)));
    }
  }

  std::shared_ptr<adapter::C10dBackend> backend_;
  std::shared_ptr<const PeerTable> peers_;
  int threads_;
  adapter::GlooDeviceSpec device_;
  std::mutex executors_mutex_;
  std::map<int, std::unique_ptr<comm::SerialExecutor>> recv_executors_;  // last: uses the above
};

}  // namespace

ProcessGroupPtr make_gloo_group(int rank, int size, const std::shared_ptr<Store>& store,
                                std::chrono::milliseconds timeout, int threads,
                                const adapter::GlooDeviceSpec& device) {
  LOCKSTEP_CHECK(threads >= 1, "Expected at least 1 Gloo thread, but got ", threads, ".");
  std::shared_ptr<adapter::C10dBackend> backend;
  store->set(concat("peer/", rank), PeerTable::my_entry());  // Note [Naming the peer of a Gloo failure]
  try {
    backend = adapter::make_gloo_backend(store->impl()->kv, rank, size, timeout, threads, device);
  } catch (const adapter::GlooDeviceError& e) {
    throw InvalidArgument(concat("[rank ", rank, "/", size, "] could not create the Gloo device (",
                                 device.ifname.empty() ? "host " + device.hostname
                                                       : "interface " + device.ifname,
                                 "): ", brief(e),
                                 ". Set LOCKSTEP_SOCKET_IFNAME to an interface that reaches the "
                                 "other ranks (see `ip addr`)."));
  } catch (const lockstep::Error&) {
    throw;
  } catch (const std::exception& e) {
    std::string msg = concat("[rank ", rank, "/", size,
                             "] Gloo could not connect to its peers via ", store->describe(),
                             ": ", brief(e));
    if (looks_like_timeout(e.what())) {
      throw TimeoutError(msg + ". A rank did not reach the connection step in time; check every "
                               "rank's log.");
    }
    throw CommError(msg + ". Check that the ranks can reach each other (LOCKSTEP_SOCKET_IFNAME).");
  }
  auto peers = std::make_shared<PeerTable>(rank, size, store);
  peers->read();
  return std::make_shared<GlooGroup>(rank, size, timeout, store, std::move(backend),
                                     std::move(peers), threads, device);
}

}  // namespace comm
}  // namespace lockstep
