// DataParallel: parity with one module on the full batch (MLP, CNN; 1-3 replicas; uneven and
// tiny batches), BatchNorm semantics, replicas kept across steps, errors in a replica.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "lockstep/data_parallel.h"
#include "lockstep/errors.h"

namespace nn = torch::nn;
using Net = nn::SequentialImpl;
using lockstep::DataParallel;
using lockstep::DataParallelOptions;

namespace {

std::shared_ptr<Net> make_mlp() {
  return nn::Sequential(nn::Linear(20, 32), nn::Tanh(), nn::Linear(32, 32), nn::ReLU(),
                        nn::Linear(32, 10)).ptr();
}

std::shared_ptr<Net> make_cnn() {
  return nn::Sequential(nn::Conv2d(nn::Conv2dOptions(1, 4, 3)), nn::ReLU(), nn::MaxPool2d(2),
                        nn::Conv2d(nn::Conv2dOptions(4, 6, 3).padding(1)), nn::ReLU(),
                        nn::Flatten(), nn::Linear(6 * 5 * 5, 10)).ptr();
}

std::shared_ptr<Net> make_bn() {
  return nn::Sequential(nn::Linear(20, 16), nn::BatchNorm1d(16), nn::ReLU(), nn::Linear(16, 10)).ptr();
}

std::shared_ptr<Net> clone_of(const std::shared_ptr<Net>& net) {
  return std::dynamic_pointer_cast<Net>(net->clone());
}

struct Batch {
  torch::Tensor x, y;
};

Batch batch_for(bool cnn, int64_t n) {
  if (cnn) return {torch::randn({n, 1, 12, 12}), torch::randint(0, 10, {n}, torch::kLong)};
  return {torch::randn({n, 20}), torch::randn({n, 10})};
}

torch::Tensor loss_of(bool cnn, const torch::Tensor& out, const torch::Tensor& y) {
  return cnn ? torch::nll_loss(torch::log_softmax(out, 1), y) : torch::mse_loss(out, y);
}

void expect_close(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b,
                  const std::string& what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(a[i].defined() && b[i].defined()) << what << " " << i;
    EXPECT_TRUE(torch::allclose(a[i], b[i], /*rtol=*/1e-5, /*atol=*/1e-6))
        << what << " tensor " << i << ": max abs diff " << (a[i] - b[i]).abs().max().item<double>();
  }
}

std::vector<torch::Tensor> grads_of(const std::shared_ptr<Net>& net) {
  std::vector<torch::Tensor> g;
  for (auto& p : net->parameters()) g.push_back(p.grad());
  return g;
}

// 20 SGD steps through DataParallel and through a single module on the same full batches;
// batch sizes include an uneven split and a batch smaller than the number of replicas.
void check_parity(bool cnn, int replicas) {
  torch::manual_seed(7 + replicas);
  auto net = cnn ? make_cnn() : make_mlp();
  auto ref = clone_of(net);
  DataParallel<Net> dp(net, DataParallelOptions().cpu_replicas(replicas).threads_per_replica(1));
  ASSERT_EQ(dp.replicas().size(), static_cast<size_t>(replicas));
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  torch::optim::SGD ref_opt(ref->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  const std::vector<int64_t> sizes = {12, 12, 7, 12, 2, 12, 13, 1, 12, 12,
                                      12, 5, 12, 12, 12, 11, 12, 12, 12, 5};
  for (size_t step = 0; step < sizes.size(); ++step) {
    auto b = batch_for(cnn, sizes[step]);
    opt.zero_grad();
    auto loss = dp.train_step(b.x, b.y, [cnn](const torch::Tensor& out, const torch::Tensor& y) {
      return loss_of(cnn, out, y);
    });
    ref_opt.zero_grad();
    auto ref_loss = loss_of(cnn, ref->forward(b.x), b.y);
    ref_loss.backward();
    EXPECT_TRUE(torch::allclose(loss, ref_loss.detach(), 1e-5, 1e-6))
        << "step " << step << " loss " << loss.item<double>() << " vs " << ref_loss.item<double>();
    expect_close(grads_of(net), grads_of(ref), "step " + std::to_string(step) + " gradient");
    opt.step();
    ref_opt.step();
  }
  expect_close(net->parameters(), ref->parameters(), "parameters after 20 steps");
}

TEST(DataParallelParity, MlpOneReplica) { check_parity(false, 1); }
TEST(DataParallelParity, MlpTwoReplicas) { check_parity(false, 2); }
TEST(DataParallelParity, MlpThreeReplicas) { check_parity(false, 3); }
TEST(DataParallelParity, CnnOneReplica) { check_parity(true, 1); }
TEST(DataParallelParity, CnnTwoReplicas) { check_parity(true, 2); }
TEST(DataParallelParity, CnnThreeReplicas) { check_parity(true, 3); }

TEST(DataParallel, SplitSizes) {
  struct Case {
    int64_t n;
    int replicas;
    std::vector<int64_t> want;
  };
  for (const auto& c : std::vector<Case>{{10, 3, {4, 3, 3}}, {2, 3, {1, 1, 0}}, {7, 1, {7}},
                                        {6, 2, {3, 3}}, {1, 4, {1, 0, 0, 0}}, {0, 2, {0, 0}}}) {
    EXPECT_EQ(lockstep::detail::split_sizes(c.n, c.replicas), c.want) << c.n << "/" << c.replicas;
  }
}

TEST(DataParallel, GradientsAccumulateLikeBackward) {
  torch::manual_seed(3);
  auto net = make_mlp();
  auto ref = clone_of(net);
  DataParallel<Net> dp(net, DataParallelOptions().cpu_replicas(2).threads_per_replica(1));
  auto b1 = batch_for(false, 9), b2 = batch_for(false, 4);
  auto mse = [](const torch::Tensor& o, const torch::Tensor& y) { return torch::mse_loss(o, y); };
  dp.train_step(b1.x, b1.y, mse);
  dp.train_step(b2.x, b2.y, mse);  // no zero_grad: adds, as two backward() calls would
  torch::mse_loss(ref->forward(b1.x), b1.y).backward();
  torch::mse_loss(ref->forward(b2.x), b2.y).backward();
  expect_close(grads_of(net), grads_of(ref), "accumulated gradient");
}

// Layer `fc2` is used only by slices of more than two samples, `idle` never.
struct BranchyImpl : nn::Cloneable<BranchyImpl> {
  BranchyImpl() { reset(); }
  void reset() override {
    fc1 = register_module("fc1", nn::Linear(4, 3));
    fc2 = register_module("fc2", nn::Linear(3, 3));
    idle = register_module("idle", nn::Linear(2, 2));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = fc1->forward(x);
    return x.size(0) > 2 ? fc2->forward(torch::relu(h)) : h;
  }
  nn::Linear fc1{nullptr}, fc2{nullptr}, idle{nullptr};
};

TEST(DataParallel, ParametersUnusedOnSomeReplicasGetTheOthersGradient) {
  torch::manual_seed(23);
  auto net = std::make_shared<BranchyImpl>();
  auto ref = std::dynamic_pointer_cast<BranchyImpl>(net->clone());
  DataParallel<BranchyImpl> dp(net, DataParallelOptions().cpu_replicas(2).threads_per_replica(1));
  auto mse = [](const torch::Tensor& o, const torch::Tensor& y) { return torch::mse_loss(o, y); };
  net->idle->weight.mutable_grad() = torch::full({2, 2}, 7.0);
  ref->idle->weight.mutable_grad() = torch::full({2, 2}, 7.0);
  // Batches of 5 split 3 + 2: replica 1 never uses fc2. Step 1 starts without gradients
  // (fc1, fc2), step 2 adds to them.
  for (int step = 0; step < 2; ++step) {
    auto x = torch::randn({5, 4});
    auto y = torch::randn({5, 3});
    dp.train_step(x, y, mse);
    (mse(ref->forward(x.narrow(0, 0, 3)), y.narrow(0, 0, 3)) * (3.0 / 5) +
     mse(ref->forward(x.narrow(0, 3, 2)), y.narrow(0, 3, 2)) * (2.0 / 5))
        .backward();
    std::vector<torch::Tensor> got, want;
    for (auto* m : {&net->fc1, &net->fc2}) got.insert(got.end(), {(*m)->weight.grad(), (*m)->bias.grad()});
    for (auto* m : {&ref->fc1, &ref->fc2}) want.insert(want.end(), {(*m)->weight.grad(), (*m)->bias.grad()});
    expect_close(got, want, "step " + std::to_string(step));
    EXPECT_TRUE(torch::equal(net->idle->weight.grad(), torch::full({2, 2}, 7.0)));
    EXPECT_FALSE(net->idle->bias.grad().defined());
  }
}

TEST(DataParallel, GradientKeepsItsTensorAcrossSteps) {
  torch::manual_seed(29);
  auto net = make_mlp();
  DataParallel<Net> dp(net, DataParallelOptions().cpu_replicas(2).threads_per_replica(1));
  auto mse = [](const torch::Tensor& o, const torch::Tensor& y) { return torch::mse_loss(o, y); };
  auto b = batch_for(false, 8);
  dp.train_step(b.x, b.y, mse);
  std::vector<void*> first;
  for (auto& p : net->parameters()) first.push_back(p.grad().data_ptr());
  for (int step = 0; step < 3; ++step) {
    for (auto& p : net->parameters()) p.mutable_grad().zero_();
    dp.train_step(b.x, b.y, mse);
  }
  auto params = net->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_EQ(params[i].grad().data_ptr(), first[i]) << "parameter " << i << "'s .grad moved";
  }
}

TEST(DataParallel, ReplicasAreKeptAndRefreshedInPlace) {
  torch::manual_seed(5);
  auto net = make_mlp();
  DataParallel<Net> dp(net, DataParallelOptions().cpu_replicas(3).threads_per_replica(1));
  auto replica_ptrs = dp.replicas();
  std::vector<const void*> storage;
  for (auto& r : dp.replicas()) {
    for (auto& p : r->parameters()) storage.push_back(p.data_ptr());
  }
  torch::optim::SGD opt(net->parameters(), 0.1);
  for (int step = 0; step < 5; ++step) {
    auto b = batch_for(false, 10);
    opt.zero_grad();
    dp.train_step(b.x, b.y, [](const torch::Tensor& o, const torch::Tensor& y) { return torch::mse_loss(o, y); });
    opt.step();
  }
  dp.forward(torch::randn({4, 20}));  // refreshes the replicas from the updated primary
  size_t i = 0;
  for (size_t r = 0; r < dp.replicas().size(); ++r) {
    EXPECT_EQ(dp.replicas()[r], replica_ptrs[r]);
    auto ps = dp.replicas()[r]->parameters();
    for (size_t k = 0; k < ps.size(); ++k, ++i) {
      EXPECT_EQ(ps[k].data_ptr(), storage[i]) << "replica " << r << " parameter " << k;
      EXPECT_TRUE(torch::equal(ps[k], net->parameters()[k])) << "replica " << r << " parameter " << k;
    }
  }
  EXPECT_EQ(dp.replicas()[0], net);
}

TEST(DataParallel, ForwardScattersAndGathers) {
  torch::manual_seed(11);
  auto net = make_cnn();
  DataParallel<Net> dp(net, DataParallelOptions().cpu_replicas(3).threads_per_replica(1));
  for (int64_t n : {1, 2, 3, 7, 16}) {
    auto x = torch::randn({n, 1, 12, 12});
    auto got = dp.forward(x);
    torch::NoGradGuard no_grad;
    auto want = net->forward(x);
    ASSERT_EQ(got.sizes(), want.sizes()) << n;
    EXPECT_TRUE(torch::allclose(got, want, 1e-5, 1e-6)) << n;
    EXPECT_FALSE(got.requires_grad());
  }
}

TEST(DataParallel, EmptyBatchIsAClearError) {
  auto net = make_mlp();
  DataParallel<Net> dp(net, DataParallelOptions().cpu_replicas(2));
  auto mse = [](const torch::Tensor& o, const torch::Tensor& y) { return torch::mse_loss(o, y); };
  try {
    dp.train_step(torch::empty({0, 20}), torch::empty({0, 10}), mse);
    FAIL() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("expected a non-empty batch"), std::string::npos) << e.what();
  }
  EXPECT_THROW(dp.forward(torch::empty({0, 20})), lockstep::InvalidArgument);
  EXPECT_THROW(dp.train_step(torch::randn({4, 20}), torch::randn({3, 10}), mse),
               lockstep::InvalidArgument);
}

// BatchNorm in training mode normalises each replica's slice with its own statistics (as
// PyTorch's DataParallel does): the gradient is the weighted sum of the slices' gradients,
// and the primary's running statistics are those of replica 0's slice. In eval mode every
// replica uses the primary's running statistics: parity with one module.
TEST(DataParallelBatchNorm, TrainModeStatisticsArePerReplicaAndFollowThePrimary) {
  torch::manual_seed(13);
  auto net = make_bn();
  auto ref0 = clone_of(net), ref1 = clone_of(net);
  DataParallel<Net> dp(net, DataParallelOptions().cpu_replicas(2).threads_per_replica(1));
  auto b = batch_for(false, 7);  // split 4 + 3
  auto mse = [](const torch::Tensor& o, const torch::Tensor& y) { return torch::mse_loss(o, y); };
  dp.train_step(b.x, b.y, mse);
  (torch::mse_loss(ref0->forward(b.x.narrow(0, 0, 4)), b.y.narrow(0, 0, 4)) * (4.0 / 7)).backward();
  (torch::mse_loss(ref1->forward(b.x.narrow(0, 4, 3)), b.y.narrow(0, 4, 3)) * (3.0 / 7)).backward();
  std::vector<torch::Tensor> want;
  auto g0 = grads_of(ref0), g1 = grads_of(ref1);
  for (size_t i = 0; i < g0.size(); ++i) want.push_back(g0[i] + g1[i]);
  expect_close(grads_of(net), want, "per-replica BatchNorm gradient");
  expect_close(net->buffers(), ref0->buffers(), "primary buffers = replica 0's slice");
  // Replica 1's own statistics differ now, and are overwritten from the primary next step
  // (in eval mode, so that this forward does not update them again).
  auto bn1 = dp.replicas()[1]->buffers();
  EXPECT_FALSE(torch::allclose(bn1[0], net->buffers()[0]));
  net->eval();
  dp.forward(b.x);
  EXPECT_FALSE(dp.replicas()[1]->is_training());
  expect_close(dp.replicas()[1]->buffers(), ref0->buffers(), "replica 1 buffers after refresh");
}

TEST(DataParallelBatchNorm, EvalModeMatchesOneModule) {
  torch::manual_seed(17);
  auto net = make_bn();
  {  // give the running statistics non-trivial values
    torch::NoGradGuard no_grad;
    net->forward(torch::randn({32, 20}) * 3 + 1);
  }
  auto ref = clone_of(net);
  net->eval();
  ref->eval();
  DataParallel<Net> dp(net, DataParallelOptions().cpu_replicas(3).threads_per_replica(1));
  torch::optim::SGD opt(net->parameters(), 0.1);
  torch::optim::SGD ref_opt(ref->parameters(), 0.1);
  auto mse = [](const torch::Tensor& o, const torch::Tensor& y) { return torch::mse_loss(o, y); };
  for (int step = 0; step < 20; ++step) {
    auto b = batch_for(false, step % 5 == 4 ? 5 : 12);
    opt.zero_grad();
    ref_opt.zero_grad();
    dp.train_step(b.x, b.y, mse);
    torch::mse_loss(ref->forward(b.x), b.y).backward();
    expect_close(grads_of(net), grads_of(ref), "eval-mode gradient step " + std::to_string(step));
    opt.step();
    ref_opt.step();
  }
  expect_close(net->parameters(), ref->parameters(), "eval-mode parameters after 20 steps");
  expect_close(net->buffers(), ref->buffers(), "eval-mode buffers unchanged");
  auto x = torch::randn({8, 20});
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::allclose(dp.forward(x), ref->forward(x), 1e-5, 1e-6));
}

// A module whose forward throws, or whose backward throws, when its slice holds a marker.
struct FragileImpl : nn::Cloneable<FragileImpl> {
  FragileImpl() { reset(); }
  void reset() override { fc = register_module("fc", nn::Linear(4, 2)); }
  torch::Tensor forward(const torch::Tensor& x) {
    if ((x == 999).any().item<bool>()) throw std::runtime_error("marker 999 in forward");
    auto h = fc->forward(x);
    if ((x == -999).any().item<bool>()) {
      h.register_hook([](torch::Tensor) -> torch::Tensor {
        throw std::runtime_error("marker -999 in backward");
      });
    }
    return h;
  }
  nn::Linear fc{nullptr};
};

std::string failure_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const lockstep::Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(DataParallelErrors, ReplicaExceptionNamesTheReplicaAndTheNextStepWorks) {
  torch::manual_seed(19);
  auto net = std::make_shared<FragileImpl>();
  auto ref = std::dynamic_pointer_cast<FragileImpl>(net->clone());
  DataParallel<FragileImpl> dp(net, DataParallelOptions().cpu_replicas(2).threads_per_replica(1));
  auto mse = [](const torch::Tensor& o, const torch::Tensor& y) { return torch::mse_loss(o, y); };
  auto x = torch::randn({6, 4});
  auto y = torch::randn({6, 2});
  // Gradients from an earlier step must survive a failed one.
  dp.train_step(x, y, mse);
  torch::mse_loss(ref->forward(x), y).backward();
  auto before = net->fc->weight.grad().clone();

  for (double marker : {999.0, -999.0}) {
    auto bad = x.clone();
    bad[4][1] = marker;  // rows 3..5 go to replica 1
    auto msg = failure_of([&] { dp.train_step(bad, y, mse); });
    EXPECT_NE(msg.find("train_step: replica 1/2 (cpu) failed"), std::string::npos) << msg;
    EXPECT_NE(msg.find(marker > 0 ? "marker 999 in forward" : "marker -999 in backward"),
              std::string::npos) << msg;
    EXPECT_TRUE(torch::equal(net->fc->weight.grad(), before)) << "gradients changed by a failed step";
  }
  auto bad = x.clone();
  bad[0][0] = 999;
  auto msg = failure_of([&] { dp.forward(bad); });
  EXPECT_NE(msg.find("forward: replica 0/2 (cpu) failed"), std::string::npos) << msg;

  // The next step works and is still exact.
  dp.train_step(x, y, mse);
  torch::mse_loss(ref->forward(x), y).backward();
  expect_close({net->fc->weight.grad(), net->fc->bias.grad()},
               {ref->fc->weight.grad(), ref->fc->bias.grad()}, "gradient after failures");
}

TEST(DataParallelErrors, ModuleWithoutCloneNeedsAFactory) {
  struct PlainImpl : nn::Module {
    PlainImpl() { fc = register_module("fc", nn::Linear(4, 2)); }
    torch::Tensor forward(const torch::Tensor& x) { return fc->forward(x); }
    nn::Linear fc{nullptr};
  };
  auto net = std::make_shared<PlainImpl>();
  try {
    DataParallel<PlainImpl> dp(net, DataParallelOptions().cpu_replicas(2));
    FAIL() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("replica factory"), std::string::npos) << e.what();
  }
  DataParallel<PlainImpl> dp(net, DataParallelOptions().cpu_replicas(2),
                             [] { return std::make_shared<PlainImpl>(); });
  auto x = torch::randn({5, 4});
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::allclose(dp.forward(x), net->forward(x), 1e-5, 1e-6));
}

TEST(DataParallel, ResolveDevices) {
  using lockstep::detail::resolve_devices;
  EXPECT_EQ(resolve_devices(DataParallelOptions().cpu_replicas(3)),
            std::vector<c10::Device>(3, c10::Device("cpu")));
  std::vector<c10::Device> two = {c10::Device("cpu"), c10::Device("cpu")};
  EXPECT_EQ(resolve_devices(DataParallelOptions().devices(two).cpu_replicas(5)), two);
  auto defaults = resolve_devices(DataParallelOptions());
  ASSERT_FALSE(defaults.empty());
  EXPECT_EQ(defaults[0].is_cuda(), torch::cuda::is_available());
  EXPECT_THROW(resolve_devices(DataParallelOptions().cpu_replicas(-1)), lockstep::InvalidArgument);
}

// Two replicas on the first GPU (one is enough to run the CUDA path: device guards, copies,
// the thread group and the Reducer on CUDA tensors): parity with one CPU module. Skipped
// without CUDA.
TEST(DataParallelCuda, MlpParityWithCpuModule) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(23);
  auto ref = make_mlp();
  auto net = clone_of(ref);
  net->to(torch::kCUDA);
  std::vector<c10::Device> devices(2, c10::Device(torch::kCUDA, 0));
  DataParallel<Net> dp(net, DataParallelOptions().devices(devices));
  torch::optim::SGD opt(net->parameters(), 0.05);
  torch::optim::SGD ref_opt(ref->parameters(), 0.05);
  for (int step = 0; step < 20; ++step) {
    auto b = batch_for(false, step == 19 ? 5 : 12);
    opt.zero_grad();
    ref_opt.zero_grad();
    auto loss = dp.train_step(b.x.to(torch::kCUDA), b.y.to(torch::kCUDA),
                              [](const torch::Tensor& o, const torch::Tensor& y) { return torch::mse_loss(o, y); });
    EXPECT_TRUE(loss.is_cuda());
    torch::mse_loss(ref->forward(b.x), b.y).backward();
    for (size_t i = 0; i < ref->parameters().size(); ++i) {
      auto g = net->parameters()[i].grad().cpu();
      EXPECT_TRUE(torch::allclose(g, ref->parameters()[i].grad(), 1e-4, 1e-5)) << "step " << step << " grad " << i;
    }
    opt.step();
    ref_opt.step();
  }
  auto x = torch::randn({7, 20});
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::allclose(dp.forward(x.to(torch::kCUDA)).cpu(), ref->forward(x), 1e-4, 1e-5));
}

}  // namespace
