// Checkpoint files: round trips, corruption of every kind, strict model/optimizer loading,
// RNG state, collective save/load failures and configuration agreement.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <fstream>
#include <iterator>

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
    opt.zero_grad();
    torch::nn::functional::cross_entropy(net.forward(x), y).backward();
    opt.step();
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

template <typename Opt, typename Options>
void check_optimizer_resume(Options options) {
  torch::manual_seed(3);
  Net ref;
  Net resumed;
  Checkpoint init;
  add_module(init, ref);
  load_module(init, resumed);
  Opt opt_ref(ref.parameters(), options);
  train_steps(ref, opt_ref, 3, 10);
  Checkpoint ck;
  add_module(ck, ref);
  add_optimizer(ck, opt_ref);
  auto path = temp_path("opt");
  write_checkpoint_file(path, ck);
  train_steps(ref, opt_ref, 4, 11);

  Opt opt_resumed(resumed.parameters(), options);
  auto loaded = read_checkpoint_file(path);
  load_module(loaded, resumed);
  load_optimizer(loaded, opt_resumed);
  train_steps(resumed, opt_resumed, 4, 11);
  EXPECT_TRUE(same_params(ref, resumed));
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
