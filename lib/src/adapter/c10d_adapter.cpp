// The adapter's c10d half: c10d's stores, ProcessGroupGloo and (where LibTorch has it and
// CMake's check passed, Note [NCCL adapter]) ProcessGroupNCCL behind the version-neutral
// handles of torch_adapter.h. See Note [Torch adapter]. Nothing here translates errors:
// c10d's exceptions travel up to comm/, which names rank, operation and peer.
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/version.h>
#if defined(LOCKSTEP_WITH_NCCL)
#include <cuda_runtime_api.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cstdlib>

#include "adapter/torch_adapter.h"
#include "lockstep/errors.h"

#ifndef USE_C10D_GLOO
#error "c10d's Gloo support is off: link the CMake target 'torch' (it defines USE_C10D_GLOO), not -ltorch."
#endif

namespace lockstep {
namespace adapter {

using detail::concat;

std::string torch_version() {
  return concat(TORCH_VERSION_MAJOR, ".", TORCH_VERSION_MINOR, ".", TORCH_VERSION_PATCH);
}

namespace {

std::vector<uint8_t> to_bytes(const std::string& s) { return {s.begin(), s.end()}; }
std::string to_string(const std::vector<uint8_t>& b) { return {b.begin(), b.end()}; }

// ---------------------------------------------------------------------------------------------
// c10d store -> KeyValueStore

class C10dKeyValueStore : public detail::KeyValueStore {
 public:
  explicit C10dKeyValueStore(c10::intrusive_ptr<c10d::Store> store) : store_(std::move(store)) {}

  void set(const std::string& key, const std::string& value) override {
    store_->set(key, to_bytes(value));
  }
  std::string get(const std::string& key) override { return to_string(store_->get(key)); }
  int64_t add(const std::string& key, int64_t delta) override { return store_->add(key, delta); }
  std::string compare_set(const std::string& key, const std::string& expected,
                          const std::string& desired) override {
    return to_string(store_->compareSet(key, to_bytes(expected), to_bytes(desired)));
  }
  bool check(const std::vector<std::string>& keys) override { return store_->check(keys); }
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override {
    store_->wait(keys, timeout);
  }
  bool remove(const std::string& key) override { return store_->deleteKey(key); }
  int64_t num_keys() override { return store_->getNumKeys(); }
  std::chrono::milliseconds timeout() const override { return store_->getTimeout(); }
  void set_timeout(std::chrono::milliseconds timeout) override { store_->setTimeout(timeout); }

 private:
  c10::intrusive_ptr<c10d::Store> store_;
};

// ---------------------------------------------------------------------------------------------
// KeyValueStore -> c10d store, for ProcessGroupGloo

// Note [Forwarding store]
// ProcessGroupGloo takes a c10d::Store. lockstep's stores (its own authenticated TCP store,
// prefixed views) are KeyValueStores, so Gloo gets this forwarding c10d::Store over one.
// get() waits with this store's own timeout (set by ProcessGroupGloo's callers through
// setTimeout), not the underlying store's. The methods carry no `override`: LibTorch 2.x
// added a pure virtual clone() that 1.13 lacks, and a method without `override` overrides it
// where it exists and is a plain member where it does not.
class ForwardingStore : public c10d::Store {
 public:
  explicit ForwardingStore(std::shared_ptr<detail::KeyValueStore> kv)
      : c10d::Store(kv->timeout()), kv_(std::move(kv)) {}

  void set(const std::string& key, const std::vector<uint8_t>& value) {
    kv_->set(key, to_string(value));
  }
  std::vector<uint8_t> compareSet(const std::string& key, const std::vector<uint8_t>& expected,
                                  const std::vector<uint8_t>& desired) {
    return to_bytes(kv_->compare_set(key, to_string(expected), to_string(desired)));
  }
  std::vector<uint8_t> get(const std::string& key) {
    kv_->wait({key}, timeout_);
    return to_bytes(kv_->get(key));
  }
  int64_t add(const std::string& key, int64_t value) { return kv_->add(key, value); }
  bool deleteKey(const std::string& key) { return kv_->remove(key); }
  bool check(const std::vector<std::string>& keys) { return kv_->check(keys); }
  int64_t getNumKeys() { return kv_->num_keys(); }
  void wait(const std::vector<std::string>& keys) { kv_->wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) {
    kv_->wait(keys, timeout);
  }
  c10::intrusive_ptr<c10d::Store> clone() {
    auto copy = c10::make_intrusive<ForwardingStore>(kv_);
    copy->setTimeout(timeout_);
    return copy;
  }

 private:
  std::shared_ptr<detail::KeyValueStore> kv_;
};

// ---------------------------------------------------------------------------------------------
// ProcessGroupGloo and ProcessGroupNCCL: c10d gives both the same collective calls

c10d::ReduceOp to_c10d(C10dReduceOp op) {
  switch (op) {
    case C10dReduceOp::kSum: return c10d::ReduceOp::SUM;
    case C10dReduceOp::kAvg: return c10d::ReduceOp::AVG;
    case C10dReduceOp::kMin: return c10d::ReduceOp::MIN;
    case C10dReduceOp::kMax: return c10d::ReduceOp::MAX;
    case C10dReduceOp::kProduct: return c10d::ReduceOp::PRODUCT;
  }
  return c10d::ReduceOp::SUM;
}

class C10dWorkImpl : public C10dWork {
 public:
  explicit C10dWorkImpl(c10::intrusive_ptr<c10d::Work> work) : work_(std::move(work)) {}
  bool is_completed() override { return work_->isCompleted(); }
  void wait(std::chrono::milliseconds timeout) override {
    if (timeout.count() > 0) {
      work_->wait(timeout);
    } else {
      work_->wait();
    }
  }

 private:
  c10::intrusive_ptr<c10d::Work> work_;
};

C10dWorkPtr wrap(c10::intrusive_ptr<c10d::Work> work) {
  return std::make_shared<C10dWorkImpl>(std::move(work));
}

template <typename ProcessGroupT>
class C10dBackendOf : public C10dBackend {
 public:
  explicit C10dBackendOf(c10::intrusive_ptr<ProcessGroupT> pg) : pg_(std::move(pg)) {}

  C10dWorkPtr allreduce(at::Tensor& tensor, C10dReduceOp op) override {
    std::vector<at::Tensor> tensors{tensor};
    c10d::AllreduceOptions opts;
    opts.reduceOp = to_c10d(op);
    return wrap(pg_->allreduce(tensors, opts));
  }
  C10dWorkPtr broadcast(at::Tensor& tensor, int root) override {
    std::vector<at::Tensor> tensors{tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    return wrap(pg_->broadcast(tensors, opts));
  }
  C10dWorkPtr allgather(std::vector<at::Tensor>& outputs, const at::Tensor& input) override {
    std::vector<std::vector<at::Tensor>> outs{outputs};
    std::vector<at::Tensor> ins{input};
    return wrap(pg_->allgather(outs, ins));
  }
  C10dWorkPtr barrier() override { return wrap(pg_->barrier()); }
  C10dWorkPtr gather(std::vector<at::Tensor>& outputs, at::Tensor& input,
                           int root) override {
    std::vector<std::vector<at::Tensor>> outs;
    if (!outputs.empty()) outs.push_back(outputs);
    std::vector<at::Tensor> ins{input};
    c10d::GatherOptions opts;
    opts.rootRank = root;
    return wrap(pg_->gather(outs, ins, opts));
  }
  C10dWorkPtr scatter(at::Tensor& output, std::vector<at::Tensor>& inputs,
                            int root) override {
    std::vector<at::Tensor> outs{output};
    std::vector<std::vector<at::Tensor>> ins;
    if (!inputs.empty()) ins.push_back(inputs);
    c10d::ScatterOptions opts;
    opts.rootRank = root;
    return wrap(pg_->scatter(outs, ins, opts));
  }
  C10dWorkPtr alltoall(at::Tensor& output, at::Tensor& input,
                             std::vector<int64_t> output_splits,
                             std::vector<int64_t> input_splits) override {
    return wrap(pg_->alltoall_base(output, input, output_splits, input_splits));
  }
  C10dWorkPtr send(at::Tensor& tensor, int dst, int tag) override {
    std::vector<at::Tensor> tensors{tensor};
    return wrap(pg_->send(tensors, dst, tag));
  }
  C10dWorkPtr recv(at::Tensor& tensor, int src, int tag) override {
    std::vector<at::Tensor> tensors{tensor};
    return wrap(pg_->recv(tensors, src, tag));
  }

 private:
  c10::intrusive_ptr<ProcessGroupT> pg_;
};

}  // namespace

std::shared_ptr<detail::KeyValueStore> make_c10d_tcp_store(const std::string& host, int port,
                                                           bool is_server,
                                                           std::chrono::milliseconds timeout,
                                                           int* bound_port) {
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<std::uint16_t>(port);
  opts.isServer = is_server;
  opts.waitWorkers = false;
  opts.timeout = timeout;
  auto tcp = c10::make_intrusive<c10d::TCPStore>(host, opts);
  if (bound_port != nullptr) *bound_port = tcp->getPort();
  return std::make_shared<C10dKeyValueStore>(tcp);
}

std::shared_ptr<detail::KeyValueStore> make_c10d_file_store(const std::string& path,
                                                            int world_size,
                                                            std::chrono::milliseconds timeout) {
  c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::FileStore>(path, world_size);
  store->setTimeout(timeout);
  return std::make_shared<C10dKeyValueStore>(store);
}

std::shared_ptr<detail::KeyValueStore> make_c10d_hash_store(std::chrono::milliseconds timeout) {
  c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::HashStore>();
  store->setTimeout(timeout);
  return std::make_shared<C10dKeyValueStore>(store);
}

std::shared_ptr<C10dBackend> make_gloo_backend(std::shared_ptr<detail::KeyValueStore> store,
                                               int rank, int size,
                                               std::chrono::milliseconds timeout, int threads,
                                               const GlooDeviceSpec& device) {
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
    throw GlooDeviceError(e.what());
  }
  auto forwarding = c10::make_intrusive<ForwardingStore>(std::move(store));
  return std::make_shared<C10dBackendOf<c10d::ProcessGroupGloo>>(
      c10::make_intrusive<c10d::ProcessGroupGloo>(forwarding, rank, size, options));
}

// Note [NCCL adapter]
// ProcessGroupNCCL exists only in LibTorch builds with CUDA and NCCL (torch_cuda then defines
// USE_C10D_NCCL). This code cannot be compiled on a CPU-only LibTorch, so CMake first
// try-compiles this file with LOCKSTEP_WITH_NCCL against the LibTorch in use, with nccl.h's
// folder found (cmake/LockstepNccl.cmake), and defines it for the real build only when that
// succeeds; a LibTorch whose c10d moved on then costs lockstep its NCCL backend (with a
// configure message saying why), never the build.
// Timeouts: without blocking wait, c10d's NCCL Work::wait() only makes the current stream
// wait, and a collective that times out is caught by c10d's watchdog on its own copy of the
// Work: the caller's Work never learns of it, and by default (TORCH_NCCL_ASYNC_ERROR_HANDLING
// 3) the watchdog then kills the process. So comm/ waits with Work::wait(timeout), which
// blocks the CPU until the collective is done or the timeout passed and then throws (turned
// into a TimeoutError naming rank, operation and sequence number); the watchdog gets twice
// the timeout, as a backstop, and is told to clean up only (abort the communicator, no
// teardown) unless the user chose a mode (prepare_nccl_environment, called at
// init_process_group, before the group's threads start). Not yet run on a GPU (docs/gpu.md).
bool nccl_compiled() {
#if defined(LOCKSTEP_WITH_NCCL)
  return true;
#else
  return false;
#endif
}

void prepare_nccl_environment() {
#if defined(LOCKSTEP_WITH_NCCL)
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 2)
  const char* name = "TORCH_NCCL_ASYNC_ERROR_HANDLING";
#else
  const char* name = "NCCL_ASYNC_ERROR_HANDLING";
#endif
  if (std::getenv("TORCH_NCCL_ASYNC_ERROR_HANDLING") == nullptr &&
      std::getenv("NCCL_ASYNC_ERROR_HANDLING") == nullptr) {
    setenv(name, "2", 0);  // 2: CleanUpOnly
  }
#endif
}

std::string cuda_device_identity(int index) {
#if defined(LOCKSTEP_WITH_NCCL)
  char bus_id[64] = {0};
  if (cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id) - 1, index) == cudaSuccess) {
    return bus_id;
  }
#endif
  return "cuda:" + std::to_string(index);
}

std::shared_ptr<C10dBackend> make_nccl_backend(std::shared_ptr<detail::KeyValueStore> store,
                                               int rank, int size,
                                               std::chrono::milliseconds timeout) {
#if defined(LOCKSTEP_WITH_NCCL)
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = 2 * timeout;  // a backstop: comm/ waits with `timeout` itself
  auto forwarding = c10::make_intrusive<ForwardingStore>(std::move(store));
  return std::make_shared<C10dBackendOf<c10d::ProcessGroupNCCL>>(
      c10::make_intrusive<c10d::ProcessGroupNCCL>(forwarding, rank, size, options));
#else
  (void)store;
  (void)rank;
  (void)size;
  (void)timeout;
  throw std::logic_error("make_nccl_backend: lockstep was built without its NCCL adapter");
#endif
}

}  // namespace adapter
}  // namespace lockstep
