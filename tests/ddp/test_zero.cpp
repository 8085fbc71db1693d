// ZeroRedundancyOptimizer: the pure shard planner; parity with DDP + the plain optimizer, with
// ranks as threads; per-rank optimizer state; consolidated checkpoints equal to a plain
// optimizer's, loaded back at other world sizes; every error.
#include <gtest/gtest.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/ddp.h"
#include "lockstep/errors.h"
#include "lockstep/train/checkpoint.h"
#include "lockstep/zero_redundancy_optimizer.h"
#include "support/threads.h"

namespace {

using lockstep::DDPOptions;
using lockstep::DistributedDataParallel;
using lockstep::OptimizerFactory;
using lockstep::ProcessGroupPtr;
using lockstep::ZeroOptions;
using lockstep::ZeroRedundancyOptimizer;
using lockstep::optimizer_factory;
using lockstep::plan_zero_shards;
using torch::Tensor;
namespace nn = torch::nn;
namespace optim = torch::optim;

// ---------------------------------------------------------------------------------------------
// The planner (pure)

struct PlanCase {
  std::vector<int64_t> sizes;
  int world;
  std::vector<int> owner;
  std::vector<int64_t> load;
};

TEST(ZeroPlanner, LargestFirstToTheLeastLoadedRank) {
  const std::vector<PlanCase> cases = {
      {{10, 9, 8, 1, 1, 1}, 2, {0, 1, 1, 0, 0, 0}, {13, 17}},
      {{5, 5, 5, 5}, 2, {0, 1, 0, 1}, {10, 10}},           // ties: lower index, lower rank
      {{3, 7}, 4, {1, 0}, {7, 3, 0, 0}},                   // more ranks than parameters
      {{}, 3, {}, {0, 0, 0}},                              // nothing to shard
      {{0, 4, 0}, 2, {1, 0, 1}, {4, 0}},                   // empty parameters
      {{6, 2, 9}, 1, {0, 0, 0}, {17}},                     // one rank owns everything
      {{1, 2, 3, 4, 5, 6}, 3, {0, 1, 2, 2, 1, 0}, {7, 7, 7}},
  };
  for (const auto& c : cases) {
    auto plan = plan_zero_shards(c.sizes, c.world);
    EXPECT_EQ(plan.owner, c.owner) << "world " << c.world << ", " << c.sizes.size() << " sizes";
    EXPECT_EQ(plan.load, c.load) << "world " << c.world << ", " << c.sizes.size() << " sizes";
  }
}

TEST(ZeroPlanner, BalancedAndDeterministic) {
  auto gen = at::detail::createCPUGenerator(7);
  for (int world : {2, 3, 5, 8}) {
    std::vector<int64_t> sizes;
    for (int i = 0; i < 97; ++i) {
      sizes.push_back(torch::randint(1, 5000, {1}, gen).item<int64_t>());
    }
    auto plan = plan_zero_shards(sizes, world);
    auto again = plan_zero_shards(sizes, world);
    EXPECT_EQ(plan.owner, again.owner);
    std::vector<int64_t> load(world, 0);
    for (size_t i = 0; i < sizes.size(); ++i) load[plan.owner[i]] += sizes[i];
    EXPECT_EQ(load, plan.load);
    const auto mm = std::minmax_element(load.begin(), load.end());
    // The greedy bound: the last parameter added to the fullest rank went to the least
    // loaded one, so the spread is at most the largest size.
    EXPECT_LE(*mm.second - *mm.first, *std::max_element(sizes.begin(), sizes.end()))
        << "world " << world;
  }
}

TEST(ZeroPlanner, RejectsBadArguments) {
  try {
    plan_zero_shards({1, 2}, 0);
    FAIL() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("expected a world size >= 1, but got 0"),
              std::string::npos) << e.what();
  }
  try {
    plan_zero_shards({1, -2}, 2);
    FAIL() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("parameter 1 has size -2"), std::string::npos)
        << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// Training with ranks as threads

struct Net : nn::Module {
  nn::Linear l1{nullptr}, l2{nullptr}, l3{nullptr};
  Net() {
    l1 = register_module("l1", nn::Linear(6, 24));
    l2 = register_module("l2", nn::Linear(24, 12));
    l3 = register_module("l3", nn::Linear(12, 3));
  }
  Tensor forward(Tensor x) { return l3(torch::tanh(l2(torch::relu(l1(x))))); }
};

std::vector<Tensor> snapshot(nn::Module& m) {
  std::vector<Tensor> out;
  for (auto& p : m.parameters()) out.push_back(p.detach().clone());
  return out;
}

std::shared_ptr<Net> make_net(const std::vector<Tensor>& init) {
  auto net = std::make_shared<Net>();
  torch::NoGradGuard g;
  auto params = net->parameters();
  for (size_t i = 0; i < params.size(); ++i) params[i].copy_(init[i]);
  return net;
}

std::vector<Tensor> initial_parameters() {
  torch::manual_seed(11);
  return snapshot(*std::make_shared<Net>());
}

// Batch t of rank r: the same on every call.
std::pair<Tensor, Tensor> batch(int r, int t) {
  auto gen = at::detail::createCPUGenerator(500 + 41 * r + t);
  return {torch::randn({5, 6}, gen), torch::randn({5, 3}, gen)};
}

enum class Kind { kSGD, kAdam, kAdamW, kAdagrad, kRMSprop };

const char* name(Kind k) {
  switch (k) {
    case Kind::kSGD: return "SGD";
    case Kind::kAdam: return "Adam";
    case Kind::kAdamW: return "AdamW";
    case Kind::kAdagrad: return "Adagrad";
    case Kind::kRMSprop: return "RMSprop";
  }
  return "?";
}

OptimizerFactory factory(Kind k) {
  switch (k) {
    case Kind::kSGD: return optimizer_factory<optim::SGD>(optim::SGDOptions(0.05).momentum(0.9));
    case Kind::kAdam: return optimizer_factory<optim::Adam>(optim::AdamOptions(0.01));
    case Kind::kAdamW:
      return optimizer_factory<optim::AdamW>(optim::AdamWOptions(0.01).weight_decay(0.1));
    case Kind::kAdagrad: return optimizer_factory<optim::Adagrad>(optim::AdagradOptions(0.05));
    case Kind::kRMSprop:
      return optimizer_factory<optim::RMSprop>(
          optim::RMSpropOptions(0.01).momentum(0.5).centered(true));
  }
  return nullptr;
}

// The parameter groups of a run: one, or two with l1's at its own learning rate.
std::vector<optim::OptimizerParamGroup> groups_of(nn::Module& net, bool two_groups) {
  std::vector<optim::OptimizerParamGroup> out;
  auto params = net.parameters();
  if (!two_groups) {
    out.emplace_back(params);
    return out;
  }
  auto first = std::vector<Tensor>(params.begin(), params.begin() + 2);
  auto rest = std::vector<Tensor>(params.begin() + 2, params.end());
  auto probe = factory(Kind::kAdam)({optim::OptimizerParamGroup(std::vector<Tensor>{})});
  auto options = probe->defaults().clone();
  options->set_lr(0.003);
  out.emplace_back(first, std::move(options));
  out.emplace_back(rest);
  return out;
}

struct RunConfig {
  Kind kind = Kind::kAdam;
  bool zero = true;
  bool two_groups = false;
  bool scheduler = false;
  int first_step = 0;
  int steps = 20;
  DDPOptions ddp;
  ZeroOptions zero_options;
};

// Trains `net` under DDP with ZeRO or the plain optimizer; `setup` runs once the optimizer
// exists (to load a checkpoint), `finish` after the last step (to save one).
void run_training(const ProcessGroupPtr& pg, const std::shared_ptr<Net>& net, const RunConfig& c,
           const std::function<void(optim::Optimizer&)>& setup = nullptr,
           const std::function<void(optim::Optimizer&)>& finish = nullptr) {
  DistributedDataParallel ddp(net, pg, c.ddp);
  std::unique_ptr<optim::Optimizer> opt;
  if (c.zero) {
    opt = std::make_unique<ZeroRedundancyOptimizer>(groups_of(*net, c.two_groups), pg,
                                                    factory(c.kind), c.zero_options);
  } else {
    opt = factory(c.kind)(groups_of(*net, c.two_groups));
  }
  if (setup) setup(*opt);
  std::unique_ptr<optim::StepLR> scheduler;
  if (c.scheduler) scheduler = std::make_unique<optim::StepLR>(*opt, 5, 0.5);
  for (int t = c.first_step; t < c.first_step + c.steps; ++t) {
    opt->zero_grad();
    auto d = batch(pg->rank(), t);
    torch::mse_loss(ddp->forward(d.first), d.second).backward();
    ddp->step(*opt);  // DDP's step (its NaN/Inf policy) drives ZeRO as any optimizer
    if (scheduler) scheduler->step();
  }
  if (finish) finish(*opt);
}

double max_diff(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
  EXPECT_EQ(a.size(), b.size());
  double out = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    out = std::max(out, (a[i] - b[i]).abs().max().item<double>());
  }
  return out;
}

struct ParityCase {
  Kind kind;
  int world;
  bool two_groups = false;
  bool bucket_view = true;
  double bucket_cap_mb = 25;
  std::string transport = "gloo";
};

void check_parity(const ParityCase& c) {
  SCOPED_TRACE(testing::Message() << name(c.kind) << " world " << c.world << " groups "
                                  << (c.two_groups ? 2 : 1) << " bucket view " << c.bucket_view
                                  << " cap " << c.bucket_cap_mb << " MiB " << c.transport);
  const auto init = initial_parameters();
  std::vector<std::vector<Tensor>> zero(c.world), plain(c.world);
  lockstep::ProcessGroupOptions options;
  options.transport(c.transport);
  lockstep_test::with_groups(
      c.world,
      [&](const ProcessGroupPtr& pg) {
        RunConfig rc;
        rc.kind = c.kind;
        rc.two_groups = c.two_groups;
        rc.scheduler = c.two_groups;
        rc.ddp.gradient_as_bucket_view(c.bucket_view);
        rc.zero_options.bucket_cap_mb(c.bucket_cap_mb);
        auto a = make_net(init);
        run_training(pg, a, rc);
        zero[pg->rank()] = snapshot(*a);
        rc.zero = false;
        auto b = make_net(init);
        run_training(pg, b, rc);
        plain[pg->rank()] = snapshot(*b);
      },
      options);
  for (int r = 0; r < c.world; ++r) {
    ASSERT_EQ(zero[r].size(), 6u) << "rank " << r;
    EXPECT_LE(max_diff(zero[r], plain[r]), 1e-6) << "rank " << r;
    EXPECT_LE(max_diff(zero[r], zero[0]), 0) << "rank " << r << " differs from rank 0";
  }
  EXPECT_GT(max_diff(zero[0], init), 1e-3) << "training changed nothing";
}

TEST(Zero, ParityWithDdpAndThePlainOptimizer) {
  for (int world : {2, 3}) {
    for (Kind k : {Kind::kSGD, Kind::kAdam, Kind::kAdamW}) check_parity({k, world});
  }
  check_parity({Kind::kAdagrad, 2});
  check_parity({Kind::kRMSprop, 3});
}

TEST(Zero, ParityWithGroupsSchedulerSmallBucketsAndCopiedGradients) {
  // Two parameter groups (l1 at its own learning rate) and StepLR on the ZeRO optimizer.
  check_parity({Kind::kAdam, 3, /*two_groups=*/true});
  // Gradients that are not views of DDP's buckets, and broadcast buckets of 512 bytes, so
  // several per owner and parameters larger than one.
  check_parity({Kind::kSGD, 3, false, /*bucket_view=*/false, /*bucket_cap_mb=*/1.0 / 2048});
  check_parity({Kind::kAdamW, 2, false, true, 25, /*transport=*/"shm"});
}

// Elements of state tensors (step counts aside) that add_optimizer writes for `opt`.
int64_t state_numel(optim::Optimizer& opt) {
  lockstep::train::Checkpoint ckpt;
  lockstep::train::add_optimizer(ckpt, opt);
  int64_t n = 0;
  for (const auto& kv : ckpt.tensors) {
    const auto& key = kv.first;
    if (key.size() < 5 || key.compare(key.size() - 5, 5, ".step") != 0) n += kv.second.numel();
  }
  return n;
}

// Six equal layers: a model that shards evenly over 2 and 3 ranks.
nn::Sequential equal_layers() {
  nn::Sequential net;
  for (int i = 0; i < 6; ++i) net->push_back(nn::Linear(32, 32));
  return net;
}

TEST(Zero, EachRankHoldsStateForItsShardOnly) {
  for (int world : {2, 3}) {
    std::vector<int64_t> numel(world, -1), expected(world, 0);
    int64_t full = -1, total = 0;
    lockstep_test::with_groups(world, [&](const ProcessGroupPtr& pg) {
      auto net = equal_layers();
      ZeroRedundancyOptimizer zero(net->parameters(), pg, factory(Kind::kAdam));
      for (int t = 0; t < 2; ++t) {
        zero.zero_grad();
        net->forward(torch::ones({2, 32})).sum().backward();
        zero.step();
      }
      EXPECT_TRUE(zero.state().empty());
      numel[pg->rank()] = state_numel(zero.local_optimizer());
      for (size_t i = 0; i < zero.all_parameters().size(); ++i) {
        // Adam: exp_avg and exp_avg_sq per owned parameter.
        if (zero.plan().owner[i] == pg->rank()) {
          expected[pg->rank()] += 2 * zero.all_parameters()[i].numel();
        }
        if (pg->rank() == 0) total += zero.all_parameters()[i].numel();
      }
      zero.consolidate_state_dict(0);
      if (pg->rank() == 0) full = state_numel(zero.consolidated_optimizer());
    });
    EXPECT_EQ(full, 2 * total);
    std::string bytes;
    for (int r = 0; r < world; ++r) {
      EXPECT_EQ(numel[r], expected[r]) << "rank " << r;
      EXPECT_EQ(numel[r] * world, full) << "rank " << r << " of " << world;  // exactly 1/W
      bytes += " " + std::to_string(numel[r] * 4);
    }
    std::cout << "Adam state bytes, world " << world << ": full " << full * 4 << ", per rank"
              << bytes << "\n";
  }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

std::string temp_path(const std::string& name) {
  return std::string(::testing::TempDir()) + "lockstep_zero_" + std::to_string(::getpid()) + "_" +
         name;
}

void expect_same_checkpoint(const lockstep::train::Checkpoint& a,
                            const lockstep::train::Checkpoint& b) {
  EXPECT_EQ(a.metadata, b.metadata);
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (auto ia = a.tensors.begin(), ib = b.tensors.begin(); ia != a.tensors.end(); ++ia, ++ib) {
    ASSERT_EQ(ia->first, ib->first);
    EXPECT_EQ(ia->second.scalar_type(), ib->second.scalar_type()) << ia->first;
    EXPECT_TRUE(torch::equal(ia->second, ib->second)) << ia->first;
  }
}

TEST(Zero, ConsolidatedCheckpointEqualsThePlainOptimizersAndLoadsAtOtherWorldSizes) {
  namespace train = lockstep::train;
  const auto init = initial_parameters();
  const std::string zero_path = temp_path("zero.ckpt"), plain_path = temp_path("plain.ckpt");
  for (Kind kind : {Kind::kAdam, Kind::kSGD}) {
    SCOPED_TRACE(name(kind));
    std::vector<Tensor> resumed_init;
    // World 2: five steps, then rank 0 writes the consolidated state; the same training with
    // the plain optimizer writes the reference.
    lockstep_test::with_groups(2, [&](const ProcessGroupPtr& pg) {
      RunConfig rc;
      rc.kind = kind;
      rc.steps = 5;
      auto save = [&](const std::string& path) {
        return [&, path](optim::Optimizer& opt) {
          train::Checkpoint ckpt;
          optim::Optimizer* full = &opt;
          if (auto* zero = dynamic_cast<ZeroRedundancyOptimizer*>(&opt)) {
            zero->consolidate_state_dict(0);
            full = pg->rank() == 0 ? &zero->consolidated_optimizer() : nullptr;
          }
          if (pg->rank() == 0) train::add_optimizer(ckpt, *full);
          train::save_checkpoint(*pg, path, ckpt);
        };
      };
      auto a = make_net(init);
      run_training(pg, a, rc, nullptr, save(zero_path));
      rc.zero = false;
      auto b = make_net(init);
      run_training(pg, b, rc, nullptr, save(plain_path));
      EXPECT_LE(max_diff(snapshot(*a), snapshot(*b)), 0);
      // The parameters after those five steps: where the resumed runs start.
      if (pg->rank() == 0) resumed_init = snapshot(*a);
    });
    const auto zero_ckpt = train::read_checkpoint_file(zero_path);
    const auto plain_ckpt = train::read_checkpoint_file(plain_path);
    expect_same_checkpoint(zero_ckpt, plain_ckpt);
    ASSERT_FALSE(zero_ckpt.tensors.empty());

    // World 1 and 3: every rank loads the full state and keeps its shard; five more steps
    // equal five more steps of the plain optimizer loaded from the same file.
    for (int world : {1, 3}) {
      SCOPED_TRACE(testing::Message() << "loaded at world " << world);
      std::vector<std::vector<Tensor>> zero(world), plain(world);
      lockstep_test::with_groups(world, [&](const ProcessGroupPtr& pg) {
        RunConfig rc;
        rc.kind = kind;
        rc.first_step = 5;
        rc.steps = 5;
        auto a = make_net(resumed_init);
        run_training(pg, a, rc, [&](optim::Optimizer& opt) {
          auto& z = dynamic_cast<ZeroRedundancyOptimizer&>(opt);
          z.param_groups()[0].options().set_lr(0.5);  // the file's learning rate replaces it
          auto full = z.make_full_optimizer();
          train::load_optimizer(zero_ckpt, *full);
          z.load_full_state(*full);
          const double lr = kind == Kind::kAdam ? 0.01 : 0.05;
          EXPECT_EQ(z.param_groups()[0].options().get_lr(), lr);
          EXPECT_EQ(z.local_optimizer().param_groups()[0].options().get_lr(), lr);
          size_t owned = 0;
          for (int o : z.plan().owner) owned += o == pg->rank() ? 1 : 0;
          EXPECT_EQ(z.local_optimizer().state().size(), owned) << pg->where();
        });
        zero[pg->rank()] = snapshot(*a);
        rc.zero = false;
        auto b = make_net(resumed_init);
        run_training(pg, b, rc, [&](optim::Optimizer& opt) { train::load_optimizer(zero_ckpt, opt); });
        plain[pg->rank()] = snapshot(*b);
      });
      for (int r = 0; r < world; ++r) {
        EXPECT_LE(max_diff(zero[r], plain[r]), 1e-6) << "rank " << r;
      }
    }
  }
  std::remove(zero_path.c_str());
  std::remove(plain_path.c_str());
}

TEST(Zero, ConsolidatesOnAnyRankWithGroupsAndHyperparameters) {
  namespace train = lockstep::train;
  const auto init = initial_parameters();
  std::vector<train::Checkpoint> got(2);
  lockstep_test::with_groups(3, [&](const ProcessGroupPtr& pg) {
    RunConfig rc;
    rc.two_groups = true;
    rc.scheduler = true;
    rc.steps = 7;
    for (bool zero : {true, false}) {
      rc.zero = zero;
      auto net = make_net(init);
      run_training(pg, net, rc, nullptr, [&](optim::Optimizer& opt) {
        if (zero) {
          auto& z = dynamic_cast<ZeroRedundancyOptimizer&>(opt);
          z.consolidate_state_dict(2);
          if (pg->rank() == 2) train::add_optimizer(got[0], z.consolidated_optimizer());
        } else if (pg->rank() == 2) {
          train::add_optimizer(got[1], opt);
        }
      });
    }
  });
  expect_same_checkpoint(got[0], got[1]);
  // StepLR halved both groups' learning rates once (after step 5).
  EXPECT_NE(got[0].metadata.find("\"lr\":0.0015"), std::string::npos) << got[0].metadata;
}

// ---------------------------------------------------------------------------------------------
// Errors

template <typename E>
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected an exception";
  return "";
}

#define EXPECT_MESSAGE(message, text) \
  EXPECT_NE((message).find(text), std::string::npos) << (message)

TEST(Zero, ConstructionErrors) {
  lockstep_test::with_groups(1, [&](const ProcessGroupPtr& pg) {
    auto net = std::make_shared<Net>();
    using E = lockstep::InvalidArgument;
    EXPECT_MESSAGE(error_of<E>([&] {
                     ZeroRedundancyOptimizer z(net->parameters(), nullptr, factory(Kind::kSGD));
                   }),
                   "expected a process group, but got nullptr");
    EXPECT_MESSAGE(error_of<E>([&] {
                     ZeroRedundancyOptimizer z(net->parameters(), pg, OptimizerFactory());
                   }),
                   "expected an optimizer factory");
    EXPECT_MESSAGE(error_of<E>([&] {
                     ZeroRedundancyOptimizer z(
                         net->parameters(), pg,
                         [](std::vector<optim::OptimizerParamGroup>) { return nullptr; });
                   }),
                   "it returned nullptr");
    EXPECT_MESSAGE(error_of<E>([&] {
                     ZeroRedundancyOptimizer z(net->parameters(), pg,
                                               optimizer_factory<optim::LBFGS>(
                                                   optim::LBFGSOptions(1)));
                   }),
                   "LBFGS cannot be sharded");
    EXPECT_MESSAGE(error_of<E>([&] {
                     ZeroRedundancyOptimizer z(
                         net->parameters(), pg,
                         [](std::vector<optim::OptimizerParamGroup> groups)
                             -> std::unique_ptr<optim::Optimizer> {
                           groups.push_back(optim::OptimizerParamGroup(std::vector<Tensor>{}));
                           return std::make_unique<optim::SGD>(groups, optim::SGDOptions(0.1));
                         });
                   }),
                   "keep the 1 parameter groups it is given, but its torch::optim::SGD has 2");
    EXPECT_MESSAGE(error_of<E>([&] {
                     ZeroRedundancyOptimizer z(std::vector<Tensor>{net->l1->weight * 2}, pg, factory(Kind::kSGD));
                   }),
                   "parameter 0 of group 0 was computed from other tensors");
    EXPECT_MESSAGE(error_of<E>([&] {
                     ZeroRedundancyOptimizer z(std::vector<Tensor>{net->l1->weight, Tensor()},
                                               pg, factory(Kind::kSGD));
                   }),
                   "parameter 1 of group 0 is an undefined tensor");
    EXPECT_MESSAGE(error_of<E>([&] {
                     ZeroRedundancyOptimizer z(net->parameters(), pg, factory(Kind::kSGD),
                                               ZeroOptions().bucket_cap_mb(0));
                   }),
                   "expected bucket_cap_mb > 0, but got 0");
  });
}

TEST(Zero, RanksThatDisagreeOnTheParametersFailTogether) {
  std::vector<std::string> messages(2);
  lockstep_test::with_groups(2, [&](const ProcessGroupPtr& pg) {
    auto net = std::make_shared<Net>();
    auto params = net->parameters();
    if (pg->rank() == 1) params.pop_back();
    messages[pg->rank()] = error_of<lockstep::InvalidArgument>(
        [&] { ZeroRedundancyOptimizer z(params, pg, factory(Kind::kAdam)); });
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_MESSAGE(messages[r], "every rank must pass the same parameters to shard");
    EXPECT_MESSAGE(messages[r], "parameters per group");
    EXPECT_MESSAGE(messages[r], "ddp->parameters()");
  }
  lockstep_test::with_groups(2, [&](const ProcessGroupPtr& pg) {
    auto net = std::make_shared<Net>();
    auto params = net->parameters();
    if (pg->rank() == 1) std::swap(params[0], params[1]);
    messages[pg->rank()] = error_of<lockstep::InvalidArgument>(
        [&] { ZeroRedundancyOptimizer z(params, pg, factory(Kind::kAdam)); });
  });
  for (int r = 0; r < 2; ++r) EXPECT_MESSAGE(messages[r], "parameter 0");
}

TEST(Zero, ConsolidationErrors) {
  std::vector<std::string> messages(2), disagree(2);
  lockstep_test::with_groups(2, [&](const ProcessGroupPtr& pg) {
    auto net = std::make_shared<Net>();
    ZeroRedundancyOptimizer z(net->parameters(), pg, factory(Kind::kAdam));
    using S = lockstep::StateError;
    EXPECT_MESSAGE(error_of<S>([&] { z.consolidated_optimizer(); }),
                   "Call consolidate_state_dict(to_rank) on every rank");
    messages[pg->rank()] =
        error_of<lockstep::InvalidArgument>([&] { z.consolidate_state_dict(2); });
    disagree[pg->rank()] =
        error_of<lockstep::InvalidArgument>([&] { z.consolidate_state_dict(pg->rank()); });
    z.consolidate_state_dict(0);
    if (pg->rank() == 1) {
      EXPECT_MESSAGE(error_of<S>([&] { z.consolidated_optimizer(); }), "[rank 1/2]");
    } else {
      EXPECT_EQ(z.consolidated_optimizer().param_groups()[0].params().size(), 6u);
    }
    for (auto& p : net->parameters()) p.mutable_grad() = torch::ones_like(p);
    z.step();
    EXPECT_MESSAGE(error_of<S>([&] { z.consolidated_optimizer(); }), "after the last step()");
    torch::serialize::OutputArchive out;
    EXPECT_MESSAGE(error_of<S>([&] { z.save(out); }), "consolidate_state_dict(0)");
    torch::serialize::InputArchive in;
    EXPECT_MESSAGE(error_of<S>([&] { z.load(in); }), "load_full_state");
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_MESSAGE(messages[r], "expected to_rank in [0, 2), but got 2");
    EXPECT_MESSAGE(disagree[r], "every rank must pass the same to_rank");
  }
}

TEST(Zero, LoadFullStateErrors) {
  lockstep_test::with_groups(1, [&](const ProcessGroupPtr& pg) {
    auto net = std::make_shared<Net>();
    ZeroRedundancyOptimizer z(net->parameters(), pg, factory(Kind::kAdam));
    using E = lockstep::InvalidArgument;
    auto sgd = factory(Kind::kSGD)({optim::OptimizerParamGroup(net->parameters())});
    EXPECT_MESSAGE(error_of<E>([&] { z.load_full_state(*sgd); }),
                   "optimizer type: got torch::optim::SGD, expected torch::optim::Adam");
    auto params = net->parameters();
    params.pop_back();
    auto fewer = factory(Kind::kAdam)({optim::OptimizerParamGroup(params)});
    EXPECT_MESSAGE(error_of<E>([&] { z.load_full_state(*fewer); }),
                   "parameter count of group 0: got 5, expected 6");
    params = net->parameters();
    std::swap(params[0], params[2]);
    auto swapped = factory(Kind::kAdam)({optim::OptimizerParamGroup(params)});
    const auto message = error_of<E>([&] { z.load_full_state(*swapped); });
    EXPECT_MESSAGE(message, "parameter 0 of group 0: got Float [12, 24], expected Float [24, 6]");
    EXPECT_MESSAGE(message, "nothing was loaded");
    EXPECT_MESSAGE(message, "make_full_optimizer()");
    auto two = factory(Kind::kAdam)(groups_of(*net, /*two_groups=*/true));
    EXPECT_MESSAGE(error_of<E>([&] { z.load_full_state(*two); }),
                   "parameter groups: got 2, expected 1");
  });
}

}  // namespace
