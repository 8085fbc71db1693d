// Checkpoint files: round trips, corruption of every kind, strict model/optimizer loading,
// RNG state, collective save/load failures and configuration agreement.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <csignal>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "lockstep/errors.h"
#include "lockstep/train/checkpoint.h"
#include "support/threads.h"

using namespace lockstep;
using namespace lockstep::train;

namespace {

std::string temp_path(const std::string& name) {
  return (std::string(::testing::TempDir()) + "lockstep_ckpt_" + std::to_string(::getpid()) + "_" +
          name);
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

// Sets (or removes) one field of `checkpoint`'s metadata, to forge files in tests.
void json_set(Checkpoint& checkpoint, const std::string& key, const std::string& value) {
  auto meta = nlohmann::json::parse(checkpoint.metadata);
  meta[key] = nlohmann::json::parse(value);
  checkpoint.metadata = meta.dump();
}

void json_erase(Checkpoint& checkpoint, const std::string& key) {
  auto meta = nlohmann::json::parse(checkpoint.metadata);
  meta.erase(key);
  checkpoint.metadata = meta.dump();
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const lockstep::InvalidArgument& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("WRONG TYPE: ") + e.what();
  }
  return "NO ERROR";
}

Checkpoint sample() {
  Checkpoint ck;
  ck.tensors["a.float"] = torch::randn({3, 4});
  ck.tensors["b.long"] = torch::arange(7, torch::kLong);
  ck.tensors["c.empty"] = torch::empty({0, 5});
  ck.tensors["d.scalar"] = torch::tensor(3.5, torch::kDouble);
  ck.tensors["e.bool"] = torch::tensor({true, false, true});
  ck.tensors["f.half"] = torch::randn({2, 2}).to(torch::kHalf);
  ck.tensors["g.noncontig"] = torch::randn({4, 6}).t();
  ck.metadata = R"({"step": 12, "name": "x"})";
  return ck;
}

struct Net : torch::nn::Module {
  Net(int hidden = 8) {
    fc1 = register_module("fc1", torch::nn::Linear(4, hidden));
    bn = register_module("bn", torch::nn::BatchNorm1d(hidden));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, 2));
  }
  torch::Tensor forward(torch::Tensor x) { return fc2(torch::relu(bn(fc1(x)))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::BatchNorm1d bn{nullptr};
};

void train_steps(Net& net, torch::optim::Optimizer& opt, int steps, int seed) {
  torch::manual_seed(seed);
  for (int i = 0; i < steps; ++i) {
    auto x = torch::randn({16, 4});
    auto y = torch::randint(0, 2, {16}, torch::kLong);
    // The closure form every optimizer takes (LBFGS calls it several times per step).
    opt.step([&] {
      opt.zero_grad();
      auto loss = torch::nn::functional::cross_entropy(net.forward(x), y);
      loss.backward();
      return loss;
    });
  }
}

bool same_params(Net& a, Net& b) {
  auto pa = a.named_parameters(), pb = b.named_parameters();
  for (const auto& p : pa) {
    if (!torch::equal(p.value(), pb[p.key()])) return false;
  }
  auto ba = a.named_buffers(), bb = b.named_buffers();
  for (const auto& p : ba) {
    if (!torch::equal(p.value(), bb[p.key()])) return false;
  }
  return true;
}

}  // namespace

TEST(CheckpointFile, RoundTripKeepsEveryTensorBitwiseAndTheMetadata) {
  auto path = temp_path("roundtrip");
  auto ck = sample();
  write_checkpoint_file(path, ck);
  auto back = read_checkpoint_file(path);
  ASSERT_EQ(back.tensors.size(), ck.tensors.size());
  for (const auto& kv : ck.tensors) {
    const auto& got = back.tensors.at(kv.first);
    EXPECT_EQ(got.scalar_type(), kv.second.scalar_type()) << kv.first;
    EXPECT_EQ(got.sizes(), kv.second.sizes()) << kv.first;
    EXPECT_TRUE(torch::equal(got, kv.second)) << kv.first;
  }
  EXPECT_NE(back.metadata.find("\"step\":12"), std::string::npos) << back.metadata;
  EXPECT_NE(back.metadata.find("\"name\":\"x\""), std::string::npos) << back.metadata;
  // Deterministic bytes: writing the same checkpoint twice gives the same file.
  auto path2 = temp_path("roundtrip2");
  write_checkpoint_file(path2, back);
  EXPECT_EQ(read_bytes(path), read_bytes(path2));
  // No temporary file is left behind.
  EXPECT_FALSE(checkpoint_exists(path + ".tmp." + std::to_string(::getpid())));
}

TEST(CheckpointFile, EveryTruncationIsRejectedWithPathAndReason) {
  auto path = temp_path("trunc");
  write_checkpoint_file(path, sample());
  const std::string bytes = read_bytes(path);
  auto cut = temp_path("trunc_cut");
  for (size_t len : {size_t(0), size_t(5), size_t(20), bytes.size() / 3, bytes.size() / 2,
                     bytes.size() - 17, bytes.size() - 1}) {
    write_bytes(cut, bytes.substr(0, len));
    auto msg = error_of([&] { read_checkpoint_file(cut); });
    EXPECT_NE(msg.find(cut), std::string::npos) << "cut at " << len << ": " << msg;
    EXPECT_TRUE(msg.find("truncated") != std::string::npos ||
                msg.find("not a lockstep checkpoint") != std::string::npos)
        << "cut at " << len << ": " << msg;
  }
  auto msg = error_of([&] { read_checkpoint_file(temp_path("does_not_exist")); });
  EXPECT_NE(msg.find("cannot open"), std::string::npos) << msg;
}

TEST(CheckpointFile, EveryFlippedBitIsDetected) {
  auto path = temp_path("flip");
  write_checkpoint_file(path, sample());
  const std::string bytes = read_bytes(path);
  auto bad = temp_path("flip_bad");
  // Flip one bit at every byte position (the file is small): no corruption goes unnoticed.
  int detected = 0;
  for (size_t pos = 0; pos < bytes.size(); ++pos) {
    std::string b = bytes;
    b[pos] = static_cast<char>(b[pos] ^ (1 << (pos % 8)));
    write_bytes(bad, b);
    auto msg = error_of([&] { read_checkpoint_file(bad); });
    if (msg.rfind("cannot load checkpoint '" + bad + "'", 0) == 0) ++detected;
    else ADD_FAILURE() << "flip at byte " << pos << " not detected: " << msg;
  }
  EXPECT_EQ(detected, static_cast<int>(bytes.size()));
}

TEST(CheckpointFile, WrongVersionAndForeignFilesAreNamed) {
  auto path = temp_path("version");
  write_checkpoint_file(path, sample());
  std::string bytes = read_bytes(path);
  bytes[8] = 7;  // version field (u32 little-endian at offset 8)
  write_bytes(path, bytes);
  auto msg = error_of([&] { read_checkpoint_file(path); });
  EXPECT_NE(msg.find("format version 7"), std::string::npos) << msg;
  write_bytes(path, "PK\x03\x04 this is a zip, not a checkpoint.........");
  msg = error_of([&] { read_checkpoint_file(path); });
  EXPECT_NE(msg.find("not a lockstep checkpoint"), std::string::npos) << msg;
}

TEST(CheckpointFile, FailedWriteLeavesThePreviousCheckpointIntact) {
  auto path = temp_path("atomic");
  write_checkpoint_file(path, sample());
  const std::string before = read_bytes(path);
  Checkpoint bad;
  bad.metadata = "not json";
  EXPECT_THROW(write_checkpoint_file(path, bad), lockstep::InvalidArgument);
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_THROW(write_checkpoint_file("/nonexistent_dir_lockstep/x.ckpt", sample()), lockstep::Error);
}

TEST(ModuleState, LoadRestoresExactlyAndRejectsAnotherModelWithoutTouchingIt) {
  torch::manual_seed(1);
  Net a, b;
  Checkpoint ck;
  add_module(ck, a);
  load_module(ck, b);
  EXPECT_TRUE(same_params(a, b));

  Net wider(16);
  auto before = wider.fc1->weight.clone();
  ck.tensors["model.extra"] = torch::zeros({1});
  ck.tensors.erase("model.fc2.bias");
  auto msg = error_of([&] { load_module(ck, wider); });
  EXPECT_NE(msg.find("missing key 'model.fc2.bias'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("unexpected key 'model.extra'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.fc1.weight': checkpoint has shape [8, 4], the model has [16, 4]"),
            std::string::npos)
      << msg;
  EXPECT_TRUE(torch::equal(before, wider.fc1->weight)) << "a rejected load changed the model";
}

// Parameter groups over `net`: one group, or fc1's parameters with `options` and the rest at
// half the learning rate.
template <typename Options>
std::vector<torch::optim::OptimizerParamGroup> param_groups(Net& net, const Options& options,
                                                            bool two_groups) {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  if (!two_groups) {
    groups.emplace_back(net.parameters(), std::make_unique<Options>(options));
    return groups;
  }
  std::vector<torch::Tensor> first = net.fc1->parameters(), rest;
  for (const auto& p : net.named_parameters()) {
    if (p.key().rfind("fc1.", 0) != 0) rest.push_back(p.value());
  }
  Options half = options;
  half.lr(options.lr() / 2);
  groups.emplace_back(first, std::make_unique<Options>(options));
  groups.emplace_back(rest, std::make_unique<Options>(half));
  return groups;
}

// Trains k steps, saves, loads into a fresh optimizer built with `fresh` hyperparameters
// (which the checkpoint must override), continues, and compares bitwise with an
// uninterrupted run: parameters, buffers and every group's hyperparameters.
template <typename Opt, typename Options>
void check_optimizer_resume(Options options, Options fresh, bool two_groups = false,
                            int steps_before = 3) {
  torch::manual_seed(3);
  Net ref;
  Net resumed;
  Checkpoint init;
  add_module(init, ref);
  load_module(init, resumed);
  Opt opt_ref(param_groups(ref, options, two_groups), options);
  train_steps(ref, opt_ref, steps_before, 10);
  Checkpoint ck;
  add_module(ck, ref);
  add_optimizer(ck, opt_ref);
  auto path = temp_path("opt");
  write_checkpoint_file(path, ck);
  train_steps(ref, opt_ref, 4, 11);

  Opt opt_resumed(param_groups(resumed, fresh, two_groups), fresh);
  auto loaded = read_checkpoint_file(path);
  load_module(loaded, resumed);
  load_optimizer(loaded, opt_resumed);
  train_steps(resumed, opt_resumed, 4, 11);
  EXPECT_TRUE(same_params(ref, resumed));
  ASSERT_EQ(opt_ref.param_groups().size(), opt_resumed.param_groups().size());
  for (size_t g = 0; g < opt_ref.param_groups().size(); ++g) {
    EXPECT_TRUE(static_cast<Options&>(opt_ref.param_groups()[g].options()) ==
                static_cast<Options&>(opt_resumed.param_groups()[g].options()))
        << "hyperparameters of group " << g << " were not restored";
  }
  std::remove(path.c_str());
}

template <typename Opt, typename Options>
void check_optimizer_resume(Options options) {
  check_optimizer_resume<Opt>(options, options);
}

TEST(OptimizerState, SgdWithMomentumResumesBitwise) {
  check_optimizer_resume<torch::optim::SGD>(torch::optim::SGDOptions(0.1).momentum(0.9));
}

TEST(OptimizerState, AdamResumesBitwise) {
  check_optimizer_resume<torch::optim::Adam>(torch::optim::AdamOptions(0.01));
}

TEST(OptimizerState, AdamWResumesBitwise) {
  check_optimizer_resume<torch::optim::AdamW>(torch::optim::AdamWOptions(0.01));
}

TEST(OptimizerState, EveryOptimizerResumesBitwiseWithItsHyperparameters) {
  using namespace torch::optim;
  check_optimizer_resume<SGD>(SGDOptions(0.1).momentum(0.9).nesterov(true).weight_decay(1e-3),
                              SGDOptions(0.7), /*two_groups=*/true);
  check_optimizer_resume<SGD>(SGDOptions(0.1).momentum(0.5).dampening(0.1), SGDOptions(0.3));
  check_optimizer_resume<Adam>(AdamOptions(0.01).betas({0.8, 0.95}).amsgrad(true),
                               AdamOptions(0.5), /*two_groups=*/true);
  check_optimizer_resume<AdamW>(AdamWOptions(0.01).weight_decay(0.1).eps(1e-6),
                                AdamWOptions(0.2).amsgrad(true));
  check_optimizer_resume<Adagrad>(AdagradOptions(0.05).lr_decay(0.01).weight_decay(1e-4)
                                      .initial_accumulator_value(0.1),
                                  AdagradOptions(0.9), /*two_groups=*/true);
  check_optimizer_resume<RMSprop>(RMSpropOptions(0.01), RMSpropOptions(0.1).alpha(0.5));
  check_optimizer_resume<RMSprop>(RMSpropOptions(0.01).centered(true).momentum(0.9)
                                      .weight_decay(1e-3),
                                  RMSpropOptions(0.1), /*two_groups=*/true);
}

TEST(OptimizerState, LbfgsResumesBitwiseWithItsHistory) {
  using namespace torch::optim;
  // history_size 3 < the iterations run: the history has been trimmed when it is saved.
  check_optimizer_resume<LBFGS>(LBFGSOptions(0.5).max_iter(4).history_size(3),
                                LBFGSOptions(1).max_iter(9));
  check_optimizer_resume<LBFGS>(LBFGSOptions(1).max_iter(5).line_search_fn("strong_wolfe"),
                                LBFGSOptions(1));
  // Saved before any step: no state, and the fresh optimizer continues like the original.
  check_optimizer_resume<LBFGS>(LBFGSOptions(0.5), LBFGSOptions(0.5), false, /*steps_before=*/0);

  Net net;
  LBFGS lbfgs(net.parameters(), LBFGSOptions(0.5).max_iter(4).history_size(3));
  train_steps(net, lbfgs, 2, 1);
  Checkpoint ck;
  add_optimizer(ck, lbfgs);
  ASSERT_TRUE(ck.tensors.count("optim.0.0.old_dirs.2")) << "expected a full history of 3";
  EXPECT_EQ(ck.tensors.at("optim.0.0.d").numel(), 4 * 8 + 8 + 8 + 8 + 8 * 2 + 2);
  Checkpoint gap = ck;
  gap.tensors.erase("optim.0.0.old_stps.1");
  auto msg = error_of([&] { load_optimizer(gap, lbfgs); });
  EXPECT_NE(msg.find("LBFGS history under 'optim.0.0.': checkpoint has 3 old_dirs, 2 old_stps "
                     "and 3 ro, expected the same number of each, numbered from 0, at most "
                     "history_size (3)"),
            std::string::npos) << msg;
  Checkpoint longer = ck;
  json_set(longer, "optim.groups", R"([{"lr":0.5,"max_iter":4,"max_eval":5,"tolerance_grad":1e-7,
      "tolerance_change":1e-9,"history_size":2,"line_search_fn":null}])");
  msg = error_of([&] { load_optimizer(longer, lbfgs); });
  EXPECT_NE(msg.find("at most history_size (2)"), std::string::npos) << msg;
  Checkpoint flat = ck;
  flat.tensors["optim.0.0.d"] = torch::zeros({3});
  msg = error_of([&] { load_optimizer(flat, lbfgs); });
  EXPECT_NE(msg.find("optimizer state 'optim.0.0.d': checkpoint has Float [3], expected Float "
                     "[74] (all of the group's parameters, flattened)"),
            std::string::npos) << msg;
  Checkpoint real = ck;
  real.tensors["optim.0.0.t"] = torch::zeros({1});
  msg = error_of([&] { load_optimizer(real, lbfgs); });
  EXPECT_NE(msg.find("optimizer state 'optim.0.0.t': checkpoint has Float [1], expected one "
                     "float64"),
            std::string::npos) << msg;
}

TEST(OptimizerState, HyperparametersAreRangeCheckedAndStateMustBeComplete) {
  using namespace torch::optim;
  Net net;
  Adam adam(net.parameters(), AdamOptions(0.01));
  train_steps(net, adam, 1, 1);
  Checkpoint ck;
  add_optimizer(ck, adam);
  Checkpoint bad = ck;
  json_set(bad, "optim.groups", R"([{"lr":0.01,"beta1":1.5,"beta2":0.999,"eps":1e-8,
      "weight_decay":0,"amsgrad":"no"}])");
  const auto before = adam.param_groups()[0].options().clone();
  auto msg = error_of([&] { load_optimizer(bad, adam); });
  EXPECT_NE(msg.find("optim.groups[0].beta1: checkpoint has 1.5, expected a finite number in "
                     "[0, 1]"),
            std::string::npos) << msg;
  EXPECT_NE(msg.find("optim.groups[0].amsgrad: checkpoint has \"no\", expected true or false"),
            std::string::npos) << msg;
  EXPECT_TRUE(static_cast<AdamOptions&>(*before) ==
              static_cast<AdamOptions&>(adam.param_groups()[0].options()))
      << "a rejected load changed the hyperparameters";
  json_set(bad, "optim.groups", "[]");
  msg = error_of([&] { load_optimizer(bad, adam); });
  EXPECT_NE(msg.find("optim.groups: checkpoint has 0 groups, expected an array of 1 parameter "
                     "groups' hyperparameters"),
            std::string::npos) << msg;

  Checkpoint partial = ck;
  partial.tensors.erase("optim.0.1.exp_avg_sq");
  partial.tensors["optim.0.1.momentum"] = torch::zeros({8});
  msg = error_of([&] { load_optimizer(partial, adam); });
  EXPECT_NE(msg.find("missing key 'optim.0.1.exp_avg_sq' (the Adam state of parameter 1 of "
                     "group 0)"),
            std::string::npos) << msg;
  EXPECT_NE(msg.find("unexpected key 'optim.0.1.momentum'"), std::string::npos) << msg;

  // State that the restored hyperparameters make the step read must be there.
  RMSprop rmsprop(net.parameters(), RMSpropOptions(0.01).momentum(0.9).centered(true));
  train_steps(net, rmsprop, 1, 1);
  Checkpoint rms;
  add_optimizer(rms, rmsprop);
  rms.tensors.erase("optim.0.2.grad_avg");
  msg = error_of([&] { load_optimizer(rms, rmsprop); });
  EXPECT_NE(msg.find("missing key 'optim.0.2.grad_avg' (the RMSprop state of parameter 2 of "
                     "group 0)"),
            std::string::npos) << msg;

  // A file written before the hyperparameters were saved restores the learning rates only.
  Checkpoint old = ck;
  json_erase(old, "optim.groups");
  Adam fresh(net.parameters(), AdamOptions(0.5).betas({0.5, 0.5}));
  load_optimizer(old, fresh);
  EXPECT_EQ(static_cast<AdamOptions&>(fresh.param_groups()[0].options()).lr(), 0.01);
  EXPECT_EQ(std::get<0>(static_cast<AdamOptions&>(fresh.param_groups()[0].options()).betas()),
            0.5);
}

struct CustomOptimizer : torch::optim::Optimizer {
  explicit CustomOptimizer(std::vector<torch::Tensor> params)
      : Optimizer({torch::optim::OptimizerParamGroup(std::move(params))},
                  std::make_unique<torch::optim::SGDOptions>(0.1)) {}
  torch::Tensor step(LossClosure /*closure*/) override { return {}; }
};

TEST(OptimizerState, AnotherOptimizerTypeIsNamed) {
  Net net;
  CustomOptimizer custom(net.parameters());
  Checkpoint ck;
  auto msg = error_of([&] { add_optimizer(ck, custom); });
  EXPECT_NE(msg.find("checkpoints support the state of torch::optim's SGD, Adam, AdamW, Adagrad, "
                     "RMSprop and LBFGS; got "),
            std::string::npos) << msg;
  EXPECT_NE(msg.find("CustomOptimizer"), std::string::npos) << msg;
}

TEST(SchedulerState, StepLrResumesBitwise) {
  using namespace torch::optim;
  torch::manual_seed(3);
  Net ref, resumed;
  Checkpoint init;
  add_module(init, ref);
  load_module(init, resumed);
  SGD opt_ref(ref.parameters(), SGDOptions(0.4).momentum(0.9));
  StepLR sched_ref(opt_ref, /*step_size=*/2, /*gamma=*/0.5);
  auto run = [](Net& net, SGD& opt, StepLR& sched, int steps, int seed) {
    for (int i = 0; i < steps; ++i) {
      train_steps(net, opt, 1, seed + i);
      sched.step();
    }
  };
  run(ref, opt_ref, sched_ref, 3, 20);
  Checkpoint ck;
  add_module(ck, ref);
  add_optimizer(ck, opt_ref);
  add_scheduler(ck, sched_ref);
  EXPECT_EQ(metadata_int(ck, "sched.step_count", 0, 100, "memory"), 3);
  run(ref, opt_ref, sched_ref, 5, 23);

  SGD opt_resumed(resumed.parameters(), SGDOptions(0.4).momentum(0.9));
  StepLR sched_resumed(opt_resumed, 2, 0.5);
  load_module(ck, resumed);
  load_optimizer(ck, opt_resumed);
  load_scheduler(ck, sched_resumed);
  EXPECT_EQ(static_cast<SGDOptions&>(opt_resumed.param_groups()[0].options()).lr(), 0.4 * 0.5);
  run(resumed, opt_resumed, sched_resumed, 5, 23);
  EXPECT_TRUE(same_params(ref, resumed));
  EXPECT_EQ(static_cast<SGDOptions&>(opt_resumed.param_groups()[0].options()).lr(),
            static_cast<SGDOptions&>(opt_ref.param_groups()[0].options()).lr());
  EXPECT_EQ(static_cast<SGDOptions&>(opt_ref.param_groups()[0].options()).lr(), 0.4 / 8);
}

struct ConstantLR : torch::optim::LRScheduler {
  using LRScheduler::LRScheduler;
  std::vector<double> get_lrs() override { return get_current_lrs(); }
};

TEST(SchedulerState, TypeAndStepCountAreChecked) {
  using namespace torch::optim;
  Net net;
  SGD sgd(net.parameters(), SGDOptions(0.1));
  StepLR step_lr(sgd, 2);
  step_lr.step();
  Checkpoint ck;
  add_scheduler(ck, step_lr);
  ConstantLR constant(sgd);
  auto msg = error_of([&] { load_scheduler(ck, constant); });
  EXPECT_NE(msg.find("scheduler type: checkpoint has \"torch::optim::StepLR\", the program uses "),
            std::string::npos) << msg;
  EXPECT_NE(msg.find("ConstantLR"), std::string::npos) << msg;
  Checkpoint bad = ck;
  json_set(bad, "sched.step_count", "-1");
  msg = error_of([&] { load_scheduler(bad, step_lr); });
  EXPECT_NE(msg.find("sched.step_count: checkpoint has -1, expected an integer in [0, "),
            std::string::npos) << msg;
  json_erase(bad, "sched.step_count");
  msg = error_of([&] { load_scheduler(bad, step_lr); });
  EXPECT_NE(msg.find("sched.step_count: checkpoint has nothing"), std::string::npos) << msg;
}

TEST(OptimizerState, WrongOptimizerTypeIsRejected) {
  Net net;
  torch::optim::SGD sgd(net.parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  train_steps(net, sgd, 1, 1);
  Checkpoint ck;
  add_optimizer(ck, sgd);
  torch::optim::Adam adam(net.parameters(), torch::optim::AdamOptions(0.1));
  auto msg = error_of([&] { load_optimizer(ck, adam); });
  EXPECT_NE(msg.find("optimizer type: checkpoint has \"SGD\", the program uses Adam"),
            std::string::npos)
      << msg;
}

TEST(RngState, RestoresTheGeneratorSequence) {
  torch::manual_seed(5);
  Checkpoint ck;
  add_rng_state(ck);
  auto first = torch::randn({5});
  torch::manual_seed(99);
  load_rng_state(ck);
  EXPECT_TRUE(torch::equal(first, torch::randn({5})));
}

TEST(CollectiveCheckpoint, SaveFailureIsAnErrorOnEveryRank) {
  for (int world : {1, 3}) {
    std::vector<std::string> errors(world);
    lockstep_test::with_groups(world, [&](const ProcessGroupPtr& pg) {
      try {
        save_checkpoint(*pg, "/nonexistent_dir_lockstep/ck", sample());
      } catch (const lockstep::Error& e) {
        errors[pg->rank()] = e.what();
      }
    });
    for (int r = 0; r < world; ++r) {
      EXPECT_NE(errors[r].find("rank 0: could not create checkpoint temporary file"),
                std::string::npos)
          << "world " << world << " rank " << r << ": " << errors[r];
    }
  }
}

TEST(CollectiveCheckpoint, SaveThenLoadOnEveryRank) {
  auto path = temp_path("collective");
  lockstep_test::with_groups(3, [&](const ProcessGroupPtr& pg) {
    Checkpoint ck = pg->rank() == 0 ? sample() : Checkpoint();
    save_checkpoint(*pg, path, ck);
    auto back = load_checkpoint(*pg, path);
    EXPECT_EQ(back.tensors.size(), sample().tensors.size());
  });
}

TEST(CollectiveCheckpoint, ALoadFailureOnOneRankFailsAllNamingIt) {
  auto good = temp_path("coll_good");
  auto bad = temp_path("coll_bad");
  write_checkpoint_file(good, sample());
  write_bytes(bad, read_bytes(good).substr(0, 40));
  std::vector<std::string> errors(3);
  lockstep_test::with_groups(3, [&](const ProcessGroupPtr& pg) {
    try {
      load_checkpoint(*pg, pg->rank() == 1 ? bad : good);
    } catch (const lockstep::Error& e) {
      errors[pg->rank()] = e.what();
    }
  });
  for (int r = 0; r < 3; ++r) {
    EXPECT_NE(errors[r].find("rank 1: cannot load checkpoint '" + bad + "': truncated"),
              std::string::npos)
        << "rank " << r << ": " << errors[r];
  }
}

TEST(ConfigAgreement, MismatchNamesKeysValuesAndRanks) {
  std::vector<std::string> errors(4);
  lockstep_test::with_groups(4, [&](const ProcessGroupPtr& pg) {
    std::map<std::string, std::string> cfg = {{"lr", "0.1"}, {"batch", "64"}, {"seed", "1"}};
    if (pg->rank() == 1 || pg->rank() == 3) cfg["lr"] = "0.2";
    if (pg->rank() == 2) cfg.erase("seed");
    try {
      check_config_agreement(*pg, cfg);
    } catch (const lockstep::InvalidArgument& e) {
      errors[pg->rank()] = e.what();
    }
  });
  for (int r = 0; r < 4; ++r) {
    EXPECT_NE(errors[r].find("lr: rank 0 has '0.1', ranks 1,3 have '0.2'"), std::string::npos)
        << "rank " << r << ": " << errors[r];
    EXPECT_NE(errors[r].find("seed: rank 0 has '1', rank 2 has '<unset>'"), std::string::npos)
        << "rank " << r << ": " << errors[r];
    EXPECT_EQ(errors[r].find("batch"), std::string::npos) << errors[r];
  }
  lockstep_test::with_groups(2, [&](const ProcessGroupPtr& pg) {
    check_config_agreement(*pg, {{"lr", "0.1"}});
  });
  EXPECT_EQ(config_hash({{"a", "1"}}), config_hash({{"a", "1"}}));
  EXPECT_NE(config_hash({{"a", "1"}}), config_hash({{"a", "2"}}));
}

// ---- Note [Bounded checkpoint parsing]: hostile files are rejected, naming what is wrong ----

namespace {

// A checkpoint file around `header` (JSON text) and `data`, with a valid CRC and trailer, so
// that only what the header says can be wrong.
std::string file_around(const std::string& header, const std::string& data = "") {
  auto put = [](std::string& out, auto value) {
    out.append(reinterpret_cast<const char*>(&value), sizeof(value));
  };
  std::string f = "LSTPCKPT";
  put(f, uint32_t{kCheckpointFormatVersion});
  put(f, uint64_t{header.size()});
  f += header;
  put(f, static_cast<uint32_t>(crc32(0L, reinterpret_cast<const Bytef*>(header.data()),
                                     static_cast<uInt>(header.size()))));
  f += data;
  f += "LSTPEND!";
  put(f, uint64_t{f.size() + 8});
  return f;
}

std::string tensor_header(const std::string& entry) {
  return R"({"metadata":{},"tensors":[)" + entry + "]}";
}

}  // namespace

TEST(CheckpointBounds, MetadataNested70000DeepIsRejectedNotACrash) {
  const std::string path = temp_path("deep");
  const std::string deep = std::string(70000, '[') + std::string(70000, ']');
  write_bytes(path, file_around(R"({"metadata":{"a":)" + deep + R"(},"tensors":[]})"));
  auto msg = error_of([&] { read_checkpoint_file(path); });
  EXPECT_NE(msg.find("cannot load checkpoint '" + path + "': header: JSON nested deeper than 65 "
                     "arrays and objects (at byte offset 80 of the JSON); the file is corrupt "
                     "or hostile"),
            std::string::npos)
      << msg;
  // Brackets inside strings do not count; 60 levels are fine.
  const std::string ok = std::string(60, '[') + std::string(60, ']');
  write_bytes(path, file_around(R"({"metadata":{"s":"[[[[\"[[[[[[","a":)" + ok + R"(},"tensors":[]})"));
  EXPECT_NE(read_checkpoint_file(path).metadata.find("[[[[\\\"[[[[[["), std::string::npos);
  // The writer refuses what the reader would refuse.
  Checkpoint ck;
  ck.metadata = "{\"a\":" + deep + "}";
  msg = error_of([&] { write_checkpoint_file(path + ".w", ck); });
  EXPECT_NE(msg.find("checkpoint metadata for '" + path + ".w': JSON nested deeper than 64"),
            std::string::npos)
      << msg;
  std::remove(path.c_str());
}

TEST(CheckpointBounds, NegativeOrOutOfRangePositionsAreRejectedNamingFieldAndFile) {
  const std::string path = temp_path("position");
  Checkpoint ck;
  ck.metadata = R"({"step": -5, "epoch": 2, "batch": 1.5, "huge": 18446744073709551615})";
  write_checkpoint_file(path, ck);
  const Checkpoint back = read_checkpoint_file(path);
  const int64_t max = int64_t{1} << 53;
  EXPECT_EQ(metadata_int(back, "epoch", 0, max, path), 2);
  auto msg = error_of([&] { metadata_int(back, "step", 0, max, path); });
  EXPECT_EQ(msg, "checkpoint '" + path + "': metadata field \"step\" is -5, but it must be an "
                 "integer in [0, 9007199254740992]; the file is corrupt or was edited");
  msg = error_of([&] { metadata_int(back, "batch", 0, max, path); });
  EXPECT_NE(msg.find("metadata field \"batch\" is 1.5, but it must be an integer"),
            std::string::npos) << msg;
  msg = error_of([&] { metadata_int(back, "huge", 0, max, path); });
  EXPECT_NE(msg.find("metadata field \"huge\" is 18446744073709551615, but it must be an "
                     "integer in [0, 9007199254740992]"),
            std::string::npos) << msg;
  msg = error_of([&] { metadata_int(back, "seed", 0, max, path); });
  EXPECT_EQ(msg, "checkpoint '" + path + "': metadata field \"seed\" is missing; the file was "
                 "not written by this program or is corrupt");
  std::remove(path.c_str());
}

TEST(CheckpointBounds, TensorClaimsBeyondTheFileAreRejectedBeforeAllocating) {
  const std::string path = temp_path("claims");
  struct Case {
    std::string entry;
    std::string expected;
  };
  std::string sixty_five_ones = "1";
  for (int i = 1; i < 65; ++i) sixty_five_ones += ",1";
  const std::vector<Case> cases = {
      // 2^31 x 2^31 floats (16 EiB) in a file of a few hundred bytes.
      {R"({"name":"w","dtype":"Float","shape":[2147483648,2147483648],"offset":0,"nbytes":0,"crc32":0})",
       "tensor 'w': shape [2147483648,2147483648] of Float needs more bytes than the data "
       "section holds (0); the file is corrupt"},
      // A product that wraps to 0 in 64 bits must not pass as an empty tensor.
      {R"({"name":"wrap","dtype":"Byte","shape":[4294967296,4294967296],"offset":0,"nbytes":0,"crc32":0})",
       "tensor 'wrap': shape [4294967296,4294967296] of Byte needs more bytes"},
      {R"({"name":"n","dtype":"Float","shape":[0],"offset":0,"nbytes":-4,"crc32":0})",
       "tensor 'n': \"nbytes\" is -4, but it must be an integer in [0, 0]"},
      {R"({"name":"o","dtype":"Float","shape":[0],"offset":1e300,"nbytes":0,"crc32":0})",
       "tensor 'o': \"offset\" is 1e+300, but it must be an integer in [0, 0]"},
      {R"({"name":"s","dtype":"Float","shape":[1.5],"offset":0,"nbytes":0,"crc32":0})",
       "tensor 's': shape [1.5] holds a non-integer"},
      {R"({"name":"d","dtype":"Float","shape":[)" + sixty_five_ones +
           R"(],"offset":0,"nbytes":4,"crc32":0})",
       "tensor 'd' has 65 dimensions, but at most 64 are accepted"},
      {R"({"name":"c","dtype":"Float","shape":[0],"offset":0,"nbytes":0,"crc32":4294967296})",
       "tensor 'c': \"crc32\" is 4294967296, but it must be an integer in [0, 4294967295]"},
      {R"({"name":"t","dtype":"Quantum","shape":[0],"offset":0,"nbytes":0,"crc32":0})",
       "tensor 't' has unknown dtype 'Quantum'"},
      {R"(7)", "malformed header: a tensor entry without a \"name\" string"},
  };
  for (const auto& c : cases) {
    write_bytes(path, file_around(tensor_header(c.entry)));
    const auto msg = error_of([&] { read_checkpoint_file(path); });
    EXPECT_EQ(msg.rfind("cannot load checkpoint '" + path + "': ", 0), 0u) << msg;
    EXPECT_NE(msg.find(c.expected), std::string::npos) << msg;
  }
  write_bytes(path, file_around(R"({"metadata":[],"tensors":{}})"));
  EXPECT_NE(error_of([&] { read_checkpoint_file(path); })
                .find("malformed header: expected {\"metadata\": {...}, \"tensors\": [...]}"),
            std::string::npos);
  std::remove(path.c_str());
}

TEST(CheckpointBounds, OptimizerStepAndLearningRateAreRangeChecked) {
  Net net;
  torch::optim::Adam adam(net.parameters(), torch::optim::AdamOptions(0.01));
  train_steps(net, adam, 1, 1);
  Checkpoint ck;
  add_optimizer(ck, adam);
  Checkpoint bad_step = ck;
  bad_step.tensors["optim.0.0.step"] = torch::tensor({int64_t{-5}});
  auto msg = error_of([&] { load_optimizer(bad_step, adam); });
  EXPECT_NE(msg.find("'optim.0.0.step' holds Long -5, but an optimizer step count must be one "
                     "integer in [0, 2^53]"),
            std::string::npos) << msg;
  Checkpoint bad_lr = ck;
  bad_lr.metadata = R"({"optim.type":"Adam","optim.lr":[-0.5]})";
  msg = error_of([&] { load_optimizer(bad_lr, adam); });
  EXPECT_NE(msg.find("optim.lr of parameter group 0: checkpoint has -0.5, expected a finite "
                     "number >= 0"),
            std::string::npos) << msg;
  bad_lr.metadata = R"({"optim.type":"Adam","optim.lr":0.1})";
  msg = error_of([&] { load_optimizer(bad_lr, adam); });
  EXPECT_NE(msg.find("optim.lr: checkpoint has 0.1, expected an array of learning rates"),
            std::string::npos) << msg;
}

// ---- Note [Atomic checkpoint writes]: no temporary file survives a failed write ----

namespace {

bool tmp_exists(const std::string& path, pid_t pid) {
  struct stat st {};
  return ::stat((path + ".tmp." + std::to_string(pid)).c_str(), &st) == 0;
}

}  // namespace

TEST(CheckpointAtomicWrite, FileSizeLimitFailsTheWriteAndRemovesTheTemporaryFile) {
  // `ulimit -f` in a child: the write past the limit raises SIGXFSZ, which used to kill the
  // process before it could remove <path>.tmp.<pid>.
  const std::string path = temp_path("fsize");
  std::remove(path.c_str());
  Checkpoint ck;
  ck.tensors["big"] = torch::zeros({1 << 18});  // 1 MiB
  ck.metadata = "{}";
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    const rlimit limit{64 << 10, 64 << 10};
    if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) ::_exit(10);
    try {
      write_checkpoint_file(path, ck);
      ::_exit(11);  // no error at all
    } catch (const lockstep::Error& e) {
      const std::string msg = e.what();
      const std::string want = "could not write checkpoint temporary file '" + path + ".tmp." +
                               std::to_string(::getpid()) + "': File too large";
      if (msg.find(want) == std::string::npos) {
        std::fprintf(stderr, "unexpected message: %s\n", msg.c_str());
        ::_exit(12);
      }
    }
    // The signal was answered by the error: not pending, not left blocked.
    sigset_t pending, mask;
    ::sigpending(&pending);
    ::pthread_sigmask(SIG_SETMASK, nullptr, &mask);
    ::_exit(sigismember(&pending, SIGXFSZ) || sigismember(&mask, SIGXFSZ) ? 13 : 0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "the writer died of signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_FALSE(tmp_exists(path, pid)) << path << ".tmp." << pid << " survived";
  struct stat st {};
  EXPECT_NE(::stat(path.c_str(), &st), 0) << "no checkpoint may appear";
  std::remove((path + ".tmp." + std::to_string(pid)).c_str());
}

TEST(CheckpointAtomicWrite, RenameFailureRemovesTheTemporaryFile) {
  // The destination is a non-empty directory: rename(2) fails after the file was written.
  const std::string path = temp_path("rename_dir");
  ASSERT_EQ(::mkdir(path.c_str(), 0755), 0);
  write_bytes(path + "/keep", "x");
  Checkpoint ck;
  ck.tensors["a"] = torch::ones({4});
  ck.metadata = "{}";
  try {
    write_checkpoint_file(path, ck);
    ADD_FAILURE() << "expected the rename to fail";
  } catch (const lockstep::Error& e) {
    EXPECT_NE(std::string(e.what()).find("could not rename '" + path + ".tmp."),
              std::string::npos) << e.what();
  }
  EXPECT_FALSE(tmp_exists(path, ::getpid()));
  std::remove((path + "/keep").c_str());
  ::rmdir(path.c_str());
}
