// Training state in a checkpoint: module parameters and buffers, optimizer state, RNG state.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/module.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include <cmath>
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

// The named tensors of one parameter's optimizer state, plus its integer step (Adam).
struct ParamStateView {
  std::map<std::string, at::Tensor> tensors;
  int64_t step = -1;
};

enum class OptKind { kSGD, kAdam, kAdamW };

OptKind optimizer_kind(torch::optim::Optimizer& optimizer) {
  if (dynamic_cast<torch::optim::SGD*>(&optimizer)) return OptKind::kSGD;
  if (dynamic_cast<torch::optim::AdamW*>(&optimizer)) return OptKind::kAdamW;
  if (dynamic_cast<torch::optim::Adam*>(&optimizer)) return OptKind::kAdam;
  throw InvalidArgument("checkpoints support the state of torch::optim::SGD, Adam and AdamW; "
                        "got another optimizer type. Save its state yourself as named tensors.");
}

const char* kind_name(OptKind k) {
  switch (k) {
    case OptKind::kSGD: return "SGD";
    case OptKind::kAdam: return "Adam";
    case OptKind::kAdamW: return "AdamW";
  }
  return "?";
}

double& group_lr(torch::optim::OptimizerParamGroup& g, OptKind kind) {
  switch (kind) {
    case OptKind::kSGD: return static_cast<torch::optim::SGDOptions&>(g.options()).lr();
    case OptKind::kAdam: return static_cast<torch::optim::AdamOptions&>(g.options()).lr();
    case OptKind::kAdamW: return static_cast<torch::optim::AdamWOptions&>(g.options()).lr();
  }
  throw InternalError("unknown optimizer kind");
}

}  // namespace

void add_optimizer(Checkpoint& checkpoint, torch::optim::Optimizer& optimizer,
                   const std::string& prefix) {
  OptKind kind = optimizer_kind(optimizer);
  auto& groups = optimizer.param_groups();
  json meta = json::parse(checkpoint.metadata);
  json lrs = json::array();
  for (size_t g = 0; g < groups.size(); ++g) {
    lrs.push_back(group_lr(groups[g], kind));
    auto& params = groups[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      auto* state = adapter::find_optimizer_state(optimizer, params[i]);
      if (!state) continue;  // no step taken yet
      std::string key = concat(prefix, g, ".", i, ".");
      auto put_t = [&](const char* n, const at::Tensor& t) {
        if (t.defined()) checkpoint.tensors[key + n] = t.detach().to(at::kCPU).clone();
      };
      if (kind == OptKind::kSGD) {
        put_t("momentum_buffer", static_cast<torch::optim::SGDParamState*>(state)->momentum_buffer());
      } else if (kind == OptKind::kAdam) {
        auto* s = static_cast<torch::optim::AdamParamState*>(state);
        put_t("exp_avg", s->exp_avg());
        put_t("exp_avg_sq", s->exp_avg_sq());
        put_t("max_exp_avg_sq", s->max_exp_avg_sq());
        checkpoint.tensors[key + "step"] = at::tensor({s->step()}, at::kLong);
      } else {
        auto* s = static_cast<torch::optim::AdamWParamState*>(state);
        put_t("exp_avg", s->exp_avg());
        put_t("exp_avg_sq", s->exp_avg_sq());
        put_t("max_exp_avg_sq", s->max_exp_avg_sq());
        checkpoint.tensors[key + "step"] = at::tensor({s->step()}, at::kLong);
      }
    }
  }
  meta[prefix + "type"] = kind_name(kind);
  meta[prefix + "lr"] = lrs;
  checkpoint.metadata = meta.dump();
}

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
  std::set<std::string> used;
  for (size_t g = 0; g < groups.size() && problems.empty(); ++g) {
    auto& params = groups[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      std::string key = concat(prefix, g, ".", i, ".");
      for (auto it = checkpoint.tensors.lower_bound(key);
           it != checkpoint.tensors.end() && it->first.compare(0, key.size(), key) == 0; ++it) {
        used.insert(it->first);
        if (it->first == key + "step") {
          const at::Tensor& t = it->second;
          const bool ok = t.numel() == 1 && !at::isFloatingType(t.scalar_type()) &&
                          !at::isComplexType(t.scalar_type()) &&
                          t.item<int64_t>() >= 0 && t.item<int64_t>() <= (int64_t{1} << 53);
          if (!ok) {
            problems.push_back(concat(
                "'", it->first, "' holds ",
                t.numel() == 1 ? concat(t.scalar_type(), " ", t.item().toDouble())
                               : concat(t.numel(), " values"),
                ", but an optimizer step count must be one integer in [0, 2^53]"));
          }
        }
        if (it->first != key + "step") check_same("optimizer state", it->first, it->second, params[i], problems);
      }
    }
  }
  for (auto it = checkpoint.tensors.lower_bound(prefix);
       it != checkpoint.tensors.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
    if (!used.count(it->first)) problems.push_back(concat("unexpected key '", it->first, "'"));
  }
  if (!problems.empty()) throw_problems("load_optimizer", problems);

  for (size_t g = 0; g < groups.size(); ++g) {
    group_lr(groups[g], kind) = lrs[g].get<double>();
    auto& params = groups[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      std::string key = concat(prefix, g, ".", i, ".");
      auto get_t = [&](const char* n) -> at::Tensor {
        auto it = checkpoint.tensors.find(key + n);
        return it == checkpoint.tensors.end() ? at::Tensor() : it->second.clone();
      };
      if (kind == OptKind::kSGD) {
        auto buf = get_t("momentum_buffer");
        if (!buf.defined()) continue;
        auto s = std::make_unique<torch::optim::SGDParamState>();
        s->momentum_buffer(buf);
        adapter::set_optimizer_state(optimizer, params[i], std::move(s));
      } else {
        auto step = get_t("step");
        if (!step.defined()) continue;
        std::unique_ptr<torch::optim::OptimizerParamState> base;
        if (kind == OptKind::kAdam) {
          auto s = std::make_unique<torch::optim::AdamParamState>();
          s->step(step.item<int64_t>()).exp_avg(get_t("exp_avg")).exp_avg_sq(get_t("exp_avg_sq"));
          if (auto m = get_t("max_exp_avg_sq"); m.defined()) s->max_exp_avg_sq(m);
          base = std::move(s);
        } else {
          auto s = std::make_unique<torch::optim::AdamWParamState>();
          s->step(step.item<int64_t>()).exp_avg(get_t("exp_avg")).exp_avg_sq(get_t("exp_avg_sq"));
          if (auto m = get_t("max_exp_avg_sq"); m.defined()) s->max_exp_avg_sq(m);
          base = std::move(s);
        }
        adapter::set_optimizer_state(optimizer, params[i], std::move(base));
      }
    }
  }
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
