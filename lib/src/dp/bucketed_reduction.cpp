// DataParallel's gradient reduction: buckets filled by grad-accumulated hooks and all-reduced
// over a thread group while backward goes on.
#include <ATen/ATen.h>

#include "adapter/torch_adapter.h"
#include "dp/grad_reduction.h"
#include "lockstep/errors.h"
#include "lockstep/thread_group.h"

namespace lockstep {
namespace dp {

using detail::concat;

std::vector<std::vector<size_t>> plan_buckets(const std::vector<int64_t>& bytes,
                                              const std::vector<int>& dtypes,
                                              const BucketOptions& options) {
  LOCKSTEP_ASSERT(bytes.size() == dtypes.size());
  std::vector<std::vector<size_t>> buckets;
  // Open bucket per dtype: index into `buckets` and its size so far.
  std::vector<std::pair<int, std::pair<size_t, int64_t>>> open;
  bool first = true;
  for (size_t k = bytes.size(); k-- > 0;) {
    auto it = std::find_if(open.begin(), open.end(), [&](const auto& o) { return o.first == dtypes[k]; });
    if (it != open.end()) {
      int64_t cap = it->second.first == 0 ? options.first_cap_bytes : options.cap_bytes;
      if (it->second.second + bytes[k] > cap && !buckets[it->second.first].empty()) {
        open.erase(it);
        it = open.end();
      }
    }
    if (it == open.end()) {
      buckets.emplace_back();
      open.push_back({dtypes[k], {buckets.size() - 1, 0}});
      it = open.end() - 1;
      first = false;
    }
    buckets[it->second.first].push_back(k);
    it->second.second += bytes[k];
  }
  (void)first;
  return buckets;
}

namespace {

// Note [DataParallel gradient buckets]
// Every replica owns one flat buffer per bucket (on its device). When autograd has
// accumulated parameter p's gradient on replica r, r's hook copies it, scaled by r's share of
// the batch, into its slot of r's buffer; when the bucket is complete on r, r launches the
// bucket's asynchronous all-reduce (sum) on the thread group, strictly in bucket order so
// that every replica issues the same collectives in the same order. The reduction itself is
// done by the last replica to arrive (see Note [Thread group protocol]). After backward,
// `finish` zero-fills the slots of parameters that got no gradient on r (unused this step, or
// r had no samples), launches the remaining buckets and waits; replica 0 then copies the sums
// into the primary's .grad.
class BucketedReduction : public GradReduction {
 public:
  BucketedReduction(std::vector<std::vector<at::Tensor>> params, std::vector<std::string> names,
                    const BucketOptions& options)
      : params_(std::move(params)), names_(std::move(names)) {
    const size_t n = params_[0].size();
    std::vector<int64_t> bytes;
    std::vector<int> dtypes;
    for (const auto& p : params_[0]) {
      bytes.push_back(p.numel() * static_cast<int64_t>(p.element_size()));
      dtypes.push_back(static_cast<int>(p.scalar_type()));
    }
    auto plan = plan_buckets(bytes, dtypes, options);
    bucket_of_.assign(n, 0);
    offset_of_.assign(n, 0);
    for (size_t b = 0; b < plan.size(); ++b) {
      Bucket bucket;
      bucket.params = plan[b];
      int64_t numel = 0;
      for (size_t k : plan[b]) {
        bucket_of_[k] = b;
        offset_of_[k] = numel;
        numel += params_[0][k].numel();
      }
      bucket.numel = numel;
      buckets_.push_back(bucket);
    }
    replicas_.resize(params_.size());
    for (size_t r = 0; r < params_.size(); ++r) {
      auto& rep = replicas_[r];
      for (auto& b : buckets_) {
        rep.buffers.push_back(at::empty({b.numel}, params_[r][b.params[0]].options()));
      }
      rep.ready.assign(n, false);
      rep.pending.assign(buckets_.size(), 0);
      for (size_t k = 0; k < n; ++k) {
        rep.hooks.push_back(adapter::add_grad_accumulated_hook(
            params_[r][k], [this, r, k] { on_grad(static_cast<int>(r), k); }));
      }
    }
    groups_ = new_thread_groups(static_cast<int>(params_.size()));
  }

  void prepare(int r, double weight) override {
    auto& rep = replicas_[r];
    rep.weight = weight;
    rep.ready.assign(rep.ready.size(), false);
    for (size_t b = 0; b < buckets_.size(); ++b) rep.pending[b] = buckets_[b].params.size();
    rep.next_launch = 0;
    rep.works.assign(buckets_.size(), nullptr);
    rep.active = true;
  }

  void finish(int r) override {
    auto& rep = replicas_[r];
    if (!rep.active) prepare(r, 0.0);  // a replica without samples contributes zeros
    rep.active = false;
    for (size_t b = rep.next_launch; b < buckets_.size(); ++b) {
      for (size_t k : buckets_[b].params) {
        if (!rep.ready[k]) slot(r, k).zero_();
      }
      rep.pending[b] = 0;
    }
    launch_ready(r);
    for (auto& w : rep.works) w->wait();
    if (r != 0) return;
    for (size_t k = 0; k < params_[0].size(); ++k) {
      auto& p = params_[0][k];
      auto reduced = slot(0, k).view(p.sizes());
      auto& grad = p.mutable_grad();
      if (grad.defined() && grad.sizes() == p.sizes() && grad.is_contiguous()) {
        grad.copy_(reduced);
      } else {
        grad = reduced.clone();
      }
    }
  }

  void abort(const std::string& reason) override { abort_thread_groups(groups_[0], reason); }

  void reset() override {
    groups_ = new_thread_groups(static_cast<int>(params_.size()));
    for (auto& rep : replicas_) rep.active = false;
  }

 private:
  struct Bucket {
    std::vector<size_t> params;
    int64_t numel = 0;
  };
  struct Replica {
    std::vector<at::Tensor> buffers;
    std::vector<adapter::HookHandle> hooks;
    std::vector<bool> ready;
    std::vector<size_t> pending;
    std::vector<WorkPtr> works;
    size_t next_launch = 0;
    double weight = 1.0;
    bool active = false;
  };

  at::Tensor slot(int r, size_t k) {
    return replicas_[r].buffers[bucket_of_[k]].narrow(0, offset_of_[k], params_[r][k].numel());
  }

  void on_grad(int r, size_t k) {
    auto& rep = replicas_[r];
    if (!rep.active) return;  // a backward outside DataParallel's step
    if (rep.ready[k]) {
      throw StateError(concat("DataParallel replica ", r, ": the gradient of parameter '",
                              names_[k], "' was accumulated twice in one backward. Reentrant "
                              "backward or checkpointing through the replica is not supported."));
    }
    rep.ready[k] = true;
    const auto& grad = params_[r][k].grad();
    auto dst = slot(r, k);
    if (!grad.defined()) {
      dst.zero_();
    } else if (rep.weight == 1.0) {
      dst.copy_(grad.reshape({-1}));
    } else {
      at::mul_out(dst, grad.reshape({-1}), at::scalar_tensor(rep.weight, at::kDouble));
    }
    if (--rep.pending[bucket_of_[k]] == 0) launch_ready(r);
  }

  void launch_ready(int r) {
    auto& rep = replicas_[r];
    while (rep.next_launch < buckets_.size() && rep.pending[rep.next_launch] == 0) {
      size_t b = rep.next_launch++;
      rep.works[b] = groups_[r]->allreduce(rep.buffers[b], ReduceOp::kSum);
    }
  }

  std::vector<std::vector<at::Tensor>> params_;
  std::vector<std::string> names_;
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_;
  std::vector<int64_t> offset_of_;
  std::vector<Replica> replicas_;
  std::vector<ProcessGroupPtr> groups_;
};

}  // namespace

std::unique_ptr<GradReduction> make_bucketed_reduction(std::vector<std::vector<at::Tensor>> params,
                                                       std::vector<std::string> names,
                                                       const BucketOptions& options) {
  LOCKSTEP_ASSERT(!params.empty());
  return std::make_unique<BucketedReduction>(std::move(params), std::move(names), options);
}

}  // namespace dp
}  // namespace lockstep
