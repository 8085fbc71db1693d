// GradScaler and AutocastGuard: the scale schedule against a hand-computed one, the found_inf
// decision agreed by every rank (under DDP with no collective, and over a process group for
// gradients DDP did not reduce), the state errors, checkpoint state, the disabled
// pass-through, half-precision gradients, autocast on CPU, and a short mixed-precision
// training under DDP. Ranks are threads.
#include <gtest/gtest.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <unistd.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "adapter/torch_adapter.h"
#include "lockstep/ddp.h"
#include "lockstep/errors.h"
#include "lockstep/grad_scaler.h"
#include "lockstep/train/checkpoint.h"
#include "support/models.h"
#include "support/message.h"
#include "support/threads.h"

namespace {

using lockstep::AutocastGuard;
using lockstep::DistributedDataParallel;
using lockstep::GradScaler;
using lockstep::GradScalerOptions;
using lockstep::GradScalerState;
using lockstep_test::message_of;
using torch::Tensor;
namespace nn = torch::nn;

constexpr float kInf = std::numeric_limits<float>::infinity();

using lockstep_test::Mlp;

std::vector<Tensor> snapshot(nn::Module& m) {
  std::vector<Tensor> out;
  for (auto& p : m.parameters()) out.push_back(p.detach().clone());
  return out;
}

bool equal_all(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!torch::equal(a[i], b[i])) return false;
  }
  return true;
}

// Batch t of rank r: the same on every call; targets from a fixed linear teacher.
std::pair<Tensor, Tensor> batch(int r, int t) {
  auto gen = at::detail::createCPUGenerator(500 + 37 * r + t);
  auto x = torch::randn({8, 6}, gen);
  auto teacher = torch::linspace(-1, 1, 18).reshape({6, 3});
  return {x, torch::matmul(x, teacher)};
}

// ---------------------------------------------------------------------------------------------
// The schedule

TEST(GradScaler, ScheduleMatchesAHandComputedOne) {
  // init 8, growth x2 after 3 good steps, backoff x0.5; Inf planted at steps 3, 7 and 8.
  const std::vector<bool> planted = {0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0};
  // Worked by hand: the scale each step multiplies the loss by, whether it steps, and the
  // scale and growth tracker after its update().
  const std::vector<double> used = {8, 8, 8, 16, 8, 8, 8, 16, 8, 4, 4, 4};
  const std::vector<bool> stepped = {1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1};
  const std::vector<double> after = {8, 8, 16, 8, 8, 8, 16, 8, 4, 4, 4, 8};
  const std::vector<int64_t> tracker = {1, 2, 0, 0, 1, 2, 0, 0, 0, 1, 2, 0};

  auto w = torch::tensor({1.0f, -2.0f, 0.5f}).requires_grad_();
  const auto x = torch::tensor({0.25f, 1.5f, -3.0f});
  torch::optim::SGD opt({w}, 0.125);
  GradScaler scaler(GradScalerOptions().init_scale(8).growth_interval(3));
  int steps = 0;
  for (size_t t = 0; t < planted.size(); ++t) {
    SCOPED_TRACE("step " + std::to_string(t));
    opt.zero_grad();
    auto loss = (w * x).sum();
    EXPECT_EQ(scaler.get_scale(), used[t]);
    auto scaled = scaler.scale(loss);
    EXPECT_EQ(scaled.item<float>(), loss.item<float>() * static_cast<float>(used[t]));
    scaled.backward();
    EXPECT_TRUE(torch::equal(w.grad(), x * static_cast<float>(used[t])));
    if (planted[t]) w.grad()[1].fill_(kInf);
    const auto before = w.detach().clone();
    EXPECT_EQ(scaler.step(opt), static_cast<bool>(stepped[t]));
    EXPECT_EQ(scaler.found_inf(opt), static_cast<bool>(planted[t]));
    if (stepped[t]) {
      ++steps;
      EXPECT_TRUE(torch::equal(w.grad(), x)) << "unscaled gradient";
      EXPECT_TRUE(torch::equal(w.detach(), before - 0.125f * x));
    } else {
      EXPECT_TRUE(torch::equal(w.detach(), before)) << "a skipped step changed the weight";
    }
    scaler.update();
    EXPECT_EQ(scaler.get_scale(), after[t]);
    EXPECT_EQ(scaler.growth_tracker(), tracker[t]);
  }
  EXPECT_EQ(steps, 9);
}

TEST(GradScaler, GrowthStopsWhereFloat32Overflows) {
  // As PyTorch: the scale is a float32 value and does not grow to Inf.
  GradScaler scaler(GradScalerOptions().init_scale(std::ldexp(1.0, 127)).growth_interval(1));
  auto w = torch::ones({2}).requires_grad_();
  torch::optim::SGD opt({w}, 0.0);
  for (int t = 0; t < 2; ++t) {
    opt.zero_grad();
    w.sum().backward();
    EXPECT_TRUE(scaler.step(opt));
    scaler.update();
    EXPECT_EQ(scaler.get_scale(), std::ldexp(1.0, 127));
    EXPECT_EQ(scaler.growth_tracker(), 0);
  }
}

// ---------------------------------------------------------------------------------------------
// found_inf agreement

TEST(GradScaler, InfOnOneRankUnderDDPSkipsOnEveryRank) {
  // init 1024, growth after 2 good steps; rank 1's loss is Inf at step 2.
  const std::vector<bool> stepped = {1, 1, 0, 1, 1, 1};
  const std::vector<double> after = {1024, 2048, 1024, 1024, 2048, 2048};
  for (int world : {2, 3}) {
    SCOPED_TRACE("world " + std::to_string(world));
    std::vector<std::vector<Tensor>> final_params(world);
    lockstep_test::with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
      const int r = pg->rank();
      auto model = std::make_shared<Mlp>();
      DistributedDataParallel<Mlp> ddp(model, pg);
      torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
      GradScaler scaler(GradScalerOptions().init_scale(1024).growth_interval(2));
      for (int t = 0; t < static_cast<int>(stepped.size()); ++t) {
        auto d = batch(r, t);
        opt.zero_grad();
        auto loss = torch::mse_loss(ddp->forward(d.first), d.second);
        if (r == 1 && t == 2) loss = loss * kInf;
        scaler.scale(loss).backward();
        const auto before = snapshot(*model);
        const bool did_step = scaler.step(opt);
        EXPECT_EQ(did_step, static_cast<bool>(stepped[t])) << "rank " << r << " step " << t;
        if (!did_step) {
          EXPECT_TRUE(equal_all(snapshot(*model), before)) << "rank " << r;
        }
        scaler.update();
        EXPECT_EQ(scaler.get_scale(), after[t]) << "rank " << r << " step " << t;
      }
      for (const auto& p : model->parameters()) {
        EXPECT_TRUE(torch::isfinite(p).all().item<bool>()) << "rank " << r;
      }
      final_params[r] = snapshot(*model);
    });
    for (int r = 1; r < world; ++r) {
      EXPECT_TRUE(equal_all(final_params[r], final_params[0]))
          << "rank " << r << "'s parameters differ from rank 0's";
    }
  }
}

// Local (unreduced) gradients, Inf on rank 2 at step 1: returns each rank's steps taken.
std::vector<std::vector<bool>> local_gradients_run(bool with_group) {
  const int world = 3;
  std::vector<std::vector<bool>> steps(world);
  lockstep_test::with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    const int r = pg->rank();
    auto w = torch::full({4}, 1.0f + r).requires_grad_();
    torch::optim::SGD opt({w}, 0.1);
    GradScaler scaler(GradScalerOptions().init_scale(4).growth_interval(2).process_group(
        with_group ? pg : nullptr));
    for (int t = 0; t < 3; ++t) {
      opt.zero_grad();
      auto loss = w.pow(2).sum();
      if (r == 2 && t == 1) loss = loss * kInf;
      scaler.scale(loss).backward();
      steps[r].push_back(scaler.step(opt));
      scaler.update();
    }
  });
  return steps;
}

TEST(GradScaler, ProcessGroupAgreesOnGradientsNotFromDDP) {
  const auto agreed = local_gradients_run(/*with_group=*/true);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(agreed[r], (std::vector<bool>{true, false, true})) << "rank " << r;
  }
  // Without the group each rank decides alone: only rank 2 skips, which is why the option
  // exists for gradients that DDP did not reduce.
  const auto alone = local_gradients_run(/*with_group=*/false);
  EXPECT_EQ(alone[0], (std::vector<bool>{true, true, true}));
  EXPECT_EQ(alone[2], (std::vector<bool>{true, false, true}));
}

// ---------------------------------------------------------------------------------------------
// Gradient dtypes and layouts

TEST(GradScaler, UnscalesEveryGradientKind) {
  struct Case {
    std::string name;
    std::function<Tensor()> make;  // a leaf whose backward of sum(p * 3) gives grad 3 * scale
  };
  const std::vector<Case> cases = {
      {"float", [] { return torch::ones({5}); }},
      {"double", [] { return torch::ones({5}, torch::kDouble); }},
      {"float16", [] { return torch::ones({5}, torch::kHalf); }},
      {"bfloat16", [] { return torch::ones({5}, torch::kBFloat16); }},
      {"strided float", [] { return torch::ones({5, 2}).t(); }},
      {"strided bfloat16", [] { return torch::ones({5, 2}, torch::kBFloat16).t(); }},
  };
  for (const auto& c : cases) {
    for (bool plant : {false, true}) {
      SCOPED_TRACE(c.name + (plant ? " with Inf" : ""));
      auto p = c.make().detach().requires_grad_();
      torch::optim::SGD opt({p}, 0.0);
      GradScaler scaler(GradScalerOptions().init_scale(256));
      (scaler.scale(p.to(torch::kFloat).mul(3).sum())).backward();
      ASSERT_EQ(p.grad().scalar_type(), p.scalar_type());
      if (c.name.rfind("strided", 0) == 0) {
        ASSERT_FALSE(p.grad().is_contiguous());
      }
      if (plant) {  // element 3 in row-major order, in place (a strided grad has no view(-1))
        auto g = p.grad();
        (g.dim() == 1 ? g[3] : g[0][3]).fill_(std::nan(""));
      }
      scaler.unscale_(opt);
      EXPECT_EQ(scaler.found_inf(opt), plant);
      auto g = p.grad().to(torch::kDouble).reshape(-1);
      for (int64_t i = 0; i < g.numel(); ++i) {
        if (plant && i == 3) continue;
        EXPECT_EQ(g[i].item<double>(), 3.0) << "element " << i;
      }
    }
  }
}

TEST(GradScaler, UnscaleRoundsLikePyTorchsKernel) {
  // PyTorch's unscale kernel: each value in float (double for double) times
  // float32(1 / scale), rounded once to the gradient's dtype; here with a scale that is not a
  // power of two, through the one-pass loop (contiguous) and the ATen path (strided).
  for (auto dtype : {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16}) {
    for (bool strided : {false, true}) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + (strided ? " strided" : ""));
      auto gen = at::detail::createCPUGenerator(7);
      auto values = (torch::randn({50, 20}, gen) * 1000).to(dtype);
      const auto grad = strided ? values.t() : values;
      auto p = torch::zeros_like(grad).requires_grad_();
      p.mutable_grad() = grad.clone();
      ASSERT_EQ(p.grad().is_contiguous(), !strided);
      torch::optim::SGD opt({p}, 0.0);
      GradScaler scaler(GradScalerOptions().init_scale(1000));
      scaler.unscale_(opt);
      EXPECT_FALSE(scaler.found_inf(opt));
      const double inv = static_cast<float>(1.0 / 1000);
      const auto want = dtype == torch::kDouble ? grad.mul(inv)
                                                : grad.to(torch::kFloat).mul(inv).to(dtype);
      EXPECT_TRUE(torch::equal(p.grad(), want));
    }
  }
}

TEST(GradScaler, UnscalesSparseGradients) {
  nn::Embedding emb(nn::EmbeddingOptions(10, 3).sparse(true));
  torch::optim::SGD opt(emb->parameters(), 0.0);
  GradScaler scaler(GradScalerOptions().init_scale(64));
  scaler.scale(emb(torch::tensor({1, 4, 4})).sum()).backward();
  ASSERT_TRUE(emb->weight.grad().is_sparse());
  scaler.unscale_(opt);
  EXPECT_FALSE(scaler.found_inf(opt));
  auto dense = emb->weight.grad().to_dense();
  EXPECT_EQ(dense[4][0].item<float>(), 2.0f);
  EXPECT_EQ(dense[1][2].item<float>(), 1.0f);
  EXPECT_EQ(dense.sum().item<float>(), 9.0f);
}

// ---------------------------------------------------------------------------------------------
// Errors and state

TEST(GradScaler, MisuseIsAStateError) {
  auto w = torch::ones({3}).requires_grad_();
  torch::optim::SGD opt({w}, 0.5);
  GradScaler scaler(GradScalerOptions().init_scale(4));

  EXPECT_THROW(scaler.update(), lockstep::StateError);
  EXPECT_NE(message_of([&] { scaler.update(); }).find("no Inf/NaN check was recorded"),
            std::string::npos);

  scaler.scale(w.sum()).backward();
  scaler.unscale_(opt);
  EXPECT_TRUE(torch::equal(w.grad(), torch::ones({3})));
  EXPECT_THROW(scaler.unscale_(opt), lockstep::StateError);
  EXPECT_NE(message_of([&] { scaler.unscale_(opt); })
                .find("already called on this optimizer since the last update()"),
            std::string::npos);
  // step() after unscale_() does not unscale again.
  EXPECT_TRUE(scaler.step(opt));
  EXPECT_TRUE(torch::equal(w.grad(), torch::ones({3})));
  EXPECT_TRUE(torch::equal(w.detach(), torch::full({3}, 0.5f)));
  EXPECT_THROW(scaler.step(opt), lockstep::StateError);
  EXPECT_NE(message_of([&] { scaler.step(opt); }).find("step() was already called"),
            std::string::npos);
  EXPECT_NE(message_of([&] { scaler.unscale_(opt); }).find("before step(optimizer)"),
            std::string::npos);
  scaler.update();
  // After update() a new iteration may begin.
  opt.zero_grad();
  scaler.scale(w.sum()).backward();
  EXPECT_TRUE(scaler.step(opt));
  scaler.update();
}

TEST(GradScaler, InvalidOptionsAreNamed) {
  struct Case {
    GradScalerOptions options;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {GradScalerOptions().init_scale(0), "Expected a positive scale"},
      {GradScalerOptions().init_scale(1e39), "finite in float32, but got 1e+39"},
      {GradScalerOptions().growth_factor(1.0), "Expected growth_factor > 1, but got 1"},
      {GradScalerOptions().backoff_factor(1.5), "Expected backoff_factor in (0, 1), but got 1.5"},
      {GradScalerOptions().growth_interval(0), "Expected growth_interval > 0, but got 0"},
  };
  for (const auto& c : cases) {
    const auto msg = message_of([&] { GradScaler s(c.options); });
    EXPECT_NE(msg.find(c.expected), std::string::npos) << msg;
    EXPECT_THROW(GradScaler s(c.options), lockstep::InvalidArgument);
  }
  EXPECT_THROW(GradScaler().scale(torch::ones({1}, torch::kLong)), lockstep::InvalidArgument);
  EXPECT_NE(message_of([] { GradScaler().scale(torch::ones({1}, torch::kLong)); })
                .find("Expected a floating-point loss to scale, but got Long"),
            std::string::npos);
}

TEST(GradScaler, StateDictRoundTripsThroughACheckpoint) {
  auto w = torch::ones({2}).requires_grad_();
  torch::optim::SGD opt({w}, 0.0);
  GradScaler scaler(GradScalerOptions().init_scale(32).growth_interval(5).growth_factor(4)
                        .backoff_factor(0.25));
  for (int t = 0; t < 3; ++t) {  // inf, then two good steps
    opt.zero_grad();
    scaler.scale(w.sum() * (t == 0 ? kInf : 1.0f)).backward();
    scaler.step(opt);
    scaler.update();
  }
  ASSERT_EQ(scaler.get_scale(), 8.0);
  ASSERT_EQ(scaler.growth_tracker(), 2);

  lockstep::train::Checkpoint ckpt;
  for (const auto& kv : scaler.state_dict().tensors()) ckpt.tensors[kv.first] = kv.second;
  const std::string path = ::testing::TempDir() + "scaler_" + std::to_string(getpid()) + ".ckpt";
  lockstep::train::write_checkpoint_file(path, ckpt);
  const auto loaded = lockstep::train::read_checkpoint_file(path);
  std::remove(path.c_str());

  GradScaler resumed;  // default options: the state carries the growth fields
  resumed.load_state_dict(GradScalerState::from_tensors(loaded.tensors));
  EXPECT_EQ(resumed.get_scale(), 8.0);
  EXPECT_EQ(resumed.growth_tracker(), 2);
  EXPECT_EQ(resumed.options().growth_interval(), 5);
  EXPECT_EQ(resumed.options().growth_factor(), 4.0);
  EXPECT_EQ(resumed.options().backoff_factor(), 0.25);
  // Both continue alike: three more good steps grow once (tracker 2 -> 5).
  for (auto* s : {&scaler, &resumed}) {
    for (int t = 0; t < 3; ++t) {
      opt.zero_grad();
      s->scale(w.sum()).backward();
      s->step(opt);
      s->update();
    }
  }
  EXPECT_EQ(scaler.get_scale(), 32.0);
  EXPECT_EQ(resumed.get_scale(), 32.0);
  EXPECT_EQ(resumed.growth_tracker(), scaler.growth_tracker());

  // A checkpoint without a scaler, or with a malformed field, is named.
  auto missing = loaded.tensors;
  missing.erase("scaler.growth_tracker");
  EXPECT_THROW(GradScalerState::from_tensors(missing), lockstep::InvalidArgument);
  EXPECT_NE(message_of([&] { GradScalerState::from_tensors(missing); })
                .find("Expected the GradScaler state tensor 'scaler.growth_tracker', but the "
                      "checkpoint has no such tensor"),
            std::string::npos);
  auto malformed = loaded.tensors;
  malformed["scaler.scale"] = torch::ones({2});
  EXPECT_NE(message_of([&] { GradScalerState::from_tensors(malformed); })
                .find("Expected 'scaler.scale' to hold one Double value, but got 2 value(s) of "
                      "Float"),
            std::string::npos);
  auto corrupt = scaler.state_dict();
  corrupt.growth_tracker = 7;
  EXPECT_NE(message_of([&] { resumed.load_state_dict(corrupt); })
                .find("Expected growth_tracker in [0, growth_interval=5), but got 7"),
            std::string::npos);
  corrupt = scaler.state_dict();
  corrupt.scale = -1;
  EXPECT_THROW(resumed.load_state_dict(corrupt), lockstep::InvalidArgument);
  EXPECT_EQ(resumed.get_scale(), 32.0) << "a rejected state changed the scaler";
}

TEST(GradScaler, DisabledIsAPassThrough) {
  auto w = torch::ones({3}).requires_grad_();
  torch::optim::SGD opt({w}, 1.0);
  GradScaler scaler(GradScalerOptions().enabled(false));
  EXPECT_FALSE(scaler.is_enabled());
  EXPECT_EQ(scaler.get_scale(), 1.0);
  scaler.update();  // no error without a step
  auto loss = w.sum();
  EXPECT_TRUE(scaler.scale(loss).is_same(loss));
  loss.backward();
  w.grad()[0].fill_(kInf);
  scaler.unscale_(opt);
  scaler.unscale_(opt);  // no state when disabled
  EXPECT_FALSE(scaler.found_inf(opt));
  EXPECT_TRUE(torch::equal(w.grad(), torch::tensor({kInf, 1.0f, 1.0f})));
  EXPECT_TRUE(scaler.step(opt));  // steps even with Inf, as training without a scaler
  EXPECT_TRUE(std::isinf(w[0].item<float>()));
  EXPECT_EQ(w[1].item<float>(), 0.0f);
  scaler.update();
  EXPECT_EQ(scaler.get_scale(), 1.0);
}

// ---------------------------------------------------------------------------------------------
// AutocastGuard

TEST(AutocastGuard, CpuBFloat16AndRestoredState) {
  namespace adapter = lockstep::adapter;
  const auto cpu = c10::DeviceType::CPU;
  const bool was_enabled = adapter::autocast_enabled(cpu);
  const auto was_dtype = adapter::autocast_dtype(cpu);
  ASSERT_FALSE(was_enabled);
  nn::Linear lin(4, 2);
  auto x = torch::randn({3, 4});
  const auto reference = lin(x);
  EXPECT_EQ(reference.scalar_type(), torch::kFloat);
  {
    AutocastGuard autocast(torch::kCPU, torch::kBFloat16);
    EXPECT_TRUE(adapter::autocast_enabled(cpu));
    EXPECT_EQ(adapter::autocast_dtype(cpu), torch::kBFloat16);
    auto y = lin(x);
    EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
    EXPECT_TRUE(torch::allclose(y.to(torch::kFloat), reference, /*rtol=*/2e-2, /*atol=*/2e-2));
    {
      AutocastGuard off(torch::kCPU, torch::kBFloat16, /*enabled=*/false);
      EXPECT_FALSE(adapter::autocast_enabled(cpu));
      EXPECT_EQ(lin(x).scalar_type(), torch::kFloat);
    }
    EXPECT_TRUE(adapter::autocast_enabled(cpu)) << "inner guard did not restore";
    EXPECT_EQ(lin(x).scalar_type(), torch::kBFloat16);
  }
  EXPECT_EQ(adapter::autocast_enabled(cpu), was_enabled);
  EXPECT_EQ(adapter::autocast_dtype(cpu), was_dtype);
  EXPECT_EQ(lin(x).scalar_type(), torch::kFloat);
  // The outermost guard cleared the cache and left the nesting at zero.
  EXPECT_EQ(adapter::autocast_increment_nesting(), 1);
  EXPECT_EQ(adapter::autocast_decrement_nesting(), 0);
}

TEST(AutocastGuard, RejectsWhatCannotAutocast) {
  EXPECT_THROW(AutocastGuard(torch::kCPU, torch::kFloat), lockstep::InvalidArgument);
  EXPECT_NE(message_of([] { AutocastGuard g(torch::kCPU, torch::kFloat); })
                .find("Expected kHalf or kBFloat16 as the autocast dtype, but got Float"),
            std::string::npos);
  EXPECT_NE(message_of([] { AutocastGuard g(torch::Device(torch::kMeta), torch::kHalf); })
                .find("Expected a device type with autocast support (CPU or CUDA), but got "
                      "META"),
            std::string::npos);
  EXPECT_FALSE(lockstep::adapter::autocast_enabled(c10::DeviceType::CPU));
}

// ---------------------------------------------------------------------------------------------
// Training

TEST(GradScaler, BFloat16AutocastTrainingUnderDDPLowersTheLoss) {
  const int world = 2;
  const int steps = 40;
  std::vector<std::vector<Tensor>> final_params(world);
  std::vector<double> first(world), last(world);
  lockstep_test::with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    const int r = pg->rank();
    auto model = std::make_shared<Mlp>();
    DistributedDataParallel<Mlp> ddp(model, pg);
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    GradScaler scaler(GradScalerOptions().growth_interval(5));
    auto eval = [&] {  // float32 loss on fixed held-out data, rank-local, no collective
      torch::NoGradGuard no_grad;
      auto d = batch(100 + r, 0);
      return torch::mse_loss(model->forward(d.first), d.second).item<double>();
    };
    first[r] = eval();
    for (int t = 0; t < steps; ++t) {
      auto d = batch(r, t);
      opt.zero_grad();
      Tensor loss;
      {
        AutocastGuard autocast(torch::kCPU, torch::kBFloat16);
        auto out = ddp->forward(d.first);
        EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
        loss = torch::mse_loss(out.to(torch::kFloat), d.second);
      }
      scaler.scale(loss).backward();
      EXPECT_TRUE(scaler.step(opt)) << "rank " << r << " step " << t;
      scaler.update();
    }
    EXPECT_EQ(scaler.get_scale(), 65536.0 * 256) << "8 growths of x2 in 40 good steps";
    last[r] = eval();
    final_params[r] = snapshot(*model);
  });
  for (int r = 0; r < world; ++r) {
    EXPECT_LT(last[r], 0.5 * first[r]) << "rank " << r << ": loss " << first[r] << " -> "
                                       << last[r];
    EXPECT_TRUE(equal_all(final_params[r], final_params[0])) << "rank " << r;
  }
}

}  // namespace
