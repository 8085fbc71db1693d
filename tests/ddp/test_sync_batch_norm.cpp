// SyncBatchNorm with ranks as threads: forward output, input gradient, weight/bias gradients
// and running statistics equal torch::nn::BatchNorm on the concatenated batch in one process
// (world sizes 1-4, uneven and empty per-rank batches, float32 and float64, (N,C), (N,C,L),
// 2d and 3d); the collectives it runs (one all-reduce of 2C+1 values forward, 2C backward,
// none in eval mode); convert_sync_batchnorm on containers and custom modules; parity under
// DistributedDataParallel; every error message.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "lockstep/ddp.h"
#include "lockstep/errors.h"
#include "lockstep/sync_batch_norm.h"
#include "lockstep/thread_group.h"
#include "support/threads.h"

namespace {

namespace nn = torch::nn;
using lockstep::ProcessGroupPtr;
using lockstep::SyncBatchNorm;
using lockstep::SyncBatchNormImpl;
using lockstep::SyncBatchNormOptions;
using lockstep_test::run_ranks;
using torch::Tensor;

constexpr int64_t kC = 3;  // channels

std::vector<ProcessGroupPtr> thread_groups(int world) {
  return lockstep::new_thread_groups(
      world, lockstep::ThreadGroupOptions().timeout(std::chrono::seconds(20)));
}

// Runs fn(group) on one thread per rank over fresh thread groups.
void with_thread_groups(int world, const std::function<void(const ProcessGroupPtr&)>& fn) {
  auto groups = thread_groups(world);
  run_ranks(world, [&](int r) { fn(groups[r]); });
}

double rel_diff(const Tensor& a, const Tensor& b) {
  auto denom = std::max(b.to(torch::kDouble).norm().item<double>(), 1e-30);
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).norm().item<double>() / denom;
}

#define EXPECT_CLOSE(got, want, tol, what)                                              \
  do {                                                                                  \
    ASSERT_TRUE((got).defined()) << (what);                                             \
    ASSERT_EQ((got).sizes(), (want).sizes()) << (what);                                 \
    EXPECT_LE(rel_diff((got), (want)), (tol)) << (what);                                \
  } while (false)

// A ProcessGroup that forwards to another and records the collectives it was asked for.
class CountingGroup : public lockstep::ProcessGroup {
 public:
  explicit CountingGroup(ProcessGroupPtr inner)
      : ProcessGroup(inner->rank(), inner->size(), inner->timeout(), inner->store()),
        inner_(std::move(inner)) {}
  std::string backend() const override { return "counting"; }
  lockstep::WorkPtr allreduce(at::Tensor& t, lockstep::ReduceOp op) override {
    record("allreduce " + std::to_string(t.numel()));
    return inner_->allreduce(t, op);
  }
  lockstep::WorkPtr broadcast(at::Tensor& t, int root) override {
    record("broadcast " + std::to_string(t.numel()));
    return inner_->broadcast(t, root);
  }
  lockstep::WorkPtr allgather(std::vector<at::Tensor>& out, const at::Tensor& in) override {
    record("allgather " + std::to_string(in.numel()));
    return inner_->allgather(out, in);
  }
  lockstep::WorkPtr barrier() override {
    record("barrier");
    return inner_->barrier();
  }
  std::vector<std::string> take() {
    std::lock_guard<std::mutex> lock(mu_);
    auto out = std::move(calls_);
    calls_.clear();
    return out;
  }

 private:
  void record(std::string call) {
    std::lock_guard<std::mutex> lock(mu_);
    calls_.push_back(std::move(call));
  }
  ProcessGroupPtr inner_;
  std::mutex mu_;
  std::vector<std::string> calls_;
};

// ---------------------------------------------------------------------------------------------
// The reference: torch's own BatchNorm of the input's dimensionality, one process.

struct RefResult {
  std::vector<Tensor> outputs, input_grads;  // per step
  Tensor weight_grad, bias_grad;             // summed over steps
  Tensor running_mean, running_var, num_batches_tracked;
};

template <typename BN>
RefResult run_reference(const std::vector<Tensor>& xs, const std::vector<Tensor>& gs,
                        const nn::BatchNormOptions& options, const Tensor& weight,
                        const Tensor& bias, torch::Dtype dtype) {
  BN bn(options);
  bn->to(dtype);
  if (options.affine()) {
    torch::NoGradGuard g;
    bn->weight.copy_(weight);
    bn->bias.copy_(bias);
  }
  RefResult r;
  for (size_t s = 0; s < xs.size(); ++s) {
    auto x = xs[s].clone().requires_grad_(true);
    auto y = bn(x);
    (y * gs[s]).sum().backward();
    r.outputs.push_back(y.detach());
    r.input_grads.push_back(x.grad());
  }
  if (options.affine()) {
    r.weight_grad = bn->weight.grad();
    r.bias_grad = bn->bias.grad();
  }
  r.running_mean = bn->running_mean;
  r.running_var = bn->running_var;
  r.num_batches_tracked = bn->num_batches_tracked;
  return r;
}

RefResult reference(const std::vector<Tensor>& xs, const std::vector<Tensor>& gs,
                    const nn::BatchNormOptions& options, const Tensor& weight, const Tensor& bias,
                    torch::Dtype dtype) {
  switch (xs[0].dim()) {
    case 2:
    case 3: return run_reference<nn::BatchNorm1d>(xs, gs, options, weight, bias, dtype);
    case 4: return run_reference<nn::BatchNorm2d>(xs, gs, options, weight, bias, dtype);
    default: return run_reference<nn::BatchNorm3d>(xs, gs, options, weight, bias, dtype);
  }
}

// ---------------------------------------------------------------------------------------------
// Parity with BatchNorm on the concatenated batch

struct ParityCase {
  std::vector<int64_t> batches;      // per rank; the world size is its length
  std::vector<int64_t> spatial;      // {}, {L}, {H, W}, {D, H, W}
  torch::Dtype dtype;
  nn::BatchNormOptions options = nn::BatchNormOptions(kC);
  double input_grad_tol = 0;  // 0: the dtype's tolerance
};

std::string describe(const ParityCase& c) {
  std::string s = "batches";
  for (auto b : c.batches) s += " " + std::to_string(b);
  s += ", spatial dims " + std::to_string(c.spatial.size());
  s += c.dtype == torch::kDouble ? ", float64" : ", float32";
  s += c.options.affine() ? "" : ", affine off";
  s += c.options.track_running_stats() ? "" : ", no running stats";
  s += c.options.momentum() ? "" : ", cumulative momentum";
  return s;
}

// Two training steps on fresh data: each rank normalizes its slice of the concatenated batch,
// backpropagates (y * g).sum() for its slice of a fixed g.
void check_parity(const ParityCase& c) {
  SCOPED_TRACE(describe(c));
  const int world = static_cast<int>(c.batches.size());
  const int64_t total = std::accumulate(c.batches.begin(), c.batches.end(), int64_t{0});
  const double tol = c.dtype == torch::kDouble ? 1e-10 : 2e-5;
  constexpr int kSteps = 2;
  std::vector<int64_t> shape = {total, kC};
  shape.insert(shape.end(), c.spatial.begin(), c.spatial.end());
  std::vector<Tensor> xs, gs;
  // Channel means away from zero and spreads other than one, so that both matter.
  auto offset = torch::tensor({0.7, -2.0, 5.0}, torch::kDouble);
  auto spread = torch::tensor({1.5, 0.3, 2.0}, torch::kDouble);
  std::vector<int64_t> bshape(shape.size(), 1);
  bshape[1] = kC;
  for (int s = 0; s < kSteps; ++s) {
    xs.push_back((torch::randn(shape, torch::kDouble) * spread.view(bshape) +
                  offset.view(bshape)).to(c.dtype));
    gs.push_back(torch::randn(shape, torch::kDouble).to(c.dtype));
  }
  auto weight = (torch::rand({kC}, torch::kDouble) + 0.5).to(c.dtype);
  auto bias = torch::randn({kC}, torch::kDouble).to(c.dtype);
  auto ref = reference(xs, gs, c.options, weight, bias, c.dtype);

  std::vector<std::vector<Tensor>> outputs(world), input_grads(world);
  std::vector<Tensor> weight_grads(world), bias_grads(world), means(world), vars(world),
      tracked(world);
  std::vector<int64_t> offsets(world, 0);
  for (int r = 1; r < world; ++r) offsets[r] = offsets[r - 1] + c.batches[r - 1];
  with_thread_groups(world, [&](const ProcessGroupPtr& pg) {
    const int r = pg->rank();
    SyncBatchNorm bn(SyncBatchNormOptions(kC, pg)
                         .eps(c.options.eps())
                         .momentum(c.options.momentum())
                         .affine(c.options.affine())
                         .track_running_stats(c.options.track_running_stats()));
    bn->to(c.dtype);
    if (c.options.affine()) {
      torch::NoGradGuard g;
      bn->weight.copy_(weight);
      bn->bias.copy_(bias);
    }
    for (int s = 0; s < kSteps; ++s) {
      auto x = xs[s].narrow(0, offsets[r], c.batches[r]).clone().requires_grad_(true);
      auto y = bn(x);
      (y * gs[s].narrow(0, offsets[r], c.batches[r])).sum().backward();
      outputs[r].push_back(y.detach());
      input_grads[r].push_back(x.grad());
    }
    if (c.options.affine()) {
      weight_grads[r] = bn->weight.grad();
      bias_grads[r] = bn->bias.grad();
    }
    means[r] = bn->running_mean;
    vars[r] = bn->running_var;
    tracked[r] = bn->num_batches_tracked;
  });
  if (::testing::Test::HasFailure()) return;

  for (int s = 0; s < kSteps; ++s) {
    std::vector<Tensor> ys, dxs;
    for (int r = 0; r < world; ++r) {
      ys.push_back(outputs[r][s]);
      dxs.push_back(input_grads[r][s]);
    }
    EXPECT_CLOSE(torch::cat(ys), ref.outputs[s], tol, "output, step " + std::to_string(s));
    EXPECT_CLOSE(torch::cat(dxs), ref.input_grads[s], c.input_grad_tol > 0 ? c.input_grad_tol : tol,
                 "input gradient, step " + std::to_string(s));
  }
  if (c.options.affine()) {
    // Rank-local, as PyTorch's: the sum over ranks is the concatenated batch's gradient.
    Tensor wsum = torch::zeros_like(weight_grads[0]), bsum = torch::zeros_like(bias_grads[0]);
    for (int r = 0; r < world; ++r) {
      wsum += weight_grads[r];
      bsum += bias_grads[r];
    }
    EXPECT_CLOSE(wsum, ref.weight_grad, tol, "weight gradient summed over ranks");
    EXPECT_CLOSE(bsum, ref.bias_grad, tol, "bias gradient summed over ranks");
  }
  for (int r = 0; r < world; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    if (c.options.track_running_stats()) {
      EXPECT_CLOSE(means[r], ref.running_mean, tol, "running_mean");
      EXPECT_CLOSE(vars[r], ref.running_var, tol, "running_var");
      EXPECT_EQ(tracked[r].item<int64_t>(), ref.num_batches_tracked.item<int64_t>());
      EXPECT_EQ(tracked[r].item<int64_t>(), kSteps);
    } else {
      EXPECT_FALSE(means[r].defined());
      EXPECT_FALSE(vars[r].defined());
    }
  }
}

class SyncBatchNormParity : public ::testing::TestWithParam<int> {};

// Every world size 1-4, float32 and float64, every input rank, uneven batches.
TEST_P(SyncBatchNormParity, EqualsBatchNormOnTheConcatenatedBatch) {
  const int world = GetParam();
  const std::vector<int64_t> uneven = {5, 2, 7, 3};
  const std::vector<std::vector<int64_t>> spatials = {{}, {4}, {3, 5}, {2, 3, 2}};
  torch::manual_seed(100 + world);
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    for (const auto& spatial : spatials) {
      ParityCase c;
      c.batches.assign(uneven.begin(), uneven.begin() + world);
      c.spatial = spatial;
      c.dtype = dtype;
      check_parity(c);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, SyncBatchNormParity, ::testing::Values(1, 2, 3, 4));

// A rank with an empty batch takes part in both all-reduces and gets empty results; one
// sample per rank (where a per-rank BatchNorm cannot train) is fine over the group.
TEST(SyncBatchNorm, EmptyAndSingleSampleBatches) {
  torch::manual_seed(7);
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    for (const auto& batches : std::vector<std::vector<int64_t>>{
             {3, 0, 4}, {0, 5}, {0, 0, 2, 0}, {1, 1}, {1, 1, 1, 1}, {2, 0}}) {
      ParityCase c;
      c.batches = batches;
      c.dtype = dtype;
      // Two values per channel normalize to -1 and +1 (up to eps), and the input gradient
      // is then pure cancellation, ~eps/var of its terms: float32 cannot compare it, float64
      // to 1e-8 (the reference is no more accurate).
      const int64_t total = std::accumulate(batches.begin(), batches.end(), int64_t{0});
      c.input_grad_tol = total == 2 ? 1e-8 : 0;
      if (dtype == torch::kDouble || total > 2) check_parity(c);
      c.input_grad_tol = 0;
      c.spatial = {2, 2};
      check_parity(c);
    }
  }
}

// The options PyTorch's BatchNorm has: no affine, no running statistics (batch statistics in
// training), the cumulative average, another eps.
TEST(SyncBatchNorm, OptionsMatchBatchNorm) {
  torch::manual_seed(8);
  std::vector<nn::BatchNormOptions> variants = {
      nn::BatchNormOptions(kC).affine(false),
      nn::BatchNormOptions(kC).track_running_stats(false),
      nn::BatchNormOptions(kC).momentum(c10::nullopt),
      nn::BatchNormOptions(kC).eps(0.25).momentum(0.5),
  };
  for (const auto& options : variants) {
    for (auto dtype : {torch::kFloat, torch::kDouble}) {
      ParityCase c;
      c.batches = {4, 1, 3};
      c.spatial = {5};
      c.dtype = dtype;
      c.options = options;
      check_parity(c);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// What it communicates

// Training: the first forward compares the ranks' layers (one all-gather of a hash), every
// forward all-reduces 2C+1 values and every backward 2C; a backward whose input needs no
// gradient communicates nothing. Eval mode: nothing, whether from the running statistics or
// (without them) from the rank's own batch, as PyTorch.
TEST(SyncBatchNorm, CollectivesPerStepAndNoneInEval) {
  constexpr int kWorld = 2;
  auto groups = thread_groups(kWorld);
  std::vector<std::vector<std::string>> first(kWorld), second(kWorld), frozen(kWorld),
      eval(kWorld), eval_untracked(kWorld);
  std::vector<Tensor> eval_out(kWorld), eval_in(kWorld), eval_untracked_out(kWorld),
      means(kWorld), vars(kWorld);
  run_ranks(kWorld, [&](int r) {
    auto counting = std::make_shared<CountingGroup>(groups[r]);
    SyncBatchNorm bn(SyncBatchNormOptions(kC, counting));
    SyncBatchNorm untracked(SyncBatchNormOptions(kC, counting).track_running_stats(false));
    auto x = torch::randn({4, kC, 5}).requires_grad_(true);
    bn(x).sum().backward();
    first[r] = counting->take();
    bn(x).sum().backward();
    second[r] = counting->take();
    bn(x.detach()).sum().backward();  // only the weight and bias need gradients
    frozen[r] = counting->take();
    untracked(x).sum().backward();
    counting->take();

    bn->eval();
    untracked->eval();
    // Only rank 1 evaluates, a different batch size: anything collective would time out.
    if (r == 1) {
      eval_in[r] = torch::randn({3, kC, 5}) * 2 + 1;
      eval_out[r] = bn(eval_in[r]);
      eval_untracked_out[r] = untracked(eval_in[r]);
    }
    eval[r] = counting->take();
    means[r] = bn->running_mean.clone();
    vars[r] = bn->running_var.clone();
  });
  const std::string fwd = "allreduce " + std::to_string(2 * kC + 1);
  const std::string bwd = "allreduce " + std::to_string(2 * kC);
  for (int r = 0; r < kWorld; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    EXPECT_EQ(first[r], (std::vector<std::string>{"allgather 1", fwd, bwd}));
    EXPECT_EQ(second[r], (std::vector<std::string>{fwd, bwd}));
    EXPECT_EQ(frozen[r], (std::vector<std::string>{fwd}));
    EXPECT_TRUE(eval[r].empty());
  }
  auto want = torch::batch_norm(eval_in[1], torch::ones({kC}), torch::zeros({kC}), means[1],
                                vars[1], /*training=*/false, 0.1, 1e-5, false);
  EXPECT_TRUE(torch::allclose(eval_out[1], want, 1e-5, 1e-6)) << "eval uses running statistics";
  auto local = torch::batch_norm(eval_in[1], torch::ones({kC}), torch::zeros({kC}), {}, {},
                                 /*training=*/true, 0.1, 1e-5, false);
  EXPECT_TRUE(torch::allclose(eval_untracked_out[1], local, 1e-5, 1e-6))
      << "eval without running statistics uses the rank's own batch";
}

// ---------------------------------------------------------------------------------------------
// convert_sync_batchnorm

// A block inside a Sequential that keeps its layers in a Sequential member (which the
// conversion changes in place, so the member stays valid).
struct InnerImpl : nn::Module {
  nn::Sequential seq{nullptr};
  InnerImpl() {
    seq = register_module(
        "seq", nn::Sequential(nn::Conv2d(nn::Conv2dOptions(4, 4, 1)), nn::BatchNorm2d(4)));
  }
  Tensor forward(Tensor x) { return seq->forward(x); }
};
TORCH_MODULE(Inner);

struct Blocks : nn::Module {
  nn::Sequential features{nullptr};
  nn::ModuleList norms{nullptr};
  nn::ModuleDict heads{nullptr};
  nn::Linear fc{nullptr};
  Blocks() {
    features = register_module(
        "features", nn::Sequential(nn::Conv2d(nn::Conv2dOptions(2, 4, 3)), nn::BatchNorm2d(4),
                                   nn::ReLU(),
                                   Inner()));
    norms = register_module("norms", nn::ModuleList(nn::BatchNorm1d(16)));
    std::vector<std::pair<std::string, std::shared_ptr<nn::Module>>> heads_items = {
        {"a", nn::BatchNorm1d(nn::BatchNorm1dOptions(16).affine(false)).ptr()}};
    heads = register_module("heads", nn::ModuleDict(heads_items));
    fc = register_module("fc", nn::Linear(16, 2));
  }
  // Reaches the normalization layers through the containers only.
  Tensor forward(Tensor x) {
    x = features->forward(x).flatten(1);                         // (N, 4*2*2)
    x = (*norms)[0]->as<SyncBatchNormImpl>()->forward(x);        // after conversion
    x = heads["a"]->as<SyncBatchNormImpl>()->forward(x);
    return fc(x);
  }
};

TEST(ConvertSyncBatchNorm, ReplacesLayersInContainersInPlace) {
  auto groups = thread_groups(1);
  auto net = std::make_shared<Blocks>();
  auto old_bn = std::dynamic_pointer_cast<nn::BatchNorm2dImpl>(net->features->ptr(1));
  ASSERT_TRUE(old_bn);
  {
    torch::NoGradGuard g;
    old_bn->weight.fill_(2);
    old_bn->running_mean.fill_(0.5);
    old_bn->num_batches_tracked.fill_(5);
  }
  old_bn->options.eps(1e-3).momentum(0.3);
  net->features->ptr(1)->eval();
  const auto* weight_impl = old_bn->weight.unsafeGetTensorImpl();
  const auto* mean_impl = old_bn->running_mean.unsafeGetTensorImpl();
  torch::optim::SGD opt(net->parameters(), 0.1);  // built before the conversion
  old_bn.reset();
  auto* features_before = net->features.get();

  auto result = lockstep::convert_sync_batchnorm(net, groups[0]);
  EXPECT_EQ(result.get(), net.get()) << "converted in place";
  EXPECT_EQ(net->features.get(), features_before) << "the Sequential itself is kept";

  auto bn = net->features->ptr<SyncBatchNormImpl>(1);
  ASSERT_TRUE(bn) << "Sequential element replaced";
  EXPECT_EQ(net->features->named_children()["1"].get(), bn.get()) << "registered child replaced";
  EXPECT_EQ(bn->weight.unsafeGetTensorImpl(), weight_impl) << "the same weight tensor";
  EXPECT_EQ(bn->running_mean.unsafeGetTensorImpl(), mean_impl) << "the same buffer";
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 5);
  EXPECT_DOUBLE_EQ(bn->options.eps(), 1e-3);
  EXPECT_DOUBLE_EQ(bn->options.momentum().value(), 0.3);
  EXPECT_FALSE(bn->is_training()) << "training mode carried over";
  EXPECT_EQ(bn->options.process_group(), groups[0]);
  auto listed = std::dynamic_pointer_cast<SyncBatchNormImpl>((*net->norms)[0]);
  ASSERT_TRUE(listed) << "ModuleList element replaced";
  EXPECT_EQ(net->norms->named_children()["0"].get(), listed.get());
  auto head = std::dynamic_pointer_cast<SyncBatchNormImpl>(net->heads["a"]);
  ASSERT_TRUE(head) << "ModuleDict element replaced";
  EXPECT_FALSE(head->options.affine());
  EXPECT_FALSE(head->weight.defined());
  int sync_layers = 0;
  for (const auto& m : net->modules()) {
    EXPECT_FALSE(m->as<nn::BatchNorm1d>() || m->as<nn::BatchNorm2d>() ||
                 m->as<nn::BatchNorm3d>())
        << "a BatchNorm is left: " << m->name();
    sync_layers += m->as<SyncBatchNorm>() != nullptr;
  }
  EXPECT_EQ(sync_layers, 4);
  // Parameter names are unchanged, so checkpoints of the old model load into the new one.
  EXPECT_TRUE(net->named_parameters().contains("features.1.weight"));
  EXPECT_TRUE(net->named_buffers().contains("features.1.num_batches_tracked"));

  // The converted model trains, and the optimizer built before the conversion moves it.
  net->train();
  auto before = bn->weight.clone();
  opt.zero_grad();
  net->forward(torch::randn({6, 2, 4, 4})).pow(2).sum().backward();
  opt.step();
  EXPECT_FALSE(torch::equal(before, bn->weight));
}

// The conversion's result runs the group's collectives: a 2-rank Sequential through the
// converted layer matches BatchNorm on the concatenated batch.
TEST(ConvertSyncBatchNorm, ConvertedSequentialSynchronizes) {
  torch::manual_seed(9);
  auto x = torch::randn({6, kC, 4}, torch::kDouble);
  auto ref_net = nn::Sequential(nn::BatchNorm1d(kC), nn::Tanh());
  ref_net->to(torch::kDouble);
  auto want = ref_net->forward(x);
  std::vector<Tensor> got(2);
  std::vector<std::vector<std::string>> calls(2);
  auto groups = thread_groups(2);
  run_ranks(2, [&](int r) {
    auto counting = std::make_shared<CountingGroup>(groups[r]);
    auto seq = nn::Sequential(nn::BatchNorm1d(kC), nn::Tanh());
    seq->to(torch::kDouble);
    auto converted = lockstep::convert_sync_batchnorm(seq.ptr(), counting);
    EXPECT_EQ(converted.get(), seq.get());
    got[r] = seq->forward(x.narrow(0, 3 * r, 3));
    calls[r] = counting->take();
  });
  EXPECT_CLOSE(torch::cat(got), want, 1e-12, "converted Sequential output");
  EXPECT_EQ(calls[0], (std::vector<std::string>{"allgather 1", "allreduce 7"}));
}

TEST(ConvertSyncBatchNorm, RootLayerAndSharedLayer) {
  auto pg = thread_groups(1)[0];
  // A BatchNorm at the root is replaced by a new layer, returned.
  auto root = nn::BatchNorm3d(nn::BatchNorm3dOptions(5).track_running_stats(false));
  auto converted = lockstep::convert_sync_batchnorm(root.ptr(), pg);
  auto sync = std::dynamic_pointer_cast<SyncBatchNormImpl>(converted);
  ASSERT_TRUE(sync);
  EXPECT_EQ(sync->options.num_features(), 5);
  EXPECT_FALSE(sync->running_mean.defined());
  EXPECT_EQ(sync->weight.unsafeGetTensorImpl(), root->weight.unsafeGetTensorImpl());

  // One layer registered twice becomes one SyncBatchNorm at both places.
  auto shared = nn::BatchNorm1d(4);
  auto seq = nn::Sequential(shared, nn::ReLU(), shared);
  shared = nullptr;
  lockstep::convert_sync_batchnorm(seq.ptr(), pg);
  auto a = seq->ptr<SyncBatchNormImpl>(0);
  auto b = seq->ptr<SyncBatchNormImpl>(2);
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a.get(), b.get());
}

// A custom module that keeps its BatchNorm in a member holder: the member cannot be
// redirected, so the conversion refuses, names the layer and changes nothing.
TEST(ConvertSyncBatchNorm, MemberHolderIsNamedAndNothingChanges) {
  struct WithMember : nn::Module {
    nn::Conv2d conv{nullptr};
    nn::BatchNorm2d bn{nullptr};
    WithMember() {
      conv = register_module("conv", nn::Conv2d(nn::Conv2dOptions(1, 2, 3)));
      bn = register_module("bn", nn::BatchNorm2d(2));
    }
    Tensor forward(Tensor x) { return bn(conv(x)); }
  };
  struct Outer : nn::Module {
    nn::Sequential body{nullptr};
    Outer() {
      body = register_module("body", nn::Sequential(nn::BatchNorm2d(1)));
      body->push_back("inner", std::make_shared<WithMember>());
      body->push_back("later", std::make_shared<WithMember>());
    }
  };
  auto pg = thread_groups(1)[0];
  auto net = std::make_shared<Outer>();
  try {
    lockstep::convert_sync_batchnorm(net, pg);
    FAIL() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("'body.inner.bn' (1 outside reference), 'body.later.bn' (1 outside "
                       "reference) are also held outside the module tree"),
              std::string::npos)
        << msg;
    EXPECT_NE(msg.find("member"), std::string::npos) << msg;
    EXPECT_NE(msg.find("Nothing was changed"), std::string::npos) << msg;
    EXPECT_EQ(msg.find("'body.0'"), std::string::npos) << "the Sequential's layer is fine: " << msg;
  }
  EXPECT_TRUE(net->body->ptr(0)->as<nn::BatchNorm2d>()) << "nothing converted";

  // A caller's own reference to a layer in a Sequential is an outside reference too.
  auto kept = nn::BatchNorm1d(3);
  auto seq = nn::Sequential(kept);
  EXPECT_THROW(lockstep::convert_sync_batchnorm(seq.ptr(), pg), lockstep::InvalidArgument);
  kept = nullptr;
  lockstep::convert_sync_batchnorm(seq.ptr(), pg);
  EXPECT_TRUE(seq->ptr<SyncBatchNormImpl>(0));
}

// The pattern docs/sync-batch-norm.md recommends for custom modules: choose the layer in the
// constructor and call it through an AnyModule.
struct FactoryBlock : nn::Module {
  nn::AnyModule norm;
  explicit FactoryBlock(ProcessGroupPtr pg) {
    norm = pg ? nn::AnyModule(SyncBatchNorm(SyncBatchNormOptions(16, pg)))
              : nn::AnyModule(nn::BatchNorm2d(16));
    register_module("bn", norm.ptr());
  }
  Tensor forward(Tensor x) { return norm.forward(x); }
};

TEST(ConvertSyncBatchNorm, DocumentedFactoryPattern) {
  torch::manual_seed(10);
  auto x = torch::randn({4, 16, 3, 3}, torch::kDouble);
  FactoryBlock plain(nullptr);
  plain.to(torch::kDouble);
  auto want = plain.forward(x);
  std::vector<Tensor> got(2);
  with_thread_groups(2, [&](const ProcessGroupPtr& pg) {
    FactoryBlock block(pg);
    block.to(torch::kDouble);
    EXPECT_TRUE(block.named_children()["bn"]->as<SyncBatchNorm>());
    got[pg->rank()] = block.forward(x.narrow(0, 2 * pg->rank(), 2));
  });
  EXPECT_CLOSE(torch::cat(got), want, 1e-12, "factory block output");
}

TEST(ConvertSyncBatchNorm, NullArguments) {
  auto pg = thread_groups(1)[0];
  try {
    lockstep::convert_sync_batchnorm(nullptr, pg);
    FAIL() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("expected a module, but got a null pointer"),
              std::string::npos)
        << e.what();
  }
  try {
    lockstep::convert_sync_batchnorm(nn::Sequential(nn::BatchNorm1d(2)).ptr(), nullptr);
    FAIL() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("expected a process group, but got a null one"),
              std::string::npos)
        << e.what();
  }
}

TEST(SyncBatchNorm, CloneAndPrint) {
  auto pg = thread_groups(1)[0];
  SyncBatchNorm bn(SyncBatchNormOptions(4, pg).momentum(c10::nullopt));
  {
    torch::NoGradGuard g;
    bn->weight.fill_(3);
  }
  auto copy = std::dynamic_pointer_cast<SyncBatchNormImpl>(bn->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(torch::equal(copy->weight, bn->weight));
  EXPECT_NE(copy->weight.unsafeGetTensorImpl(), bn->weight.unsafeGetTensorImpl());
  std::ostringstream os;
  os << *bn;
  EXPECT_EQ(os.str(),
            "lockstep::SyncBatchNorm(4, eps=1e-05, momentum=None, affine=true, "
            "track_running_stats=true, world_size=1)");
}

// ---------------------------------------------------------------------------------------------
// Under DistributedDataParallel

struct ConvNet : nn::Cloneable<ConvNet> {
  nn::Sequential body{nullptr};
  nn::Linear fc{nullptr};
  ConvNet() { reset(); }
  void reset() override {
    body = register_module(
        "body", nn::Sequential(nn::Conv2d(nn::Conv2dOptions(2, 4, 3)), nn::BatchNorm2d(4),
                               nn::ReLU(), nn::Conv2d(nn::Conv2dOptions(4, 4, 3)),
                               nn::BatchNorm2d(4)));
    fc = register_module("fc", nn::Linear(16, 3));
  }
  Tensor forward(Tensor x) { return fc(torch::relu(body->forward(x)).flatten(1)); }
};

// Ranks train the converted network under DDP on uneven shares of each batch, one rank's
// share possibly empty (over Gloo or shared memory); one process trains the BatchNorm network on the whole batch.
// Parameters and running statistics agree after 4 SGD steps (float64). Per-rank loss: its
// samples' squared errors scaled by world / total, so that DDP's average is the mean over
// the whole batch.
void check_ddp_parity(const std::string& transport, const std::vector<int64_t>& batches) {
  const int world = static_cast<int>(batches.size());
  SCOPED_TRACE(transport + ", world " + std::to_string(world) + ", rank 1's batch " +
               std::to_string(batches[1]));
  constexpr int kSteps = 4;
  const int64_t total = std::accumulate(batches.begin(), batches.end(), int64_t{0});
  torch::manual_seed(21 + world);
  auto init = std::make_shared<ConvNet>();
  init->to(torch::kDouble);
  std::vector<Tensor> xs, ys;
  for (int s = 0; s < kSteps; ++s) {
    xs.push_back(torch::randn({total, 2, 6, 6}, torch::kDouble) * 2 + 0.5);
    ys.push_back(torch::randn({total, 3}, torch::kDouble));
  }
  auto ref = std::dynamic_pointer_cast<ConvNet>(init->clone());
  torch::optim::SGD ref_opt(ref->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  for (int s = 0; s < kSteps; ++s) {
    ref_opt.zero_grad();
    torch::mse_loss(ref->forward(xs[s]), ys[s], at::Reduction::Sum).div(total).backward();
    ref_opt.step();
  }

  std::vector<std::vector<Tensor>> params(world), buffers(world);
  lockstep_test::with_groups(world, [&](const ProcessGroupPtr& pg) {
    const int r = pg->rank();
    int64_t offset = 0;
    for (int q = 0; q < r; ++q) offset += batches[q];
    auto net = std::dynamic_pointer_cast<ConvNet>(init->clone());
    lockstep::convert_sync_batchnorm(net, pg);
    ASSERT_TRUE(net->body->ptr<SyncBatchNormImpl>(1));
    lockstep::DistributedDataParallel ddp(net, pg);
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    for (int s = 0; s < kSteps; ++s) {
      opt.zero_grad();
      auto x = xs[s].narrow(0, offset, batches[r]);
      auto y = ys[s].narrow(0, offset, batches[r]);
      torch::mse_loss(ddp->forward(x), y, at::Reduction::Sum)
          .mul(static_cast<double>(world) / total)
          .backward();
      opt.step();
    }
    for (const auto& p : net->parameters()) params[r].push_back(p.detach().clone());
    for (const auto& b : net->buffers()) buffers[r].push_back(b.clone());
  }, lockstep::ProcessGroupOptions().transport(transport));
  if (::testing::Test::HasFailure()) return;
  auto want_params = ref->parameters();
  auto want_buffers = ref->buffers();
  for (int r = 0; r < world; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_EQ(params[r].size(), want_params.size());
    for (size_t i = 0; i < want_params.size(); ++i) {
      EXPECT_CLOSE(params[r][i], want_params[i], 1e-10, "parameter " + std::to_string(i));
    }
    ASSERT_EQ(buffers[r].size(), want_buffers.size());
    for (size_t i = 0; i < want_buffers.size(); ++i) {
      EXPECT_CLOSE(buffers[r][i], want_buffers[i], 1e-10, "buffer " + std::to_string(i));
    }
  }
}

TEST(SyncBatchNormDDP, ParityWithBatchNormOnTheConcatenatedBatch) {
  for (const std::string transport : {"gloo", "shm"}) {
    check_ddp_parity(transport, {5, 2});
    check_ddp_parity(transport, {3, 6, 1});
    check_ddp_parity(transport, {4, 0, 3});  // a rank out of data keeps stepping, empty
  }
}

// ---------------------------------------------------------------------------------------------
// Errors

// Runs fn on every rank and returns each rank's InvalidArgument message ("" if none thrown).
std::vector<std::string> invalid_argument_messages(
    int world, const std::function<void(const ProcessGroupPtr&)>& fn) {
  std::vector<std::string> messages(world);
  with_thread_groups(world, [&](const ProcessGroupPtr& pg) {
    try {
      fn(pg);
    } catch (const lockstep::InvalidArgument& e) {
      messages[pg->rank()] = e.what();
    }
  });
  return messages;
}

void expect_contains(const std::string& text, const std::vector<std::string>& parts) {
  for (const auto& p : parts) EXPECT_NE(text.find(p), std::string::npos) << "'" << p << "' in: " << text;
}

TEST(SyncBatchNormErrors, NullGroupAndBadOptions) {
  try {
    SyncBatchNorm bn(SyncBatchNormOptions(4));
    FAIL() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    expect_contains(e.what(), {"SyncBatchNorm(4): expected a process group, but got a null one",
                               "new_thread_groups(1)[0]"});
  }
  auto pg = thread_groups(1)[0];
  try {
    SyncBatchNorm bn(SyncBatchNormOptions(0, pg));
    FAIL() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    expect_contains(e.what(), {"expected num_features > 0, but got 0"});
  }
  try {
    SyncBatchNorm bn(SyncBatchNormOptions(2, pg).eps(-1));
    FAIL() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    expect_contains(e.what(), {"expected eps >= 0, but got -1"});
  }
  SyncBatchNorm bn(SyncBatchNormOptions(2, pg));
  bn->options.process_group(nullptr);
  try {
    bn(torch::randn({4, 2}));
    FAIL() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    expect_contains(e.what(), {"process group was reset to null"});
  }
}

// One rank's bad input fails every rank at once, naming that rank (no rank waits for the
// timeout).
TEST(SyncBatchNormErrors, BadInputOnOneRankFailsEveryRankNamingIt) {
  struct Bad {
    std::vector<int64_t> shape;
    torch::Dtype dtype;
    std::string expected;
  };
  const std::vector<Bad> bads = {
      {{kC}, torch::kFloat, "expected an input with at least 2 dimensions (N, C, ...), but got shape [3]"},
      {{4, kC + 1, 2}, torch::kFloat, "expected 3 channels (dimension 1 of the input), but got 4"},
      {{4, kC}, torch::kLong, "expected a floating-point input, but got Long"},
  };
  for (const auto& bad : bads) {
    auto messages = invalid_argument_messages(3, [&](const ProcessGroupPtr& pg) {
      SyncBatchNorm bn(SyncBatchNormOptions(kC, pg));
      auto x = pg->rank() == 1 ? torch::ones(bad.shape, bad.dtype) : torch::randn({4, kC, 2});
      bn(x);
    });
    for (int r = 0; r < 3; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      expect_contains(messages[r], {"SyncBatchNorm(3) forward failed", "rank 1: " + bad.expected});
      EXPECT_EQ(messages[r].find("rank 0:"), std::string::npos) << messages[r];
    }
  }
  // Without communication (one rank, eval mode) the same check is local.
  auto pg = thread_groups(1)[0];
  SyncBatchNorm bn(SyncBatchNormOptions(kC, pg));
  try {
    bn(torch::randn({4, kC + 2}));
    FAIL() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    expect_contains(e.what(), {"[rank 0/1] SyncBatchNorm(3): expected 3 channels", "got 5"});
  }
  bn->eval();
  EXPECT_THROW(bn(torch::randn({kC})), lockstep::InvalidArgument);
}

// Ranks that built the layer with different channel counts (or eps) fail at the first
// forward, naming the option and the ranks, before any all-reduce of mismatched sizes.
TEST(SyncBatchNormErrors, MismatchedLayersAcrossRanksAreNamed) {
  auto messages = invalid_argument_messages(3, [&](const ProcessGroupPtr& pg) {
    const int64_t c = pg->rank() == 2 ? 4 : 3;
    SyncBatchNorm bn(SyncBatchNormOptions(c, pg).eps(pg->rank() == 1 ? 1e-3 : 1e-5));
    bn(torch::randn({4, c}));
  });
  for (int r = 0; r < 3; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    expect_contains(messages[r], {"the ranks built this layer differently",
                                  "SyncBatchNorm.num_features: rank 0 has '3', rank 2 has '4'",
                                  "SyncBatchNorm.eps: rank 0 has '1.0000000000000001e-05', "
                                  "rank 1 has '0.001'"});
  }
}

// At most one value per channel over the whole group: every rank raises the same error.
TEST(SyncBatchNormErrors, OneValuePerChannelOverTheGroup) {
  auto messages = invalid_argument_messages(3, [&](const ProcessGroupPtr& pg) {
    SyncBatchNorm bn(SyncBatchNormOptions(kC, pg));
    bn(torch::randn({pg->rank() == 0 ? 1 : 0, kC}));
  });
  for (int r = 0; r < 3; ++r) {
    expect_contains(messages[r], {"expected more than 1 value per channel over the group in "
                                  "training mode, but got 1"});
  }
  auto pg = thread_groups(1)[0];
  SyncBatchNorm bn(SyncBatchNormOptions(kC, pg));
  try {
    bn(torch::randn({1, kC}));
    FAIL() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    expect_contains(e.what(), {"expected more than 1 value per channel when using batch "
                               "statistics, but got input shape [1, 3]"});
  }
  bn->eval();
  EXPECT_EQ(bn(torch::randn({1, kC})).sizes(), (std::vector<int64_t>{1, kC}))
      << "eval with running statistics accepts one sample";
}

// A rank that skips a training forward leaves the others waiting only until the group's
// timeout, which names the missing rank.
TEST(SyncBatchNormErrors, SkippedForwardTimesOut) {
  auto groups = lockstep::new_thread_groups(
      2, lockstep::ThreadGroupOptions().timeout(std::chrono::milliseconds(300)));
  std::string message;
  run_ranks(2, [&](int r) {
    SyncBatchNorm bn(SyncBatchNormOptions(kC, groups[r]));
    bn(torch::randn({4, kC}));  // together: the layers agree
    if (r == 1) return;         // rank 1 skips the second forward
    try {
      bn(torch::randn({4, kC}));
    } catch (const lockstep::TimeoutError& e) {
      message = e.what();
    }
  });
  expect_contains(message, {"[rank 0/2]", "timed out", "waiting for rank(s) 1"});
}

// A failing group's errors reach the caller of forward as lockstep errors.
TEST(SyncBatchNormErrors, GroupFailurePropagates) {
  auto groups = thread_groups(2);
  lockstep::abort_thread_groups(groups[0], "peer died");
  std::atomic<int> comm_errors{0};
  run_ranks(2, [&](int r) {
    SyncBatchNorm bn(SyncBatchNormOptions(kC, groups[r]));
    try {
      bn(torch::randn({4, kC}));
    } catch (const lockstep::CommError& e) {
      if (std::string(e.what()).find("peer died") != std::string::npos) ++comm_errors;
    }
  });
  EXPECT_EQ(comm_errors.load(), 2);
}

}  // namespace
