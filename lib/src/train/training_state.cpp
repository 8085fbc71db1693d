// Training state in a checkpoint: module parameters and buffers, optimizer state, RNG state.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/module.h>
#include <c10/util/Type.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/schedulers/lr_scheduler.h>
#include <torch/optim/sgd.h>

#include <cmath>
#include <deque>
#include <typeinfo>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "adapter/torch_adapter.h"
#include "lockstep/errors.h"
#include "lockstep/train/checkpoint.h"

namespace lockstep {
namespace train {

using detail::concat;
using nlohmann::json;

// Model, optimizer and RNG state

namespace {

std::map<std::string, at::Tensor> module_tensors(const torch::nn::Module& module) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) out[p.key()] = p.value();
  for (const auto& b : module.named_buffers(/*recurse=*/true)) out[b.key()] = b.value();
  return out;
}

void check_same(const std::string& what, const std::string& name, const at::Tensor& have,
                const at::Tensor& want, std::vector<std::string>& problems) {
  if (have.sizes() != want.sizes()) {
    problems.push_back(concat(what, " '", name, "': checkpoint has shape ", have.sizes(),
                              ", the model has ", want.sizes()));
  } else if (have.scalar_type() != want.scalar_type()) {
    problems.push_back(concat(what, " '", name, "': checkpoint has dtype ", have.scalar_type(),
                              ", the model has ", want.scalar_type()));
  }
}

[[noreturn]] void throw_problems(const std::string& what, const std::vector<std::string>& problems) {
  std::ostringstream os;
  os << what << ": the checkpoint does not match (nothing was loaded):";
  for (const auto& p : problems) os << "\n  " << p;
  os << "\nWas it written by another model or configuration?";
  throw InvalidArgument(os.str());
}

}  // namespace

void add_module(Checkpoint& checkpoint, const torch::nn::Module& module, const std::string& prefix) {
  for (const auto& kv : module_tensors(module)) {
    checkpoint.tensors[prefix + kv.first] = kv.second.detach().to(at::kCPU).clone();
  }
}

void load_module(const Checkpoint& checkpoint, torch::nn::Module& module, const std::string& prefix) {
  auto targets = module_tensors(module);
  std::vector<std::string> problems;
  for (const auto& kv : targets) {
    auto it = checkpoint.tensors.find(prefix + kv.first);
    if (it == checkpoint.tensors.end()) {
      problems.push_back(concat("missing key '", prefix + kv.first, "'"));
    } else {
      check_same("tensor", prefix + kv.first, it->second, kv.second, problems);
    }
  }
  for (auto it = checkpoint.tensors.lower_bound(prefix);
       it != checkpoint.tensors.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
    if (!targets.count(it->first.substr(prefix.size()))) {
      problems.push_back(concat("unexpected key '", it->first, "'"));
    }
  }
  if (!problems.empty()) throw_problems("load_module", problems);
  at::NoGradGuard no_grad;
  for (auto& kv : targets) kv.second.copy_(checkpoint.tensors.at(prefix + kv.first));
}

namespace {

// Note [Optimizer state in checkpoints]
// Each optimizer's state is stored the way Python's optimizer.state_dict() holds it: per
// parameter "<prefix><group>.<index>.<field>" tensors (moments, buffers, step counts as
// int64, LBFGS's real numbers as float64, its history as "old_dirs.<k>", "old_stps.<k>",
// "ro.<k>"), and per group every hyperparameter in the metadata "<prefix>groups" (plus
// "<prefix>lr", which older files hold alone). Loading restores the hyperparameters too, as
// Python's load_state_dict does. `state_fields` is the one schema both directions follow,
// and loading checks every tensor against it (shape, dtype, range) before changing anything.

enum class OptKind { kSGD, kAdam, kAdamW, kAdagrad, kRMSprop, kLBFGS };

OptKind optimizer_kind(torch::optim::Optimizer& optimizer) {
  if (dynamic_cast<torch::optim::SGD*>(&optimizer)) return OptKind::kSGD;
  if (dynamic_cast<torch::optim::AdamW*>(&optimizer)) return OptKind::kAdamW;
  if (dynamic_cast<torch::optim::Adam*>(&optimizer)) return OptKind::kAdam;
  if (dynamic_cast<torch::optim::Adagrad*>(&optimizer)) return OptKind::kAdagrad;
  if (dynamic_cast<torch::optim::RMSprop*>(&optimizer)) return OptKind::kRMSprop;
  if (dynamic_cast<torch::optim::LBFGS*>(&optimizer)) return OptKind::kLBFGS;
  throw InvalidArgument(concat(
      "checkpoints support the state of torch::optim's SGD, Adam, AdamW, Adagrad, RMSprop "
      "and LBFGS; got ", c10::demangle(typeid(optimizer).name()),
      ". Save its state yourself as named tensors in the Checkpoint."));
}

const char* kind_name(OptKind k) {
  switch (k) {
    case OptKind::kSGD: return "SGD";
    case OptKind::kAdam: return "Adam";
    case OptKind::kAdamW: return "AdamW";
    case OptKind::kAdagrad: return "Adagrad";
    case OptKind::kRMSprop: return "RMSprop";
    case OptKind::kLBFGS: return "LBFGS";
  }
  return "?";
}

double& group_lr(torch::optim::OptimizerParamGroup& g, OptKind kind) {
  using namespace torch::optim;
  switch (kind) {
    case OptKind::kSGD: return static_cast<SGDOptions&>(g.options()).lr();
    case OptKind::kAdam: return static_cast<AdamOptions&>(g.options()).lr();
    case OptKind::kAdamW: return static_cast<AdamWOptions&>(g.options()).lr();
    case OptKind::kAdagrad: return static_cast<AdagradOptions&>(g.options()).lr();
    case OptKind::kRMSprop: return static_cast<RMSpropOptions&>(g.options()).lr();
    case OptKind::kLBFGS: return static_cast<LBFGSOptions&>(g.options()).lr();
  }
  throw InternalError("unknown optimizer kind");
}

// Bounds LBFGS's iteration and history counts read from a file.
constexpr int64_t kMaxLbfgsHistory = int64_t{1} << 20;

// What a state tensor must look like.
enum class Shape {
  kParam,   // the parameter's shape and dtype
  kFlat,    // 1-D, all of the group's parameters flattened (LBFGS), the parameters' dtype
  kScalar,  // one number of any real dtype (LBFGS's H_diag, ro)
  kCount,   // one integer in [0, 2^53] (steps, evaluations)
  kReal,    // one float64 (LBFGS's t, prev_loss)
};

struct Field {
  const char* name;
  Shape shape;
  bool required;
};

// LBFGS's history lists, stored as "<name>.<k>" for k in [0, n), the same n for all three.
const char* const kLbfgsLists[] = {"old_dirs", "old_stps", "ro"};

std::vector<Field> state_fields(OptKind kind) {
  switch (kind) {
    case OptKind::kSGD: return {{"momentum_buffer", Shape::kParam, true}};
    case OptKind::kAdam:
    case OptKind::kAdamW:
      return {{"step", Shape::kCount, true},
              {"exp_avg", Shape::kParam, true},
              {"exp_avg_sq", Shape::kParam, true},
              {"max_exp_avg_sq", Shape::kParam, false}};
    case OptKind::kAdagrad: return {{"step", Shape::kCount, true}, {"sum", Shape::kParam, true}};
    case OptKind::kRMSprop:
      return {{"step", Shape::kCount, true},
              {"square_avg", Shape::kParam, true},
              {"momentum_buffer", Shape::kParam, false},
              {"grad_avg", Shape::kParam, false}};
    case OptKind::kLBFGS:
      return {{"func_evals", Shape::kCount, true}, {"n_iter", Shape::kCount, true},
              {"t", Shape::kReal, true},           {"prev_loss", Shape::kReal, true},
              {"d", Shape::kFlat, false},          {"H_diag", Shape::kScalar, false},
              {"prev_flat_grad", Shape::kFlat, false}};
  }
  return {};
}

json group_options(torch::optim::OptimizerOptions& base, OptKind kind) {
  using namespace torch::optim;
  switch (kind) {
    case OptKind::kSGD: {
      auto& o = static_cast<SGDOptions&>(base);
      return {{"lr", o.lr()}, {"momentum", o.momentum()}, {"dampening", o.dampening()},
              {"weight_decay", o.weight_decay()}, {"nesterov", o.nesterov()}};
    }
    case OptKind::kAdam: {
      auto& o = static_cast<AdamOptions&>(base);
      return {{"lr", o.lr()}, {"beta1", std::get<0>(o.betas())}, {"beta2", std::get<1>(o.betas())},
              {"eps", o.eps()}, {"weight_decay", o.weight_decay()}, {"amsgrad", o.amsgrad()}};
    }
    case OptKind::kAdamW: {
      auto& o = static_cast<AdamWOptions&>(base);
      return {{"lr", o.lr()}, {"beta1", std::get<0>(o.betas())}, {"beta2", std::get<1>(o.betas())},
              {"eps", o.eps()}, {"weight_decay", o.weight_decay()}, {"amsgrad", o.amsgrad()}};
    }
    case OptKind::kAdagrad: {
      auto& o = static_cast<AdagradOptions&>(base);
      return {{"lr", o.lr()}, {"lr_decay", o.lr_decay()}, {"weight_decay", o.weight_decay()},
              {"initial_accumulator_value", o.initial_accumulator_value()}, {"eps", o.eps()}};
    }
    case OptKind::kRMSprop: {
      auto& o = static_cast<RMSpropOptions&>(base);
      return {{"lr", o.lr()}, {"alpha", o.alpha()}, {"eps", o.eps()},
              {"weight_decay", o.weight_decay()}, {"momentum", o.momentum()},
              {"centered", o.centered()}};
    }
    case OptKind::kLBFGS: {
      auto& o = static_cast<LBFGSOptions&>(base);
      return {{"lr", o.lr()}, {"max_iter", o.max_iter()},
              {"max_eval", o.max_eval() ? json(*o.max_eval()) : json(nullptr)},
              {"tolerance_grad", o.tolerance_grad()}, {"tolerance_change", o.tolerance_change()},
              {"history_size", o.history_size()},
              {"line_search_fn", o.line_search_fn() ? json(*o.line_search_fn()) : json(nullptr)}};
    }
  }
  throw InternalError("unknown optimizer kind");
}

// Reads one group's saved hyperparameters, recording every problem (Note [Bounded
// checkpoint parsing]: each number is range-checked before it is used).
class GroupReader {
 public:
  GroupReader(const json& j, std::string where, std::vector<std::string>& problems)
      : j_(j), where_(std::move(where)), problems_(problems) {}

  double real(const char* name, double min, double max = HUGE_VAL) {
    const json* v = field(name);
    if (v && v->is_number() && std::isfinite(v->get<double>()) && v->get<double>() >= min &&
        v->get<double>() <= max) {
      return v->get<double>();
    }
    bad(name, v, concat("a finite number in [", min, ", ", max, "]"));
    return min;
  }
  bool flag(const char* name) {
    const json* v = field(name);
    if (v && v->is_boolean()) return v->get<bool>();
    bad(name, v, "true or false");
    return false;
  }
  int64_t integer(const char* name, int64_t min, int64_t max) {
    const json* v = field(name);
    if (v && v->is_number_integer() && v->get<int64_t>() >= min && v->get<int64_t>() <= max) {
      return v->get<int64_t>();
    }
    bad(name, v, concat("an integer in [", min, ", ", max, "]"));
    return min;
  }
  c10::optional<int64_t> optional_integer(const char* name, int64_t min, int64_t max) {
    const json* v = field(name);
    if (v && v->is_null()) return c10::nullopt;
    return integer(name, min, max);
  }
  c10::optional<std::string> line_search_fn(const char* name) {
    const json* v = field(name);
    if (v && v->is_null()) return c10::nullopt;
    if (v && v->is_string() && v->get<std::string>() == "strong_wolfe") return "strong_wolfe";
    bad(name, v, "null or \"strong_wolfe\"");
    return c10::nullopt;
  }

 private:
  const json* field(const char* name) {
    if (!j_.is_object() || !j_.contains(name)) return nullptr;
    return &j_[name];
  }
  void bad(const char* name, const json* v, const std::string& expected) {
    problems_.push_back(concat(where_, name, ": checkpoint has ", v ? v->dump() : "nothing",
                               ", expected ", expected));
  }
  const json& j_;
  std::string where_;
  std::vector<std::string>& problems_;
};

// `current` with the hyperparameters of `j` (nullptr when `j` has problems).
std::unique_ptr<torch::optim::OptimizerOptions> read_group_options(
    const json& j, OptKind kind, const torch::optim::OptimizerOptions& current,
    const std::string& where, std::vector<std::string>& problems) {
  using namespace torch::optim;
  const size_t before = problems.size();
  GroupReader r(j, where, problems);
  auto copy = current.clone();
  switch (kind) {
    case OptKind::kSGD:
      static_cast<SGDOptions&>(*copy)
          .lr(r.real("lr", 0))
          .momentum(r.real("momentum", 0))
          .dampening(r.real("dampening", -HUGE_VAL))
          .weight_decay(r.real("weight_decay", 0))
          .nesterov(r.flag("nesterov"));
      break;
    case OptKind::kAdam:
    case OptKind::kAdamW: {
      const double lr = r.real("lr", 0), beta1 = r.real("beta1", 0, 1),
                   beta2 = r.real("beta2", 0, 1), eps = r.real("eps", 0),
                   weight_decay = r.real("weight_decay", 0);
      const bool amsgrad = r.flag("amsgrad");
      if (kind == OptKind::kAdam) {
        static_cast<AdamOptions&>(*copy).lr(lr).betas({beta1, beta2}).eps(eps)
            .weight_decay(weight_decay).amsgrad(amsgrad);
      } else {
        static_cast<AdamWOptions&>(*copy).lr(lr).betas({beta1, beta2}).eps(eps)
            .weight_decay(weight_decay).amsgrad(amsgrad);
      }
      break;
    }
    case OptKind::kAdagrad:
      static_cast<AdagradOptions&>(*copy)
          .lr(r.real("lr", 0))
          .lr_decay(r.real("lr_decay", 0))
          .weight_decay(r.real("weight_decay", 0))
          .initial_accumulator_value(r.real("initial_accumulator_value", 0))
          .eps(r.real("eps", 0));
      break;
    case OptKind::kRMSprop:
      static_cast<RMSpropOptions&>(*copy)
          .lr(r.real("lr", 0))
          .alpha(r.real("alpha", 0))
          .eps(r.real("eps", 0))
          .weight_decay(r.real("weight_decay", 0))
          .momentum(r.real("momentum", 0))
          .centered(r.flag("centered"));
      break;
    case OptKind::kLBFGS:
      static_cast<LBFGSOptions&>(*copy)
          .lr(r.real("lr", 0))
          .max_iter(r.integer("max_iter", 1, kMaxLbfgsHistory))
          .max_eval(r.optional_integer("max_eval", 1, kMaxLbfgsHistory))
          .tolerance_grad(r.real("tolerance_grad", 0))
          .tolerance_change(r.real("tolerance_change", 0))
          .history_size(r.integer("history_size", 1, kMaxLbfgsHistory))
          .line_search_fn(r.line_search_fn("line_search_fn"));
      break;
  }
  if (problems.size() != before) return nullptr;
  return copy;
}

}  // namespace

void add_optimizer(Checkpoint& checkpoint, torch::optim::Optimizer& optimizer,
                   const std::string& prefix) {
  OptKind kind = optimizer_kind(optimizer);
  auto& groups = optimizer.param_groups();
  json meta = json::parse(checkpoint.metadata);
  json lrs = json::array(), options = json::array();
  for (size_t g = 0; g < groups.size(); ++g) {
    options.push_back(group_options(groups[g].options(), kind));
    lrs.push_back(options.back()["lr"]);
    auto& params = groups[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      auto* state = adapter::find_optimizer_state(optimizer, params[i]);
      if (!state) continue;  // no step taken yet
      std::string key = concat(prefix, g, ".", i, ".");
      auto put_t = [&](const std::string& n, const at::Tensor& t) {
        if (t.defined()) checkpoint.tensors[key + n] = t.detach().to(at::kCPU).clone();
      };
      auto put_count = [&](const char* n, int64_t v) { put_t(n, at::tensor({v}, at::kLong)); };
      auto put_real = [&](const char* n, double v) { put_t(n, at::tensor({v}, at::kDouble)); };
      using namespace torch::optim;
      switch (kind) {
        case OptKind::kSGD:
          put_t("momentum_buffer", static_cast<SGDParamState*>(state)->momentum_buffer());
          break;
        case OptKind::kAdam: {
          auto* s = static_cast<AdamParamState*>(state);
          put_count("step", s->step());
          put_t("exp_avg", s->exp_avg());
          put_t("exp_avg_sq", s->exp_avg_sq());
          put_t("max_exp_avg_sq", s->max_exp_avg_sq());
          break;
        }
        case OptKind::kAdamW: {
          auto* s = static_cast<AdamWParamState*>(state);
          put_count("step", s->step());
          put_t("exp_avg", s->exp_avg());
          put_t("exp_avg_sq", s->exp_avg_sq());
          put_t("max_exp_avg_sq", s->max_exp_avg_sq());
          break;
        }
        case OptKind::kAdagrad: {
          auto* s = static_cast<AdagradParamState*>(state);
          put_count("step", s->step());
          put_t("sum", s->sum());
          break;
        }
        case OptKind::kRMSprop: {
          auto* s = static_cast<RMSpropParamState*>(state);
          put_count("step", s->step());
          put_t("square_avg", s->square_avg());
          put_t("momentum_buffer", s->momentum_buffer());
          put_t("grad_avg", s->grad_avg());
          break;
        }
        case OptKind::kLBFGS: {
          // `al` is scratch that every step overwrites before reading: not stored.
          auto* s = static_cast<LBFGSParamState*>(state);
          put_count("func_evals", s->func_evals());
          put_count("n_iter", s->n_iter());
          put_real("t", s->t());
          put_real("prev_loss", s->prev_loss());
          put_t("d", s->d());
          put_t("H_diag", s->H_diag());
          put_t("prev_flat_grad", s->prev_flat_grad());
          const std::deque<at::Tensor>* lists[] = {&s->old_dirs(), &s->old_stps(), &s->ro()};
          for (int l = 0; l < 3; ++l) {
            for (size_t k = 0; k < lists[l]->size(); ++k) {
              put_t(concat(kLbfgsLists[l], ".", k), (*lists[l])[k]);
            }
          }
          break;
        }
      }
    }
  }
  meta[prefix + "type"] = kind_name(kind);
  meta[prefix + "lr"] = lrs;
  meta[prefix + "groups"] = options;
  checkpoint.metadata = meta.dump();
}

namespace {

// Checks `t` (the checkpoint's "<name>") against `shape`; `param` is the parameter it
// belongs to and `flat_numel` its group's total number of elements.
void check_field(const std::string& name, const at::Tensor& t, Shape shape, const at::Tensor& param,
                 int64_t flat_numel, std::vector<std::string>& problems) {
  const bool one_int = t.numel() == 1 && !at::isFloatingType(t.scalar_type()) &&
                       !at::isComplexType(t.scalar_type());
  switch (shape) {
    case Shape::kParam: check_same("optimizer state", name, t, param, problems); break;
    case Shape::kFlat:
      if (t.dim() != 1 || t.numel() != flat_numel || t.scalar_type() != param.scalar_type()) {
        problems.push_back(concat("optimizer state '", name, "': checkpoint has ",
                                  t.scalar_type(), " ", t.sizes(), ", expected ",
                                  param.scalar_type(), " [", flat_numel,
                                  "] (all of the group's parameters, flattened)"));
      }
      break;
    case Shape::kScalar:
      if (t.numel() != 1 || t.dim() > 1 || at::isComplexType(t.scalar_type())) {
        problems.push_back(concat("optimizer state '", name, "': checkpoint has ",
                                  t.scalar_type(), " ", t.sizes(), ", expected one real number"));
      }
      break;
    case Shape::kCount:
      if (!one_int || t.item<int64_t>() < 0 || t.item<int64_t>() > (int64_t{1} << 53)) {
        problems.push_back(concat(
            "'", name, "' holds ",
            t.numel() == 1 ? concat(t.scalar_type(), " ", t.item().toDouble())
                           : concat(t.numel(), " values"),
            ", but an optimizer step count must be one integer in [0, 2^53]"));
      }
      break;
    case Shape::kReal:
      if (t.numel() != 1 || t.scalar_type() != at::kDouble) {
        problems.push_back(concat("optimizer state '", name, "': checkpoint has ",
                                  t.scalar_type(), " ", t.sizes(), ", expected one float64"));
      }
      break;
  }
}

// Whether the optional state `field` must be present under these hyperparameters (the
// optimizer's step reads it).
bool needed_by_options(OptKind kind, const torch::optim::OptimizerOptions& base,
                       const std::string& field) {
  using namespace torch::optim;
  switch (kind) {
    case OptKind::kAdam:
      return field == "max_exp_avg_sq" && static_cast<const AdamOptions&>(base).amsgrad();
    case OptKind::kAdamW:
      return field == "max_exp_avg_sq" && static_cast<const AdamWOptions&>(base).amsgrad();
    case OptKind::kRMSprop: {
      const auto& o = static_cast<const RMSpropOptions&>(base);
      return (field == "momentum_buffer" && o.momentum() > 0) ||
             (field == "grad_avg" && o.centered());
    }
    default: return false;
  }
}

// "<list>.<k>" with k a decimal index without leading zeros: the list's number, else -1.
int lbfgs_list_index(const std::string& field, int64_t* k) {
  for (int l = 0; l < 3; ++l) {
    const std::string head = std::string(kLbfgsLists[l]) + ".";
    if (field.compare(0, head.size(), head) != 0) continue;
    const std::string digits = field.substr(head.size());
    if (digits.empty() || digits.size() > 9 || (digits.size() > 1 && digits[0] == '0') ||
        digits.find_first_not_of("0123456789") != std::string::npos) {
      return -1;
    }
    *k = std::stoll(digits);
    return l;
  }
  return -1;
}

}  // namespace

void load_optimizer(const Checkpoint& checkpoint, torch::optim::Optimizer& optimizer,
                    const std::string& prefix) {
  OptKind kind = optimizer_kind(optimizer);
  auto& groups = optimizer.param_groups();
  json meta = json::parse(checkpoint.metadata);
  std::vector<std::string> problems;
  if (!meta.contains(prefix + "type") || meta[prefix + "type"] != kind_name(kind)) {
    problems.push_back(concat("optimizer type: checkpoint has ",
                              meta.contains(prefix + "type") ? meta[prefix + "type"].dump()
                                                             : std::string("none"),
                              ", the program uses ", kind_name(kind)));
  }
  json lrs = meta.value(prefix + "lr", json::array());
  if (!lrs.is_array()) {
    problems.push_back(concat(prefix, "lr: checkpoint has ", lrs.dump(),
                              ", expected an array of learning rates"));
    lrs = json::array();
  }
  for (size_t g = 0; g < lrs.size(); ++g) {  // Note [Bounded checkpoint parsing]
    if (!lrs[g].is_number() || !std::isfinite(lrs[g].get<double>()) || lrs[g].get<double>() < 0) {
      problems.push_back(concat(prefix, "lr of parameter group ", g, ": checkpoint has ",
                                lrs[g].dump(), ", expected a finite number >= 0"));
    }
  }
  if (lrs.size() != groups.size()) {
    problems.push_back(concat("parameter groups: checkpoint has ", lrs.size(),
                              ", the optimizer has ", groups.size()));
  }
  // Every hyperparameter of each group (files written before they were saved hold only "lr").
  std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> options(groups.size());
  const bool has_options = meta.contains(prefix + "groups");
  if (has_options && problems.empty()) {
    const json& saved = meta[prefix + "groups"];
    if (!saved.is_array() || saved.size() != groups.size()) {
      problems.push_back(concat(prefix, "groups: checkpoint has ",
                                saved.is_array() ? concat(saved.size(), " groups") : saved.dump(),
                                ", expected an array of ", groups.size(),
                                " parameter groups' hyperparameters"));
    } else {
      for (size_t g = 0; g < groups.size(); ++g) {
        options[g] = read_group_options(saved[g], kind, groups[g].options(),
                                        concat(prefix, "groups[", g, "]."), problems);
      }
    }
  }
  const auto fields = state_fields(kind);
  std::set<std::string> used;
  for (size_t g = 0; g < groups.size() && problems.empty(); ++g) {
    auto& params = groups[g].params();
    int64_t flat_numel = 0;
    for (const auto& p : params) flat_numel += p.numel();
    for (size_t i = 0; i < params.size(); ++i) {
      const std::string key = concat(prefix, g, ".", i, ".");
      std::set<std::string> present;
      int64_t list_count[3] = {0, 0, 0};
      for (auto it = checkpoint.tensors.lower_bound(key);
           it != checkpoint.tensors.end() && it->first.compare(0, key.size(), key) == 0; ++it) {
        const std::string field = it->first.substr(key.size());
        int64_t k = 0;
        const int list = kind == OptKind::kLBFGS ? lbfgs_list_index(field, &k) : -1;
        const Field* known = nullptr;
        for (const auto& f : fields) known = field == f.name ? &f : known;
        if (!known && list < 0) continue;  // reported as unexpected below
        used.insert(it->first);
        present.insert(field);
        if (list >= 0) ++list_count[list];
        check_field(it->first, it->second, list >= 0 ? (list == 2 ? Shape::kScalar : Shape::kFlat)
                                                     : known->shape,
                    params[i], flat_numel, problems);
      }
      if (present.empty() && kind != OptKind::kAdagrad) continue;  // no step taken yet
      const auto& hyper = options[g] ? *options[g] : groups[g].options();
      for (const auto& f : fields) {
        if ((f.required || needed_by_options(kind, hyper, f.name)) &&
            !present.count(f.name)) {
          problems.push_back(concat("missing key '", key, f.name, "' (the ", kind_name(kind),
                                    " state of parameter ", i, " of group ", g, ")"));
        }
      }
      if (kind == OptKind::kLBFGS) {
        const auto& o = static_cast<const torch::optim::LBFGSOptions&>(hyper);
        for (int l = 0; l < 3; ++l) {
          bool contiguous = list_count[l] == list_count[0] && list_count[l] <= o.history_size();
          for (int64_t k = 0; k < list_count[l] && contiguous; ++k) {
            contiguous = present.count(concat(kLbfgsLists[l], ".", k)) > 0;
          }
          if (!contiguous) {
            problems.push_back(concat(
                "LBFGS history under '", key, "': checkpoint has ", list_count[0], " old_dirs, ",
                list_count[1], " old_stps and ", list_count[2],
                " ro, expected the same number of each, numbered from 0, at most history_size (",
                o.history_size(), ")"));
            break;
          }
        }
      }
    }
  }
  for (auto it = checkpoint.tensors.lower_bound(prefix);
       it != checkpoint.tensors.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
    if (!used.count(it->first)) problems.push_back(concat("unexpected key '", it->first, "'"));
  }
  if (!problems.empty()) throw_problems("load_optimizer", problems);

  using namespace torch::optim;
  for (size_t g = 0; g < groups.size(); ++g) {
    if (options[g]) {
      groups[g].set_options(std::move(options[g]));
    } else {
      group_lr(groups[g], kind) = lrs[g].get<double>();
    }
    auto& params = groups[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      const std::string key = concat(prefix, g, ".", i, ".");
      auto get_t = [&](const std::string& n) -> at::Tensor {
        auto it = checkpoint.tensors.find(key + n);
        return it == checkpoint.tensors.end() ? at::Tensor()
                                              : it->second.clone().to(params[i].device());
      };
      auto count = [&](const char* n) { return checkpoint.tensors.at(key + n).item<int64_t>(); };
      auto real = [&](const char* n) { return checkpoint.tensors.at(key + n).item<double>(); };
      if (checkpoint.tensors.lower_bound(key) == checkpoint.tensors.end() ||
          checkpoint.tensors.lower_bound(key)->first.compare(0, key.size(), key) != 0) {
        continue;  // no state saved for this parameter
      }
      std::unique_ptr<OptimizerParamState> state;
      switch (kind) {
        case OptKind::kSGD: {
          auto s = std::make_unique<SGDParamState>();
          s->momentum_buffer(get_t("momentum_buffer"));
          state = std::move(s);
          break;
        }
        case OptKind::kAdam: {
          auto s = std::make_unique<AdamParamState>();
          s->step(count("step")).exp_avg(get_t("exp_avg")).exp_avg_sq(get_t("exp_avg_sq"))
              .max_exp_avg_sq(get_t("max_exp_avg_sq"));
          state = std::move(s);
          break;
        }
        case OptKind::kAdamW: {
          auto s = std::make_unique<AdamWParamState>();
          s->step(count("step")).exp_avg(get_t("exp_avg")).exp_avg_sq(get_t("exp_avg_sq"))
              .max_exp_avg_sq(get_t("max_exp_avg_sq"));
          state = std::move(s);
          break;
        }
        case OptKind::kAdagrad: {
          auto s = std::make_unique<AdagradParamState>();
          s->step(count("step")).sum(get_t("sum"));
          state = std::move(s);
          break;
        }
        case OptKind::kRMSprop: {
          auto s = std::make_unique<RMSpropParamState>();
          s->step(count("step")).square_avg(get_t("square_avg"))
              .momentum_buffer(get_t("momentum_buffer")).grad_avg(get_t("grad_avg"));
          state = std::move(s);
          break;
        }
        case OptKind::kLBFGS: {
          auto s = std::make_unique<LBFGSParamState>();
          s->func_evals(count("func_evals")).n_iter(count("n_iter")).t(real("t"))
              .prev_loss(real("prev_loss")).d(get_t("d")).H_diag(get_t("H_diag"))
              .prev_flat_grad(get_t("prev_flat_grad"));
          std::deque<at::Tensor> lists[3];
          for (int l = 0; l < 3; ++l) {
            for (int64_t k = 0;; ++k) {
              auto t = get_t(concat(kLbfgsLists[l], ".", k));
              if (!t.defined()) break;
              lists[l].push_back(t);
            }
          }
          s->old_dirs(lists[0]).old_stps(lists[1]).ro(lists[2]);
          state = std::move(s);
          break;
        }
      }
      adapter::set_optimizer_state(optimizer, params[i], std::move(state));
    }
  }
}

// Note [Scheduler state in checkpoints]
// An LRScheduler's state is its step count; the learning rates it set live in the
// optimizer's parameter groups, which add_optimizer saves and load_optimizer restores. The
// scheduler's own settings (StepLR's step_size and gamma) are constructor arguments, like a
// model's architecture: the program supplies them again. The metadata also names the
// scheduler's type and the learning rates when it was saved, and loading checks the type.

void add_scheduler(Checkpoint& checkpoint, torch::optim::LRScheduler& scheduler,
                   const std::string& prefix) {
  json meta = json::parse(checkpoint.metadata);
  meta[prefix + "type"] = c10::demangle(typeid(scheduler).name());
  meta[prefix + "step_count"] = adapter::scheduler_step_count(scheduler);
  checkpoint.metadata = meta.dump();
}

void load_scheduler(const Checkpoint& checkpoint, torch::optim::LRScheduler& scheduler,
                    const std::string& prefix) {
  json meta = json::parse(checkpoint.metadata);
  const std::string type = c10::demangle(typeid(scheduler).name());
  std::vector<std::string> problems;
  if (!meta.contains(prefix + "type") || meta[prefix + "type"] != type) {
    problems.push_back(concat("scheduler type: checkpoint has ",
                              meta.contains(prefix + "type") ? meta[prefix + "type"].dump()
                                                             : std::string("none"),
                              ", the program uses ", type));
  }
  const json count = meta.value(prefix + "step_count", json());
  const int64_t max = adapter::max_scheduler_step_count();
  if (!count.is_number_integer() || count.get<int64_t>() < 0 || count.get<int64_t>() > max) {
    problems.push_back(concat(prefix, "step_count: checkpoint has ",
                              count.is_null() ? std::string("nothing") : count.dump(),
                              ", expected an integer in [0, ", max, "]"));
  }
  if (!problems.empty()) throw_problems("load_scheduler", problems);
  adapter::set_scheduler_step_count(scheduler, count.get<int64_t>());
}

void add_rng_state(Checkpoint& checkpoint, const std::string& name) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  checkpoint.tensors[name] = gen.get_state().clone();
}

void load_rng_state(const Checkpoint& checkpoint, const std::string& name) {
  auto it = checkpoint.tensors.find(name);
  LOCKSTEP_CHECK(it != checkpoint.tensors.end(), "load_rng_state: the checkpoint has no '", name,
                 "' tensor; it was saved without add_rng_state");
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  try {
    gen.set_state(it->second);
  } catch (const std::exception& e) {
    throw InvalidArgument(concat("load_rng_state: '", name, "' is not a CPU generator state: ",
                                 e.what()));
  }
}

}  // namespace train
}  // namespace lockstep
