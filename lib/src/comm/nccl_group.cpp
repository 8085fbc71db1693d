// CUDA tensors on NCCL, the rest on the host transport (see nccl_group.h).
#include "comm/nccl_group.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <mutex>

#include "adapter/torch_adapter.h"
#include "comm/foreign_error.h"
#include "comm/store_impl.h"
#include "lockstep/errors.h"
#include "lockstep/log.h"

namespace lockstep {
namespace comm {

using detail::concat;

// Note [CUDA routing]
// Real GPU clusters reduce CUDA tensors with NCCL, GPU to GPU, without crossing host memory.
// But a job also runs collectives on CPU tensors (lockstep's own agreement checks, the
// sampler, metrics), which NCCL cannot take. So, like torch.distributed's default
// "cpu:gloo,cuda:nccl", the group users get is a router: a collective whose tensors are on
// CUDA goes to NCCL, anything else to the host transport (shm, hier or Gloo, chosen as for a
// CPU job). NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), and which GPU a
// rank uses is only known once it passes a tensor, so the route is decided at the group's
// first CUDA collective: every rank publishes "<device> <host>" in the group's store and
// reads everyone's (bounded by the rendezvous timeout), and plan_cuda_route, a pure function
// of that list, gives every rank the same answer. "auto" takes NCCL when every rank is on a
// distinct GPU and the host transport (staged through host memory) otherwise; "nccl" insists
// and fails with what to change. The route holds for the group's life. NCCL's communicator
// connects lazily too, at the first collective it runs. Point to point, not being collective,
// never decides: before the first CUDA collective a CUDA send or recv takes the host path, so
// a program must order its sends and recvs against its collectives alike on both ranks (as
// every program with collectives already does).
// Sequence numbers: the router numbers its own collectives for messages; the host group
// keeps its own count.
// Not yet run on a GPU: this tree was built only against CPU-only LibTorch (docs/gpu.md).

namespace {

std::string describe_device(const CudaPlacement& p) {
  return concat("cuda:", p.device, " on ", p.host.substr(0, p.host.find('/')));
}

}  // namespace

CudaRoute plan_cuda_route(const std::string& transport, bool nccl_compiled,
                          const std::vector<CudaPlacement>& ranks, const std::string& where) {
  const bool forced = transport == "nccl";
  LOCKSTEP_CHECK(forced || transport == "auto", where,
                 " plan_cuda_route: expected transport nccl or auto, but got '", transport, "'.");
  if (!nccl_compiled) {
    LOCKSTEP_CHECK(!forced, where, " LOCKSTEP_TRANSPORT=nccl: this lockstep has no NCCL "
                   "backend (LibTorch ", adapter::torch_version(), " was built without NCCL, "
                   "or lockstep's NCCL check failed at configure time: see its CMake output). "
                   "Use a CUDA build of LibTorch, or LOCKSTEP_TRANSPORT=auto to reduce CUDA "
                   "tensors through host memory.");
    return {false, "lockstep was built without NCCL"};
  }
  for (size_t r = 0; r < ranks.size(); ++r) {
    if (ranks[r].device >= 0) continue;
    LOCKSTEP_CHECK(!forced, where, " LOCKSTEP_TRANSPORT=nccl: rank ", r,
                   " passed a tensor that is not on CUDA to the group's first CUDA collective, "
                   "while others passed CUDA tensors. Every rank must pass tensors on the same "
                   "kind of device to one collective.");
    return {false, concat("rank ", r, " passed a non-CUDA tensor")};
  }
  std::map<std::pair<std::string, std::string>, size_t> first;
  for (size_t r = 0; r < ranks.size(); ++r) {
    const auto& p = ranks[r];
    const std::string gpu = p.gpu.empty() ? concat("cuda:", p.device) : p.gpu;
    auto [it, fresh] = first.emplace(std::make_pair(p.host, gpu), r);
    if (fresh) continue;
    std::string shared = concat("ranks ", it->second, " and ", r, " both use ",
                                describe_device(ranks[r]),
                                p.gpu.empty() ? "" : concat(" (GPU ", p.gpu, ")"));
    LOCKSTEP_CHECK(!forced, where, " LOCKSTEP_TRANSPORT=nccl: ", shared,
                   ", and NCCL refuses two ranks on one GPU. Give each rank its own GPU (start "
                   "one worker per GPU with `lockstep-run --nproc-per-node gpu` and bind it with "
                   "lockstep::bind_local_device), or use LOCKSTEP_TRANSPORT=auto to reduce "
                   "through host memory.");
    return {false, shared};
  }
  return {true, "every rank on its own GPU"};
}

namespace {

adapter::C10dReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return adapter::C10dReduceOp::kSum;
    case ReduceOp::kAvg: return adapter::C10dReduceOp::kAvg;  // ncclAvg
    case ReduceOp::kMin: return adapter::C10dReduceOp::kMin;
    case ReduceOp::kMax: return adapter::C10dReduceOp::kMax;
    case ReduceOp::kProduct: return adapter::C10dReduceOp::kProduct;
  }
  return adapter::C10dReduceOp::kSum;
}

// A NCCL Work whose failure becomes a lockstep error naming rank, operation and sequence
// number. wait() blocks the CPU until the collective is done on the GPU or the group's timeout
// passed (Note [NCCL adapter]: c10d's stream-only wait would never report a timeout), so once
// it returns the result is visible to every stream.
class NcclWork : public Work {
 public:
  NcclWork(adapter::C10dWorkPtr work, std::string what, std::chrono::milliseconds timeout)
      : work_(std::move(work)), what_(std::move(what)), timeout_(timeout) {}

  bool is_completed() override {
    try {
      return work_->is_completed();
    } catch (const std::exception&) {
      return true;  // failed: wait() reports it
    }
  }

  void wait() override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (error_) std::rethrow_exception(error_);
    if (done_) return;
    try {
      work_->wait(timeout_);
      done_ = true;
    } catch (const std::exception& e) {
      if (looks_like_timeout(e.what())) {
        error_ = std::make_exception_ptr(TimeoutError(concat(
            what_, " failed: NCCL: ", brief(e), ". A peer did not take part in time (stalled, "
            "stopped or dead). Check the other ranks' logs; raise LOCKSTEP_TIMEOUT if the "
            "operation is slow.")));
      } else {
        error_ = std::make_exception_ptr(CommError(concat(
            what_, " failed: NCCL: ", brief(e), ". Check the other ranks' logs (a peer may "
            "have died). The group cannot be used any more; restart the job.")));
      }
      std::rethrow_exception(error_);
    }
  }

 private:
  adapter::C10dWorkPtr work_;
  std::string what_;
  std::chrono::milliseconds timeout_;
  std::mutex mutex_;
  bool done_ = false;
  std::exception_ptr error_;
};

class CudaRoutingGroup : public ProcessGroup {
 public:
  CudaRoutingGroup(ProcessGroupPtr host, std::string transport,
                   std::vector<std::string> host_of_rank,
                   std::chrono::milliseconds rendezvous_timeout, HostGroupFactory make_host)
      : ProcessGroup(host->rank(), host->size(), host->timeout(), host->store()),
        host_(std::move(host)), transport_(std::move(transport)),
        host_of_rank_(std::move(host_of_rank)), rendezvous_timeout_(rendezvous_timeout),
        make_host_(std::move(make_host)) {}

  std::string backend() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    const bool nccl = transport_ == "nccl" || (decided_ && route_.nccl);
    return nccl ? "nccl+" + host_->backend() : host_->backend();
  }

  WorkPtr allreduce(at::Tensor& tensor, ReduceOp op) override {
    if (!on_nccl(tensor)) return host_->allreduce(tensor, op);
    check_allreduce(tensor, op);
    return start(describe("allreduce", tensor, to_string(op)),
                 [&] { return nccl_->allreduce(tensor, to_c10d(op)); });
  }

  WorkPtr broadcast(at::Tensor& tensor, int root) override {
    if (!on_nccl(tensor)) return host_->broadcast(tensor, root);
    check_broadcast(tensor, root);
    return start(describe("broadcast", tensor, concat("root ", root)),
                 [&] { return nccl_->broadcast(tensor, root); });
  }

  WorkPtr allgather(std::vector<at::Tensor>& outputs, const at::Tensor& input) override {
    if (!on_nccl(input)) return host_->allgather(outputs, input);
    check_allgather(outputs, input);
    return start(describe("allgather", input, ""),
                 [&] { return nccl_->allgather(outputs, input); });
  }

  WorkPtr reduce_scatter(at::Tensor& output, const std::vector<at::Tensor>& inputs,
                         ReduceOp op) override {
    if (!on_nccl(output)) return host_->reduce_scatter(output, inputs, op);
    return ProcessGroup::reduce_scatter(output, inputs, op);  // composed of this allreduce
  }

  WorkPtr reduce(std::vector<at::Tensor>& tensors, int root, ReduceOp op) override {
    if (tensors.empty() || !on_nccl(tensors.front())) return host_->reduce(tensors, root, op);
    return ProcessGroup::reduce(tensors, root, op);  // composed of this allreduce
  }

  WorkPtr barrier() override { return host_->barrier(); }

  at::Tensor new_buffer(int64_t numel, const at::TensorOptions& options) override {
    if (options.device().is_cuda()) return ProcessGroup::new_buffer(numel, options);
    return host_->new_buffer(numel, options);
  }

  std::string transport_for(const at::Tensor& tensor) override {
    if (tensor.is_cuda()) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (decided_) {
        return route_.nccl ? "nccl" : concat(host_->backend(), " (", route_.reason, ")");
      }
    }
    return host_->transport_for(tensor);
  }

 protected:
  ProcessGroupPtr make_subgroup(const std::vector<int>& ranks, int sub_rank, uint64_t /*id*/,
                                const std::shared_ptr<Store>& store) override {
    std::vector<std::string> hosts;
    for (int r : ranks) hosts.push_back(host_of_rank_[r]);
    auto host = make_host_(hosts, sub_rank, store);
    return std::make_shared<CudaRoutingGroup>(std::move(host), transport_, std::move(hosts),
                                              rendezvous_timeout_, make_host_);
  }

  // The checks and agreement ran on this group (Note [Checked collectives]); on the host path
  // the host group checks and agrees once more (a second small all-gather).
  WorkPtr run_gather(std::vector<at::Tensor>& outputs, const at::Tensor& input,
                     int root) override {
    if (!on_nccl(input)) return host_->gather(outputs, input, root);
    at::Tensor in = input;
    return start(describe("gather", input, concat("root ", root)),
                 [&] { return nccl_->gather(outputs, in, root); });
  }

  WorkPtr run_scatter(at::Tensor& output, const std::vector<at::Tensor>& inputs,
                      int root) override {
    if (!on_nccl(output)) return host_->scatter(output, inputs, root);
    std::vector<at::Tensor> ins = inputs;
    return start(describe("scatter", output, concat("root ", root)),
                 [&] { return nccl_->scatter(output, ins, root); });
  }

  WorkPtr run_all_to_all(at::Tensor& output, const at::Tensor& input,
                         const std::vector<std::vector<int64_t>>& splits,
                         int64_t /*row*/) override {
    if (!on_nccl(input)) return host_->all_to_all_single(output, input, column(splits),
                                                         splits[rank()]);
    at::Tensor in = input;
    return start(describe("all_to_all_single", input, ""), [&] {
      return nccl_->alltoall(output, in, column(splits), splits[rank()]);
    });
  }

  // Point to point: NCCL does not check what it receives, so a CUDA message is a header (tag,
  // dtype, element count) sent over the host group under one fixed tag, then the payload over
  // NCCL. The receiver compares the header with its own tag, dtype and count; a mismatched
  // payload is drained into scratch memory, so the sender's NCCL send completes, and the recv
  // fails naming both sides. The recv waits for the header on the caller's thread (within the
  // timeout) before it posts NCCL's recv, and NCCL's send and recv are not grouped: two ranks
  // that each recv (or each send a large tensor) before sending to the other deadlock until
  // the timeout, where the host path would not.
  static constexpr int kHeaderTag = 0x4c534e48;  // "LSNH"
  WorkPtr run_send(const at::Tensor& tensor, int dst, int tag) override {
    if (!tensor.is_cuda() || !decided_nccl()) return host_->send(tensor, dst, tag);
    auto header = at::tensor({static_cast<int64_t>(tag),
                              static_cast<int64_t>(tensor.scalar_type()), tensor.numel()},
                             at::kLong);
    auto header_work = host_->send(header, dst, kHeaderTag);
    if (tensor.numel() == 0) return header_work;
    at::Tensor payload = tensor;
    auto work = start(describe("send", tensor, concat("to rank ", dst, ", tag ", tag)),
                      [&] { return nccl_->send(payload, dst, 0); });
    return then_work({header_work, work}, [header] {});
  }

  WorkPtr run_recv(at::Tensor& tensor, int src, int tag) override {
    if (!tensor.is_cuda() || !decided_nccl()) return host_->recv(tensor, src, tag);
    auto what = describe("recv", tensor, concat("from rank ", src, ", tag ", tag));
    auto header = at::zeros({3}, at::kLong);
    host_->recv(header, src, kHeaderTag)->wait();  // on the caller's thread, within timeout()
    const int64_t* h = header.data_ptr<int64_t>();
    std::string wrong = p2p_mismatch(where(), src, tag, tensor.scalar_type(), tensor.numel(),
                                     static_cast<int>(h[0]), h[1], h[2]);
    if (!wrong.empty()) {
      const bool known = h[1] >= 0 && h[1] < static_cast<int64_t>(at::ScalarType::NumOptions);
      if (h[2] > 0 && known) {
        auto scratch = at::empty({h[2]}, tensor.options().dtype(static_cast<at::ScalarType>(h[1])));
        start(what, [&] { return nccl_->recv(scratch, src, 0); })->wait();
      }
      throw InvalidArgument(wrong);
    }
    if (tensor.numel() == 0) return PromiseWork::completed();
    at::Tensor t = tensor;
    return start(what, [&] { return nccl_->recv(t, src, 0); });
  }

 private:
  // The rows this rank receives from each rank: column rank() of every rank's input splits.
  std::vector<int64_t> column(const std::vector<std::vector<int64_t>>& splits) const {
    std::vector<int64_t> out;
    for (const auto& s : splits) out.push_back(s[rank()]);
    return out;
  }

  // True when `t` goes to NCCL; decides the route at the first CUDA tensor.
  bool on_nccl(const at::Tensor& t) { return t.is_cuda() && route_to_nccl(t); }

  // Point to point is not collective, so it cannot decide the route (the other ranks would
  // not publish their devices): before the first CUDA collective it takes the host path.
  bool decided_nccl() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return decided_ && route_.nccl;
  }

  bool route_to_nccl(const at::Tensor& t) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!decided_) decide(t);
    return route_.nccl;
  }

  // Note [CUDA routing]: every rank publishes its device and reads everyone's.
  void decide(const at::Tensor& t) {
    Store& store = *ProcessGroup::store();
    const int device = t.get_device();
    store.set(concat("cuda_route/", rank()),
              concat(device, " ", adapter::cuda_device_identity(device), " ",
                     host_of_rank_[rank()]));
    // The ranks reach their first CUDA collective at different times (one may still load
    // data): wait as long as a collective or a rendezvous may take, whichever is longer.
    const auto limit = std::max(rendezvous_timeout_, timeout());
    std::vector<CudaPlacement> placements(size());
    for (int r = 0; r < size(); ++r) {
      auto key = concat("cuda_route/", r);
      try {
        store.wait({key}, limit);
      } catch (const std::exception& e) {
        throw TimeoutError(concat(where(), " the first CUDA collective: rank ", r, " did not "
                                  "publish its CUDA device within ", limit.count(), " ms (",
                                  brief(e), "). Every rank must issue the same collectives in "
                                  "the same order, on tensors of the same kind of device; "
                                  "check rank ", r, "'s log."));
      }
      std::string v = store.get(key);
      auto first_space = v.find(' ');
      auto second_space = first_space == std::string::npos ? first_space
                                                           : v.find(' ', first_space + 1);
      int index = -1;
      try {
        index = std::stoi(v.substr(0, first_space));
      } catch (const std::exception&) {
        second_space = std::string::npos;
      }
      LOCKSTEP_CHECK(second_space != std::string::npos, where(),
                     " the first CUDA collective: rank ", r, " published a malformed device "
                     "entry '", v, "'. Are the ranks running the same lockstep build?");
      placements[r].device = index;
      placements[r].gpu = v.substr(first_space + 1, second_space - first_space - 1);
      placements[r].host = v.substr(second_space + 1);
    }
    route_ = plan_cuda_route(transport_, adapter::nccl_compiled(), placements, where());
    if (route_.nccl) {
      auto scoped = std::make_shared<Store>(store.prefixed("nccl"));
      try {
        nccl_ = adapter::make_nccl_backend(scoped->impl()->kv, rank(), size(), timeout());
      } catch (const std::exception& e) {
        throw CommError(concat(where(), " could not create the NCCL process group: ", brief(e),
                               ". Check that every rank sees its GPU (nvidia-smi, "
                               "CUDA_VISIBLE_DEVICES)."));
      }
    }
    log_info(concat(where(), " CUDA tensors go ",
                    route_.nccl ? std::string("over NCCL") : "through host memory over " +
                                                                   host_->backend(),
                    ": ", route_.reason, "."));
    decided_ = true;
  }

  std::string describe(const char* op, const at::Tensor& t, const std::string& extra) {
    return concat(where(), " ", op, " #", next_sequence(), " (", t.numel(), " x ",
                  t.scalar_type(), extra.empty() ? "" : ", ", extra, ") via nccl");
  }

  template <typename F>
  WorkPtr start(const std::string& what, F&& f) {
    try {
      return std::make_shared<NcclWork>(f(), what, timeout());
    } catch (const lockstep::Error&) {
      throw;
    } catch (const std::exception& e) {
      throw CommError(concat(what, " could not start: NCCL: ", brief(e)));
    }
  }

  ProcessGroupPtr host_;
  std::string transport_;
  std::vector<std::string> host_of_rank_;
  std::chrono::milliseconds rendezvous_timeout_;
  HostGroupFactory make_host_;
  mutable std::mutex mutex_;
  bool decided_ = false;
  CudaRoute route_;
  std::shared_ptr<adapter::C10dBackend> nccl_;
};

}  // namespace

ProcessGroupPtr make_cuda_routing_group(ProcessGroupPtr host, std::string transport,
                                        std::vector<std::string> host_of_rank,
                                        std::chrono::milliseconds rendezvous_timeout,
                                        HostGroupFactory make_host) {
  LOCKSTEP_CHECK(host != nullptr && static_cast<int>(host_of_rank.size()) == host->size(),
                 "make_cuda_routing_group: expected a host group and one host per rank.");
  return std::make_shared<CudaRoutingGroup>(std::move(host), std::move(transport),
                                            std::move(host_of_rank), rendezvous_timeout,
                                            std::move(make_host));
}

}  // namespace comm
}  // namespace lockstep
