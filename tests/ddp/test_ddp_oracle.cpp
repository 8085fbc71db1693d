// PyTorch's own DDP (python3-torch, 2 processes, Gloo) as an oracle: the same model with
// BatchNorm, initial weights and data give the same parameters and buffers after 10 steps.
// See ddp_oracle.py for the file format.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>

#include "lockstep/ddp.h"
#include "support/threads.h"

namespace {

namespace nn = torch::nn;
using torch::Tensor;

struct Net : nn::Module {
  nn::Conv2d conv{nullptr};
  nn::BatchNorm2d bn{nullptr};
  nn::Linear fc{nullptr};
  Net() {
    conv = register_module("conv", nn::Conv2d(nn::Conv2dOptions(1, 4, 3)));
    bn = register_module("bn", nn::BatchNorm2d(4));
    fc = register_module("fc", nn::Linear(144, 10));
  }
  Tensor forward(Tensor x) { return fc(torch::relu(bn(conv(x))).flatten(1)); }
};

const char* dtype_name(torch::Dtype d) {
  switch (d) {
    case torch::kFloat: return "float32";
    case torch::kDouble: return "float64";
    case torch::kLong: return "int64";
    default: return "unsupported";
  }
}

void write_tensors(const std::string& stem, const std::vector<std::pair<std::string, Tensor>>& ts) {
  std::ofstream txt(stem + ".txt"), bin(stem + ".bin", std::ios::binary);
  for (const auto& kv : ts) {
    auto t = kv.second.detach().contiguous();
    txt << kv.first << "\t" << dtype_name(t.scalar_type()) << "\t";
    for (int64_t d = 0; d < t.dim(); ++d) txt << (d ? "," : "") << t.size(d);
    txt << "\n";
    bin.write(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
  }
}

std::map<std::string, Tensor> read_tensors(const std::string& stem) {
  std::map<std::string, Tensor> out;
  std::ifstream txt(stem + ".txt"), bin(stem + ".bin", std::ios::binary);
  std::string line;
  while (std::getline(txt, line)) {
    std::istringstream is(line);
    std::string name, dtype, dims;
    std::getline(is, name, '\t');
    std::getline(is, dtype, '\t');
    std::getline(is, dims);
    std::vector<int64_t> shape;
    std::istringstream ds(dims);
    std::string d;
    while (std::getline(ds, d, ',')) shape.push_back(std::stoll(d));
    auto type = dtype == "float32" ? torch::kFloat : dtype == "float64" ? torch::kDouble
                                                                        : torch::kLong;
    auto t = torch::empty(shape, type);
    bin.read(static_cast<char*>(t.data_ptr()), t.numel() * t.element_size());
    out[name] = t;
  }
  return out;
}

struct JoinNet : nn::Module {
  nn::Linear fc1{nullptr}, fc2{nullptr};
  JoinNet() {
    fc1 = register_module("fc1", nn::Linear(64, 16));
    fc2 = register_module("fc2", nn::Linear(16, 10));
  }
  Tensor forward(Tensor x) { return fc2(torch::relu(fc1(x.flatten(1)))); }
};

bool have_torch_python() {
  const std::string python = LOCKSTEP_TORCH_PYTHON;
  return !python.empty() &&
         std::system((python + " -c 'import torch' 2>/dev/null").c_str()) == 0;
}

// Ranks that run out of data at different steps inside join(), as PyTorch's DDP.join() with
// the same divide mode: the same final parameters on every rank.
void check_join_against_pytorch(const std::vector<int64_t>& rank_steps, bool divide_initial) {
  const int world = static_cast<int>(rank_steps.size()), batch = 4;
  const int steps = static_cast<int>(*std::max_element(rank_steps.begin(), rank_steps.end()));
  std::string dir = ::testing::TempDir() + "lockstep_join_oracle_" + std::to_string(::getpid());
  ASSERT_EQ(std::system(("rm -rf " + dir + " && mkdir -p " + dir).c_str()), 0);
  torch::manual_seed(9);
  auto init = std::make_shared<JoinNet>();
  auto x = torch::randn({steps, world, batch, 1, 8, 8});
  auto y = torch::randint(0, 10, {steps, world, batch});
  std::vector<std::pair<std::string, Tensor>> input;
  for (auto& kv : init->named_parameters()) input.emplace_back("state." + kv.key(), kv.value());
  input.emplace_back("x", x);
  input.emplace_back("y", y);
  input.emplace_back("rank_steps", torch::tensor(rank_steps));
  input.emplace_back("divide_initial", torch::tensor(std::vector<int64_t>{divide_initial}));
  write_tensors(dir + "/input", input);
  auto cmd = "timeout 120 " + std::string(LOCKSTEP_TORCH_PYTHON) + " " +
             LOCKSTEP_ORACLE_SCRIPT + " " + dir;
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  auto want = read_tensors(dir + "/result");
  ASSERT_FALSE(want.empty());

  std::vector<std::map<std::string, Tensor>> got(world);
  lockstep_test::with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    const int r = pg->rank();
    auto model = std::make_shared<JoinNet>();
    if (r == 0) {
      torch::NoGradGuard g;
      auto src = init->named_parameters();
      for (auto& kv : model->named_parameters()) kv.value().copy_(src[kv.key()]);
    }
    lockstep::DistributedDataParallel ddp(model, pg);
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    {
      auto join = ddp->join(lockstep::JoinOptions().divide_by_initial_world_size(divide_initial));
      for (int s = 0; s < rank_steps[r]; ++s) {
        opt.zero_grad();
        torch::cross_entropy_loss(ddp->forward(x[s][r]), y[s][r]).backward();
        opt.step();
      }
    }
    for (auto& kv : model->named_parameters()) got[r][kv.key()] = kv.value().detach().clone();
  });
  for (int r = 0; r < world; ++r) {
    ASSERT_EQ(got[r].size(), want.size());
    for (auto& kv : want) {
      auto a = got[r][kv.first].to(torch::kDouble), b = kv.second.to(torch::kDouble);
      double rel = (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-30);
      EXPECT_LE(rel, 1e-5) << "rank " << r << " " << kv.first << " divide_initial "
                           << divide_initial;
    }
  }
  std::system(("rm -rf " + dir).c_str());
}

TEST(DDPOracle, JoinMatchesPyTorchJoinInBothDivideModes) {
  if (!have_torch_python()) GTEST_SKIP() << "no python3 with torch";
  check_join_against_pytorch({6, 2, 0}, /*divide_initial=*/true);
  check_join_against_pytorch({3, 5, 1}, /*divide_initial=*/false);
}

TEST(DDPOracle, MatchesPyTorchDDPWithBatchNorm) {
  const std::string python = LOCKSTEP_TORCH_PYTHON;
  if (python.empty() || std::system((python + " -c 'import torch' 2>/dev/null").c_str()) != 0) {
    GTEST_SKIP() << "no python3 with torch";
  }
  const int world = 2, steps = 10, batch = 4;
  std::string dir = ::testing::TempDir() + "lockstep_ddp_oracle_" + std::to_string(::getpid());
  ASSERT_EQ(std::system(("rm -rf " + dir + " && mkdir -p " + dir).c_str()), 0);

  torch::manual_seed(5);
  auto init = std::make_shared<Net>();
  auto x = torch::randn({steps, world, batch, 1, 8, 8});
  auto y = torch::randint(0, 10, {steps, world, batch});
  std::vector<std::pair<std::string, Tensor>> input;
  for (auto& kv : init->named_parameters()) input.emplace_back("state." + kv.key(), kv.value());
  for (auto& kv : init->named_buffers()) input.emplace_back("state." + kv.key(), kv.value());
  input.emplace_back("x", x);
  input.emplace_back("y", y);
  write_tensors(dir + "/input", input);

  auto cmd = python + " " + LOCKSTEP_ORACLE_SCRIPT + " " + dir;
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  auto want = read_tensors(dir + "/result");
  ASSERT_FALSE(want.empty());

  std::map<std::string, Tensor> got;
  lockstep_test::with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    const int r = pg->rank();
    auto model = std::make_shared<Net>();
    if (r == 0) {
      torch::NoGradGuard g;
      auto src = init->named_parameters();
      for (auto& kv : model->named_parameters()) kv.value().copy_(src[kv.key()]);
      auto bsrc = init->named_buffers();
      for (auto& kv : model->named_buffers()) kv.value().copy_(bsrc[kv.key()]);
    }
    lockstep::DistributedDataParallel ddp(model, pg, lockstep::DDPOptions().bucket_cap_mb(25));
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    for (int s = 0; s < steps; ++s) {
      opt.zero_grad();
      torch::cross_entropy_loss(ddp->forward(x[s][r]), y[s][r]).backward();
      opt.step();
    }
    if (r == 0) {
      for (auto& kv : model->named_parameters()) got[kv.key()] = kv.value().detach().clone();
      for (auto& kv : model->named_buffers()) got[kv.key()] = kv.value().clone();
    }
  });
  ASSERT_EQ(got.size(), want.size());
  for (auto& kv : want) {
    ASSERT_TRUE(got.count(kv.first)) << kv.first;
    auto a = got[kv.first].to(torch::kDouble), b = kv.second.to(torch::kDouble);
    double rel = (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-30);
    EXPECT_LE(rel, 1e-5) << kv.first << ": lockstep " << a.flatten().slice(0, 0, 4)
                         << " PyTorch DDP " << b.flatten().slice(0, 0, 4);
  }
  std::system(("rm -rf " + dir).c_str());
}

}  // namespace
