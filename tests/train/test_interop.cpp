// Weights exchange with Python's torch (python3-torch at /usr/bin/python3 is the oracle).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <vector>

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

namespace {
std::string temp_path(const std::string& name) {
  return std::string(::testing::TempDir()) + "lockstep_" + name + "_" +
         std::to_string(::getpid()) + ".pt";
}

std::string load_error(const std::string& path, const std::string& key = "") {
  try {
    load_torch_weights(path, key);
  } catch (const lockstep::InvalidArgument& e) {
    return e.what();
  }
  return "(no error)";
}

const char* kPythonNet =
    "import torch, collections\n"
    "torch.manual_seed(0)\n"
    "net = torch.nn.Sequential(torch.nn.Linear(3,4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4,2))\n"
    "net.train(); net(torch.randn(8,3))\n"
    "x = torch.arange(6, dtype=torch.float32).reshape(2,3)\n"
    "net.eval(); y = net(x).detach()\n";
}  // namespace

// The README's habit: torch.save(model.state_dict(), path) saves an OrderedDict (with its
// `_metadata`), which LibTorch's own unpickler cannot read.
TEST(Interop, ImportsAnOrderedDictStateDictAsPythonSavesIt) {
  if (!python_has_torch()) GTEST_SKIP() << "python3-torch is not installed";
  const std::string plain = temp_path("ordered"), nested = temp_path("nested"),
                    single = temp_path("single"), out = temp_path("ordered_out"),
                    protocol4 = temp_path("protocol4");
  std::string script = std::string(kPythonNet) +
      "sd = net.state_dict()\n"
      "assert isinstance(sd, collections.OrderedDict) and hasattr(sd, '_metadata')\n"
      "torch.save(sd, '" + plain + "')\n"
      "opt = torch.optim.Adam(net.parameters(), lr=0.1, betas=(0.8, 0.9))\n"
      "net.train(); net(torch.randn(8,3)).sum().backward(); opt.step(); net.eval()\n"
      "y2 = net(x).detach()\n"
      "torch.save({'epoch': 3, 'model': net.state_dict(), 'optimizer': opt.state_dict(),\n"
      "            'note': 'text', 'pi': 3.25, 'flags': [True, None]}, '" + nested + "')\n"
      "torch.save({'w': torch.ones(2, 2)}, '" + single + "')\n"
      "torch.save(sd, '" + protocol4 + "', pickle_protocol=4)\n"
      "torch.save({'x': x, 'y': y, 'y2': y2}, '" + out + "')\n";
  ASSERT_EQ(run_python(script), 0);
  auto want = load_torch_weights(out);
  auto x = torch::arange(6, torch::kFloat).reshape({2, 3});

  auto net = make_net();
  import_weights(*net, plain);
  net->eval();
  EXPECT_TRUE(torch::equal(net->forward(x), want.at("y"))) << net->forward(x) << want.at("y");

  auto net2 = make_net();
  import_weights(*net2, nested, /*key=*/"model");
  net2->eval();
  EXPECT_TRUE(torch::equal(net2->forward(x), want.at("y2")));
  EXPECT_EQ(load_torch_weights(nested, "model").at("1.num_batches_tracked").item<int64_t>(), 2);

  // Protocol 4 (FRAME, MEMOIZE, STACK_GLOBAL, SHORT_BINUNICODE), as pickle_protocol=4 writes
  // (saved after the Adam step: `sd` holds the live tensors).
  auto net4 = make_net();
  import_weights(*net4, protocol4);
  net4->eval();
  EXPECT_TRUE(torch::equal(net4->forward(x), want.at("y2")));

  // A one-entry dict is pickled with SETITEM rather than SETITEMS.
  auto w = load_torch_weights(single);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_TRUE(torch::equal(w.at("w"), torch::ones({2, 2})));

  const std::string missing = load_error(plain, "model");
  EXPECT_NE(missing.find("has no entry 'model' (its top-level keys: '0.weight', '0.bias'"),
            std::string::npos) << missing;
  EXPECT_NE(missing.find(plain), std::string::npos) << missing;
  const std::string not_sd = load_error(nested, "optimizer");
  EXPECT_NE(not_sd.find("entry 'state' -> dict under 'optimizer' is not a name -> tensor pair"),
            std::string::npos) << not_sd;
  const std::string top = load_error(nested);
  EXPECT_NE(top.find("entry 'epoch' -> int is not a name -> tensor pair"), std::string::npos)
      << top;
}

TEST(Interop, ViewsKeepTheirOffsetsAndStridesAndDtypes) {
  if (!python_has_torch()) GTEST_SKIP() << "python3-torch is not installed";
  const std::string path = temp_path("views");
  ASSERT_EQ(run_python(
      "import torch\n"
      "base = torch.arange(24, dtype=torch.float64).reshape(4, 6)\n"
      "torch.save({'base': base, 'col': base[:, 2], 't': base.t()[1:3], 'empty': base[:0],\n"
      "            'half': torch.tensor([1.5, -2], dtype=torch.float16),\n"
      "            'flag': torch.tensor([True, False]), 'i8': torch.tensor([-3], dtype=torch.int8),\n"
      "            'scalar': torch.tensor(7)}, '" + path + "')\n"), 0);
  auto t = load_torch_weights(path);
  auto base = torch::arange(24, torch::kDouble).reshape({4, 6});
  EXPECT_TRUE(torch::equal(t.at("base"), base));
  EXPECT_TRUE(torch::equal(t.at("col"), base.select(1, 2)));
  EXPECT_TRUE(torch::equal(t.at("t"), base.t().slice(0, 1, 3)));
  EXPECT_EQ(t.at("empty").sizes(), (std::vector<int64_t>{0, 6}));
  EXPECT_TRUE(torch::equal(t.at("half"), torch::tensor({1.5, -2.0}).to(torch::kHalf)));
  EXPECT_TRUE(torch::equal(t.at("flag"), torch::tensor({true, false})));
  EXPECT_EQ(t.at("i8").scalar_type(), torch::kChar);
  EXPECT_EQ(t.at("i8").item<int>(), -3);
  EXPECT_EQ(t.at("scalar").dim(), 0);
  EXPECT_EQ(t.at("scalar").item<int64_t>(), 7);
}

TEST(Interop, RejectsFilesThatAreNotStateDicts) {
  if (!python_has_torch()) GTEST_SKIP() << "python3-torch is not installed";
  const std::string list = temp_path("list"), object = temp_path("object"),
                    legacy = temp_path("legacy"), short_storage = temp_path("short"),
                    text = temp_path("text");
  ASSERT_EQ(run_python(
      "import torch, argparse, zipfile\n"
      "torch.save([torch.ones(1)], '" + list + "')\n"
      "torch.save({'args': argparse.Namespace(lr=1)}, '" + object + "')\n"
      "torch.save({'w': torch.ones(4)}, '" + legacy + "', _use_new_zipfile_serialization=False)\n"
      "torch.save({'w': torch.ones(4)}, '" + short_storage + ".src')\n"
      "src = zipfile.ZipFile('" + short_storage + ".src')\n"
      "with zipfile.ZipFile('" + short_storage + "', 'w', zipfile.ZIP_STORED) as dst:\n"
      "    for info in src.infolist():\n"
      "        data = src.read(info.filename)\n"
      "        dst.writestr(info.filename, data[:8] if info.filename.endswith('data/0') else data)\n"
      "open('" + text + "', 'w').write('not a torch file but a line of text')\n"), 0);
  struct Case {
    std::string path, want;
  } cases[] = {
      {list, "holds a list, expected a dict of name -> tensor (a state_dict)"},
      {object, "holds a Python object of class argparse.Namespace"},
      {legacy, "legacy (pre-1.6, not zip) torch.save format"},
      {short_storage, "storage '0' declares 4 elements of Float but its entry holds 8 bytes"},
      {text, "is not a torch.save file (no zip archive found)"},
      {temp_path("does_not_exist"), "cannot open weights file"},
  };
  for (const auto& c : cases) {
    const std::string msg = load_error(c.path);
    EXPECT_NE(msg.find(c.want), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.path), std::string::npos) << msg;
  }
}

// Every single-byte corruption of a real file is either read or rejected with
// InvalidArgument: nothing crashes, hangs or allocates what the file merely declares.
TEST(Interop, EveryCorruptedByteIsReadOrRejected) {
  if (!python_has_torch()) GTEST_SKIP() << "python3-torch is not installed";
  const std::string path = temp_path("corrupt_src"), bad = temp_path("corrupt");
  ASSERT_EQ(run_python(std::string(kPythonNet) + "torch.save(net.state_dict(), '" + path + "')\n"),
            0);
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GT(bytes.size(), 1000u);
  int rejected = 0;
  for (size_t i = 0; i < bytes.size(); ++i) {
    {
      // One corruption a byte, of three kinds in turn.
      const char values[] = {'\xff', '\x00', static_cast<char>(bytes[i] ^ 0x10)};
      auto copy = bytes;
      copy[i] = values[i % 3];
      std::ofstream(bad, std::ios::binary).write(copy.data(), copy.size());
      try {
        load_torch_weights(bad);
      } catch (const lockstep::InvalidArgument&) {
        ++rejected;
      }
    }
  }
  EXPECT_GT(rejected, 50);  // the pickle's and directory's bytes are checked
  std::remove(bad.c_str());
}
