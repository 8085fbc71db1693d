// DistributedDataParallel's non-template part, communication hooks and statistics.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <map>
#include <sstream>
#include <tuple>
#include <unordered_set>

#include "ddp/bucket_planner.h"
#include "ddp/reducer.h"
#include "lockstep/agreement.h"
#include "lockstep/ddp.h"
#include "lockstep/env_vars.h"
#include "lockstep/errors.h"
#include "lockstep/log.h"

namespace lockstep {

using detail::concat;

// ---------------------------------------------------------------------------------------------
// Communication hooks

namespace {

class AllreduceHook : public CommHook {
 public:
  std::string name() const override { return "allreduce"; }
  WorkPtr reduce(ProcessGroup& group, GradBucket& bucket) override {
    return group.allreduce(bucket.buffer, ReduceOp::kSum);
  }
};

// Note [Compression hooks]
// The bucket already holds gradients divided by the world size, so the reduced half-precision
// values stay in the range of the averages (no overflow from summing first). Cast buffers are
// allocated once per bucket and reused. Gloo (LibTorch 1.13) cannot sum bfloat16, so the bf16
// hook allgathers the bf16 bits (as a same-width type Gloo can move) and every rank sums the W
// contributions in float32 in rank order: bitwise identical on all ranks, half the bytes of a
// float32 ring all-reduce at two ranks, growing with the world size beyond that.
class CastHook : public CommHook {
 public:
  CastHook(at::ScalarType dtype, std::string name) : dtype_(dtype), name_(std::move(name)) {}
  std::string name() const override { return name_; }
  WorkPtr reduce(ProcessGroup& group, GradBucket& bucket) override {
    if (bucket.buffer.scalar_type() == dtype_ || !bucket.buffer.is_floating_point()) {
      return group.allreduce(bucket.buffer, ReduceOp::kSum);
    }
    if (cache_.size() <= bucket.index) cache_.resize(bucket.index + 1);
    auto& slot = cache_[bucket.index];
    if (!slot.cast.defined() || slot.cast.numel() != bucket.buffer.numel() ||
        slot.cast.device() != bucket.buffer.device()) {
      slot.cast = at::empty_like(bucket.buffer, bucket.buffer.options().dtype(dtype_));
      slot.gathered.clear();
    }
    slot.cast.copy_(bucket.buffer);
    at::Tensor out = bucket.buffer;
    if (dtype_ != at::kBFloat16) {
      at::Tensor in = slot.cast;
      auto work = group.allreduce(slot.cast, ReduceOp::kSum);
      return then_work(std::move(work), [out, in]() mutable { out.copy_(in); });
    }
    const int world = group.size();
    if (static_cast<int>(slot.gathered.size()) != world) {
      slot.gathered.clear();
      for (int r = 0; r < world; ++r) slot.gathered.push_back(at::empty_like(slot.cast).view(at::kHalf));
    }
    auto bits = slot.cast.view(at::kHalf);
    auto work = group.allgather(slot.gathered, bits);
    std::vector<at::Tensor> parts = slot.gathered;
    return then_work(std::move(work), [out, parts]() mutable {
      auto sum = parts[0].view(at::kBFloat16).to(at::kFloat);
      for (size_t r = 1; r < parts.size(); ++r) sum.add_(parts[r].view(at::kBFloat16));
      out.copy_(sum);
    });
  }

 private:
  struct Slot {
    at::Tensor cast;
    std::vector<at::Tensor> gathered;
  };
  at::ScalarType dtype_;
  std::string name_;
  std::vector<Slot> cache_;
};

}  // namespace

CommHookPtr allreduce_hook() { return std::make_shared<AllreduceHook>(); }
CommHookPtr fp16_compress_hook() { return std::make_shared<CastHook>(at::kHalf, "fp16"); }
CommHookPtr bf16_compress_hook() { return std::make_shared<CastHook>(at::kBFloat16, "bf16"); }

// ---------------------------------------------------------------------------------------------
// Statistics

std::string DDPStats::to_json() const {
  std::ostringstream os;
  os.precision(6);
  os << std::fixed;
  os << "{\"iteration\":" << iteration << ",\"forward_ms\":" << forward_ms
     << ",\"backward_compute_ms\":" << backward_compute_ms << ",\"comm_ms\":" << comm_ms
     << ",\"exposed_comm_ms\":" << exposed_comm_ms << ",\"grad_norm\":" << grad_norm
     << ",\"nonfinite\":" << (nonfinite ? "true" : "false") << ",\"buckets\":[";
  for (size_t i = 0; i < buckets.size(); ++i) {
    const auto& b = buckets[i];
    if (i) os << ",";
    os << "{\"index\":" << b.index << ",\"numel\":" << b.numel << ",\"bytes\":" << b.bytes
       << ",\"parameters\":" << b.parameters << ",\"dtype\":\"" << b.dtype
       << "\",\"transport\":\"" << b.transport << "\",\"ready_ms\":" << b.ready_ms << ",\"launched_ms\":" << b.launched_ms
       << ",\"done_ms\":" << b.done_ms << "}";
  }
  os << "]}";
  return os.str();
}

// ---------------------------------------------------------------------------------------------
// Construction helpers

namespace {

std::string describe_param(const std::string& name, const at::Tensor& t) {
  std::ostringstream os;
  os << name << " " << t.scalar_type() << " " << t.sizes();
  return os.str();
}

std::vector<std::string> split_lines(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream is(s);
  std::string line;
  while (std::getline(is, line)) out.push_back(line);
  return out;
}

// Note [Parameter verification]
// Every rank allgathers the description of its parameters (one "name dtype shape" line each),
// then every rank compares every rank's list with rank 0's. All ranks see the same data, so all
// raise the same error, naming the first differing parameter, both values and both ranks,
// before any gradient collective could hang on mismatched buckets.
void verify_parameters(ProcessGroup& pg, const std::vector<std::string>& names,
                       const std::vector<at::Tensor>& params) {
  std::string mine;
  for (size_t i = 0; i < params.size(); ++i) mine += describe_param(names[i], params[i]) + "\n";
  const int world = pg.size();
  std::vector<std::vector<std::string>> lists;
  for (const auto& text : allgather_strings(pg, mine)) lists.push_back(split_lines(text));
  const auto& ref = lists[0];
  for (int r = 1; r < world; ++r) {
    const auto& other = lists[r];
    size_t common = std::min(ref.size(), other.size());
    for (size_t i = 0; i < common; ++i) {
      if (ref[i] != other[i]) {
        throw InvalidArgument(concat(
            pg.where(), " DDP: the ranks' models differ: parameter #", i, " is '", ref[i],
            "' on rank 0 but '", other[i], "' on rank ", r,
            ". Every rank must build the same model (same layers, shapes and dtypes, "
            "registered in the same order) before wrapping it in DistributedDataParallel."));
      }
    }
    if (ref.size() != other.size()) {
      const bool ref_longer = ref.size() > other.size();
      throw InvalidArgument(concat(
          pg.where(), " DDP: the ranks' models differ: rank 0 has ", ref.size(),
          " parameters that require grad but rank ", r, " has ", other.size(),
          "; the first one only rank ", ref_longer ? 0 : r, " has is '",
          ref_longer ? ref[common] : other[common],
          "'. Every rank must build the same model and freeze the same parameters before "
          "wrapping it in DistributedDataParallel."));
    }
  }
}

// Broadcasts `tensors` from `root`, flattened into one tensor per (dtype, device) and chunk.
void broadcast_coalesced(ProcessGroup& pg, const std::vector<at::Tensor>& tensors,
                         int64_t chunk_bytes, int root = 0) {
  if (pg.size() == 1 || tensors.empty()) return;
  at::NoGradGuard no_grad;
  std::map<std::tuple<int, int, int>, std::vector<at::Tensor>> groups;
  for (const auto& t : tensors) {
    groups[{static_cast<int>(t.scalar_type()), static_cast<int>(t.device().type()),
            t.device().index()}]
        .push_back(t);
  }
  for (auto& kv : groups) {
    auto& group = kv.second;
    size_t begin = 0;
    while (begin < group.size()) {
      size_t end = begin;
      int64_t bytes = 0;
      std::vector<at::Tensor> flat_parts;
      while (end < group.size() && (end == begin || bytes < chunk_bytes)) {
        bytes += group[end].numel() * static_cast<int64_t>(group[end].element_size());
        flat_parts.push_back(group[end].detach().reshape({-1}));
        ++end;
      }
      auto flat = at::cat(flat_parts);
      pg.broadcast(flat, root)->wait();
      if (pg.rank() != root) {
        int64_t offset = 0;
        for (size_t i = begin; i < end; ++i) {
          auto& t = group[i];
          t.detach().copy_(flat.narrow(0, offset, t.numel()).view(t.sizes()));
          offset += t.numel();
        }
      }
      begin = end;
    }
  }
}

std::string rank_trace_path(const std::string& path, const ProcessGroup& pg) {
  if (path.empty() || pg.size() == 1) return path;
  auto slash = path.find_last_of('/');
  auto dot = path.find_last_of('.');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) {
    return concat(path, "-rank", pg.rank());
  }
  return concat(path.substr(0, dot), "-rank", pg.rank(), path.substr(dot));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// DistributedDataParallelBase

DistributedDataParallelBase::DistributedDataParallelBase(std::shared_ptr<torch::nn::Module> module,
                                                         ProcessGroupPtr pg, DDPOptions options)
    : module_(module), pg_(std::move(pg)), options_(std::move(options)) {
  LOCKSTEP_CHECK(module != nullptr, "Expected a module to wrap in DistributedDataParallel, but "
                 "got null.");
  LOCKSTEP_CHECK(pg_ != nullptr, "Expected a process group for DistributedDataParallel, but "
                 "got null. Create one with lockstep::init_process_group().");
  LOCKSTEP_CHECK(options_.bucket_cap_mb() > 0, pg_->where(),
                 " Expected DDPOptions::bucket_cap_mb > 0, but got ", options_.bucket_cap_mb(),
                 ".");
  LOCKSTEP_CHECK(options_.first_bucket_mb() > 0, pg_->where(),
                 " Expected DDPOptions::first_bucket_mb > 0, but got ",
                 options_.first_bucket_mb(), ".");
  register_module("module", module);

  if (options_.trace_path().empty()) {
    const char* env = std::getenv(env::kTrace);
    if (env != nullptr) options_.trace_path(env);
  }

  // Parameters that require grad, each shared (tied) tensor once, in registration order;
  // ignored names left out everywhere.
  std::unordered_set<std::string> ignored(options_.ignore().begin(), options_.ignore().end());
  {
    std::unordered_set<std::string> known;
    for (const auto& item : module->named_parameters(/*recurse=*/true)) known.insert(item.key());
    for (const auto& item : module->named_buffers(/*recurse=*/true)) known.insert(item.key());
    for (const auto& name : options_.ignore()) {
      LOCKSTEP_CHECK(known.count(name) > 0, pg_->where(), " DDPOptions::ignore names '", name,
                     "', but the wrapped module has no parameter or buffer of that name. Use "
                     "the names of module->named_parameters() / named_buffers() (without "
                     "DDP's \"module.\" prefix).");
    }
  }
  std::vector<at::Tensor> params;
  std::vector<std::string> names;
  std::vector<at::Tensor> all_state;
  std::unordered_set<const void*> seen;
  for (const auto& item : module->named_parameters(/*recurse=*/true)) {
    if (ignored.count(item.key())) continue;
    if (!seen.insert(item.value().unsafeGetTensorImpl()).second) continue;
    all_state.push_back(item.value());
    if (!item.value().requires_grad()) continue;
    params.push_back(item.value());
    names.push_back(item.key());
  }
  for (const auto& item : module->named_buffers(/*recurse=*/true)) {
    if (ignored.count(item.key())) continue;
    if (!seen.insert(item.value().unsafeGetTensorImpl()).second) continue;
    if (!item.value().defined()) continue;
    buffers_.push_back(item.value());
    all_state.push_back(item.value());
  }

  if (pg_->size() > 1 && options_.check_parameters()) verify_parameters(*pg_, names, params);
  if (options_.broadcast_parameters()) {
    broadcast_coalesced(*pg_, all_state, ddp::mib_to_bytes(250));
  }
  state_ = std::move(all_state);

  ddp::ReducerOptions ro;
  ro.cap_bytes = ddp::mib_to_bytes(options_.bucket_cap_mb());
  ro.first_cap_bytes = ddp::mib_to_bytes(options_.first_bucket_mb());
  ro.find_unused_parameters = options_.find_unused_parameters();
  ro.gradient_as_bucket_view = options_.gradient_as_bucket_view();
  ro.rebuild_buckets = options_.rebuild_buckets();
  // The built-in all-reduce hook is the default, however it was given: DDP then averages
  // inside the reduction pass (Note [Where the average is taken]) and a world-1 job
  // communicates nothing. Passing allreduce_hook() explicitly used to cost one more pass
  // over every gradient per step.
  ro.comm_hook = dynamic_cast<AllreduceHook*>(options_.comm_hook().get()) ? nullptr
                                                                           : options_.comm_hook();
  ro.nonfinite = options_.nonfinite();
  ro.static_graph = options_.static_graph();
  LOCKSTEP_CHECK(options_.max_grad_norm() >= 0 && std::isfinite(options_.max_grad_norm()),
                 pg_->where(), " Expected DDPOptions::max_grad_norm >= 0 (0: no clipping), "
                 "but got ", options_.max_grad_norm(), ".");
  ro.max_grad_norm = options_.max_grad_norm();
  ro.trace_path = rank_trace_path(options_.trace_path(), *pg_);
  reducer_ = std::make_unique<ddp::Reducer>(std::move(params), std::move(names), pg_, ro);
}

DistributedDataParallelBase::~DistributedDataParallelBase() = default;

// Note [Buffer broadcast]
// As PyTorch's DDP: buffers follow one rank before a training-mode forward if the previous
// training-mode forward was one whose backward synchronizes (and before the first). The rank
// is 0, or inside a join the highest rank still training (Note [Join] in reducer.h). Forwards
// in evaluation mode neither broadcast nor change the schedule, so an evaluation may run on
// rank 0 alone (under NoGradGuard, where prepare_for_forward is skipped too).
void DistributedDataParallelBase::begin_forward() {
  forward_start_ = std::chrono::steady_clock::now();
  if (options_.broadcast_buffers() && module_->is_training() && require_forward_buffer_sync_ &&
      !buffers_.empty()) {
    broadcast_coalesced(*pg_, buffers_, ddp::mib_to_bytes(250),
                        joining_ ? reducer_->authoritative_rank() : 0);
  }
  if (at::GradMode::is_enabled()) reducer_->prepare_for_forward(require_sync_);
}

void DistributedDataParallelBase::end_forward() {
  if (module_->is_training()) {
    require_forward_buffer_sync_ = at::GradMode::is_enabled() && require_sync_;
  }
  reducer_->record_forward(forward_start_, std::chrono::steady_clock::now());
}

// ---------------------------------------------------------------------------------------------
// Join (Note [Join] in reducer.h)

DistributedDataParallelBase::Join::Join(DistributedDataParallelBase* owner, JoinOptions options)
    : owner_(owner), uncaught_(std::uncaught_exceptions()) {
  LOCKSTEP_CHECK(!owner_->joining_, owner_->pg_->where(), " DDP: join() was called while "
                 "another join guard of this DDP object is alive; use one guard per loop.");
  owner_->reducer_->set_join(true, options);
  owner_->joining_ = true;
}

DistributedDataParallelBase::Join::Join(Join&& other) noexcept
    : owner_(other.owner_), finished_(other.finished_), uncaught_(other.uncaught_) {
  other.owner_ = nullptr;
}

DistributedDataParallelBase::Join::~Join() noexcept(false) {
  if (owner_ == nullptr) return;
  if (!finished_ && std::uncaught_exceptions() <= uncaught_) {
    finish();  // may throw: noexcept(false), and no exception is in flight
    return;
  }
  owner_->reducer_->set_join(false);
  owner_->joining_ = false;
}

void DistributedDataParallelBase::Join::finish() {
  if (owner_ == nullptr || finished_) return;
  finished_ = true;
  struct Leave {
    DistributedDataParallelBase* owner;
    ~Leave() {
      owner->reducer_->set_join(false);
      owner->joining_ = false;
    }
  } leave{owner_};
  owner_->shadow_until_all_finished();
}

DistributedDataParallelBase::Join DistributedDataParallelBase::join(JoinOptions options) {
  return Join(this, options);
}

// Mirrors, once per synchronized iteration of the ranks still training, the collectives of
// their begin_forward (buffer broadcast, bucket rebuild) and of their backward (every bucket,
// with zeros), until every rank has finished; then every rank takes the authority's model.
void DistributedDataParallelBase::shadow_until_all_finished() {
  if (pg_->size() == 1) return;
  while (true) {
    if (options_.broadcast_buffers() && module_->is_training() &&
        require_forward_buffer_sync_ && !buffers_.empty()) {
      broadcast_coalesced(*pg_, buffers_, ddp::mib_to_bytes(250),
                          reducer_->authoritative_rank());
    }
    reducer_->prepare_for_forward(/*sync=*/true);
    if (reducer_->shadow_iteration() == 0) break;
  }
  broadcast_coalesced(*pg_, state_, ddp::mib_to_bytes(250), reducer_->authoritative_rank());
}

DistributedDataParallelBase::NoSync::NoSync(DistributedDataParallelBase* owner)
    : owner_(owner), previous_(owner->require_sync_) {
  owner_->require_sync_ = false;
}

DistributedDataParallelBase::NoSync::NoSync(NoSync&& other) noexcept
    : owner_(other.owner_), previous_(other.previous_) {
  other.owner_ = nullptr;
}

DistributedDataParallelBase::NoSync::~NoSync() {
  if (owner_ != nullptr) owner_->require_sync_ = previous_;
}

DistributedDataParallelBase::NoSync DistributedDataParallelBase::no_sync() { return NoSync(this); }

DDPStats DistributedDataParallelBase::last_stats() const { return reducer_->last_stats(); }

bool DistributedDataParallelBase::step(torch::optim::Optimizer& optimizer) {
  if (reducer_->last_nonfinite() && options_.nonfinite() == NonFinite::kSkip) {
    ++skipped_steps_;
    return false;
  }
  optimizer.step();
  return true;
}

std::vector<BucketInfo> DistributedDataParallelBase::buckets() const {
  return reducer_->buckets();
}

void DistributedDataParallelBase::flush_trace() { reducer_->flush_trace(); }

}  // namespace lockstep
