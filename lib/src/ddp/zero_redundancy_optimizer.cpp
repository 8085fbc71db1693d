// ZeroRedundancyOptimizer (ZeRO stage 1): the shard planner, the local optimizer over this
// rank's shard, the bucketed broadcast of updated parameters, and consolidation of the
// shards' state for checkpoints.
#include "lockstep/zero_redundancy_optimizer.h"

#include <c10/util/Type.h>
#include <torch/optim/lbfgs.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <algorithm>
#include <deque>
#include <map>
#include <numeric>
#include <sstream>
#include <string>
#include <typeinfo>

#include "adapter/torch_adapter.h"
#include "lockstep/agreement.h"
#include "lockstep/errors.h"

namespace lockstep {

using detail::concat;
using torch::optim::Optimizer;
using torch::optim::OptimizerParamGroup;

// Note [ZeRO stage 1]
// Every rank holds every parameter and, after DDP's backward, every averaged gradient; the
// optimizer state is what ZeRO stage 1 shards. plan_zero_shards assigns each parameter to one
// rank (largest first to the least-loaded rank: the classic greedy bound keeps the largest
// shard within one parameter of the mean), and each rank's local optimizer, built by the
// user's factory over that rank's shard of every parameter group, is the only one that ever
// creates state for those parameters. A step is then:
//   1. copy each group's hyperparameters from this optimizer's groups (which schedulers
//      change) to the local optimizer's groups;
//   2. step the local optimizer: only the shard's parameters change;
//   3. for each owner rank in order, for each of its buckets (a flat copy of consecutive
//      parameters of one dtype, at most bucket_cap_mb, a larger parameter alone), broadcast
//      from the owner and copy into the parameters on the other ranks; at most two buckets
//      in flight, so a step allocates about 2 x bucket_cap_mb beyond the parameters.
// Each parameter's update is the plain optimizer's arithmetic on the same averaged gradient,
// so the parameters equal (bitwise, on one device type) those of DDP with the plain optimizer.
//
// Note [ZeRO checkpoints]
// lockstep::train's checkpoint format stores a plain optimizer's state; ZeRO does not write its
// own. consolidate_state_dict serializes each rank's local optimizer with torch's own optimizer
// archive (positional over its groups, so it needs no tensor identity), gathers the archives on
// one rank (bounded by the shard sizes: Note [Bounded object collectives]), loads each into a
// temporary optimizer of the factory's type over that rank's shard of the receiving rank's
// parameters, and moves the per-parameter states into a full optimizer over all parameters:
// train::add_optimizer then writes exactly what a plain optimizer would. Loading goes the
// other way without communication: every rank loads the full state into make_full_optimizer()
// and load_full_state keeps its shard, whatever world size wrote the file. The archives travel
// only between ranks of one job, which trust each other's tensors already.

ZeroShardPlan plan_zero_shards(const std::vector<int64_t>& sizes, int world_size) {
  LOCKSTEP_CHECK(world_size >= 1, "plan_zero_shards: expected a world size >= 1, but got ",
                 world_size);
  for (size_t i = 0; i < sizes.size(); ++i) {
    LOCKSTEP_CHECK(sizes[i] >= 0, "plan_zero_shards: expected sizes >= 0, but parameter ", i,
                   " has size ", sizes[i]);
  }
  std::vector<size_t> order(sizes.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return sizes[a] > sizes[b]; });
  ZeroShardPlan plan;
  plan.owner.assign(sizes.size(), 0);
  plan.load.assign(static_cast<size_t>(world_size), 0);
  for (size_t i : order) {
    int best = 0;
    for (int r = 1; r < world_size; ++r) {
      if (plan.load[r] < plan.load[best]) best = r;
    }
    plan.owner[i] = best;
    plan.load[best] += sizes[i];
  }
  return plan;
}

struct ZeroRedundancyOptimizer::Prepared {
  std::vector<OptimizerParamGroup> groups;  // the caller's, each with its resolved options
  std::unique_ptr<torch::optim::OptimizerOptions> defaults;
};

namespace {

std::string type_name(const Optimizer& optimizer) {
  return c10::demangle(typeid(optimizer).name());
}

// The factory's optimizer over `groups`, checked.
std::unique_ptr<Optimizer> build(const OptimizerFactory& factory,
                                 std::vector<OptimizerParamGroup> groups,
                                 const std::string& where) {
  const size_t count = groups.size();
  auto out = factory(std::move(groups));
  LOCKSTEP_CHECK(out != nullptr, where,
                 "expected the optimizer factory to return an optimizer, but it returned "
                 "nullptr");
  LOCKSTEP_CHECK(dynamic_cast<torch::optim::LBFGS*>(out.get()) == nullptr, where,
                 "LBFGS cannot be sharded: its state (history, flat direction) spans all "
                 "parameters of a group. Use it without ZeroRedundancyOptimizer, or use SGD, "
                 "Adam, AdamW, Adagrad or RMSprop");
  LOCKSTEP_CHECK(out->param_groups().size() == count, where, "expected the optimizer factory to ",
                 "keep the ", count, " parameter groups it is given, but its ", type_name(*out),
                 " has ", out->param_groups().size(),
                 "; build the optimizer from the factory's argument (optimizer_factory does)");
  return out;
}

}  // namespace

ZeroRedundancyOptimizer::Prepared ZeroRedundancyOptimizer::prepare(
    std::vector<OptimizerParamGroup> groups, const ProcessGroupPtr& group,
    const OptimizerFactory& factory) {
  const std::string where = "ZeroRedundancyOptimizer: ";
  LOCKSTEP_CHECK(group != nullptr, where, "expected a process group, but got nullptr");
  LOCKSTEP_CHECK(static_cast<bool>(factory), where,
                 "expected an optimizer factory (e.g. lockstep::optimizer_factory<torch::optim::"
                 "Adam>(torch::optim::AdamOptions(1e-3))), but got an empty one");
  std::vector<OptimizerParamGroup> empty;
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& params = groups[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      LOCKSTEP_CHECK(params[i].defined() && params[i].is_leaf(), where, group->where(),
                     " expected parameters (leaf tensors), but parameter ", i, " of group ", g,
                     params[i].defined() ? " was computed from other tensors"
                                         : " is an undefined tensor",
                     "; pass the module's parameters()");
    }
    empty.push_back(groups[g].has_options()
                        ? OptimizerParamGroup(std::vector<at::Tensor>{},
                                              groups[g].options().clone())
                        : OptimizerParamGroup(std::vector<at::Tensor>{}));
  }
  // An optimizer over no parameters resolves each group's options and the defaults.
  auto probe = build(factory, std::move(empty), where);
  ZeroRedundancyOptimizer::Prepared out;
  for (size_t g = 0; g < groups.size(); ++g) {
    out.groups.emplace_back(groups[g].params(), probe->param_groups()[g].options().clone());
  }
  out.defaults = probe->defaults().clone();
  return out;
}

namespace {

std::vector<OptimizerParamGroup> one_group(std::vector<at::Tensor> params) {
  std::vector<OptimizerParamGroup> out;
  out.emplace_back(std::move(params));
  return out;
}

}  // namespace

ZeroRedundancyOptimizer::ZeroRedundancyOptimizer(std::vector<OptimizerParamGroup> param_groups,
                                                 ProcessGroupPtr group, OptimizerFactory factory,
                                                 ZeroOptions options)
    : ZeroRedundancyOptimizer(prepare(std::move(param_groups), group, factory), group, factory,
                              std::move(options)) {}

ZeroRedundancyOptimizer::ZeroRedundancyOptimizer(std::vector<at::Tensor> params,
                                                 ProcessGroupPtr group, OptimizerFactory factory,
                                                 ZeroOptions options)
    : ZeroRedundancyOptimizer(one_group(std::move(params)), std::move(group), std::move(factory),
                              std::move(options)) {}

ZeroRedundancyOptimizer::ZeroRedundancyOptimizer(Prepared prepared, ProcessGroupPtr group,
                                                 OptimizerFactory factory, ZeroOptions options)
    : Optimizer(std::move(prepared.groups), std::move(prepared.defaults)),
      group_(std::move(group)),
      factory_(std::move(factory)),
      options_(std::move(options)) {
  const std::string where = concat("ZeroRedundancyOptimizer ", group_->where(), ": ");
  LOCKSTEP_CHECK(options_.bucket_cap_mb() > 0, where, "expected bucket_cap_mb > 0, but got ",
                 options_.bucket_cap_mb());
  const auto& groups = param_groups();
  std::string counts;
  for (size_t g = 0; g < groups.size(); ++g) {
    counts += concat(g ? "," : "", groups[g].params().size());
    for (const auto& p : groups[g].params()) {
      params_.push_back(p);
      group_of_.push_back(g);
    }
  }
  if (options_.check_parameters()) {
    // Two rounds, so that a different count is reported as such and not as every parameter
    // after the first difference.
    std::map<std::string, std::string> config = {{"parameters per group", counts}};
    std::map<std::string, std::string> shapes;
    for (size_t i = 0; i < params_.size(); ++i) {
      shapes[concat("parameter ", i)] =
          concat(params_[i].scalar_type(), " ", params_[i].sizes());
    }
    for (const auto* c : {&config, &shapes}) {
      try {
        check_config_agreement(*group_, *c);
      } catch (const InvalidArgument& e) {
        throw InvalidArgument(concat(
            where, "every rank must pass the same parameters to shard, in the same order (",
            e.what(), "). Construct it on every rank over the same model's parameters, e.g. "
            "ddp->parameters()"));
      }
    }
  }
  std::vector<int64_t> sizes;
  for (const auto& p : params_) sizes.push_back(p.numel() * static_cast<int64_t>(p.element_size()));
  plan_ = plan_zero_shards(sizes, group_->size());
  local_ = build(factory_, shard_groups(group_->rank()), where);

  const auto cap = static_cast<int64_t>(options_.bucket_cap_mb() * 1024 * 1024);
  for (int r = 0; r < group_->size(); ++r) {
    Bucket bucket;
    bucket.owner = r;
    int64_t bytes = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      if (plan_.owner[i] != r || params_[i].numel() == 0) continue;
      if (!bucket.params.empty() &&
          (params_[i].scalar_type() != params_[bucket.params[0]].scalar_type() ||
           bytes + sizes[i] > cap)) {
        buckets_.push_back(std::move(bucket));
        bucket = Bucket();
        bucket.owner = r;
        bytes = 0;
      }
      bucket.params.push_back(i);
      bucket.numel += params_[i].numel();
      bytes += sizes[i];
    }
    if (!bucket.params.empty()) buckets_.push_back(std::move(bucket));
  }
}

ZeroRedundancyOptimizer::~ZeroRedundancyOptimizer() = default;

std::vector<OptimizerParamGroup> ZeroRedundancyOptimizer::shard_groups(int rank) const {
  std::vector<OptimizerParamGroup> out;
  for (const auto& g : param_groups()) {
    out.emplace_back(std::vector<at::Tensor>{}, g.options().clone());
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    if (plan_.owner[i] == rank) out[group_of_[i]].params().push_back(params_[i]);
  }
  return out;
}

at::Tensor ZeroRedundancyOptimizer::step(LossClosure closure) {
  consolidated_.reset();
  auto& local_groups = local_->param_groups();
  for (size_t g = 0; g < local_groups.size(); ++g) {
    local_groups[g].set_options(param_groups()[g].options().clone());
  }
  at::Tensor loss = local_->step(std::move(closure));
  broadcast_parameters();
  return loss;
}

void ZeroRedundancyOptimizer::broadcast_parameters() {
  if (group_->size() == 1) return;
  at::NoGradGuard no_grad;
  const int rank = group_->rank();
  struct InFlight {
    const Bucket* bucket;
    at::Tensor buffer;
    WorkPtr work;
  };
  std::deque<InFlight> flight;
  auto finish = [&] {
    InFlight f = std::move(flight.front());
    flight.pop_front();
    f.work->wait();
    if (f.bucket->owner == rank) return;
    int64_t offset = 0;
    for (size_t i : f.bucket->params) {
      auto& p = params_[i];
      p.copy_(f.buffer.narrow(0, offset, p.numel()).view(p.sizes()));
      offset += p.numel();
    }
  };
  for (const auto& bucket : buckets_) {
    at::Tensor buffer;
    if (bucket.owner == rank) {
      std::vector<at::Tensor> flat;
      for (size_t i : bucket.params) flat.push_back(params_[i].detach().reshape({-1}));
      buffer = at::cat(flat);
    } else {
      buffer = at::empty({bucket.numel}, params_[bucket.params[0]].options());
    }
    while (flight.size() >= 2) finish();
    WorkPtr work = group_->broadcast(buffer, bucket.owner);
    flight.push_back({&bucket, std::move(buffer), std::move(work)});
  }
  while (!flight.empty()) finish();
}

void ZeroRedundancyOptimizer::save(torch::serialize::OutputArchive& /*archive*/) const {
  throw StateError(concat(
      "ZeroRedundancyOptimizer ", group_->where(),
      ": save() would write only this rank's shard. Call consolidate_state_dict(0) on every "
      "rank, then write consolidated_optimizer() on rank 0 (e.g. train::add_optimizer)"));
}

void ZeroRedundancyOptimizer::load(torch::serialize::InputArchive& /*archive*/) {
  throw StateError(concat(
      "ZeroRedundancyOptimizer ", group_->where(),
      ": load() cannot restore a shard. Load the full state into make_full_optimizer() (e.g. "
      "train::load_optimizer) and pass it to load_full_state()"));
}

void ZeroRedundancyOptimizer::consolidate_state_dict(int to_rank) {
  const std::string where =
      concat("ZeroRedundancyOptimizer ", group_->where(), ": consolidate_state_dict: ");
  consolidated_.reset();
  try {
    check_config_agreement(*group_, {{"to_rank", std::to_string(to_rank)}});
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(concat(where, "every rank must pass the same to_rank (", e.what(),
                                 ")"));
  }
  LOCKSTEP_CHECK(to_rank >= 0 && to_rank < group_->size(), where, "expected to_rank in [0, ",
                 group_->size(), "), but got ", to_rank,
                 "; pass the rank that writes the checkpoint (0 for train::save_checkpoint)");
  std::ostringstream bytes;
  {
    torch::serialize::OutputArchive archive;
    local_->save(archive);
    archive.save_to(bytes);
  }
  // Bound on any rank's archive: at most three state tensors per parameter (Adam with
  // amsgrad, centered RMSprop with momentum) plus per-parameter and fixed overhead.
  int64_t max_bytes = 0;
  std::vector<int64_t> counts(group_->size(), 0);
  for (int owner : plan_.owner) ++counts[owner];
  for (int r = 0; r < group_->size(); ++r) {
    max_bytes = std::max(max_bytes, 3 * plan_.load[r] + 8192 * counts[r]);
  }
  max_bytes += int64_t{1} << 20;
  auto archives = gather_strings(*group_, bytes.str(), to_rank, max_bytes);
  if (group_->rank() != to_rank) return;

  auto full = make_full_optimizer();
  for (int r = 0; r < group_->size(); ++r) {
    std::unique_ptr<Optimizer> shard;
    Optimizer* source = local_.get();
    if (r != to_rank) {
      auto groups = shard_groups(r);
      c10::optional<at::Device> device;
      for (const auto& g : groups) {
        if (!g.params().empty() && !device) device = g.params()[0].device();
      }
      shard = build(factory_, std::move(groups), where);
      torch::serialize::InputArchive archive;
      archive.load_from(archives[r].data(), archives[r].size(), device);
      shard->load(archive);
      source = shard.get();
    }
    for (size_t i = 0; i < params_.size(); ++i) {
      if (plan_.owner[i] != r) continue;
      if (auto* state = adapter::find_optimizer_state(*source, params_[i])) {
        adapter::set_optimizer_state(*full, params_[i], state->clone());
      }
    }
  }
  consolidated_ = std::move(full);
}

Optimizer& ZeroRedundancyOptimizer::consolidated_optimizer() {
  LOCKSTEP_CHECK_STATE(consolidated_ != nullptr, "ZeroRedundancyOptimizer ", group_->where(),
                       ": consolidated_optimizer(): no consolidated state on this rank. Call "
                       "consolidate_state_dict(to_rank) on every rank after the last step(), "
                       "then ask on to_rank only");
  return *consolidated_;
}

std::unique_ptr<Optimizer> ZeroRedundancyOptimizer::make_full_optimizer() const {
  std::vector<OptimizerParamGroup> groups;
  for (const auto& g : param_groups()) groups.emplace_back(g.params(), g.options().clone());
  return build(factory_, std::move(groups),
               concat("ZeroRedundancyOptimizer ", group_->where(), ": "));
}

void ZeroRedundancyOptimizer::load_full_state(Optimizer& full) {
  const std::string where =
      concat("ZeroRedundancyOptimizer ", group_->where(), ": load_full_state: ");
  std::vector<std::string> problems;
  std::vector<at::Tensor> full_params;
  if (typeid(full) != typeid(*local_)) {
    problems.push_back(concat("optimizer type: got ", type_name(full), ", expected ",
                              type_name(*local_), " (the factory's)"));
  } else if (full.param_groups().size() != param_groups().size()) {
    problems.push_back(concat("parameter groups: got ", full.param_groups().size(),
                              ", expected ", param_groups().size()));
  } else {
    for (size_t g = 0; g < param_groups().size(); ++g) {
      const auto& have = full.param_groups()[g].params();
      const auto& want = param_groups()[g].params();
      if (have.size() != want.size()) {
        problems.push_back(concat("parameter count of group ", g, ": got ", have.size(),
                                  ", expected ", want.size()));
        continue;
      }
      for (size_t i = 0; i < have.size(); ++i) {
        if (have[i].sizes() != want[i].sizes() || have[i].scalar_type() != want[i].scalar_type()) {
          problems.push_back(concat("parameter ", i, " of group ", g, ": got ",
                                    have[i].scalar_type(), " ", have[i].sizes(), ", expected ",
                                    want[i].scalar_type(), " ", want[i].sizes()));
        }
        full_params.push_back(have[i]);
      }
    }
  }
  if (!problems.empty()) {
    std::ostringstream os;
    os << where << "the optimizer does not match this ZeroRedundancyOptimizer (nothing was "
       << "loaded):";
    for (const auto& p : problems) os << "\n  " << p;
    os << "\nBuild it with make_full_optimizer() before loading the checkpoint into it.";
    throw InvalidArgument(os.str());
  }
  auto& local_groups = local_->param_groups();
  for (size_t g = 0; g < param_groups().size(); ++g) {
    param_groups()[g].set_options(full.param_groups()[g].options().clone());
    local_groups[g].set_options(full.param_groups()[g].options().clone());
  }
  local_->state().clear();
  for (size_t i = 0; i < params_.size(); ++i) {
    if (plan_.owner[i] != group_->rank()) continue;
    if (auto* state = adapter::find_optimizer_state(full, full_params[i])) {
      adapter::set_optimizer_state(*local_, params_[i], state->clone());
    }
  }
  consolidated_.reset();
}

}  // namespace lockstep
