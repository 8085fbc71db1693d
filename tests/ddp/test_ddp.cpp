// DistributedDataParallel with ranks as threads over Gloo: parity with single-process training
// on the concatenated batch, bitwise agreement across ranks, no_sync, bucket views, rebuild,
// comm hooks, statistics, trace, and every error message.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <unordered_set>

#include "adapter/torch_adapter.h"
#include "ddp/reducer.h"
#include "lockstep/ddp.h"
#include "lockstep/errors.h"
#include "lockstep/thread_group.h"
#include "support/message.h"
#include "support/models.h"
#include "support/process.h"
#include "support/threads.h"

namespace {

using lockstep::DDPOptions;
using lockstep::DistributedDataParallel;
using lockstep_test::BnNet;
using lockstep_test::message_of;
using lockstep_test::with_groups;
using torch::Tensor;
namespace nn = torch::nn;

constexpr int64_t kBatch = 4;  // samples per rank

// ---------------------------------------------------------------------------------------------
// Models

struct Mlp : nn::Module {
  nn::Linear l1{nullptr}, l2{nullptr}, l3{nullptr};
  Mlp() {
    l1 = register_module("l1", nn::Linear(10, 32));
    l2 = register_module("l2", nn::Linear(32, 16));
    l3 = register_module("l3", nn::Linear(16, 4));
  }
  Tensor forward(Tensor x) { return l3(torch::relu(l2(torch::relu(l1(x))))); }
};

struct Cnn : nn::Module {
  nn::Conv2d c1{nullptr}, c2{nullptr};
  nn::Linear fc{nullptr};
  Cnn() {
    c1 = register_module("c1", nn::Conv2d(nn::Conv2dOptions(1, 4, 3)));
    c2 = register_module("c2", nn::Conv2d(nn::Conv2dOptions(4, 8, 3)));
    fc = register_module("fc", nn::Linear(32, 5));
  }
  Tensor forward(Tensor x) {
    x = torch::max_pool2d(torch::relu(c1(x)), 2);
    x = torch::relu(c2(x));
    return fc(x.flatten(1));
  }
};

struct EmbeddingNet : nn::Module {
  nn::Embedding emb{nullptr};
  nn::Linear fc{nullptr};
  EmbeddingNet() {
    emb = register_module("emb", nn::Embedding(30, 8));
    fc = register_module("fc", nn::Linear(8, 3));
  }
  Tensor forward(Tensor idx) { return fc(emb(idx).mean(1)); }
};

// Branch a on odd ranks, b on even ones; `dead` is never used anywhere.
struct BranchNet : nn::Module {
  nn::Linear trunk{nullptr}, a{nullptr}, b{nullptr}, dead{nullptr};
  BranchNet() {
    trunk = register_module("trunk", nn::Linear(6, 8));
    a = register_module("a", nn::Linear(8, 2));
    b = register_module("b", nn::Linear(8, 2));
    dead = register_module("dead", nn::Linear(8, 2));
  }
  Tensor forward(Tensor x, bool use_b) {
    auto h = torch::relu(trunk(x));
    return use_b ? b(h) : a(h);
  }
};

// One tensor registered in two submodules (tied input and output embeddings).
struct Holder : nn::Module {
  Tensor w;
  explicit Holder(Tensor weight) { w = register_parameter("w", weight); }
};
struct TiedNet : nn::Module {
  std::shared_ptr<Holder> enc, dec;
  nn::Linear mid{nullptr};
  TiedNet() {
    auto w = torch::randn({20, 6}) * 0.3;
    enc = register_module("enc", std::make_shared<Holder>(w));
    dec = register_module("dec", std::make_shared<Holder>(enc->w));
    mid = register_module("mid", nn::Linear(6, 6));
  }
  Tensor forward(Tensor idx) {
    auto h = torch::embedding(enc->w, idx).mean(1);
    return torch::tanh(mid(h)).matmul(dec->w.t());
  }
};

// Each case: make(), data(n) -> (x, y) for n samples, output(fwd, x, rank), loss(out, y).
struct MlpCase {
  using Model = Mlp;
  static std::pair<Tensor, Tensor> data(int64_t n) {
    return {torch::randn({n, 10}), torch::randn({n, 4})};
  }
  template <typename F>
  static Tensor output(F&& f, const Tensor& x, int) { return f(x); }
  static Tensor loss(const Tensor& out, const Tensor& y) { return torch::mse_loss(out, y); }
};
struct CnnCase {
  using Model = Cnn;
  static std::pair<Tensor, Tensor> data(int64_t n) {
    return {torch::randn({n, 1, 10, 10}), torch::randint(0, 5, {n})};
  }
  template <typename F>
  static Tensor output(F&& f, const Tensor& x, int) { return f(x); }
  static Tensor loss(const Tensor& out, const Tensor& y) {
    return torch::cross_entropy_loss(out, y);
  }
};
struct EmbeddingCase {
  using Model = EmbeddingNet;
  static std::pair<Tensor, Tensor> data(int64_t n) {
    return {torch::randint(0, 30, {n, 5}), torch::randint(0, 3, {n})};
  }
  template <typename F>
  static Tensor output(F&& f, const Tensor& x, int) { return f(x); }
  static Tensor loss(const Tensor& out, const Tensor& y) {
    return torch::cross_entropy_loss(out, y);
  }
};
struct BranchCase {
  using Model = BranchNet;
  static std::pair<Tensor, Tensor> data(int64_t n) {
    return {torch::randn({n, 6}), torch::randn({n, 2})};
  }
  template <typename F>
  static Tensor output(F&& f, const Tensor& x, int rank) { return f(x, rank % 2 == 0); }
  static Tensor loss(const Tensor& out, const Tensor& y) { return torch::mse_loss(out, y); }
};
struct TiedCase {
  using Model = TiedNet;
  static std::pair<Tensor, Tensor> data(int64_t n) {
    return {torch::randint(0, 20, {n, 4}), torch::randint(0, 20, {n})};
  }
  template <typename F>
  static Tensor output(F&& f, const Tensor& x, int) { return f(x); }
  static Tensor loss(const Tensor& out, const Tensor& y) {
    return torch::cross_entropy_loss(out, y);
  }
};

// ---------------------------------------------------------------------------------------------
// Helpers

std::vector<Tensor> unique_params(nn::Module& m) {
  std::vector<Tensor> out;
  std::unordered_set<const void*> seen;
  for (auto& p : m.parameters()) {
    if (seen.insert(p.unsafeGetTensorImpl()).second) out.push_back(p);
  }
  return out;
}

std::vector<Tensor> clone_all(const std::vector<Tensor>& ts) {
  std::vector<Tensor> out;
  for (auto& t : ts) out.push_back(t.defined() ? t.detach().clone() : Tensor());
  return out;
}

std::vector<Tensor> grads_of(const std::vector<Tensor>& params) {
  std::vector<Tensor> out;
  for (auto& p : params) out.push_back(p.grad().defined() ? p.grad().clone() : Tensor());
  return out;
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const std::vector<Tensor>& params,
                                                        bool adam) {
  if (adam) return std::make_unique<torch::optim::Adam>(params, torch::optim::AdamOptions(1e-2));
  return std::make_unique<torch::optim::SGD>(params,
                                             torch::optim::SGDOptions(0.05).momentum(0.9));
}

double rel_diff(const Tensor& a, const Tensor& b) {
  auto denom = std::max(b.norm().item<double>(), 1e-30);
  return (a - b).norm().item<double>() / denom;
}

void expect_close(const std::vector<Tensor>& got, const std::vector<Tensor>& want, double tol,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i].defined(), want[i].defined()) << what << " tensor " << i;
    if (!got[i].defined()) continue;
    EXPECT_LE(rel_diff(got[i], want[i]), tol) << what << " tensor " << i;
  }
}

struct ParityConfig {
  int world = 2;
  torch::Dtype dtype = torch::kFloat;
  bool adam = false;
  int steps = 20;
  DDPOptions options = DDPOptions();
  std::string transport = "gloo";  // or "shm": buckets reduced in place in shared memory
  torch::Device device = torch::kCPU;  // CUDA: model, data and buckets on the GPU
  double tolerance = 0;                // 0: 1e-5 (float32) or 1e-10 (float64)
};

// The single-process side of a parity check: the data of every step, the initial weights,
// and the gradients of step 1 and the final weights of one process on the concatenated batch.
struct ParityReference {
  std::vector<std::pair<Tensor, Tensor>> data;
  std::vector<Tensor> init, grads, final_params;
};

template <typename Case>
ParityReference parity_reference(const ParityConfig& cfg) {
  const int world = cfg.world;
  ParityReference out;
  torch::manual_seed(7);
  auto ref = std::make_shared<typename Case::Model>();
  ref->to(cfg.dtype);
  ref->to(cfg.device);
  for (int s = 0; s < cfg.steps; ++s) {
    auto d = Case::data(world * kBatch);
    if (d.first.is_floating_point()) d.first = d.first.to(cfg.dtype);
    if (d.second.is_floating_point()) d.second = d.second.to(cfg.dtype);
    out.data.push_back({d.first.to(cfg.device), d.second.to(cfg.device)});
  }
  auto ref_params = unique_params(*ref);
  out.init = clone_all(ref_params);
  auto opt = make_optimizer(ref_params, cfg.adam);
  for (int s = 0; s < cfg.steps; ++s) {
    opt->zero_grad();
    std::vector<Tensor> outs;
    for (int r = 0; r < world; ++r) {
      auto x = out.data[s].first.narrow(0, r * kBatch, kBatch);
      outs.push_back(Case::output([&](auto&&... a) { return ref->forward(a...); }, x, r));
    }
    Case::loss(torch::cat(outs), out.data[s].second).backward();
    if (s == 0) out.grads = grads_of(ref_params);
    opt->step();
  }
  out.final_params = clone_all(ref_params);
  return out;
}

// One rank's side: kBatch samples of every step through DDP. Only rank 0 starts from the
// reference weights: construction must broadcast them. Returns {step-1 grads, final params}.
template <typename Case>
std::pair<std::vector<Tensor>, std::vector<Tensor>> parity_rank(
    const ParityConfig& cfg, const lockstep::ProcessGroupPtr& pg, const ParityReference& ref) {
  const int r = pg->rank();
  auto model = std::make_shared<typename Case::Model>();
  model->to(cfg.dtype);
  model->to(cfg.device);
  auto params = unique_params(*model);
  if (r == 0) {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < params.size(); ++i) params[i].copy_(ref.init[i]);
  }
  DistributedDataParallel ddp(model, pg, cfg.options);
  auto opt = make_optimizer(params, cfg.adam);
  std::vector<Tensor> grads;
  for (int s = 0; s < cfg.steps; ++s) {
    opt->zero_grad();
    auto x = ref.data[s].first.narrow(0, r * kBatch, kBatch);
    auto y = ref.data[s].second.narrow(0, r * kBatch, kBatch);
    auto out = Case::output([&](auto&&... a) { return ddp->forward(a...); }, x, r);
    Case::loss(out, y).backward();
    if (s == 0) grads = grads_of(params);
    opt->step();
  }
  return {grads, clone_all(params)};
}

double parity_tolerance(const ParityConfig& cfg) {
  return cfg.tolerance > 0 ? cfg.tolerance : cfg.dtype == torch::kDouble ? 1e-10 : 1e-5;
}

std::string parity_label(const ParityConfig& cfg) {
  return ::testing::UnitTest::GetInstance()->current_test_info()->name() +
         std::string(" world ") + std::to_string(cfg.world) + (cfg.adam ? " Adam" : " SGD") +
         " " + cfg.transport + (cfg.options.gradient_as_bucket_view() ? " view" : " copy") +
         (cfg.dtype == torch::kDouble ? " float64" : "");
}

void expect_parity(const ParityConfig& cfg, const ParityReference& ref,
                   const std::vector<std::vector<Tensor>>& grads,
                   const std::vector<std::vector<Tensor>>& finals) {
  const double tol = parity_tolerance(cfg);
  const std::string what = parity_label(cfg);
  for (int r = 0; r < cfg.world; ++r) {
    expect_close(grads[r], ref.grads, tol, what + " gradients of step 1, rank " +
                                              std::to_string(r));
    expect_close(finals[r], ref.final_params, tol, what + " parameters, rank " +
                                                      std::to_string(r));
    for (size_t i = 0; i < finals[r].size() && r > 0; ++i) {
      EXPECT_TRUE(torch::equal(finals[r][i], finals[0][i]))
          << what << ": parameter " << i << " differs bitwise between rank 0 and rank " << r;
    }
  }
}

// W ranks (threads) with kBatch samples each vs one process on the concatenated batch.
template <typename Case>
void check_parity(const ParityConfig& cfg) {
  auto ref = parity_reference<Case>(cfg);
  std::vector<std::vector<Tensor>> finals(cfg.world), grads(cfg.world);
  with_groups(cfg.world, [&](const lockstep::ProcessGroupPtr& pg) {
    std::tie(grads[pg->rank()], finals[pg->rank()]) = parity_rank<Case>(cfg, pg, ref);
  }, lockstep::ProcessGroupOptions().transport(cfg.transport));
  expect_parity(cfg, ref, grads, finals);
}

// ---------------------------------------------------------------------------------------------
// Parity

TEST(DDPParity, MlpFloat) {
  for (int world : {1, 2, 3}) {
    for (bool adam : {false, true}) {
      ParityConfig cfg;
      cfg.world = world;
      cfg.adam = adam;
      check_parity<MlpCase>(cfg);
    }
  }
}

TEST(DDPParity, MlpDouble) {
  for (int world : {1, 2, 3}) {
    for (bool adam : {false, true}) {
      ParityConfig cfg;
      cfg.world = world;
      cfg.adam = adam;
      cfg.dtype = torch::kDouble;
      check_parity<MlpCase>(cfg);
    }
  }
}

TEST(DDPParity, MlpSmallBucketsAndBucketView) {
  for (int world : {2, 3}) {
    for (bool view : {false, true}) {
      ParityConfig cfg;
      cfg.world = world;
      cfg.options = DDPOptions().bucket_cap_mb(0.002).first_bucket_mb(0.0005)
                        .gradient_as_bucket_view(view);
      check_parity<MlpCase>(cfg);
    }
  }
}

// The shared-memory transport reduces DDP buckets in place (Note [Shared reduction buffers]):
// the same parity, with and without gradient_as_bucket_view, several buckets, W = 1..3.
TEST(DDPParity, MlpOverSharedMemory) {
  for (int world : {1, 2, 3}) {
    for (bool view : {false, true}) {
      for (bool adam : {false, true}) {
        ParityConfig cfg;
        cfg.world = world;
        cfg.adam = adam;
        cfg.transport = "shm";
        cfg.options = DDPOptions().bucket_cap_mb(0.002).first_bucket_mb(0.0005)
                          .gradient_as_bucket_view(view);
        check_parity<MlpCase>(cfg);
      }
    }
  }
  ParityConfig cfg;
  cfg.world = 2;
  cfg.dtype = torch::kDouble;
  cfg.transport = "shm";
  check_parity<MlpCase>(cfg);
}

// Note [CUDA buckets]: buckets on the GPU, reduced through Gloo (which stages them via host
// memory) and through the shared-memory group (Note [Device tensors over shared memory]).
// The ranks are processes (this binary re-run with DDPCudaRank.Run): as threads of one process
// they would share autograd's single worker thread for GPU 0, and one rank's end-of-backward
// wait would block the other's backward. Both ranks use GPU 0. Runs only with CUDA and a GPU.
ParityConfig cuda_config(const std::string& transport, bool view, bool dbl) {
  ParityConfig cfg;
  cfg.world = 2;
  cfg.steps = 10;
  cfg.device = torch::Device(torch::kCUDA, 0);
  cfg.transport = transport;
  cfg.dtype = dbl ? torch::kDouble : torch::kFloat;
  cfg.tolerance = dbl ? 1e-10 : 1e-4;  // float32 GPU kernels are not bitwise the CPU's
  cfg.options = DDPOptions().first_bucket_mb(0.0005).gradient_as_bucket_view(view);
  return cfg;
}

// One rank (this process) of every configuration of DDPParity.MlpOnCuda, self-checking:
// gradients and weights against the single-process reference it recomputes (same seed), and
// the final weights bitwise against rank 0's (broadcast through the group). Normally spawned
// by MlpOnCuda; a launcher may also start the two ranks itself (LOCKSTEP_TEST_CUDA_DIR a
// shared empty directory, LOCKSTEP_TEST_CUDA_RANK 0 or 1).
TEST(DDPCudaRank, Run) {
  const char* dir = std::getenv("LOCKSTEP_TEST_CUDA_DIR");
  if (dir == nullptr) GTEST_SKIP() << "one rank of DDPParity.MlpOnCuda, run by it";
  const int rank = std::atoi(std::getenv("LOCKSTEP_TEST_CUDA_RANK"));
  int index = 0;
  for (const std::string transport : {"gloo", "shm"}) {
    for (bool view : {false, true}) {
      for (bool dbl : {false, true}) {
        auto cfg = cuda_config(transport, view, dbl);
        auto ref = parity_reference<MlpCase>(cfg);  // same seed: the same data and weights
        auto store = std::make_shared<lockstep::Store>(lockstep::Store::file(
            std::string(dir) + "/store" + std::to_string(index++), 2, std::chrono::seconds(60)));
        auto options = lockstep::ProcessGroupOptions().timeout(std::chrono::seconds(60))
                           .rendezvous_timeout(std::chrono::seconds(60)).job_id("cudatest");
        auto pg = transport == "shm" ? lockstep::new_shm_group(rank, 2, store, options)
                                     : lockstep::new_gloo_group(rank, 2, store, options);
        auto result = parity_rank<MlpCase>(cfg, pg, ref);
        const double tol = parity_tolerance(cfg);
        const std::string what = parity_label(cfg) + " rank " + std::to_string(rank);
        expect_close(result.first, ref.grads, tol, what + " gradients of step 1");
        expect_close(result.second, ref.final_params, tol, what + " parameters");
        for (size_t i = 0; i < result.second.size(); ++i) {
          auto mine = result.second[i].clone();
          auto theirs = result.second[i].clone();
          pg->broadcast(theirs, 0)->wait();
          EXPECT_TRUE(torch::equal(mine, theirs))
              << what << ": parameter " << i << " differs bitwise from rank 0's";
        }
        std::cout << "[cuda rank " << rank << "] " << what << ": checked" << std::endl;
      }
    }
  }
}

// Spawns the two ranks of DDPCudaRank.Run and checks that both pass.
TEST(DDPParity, MlpOnCuda) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  lockstep_test::TempDir dir;
  std::vector<lockstep_test::Child> ranks;
  for (int r = 0; r < 2; ++r) {
    ranks.push_back(lockstep_test::spawn(
        {"/proc/self/exe", "--gtest_filter=DDPCudaRank.Run"},
        {{"LOCKSTEP_TEST_CUDA_DIR", dir.path}, {"LOCKSTEP_TEST_CUDA_RANK", std::to_string(r)}},
        dir.path, "rank" + std::to_string(r)));
  }
  for (int r = 0; r < 2; ++r) {
    ASSERT_TRUE(lockstep_test::wait_for(ranks[r], std::chrono::seconds(240)))
        << "rank " << r << " hung: " << ranks[r].out() << ranks[r].err();
    EXPECT_EQ(ranks[r].exit_code(), 0) << "rank " << r << ": " << ranks[r].out()
                                       << ranks[r].err();
    EXPECT_NE(ranks[r].out().find("[  PASSED  ] 1 test"), std::string::npos)
        << "rank " << r << ": " << ranks[r].out();
  }
  for (auto& c : ranks) lockstep_test::reap(c);
}

// Note [CUDA routing]: every collective on CUDA tensors through the router at world size 1 (the
// most NCCL allows on one GPU), checking that NCCL carried them, not the host path. Runs only
// with CUDA and lockstep's NCCL backend (docs/gpu.md); not yet run on a GPU.
TEST(ProcessGroupOnCuda, NcclAtWorldOne) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (!lockstep::adapter::nccl_compiled()) GTEST_SKIP() << "lockstep was built without NCCL";
  for (const std::string transport : {"nccl", "auto"}) {
    auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
    auto pg = lockstep::init_process_group(lockstep::ProcessGroupOptions()
                                               .store(store).rank(0).world_size(1)
                                               .transport(transport).job_id("nccl1-" + transport)
                                               .timeout(std::chrono::seconds(60)));
    const auto cuda = torch::TensorOptions().device(torch::kCUDA, 0);
    auto t = torch::arange(1000, cuda.dtype(torch::kFloat));
    pg->allreduce(t)->wait();
    EXPECT_TRUE(torch::equal(t.cpu(), torch::arange(1000, torch::kFloat))) << transport;
    EXPECT_EQ(pg->transport_for(t), "nccl") << transport;
    EXPECT_EQ(pg->backend().rfind("nccl+", 0), 0u) << pg->backend();
    pg->allreduce(t, lockstep::ReduceOp::kAvg)->wait();
    EXPECT_TRUE(torch::equal(t.cpu(), torch::arange(1000, torch::kFloat))) << transport;
    auto d = torch::full({7}, 2.5, cuda.dtype(torch::kDouble));
    pg->broadcast(d, 0)->wait();
    EXPECT_TRUE(torch::equal(d.cpu(), torch::full({7}, 2.5, torch::kDouble)));
    std::vector<torch::Tensor> gathered{torch::empty({7}, cuda.dtype(torch::kDouble))};
    pg->allgather(gathered, d)->wait();
    EXPECT_TRUE(torch::equal(gathered[0].cpu(), d.cpu()));
    auto in = torch::arange(12, cuda.dtype(torch::kLong)).view({4, 3});
    auto out = torch::zeros({4, 3}, cuda.dtype(torch::kLong));
    pg->all_to_all_single(out, in)->wait();
    EXPECT_TRUE(torch::equal(out.cpu(), in.cpu()));
    auto cpu = torch::ones({5});  // CPU tensors still take the host transport
    pg->allreduce(cpu)->wait();
    EXPECT_NE(pg->transport_for(cpu), "nccl");
    pg->barrier()->wait();
  }
}

// Note [CUDA routing]: CUDA buckets over NCCL. One GPU allows only world size 1 (NCCL refuses
// two ranks on one GPU); "auto" must pick NCCL there too. Runs only with CUDA and lockstep's
// NCCL backend (docs/gpu.md); not yet run on a GPU.
TEST(DDPParity, MlpOnCudaOverNcclAtWorldOne) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (!lockstep::adapter::nccl_compiled()) GTEST_SKIP() << "lockstep was built without NCCL";
  for (const std::string transport : {"nccl", "auto"}) {
    for (bool view : {false, true}) {
      for (bool dbl : {false, true}) {
        auto cfg = cuda_config(transport, view, dbl);
        cfg.world = 1;
        check_parity<MlpCase>(cfg);
      }
    }
  }
}

TEST(DDPParity, Cnn) {
  for (int world : {1, 2, 3}) {
    for (bool adam : {false, true}) {
      ParityConfig cfg;
      cfg.world = world;
      cfg.adam = adam;
      cfg.options = DDPOptions().first_bucket_mb(0.001);
      check_parity<CnnCase>(cfg);
    }
  }
  ParityConfig cfg;
  cfg.dtype = torch::kDouble;
  check_parity<CnnCase>(cfg);
}

TEST(DDPParity, Embedding) {
  for (int world : {1, 2, 3}) {
    for (bool adam : {false, true}) {
      ParityConfig cfg;
      cfg.world = world;
      cfg.adam = adam;
      check_parity<EmbeddingCase>(cfg);
    }
  }
}

TEST(DDPParity, BranchUnusedOnSomeRanks) {
  for (int world : {1, 2, 3}) {
    for (bool adam : {false, true}) {
      for (bool view : {false, true}) {
        ParityConfig cfg;
        cfg.world = world;
        cfg.adam = adam;
        cfg.options = DDPOptions().find_unused_parameters(true).gradient_as_bucket_view(view)
                          .first_bucket_mb(0.0001);
        check_parity<BranchCase>(cfg);
        if (world > 1 && !adam) {  // control elements through the in-place shm reduction
          cfg.transport = "shm";
          check_parity<BranchCase>(cfg);
        }
      }
    }
  }
}

TEST(DDPParity, TiedParameters) {
  for (int world : {1, 2, 3}) {
    for (bool adam : {false, true}) {
      ParityConfig cfg;
      cfg.world = world;
      cfg.adam = adam;
      check_parity<TiedCase>(cfg);
    }
  }
}

TEST(DDPParity, Float64Models) {
  for (int world : {2, 3}) {
    ParityConfig cfg;
    cfg.world = world;
    cfg.dtype = torch::kDouble;
    cfg.adam = true;
    check_parity<EmbeddingCase>(cfg);
    check_parity<TiedCase>(cfg);
    cfg.options = DDPOptions().find_unused_parameters(true);
    check_parity<BranchCase>(cfg);
  }
}

// ---------------------------------------------------------------------------------------------
// Semantics

TEST(DDP, NoSyncAccumulationEqualsOneBigBatch) {
  const int world = 2;
  torch::manual_seed(3);
  auto ref = std::make_shared<Mlp>();
  auto init = clone_all(unique_params(*ref));
  auto x = torch::randn({world * 3 * kBatch, 10});
  auto y = torch::randn({world * 3 * kBatch, 4});
  // Rank r's micro-batch k is rows [(r*3 + k) * kBatch, ...).
  for (int r = 0; r < world; ++r) {
    for (int k = 0; k < 3; ++k) {
      auto rows = (r * 3 + k) * kBatch;
      (torch::mse_loss(ref->forward(x.narrow(0, rows, kBatch)), y.narrow(0, rows, kBatch)) /
       world)
          .backward();
    }
  }
  auto want = grads_of(unique_params(*ref));
  for (bool view : {false, true}) {
    std::vector<std::vector<Tensor>> got(world);
    std::vector<lockstep::DDPStats> stats(world);
    with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
      const int r = pg->rank();
      auto model = std::make_shared<Mlp>();
      auto params = unique_params(*model);
      {
        torch::NoGradGuard no_grad;
        for (size_t i = 0; i < params.size(); ++i) params[i].copy_(init[i]);
      }
      DistributedDataParallel ddp(model, pg, DDPOptions().gradient_as_bucket_view(view));
      for (int k = 0; k < 3; ++k) {
        auto rows = (r * 3 + k) * kBatch;
        auto loss = [&] {
          return torch::mse_loss(ddp->forward(x.narrow(0, rows, kBatch)),
                                 y.narrow(0, rows, kBatch));
        };
        if (k < 2) {
          auto guard = ddp->no_sync();
          EXPECT_FALSE(ddp->require_gradient_sync());
          loss().backward();
        } else {
          EXPECT_TRUE(ddp->require_gradient_sync());
          loss().backward();
        }
      }
      got[r] = grads_of(params);
      stats[r] = ddp->last_stats();
    });
    for (int r = 0; r < world; ++r) {
      expect_close(got[r], want, 1e-5, "no_sync rank " + std::to_string(r));
      EXPECT_EQ(stats[r].iteration, 1) << "only the synchronized backward counts";
    }
  }
}

TEST(DDP, GradientAsBucketViewAliasesOneBuffer) {
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto model = std::make_shared<Mlp>();
    DistributedDataParallel ddp(model, pg, DDPOptions().gradient_as_bucket_view(true));
    ASSERT_EQ(ddp->buckets().size(), 1u);
    for (int step = 0; step < 2; ++step) {
      torch::mse_loss(ddp->forward(torch::randn({kBatch, 10})), torch::zeros({kBatch, 4}))
          .backward();
      const void* storage = nullptr;
      for (auto& p : model->parameters()) {
        ASSERT_TRUE(p.grad().defined());
        const void* s = p.grad().storage().unsafeGetStorageImpl();
        if (storage == nullptr) storage = s;
        EXPECT_EQ(s, storage) << "every gradient should live in the single bucket";
      }
      model->zero_grad();
    }
  });
}

TEST(DDP, RebuildsBucketsInReadyOrder) {
  // Registered l0, l1, l2 but used l2 -> l1 -> l0: gradients arrive l0 first, which reverse
  // registration order (the first plan) gets wrong.
  struct Reversed : nn::Module {
    nn::Linear l0{nullptr}, l1{nullptr}, l2{nullptr};
    Reversed() {
      l0 = register_module("l0", nn::Linear(4, 4));
      l1 = register_module("l1", nn::Linear(4, 4));
      l2 = register_module("l2", nn::Linear(4, 4));
    }
    Tensor forward(Tensor x) { return l0(l1(l2(x))); }
  };
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto model = std::make_shared<Reversed>();
    // 80-byte caps: weight (64 B) + bias (16 B) of one layer per bucket.
    DistributedDataParallel ddp(model, pg, DDPOptions().bucket_cap_mb(80.0 / (1 << 20))
                                               .first_bucket_mb(80.0 / (1 << 20)));
    auto names = [&] {
      std::vector<std::string> out;
      for (auto& b : ddp->buckets()) {
        std::string s;
        for (auto& n : b.parameters) s += n + " ";
        out.push_back(s);
      }
      return out;
    };
    EXPECT_EQ(names(), (std::vector<std::string>{"l2.bias l2.weight ", "l1.bias l1.weight ",
                                                 "l0.bias l0.weight "}));
    for (int step = 0; step < 3; ++step) {
      torch::mse_loss(ddp->forward(torch::randn({kBatch, 4})), torch::zeros({kBatch, 4}))
          .backward();
      if (step == 0) {
        EXPECT_EQ(ddp->buckets().size(), 3u);
        EXPECT_EQ(names()[0], "l2.bias l2.weight ") << "no rebuild before the next forward";
      } else {
        auto n = names();
        ASSERT_EQ(n.size(), 3u);
        EXPECT_EQ(n[0].substr(0, 2), "l0");
        EXPECT_EQ(n[1].substr(0, 2), "l1");
        EXPECT_EQ(n[2].substr(0, 2), "l2");
      }
    }
  });
}

TEST(DDP, BuffersFollowRankZero) {
  std::vector<Tensor> first(2), second(2), batch_mean(2);
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto model = std::make_shared<BnNet>();
    DistributedDataParallel ddp(model, pg);
    auto x = torch::randn({kBatch, 3}) + pg->rank();
    ddp->forward(x).sum().backward();
    first[pg->rank()] = model->bn->running_mean.clone();
    {
      torch::NoGradGuard g;
      batch_mean[pg->rank()] = model->fc(x).mean(0);
    }
    ddp->forward(x).sum().backward();
    second[pg->rank()] = model->bn->running_mean.clone();
  });
  EXPECT_FALSE(torch::equal(first[0], first[1])) << "per-rank statistics after one forward";
  // The second forward starts from rank 0's statistics (momentum 0.1), then adds its batch.
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(torch::allclose(second[r], first[0] * 0.9 + batch_mean[r] * 0.1, 1e-5, 1e-6))
        << "rank " << r;
  }
}

// ---------------------------------------------------------------------------------------------
// Comm hooks, statistics, trace

class CountingHook : public lockstep::CommHook {
 public:
  std::string name() const override { return "counting"; }
  lockstep::WorkPtr reduce(lockstep::ProcessGroup& group, lockstep::GradBucket& b) override {
    indices.push_back(b.index);
    if (b.is_last) ++last;
    return group.allreduce(b.buffer);
  }
  std::vector<size_t> indices;
  int last = 0;
};

TEST(DDP, CommHooks) {
  for (int kind = 1; kind < 3; ++kind) {
    // Compression: close to the exact average, not equal.
    std::vector<Tensor> grads(2), exact(2);
    torch::manual_seed(11);
    auto init = std::make_shared<Mlp>();
    auto init_params = clone_all(unique_params(*init));
    auto x = torch::randn({2 * kBatch, 10});
    with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
      for (int compressed = 0; compressed < 2; ++compressed) {
        auto model = std::make_shared<Mlp>();
        {
          torch::NoGradGuard g;
          auto ps = unique_params(*model);
          for (size_t i = 0; i < ps.size(); ++i) ps[i].copy_(init_params[i]);
        }
        DDPOptions o;
        if (compressed) {
          o.comm_hook(kind == 1 ? lockstep::fp16_compress_hook() : lockstep::bf16_compress_hook());
        }
        DistributedDataParallel ddp(model, pg, o);
        ddp->forward(x.narrow(0, pg->rank() * kBatch, kBatch)).pow(2).mean().backward();
        auto g = model->l1->weight.grad().clone();
        (compressed ? grads : exact)[pg->rank()] = g;
      }
    });
    for (int r = 0; r < 2; ++r) {
      double tol = kind == 1 ? 2e-3 : 1e-2;
      EXPECT_LE(rel_diff(grads[r], exact[r]), tol) << (kind == 1 ? "fp16" : "bf16");
      EXPECT_GT(rel_diff(grads[r], exact[r]), 0.0) << "compression should change the values";
    }
  }
}

TEST(DDP, CustomHookSeesBucketsInOrder) {
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto hook = std::make_shared<CountingHook>();
    auto model = std::make_shared<Mlp>();
    DistributedDataParallel ddp(
        model, pg, DDPOptions().comm_hook(hook).first_bucket_mb(0.001).rebuild_buckets(false));
    const size_t n = ddp->buckets().size();
    ASSERT_GT(n, 1u);
    for (int step = 0; step < 2; ++step) {
      torch::mse_loss(ddp->forward(torch::randn({kBatch, 10})), torch::zeros({kBatch, 4}))
          .backward();
    }
    ASSERT_EQ(hook->indices.size(), 2 * n);
    for (size_t i = 0; i < hook->indices.size(); ++i) EXPECT_EQ(hook->indices[i], i % n);
    EXPECT_EQ(hook->last, 2);
  });
}

TEST(DDP, StatisticsAndTrace) {
  auto dir = std::string(::testing::TempDir()) + "lockstep_ddp_trace_" +
             std::to_string(::getpid());
  std::vector<lockstep::DDPStats> stats(2);
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto model = std::make_shared<Mlp>();
    DistributedDataParallel ddp(
        model, pg, DDPOptions().first_bucket_mb(0.001).trace_path(dir + ".json"));
    for (int step = 0; step < 3; ++step) {
      torch::mse_loss(ddp->forward(torch::randn({kBatch, 10})), torch::zeros({kBatch, 4}))
          .backward();
    }
    stats[pg->rank()] = ddp->last_stats();
    ddp->flush_trace();
  });
  for (int r = 0; r < 2; ++r) {
    const auto& s = stats[r];
    EXPECT_EQ(s.iteration, 3);
    EXPECT_GT(s.forward_ms, 0);
    EXPECT_GT(s.backward_compute_ms, 0);
    EXPECT_GE(s.exposed_comm_ms, 0);
    ASSERT_GT(s.buckets.size(), 1u);
    int64_t total = 0;
    for (auto& b : s.buckets) {
      total += b.bytes;
      EXPECT_LE(b.ready_ms, b.launched_ms + 1e-9);
      EXPECT_LE(b.launched_ms, b.done_ms + 1e-9);
      EXPECT_EQ(b.dtype, "Float");
      EXPECT_EQ(b.transport, "gloo");
    }
    EXPECT_EQ(total, (10 * 32 + 32 + 32 * 16 + 16 + 16 * 4 + 4) * 4);
    auto json = s.to_json();
    for (const char* key : {"\"iteration\":3", "\"forward_ms\"", "\"backward_compute_ms\"",
                            "\"comm_ms\"", "\"exposed_comm_ms\"", "\"buckets\":[{",
                            "\"transport\":\"gloo\""}) {
      EXPECT_NE(json.find(key), std::string::npos) << key << " missing in " << json;
    }
    std::ifstream in(dir + "-rank" + std::to_string(r) + ".json");
    ASSERT_TRUE(in.good()) << "trace of rank " << r;
    std::stringstream text;
    text << in.rdbuf();
    auto t = text.str();
    EXPECT_NE(t.find("\"traceEvents\""), std::string::npos);
    EXPECT_NE(t.find("\"name\":\"bucket 0\""), std::string::npos);
    EXPECT_NE(t.find("\"name\":\"bucket 1\""), std::string::npos);
    EXPECT_NE(t.find("\"name\":\"allreduce\""), std::string::npos);
    EXPECT_NE(t.find("\"name\":\"ready\""), std::string::npos);
    EXPECT_NE(t.find("\"name\":\"backward\""), std::string::npos);
    std::remove((dir + "-rank" + std::to_string(r) + ".json").c_str());
  }
}

TEST(DDP, StatisticsNameTheSharedMemoryPathOfEachBucket) {
  std::vector<lockstep::DDPStats> stats(2);
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto model = std::make_shared<Mlp>();
    DistributedDataParallel ddp(model, pg, DDPOptions().first_bucket_mb(0.001));
    DistributedDataParallel fp16(std::make_shared<Mlp>(), pg,
                                 DDPOptions().comm_hook(lockstep::fp16_compress_hook()));
    for (int step = 0; step < 2; ++step) {
      torch::mse_loss(ddp->forward(torch::randn({kBatch, 10})), torch::zeros({kBatch, 4}))
          .backward();
      torch::mse_loss(fp16->forward(torch::randn({kBatch, 10})), torch::zeros({kBatch, 4}))
          .backward();
    }
    stats[pg->rank()] = ddp->last_stats();
    auto compressed = fp16->last_stats();
    ASSERT_FALSE(compressed.buckets.empty());
    EXPECT_EQ(compressed.buckets[0].transport, "fp16 over shm");
  }, lockstep::ProcessGroupOptions().transport("shm"));
  for (const auto& s : stats) {
    ASSERT_GT(s.buckets.size(), 1u);
    for (const auto& b : s.buckets) EXPECT_EQ(b.transport, "shm (in place)");
  }
}

// ---------------------------------------------------------------------------------------------
// Errors

TEST(DDPErrors, ParameterShapeMismatchNamesTheParameter) {
  std::vector<std::string> messages(2);
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    struct Net : nn::Module {
      explicit Net(int64_t width) {
        register_module("a", nn::Linear(4, 4));
        register_module("b", nn::Linear(4, width));
      }
      Tensor forward(Tensor x) { return x; }
    };
    auto model = std::make_shared<Net>(pg->rank() == 0 ? 3 : 5);
    messages[pg->rank()] = message_of([&] { DistributedDataParallel ddp(model, pg); });
  });
  for (int r = 0; r < 2; ++r) {
    const auto& m = messages[r];
    EXPECT_NE(m.find("[rank " + std::to_string(r) + "/2]"), std::string::npos) << m;
    EXPECT_NE(m.find("parameter #2 is 'b.weight Float [3, 4]' on rank 0 but 'b.weight Float "
                     "[5, 4]' on rank 1"),
              std::string::npos)
        << m;
  }
}

TEST(DDPErrors, ParameterCountMismatch) {
  std::vector<std::string> messages(2);
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    struct Net : nn::Module {
      explicit Net(bool extra) {
        register_module("a", nn::Linear(4, 4));
        if (extra) register_module("extra", nn::Linear(4, 4));
      }
      Tensor forward(Tensor x) { return x; }
    };
    auto model = std::make_shared<Net>(pg->rank() == 1);
    messages[pg->rank()] = message_of([&] { DistributedDataParallel ddp(model, pg); });
  });
  for (const auto& m : messages) {
    EXPECT_NE(m.find("rank 0 has 2 parameters that require grad but rank 1 has 4"),
              std::string::npos) << m;
    EXPECT_NE(m.find("'extra.weight Float [4, 4]'"), std::string::npos) << m;
  }
}

TEST(DDPErrors, UnusedParameterWithoutFindUnused) {
  // `dead` is unused everywhere; branch a or b is unused on one rank each.
  std::vector<std::string> messages(2);
  std::vector<std::string> types(2);
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto model = std::make_shared<BranchNet>();
    DistributedDataParallel ddp(model, pg);
    messages[pg->rank()] = message_of([&] {
      try {
        ddp->forward(torch::randn({kBatch, 6}), pg->rank() == 0).sum().backward();
      } catch (const lockstep::InvalidArgument&) {
        types[pg->rank()] = "InvalidArgument";
        throw;
      }
    });
    // The reducer recovers: the next (valid) iteration works.
    auto next = message_of([&] {
      ddp->forward(torch::randn({kBatch, 6}), pg->rank() == 0).sum().backward();
    });
    EXPECT_FALSE(next.empty()) << "still unused, still an error";
  });
  for (int r = 0; r < 2; ++r) {
    const auto& m = messages[r];
    EXPECT_EQ(types[r], "InvalidArgument") << m;
    EXPECT_NE(m.find("'a.bias' (on 1 of 2 ranks)"), std::string::npos) << m;
    EXPECT_NE(m.find("'b.weight' (on 1 of 2 ranks)"), std::string::npos) << m;
    EXPECT_NE(m.find("'dead.weight' (on 2 of 2 ranks)"), std::string::npos) << m;
    EXPECT_NE(m.find("find_unused_parameters(true)"), std::string::npos) << m;
  }
}

TEST(DDPErrors, UnusedParameterWorldOne) {
  with_groups(1, [&](const lockstep::ProcessGroupPtr& pg) {
    auto model = std::make_shared<BranchNet>();
    DistributedDataParallel ddp(model, pg);
    auto m = message_of([&] { ddp->forward(torch::randn({kBatch, 6}), true).sum().backward(); });
    EXPECT_NE(m.find("'dead.weight' (on 1 of 1 rank)"), std::string::npos) << m;
    EXPECT_NE(m.find("'a.weight'"), std::string::npos) << m;
  });
}

TEST(DDPErrors, HookFiringTwiceNamesTheParameter) {
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto w = torch::zeros({3}, torch::requires_grad());
    w.mutable_grad() = torch::ones({3});
    lockstep::ddp::ReducerOptions o;
    o.install_hooks = false;
    lockstep::ddp::Reducer reducer({w}, {"encoder.w"}, pg, o);
    reducer.prepare_for_forward(true);
    reducer.mark_ready(0);
    try {
      reducer.mark_ready(0);
      ADD_FAILURE() << "expected a StateError";
    } catch (const lockstep::StateError& e) {
      std::string m = e.what();
      EXPECT_NE(m.find("'encoder.w' fired twice in one backward"), std::string::npos) << m;
    }
    reducer.finalize();
    EXPECT_TRUE(torch::allclose(w.grad(), torch::ones({3})));
  });
}

// Note [Reducing into a root]: three ranks as threads over a thread group, root 1. Rank r's
// gradients are r + 1 (w), 10 * (r + 1) (b, missing on rank 2); nobody produces `dead`,
// whose stale .grad on the root must survive. Then an iteration in which rank 0 runs no
// backward at all (finalize only). Sum and average.
TEST(ReducerRoot, ReducesIntoTheRootOnlyWithMissingGradientsAsZeros) {
  for (bool average : {false, true}) {
    auto groups = lockstep::new_thread_groups(3);
    std::vector<std::vector<Tensor>> grads(3);
    std::vector<std::string> errors(3);
    std::vector<std::vector<lockstep::DDPStats>> stats(3);
    lockstep_test::run_ranks(3, [&](int r) {
      auto w = torch::zeros({5}, torch::requires_grad());
      auto b = torch::zeros({3}, torch::requires_grad());
      auto dead = torch::zeros({2}, torch::requires_grad());
      if (r == 1) dead.mutable_grad() = torch::full({2}, 7.0);
      lockstep::ddp::ReducerOptions o;
      o.install_hooks = false;
      o.root = 1;
      o.average = average;
      o.find_unused_parameters = true;
      lockstep::ddp::Reducer reducer({w, b, dead}, {"w", "b", "dead"}, groups[r], o);
      for (int iteration = 0; iteration < 2; ++iteration) {
        reducer.prepare_for_forward(true);
        const bool runs_backward = !(iteration == 1 && r == 0);
        if (runs_backward) {
          w.mutable_grad() = torch::full({5}, static_cast<float>(r + 1));
          reducer.mark_ready(0);
          if (r != 2) {
            b.mutable_grad() = torch::full({3}, static_cast<float>(10 * (r + 1)));
            reducer.mark_ready(1);
          }
        }
        reducer.finalize();
        stats[r].push_back(reducer.last_stats());
        grads[r].push_back(w.grad().defined() ? w.grad().clone() : Tensor());
        grads[r].push_back(b.grad().defined() ? b.grad().clone() : Tensor());
        grads[r].push_back(dead.grad().defined() ? dead.grad().clone() : Tensor());
        w.mutable_grad().reset();
        b.mutable_grad().reset();
      }
    });
    const float div = average ? 3.0f : 1.0f;
    // Iteration 0: root 1 holds the sums; ranks 0 and 2 keep their own gradients.
    EXPECT_TRUE(torch::equal(grads[1][0], torch::full({5}, 6.0f / div))) << grads[1][0];
    EXPECT_TRUE(torch::equal(grads[1][1], torch::full({3}, 30.0f / div))) << grads[1][1];
    EXPECT_TRUE(torch::equal(grads[1][2], torch::full({2}, 7.0f))) << "stale .grad of 'dead'";
    EXPECT_TRUE(torch::equal(grads[0][0], torch::full({5}, 1.0f)));
    EXPECT_TRUE(torch::equal(grads[2][0], torch::full({5}, 3.0f)));
    EXPECT_FALSE(grads[2][1].defined()) << "rank 2 got no gradient for b and must not get one";
    // Iteration 1: rank 0 ran no backward and contributed zeros.
    EXPECT_TRUE(torch::equal(grads[1][3], torch::full({5}, 5.0f / div))) << grads[1][3];
    EXPECT_TRUE(torch::equal(grads[1][4], torch::full({3}, 20.0f / div))) << grads[1][4];
    EXPECT_TRUE(torch::equal(grads[1][5], torch::full({2}, 7.0f)));
    ASSERT_FALSE(stats[1][0].buckets.empty());
    EXPECT_EQ(stats[1][0].buckets[0].transport, "threads (reduce into rank 1)");
  }
}

TEST(ReducerRoot, BadRootAndHookAreRejected) {
  auto groups = lockstep::new_thread_groups(1);
  auto w = torch::zeros({2}, torch::requires_grad());
  lockstep::ddp::ReducerOptions o;
  o.root = 1;
  try {
    lockstep::ddp::Reducer reducer({w}, {"w"}, groups[0], o);
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("a rank below 1, but got 1"), std::string::npos) << e.what();
  }
  o.root = 0;
  o.comm_hook = lockstep::fp16_compress_hook();
  EXPECT_THROW(lockstep::ddp::Reducer({w}, {"w"}, groups[0], o), lockstep::InvalidArgument);
}

TEST(DDPErrors, BadOptions) {
  with_groups(1, [&](const lockstep::ProcessGroupPtr& pg) {
    auto model = std::make_shared<Mlp>();
    auto m = message_of([&] {
      DistributedDataParallel ddp(model, pg, DDPOptions().bucket_cap_mb(0));
    });
    EXPECT_NE(m.find("bucket_cap_mb > 0"), std::string::npos) << m;
  });
}

// The holder types: TORCH_MODULE holders and shared_ptrs both wrap, forward any signature.
struct TwoArgImpl : nn::Module {
  nn::Linear fc{nullptr};
  TwoArgImpl() { fc = register_module("fc", nn::Linear(2, 2)); }
  std::tuple<Tensor, Tensor> forward(Tensor a, double scale) { return {fc(a) * scale, a}; }
};
TORCH_MODULE(TwoArg);

TEST(DDP, WrapsHoldersAndAnyForward) {
  with_groups(1, [&](const lockstep::ProcessGroupPtr& pg) {
    TwoArg net;
    DistributedDataParallel ddp(net, pg);
    auto out = ddp->forward(torch::ones({1, 2}), 2.0);
    std::get<0>(out).sum().backward();
    EXPECT_TRUE(net->fc->weight.grad().defined());
    auto again = ddp(torch::ones({1, 2}), 1.0);
    EXPECT_EQ(std::get<1>(again).size(1), 2);
    EXPECT_EQ(ddp->module().get(), net.get());
    EXPECT_EQ(ddp->named_parameters().size(), 2u);
    EXPECT_TRUE(ddp->named_parameters().contains("module.fc.weight"));
  });
}

}  // namespace
