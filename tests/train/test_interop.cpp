// Weights exchange with Python's torch (python3-torch at /usr/bin/python3 is the oracle).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <fstream>

#include "lockstep/errors.h"
#include "lockstep/train/interop.h"

using namespace lockstep::train;

namespace {
const char* kPython = "/usr/bin/python3";

bool python_has_torch() {
  return std::system((std::string(kPython) + " -c 'import torch' 2>/dev/null").c_str()) == 0;
}

int run_python(const std::string& script) {
  std::string path = std::string(::testing::TempDir()) + "lockstep_interop_" +
                     std::to_string(::getpid()) + ".py";
  std::ofstream(path) << script;
  return std::system((std::string(kPython) + " " + path).c_str());
}

torch::nn::Sequential make_net() {
  return torch::nn::Sequential(torch::nn::Linear(3, 4), torch::nn::BatchNorm1d(4),
                               torch::nn::Linear(4, 2));
}
}  // namespace

TEST(Interop, PythonLoadsExportedWeightsWithWeightsOnly) {
  if (!python_has_torch()) GTEST_SKIP() << "python3-torch is not installed";
  torch::manual_seed(0);
  auto net = make_net();
  std::string dir = ::testing::TempDir();
  std::string weights = dir + "lockstep_export_" + std::to_string(::getpid()) + ".pt";
  export_weights(*net, weights);
  // The same values as text, for Python to compare against.
  std::string expected = weights + ".txt";
  {
    std::ofstream out(expected);
    out.precision(9);
    for (const auto& p : net->named_parameters()) {
      auto f = p.value().flatten();
      out << p.key();
      for (int64_t i = 0; i < f.numel(); ++i) out << " " << f[i].item<float>();
      out << "\n";
    }
  }
  std::string script =
      "import torch, sys\n"
      "sd = torch.load('" + weights + "', weights_only=True)\n"
      "net = torch.nn.Sequential(torch.nn.Linear(3,4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4,2))\n"
      "net.load_state_dict(sd, strict=True)\n"
      "for line in open('" + expected + "'):\n"
      "    parts = line.split()\n"
      "    want = torch.tensor([float(v) for v in parts[1:]])\n"
      "    got = sd[parts[0]].flatten()\n"
      "    assert torch.equal(got, want), (parts[0], got, want)\n"
      "assert sd['1.num_batches_tracked'].dtype == torch.int64\n";
  EXPECT_EQ(run_python(script), 0);
}

TEST(Interop, ImportsAStateDictSavedByPython) {
  if (!python_has_torch()) GTEST_SKIP() << "python3-torch is not installed";
  std::string dir = ::testing::TempDir();
  std::string weights = dir + "lockstep_import_" + std::to_string(::getpid()) + ".pt";
  std::string script =
      "import torch\n"
      "torch.manual_seed(0)\n"
      "net = torch.nn.Sequential(torch.nn.Linear(3,4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4,2))\n"
      "net.train(); net(torch.randn(8,3))\n"  // moves the BatchNorm running stats
      "torch.save(dict(net.state_dict()), '" + weights + "')\n"
      "x = torch.arange(6, dtype=torch.float32).reshape(2,3)\n"
      "net.eval()\n"
      "torch.save({'x': x, 'y': net(x).detach()}, '" + weights + ".out')\n";
  ASSERT_EQ(run_python(script), 0);
  auto net = make_net();
  import_weights(*net, weights);
  net->eval();
  auto x = torch::arange(6, torch::kFloat).reshape({2, 3});
  auto want = load_torch_weights(weights + ".out").at("y");
  EXPECT_TRUE(torch::allclose(net->forward(x), want, 1e-6, 1e-6)) << net->forward(x) << want;

  auto other = torch::nn::Sequential(torch::nn::Linear(3, 5));
  try {
    import_weights(*other, weights);
    FAIL() << "expected a mismatch";
  } catch (const lockstep::InvalidArgument& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find(weights), std::string::npos) << msg;
    EXPECT_NE(msg.find("unexpected key '2.weight'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("'0.weight': checkpoint has shape [4, 3], the model has [5, 3]"),
              std::string::npos)
        << msg;
  }
}
