// SyncBatchNorm (statistics over the process group, with its own autograd Function) and
// convert_sync_batchnorm (lockstep/sync_batch_norm.h).
#include "lockstep/sync_batch_norm.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>

#include <iomanip>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_set>
#include <utility>
#include <vector>

#include "lockstep/agreement.h"
#include "lockstep/errors.h"

namespace lockstep {

using detail::concat;

// Note [SyncBatchNorm protocol]
// Training forward, on every rank (C channels, n local values per channel):
//   1. The first synchronized forward of a layer compares the layer's options across ranks
//      (check_config_agreement: one 1-element all-gather when they agree), so that the
//      all-reduces below have the same size everywhere and a mismatch is an error naming the
//      ranks, not a hang or a garbled sum.
//   2. Each rank packs [sum_i x_ic (C), sum_i x_ic^2 (C), n] in float64 and the group
//      all-reduces it (sum): 2C+1 values. The local sums come from the rank's own mean and
//      biased variance (ATen's batch-norm statistics kernel), as n*mean and n*(var + mean^2).
//      A rank whose input is invalid (wrong channel count, fewer than 2 dimensions, not
//      floating point) still takes part, contributing zeros and kFailedRank in the count
//      slot; a negative total then tells every rank to exchange the errors
//      (raise_if_any_rank_failed) and throw the same InvalidArgument naming the failing
//      ranks, instead of leaving the valid ranks waiting for a collective that never comes.
//   3. From the totals S1, S2, N: mean = S1/N, var = S2/N - mean^2 (clamped at 0), the
//      running statistics move towards mean and var*N/(N-1) (the unbiased variance over the
//      whole group, as PyTorch), and y = (x - mean) * invstd * weight + bias. N <= 1 is an
//      InvalidArgument on every rank (they all see the same N).
// Backward: each rank sums dy and dy*(x - mean) per channel (ATen's kernel), the
// group all-reduces these 2C values (only when the input needs a gradient, as PyTorch, so
// every rank decides alike), and
//   dx = (dy - sum_dy/N - (x - mean) * invstd^2 * sum_dy_xmu/N) * invstd * weight.
// The weight and bias gradients (sum_dy_xmu * invstd, sum_dy) stay rank-local: summed over
// the ranks they are the concatenated batch's gradients, and DDP averages them like any
// other parameter's. A rank with an empty batch contributes zeros to both all-reduces and
// gets an empty output and input gradient.
// The cancellation in S2/N - mean^2 costs float64 precision in proportion to
// (mean^2 + var) / var: for inputs whose mean is 1e4 standard deviations from zero the
// variance keeps ~8 significant digits, still beyond float32's.

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Contributed in the count slot by a rank whose input is invalid: exactly representable,
// larger than any real count, so the total is negative iff some rank failed.
constexpr double kFailedRank = 1e18;

struct GroupCapsule : torch::CustomClassHolder {
  explicit GroupCapsule(ProcessGroupPtr g) : group(std::move(g)) {}
  ProcessGroupPtr group;
};

// {1, C, 1, ...}: a per-channel vector broadcast over a `dim`-dimensional input.
std::vector<int64_t> channel_shape(int64_t c, int64_t dim) {
  std::vector<int64_t> s(static_cast<size_t>(dim), 1);
  s[1] = c;
  return s;
}

// Values per channel in `input` (N * spatial), for an input with at least 2 dimensions.
int64_t values_per_channel(const at::Tensor& input) {
  return input.size(1) == 0 ? 0 : input.numel() / input.size(1);
}

// "" for a valid input, else what is wrong with it.
std::string input_error(const at::Tensor& input, int64_t num_features) {
  if (!input.defined()) return "expected an input tensor, but got an undefined one";
  if (input.dim() < 2) {
    return concat("expected an input with at least 2 dimensions (N, C, ...), but got shape ",
                  input.sizes(), "; give a single sample a batch dimension of 1");
  }
  if (input.size(1) != num_features) {
    return concat("expected ", num_features, " channels (dimension 1 of the input), but got ",
                  input.size(1), " (input shape ", input.sizes(),
                  "); the layer was built with num_features ", num_features);
  }
  if (!at::isFloatingType(input.scalar_type())) {
    return concat("expected a floating-point input, but got ", input.scalar_type());
  }
  return "";
}

std::string layer_label(const ProcessGroup& group, int64_t num_features) {
  return concat(group.where(), " SyncBatchNorm(", num_features, ")");
}

// Note [SyncBatchNorm protocol].
struct SyncBatchNormFunction : torch::autograd::Function<SyncBatchNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, int64_t num_features,
                            double eps, double momentum, const ProcessGroupPtr& group) {
    const int64_t c = num_features;
    const std::string local_error = input_error(input, c);
    auto stats = at::zeros({2 * c + 1}, at::TensorOptions().dtype(at::kDouble).device(
                                            input.defined() ? input.device() : at::kCPU));
    at::Tensor x;
    int64_t count = 0;
    if (local_error.empty()) {
      x = input.contiguous();
      count = values_per_channel(x);
      if (count > 0) {
        // ATen's batch-norm statistics kernel (accumulating in double for float inputs);
        // without running statistics it only computes the mean and the biased variance.
        at::Tensor var, mean;
        std::tie(mean, var) = at::batch_norm_update_stats(x, c10::nullopt, c10::nullopt, 0.0);
        var = var.to(at::kDouble);
        mean = mean.to(at::kDouble);
        stats.narrow(0, 0, c).copy_(mean * static_cast<double>(count));
        stats.narrow(0, c, c).copy_((var + mean * mean) * static_cast<double>(count));
      }
      stats[2 * c].fill_(static_cast<double>(count));
    } else {
      stats[2 * c].fill_(-kFailedRank);
    }
    group->allreduce(stats, ReduceOp::kSum)->wait();
    const double total = stats[2 * c].item<double>();
    if (total < 0) {
      try {
        raise_if_any_rank_failed(*group, local_error, concat("SyncBatchNorm(", c, ") forward"));
      } catch (const Error& e) {
        throw InvalidArgument(e.what());
      }
      LOCKSTEP_ASSERT(false, "a negative count, but no rank reported an error");
    }
    LOCKSTEP_CHECK(total > 1, layer_label(*group, c),
                   ": expected more than 1 value per channel over the group in training mode, "
                   "but got ", static_cast<int64_t>(total), " (this rank's input has shape ",
                   x.sizes(), "). Train with larger batches, or use eval mode.");

    auto mean = stats.narrow(0, 0, c) / total;
    auto var = (stats.narrow(0, c, c) / total - mean * mean).clamp_min(0.0);
    auto invstd = (var + eps).rsqrt();
    if (running_mean && running_mean->defined()) {
      running_mean->copy_(running_mean->to(at::kDouble) * (1.0 - momentum) + mean * momentum);
    }
    if (running_var && running_var->defined()) {
      auto unbiased = var * (total / (total - 1.0));
      running_var->copy_(running_var->to(at::kDouble) * (1.0 - momentum) + unbiased * momentum);
    }

    // The normalization itself is ATen's eval-mode batch norm with the group's statistics.
    const bool affine = weight && weight->defined();
    const auto dtype = x.scalar_type();
    auto y = at::batch_norm(x, affine ? *weight : at::Tensor(), affine ? *bias : at::Tensor(),
                            mean.to(dtype), var.to(dtype), /*training=*/false, 0.0, eps,
                            /*cudnn_enabled=*/false);

    ctx->save_for_backward({x, affine ? *weight : at::Tensor(), mean, invstd});
    ctx->saved_data["total"] = total;
    ctx->saved_data["affine"] = affine;
    ctx->saved_data["group"] = c10::IValue::make_capsule(c10::make_intrusive<GroupCapsule>(group));
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& mean = saved[2];
    const at::Tensor& invstd = saved[3];
    const double total = ctx->saved_data["total"].toDouble();
    const bool affine = ctx->saved_data["affine"].toBool();
    const auto capsule = ctx->saved_data["group"].toCapsule();
    const ProcessGroupPtr group = static_cast<GroupCapsule*>(capsule.get())->group;

    const int64_t c = x.size(1);
    const auto shape = channel_shape(c, x.dim());
    const auto dtype = x.scalar_type();
    const auto mean_x = mean.to(dtype);
    auto dy = grad_outputs[0].contiguous();

    // sum_dy and sum_dy_xmu over this rank's values: ATen's training backward kernel computes
    // them (accumulating in double for float inputs) as the bias gradient and the weight
    // gradient, sum(dy * (x - mean)) * invstd, given the group's mean and invstd.
    at::Tensor sum_dy, sum_dy_xmu;
    if (values_per_channel(x) > 0) {
      auto grads = at::native_batch_norm_backward(
          dy, x, affine ? weight : at::ones({c}, x.options()), at::Tensor(), at::Tensor(),
          mean_x, invstd.to(dtype), /*train=*/true, /*eps=*/0.0, {false, true, true});
      sum_dy = std::get<2>(grads).to(at::kDouble);
      sum_dy_xmu = std::get<1>(grads).to(at::kDouble) / invstd;
    } else {
      sum_dy = at::zeros({c}, mean.options());
      sum_dy_xmu = at::zeros({c}, mean.options());
    }

    // The autograd edges are the defined tensor inputs: input, then weight and bias when
    // affine (then the running statistics, which need no gradient).
    at::Tensor grad_input, grad_weight, grad_bias;
    if (affine && ctx->needs_input_grad(1)) {
      grad_weight = (sum_dy_xmu * invstd).to(weight.scalar_type());
    }
    if (affine && ctx->needs_input_grad(2)) grad_bias = sum_dy.to(weight.scalar_type());
    if (ctx->needs_input_grad(0)) {
      auto sums = at::cat({sum_dy, sum_dy_xmu});
      group->allreduce(sums, ReduceOp::kSum)->wait();
      auto mean_dy = sums.narrow(0, 0, c) / total;
      auto k = sums.narrow(0, c, c) / total * invstd * invstd;
      auto gain = affine ? invstd * weight.to(at::kDouble) : invstd;
      // (dy - mean_dy - (x - mean) * k) * gain, in one buffer.
      grad_input = x - mean_x.view(shape);
      grad_input.mul_(k.to(dtype).view(shape))
          .neg_()
          .add_(dy)
          .sub_(mean_dy.to(dtype).view(shape))
          .mul_(gain.to(dtype).view(shape));
    }
    // One entry per forward argument: input, weight, bias, running_mean, running_var,
    // num_features, eps, momentum, group.
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::string format_double(double v) {
  std::ostringstream os;
  os << std::setprecision(17) << v;
  return os.str();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// SyncBatchNormImpl

SyncBatchNormOptions::SyncBatchNormOptions(int64_t num_features, ProcessGroupPtr process_group)
    : num_features_(num_features), process_group_(std::move(process_group)) {}

SyncBatchNormImpl::SyncBatchNormImpl(SyncBatchNormOptions options_)
    : SyncBatchNormImpl(std::move(options_), Adopted()) {}

SyncBatchNormImpl::SyncBatchNormImpl(SyncBatchNormOptions options_, Adopted adopted)
    : options(std::move(options_)), adopted_(std::move(adopted)) {
  check_options();
  reset();
}

void SyncBatchNormImpl::check_options() const {
  LOCKSTEP_CHECK(options.num_features() > 0,
                 "SyncBatchNorm: expected num_features > 0, but got ", options.num_features());
  LOCKSTEP_CHECK(options.eps() >= 0, "SyncBatchNorm(", options.num_features(),
                 "): expected eps >= 0, but got ", options.eps());
  LOCKSTEP_CHECK(options.process_group() != nullptr, "SyncBatchNorm(", options.num_features(),
                 "): expected a process group, but got a null one. Pass the group the "
                 "statistics are shared over (SyncBatchNormOptions(C, pg), or "
                 "convert_sync_batchnorm(module, pg)); a single process can use "
                 "lockstep::new_thread_groups(1)[0].");
}

void SyncBatchNormImpl::reset() {
  const int64_t c = options.num_features();
  Adopted a = std::move(adopted_);
  adopted_ = Adopted();
  if (options.affine()) {
    weight = register_parameter("weight", a.pending ? a.weight : at::ones({c}),
                                a.pending ? a.weight.requires_grad() : true);
    bias = register_parameter("bias", a.pending ? a.bias : at::zeros({c}),
                              a.pending ? a.bias.requires_grad() : true);
  } else {
    weight = register_parameter("weight", at::Tensor(), /*requires_grad=*/false);
    bias = register_parameter("bias", at::Tensor(), /*requires_grad=*/false);
  }
  if (options.track_running_stats()) {
    running_mean = register_buffer("running_mean", a.pending ? a.running_mean : at::zeros({c}));
    running_var = register_buffer("running_var", a.pending ? a.running_var : at::ones({c}));
    num_batches_tracked = register_buffer(
        "num_batches_tracked",
        a.pending ? a.num_batches_tracked : at::zeros({}, at::TensorOptions().dtype(at::kLong)));
  } else {
    running_mean = register_buffer("running_mean", at::Tensor());
    running_var = register_buffer("running_var", at::Tensor());
    num_batches_tracked = register_buffer("num_batches_tracked", at::Tensor());
  }
}

void SyncBatchNormImpl::reset_running_stats() {
  if (!options.track_running_stats()) return;
  torch::NoGradGuard no_grad;
  running_mean.zero_();
  running_var.fill_(1);
  num_batches_tracked.zero_();
}

void SyncBatchNormImpl::reset_parameters() {
  reset_running_stats();
  if (!options.affine()) return;
  torch::NoGradGuard no_grad;
  weight.fill_(1);
  bias.zero_();
}

at::Tensor SyncBatchNormImpl::forward(const at::Tensor& input) {
  const auto& group = options.process_group();
  LOCKSTEP_CHECK(group != nullptr, "SyncBatchNorm(", options.num_features(),
                 "): the options' process group was reset to null; set it back to the group "
                 "the statistics are shared over");
  const int64_t c = options.num_features();

  // PyTorch's rules: batch statistics in training mode, and in eval mode when no running
  // statistics are kept; running statistics are updated only in training mode.
  const bool batch_stats = is_training() || !running_mean.defined();
  const bool sync = batch_stats && is_training() && group->size() > 1;
  if (!sync) {
    auto error = input_error(input, c);
    LOCKSTEP_CHECK(error.empty(), layer_label(*group, c), ": ", error, ".");
    LOCKSTEP_CHECK(!batch_stats || values_per_channel(input) > 1, layer_label(*group, c),
                   ": expected more than 1 value per channel when using batch statistics, but "
                   "got input shape ", input.sizes(), ". Use larger batches, or eval mode with "
                   "running statistics.");
  }

  double factor = options.momentum() ? *options.momentum() : 0.0;
  if (is_training() && num_batches_tracked.defined()) {
    torch::NoGradGuard no_grad;
    num_batches_tracked.add_(1);
    if (!options.momentum()) factor = 1.0 / num_batches_tracked.item<double>();
  }
  if (!sync) {
    return at::batch_norm(input, weight, bias, running_mean, running_var, batch_stats, factor,
                          options.eps(), /*cudnn_enabled=*/true);
  }

  if (!group_checked_) {
    // Step 1 of Note [SyncBatchNorm protocol].
    const std::map<std::string, std::string> config = {
        {"SyncBatchNorm.num_features", std::to_string(c)},
        {"SyncBatchNorm.eps", format_double(options.eps())},
        {"SyncBatchNorm.momentum",
         options.momentum() ? format_double(*options.momentum()) : "none (cumulative)"},
        {"SyncBatchNorm.affine", options.affine() ? "true" : "false"},
        {"SyncBatchNorm.track_running_stats", options.track_running_stats() ? "true" : "false"},
    };
    try {
      check_config_agreement(*group, config);
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(concat(
          layer_label(*group, c),
          ": the ranks built this layer differently, so their statistics cannot be combined; "
          "every rank must construct the same model (same layers in the same order). ",
          e.what()));
    }
    group_checked_ = true;
  }
  auto opt = [](const at::Tensor& t) {
    return t.defined() ? c10::optional<at::Tensor>(t) : c10::optional<at::Tensor>();
  };
  return SyncBatchNormFunction::apply(input, opt(weight), opt(bias), opt(running_mean),
                                      opt(running_var), c, options.eps(), factor, group);
}

void SyncBatchNormImpl::pretty_print(std::ostream& stream) const {
  stream << "lockstep::SyncBatchNorm(" << options.num_features() << ", eps=" << options.eps()
         << ", momentum=";
  if (options.momentum()) {
    stream << *options.momentum();
  } else {
    stream << "None";
  }
  stream << ", affine=" << (options.affine() ? "true" : "false")
         << ", track_running_stats=" << (options.track_running_stats() ? "true" : "false")
         << ", world_size=" << (options.process_group() ? options.process_group()->size() : 0)
         << ")";
}

// ---------------------------------------------------------------------------------------------
// convert_sync_batchnorm

struct SyncBatchNormAccess {
  static std::shared_ptr<SyncBatchNormImpl> make(SyncBatchNormOptions options,
                                                 SyncBatchNormImpl::Adopted adopted) {
    return std::shared_ptr<SyncBatchNormImpl>(
        new SyncBatchNormImpl(std::move(options), std::move(adopted)));
  }
  static SyncBatchNormImpl::Adopted adopted(const at::Tensor& weight, const at::Tensor& bias,
                                            const at::Tensor& running_mean,
                                            const at::Tensor& running_var,
                                            const at::Tensor& num_batches_tracked) {
    SyncBatchNormImpl::Adopted a;
    a.pending = true;
    a.weight = weight;
    a.bias = bias;
    a.running_mean = running_mean;
    a.running_var = running_var;
    a.num_batches_tracked = num_batches_tracked;
    return a;
  }
};

namespace {

template <typename BatchNorm>
std::shared_ptr<SyncBatchNormImpl> try_convert(torch::nn::Module* module,
                                               const ProcessGroupPtr& group) {
  auto* bn = dynamic_cast<BatchNorm*>(module);
  if (bn == nullptr) return nullptr;
  const auto& o = bn->options;
  auto options = SyncBatchNormOptions(o.num_features(), group)
                     .eps(o.eps())
                     .momentum(o.momentum())
                     .affine(o.affine())
                     .track_running_stats(o.track_running_stats());
  auto sync = SyncBatchNormAccess::make(
      options, SyncBatchNormAccess::adopted(bn->weight, bn->bias, bn->running_mean,
                                            bn->running_var, bn->num_batches_tracked));
  sync->train(bn->is_training());
  return sync;
}

// A SyncBatchNorm for `module` when it is a BatchNorm1d/2d/3d, else nullptr.
std::shared_ptr<SyncBatchNormImpl> convert_one(torch::nn::Module* module,
                                               const ProcessGroupPtr& group) {
  if (auto s = try_convert<torch::nn::BatchNorm1dImpl>(module, group)) return s;
  if (auto s = try_convert<torch::nn::BatchNorm2dImpl>(module, group)) return s;
  return try_convert<torch::nn::BatchNorm3dImpl>(module, group);
}

bool is_batch_norm(torch::nn::Module* m) {
  return dynamic_cast<torch::nn::BatchNorm1dImpl*>(m) != nullptr ||
         dynamic_cast<torch::nn::BatchNorm2dImpl*>(m) != nullptr ||
         dynamic_cast<torch::nn::BatchNorm3dImpl*>(m) != nullptr;
}

// Where the tree registers a BatchNorm layer.
struct Location {
  torch::nn::Module* parent;
  std::string name;   // the child's name in parent
  std::string path;   // dotted path from the root
  torch::nn::Module* layer;
};

void collect(torch::nn::Module& module, const std::string& prefix, std::vector<Location>& out,
             std::unordered_set<torch::nn::Module*>& visited) {
  for (const auto& item : module.named_children()) {
    torch::nn::Module* child = item.value().get();
    const std::string path = prefix.empty() ? item.key() : prefix + "." + item.key();
    if (is_batch_norm(child)) {
      out.push_back({&module, item.key(), path, child});
    } else if (visited.insert(child).second) {
      collect(*child, path, out, visited);
    }
  }
}

// Visits the element slots of the container `parent` (Sequential, ModuleList, ModuleDict)
// that hold `layer`: these containers run and iterate their own element lists, not the
// registered children, so each such slot is a reference replace_module does not move.
// `replacement` non-null: the slots are pointed at it. Returns the number of slots.
int container_slots(torch::nn::Module* parent, torch::nn::Module* layer,
                    const std::shared_ptr<SyncBatchNormImpl>& replacement) {
  int n = 0;
  if (auto* seq = dynamic_cast<torch::nn::SequentialImpl*>(parent)) {
    for (auto& any : *seq) {
      if (any.ptr().get() != layer) continue;
      ++n;
      if (replacement) any = torch::nn::AnyModule(replacement);
    }
  } else if (auto* list = dynamic_cast<torch::nn::ModuleListImpl*>(parent)) {
    for (auto& element : *list) {
      if (element.get() != layer) continue;
      ++n;
      if (replacement) element = replacement;
    }
  } else if (auto* dict = dynamic_cast<torch::nn::ModuleDictImpl*>(parent)) {
    for (auto& item : *dict) {
      if (item.value().get() != layer) continue;
      ++n;
      if (replacement) item.value() = replacement;
    }
  }
  return n;
}

}  // namespace

std::shared_ptr<torch::nn::Module> convert_sync_batchnorm(std::shared_ptr<torch::nn::Module> module,
                                                          ProcessGroupPtr group) {
  LOCKSTEP_CHECK(module != nullptr,
                 "convert_sync_batchnorm: expected a module, but got a null pointer");
  LOCKSTEP_CHECK(group != nullptr,
                 "convert_sync_batchnorm: expected a process group, but got a null one; pass "
                 "the group the BatchNorm statistics are to be shared over");
  if (auto sync = convert_one(module.get(), group)) return sync;

  std::vector<Location> locations;
  std::unordered_set<torch::nn::Module*> visited{module.get()};
  collect(*module, "", locations, visited);

  // Every reference to a layer must come from the tree: one per registration, one per
  // container slot. Anything more (a member holder of its parent, a variable of the caller)
  // would keep running the old layer after the swap. Checked before anything changes.
  std::vector<torch::nn::Module*> layers;  // in tree order
  std::map<torch::nn::Module*, std::vector<const Location*>> by_layer;
  for (const auto& loc : locations) {
    auto& at = by_layer[loc.layer];
    if (at.empty()) layers.push_back(loc.layer);
    at.push_back(&loc);
  }
  std::ostringstream outside;
  int outside_count = 0;
  for (torch::nn::Module* layer : layers) {
    long expected = 1;  // `self` below
    std::set<torch::nn::Module*> parents;
    for (const Location* loc : by_layer[layer]) {
      ++expected;
      if (parents.insert(loc->parent).second) {
        expected += container_slots(loc->parent, layer, nullptr);
      }
    }
    auto self = layer->shared_from_this();
    const long found = self.use_count();
    if (found > expected) {
      outside << (outside_count++ ? ", " : "") << "'" << by_layer[layer].front()->path << "' ("
              << (found - expected) << " outside reference" << (found - expected > 1 ? "s" : "")
              << ")";
    }
  }
  LOCKSTEP_CHECK(
      outside_count == 0,
      "convert_sync_batchnorm: the BatchNorm layer(s) ", outside.str(),
      " are also held outside the module tree, typically by a member such as "
      "`torch::nn::BatchNorm2d bn` that the parent's forward() calls. A C++ member cannot be "
      "redirected, so forward() would keep running the old, unsynchronized layer. Build that "
      "module with lockstep::SyncBatchNorm instead, keep its normalization layers in a "
      "Sequential, ModuleList or ModuleDict, or drop the other references before converting. "
      "Nothing was changed.");

  std::map<torch::nn::Module*, std::shared_ptr<SyncBatchNormImpl>> made;
  for (const auto& loc : locations) {
    auto& sync = made[loc.layer];
    if (!sync) sync = convert_one(loc.layer, group);
    container_slots(loc.parent, loc.layer, sync);
    loc.parent->replace_module(loc.name, sync);
  }
  return module;
}

}  // namespace lockstep
