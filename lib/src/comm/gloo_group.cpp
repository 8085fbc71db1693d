// The Gloo process group (see gloo_group.h).
#include "comm/gloo_group.h"

#include <mutex>

#include "comm/foreign_error.h"
#include "comm/store_impl.h"
#include "lockstep/errors.h"

namespace lockstep {
namespace comm {

using detail::concat;

namespace {

adapter::GlooReduceOp to_gloo(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:  // Gloo has no average: sum, then divide (then_work in allreduce).
      return adapter::GlooReduceOp::kSum;
    case ReduceOp::kMin: return adapter::GlooReduceOp::kMin;
    case ReduceOp::kMax: return adapter::GlooReduceOp::kMax;
    case ReduceOp::kProduct: return adapter::GlooReduceOp::kProduct;
  }
  return adapter::GlooReduceOp::kSum;
}

// A c10d Work whose failure becomes a lockstep error naming the operation (`what`).
class GlooWork : public Work {
 public:
  GlooWork(adapter::GlooWorkHandlePtr work, std::string what)
      : work_(std::move(work)), what_(std::move(what)) {}

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
        error_ = std::make_exception_ptr(TimeoutError(
            msg + ". A peer did not take part in time (stalled, stopped or deadlocked). Check "
                  "the other ranks' logs; raise LOCKSTEP_TIMEOUT if the operation is slow."));
      } else {
        error_ = std::make_exception_ptr(CommError(
            msg + ". A peer probably died or closed its connection; the group cannot be used "
                  "any more. Check the other ranks' logs, then restart the job."));
      }
      std::rethrow_exception(error_);
    }
  }

 private:
  adapter::GlooWorkHandlePtr work_;
  std::string what_;
  std::mutex mutex_;
  bool done_ = false;
  std::exception_ptr error_;
};

class GlooGroup : public ProcessGroup {
 public:
  GlooGroup(int rank, int size, std::chrono::milliseconds timeout, std::shared_ptr<Store> store,
            std::shared_ptr<adapter::GlooBackend> backend)
      : ProcessGroup(rank, size, timeout, std::move(store)), backend_(std::move(backend)) {}

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

 private:
  std::string describe(const char* op, const at::Tensor& t, const std::string& extra) {
    return concat(where(), " ", op, " #", next_sequence(), " (", t.numel(), " x ",
                  t.scalar_type(), extra.empty() ? "" : ", ", extra, ")");
  }

  template <typename F>
  WorkPtr start(const std::string& what, F&& f) {
    try {
      return std::make_shared<GlooWork>(f(), what);
    } catch (const lockstep::Error&) {
      throw;
    } catch (const std::exception& e) {
      throw CommError(concat(what, " could not start: ", brief(e)));
    }
  }

  std::shared_ptr<adapter::GlooBackend> backend_;
};

}  // namespace

ProcessGroupPtr make_gloo_group(int rank, int size, const std::shared_ptr<Store>& store,
                                std::chrono::milliseconds timeout, int threads,
                                const adapter::GlooDeviceSpec& device) {
  LOCKSTEP_CHECK(threads >= 1, "Expected at least 1 Gloo thread, but got ", threads, ".");
  std::shared_ptr<adapter::GlooBackend> backend;
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
  return std::make_shared<GlooGroup>(rank, size, timeout, store, std::move(backend));
}

}  // namespace comm
}  // namespace lockstep
