// Communication hooks of lockstep/comm_hooks.h with ranks as threads over Gloo: PowerSGD against
// a direct computation of the same algorithm, error feedback, exact all-reduce before its start
// iteration, convergence next to uncompressed training; the int8 hook's error bound and bitwise
// agreement; post-local SGD with and without a subgroup; periodic model averaging; the
// per-parameter views of GradBucket; and every error message.
#include <gtest/gtest.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lockstep/comm_hooks.h"
#include "lockstep/ddp.h"
#include "lockstep/errors.h"
#include "lockstep/thread_group.h"
#include "support/models.h"
#include "support/threads.h"

namespace {

using lockstep::DDPOptions;
using lockstep::DistributedDataParallel;
using lockstep::GradBucket;
using lockstep::PowerSGDOptions;
using lockstep_test::with_groups;
using torch::Tensor;
namespace nn = torch::nn;

// A bucket as DDP builds one: gradients, one control element per parameter, presence and
// non-finite elements; per-parameter views into it.
GradBucket make_bucket(const std::vector<std::vector<int64_t>>& shapes,
                       const std::vector<size_t>& indices, at::ScalarType dtype) {
  GradBucket gb;
  int64_t numel = 0;
  for (const auto& s : shapes) numel += c10::multiply_integers(s);
  gb.gradient_numel = numel;
  gb.buffer = torch::zeros({numel + static_cast<int64_t>(shapes.size()) + 2}, dtype);
  int64_t offset = 0;
  for (size_t k = 0; k < shapes.size(); ++k) {
    const int64_t n = c10::multiply_integers(shapes[k]);
    gb.gradients.push_back(gb.buffer.narrow(0, offset, n).view(shapes[k]));
    gb.parameter_indices.push_back(indices[k]);
    gb.parameter_names.push_back("p" + std::to_string(indices[k]));
    offset += n;
  }
  gb.is_last = true;
  return gb;
}

// Rank r's contribution (already divided by the world size, as DDP's bucket holds it).
Tensor contribution(int rank, int it, size_t k, at::IntArrayRef shape, int world,
                    at::ScalarType dtype) {
  auto gen = at::detail::createCPUGenerator(1000 * (rank + 1) + 37 * it + static_cast<int>(k));
  return torch::randn(shape, gen, torch::TensorOptions().dtype(dtype)) / world;
}

// Modified Gram-Schmidt, written independently of the library's.
Tensor orthogonalized(Tensor p) {
  p = p.clone();
  for (int64_t i = 0; i < p.size(1); ++i) {
    auto col = p.select(1, i);
    const double norm = col.norm().item<double>();
    if (norm > 0) col.div_(norm);
    for (int64_t j = i + 1; j < p.size(1); ++j) {
      auto other = p.select(1, j);
      other.sub_(col * col.dot(other).item<double>());
    }
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// GradBucket's per-parameter views

using lockstep_test::Mlp;

class InspectingHook : public lockstep::CommHook {
 public:
  std::string name() const override { return "inspecting"; }
  lockstep::WorkPtr reduce(lockstep::ProcessGroup& group, GradBucket& b) override {
    seen.push_back(b);
    return group.allreduce(b.buffer);
  }
  std::vector<GradBucket> seen;
};

TEST(CommHooks, GradBucketViewsAliasTheBufferAndAreBuiltOnce) {
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto hook = std::make_shared<InspectingHook>();
    auto model = std::make_shared<Mlp>();
    DistributedDataParallel ddp(model, pg,
                                DDPOptions().comm_hook(hook).first_bucket_mb(0.0001)
                                    .rebuild_buckets(false).gradient_as_bucket_view(false));
    const auto info = ddp->buckets();
    for (int step = 0; step < 2; ++step) {
      ddp->forward(torch::randn({4, 6})).pow(2).sum().backward();
    }
    ASSERT_EQ(hook->seen.size(), 2 * info.size());
    auto named = model->named_parameters();
    std::vector<std::string> all_names;
    for (const auto& kv : named) all_names.push_back(kv.key());
    for (size_t b = 0; b < info.size(); ++b) {
      const auto& gb = hook->seen[b];
      ASSERT_EQ(gb.gradients.size(), info[b].parameters.size());
      EXPECT_EQ(gb.parameter_names, info[b].parameters);
      int64_t offset = 0;
      for (size_t k = 0; k < gb.gradients.size(); ++k) {
        const auto& g = gb.gradients[k];
        const auto& param = named[gb.parameter_names[k]];
        EXPECT_EQ(all_names[gb.parameter_indices[k]], gb.parameter_names[k]);
        EXPECT_EQ(g.sizes(), param.sizes()) << gb.parameter_names[k];
        EXPECT_EQ(static_cast<const char*>(g.data_ptr()),
                  static_cast<const char*>(gb.buffer.data_ptr()) + offset * g.element_size())
            << gb.parameter_names[k];
        // The reduced gradient is what the view holds (the sum of the averaged parts).
        EXPECT_TRUE(torch::equal(g, param.grad())) << gb.parameter_names[k];
        offset += g.numel();
      }
      EXPECT_EQ(offset, gb.gradient_numel);
      // The same tensors are handed out in the next iteration (built once per plan) ...
      const auto& again = hook->seen[info.size() + b];
      for (size_t k = 0; k < gb.gradients.size(); ++k) {
        EXPECT_EQ(again.gradients[k].unsafeGetTensorImpl(), gb.gradients[k].unsafeGetTensorImpl());
      }
      // ... and writing through a view writes the buffer.
      gb.gradients[0].view({-1})[0].fill_(12345.0);
      EXPECT_EQ(gb.buffer[0].item<double>(), 12345.0);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// PowerSGD

TEST(PowerSGD, MatchesADirectComputationWithErrorFeedbackAndWarmStart) {
  for (const std::string transport : {"gloo", "shm"}) {
    SCOPED_TRACE(transport);
    const int world = 2;
    const std::vector<std::vector<int64_t>> shapes = {{16, 12}, {10, 2, 5}, {7}, {3, 4}};
    const std::vector<size_t> indices = {3, 0, 7, 2};
    // At rank 2 and rate 2: 16x12 and 10x10 are compressed; the bias and 3x4 are not.
    const std::vector<bool> compressed = {true, true, false, false};
    const int64_t rank = 2;
    const uint64_t seed = 5;
    const int iterations = 3;
    std::vector<std::vector<Tensor>> results(world);  // per rank: the buffer after each iteration
    std::vector<std::vector<Tensor>> errors(world);   // per rank: error of parameter 3 at the end
    with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
      auto hook = lockstep::powersgd_hook(
          PowerSGDOptions().matrix_approximation_rank(rank).start_powersgd_iter(0).random_seed(
              seed));
      auto gb = make_bucket(shapes, indices, at::kDouble);
      for (int it = 0; it < iterations; ++it) {
        for (size_t k = 0; k < shapes.size(); ++k) {
          gb.gradients[k].copy_(contribution(pg->rank(), it, k, shapes[k], world, at::kDouble));
          const double missed = static_cast<double>((pg->rank() + k + it) % 2);
          gb.buffer[gb.gradient_numel + static_cast<int64_t>(k)].fill_(missed);
        }
        gb.buffer[-2].fill_(1);  // presence
        gb.buffer[-1].fill_(0);  // non-finite
        auto work = hook->reduce(*pg, gb);
        work->wait();
        EXPECT_TRUE(work->is_completed());
        results[pg->rank()].push_back(gb.buffer.clone());
      }
      EXPECT_EQ(hook->iteration(), iterations);
      for (size_t k = 0; k < shapes.size(); ++k) {
        auto e = hook->error(indices[k]);
        errors[pg->rank()].push_back(e.defined() ? e.clone() : Tensor());
      }
    }, lockstep::ProcessGroupOptions().transport(transport));
    // The same algorithm by hand.
    std::vector<Tensor> q(shapes.size());
    std::vector<std::vector<Tensor>> err(world, std::vector<Tensor>(shapes.size()));
    std::vector<Tensor> last_sum(shapes.size());  // sum of the last compressed inputs
    for (int it = 0; it < iterations; ++it) {
      std::vector<Tensor> expected;
      for (size_t k = 0; k < shapes.size(); ++k) {
        std::vector<Tensor> a;
        for (int r = 0; r < world; ++r) {
          a.push_back(contribution(r, it, k, shapes[k], world, at::kDouble));
        }
        if (!compressed[k]) {
          expected.push_back((a[0] + a[1]).reshape({-1}));
          continue;
        }
        const int64_t n = shapes[k][0], m = a[0].numel() / n, rr = std::min({n, m, rank});
        std::vector<Tensor> mats;
        for (int r = 0; r < world; ++r) {
          auto mr = a[r].reshape({n, m});
          if (err[r][k].defined()) mr = mr + err[r][k];
          mats.push_back(mr);
        }
        if (!q[k].defined()) {
          auto gen = at::detail::createCPUGenerator(seed + indices[k]);
          q[k] = orthogonalized(torch::randn({m, rr}, gen, torch::kFloat).to(torch::kDouble));
        }
        auto p = orthogonalized(mats[0].mm(q[k]) + mats[1].mm(q[k]));
        auto qq = mats[0].t().mm(p) + mats[1].t().mm(p);
        auto approx = p.mm(qq.t());
        for (int r = 0; r < world; ++r) err[r][k] = mats[r] - approx / world;
      if (it == iterations - 1) last_sum[k] = mats[0] + mats[1];
        q[k] = qq;
        expected.push_back(approx.reshape({-1}));
      }
      auto grads = torch::cat(expected);
      for (int r = 0; r < world; ++r) {
        const auto& got = results[r][it];
        const int64_t g = grads.numel();
        EXPECT_TRUE(torch::allclose(got.narrow(0, 0, g), grads, 1e-9, 1e-12))
            << "rank " << r << " iteration " << it << " max diff "
            << (got.narrow(0, 0, g) - grads).abs().max().item<double>();
        // Control elements: exact sums over the ranks.
        for (size_t k = 0; k < shapes.size(); ++k) {
          EXPECT_EQ(got[g + static_cast<int64_t>(k)].item<double>(),
                    static_cast<double>((0 + k + it) % 2 + (1 + k + it) % 2));
        }
        EXPECT_EQ(got[-2].item<double>(), 2.0);
        EXPECT_EQ(got[-1].item<double>(), 0.0);
        EXPECT_TRUE(torch::equal(got, results[0][it])) << "ranks differ";
      }
    }
    for (int r = 0; r < world; ++r) {
      for (size_t k = 0; k < shapes.size(); ++k) {
        if (!compressed[k]) {
          EXPECT_FALSE(errors[r][k].defined()) << "an uncompressed tensor has no error";
          continue;
        }
        ASSERT_TRUE(errors[r][k].defined());
        EXPECT_TRUE(torch::allclose(errors[r][k], err[r][k], 1e-9, 1e-12)) << "rank " << r;
      }
    }
    // Error feedback: summed over ranks, the hook's errors are exactly what its last output
    // left out of the sum of the inputs it compressed.
    int64_t offset = 0;
    for (size_t k = 0; k < 2; ++k) {
      const int64_t n = last_sum[k].numel();
      auto output = results[0][iterations - 1].narrow(0, offset, n).view(last_sum[k].sizes());
      auto lost = last_sum[k] - output;
      EXPECT_TRUE(torch::allclose(errors[0][k] + errors[1][k], lost, 1e-9, 1e-12));
      EXPECT_GT(lost.abs().max().item<double>(), 1e-3)
          << "a rank-2 approximation of random matrices loses something";
      offset += n;
    }
  }
}

TEST(PowerSGD, WithoutErrorFeedbackOrWarmStartUsesAFreshQEachIteration) {
  std::vector<Tensor> q0(2), q1(2);
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto hook = lockstep::powersgd_hook(PowerSGDOptions()
                                            .start_powersgd_iter(0)
                                            .use_error_feedback(false)
                                            .warm_start(false)
                                            .random_seed(9));
    auto gb = make_bucket({{20, 20}}, {4}, at::kFloat);
    for (int it = 0; it < 2; ++it) {
      gb.gradients[0].copy_(contribution(pg->rank(), it, 0, {20, 20}, 2, at::kFloat));
      hook->reduce(*pg, gb)->wait();
      (it == 0 ? q0 : q1)[pg->rank()] = hook->q(4).clone();
    }
    EXPECT_FALSE(hook->error(4).defined());
  });
  for (int it = 0; it < 2; ++it) {
    auto gen = at::detail::createCPUGenerator(9 + 1000003ULL * it + 4);
    auto expected = orthogonalized(torch::randn({20, 1}, gen, torch::kFloat));
    for (int r = 0; r < 2; ++r) {
      EXPECT_TRUE(torch::allclose((it == 0 ? q0 : q1)[r], expected, 1e-6, 1e-7))
          << "iteration " << it << " rank " << r;
    }
  }
}

// Round 2 is issued by the hook's worker, not by wait(): the Work completes while nobody
// waits for it (observed with a bounded poll of is_completed()), and the bucket then already
// holds what a hook whose Work is waited for at once computes, bit for bit.
TEST(PowerSGD, RoundTwoCompletesWithoutWait) {
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto eager = lockstep::powersgd_hook(PowerSGDOptions().start_powersgd_iter(0));
    auto waited = lockstep::powersgd_hook(PowerSGDOptions().start_powersgd_iter(0));
    auto gb = make_bucket({{24, 16}, {5}, {8, 30}}, {0, 1, 2}, at::kFloat);
    auto ref = make_bucket({{24, 16}, {5}, {8, 30}}, {0, 1, 2}, at::kFloat);
    for (int it = 0; it < 3; ++it) {
      for (size_t k = 0; k < gb.gradients.size(); ++k) {
        auto c = contribution(pg->rank(), it, k, gb.gradients[k].sizes(), 2, at::kFloat);
        gb.gradients[k].copy_(c);
        ref.gradients[k].copy_(c);
      }
      auto work = eager->reduce(*pg, gb);
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (!work->is_completed() && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::yield();
      }
      ASSERT_TRUE(work->is_completed()) << pg->where() << " iteration " << it
                                        << ": round 2 did not complete without wait()";
      waited->reduce(*pg, ref)->wait();
      EXPECT_TRUE(torch::equal(gb.buffer, ref.buffer)) << pg->where() << " iteration " << it;
      EXPECT_TRUE(torch::equal(eager->error(0), waited->error(0))) << pg->where();
      work->wait();  // only waits
    }
  });
}

// A ProcessGroup written outside lockstep (here one that forwards to a thread group) builds no
// subgroups: PowerSGD then issues round 2 from wait() on the DDP group (the Work is not
// complete before), with the same result as on the thread group itself.
class ForwardingGroup : public lockstep::ProcessGroup {
 public:
  explicit ForwardingGroup(lockstep::ProcessGroupPtr inner)
      : ProcessGroup(inner->rank(), inner->size(), inner->timeout(), inner->store()),
        inner_(std::move(inner)) {}
  std::string backend() const override { return "forwarding"; }
  lockstep::WorkPtr allreduce(Tensor& t, lockstep::ReduceOp op) override {
    return inner_->allreduce(t, op);
  }
  lockstep::WorkPtr broadcast(Tensor& t, int root) override { return inner_->broadcast(t, root); }
  lockstep::WorkPtr allgather(std::vector<Tensor>& out, const Tensor& in) override {
    return inner_->allgather(out, in);
  }
  lockstep::WorkPtr barrier() override { return inner_->barrier(); }

 private:
  lockstep::ProcessGroupPtr inner_;
};

TEST(PowerSGD, WithAGroupThatBuildsNoSubgroupsRoundTwoRunsInWait) {
  auto inner = lockstep::new_thread_groups(2);
  lockstep_test::run_ranks(2, [&](int r) {
    ForwardingGroup pg(inner[r]);
    auto fallback = lockstep::powersgd_hook(PowerSGDOptions().start_powersgd_iter(0));
    auto direct = lockstep::powersgd_hook(PowerSGDOptions().start_powersgd_iter(0));
    auto gb = make_bucket({{24, 16}, {5}}, {0, 1}, at::kFloat);
    auto ref = make_bucket({{24, 16}, {5}}, {0, 1}, at::kFloat);
    for (int it = 0; it < 2; ++it) {
      for (size_t k = 0; k < gb.gradients.size(); ++k) {
        auto c = contribution(r, it, k, gb.gradients[k].sizes(), 2, at::kFloat);
        gb.gradients[k].copy_(c);
        ref.gradients[k].copy_(c);
      }
      auto work = fallback->reduce(pg, gb);
      EXPECT_FALSE(work->is_completed()) << "rank " << r << ": round 2 ran before wait()";
      work->wait();
      direct->reduce(*inner[r], ref)->wait();
      EXPECT_TRUE(torch::equal(gb.buffer, ref.buffer)) << "rank " << r << " iteration " << it;
    }
  });
}

TEST(PowerSGD, ANonFiniteResultDropsTheStateAndAZeroGradientStaysZero) {
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto hook = lockstep::powersgd_hook(PowerSGDOptions().start_powersgd_iter(0));
    auto gb = make_bucket({{12, 10}}, {1}, at::kFloat);
    // All zeros: P = 0, and its orthogonalization must not divide by zero.
    hook->reduce(*pg, gb)->wait();
    EXPECT_TRUE(torch::equal(gb.buffer, torch::zeros_like(gb.buffer)));
    ASSERT_TRUE(hook->q(1).defined());
    ASSERT_TRUE(hook->error(1).defined());
    // A NaN on rank 1: the sum is NaN on every rank (DDP's NonFinite policy sees it) ...
    gb.gradients[0].copy_(contribution(pg->rank(), 1, 0, {12, 10}, 2, at::kFloat));
    if (pg->rank() == 1) gb.gradients[0][2][3].fill_(std::nan(""));
    hook->reduce(*pg, gb)->wait();
    EXPECT_TRUE(std::isnan(gb.buffer.narrow(0, 0, 120).sum().item<double>()));
    // ... and the state that would carry it on is dropped: the next iteration is clean.
    EXPECT_FALSE(hook->q(1).defined());
    EXPECT_FALSE(hook->error(1).defined());
    gb.buffer.zero_();
    gb.gradients[0].copy_(contribution(pg->rank(), 2, 0, {12, 10}, 2, at::kFloat));
    hook->reduce(*pg, gb)->wait();
    EXPECT_TRUE(torch::isfinite(gb.buffer).all().item<bool>());
    EXPECT_TRUE(hook->q(1).defined());
  });
}

template <typename MakeHook>
std::vector<std::vector<Tensor>> train_grads(int steps, MakeHook make_hook,
                                             const std::vector<Tensor>& init) {
  std::vector<std::vector<Tensor>> grads(2);
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto model = std::make_shared<Mlp>(6, 32, 8);
    {
      torch::NoGradGuard g;
      auto ps = model->parameters();
      for (size_t i = 0; i < ps.size(); ++i) ps[i].copy_(init[i]);
    }
    DistributedDataParallel ddp(model, pg, DDPOptions().comm_hook(make_hook()));
    for (int step = 0; step < steps; ++step) {
      auto gen = at::detail::createCPUGenerator(77 + 13 * pg->rank() + 101 * step);
      auto x = torch::randn({8, 6}, gen);
      for (auto& p : model->parameters()) p.mutable_grad() = Tensor();
      ddp->forward(x).pow(2).mean().backward();
      grads[pg->rank()].push_back(model->l1->weight.grad().clone());
    }
  });
  return grads;
}

TEST(PowerSGD, BeforeStartIterationEqualsAllreduceExactly) {
  torch::manual_seed(3);
  Mlp init_model(6, 32, 8);
  std::vector<Tensor> init;
  for (auto& p : init_model.parameters()) init.push_back(p.detach().clone());
  const int start = 3;
  auto exact = train_grads(start + 1, [] { return lockstep::allreduce_hook(); }, init);
  auto power = train_grads(
      start + 1,
      [] { return lockstep::powersgd_hook(PowerSGDOptions().start_powersgd_iter(start)); },
      init);
  for (int r = 0; r < 2; ++r) {
    for (int step = 0; step < start; ++step) {
      EXPECT_TRUE(torch::equal(power[r][step], exact[r][step])) << "rank " << r << " step " << step;
    }
    // l1.weight is 32 x 6: 192 > (32 + 6) * 1 * 2, so it is compressed from then on.
    EXPECT_FALSE(torch::allclose(power[r][start], exact[r][start], 1e-3, 1e-5))
        << "compression started at iteration " << start;
    EXPECT_TRUE(torch::equal(power[r][start], power[0][start])) << "ranks agree bitwise";
  }
}

// Registers its layers in the reverse of the order it uses them, so gradients become ready in
// a different order than the first bucket plan assumes, and the rebuild changes the plan.
struct Swapped : nn::Module {
  nn::Linear head{nullptr}, body{nullptr};
  Swapped() {
    head = register_module("head", nn::Linear(32, 8));
    body = register_module("body", nn::Linear(6, 32));
  }
  Tensor forward(Tensor x) { return head(torch::relu(body(x))); }
};

TEST(PowerSGD, StateIsKeyedByParameterSoABucketRebuildChangesNothing) {
  // Compression from the first iteration, several buckets, rebuilt after the first iteration
  // or not: per-parameter state and elementwise sums give bitwise the same gradients.
  torch::manual_seed(8);
  Swapped init_model;
  std::vector<Tensor> init;
  for (auto& p : init_model.parameters()) init.push_back(p.detach().clone());
  std::vector<std::vector<std::vector<Tensor>>> grads(2, std::vector<std::vector<Tensor>>(2));
  std::vector<std::vector<lockstep::BucketInfo>> plans(2);
  for (int rebuild = 0; rebuild < 2; ++rebuild) {
    with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
      auto model = std::make_shared<Swapped>();
      {
        torch::NoGradGuard g;
        auto ps = model->parameters();
        for (size_t i = 0; i < ps.size(); ++i) ps[i].copy_(init[i]);
      }
      auto hook = lockstep::powersgd_hook(PowerSGDOptions().start_powersgd_iter(0));
      DistributedDataParallel ddp(model, pg,
                                  DDPOptions().comm_hook(hook).first_bucket_mb(0.0005)
                                      .bucket_cap_mb(0.0005).rebuild_buckets(rebuild == 1));
      for (int step = 0; step < 4; ++step) {
        auto gen = at::detail::createCPUGenerator(40 + 3 * pg->rank() + 17 * step);
        for (auto& p : model->parameters()) p.mutable_grad() = Tensor();
        ddp->forward(torch::randn({8, 6}, gen)).pow(2).mean().backward();
        grads[rebuild][pg->rank()].push_back(model->body->weight.grad().clone());
        grads[rebuild][pg->rank()].push_back(model->head->weight.grad().clone());
      }
      if (pg->rank() == 0) plans[rebuild] = ddp->buckets();
      EXPECT_TRUE(hook->error(0).defined()) << "head.weight (8 x 32) is compressed";
      EXPECT_TRUE(hook->error(2).defined()) << "body.weight (32 x 6) is compressed";
      EXPECT_FALSE(hook->error(1).defined()) << "head.bias is not";
    });
  }
  ASSERT_GT(plans[0].size(), 1u);
  bool plan_changed = plans[0].size() != plans[1].size();
  for (size_t b = 0; !plan_changed && b < plans[0].size(); ++b) {
    plan_changed = plans[0][b].parameters != plans[1][b].parameters;
  }
  EXPECT_TRUE(plan_changed) << "the rebuild should have changed the buckets";
  for (int r = 0; r < 2; ++r) {
    ASSERT_EQ(grads[0][r].size(), grads[1][r].size());
    for (size_t i = 0; i < grads[0][r].size(); ++i) {
      EXPECT_TRUE(torch::equal(grads[0][r][i], grads[1][r][i])) << "rank " << r << " tensor " << i;
    }
  }
}

TEST(PowerSGD, TrainingConvergesNextToUncompressed) {
  // Regression onto a fixed linear map through a two-layer network; both runs from one init.
  torch::manual_seed(21);
  auto target = torch::randn({12, 4});
  Mlp init_model(12, 48, 4);
  std::vector<Tensor> init;
  for (auto& p : init_model.parameters()) init.push_back(p.detach().clone());
  const int steps = 150;
  auto run = [&](bool compressed) {
    std::vector<double> first(2), last(2);
    with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
      auto model = std::make_shared<Mlp>(12, 48, 4);
      {
        torch::NoGradGuard g;
        auto ps = model->parameters();
        for (size_t i = 0; i < ps.size(); ++i) ps[i].copy_(init[i]);
      }
      DDPOptions o;
      if (compressed) {
        o.comm_hook(lockstep::powersgd_hook(
            PowerSGDOptions().matrix_approximation_rank(2).start_powersgd_iter(5)));
      }
      DistributedDataParallel ddp(model, pg, o);
      torch::optim::SGD opt(ddp->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
      for (int step = 0; step < steps; ++step) {
        auto gen = at::detail::createCPUGenerator(500 + 7 * pg->rank() + 31 * step);
        auto x = torch::randn({16, 12}, gen);
        opt.zero_grad();
        auto loss = torch::mse_loss(ddp->forward(x), x.mm(target));
        loss.backward();
        opt.step();
        if (step == 0) first[pg->rank()] = loss.item<double>();
        if (step == steps - 1) last[pg->rank()] = loss.item<double>();
      }
    });
    return std::make_pair((first[0] + first[1]) / 2, (last[0] + last[1]) / 2);
  };
  auto exact = run(false);
  auto power = run(true);
  std::cout << "[ regression ] loss " << exact.first << " -> " << exact.second
            << " uncompressed, -> " << power.second << " PowerSGD rank 2\n";
  EXPECT_LT(exact.second, 0.1 * exact.first);
  EXPECT_LT(power.second, 0.1 * power.first) << "PowerSGD training should converge";
  EXPECT_LT(power.second, 2.0 * exact.second + 0.01) << "and end near uncompressed training";
}

// ---------------------------------------------------------------------------------------------
// int8 quantization

TEST(Int8Quantize, ErrorBoundedByHalfAScalePerRankAndBitwiseEqualOnEveryRank) {
  for (const std::string transport : {"gloo", "shm"}) {
    SCOPED_TRACE(transport);
    const int world = 3;
    const std::vector<std::vector<int64_t>> shapes = {{40, 3}, {17}, {5, 5}};
    std::vector<Tensor> results(world), nan_results(world), zero_results(world);
    with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
      auto hook = lockstep::int8_quantize_hook();
      auto gb = make_bucket(shapes, {0, 1, 2}, at::kFloat);
      for (size_t k = 0; k < shapes.size(); ++k) {
        // Ranks at different magnitudes, so their scales differ.
        gb.gradients[k].copy_(contribution(pg->rank(), 0, k, shapes[k], world, at::kFloat) *
                              (1 + 10 * pg->rank()));
        gb.buffer[gb.gradient_numel + static_cast<int64_t>(k)].fill_(pg->rank() == 1 ? 1 : 0);
      }
      gb.buffer[-2].fill_(1);
      hook->reduce(*pg, gb)->wait();
      results[pg->rank()] = gb.buffer.clone();
      // A NaN on one rank makes the sum NaN; an all-zero bucket stays zero.
      gb.buffer.zero_();
      if (pg->rank() == 2) gb.gradients[1][3].fill_(std::nan(""));
      hook->reduce(*pg, gb)->wait();
      nan_results[pg->rank()] = gb.buffer.clone();
      gb.buffer.zero_();
      hook->reduce(*pg, gb)->wait();
      zero_results[pg->rank()] = gb.buffer.clone();
    }, lockstep::ProcessGroupOptions().transport(transport));
    Tensor exact;
    double bound = 0;
    for (int r = 0; r < world; ++r) {
      std::vector<Tensor> parts;
      for (size_t k = 0; k < shapes.size(); ++k) {
        parts.push_back(contribution(r, 0, k, shapes[k], world, at::kFloat).reshape({-1}) *
                        (1 + 10 * r));
      }
      auto mine = torch::cat(parts);
      exact = exact.defined() ? exact + mine : mine;
      bound += mine.abs().max().item<double>() / 127 / 2;  // s_r / 2
    }
    const int64_t g = exact.numel();
    for (int r = 0; r < world; ++r) {
      EXPECT_TRUE(torch::equal(results[r], results[0])) << "rank " << r << " differs from rank 0";
      const double err = (results[r].narrow(0, 0, g) - exact).abs().max().item<double>();
      EXPECT_LE(err, bound * (1 + 1e-4)) << "rank " << r;
      EXPECT_GT(err, 0.0) << "quantization should change the values";
      for (size_t k = 0; k < shapes.size(); ++k) {
        EXPECT_EQ(results[r][g + static_cast<int64_t>(k)].item<float>(), 1.0f);
      }
      EXPECT_EQ(results[r][-2].item<float>(), 3.0f);
      EXPECT_TRUE(std::isnan(nan_results[r].narrow(0, 0, g).sum().item<double>()));
      EXPECT_TRUE(torch::equal(zero_results[r], torch::zeros_like(zero_results[r])));
    }
  }
}

// Records the largest |element| of each bucket's gradients before handing it to `inner`.
class ScaleRecorder : public lockstep::CommHook {
 public:
  explicit ScaleRecorder(lockstep::CommHookPtr inner) : inner_(std::move(inner)) {}
  std::string name() const override { return inner_->name(); }
  lockstep::WorkPtr reduce(lockstep::ProcessGroup& group, GradBucket& b) override {
    amax = std::max(amax, b.buffer.narrow(0, 0, b.gradient_numel).abs().max().item<double>());
    return inner_->reduce(group, b);
  }
  double amax = 0;

 private:
  lockstep::CommHookPtr inner_;
};

TEST(Int8Quantize, DDPGradientsAreWithinTheBoundOfTheExactAverage) {
  torch::manual_seed(4);
  Mlp init_model(6, 32, 8);
  std::vector<Tensor> init;
  for (auto& p : init_model.parameters()) init.push_back(p.detach().clone());
  std::mutex mutex;
  std::vector<std::shared_ptr<ScaleRecorder>> recorders;
  auto exact = train_grads(1, [] { return lockstep::allreduce_hook(); }, init);
  auto quant = train_grads(1, [&] {
    auto r = std::make_shared<ScaleRecorder>(lockstep::int8_quantize_hook());
    std::lock_guard<std::mutex> lock(mutex);
    recorders.push_back(r);
    return r;
  }, init);
  ASSERT_EQ(recorders.size(), 2u);
  const double bound = (recorders[0]->amax + recorders[1]->amax) / 127 / 2;  // sum_r s_r / 2
  for (int r = 0; r < 2; ++r) {
    const double err = (quant[r][0] - exact[r][0]).abs().max().item<double>();
    EXPECT_LE(err, bound * (1 + 1e-4)) << "rank " << r;
    EXPECT_GT(err, 0.0) << "rank " << r;
    EXPECT_TRUE(torch::equal(quant[r][0], quant[0][0]));
  }
}

// ---------------------------------------------------------------------------------------------
// Post-local SGD and periodic model averaging

TEST(PostLocalSGD, LocalOrSubgroupGradientsAfterStartWhileControlsAreSummedOverTheGroup) {
  for (const std::string transport : {"gloo", "shm"}) {
    SCOPED_TRACE(transport);
    const int world = 4;
    const std::vector<std::vector<int64_t>> shapes = {{3, 2}, {4}};
    std::vector<std::vector<Tensor>> pure(world), sub(world);
    with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
      auto low = lockstep::new_group(*pg, {0, 1});
      auto high = lockstep::new_group(*pg, {2, 3});
      auto mine = pg->rank() < 2 ? low : high;
      for (int with_subgroup = 0; with_subgroup < 2; ++with_subgroup) {
        auto hook = lockstep::post_local_sgd_hook(lockstep::PostLocalSGDOptions()
                                                      .start_local_sgd_iter(1)
                                                      .subgroup(with_subgroup ? mine : nullptr));
        auto gb = make_bucket(shapes, {0, 1}, at::kDouble);
        for (int it = 0; it < 2; ++it) {
          for (size_t k = 0; k < shapes.size(); ++k) {
            gb.gradients[k].copy_(contribution(pg->rank(), it, k, shapes[k], world, at::kDouble));
            gb.buffer[gb.gradient_numel + static_cast<int64_t>(k)].fill_(pg->rank() == 3 ? 1 : 0);
          }
          gb.buffer[-2].fill_(1);
          gb.buffer[-1].fill_(0);
          hook->reduce(*pg, gb)->wait();
          (with_subgroup ? sub : pure)[pg->rank()].push_back(gb.buffer.clone());
        }
      }
    }, lockstep::ProcessGroupOptions().transport(transport));
    auto grads_of = [&](int r, int it) {
      std::vector<Tensor> parts;
      for (size_t k = 0; k < shapes.size(); ++k) {
        parts.push_back(contribution(r, it, k, shapes[k], world, at::kDouble).reshape({-1}));
      }
      return torch::cat(parts);
    };
    const int64_t g = 10;
    for (int r = 0; r < world; ++r) {
      for (auto* runs : {&pure, &sub}) {
        const auto& got = (*runs)[r];
        // Before the start iteration: the sum over the whole group.
        auto sum = grads_of(0, 0) + grads_of(1, 0) + grads_of(2, 0) + grads_of(3, 0);
        EXPECT_TRUE(torch::allclose(got[0].narrow(0, 0, g), sum, 1e-12, 1e-14)) << "rank " << r;
        // Controls stay summed over the whole group in every iteration.
        for (int it = 0; it < 2; ++it) {
          EXPECT_EQ(got[it][g].item<double>(), 1.0);
          EXPECT_EQ(got[it][g + 1].item<double>(), 1.0);
          EXPECT_EQ(got[it][-2].item<double>(), 4.0);
          EXPECT_EQ(got[it][-1].item<double>(), 0.0);
        }
      }
      // After it: this rank's own gradient (undo the division by the world size) ...
      EXPECT_TRUE(torch::allclose(pure[r][1].narrow(0, 0, g), grads_of(r, 1) * world, 1e-12, 1e-14))
          << "rank " << r;
      // ... or the average over its subgroup.
      const int peer = r ^ 1;
      auto sub_avg = (grads_of(r, 1) + grads_of(peer, 1)) * world / 2;
      EXPECT_TRUE(torch::allclose(sub[r][1].narrow(0, 0, g), sub_avg, 1e-12, 1e-14))
          << "rank " << r;
    }
  }
}

TEST(PeriodicModelAverager, AveragesExactlyAtWarmupPlusMultiplesOfThePeriod) {
  for (const std::string transport : {"gloo", "shm"}) {
    SCOPED_TRACE(transport);
    const int world = 3;
    const int steps = 10;
    std::vector<std::vector<Tensor>> after(world);
    std::vector<std::vector<bool>> averaged(world);
    with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
      lockstep::PeriodicModelAverager averager(pg, /*period=*/3, /*warmup_steps=*/2);
      auto w = torch::zeros({4, 3}, torch::requires_grad());
      auto b = torch::zeros({5}, torch::kDouble).requires_grad_();
      for (int step = 0; step < steps; ++step) {
        {
          torch::NoGradGuard g;
          w.copy_(torch::full({4, 3}, 0.1 * (pg->rank() + 1) * (step + 1), torch::kFloat));
          b.copy_(torch::arange(5, torch::kDouble) * (pg->rank() + 1) / 3.0);
        }
        averaged[pg->rank()].push_back(averager.average_parameters({w, b}));
        after[pg->rank()].push_back(
            torch::cat({w.detach().reshape({-1}).to(torch::kDouble), b.detach()}));
      }
      EXPECT_EQ(averager.step(), steps);
      EXPECT_TRUE(w.requires_grad());
    }, lockstep::ProcessGroupOptions().transport(transport));
    for (int step = 0; step < steps; ++step) {
      const bool due = step == 2 || step == 5 || step == 8;
      for (int r = 0; r < world; ++r) {
        EXPECT_EQ(averaged[r][step], due) << "step " << step;
        Tensor expected;
        if (due) {
          auto w = torch::full({12}, 0.1 * (1 + 2 + 3) * (step + 1) / 3.0, torch::kDouble);
          auto b = torch::arange(5, torch::kDouble) * (1 + 2 + 3) / 3.0 / 3.0;
          expected = torch::cat({w, b});
          EXPECT_TRUE(torch::equal(after[r][step], after[0][step])) << "bitwise on every rank";
          EXPECT_TRUE(torch::allclose(after[r][step], expected, 1e-6, 1e-7)) << "step " << step;
        } else {
          auto w = torch::full({12}, 0.1 * (r + 1) * (step + 1), torch::kFloat).to(torch::kDouble);
          auto b = torch::arange(5, torch::kDouble) * (r + 1) / 3.0;
          expected = torch::cat({w, b});
          EXPECT_TRUE(torch::equal(after[r][step], expected)) << "untouched at step " << step;
        }
      }
    }
  }
}

TEST(PostLocalSGD, DDPRanksDivergeThenTheAveragerReunitesThem) {
  std::vector<std::vector<Tensor>> params(2);
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto model = std::make_shared<Mlp>();
    DistributedDataParallel ddp(
        model, pg,
        DDPOptions().comm_hook(lockstep::post_local_sgd_hook(
            lockstep::PostLocalSGDOptions().start_local_sgd_iter(2))));
    torch::optim::SGD opt(ddp->parameters(), 0.1);
    lockstep::PeriodicModelAverager averager(pg, /*period=*/2, /*warmup_steps=*/3);
    for (int step = 0; step < 4; ++step) {
      auto gen = at::detail::createCPUGenerator(5 + pg->rank() + 10 * step);
      opt.zero_grad();
      ddp->forward(torch::randn({4, 6}, gen)).pow(2).mean().backward();
      opt.step();
      averager.average_parameters(model->parameters());  // due at step 3 only
      params[pg->rank()].push_back(model->l1->weight.detach().clone());
    }
  });
  EXPECT_TRUE(torch::equal(params[0][1], params[1][1])) << "all-reduced steps keep ranks equal";
  EXPECT_FALSE(torch::equal(params[0][2], params[1][2])) << "local steps let ranks diverge";
  EXPECT_TRUE(torch::equal(params[0][3], params[1][3])) << "averaging reunites them";
}

struct TwoHeads : nn::Module {
  nn::Linear trunk{nullptr}, a{nullptr}, b{nullptr};
  TwoHeads() {
    trunk = register_module("trunk", nn::Linear(4, 8));
    a = register_module("a", nn::Linear(8, 2));
    b = register_module("b", nn::Linear(8, 2));
  }
  Tensor forward(Tensor x, bool use_b) {
    auto h = torch::relu(trunk(x));
    return use_b ? a(h) + b(h) : a(h);
  }
};

TEST(PostLocalSGD, UnusedParameterBookkeepingStillSpansTheWholeGroup) {
  // After the start iteration gradients stay local, but a head unused on rank 1 only is still
  // an error on every rank (counted over the whole group), and with find_unused_parameters it
  // is not (rank 0's gradient for it is rank 0's own, rank 1 contributes zeros).
  std::vector<std::string> messages(2);
  std::vector<Tensor> head_grads(2);
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    for (int find_unused = 0; find_unused < 2; ++find_unused) {
      auto model = std::make_shared<TwoHeads>();
      DistributedDataParallel ddp(
          model, pg,
          DDPOptions().find_unused_parameters(find_unused == 1).comm_hook(
              lockstep::post_local_sgd_hook(
                  lockstep::PostLocalSGDOptions().start_local_sgd_iter(1))));
      auto x = torch::ones({2, 4});
      ddp->forward(x, true).sum().backward();  // iteration 0: every head used everywhere
      for (auto& p : model->parameters()) p.mutable_grad().zero_();
      try {
        ddp->forward(x, pg->rank() == 0).sum().backward();
        if (find_unused) head_grads[pg->rank()] = model->b->weight.grad().clone();
      } catch (const lockstep::InvalidArgument& e) {
        if (!find_unused) messages[pg->rank()] = e.what();
      }
    }
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(messages[r].find("'b.weight' (on 1 of 2 ranks)"), std::string::npos)
        << "rank " << r << ": " << messages[r];
    ASSERT_TRUE(head_grads[r].defined()) << "rank " << r;
  }
  EXPECT_GT(head_grads[0].abs().sum().item<double>(), 0.0) << "rank 0's own gradient";
  EXPECT_EQ(head_grads[1].abs().sum().item<double>(), 0.0) << "rank 1 used no b: zero";
}

// ---------------------------------------------------------------------------------------------
// Errors

TEST(CommHooks, EveryOptionErrorNamesTheOptionAndTheValue) {
  auto expect = [](const std::function<void()>& fn, const std::string& part) {
    try {
      fn();
      ADD_FAILURE() << "expected InvalidArgument containing '" << part << "'";
    } catch (const lockstep::InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  expect([] { lockstep::powersgd_hook(PowerSGDOptions().matrix_approximation_rank(0)); },
         "expected matrix_approximation_rank of at least 1, but got 0");
  expect([] { lockstep::powersgd_hook(PowerSGDOptions().start_powersgd_iter(-1)); },
         "expected start_powersgd_iter of at least 0, but got -1");
  expect([] { lockstep::powersgd_hook(PowerSGDOptions().min_compression_rate(0)); },
         "expected a positive min_compression_rate, but got 0");
  expect([] { lockstep::powersgd_hook(PowerSGDOptions().orthogonalization_epsilon(-1)); },
         "expected a non-negative orthogonalization_epsilon, but got -1");
  expect([] {
    lockstep::post_local_sgd_hook(lockstep::PostLocalSGDOptions().start_local_sgd_iter(-2));
  }, "expected start_local_sgd_iter of at least 0, but got -2");
  expect([] { lockstep::PeriodicModelAverager(nullptr, 1); }, "expected a process group");
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    expect([&] { lockstep::PeriodicModelAverager(pg, 0); },
           "expected a period of at least 1 step, but got 0");
    expect([&] { lockstep::PeriodicModelAverager(pg, 2, -1); },
           "expected warmup_steps of at least 0, but got -1");
    expect([&] { lockstep::PeriodicModelAverager(pg, 1).average_parameters({Tensor()}); },
           "expected defined parameters");
    auto only_zero = lockstep::new_group(*pg, {0});
    if (pg->rank() == 1) {
      expect([&] {
        lockstep::post_local_sgd_hook(lockstep::PostLocalSGDOptions().subgroup(only_zero));
      }, "expected a subgroup this rank belongs to");
    }
    // A bucket without per-parameter views (not built by DDP) cannot be compressed.
    auto hook = lockstep::powersgd_hook(PowerSGDOptions().start_powersgd_iter(0));
    GradBucket bare;
    bare.buffer = torch::zeros({10});
    bare.gradient_numel = 8;
    expect([&] { hook->reduce(*pg, bare); }, "expected one of each per parameter");
  });
}

}  // namespace
