// What real DDP programs need beyond the reducer, with ranks as threads: uneven inputs (join)
// against a single-process reference of the same arithmetic, its errors, and buffer broadcasts
// in training mode only (an evaluation on rank 0 alone).
#include <gtest/gtest.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include <functional>
#include <string>
#include <vector>

#include "lockstep/ddp.h"
#include "lockstep/errors.h"
#include "support/message.h"
#include "support/models.h"
#include "support/threads.h"

namespace {

using lockstep::DDPOptions;
using lockstep::DistributedDataParallel;
using lockstep::JoinOptions;
using lockstep_test::BnNet;
using lockstep_test::message_of;
using torch::Tensor;
namespace nn = torch::nn;

constexpr int64_t kBatch = 4;

using lockstep_test::Mlp;

std::vector<Tensor> snapshot(nn::Module& m) {
  std::vector<Tensor> out;
  for (auto& p : m.parameters()) out.push_back(p.detach().clone());
  for (auto& b : m.buffers()) out.push_back(b.clone());
  return out;
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
// Non-finite gradients and clipping

// The gradient of the mean-squared loss of the concatenated batches of iteration t.
std::vector<Tensor> reference_grads(const std::vector<Tensor>& init, int world, int t,
                                     double max_norm) {
  auto model = std::make_shared<Mlp>();
  auto params = model->parameters();
  {
    torch::NoGradGuard g;
    for (size_t i = 0; i < params.size(); ++i) params[i].copy_(init[i]);
  }
  std::vector<Tensor> xs, ys;
  for (int r = 0; r < world; ++r) {
    auto d = batch(r, t);
    xs.push_back(d.first);
    ys.push_back(d.second);
  }
  torch::mse_loss(model->forward(torch::cat(xs)), torch::cat(ys)).backward();
  if (max_norm > 0) torch::nn::utils::clip_grad_norm_(params, max_norm);
  std::vector<Tensor> out;
  for (auto& p : params) out.push_back(p.grad().clone());
  return out;
}

TEST(DDPClipping, EqualsClipGradNormAfterReduction) {
  torch::manual_seed(5);
  auto init = snapshot(*std::make_shared<Mlp>());
  for (int world : {1, 2, 3}) {
    for (bool view : {true, false}) {
      for (double max_norm : {0.05, 1e6}) {
        auto want = reference_grads(init, world, 0, max_norm);
        auto unclipped = reference_grads(init, world, 0, 0);
        double want_norm = 0;
        for (auto& g : unclipped) want_norm += g.pow(2).sum().item<double>();
        want_norm = std::sqrt(want_norm);
        std::vector<std::vector<Tensor>> got(world);
        std::vector<double> norms(world);
        lockstep_test::with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
          const int r = pg->rank();
          auto model = std::make_shared<Mlp>();
          if (r == 0) {
            torch::NoGradGuard g;
            auto params = model->parameters();
            for (size_t i = 0; i < params.size(); ++i) params[i].copy_(init[i]);
          }
          DistributedDataParallel ddp(
              model, pg, DDPOptions().max_grad_norm(max_norm).gradient_as_bucket_view(view));
          auto d = batch(r, 0);
          torch::mse_loss(ddp->forward(d.first), d.second).backward();
          for (auto& p : model->parameters()) got[r].push_back(p.grad().clone());
          norms[r] = ddp->last_stats().grad_norm;
        });
        const std::string what = "world " + std::to_string(world) + (view ? " view" : " copy") +
                                 " max_grad_norm " + std::to_string(max_norm);
        for (int r = 0; r < world; ++r) {
          EXPECT_NEAR(norms[r], want_norm, 1e-5 * want_norm) << what;
          for (size_t i = 0; i < want.size(); ++i) {
            EXPECT_TRUE(torch::allclose(got[r][i], want[i], 1e-5, 1e-7))
                << what << ": gradient " << i << " of rank " << r;
          }
        }
      }
    }
  }
}

// Rank `bad_rank` feeds a NaN at iteration `bad_step`; returns each rank's error message and
// parameters after every step, and how many steps each rank's ddp->step() skipped.
struct NonFiniteRun {
  std::vector<std::string> messages;
  std::vector<std::vector<std::vector<Tensor>>> params;  // [rank][step]
  std::vector<int64_t> skipped;
};

NonFiniteRun run_with_nan(int world, int bad_rank, int bad_step, lockstep::NonFinite policy) {
  NonFiniteRun run;
  run.messages.resize(world);
  run.params.resize(world);
  run.skipped.resize(world);
  lockstep_test::with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    const int r = pg->rank();
    auto model = std::make_shared<Mlp>();
    DistributedDataParallel ddp(model, pg, DDPOptions().nonfinite(policy));
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    run.messages[r] = message_of([&] {
      for (int t = 0; t < 3; ++t) {
        auto d = batch(r, t);
        if (r == bad_rank && t == bad_step) d.first[1][2] = std::nan("");
        opt.zero_grad();
        torch::mse_loss(ddp->forward(d.first), d.second).backward();
        ddp->step(opt);
        run.params[r].push_back(snapshot(*model));
      }
    });
    run.skipped[r] = ddp->skipped_steps();
  });
  return run;
}

TEST(DDPNonFinite, AbortRaisesOnEveryRankNamingStepRankAndParameter) {
  for (int world : {1, 3}) {
    const int bad = world - 1;
    auto run = run_with_nan(world, bad, 1, lockstep::NonFinite::kAbort);
    for (int r = 0; r < world; ++r) {
      const auto& m = run.messages[r];
      EXPECT_NE(m.find("DDP: non-finite (NaN or Inf) gradient at iteration 2: began on rank " +
                       std::to_string(bad) + " parameter 'l2."),
                std::string::npos)
          << "world " << world << " rank " << r << ": " << m;
      EXPECT_NE(m.find("DDPOptions::nonfinite is kAbort, so every rank stops here"),
                std::string::npos) << m;
      EXPECT_EQ(run.params[r].size(), 1u) << "rank " << r << " should stop at the bad step";
    }
  }
}

TEST(DDPNonFinite, SkipSkipsTheSameStepOnEveryRank) {
  auto run = run_with_nan(3, 2, 1, lockstep::NonFinite::kSkip);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(run.messages[r], "") << "rank " << r;
    ASSERT_EQ(run.params[r].size(), 3u);
    EXPECT_EQ(run.skipped[r], 1) << "rank " << r;
    for (size_t i = 0; i < run.params[r][0].size(); ++i) {
      EXPECT_TRUE(torch::equal(run.params[r][1][i], run.params[r][0][i]))
          << "rank " << r << " stepped at the non-finite step (tensor " << i << ")";
      EXPECT_FALSE(torch::equal(run.params[r][2][i], run.params[r][1][i]))
          << "rank " << r << " did not step after it (tensor " << i << ")";
      EXPECT_TRUE(run.params[r][2][i].isfinite().all().item<bool>());
      EXPECT_TRUE(torch::equal(run.params[r][2][i], run.params[0][2][i]));
    }
  }
}

TEST(DDPNonFinite, OffLetsNaNSpreadToEveryRank) {
  auto run = run_with_nan(2, 1, 0, lockstep::NonFinite::kOff);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(run.skipped[r], 0);
    EXPECT_TRUE(run.params[r][0][0].isnan().any().item<bool>()) << "rank " << r;
  }
}

TEST(DDPClipping, NegativeMaxNormIsRejected) {
  auto messages = std::vector<std::string>(1);
  lockstep_test::with_groups(1, [&](const lockstep::ProcessGroupPtr& pg) {
    messages[0] = message_of([&] {
      DistributedDataParallel ddp(std::make_shared<Mlp>(), pg, DDPOptions().max_grad_norm(-1));
    });
  });
  EXPECT_NE(messages[0].find("Expected DDPOptions::max_grad_norm >= 0 (0: no clipping), but "
                             "got -1"),
            std::string::npos)
      << messages[0];
}

// ---------------------------------------------------------------------------------------------
// static_graph: a layer shared by two activation-checkpointed segments

// Reentrant activation checkpointing: forward without a graph, and backward recomputes the
// segment and runs a backward of its own, which accumulates into the segment's parameters
// (and fires their gradient hooks) once per segment.
struct Segment : torch::autograd::Function<Segment> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, Tensor x, int64_t layer) {
    ctx->saved_data["layer"] = layer;
    ctx->save_for_backward({x});
    torch::NoGradGuard no_grad;
    return torch::tanh(reinterpret_cast<nn::LinearImpl*>(layer)->forward(x));
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    auto* layer = reinterpret_cast<nn::LinearImpl*>(ctx->saved_data["layer"].toInt());
    auto x = ctx->get_saved_variables()[0].detach().requires_grad_(true);
    Tensor y;
    {
      torch::AutoGradMode enable(true);
      y = torch::tanh(layer->forward(x));
    }
    torch::autograd::backward({y}, {grad[0]});
    return {x.grad(), Tensor()};
  }
};

struct CheckpointedNet : nn::Module {
  nn::Linear in{nullptr}, shared{nullptr}, head{nullptr};
  CheckpointedNet() {
    in = register_module("in", nn::Linear(6, 8));
    shared = register_module("shared", nn::Linear(8, 8));
    head = register_module("head", nn::Linear(8, 3));
  }
  Tensor forward(Tensor x) {
    auto h = torch::relu(in(x));
    const auto layer = reinterpret_cast<int64_t>(shared.get());
    h = Segment::apply(h, layer);  // the shared layer, checkpointed twice
    h = Segment::apply(h, layer);
    return head(h);
  }
};

TEST(DDPStaticGraph, SharedLayerInTwoCheckpointedSegmentsTrainsWithParity) {
  const int world = 2, steps = 4;
  torch::manual_seed(21);
  auto reference = std::make_shared<CheckpointedNet>();
  auto init = snapshot(*reference);
  torch::optim::SGD ref_opt(reference->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  for (int t = 0; t < steps; ++t) {
    std::vector<Tensor> xs, ys;
    for (int r = 0; r < world; ++r) {
      auto d = batch(r, t);
      xs.push_back(d.first);
      ys.push_back(d.second);
    }
    ref_opt.zero_grad();
    torch::mse_loss(reference->forward(torch::cat(xs)), torch::cat(ys)).backward();
    ref_opt.step();
  }
  auto want = snapshot(*reference);

  std::vector<std::vector<Tensor>> got(world);
  std::vector<std::string> without_static(world);
  lockstep_test::with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    const int r = pg->rank();
    auto model = std::make_shared<CheckpointedNet>();
    {
      torch::NoGradGuard g;
      auto params = model->parameters();
      for (size_t i = 0; i < params.size(); ++i) params[i].copy_(init[i]);
    }
    {
      DistributedDataParallel plain(model, pg, DDPOptions().broadcast_parameters(false));
      auto d = batch(r, 0);
      without_static[r] = message_of([&] {
        torch::mse_loss(plain->forward(d.first), d.second).backward();
      });
      for (auto& p : model->parameters()) p.mutable_grad() = Tensor();
    }
    DistributedDataParallel ddp(model, pg, DDPOptions().static_graph(true));
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    for (int t = 0; t < steps; ++t) {
      auto d = batch(r, t);
      opt.zero_grad();
      torch::mse_loss(ddp->forward(d.first), d.second).backward();
      opt.step();
    }
    got[r] = snapshot(*model);
  }, lockstep::ProcessGroupOptions().timeout(std::chrono::seconds(10)));
  for (int r = 0; r < world; ++r) {
    EXPECT_NE(without_static[r].find("DDP: the gradient hook of parameter 'shared."),
              std::string::npos) << without_static[r];
    EXPECT_NE(without_static[r].find("' fired twice in one backward"), std::string::npos);
    EXPECT_NE(without_static[r].find("use DDPOptions().static_graph(true)"), std::string::npos);
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_TRUE(torch::allclose(got[r][i], want[i], 1e-5, 1e-6))
          << "tensor " << i << " of rank " << r;
      EXPECT_TRUE(torch::equal(got[r][i], got[0][i])) << "tensor " << i << " of rank " << r;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Ignored parameters and buffers

TEST(DDPIgnore, IgnoredParametersAndBuffersStayLocal) {
  std::vector<Tensor> l1_grad(2), l2_grad(2), l1_weight(2), mean(2);
  std::vector<Tensor> local_l1_grad(2), local_l2_grad(2);
  lockstep_test::with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    const int r = pg->rank();
    torch::manual_seed(40 + r);
    auto model = std::make_shared<BnNet>();
    auto weight_before = model->fc->weight.detach().clone();
    DistributedDataParallel ddp(model, pg,
                                DDPOptions().ignore({"fc.weight", "bn.running_mean"}));
    l1_weight[r] = model->fc->weight.detach().clone();
    EXPECT_TRUE(torch::equal(l1_weight[r], weight_before)) << "rank " << r;
    auto x = torch::randn({kBatch, 3}) + r;
    ddp->forward(x).pow(2).mean().backward();
    ddp->forward(x).pow(2).mean();  // a second forward would broadcast buffers
    l1_grad[r] = model->fc->weight.grad().clone();
    l2_grad[r] = model->fc->bias.grad().clone();
    mean[r] = model->bn->running_mean.clone();
  });
  EXPECT_FALSE(torch::equal(l1_weight[0], l1_weight[1])) << "an ignored parameter was broadcast";
  EXPECT_FALSE(torch::equal(l1_grad[0], l1_grad[1])) << "an ignored gradient was reduced";
  EXPECT_TRUE(torch::equal(l2_grad[0], l2_grad[1])) << "fc.bias should be reduced";
  EXPECT_FALSE(torch::equal(mean[0], mean[1])) << "an ignored buffer was broadcast";
}

TEST(DDPIgnore, UnknownNameIsRejected) {
  std::string message;
  lockstep_test::with_groups(1, [&](const lockstep::ProcessGroupPtr& pg) {
    message = message_of([&] {
      DistributedDataParallel ddp(std::make_shared<Mlp>(), pg, DDPOptions().ignore({"l3.weight"}));
    });
  });
  EXPECT_NE(message.find("DDPOptions::ignore names 'l3.weight', but the wrapped module has no "
                         "parameter or buffer of that name"),
            std::string::npos)
      << message;
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
