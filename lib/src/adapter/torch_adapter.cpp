// Every c10d and autograd-engine call of lockstep; see Note [Torch adapter].
#include "adapter/torch_adapter.h"

#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/version.h>

#include <mutex>

#include "lockstep/errors.h"

#ifndef USE_C10D_GLOO
#error "c10d's Gloo support is off: link the CMake target 'torch' (it defines USE_C10D_GLOO), not -ltorch."
#endif

namespace lockstep {

using detail::concat;

// ---------------------------------------------------------------------------------------------
// Store

struct Store::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  std::string description;
  int port = -1;
};

namespace {

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool looks_like_timeout(const std::string& what) {
  auto w = lower(what);
  return w.find("timed out") != std::string::npos || w.find("timeout") != std::string::npos;
}

// Runs a store operation, turning c10d's exceptions into lockstep's with the store's address.
template <typename F>
auto store_call(const Store::Impl& impl, const char* op, const std::string& key, F&& f) {
  try {
    return f();
  } catch (const lockstep::Error&) {
    throw;
  } catch (const std::exception& e) {
    std::string msg = concat("store ", op, "('", key, "') on ", impl.description, " failed: ",
                          e.what());
    if (looks_like_timeout(e.what())) {
      throw TimeoutError(msg + ". A rank may not have started or may have died; check every "
                               "rank's log, or raise LOCKSTEP_RENDEZVOUS_TIMEOUT.");
    }
    throw CommError(msg + ". The store server (rank 0 or the launcher) may have exited.");
  }
}

std::vector<uint8_t> to_bytes(const std::string& s) { return {s.begin(), s.end()}; }

// The first line of an exception's message without a trailing full stop, for embedding in
// one of ours (c10d appends C++ backtraces after the first line).
std::string brief(const std::exception& e) {
  std::string what = e.what();
  what = what.substr(0, what.find('\n'));
  while (!what.empty() && (what.back() == '.' || what.back() == ' ')) what.pop_back();
  return what;
}

}  // namespace

Store Store::tcp(const std::string& host, int port, bool is_server,
                 std::chrono::milliseconds timeout) {
  LOCKSTEP_CHECK(port >= 0 && port <= 65535, "Expected a TCP store port in [0, 65535], but got ",
                 port, ".");
  LOCKSTEP_CHECK(is_server || port > 0, "Expected a port > 0 to connect to the store at ", host,
                 ", but got 0.");
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<std::uint16_t>(port);
  opts.isServer = is_server;
  opts.waitWorkers = false;
  opts.timeout = timeout;
  auto impl = std::make_shared<Impl>();
  try {
    auto tcp = c10::make_intrusive<c10d::TCPStore>(host, opts);
    impl->port = tcp->getPort();
    impl->store = tcp;
  } catch (const std::exception& e) {
    auto first_line = brief(e);
    if (is_server) {
      throw CommError(concat("Could not host the rendezvous store on ", host, ":", port, ": ",
                          first_line, ". The port is probably in use by another job; pick a "
                          "free MASTER_PORT (or use lockstep-run --standalone)."));
    }
    throw TimeoutError(concat("Could not reach the rendezvous store at ", host, ":", port,
                           " within ", timeout.count() / 1000.0, " s: ", first_line,
                           ". Check MASTER_ADDR/MASTER_PORT, that rank 0 (or the launcher) is "
                           "running, and that no firewall blocks the port."));
  }
  impl->description = concat("tcp://", host, ":", impl->port);
  return Store(impl);
}

Store Store::file(const std::string& path, int world_size, std::chrono::milliseconds timeout) {
  LOCKSTEP_CHECK(!path.empty(), "Expected a file store path, but got an empty one.");
  LOCKSTEP_CHECK(world_size >= 1, "Expected world size >= 1 for the file store ", path,
                 ", but got ", world_size, ".");
  auto impl = std::make_shared<Impl>();
  try {
    impl->store = c10::make_intrusive<c10d::FileStore>(path, world_size);
  } catch (const std::exception& e) {
    throw CommError(concat("Could not open the file store ", path, ": ", e.what(),
                        ". Check that its directory exists and is writable by every rank."));
  }
  impl->store->setTimeout(timeout);
  impl->description = "file://" + path;
  return Store(impl);
}

Store Store::hash(std::chrono::milliseconds timeout) {
  auto impl = std::make_shared<Impl>();
  impl->store = c10::make_intrusive<c10d::HashStore>();
  impl->store->setTimeout(timeout);
  impl->description = "hash://in-process";
  return Store(impl);
}

Store Store::prefixed(const std::string& prefix) const {
  auto impl = std::make_shared<Impl>();
  impl->store = c10::make_intrusive<c10d::PrefixStore>(prefix, impl_->store);
  impl->description = impl_->description + "/" + prefix;
  impl->port = impl_->port;
  return Store(impl);
}

void Store::set(const std::string& key, const std::string& value) {
  store_call(*impl_, "set", key, [&] {
    impl_->store->set(key, to_bytes(value));
    return 0;
  });
}

std::string Store::get(const std::string& key) {
  return store_call(*impl_, "get", key, [&] {
    auto bytes = impl_->store->get(key);
    return std::string(bytes.begin(), bytes.end());
  });
}

int64_t Store::add(const std::string& key, int64_t delta) {
  return store_call(*impl_, "add", key, [&] { return impl_->store->add(key, delta); });
}

bool Store::check(const std::vector<std::string>& keys) {
  return store_call(*impl_, "check", keys.empty() ? "" : keys.front(),
                    [&] { return impl_->store->check(keys); });
}

void Store::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  store_call(*impl_, "wait", keys.empty() ? "" : keys.front(), [&] {
    impl_->store->wait(keys, timeout);
    return 0;
  });
}

bool Store::remove(const std::string& key) {
  return store_call(*impl_, "delete", key, [&] { return impl_->store->deleteKey(key); });
}

std::chrono::milliseconds Store::timeout() const { return impl_->store->getTimeout(); }

void Store::set_timeout(std::chrono::milliseconds timeout) { impl_->store->setTimeout(timeout); }

int Store::port() const { return impl_->port; }

std::string Store::describe() const { return impl_->description; }

// ---------------------------------------------------------------------------------------------
// Gloo process group

namespace adapter {

std::string torch_version() {
  return concat(TORCH_VERSION_MAJOR, ".", TORCH_VERSION_MINOR, ".", TORCH_VERSION_PATCH);
}

namespace {

c10d::ReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:  // Gloo has no average: sum, then divide (GlooWork::wait).
      return c10d::ReduceOp::SUM;
    case ReduceOp::kMin: return c10d::ReduceOp::MIN;
    case ReduceOp::kMax: return c10d::ReduceOp::MAX;
    case ReduceOp::kProduct: return c10d::ReduceOp::PRODUCT;
  }
  return c10d::ReduceOp::SUM;
}

// Wraps a c10d Work: translates failures and runs a completion step (e.g. the division of an
// average) exactly once, on the first successful wait.
class GlooWork : public Work {
 public:
  GlooWork(c10::intrusive_ptr<c10d::Work> work, std::string what, std::function<void()> then)
      : work_(std::move(work)), what_(std::move(what)), then_(std::move(then)) {}

  bool is_completed() override { return work_->isCompleted(); }

  void wait() override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (error_) std::rethrow_exception(error_);
    if (done_) return;
    try {
      work_->wait();
      if (then_) then_();
      done_ = true;
    } catch (const std::exception& e) {
      std::string what = e.what();
      std::string msg = concat(what_, " failed: ", brief(e));
      if (looks_like_timeout(what)) {
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
  c10::intrusive_ptr<c10d::Work> work_;
  std::string what_;
  std::function<void()> then_;
  std::mutex mutex_;
  bool done_ = false;
  std::exception_ptr error_;
};

class GlooGroup : public ProcessGroup {
 public:
  GlooGroup(int rank, int size, std::chrono::milliseconds timeout, std::shared_ptr<Store> store,
            c10::intrusive_ptr<c10d::ProcessGroupGloo> pg)
      : ProcessGroup(rank, size, timeout, std::move(store)), pg_(std::move(pg)) {}

  std::string backend() const override { return "gloo"; }

  WorkPtr allreduce(at::Tensor& tensor, ReduceOp op) override {
    check_allreduce(tensor, op);
    auto what = describe("allreduce", tensor, to_string(op));
    std::vector<at::Tensor> tensors{tensor};
    c10d::AllreduceOptions opts;
    opts.reduceOp = to_c10d(op);
    auto work = run(what, [&] { return pg_->allreduce(tensors, opts); });
    std::function<void()> then;
    if (op == ReduceOp::kAvg) {
      at::Tensor t = tensor;
      int n = size();
      then = [t, n]() mutable { t.div_(n); };
    }
    return std::make_shared<GlooWork>(std::move(work), what, std::move(then));
  }

  WorkPtr broadcast(at::Tensor& tensor, int root) override {
    check_tensor("broadcast", tensor);
    LOCKSTEP_CHECK(root >= 0 && root < size(), where(), " broadcast: expected root in [0, ",
                   size() - 1, "], but got ", root, ".");
    auto what = describe("broadcast", tensor, concat("root ", root));
    std::vector<at::Tensor> tensors{tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    auto work = run(what, [&] { return pg_->broadcast(tensors, opts); });
    return std::make_shared<GlooWork>(std::move(work), what, nullptr);
  }

  WorkPtr allgather(std::vector<at::Tensor>& outputs, const at::Tensor& input) override {
    check_allgather(outputs, input);
    auto what = describe("allgather", input, "");
    // Gloo 1.13 divides by the element count and dies of SIGFPE on an empty allgather;
    // there is nothing to exchange, so complete locally (every rank takes this branch).
    if (input.numel() == 0) return PromiseWork::completed();
    std::vector<std::vector<at::Tensor>> outs{outputs};
    std::vector<at::Tensor> ins{input};
    auto work = run(what, [&] { return pg_->allgather(outs, ins); });
    return std::make_shared<GlooWork>(std::move(work), what, nullptr);
  }

  WorkPtr barrier() override {
    auto what = concat(where(), " barrier #", next_sequence());
    auto work = run(what, [&] { return pg_->barrier(); });
    return std::make_shared<GlooWork>(std::move(work), what, nullptr);
  }

 private:
  std::string describe(const char* op, const at::Tensor& t, const std::string& extra) {
    return concat(where(), " ", op, " #", next_sequence(), " (", t.numel(), " x ", t.scalar_type(),
               extra.empty() ? "" : ", ", extra, ")");
  }

  template <typename F>
  c10::intrusive_ptr<c10d::Work> run(const std::string& what, F&& f) {
    try {
      return f();
    } catch (const lockstep::Error&) {
      throw;
    } catch (const std::exception& e) {
      throw CommError(concat(what, " could not start: ", brief(e)));
    }
  }

  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg_;
};

}  // namespace

ProcessGroupPtr make_gloo_group(int rank, int size, const std::shared_ptr<Store>& store,
                                std::chrono::milliseconds timeout, int threads,
                                const GlooDeviceSpec& device) {
  LOCKSTEP_CHECK(threads >= 1, "Expected at least 1 Gloo thread, but got ", threads, ".");
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  options->threads = threads;
  try {
    if (!device.ifname.empty()) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(device.ifname));
    } else if (!device.hostname.empty()) {
      options->devices.push_back(
          c10d::ProcessGroupGloo::createDeviceForHostname(device.hostname));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
  } catch (const std::exception& e) {
    throw InvalidArgument(concat("[rank ", rank, "/", size, "] could not create the Gloo device (",
                              device.ifname.empty() ? "host " + device.hostname
                                                    : "interface " + device.ifname,
                              "): ", brief(e),
                              ". Set LOCKSTEP_SOCKET_IFNAME to an interface that reaches the "
                              "other ranks (see `ip addr`)."));
  }
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
  try {
    pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store->impl()->store, rank, size, options);
  } catch (const std::exception& e) {
    std::string w = e.what();
    std::string msg = concat("[rank ", rank, "/", size, "] Gloo could not connect to its peers via ",
                          store->describe(), ": ", brief(e));
    if (looks_like_timeout(w)) {
      throw TimeoutError(msg + ". A rank did not reach the connection step in time; check every "
                               "rank's log.");
    }
    throw CommError(msg + ". Check that the ranks can reach each other (LOCKSTEP_SOCKET_IFNAME).");
  }
  return std::make_shared<GlooGroup>(rank, size, timeout, store, std::move(pg));
}

// ---------------------------------------------------------------------------------------------
// Autograd

namespace {

class LambdaPostHook : public torch::autograd::FunctionPostHook {
 public:
  explicit LambdaPostHook(std::function<void()> fn) : fn_(std::move(fn)) {}
  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list& outputs,
      const torch::autograd::variable_list& /*inputs*/) override {
    fn_();
    return outputs;
  }

 private:
  std::function<void()> fn_;
};

struct HookRegistration {
  std::shared_ptr<torch::autograd::Node> accumulator;
  uintptr_t key = 0;
  ~HookRegistration() {
    if (accumulator) accumulator->del_post_hook(key);
  }
};

}  // namespace

HookHandle add_grad_accumulated_hook(const at::Tensor& param, std::function<void()> hook) {
  LOCKSTEP_CHECK(param.requires_grad() && param.is_leaf(),
                 "Expected a leaf tensor that requires grad for a gradient hook.");
  auto registration = std::make_shared<HookRegistration>();
  registration->accumulator = torch::autograd::impl::grad_accumulator(param);
  LOCKSTEP_ASSERT(registration->accumulator != nullptr, "parameter has no grad accumulator");
  registration->key = registration->accumulator->add_post_hook(
      std::make_unique<LambdaPostHook>(std::move(hook)));
  return registration;
}

void queue_backward_callback(std::function<void()> callback) {
  torch::autograd::Engine::get_default_engine().queue_callback(std::move(callback));
}

}  // namespace adapter
}  // namespace lockstep

// ---------------------------------------------------------------------------------------------
// Optimizer state (for checkpoints)

#include <torch/optim/optimizer.h>

namespace lockstep {
namespace adapter {

namespace {
#if TORCH_VERSION_MAJOR >= 2
void* optimizer_state_key(const at::Tensor& param) { return param.unsafeGetTensorImpl(); }
#else
std::string optimizer_state_key(const at::Tensor& param) {
  return c10::guts::to_string(param.unsafeGetTensorImpl());
}
#endif
}  // namespace

torch::optim::OptimizerParamState* find_optimizer_state(torch::optim::Optimizer& optimizer,
                                                        const at::Tensor& param) {
  auto& state = optimizer.state();
  auto it = state.find(optimizer_state_key(param));
  return it == state.end() ? nullptr : it->second.get();
}

void set_optimizer_state(torch::optim::Optimizer& optimizer, const at::Tensor& param,
                         std::unique_ptr<torch::optim::OptimizerParamState> state) {
  optimizer.state()[optimizer_state_key(param)] = std::move(state);
}

}  // namespace adapter
}  // namespace lockstep
