// What real DDP programs need beyond the reducer, with ranks as threads: uneven inputs (join)
// against a single-process reference of the same arithmetic, its errors, and buffer broadcasts
// in training mode only (an evaluation on rank 0 alone).
#include <gtest/gtest.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>

#include <functional>
#include <string>
#include <vector>

#include "lockstep/ddp.h"
#include "lockstep/errors.h"
#include "support/threads.h"

namespace {

using lockstep::DDPOptions;
using lockstep::DistributedDataParallel;
using lockstep::JoinOptions;
using torch::Tensor;
namespace nn = torch::nn;

constexpr int64_t kBatch = 4;

struct Mlp : nn::Module {
  nn::Linear l1{nullptr}, l2{nullptr};
  Mlp() {
    l1 = register_module("l1", nn::Linear(6, 16));
    l2 = register_module("l2", nn::Linear(16, 3));
  }
  Tensor forward(Tensor x) { return l2(torch::relu(l1(x))); }
};

struct BnNet : nn::Module {
  nn::Linear fc{nullptr};
  nn::BatchNorm1d bn{nullptr};
  BnNet() {
    fc = register_module("fc", nn::Linear(3, 3));
    bn = register_module("bn", nn::BatchNorm1d(3));
  }
  Tensor forward(Tensor x) { return bn(fc(x)); }
};

std::vector<Tensor> snapshot(nn::Module& m) {
  std::vector<Tensor> out;
  for (auto& p : m.parameters()) out.push_back(p.detach().clone());
  for (auto& b : m.buffers()) out.push_back(b.clone());
  return out;
}

std::string message_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// Batch t of rank r: the same on every call.
std::pair<Tensor, Tensor> batch(int r, int t) {
  auto gen = at::detail::createCPUGenerator(1000 + 37 * r + t);
  return {torch::randn({kBatch, 6}, gen), torch::randn({kBatch, 3}, gen)};
}

// ---------------------------------------------------------------------------------------------
// Join

struct JoinCase {
  std::vector<int> batches;  // per rank
  bool divide_initial = true;
  std::string transport = "gloo";
};

std::string label(const JoinCase& c) {
  std::string s = c.transport + " batches {";
  for (size_t r = 0; r < c.batches.size(); ++r) s += (r ? "," : "") + std::to_string(c.batches[r]);
  return s + "} divide by " + (c.divide_initial ? "initial world size" : "ranks present");
}

// One process: at iteration t the ranks that still have batch t contribute their gradients,
// summed and divided by the world size or by their number; SGD with momentum.
std::vector<Tensor> join_reference(const JoinCase& c, const std::vector<Tensor>& init) {
  const int world = static_cast<int>(c.batches.size());
  auto model = std::make_shared<Mlp>();
  auto params = model->parameters();
  {
    torch::NoGradGuard g;
    for (size_t i = 0; i < params.size(); ++i) params[i].copy_(init[i]);
  }
  torch::optim::SGD opt(params, torch::optim::SGDOptions(0.05).momentum(0.9));
  const int steps = *std::max_element(c.batches.begin(), c.batches.end());
  for (int t = 0; t < steps; ++t) {
    opt.zero_grad();
    Tensor total;
    int present = 0;
    for (int r = 0; r < world; ++r) {
      if (t >= c.batches[r]) continue;
      auto d = batch(r, t);
      auto loss = torch::mse_loss(model->forward(d.first), d.second);
      total = total.defined() ? total + loss : loss;
      ++present;
    }
    (total / (c.divide_initial ? world : present)).backward();
    opt.step();
  }
  return snapshot(*model);
}

void check_join(const JoinCase& c) {
  const int world = static_cast<int>(c.batches.size());
  torch::manual_seed(3);
  auto init = snapshot(*std::make_shared<Mlp>());
  auto want = join_reference(c, init);
  std::vector<std::vector<Tensor>> got(world);
  lockstep_test::with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    const int r = pg->rank();
    auto model = std::make_shared<Mlp>();
    if (r == 0) {
      torch::NoGradGuard g;
      auto params = model->parameters();
      for (size_t i = 0; i < params.size(); ++i) params[i].copy_(init[i]);
    }
    DistributedDataParallel ddp(model, pg);
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    {
      auto join = ddp->join(JoinOptions().divide_by_initial_world_size(c.divide_initial));
      for (int t = 0; t < c.batches[r]; ++t) {
        auto d = batch(r, t);
        opt.zero_grad();
        torch::mse_loss(ddp->forward(d.first), d.second).backward();
        opt.step();
      }
    }  // the guard shadows the others until every rank is done
    got[r] = snapshot(*model);
  }, lockstep::ProcessGroupOptions().transport(c.transport).timeout(std::chrono::seconds(10)));
  for (int r = 0; r < world; ++r) {
    ASSERT_EQ(got[r].size(), want.size()) << label(c);
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_TRUE(torch::allclose(got[r][i], want[i], 1e-5, 1e-6))
          << label(c) << ": tensor " << i << " of rank " << r << " differs from the reference";
      EXPECT_TRUE(torch::equal(got[r][i], got[0][i]))
          << label(c) << ": tensor " << i << " of rank " << r << " differs from rank 0's";
    }
  }
}

TEST(DDPJoin, UnevenInputsMatchTheReference) {
  for (bool divide_initial : {true, false}) {
    for (const auto& batches : std::vector<std::vector<int>>{
             {3, 0}, {1, 4}, {5, 1}, {4, 2, 0}, {2, 5, 3}, {6, 1, 3, 6}, {2, 2, 2, 2}}) {
      check_join({batches, divide_initial, "gloo"});
    }
  }
}

TEST(DDPJoin, UnevenInputsOverSharedMemory) {
  for (bool divide_initial : {true, false}) {
    check_join({{1, 4, 2}, divide_initial, "shm"});
  }
}

TEST(DDPJoin, BuffersAndFinalModelAgreeOnEveryRank) {
  const std::vector<int> batches = {4, 1, 2};
  std::vector<std::vector<Tensor>> got(3);
  lockstep_test::with_groups(3, [&](const lockstep::ProcessGroupPtr& pg) {
    const int r = pg->rank();
    torch::manual_seed(11 + r);  // rank 0's weights win at construction
    auto model = std::make_shared<BnNet>();
    DistributedDataParallel ddp(model, pg);
    torch::optim::SGD opt(model->parameters(), 0.1);
    auto join = ddp->join();
    for (int t = 0; t < batches[r]; ++t) {
      opt.zero_grad();
      ddp->forward(torch::randn({kBatch, 3}) + r).pow(2).mean().backward();
      opt.step();
    }
    join.finish();
    got[r] = snapshot(*model);
  }, lockstep::ProcessGroupOptions().timeout(std::chrono::seconds(10)));
  for (int r = 1; r < 3; ++r) {
    for (size_t i = 0; i < got[0].size(); ++i) {
      EXPECT_TRUE(torch::equal(got[r][i], got[0][i])) << "tensor " << i << " of rank " << r;
    }
  }
}

// Runs `body(rank, ddp, opt)` on `world` ranks and returns each rank's error message ("" for none).
std::vector<std::string> run_join_errors(
    int world, const std::function<void(int, DistributedDataParallel<Mlp>&, torch::optim::SGD&)>& body) {
  std::vector<std::string> messages(world);
  lockstep_test::with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    const int r = pg->rank();
    auto model = std::make_shared<Mlp>();
    DistributedDataParallel ddp(model, pg);
    torch::optim::SGD opt(model->parameters(), 0.05);
    messages[r] = message_of([&] { body(r, ddp, opt); });
  }, lockstep::ProcessGroupOptions().timeout(std::chrono::seconds(10)));
  return messages;
}

void train(int r, int t, DistributedDataParallel<Mlp>& ddp, torch::optim::SGD& opt) {
  auto d = batch(r, t);
  opt.zero_grad();
  torch::mse_loss(ddp->forward(d.first), d.second).backward();
  opt.step();
}

TEST(DDPJoinErrors, EarlyTerminationRaisesOnEveryRankNamingTheRank) {
  const std::vector<int> batches = {3, 1, 3};
  auto messages = run_join_errors(3, [&](int r, DistributedDataParallel<Mlp>& ddp,
                                         torch::optim::SGD& opt) {
    auto join = ddp->join(JoinOptions().throw_on_early_termination(true));
    for (int t = 0; t < batches[r]; ++t) train(r, t, ddp, opt);
    join.finish();
  });
  for (int r = 0; r < 3; ++r) {
    EXPECT_NE(messages[r].find("rank(s) 1 ran out of inputs at iteration 2 while rank(s) 0, 2 "
                               "still had data; throw_on_early_termination is set"),
              std::string::npos)
        << "rank " << r << ": " << messages[r];
  }
}

TEST(DDPJoinErrors, EveryRankMustBeInsideAJoin) {
  auto messages = run_join_errors(2, [&](int r, DistributedDataParallel<Mlp>& ddp,
                                         torch::optim::SGD& opt) {
    if (r == 1) {
      auto join = ddp->join();
      train(r, 0, ddp, opt);
      join.finish();
      return;
    }
    for (int t = 0; t < 3; ++t) train(r, t, ddp, opt);
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(messages[r].find("rank(s) 1 ran out of inputs and joined at iteration 2, but "
                               "rank(s) 0 are not inside ddp->join()"),
              std::string::npos)
        << "rank " << r << ": " << messages[r];
  }
}

TEST(DDPJoinErrors, JoinOptionsMustAgree) {
  auto messages = run_join_errors(2, [&](int r, DistributedDataParallel<Mlp>& ddp,
                                         torch::optim::SGD& opt) {
    auto join = ddp->join(JoinOptions().divide_by_initial_world_size(r == 0));
    for (int t = 0; t < 2 - r; ++t) train(r, t, ddp, opt);
    join.finish();
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(messages[r].find("the ranks' JoinOptions differ: rank 0 has "
                               "throw_on_early_termination=false, "
                               "divide_by_initial_world_size=true but rank 1 has "
                               "throw_on_early_termination=false, "
                               "divide_by_initial_world_size=false"),
              std::string::npos)
        << "rank " << r << ": " << messages[r];
  }
}

TEST(DDPJoinErrors, OneGuardAtATime) {
  auto messages = run_join_errors(1, [&](int, DistributedDataParallel<Mlp>& ddp,
                                         torch::optim::SGD&) {
    auto first = ddp->join();
    auto second = ddp->join();
  });
  EXPECT_NE(messages[0].find("join() was called while another join guard of this DDP object "
                             "is alive"),
            std::string::npos)
      << messages[0];
}

// ---------------------------------------------------------------------------------------------
// Buffers follow rank 0 in training mode only

TEST(DDPBuffers, EvaluationOnRankZeroAloneNeitherHangsNorBroadcasts) {
  std::vector<Tensor> before_eval(2), after_eval(2), after_train(2), trained_mean(2);
  lockstep_test::with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    const int r = pg->rank();
    auto model = std::make_shared<BnNet>();
    DistributedDataParallel ddp(model, pg);
    auto x = torch::randn({kBatch, 3}) + r;
    ddp->forward(x).sum().backward();
    before_eval[r] = model->bn->running_mean.clone();
    ddp->eval();
    {
      torch::NoGradGuard g;
      if (r == 0) ddp->forward(x);       // rank 0 alone: must not wait for rank 1
      ddp->forward(x * 2);               // every rank: no broadcast in evaluation mode
    }
    after_eval[r] = model->bn->running_mean.clone();
    ddp->train();
    {
      torch::NoGradGuard g;
      trained_mean[r] = model->fc(x).mean(0);
    }
    ddp->forward(x).sum().backward();  // broadcasts rank 0's statistics first
    after_train[r] = model->bn->running_mean.clone();
  }, lockstep::ProcessGroupOptions().timeout(std::chrono::seconds(5)));
  ASSERT_FALSE(torch::equal(before_eval[0], before_eval[1]));
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(torch::equal(after_eval[r], before_eval[r]))
        << "rank " << r << ": an evaluation-mode forward changed the running statistics";
    EXPECT_TRUE(torch::allclose(after_train[r], before_eval[0] * 0.9 + trained_mean[r] * 0.1,
                                1e-5, 1e-6))
        << "rank " << r << ": the next training forward should start from rank 0's statistics";
  }
}

}  // namespace
