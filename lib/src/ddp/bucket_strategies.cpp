// The two bucket strategies of Note [Bucket strategies]: FlatBuckets (DDP) and RootLists
// (DataParallel).
#include <ATen/ATen.h>

#include <cmath>
#include <cstring>

#include "ddp/bucket_strategy.h"
#include "ddp/reducer.h"
#include "lockstep/errors.h"

namespace lockstep {
namespace ddp {

using detail::concat;

namespace {

template <typename T>
void scale_loop(T* dst, const T* src, int64_t n, T scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * scale;
}

template <typename T>
void scale_inplace(T* data, int64_t n, T scale) {
  for (int64_t i = 0; i < n; ++i) data[i] *= scale;
}

bool same_memory(const at::Tensor& a, const at::Tensor& b) {
  return a.defined() && b.defined() && a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() &&
         a.strides() == b.strides();
}

// A tensor over `buffer`'s storage at `offset` shaped `sizes` (contiguous). Not an autograd
// view: the C++ optimizers' zero_grad() calls grad.detach_(), which views refuse, and a
// gradient that aliases a bucket must survive it (gradient_as_bucket_view).
at::Tensor alias_slice(const at::Tensor& buffer, int64_t offset, at::IntArrayRef sizes) {
  std::vector<int64_t> strides(sizes.size(), 1);
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d) {
    strides[d] = strides[d + 1] * std::max<int64_t>(sizes[d + 1], 1);
  }
  return at::empty({0}, buffer.options())
      .set_(buffer.storage(), buffer.storage_offset() + offset, sizes, strides);
}

void scale_in_place(at::Tensor& t, double scale) {
  if (scale == 1.0) return;
  if (t.device().is_cpu() && t.is_contiguous()) {
    if (t.scalar_type() == at::kFloat) {
      return scale_inplace(t.data_ptr<float>(), t.numel(), static_cast<float>(scale));
    }
    if (t.scalar_type() == at::kDouble) {
      return scale_inplace(t.data_ptr<double>(), t.numel(), scale);
    }
  }
  t.mul_(scale);
}

// Element `index` of a 1-d buffer: written and read without an ATen op on CPU float/double.
void set_element(at::Tensor& buffer, int64_t index, double value) {
  if (buffer.device().is_cpu() && buffer.is_contiguous()) {
    if (buffer.scalar_type() == at::kFloat) {
      buffer.data_ptr<float>()[index] = static_cast<float>(value);
      return;
    }
    if (buffer.scalar_type() == at::kDouble) {
      buffer.data_ptr<double>()[index] = value;
      return;
    }
  }
  buffer[index].fill_(value);
}

double get_element(const at::Tensor& buffer, int64_t index) {
  if (buffer.device().is_cpu() && buffer.is_contiguous()) {
    if (buffer.scalar_type() == at::kFloat) return buffer.data_ptr<float>()[index];
    if (buffer.scalar_type() == at::kDouble) return buffer.data_ptr<double>()[index];
  }
  return buffer[index].item<double>();
}

// The ranks that missed each of a bucket's parameters, from its reduced control elements
// (`undo` multiplies averaged counts back to whole ranks). Clears the controls it found set.
void read_controls(at::Tensor control, const std::vector<size_t>& params, float undo,
                   std::vector<std::pair<size_t, int>>& missing) {
  auto control_cpu = control.device().is_cpu() ? control : control.cpu();
  auto as_float =
      control_cpu.scalar_type() == at::kFloat ? control_cpu : control_cpu.to(at::kFloat);
  const float* c = as_float.data_ptr<float>();
  bool any = false;
  for (size_t k = 0; k < params.size(); ++k) {
    const float count = c[k] * undo;  // ranks that missed the parameter
    if (count > 0.5f) {
      missing.emplace_back(params[k], static_cast<int>(std::lround(count)));
      any = true;
    }
  }
  if (any) control.zero_();
}

// ---------------------------------------------------------------------------------------------
// FlatBuckets: Note [Bucket control elements], Note [Where the average is taken].

class FlatBuckets : public BucketStrategy {
 public:
  explicit FlatBuckets(const BucketContext& c) : c_(c) {
    const auto& options = *c_.options;
    fused_average_ = c_.world > 1 && !options.comm_hook;
    op_ = options.average ? ReduceOp::kAvg : ReduceOp::kSum;
    inv_world_ = options.average ? 1.0 / c_.world : 1.0;
  }

  std::vector<std::string> build(const std::vector<std::vector<size_t>>& plan) override {
    const auto& params = *c_.params;
    std::vector<Bucket> buckets(plan.size());
    std::vector<Slot> slots(params.size());
    std::vector<std::string> transports;
    for (size_t b = 0; b < plan.size(); ++b) {
      auto& bucket = buckets[b];
      bucket.params = plan[b];
      for (size_t i : bucket.params) bucket.gradient_numel += params[i].numel();
      const auto& first = params[bucket.params.front()];
      // Gradients, one control element per parameter, the presence element (Note [Join]) and
      // the non-finite element (Note [Non-finite gradients] in reducer.h).
      // Note [CUDA buckets]: a CUDA bucket lives on its parameters' device; ProcessGroupGloo
      // stages CUDA tensors through pinned host memory itself, so the same code path serves
      // both. The group may hand out memory it reduces faster (Note [Shared reduction
      // buffers] in comm/shm_group.cpp). Collective: every rank plans the same buckets.
      bucket.buffer = c_.group->new_buffer(
          bucket.gradient_numel + static_cast<int64_t>(bucket.params.size()) + 2,
          first.options().requires_grad(false));
      transports.push_back(c_.options->comm_hook
                               ? concat(c_.hook->name(), " over ", c_.group->backend())
                               : c_.group->transport_for(bucket.buffer));
      int64_t offset = 0;
      for (size_t i : bucket.params) {
        slots[i].view = alias_slice(bucket.buffer, offset, params[i].sizes());
        offset += params[i].numel();
      }
      if (c_.options->comm_hook) {
        // What the hook sees, built once per plan (GradBucket::gradients alias the buffer).
        auto& gb = bucket.hook_view;
        gb.index = b;
        gb.buffer = bucket.buffer;
        gb.gradient_numel = bucket.gradient_numel;
        for (size_t i : bucket.params) {
          gb.gradients.push_back(slots[i].view);
          gb.parameter_indices.push_back(i);
          gb.parameter_names.push_back((*c_.names)[i]);
        }
      }
    }
    if (c_.options->gradient_as_bucket_view) {
      // Carry existing gradients into the new views and alias them.
      for (size_t i = 0; i < params.size(); ++i) {
        auto& grad = params[i].mutable_grad();
        if (!grad.defined()) continue;
        if (!same_memory(grad, slots[i].view)) slots[i].view.copy_(grad);
        grad = slots[i].view;
      }
    }
    buckets_ = std::move(buckets);
    slots_ = std::move(slots);
    return transports;
  }

  void copy_in(size_t index, bool /*have_grad*/) override {
    auto& view = slots_[index].view;
    auto& grad = (*c_.params)[index].mutable_grad();
    const double scale = fused_average_ ? 1.0 : inv_world_;
    if (c_.options->gradient_as_bucket_view) {
      if (same_memory(grad, view)) {
        scale_in_place(view, scale);
      } else if (grad.defined()) {
        // The gradient was (re)created by autograd, e.g. after zero_grad set it to None.
        copy_scaled(view, grad, scale);
        grad = view;
      } else {
        view.zero_();
      }
    } else if (grad.defined()) {
      copy_scaled(view, grad, scale);
    } else {
      view.zero_();
    }
  }

  void mark_missing(size_t b, size_t position) override {
    auto& bucket = buckets_[b];
    bucket.buffer[bucket.gradient_numel + static_cast<int64_t>(position)].fill_(1);
  }

  WorkPtr launch(size_t b, bool is_last) override {
    auto& bucket = buckets_[b];
    set_element(bucket.buffer, presence_index(bucket), present_ ? 1.0 : 0.0);
    set_element(bucket.buffer, presence_index(bucket) + 1, bucket.nonfinite ? 1.0 : 0.0);
    if (fused_average_) return c_.group->allreduce(bucket.buffer, op_);
    auto& gb = bucket.hook_view;
    gb.is_last = is_last;
    auto work = c_.hook->reduce(*c_.group, gb);
    LOCKSTEP_ASSERT(work != nullptr, "comm hook '", c_.hook->name(), "' returned no Work");
    return work;
  }

  void set_present(bool present) override { present_ = present; }

  void fill_absent(size_t b) override {
    auto& bucket = buckets_[b];
    bucket.buffer.narrow(0, 0, presence_index(bucket)).zero_();
  }

  int read_present(size_t b) override {
    const auto& bucket = buckets_[b];
    return static_cast<int>(std::lround(get_element(bucket.buffer, presence_index(bucket)) * undo()));
  }

  void mark_nonfinite(size_t b) override { buckets_[b].nonfinite = true; }

  int read_nonfinite(size_t b) override {
    const auto& bucket = buckets_[b];
    return static_cast<int>(
        std::lround(get_element(bucket.buffer, presence_index(bucket) + 1) * undo()));
  }

  double squared_norm(size_t b) override {
    const auto& bucket = buckets_[b];
    auto grads = bucket.buffer.narrow(0, 0, bucket.gradient_numel);
    if (grads.device().is_cpu() && grads.scalar_type() == at::kFloat) {
      const float* g = grads.data_ptr<float>();
      double sum = 0;
      for (int64_t i = 0; i < bucket.gradient_numel; ++i) sum += static_cast<double>(g[i]) * g[i];
      return sum;
    }
    return grads.to(at::kDouble).pow(2).sum().item<double>();
  }

  void read_missing(size_t b, std::vector<std::pair<size_t, int>>& missing) override {
    const auto& bucket = buckets_[b];
    read_controls(bucket.buffer.narrow(0, bucket.gradient_numel,
                                       static_cast<int64_t>(bucket.params.size())),
                  bucket.params, static_cast<float>(undo()), missing);
  }

  void write_back(size_t index, bool unused_everywhere, double scale) override {
    if (unused_everywhere) return;
    auto& grad = (*c_.params)[index].mutable_grad();
    auto& view = slots_[index].view;
    if (c_.options->gradient_as_bucket_view) {
      scale_in_place(view, scale);
      if (!same_memory(grad, view)) grad = view;
    } else if (grad.defined() && !same_memory(grad, view)) {
      copy_scaled(grad, view, scale);
    } else {
      grad = view.clone();
      scale_in_place(grad, scale);
    }
  }

  void reset() override {
    for (auto& b : buckets_) b.nonfinite = false;
  }

 private:
  struct Bucket {
    std::vector<size_t> params;
    at::Tensor buffer;  // gradients, one control element per parameter, presence, non-finite
    int64_t gradient_numel = 0;
    bool nonfinite = false;  // this rank had a NaN/Inf gradient in it this iteration
    GradBucket hook_view;    // handed to the comm hook (comm hooks only)
  };

  static int64_t presence_index(const Bucket& bucket) {
    return bucket.gradient_numel + static_cast<int64_t>(bucket.params.size());
  }
  // Multiplies averaged control and presence elements back to whole ranks.
  double undo() const { return fused_average_ && op_ == ReduceOp::kAvg ? c_.world : 1.0; }
  struct Slot {
    at::Tensor view;  // bucket slice shaped like the parameter
  };

  BucketContext c_;
  bool fused_average_ = false;  // Note [Where the average is taken]
  ReduceOp op_ = ReduceOp::kAvg;
  double inv_world_ = 1.0;
  bool present_ = true;
  std::vector<Bucket> buckets_;
  std::vector<Slot> slots_;
};

// ---------------------------------------------------------------------------------------------
// RootLists: Note [Reducing into a root].

class RootLists : public BucketStrategy {
 public:
  explicit RootLists(const BucketContext& c) : c_(c) {
    LOCKSTEP_CHECK(!c_.options->comm_hook, c_.group->where(), " A Reducer that reduces into a "
                   "root does not take a comm hook (Note [Reducing into a root]).");
    root_ = c_.options->root;
    op_ = c_.options->average ? ReduceOp::kAvg : ReduceOp::kSum;
  }

  std::vector<std::string> build(const std::vector<std::vector<size_t>>& plan) override {
    const auto& params = *c_.params;
    reset();
    std::vector<Bucket> buckets(plan.size());
    std::vector<std::string> transports;
    position_.assign(params.size(), {0, 0});
    for (size_t b = 0; b < plan.size(); ++b) {
      auto& bucket = buckets[b];
      bucket.params = plan[b];
      const auto& first = params[bucket.params.front()];
      bucket.control = at::zeros({static_cast<int64_t>(bucket.params.size())},
                                 first.options().dtype(at::kFloat).requires_grad(false));
      bucket.inputs.resize(bucket.params.size() + 1);
      bucket.inputs.back() = bucket.control;
      transports.push_back(concat(c_.group->backend(), " (reduce into rank ", root_, ")"));
      for (size_t k = 0; k < bucket.params.size(); ++k) position_[bucket.params[k]] = {b, k};
    }
    buckets_ = std::move(buckets);
    slots_.assign(params.size(), Slot());
    return transports;
  }

  void copy_in(size_t index, bool have_grad) override {
    auto& slot = slots_[index];
    const auto& param = (*c_.params)[index];
    auto& grad = param.mutable_grad();
    auto& input = buckets_[position_[index].first].inputs[position_[index].second];
    const bool root = c_.group->rank() == root_;
    if (have_grad) {
      input = grad.contiguous();  // the gradient itself when it is contiguous
      if (root) grad = input;
    } else if (root) {
      slot.saved = grad;
      slot.replaced = true;
      grad = at::zeros_like(param, at::MemoryFormat::Contiguous);
      input = grad;
    } else {
      if (!slot.zeros.defined()) slot.zeros = at::zeros_like(param, at::MemoryFormat::Contiguous);
      input = slot.zeros;
    }
  }

  void mark_missing(size_t b, size_t position) override {
    buckets_[b].control[static_cast<int64_t>(position)].fill_(1);
    buckets_[b].control_set = true;
  }

  WorkPtr launch(size_t b, bool /*is_last*/) override {
    return c_.group->reduce(buckets_[b].inputs, root_, op_);
  }

  // Join is DDP's (the Reducer refuses it with a root): every rank is always present.
  void set_present(bool /*present*/) override {}
  void fill_absent(size_t /*b*/) override {}
  int read_present(size_t /*b*/) override { return c_.world; }
  // Non-finite policies and clipping are DDP's (DataParallel's owner checks its own result).
  void mark_nonfinite(size_t /*b*/) override {}
  int read_nonfinite(size_t /*b*/) override { return 0; }
  double squared_norm(size_t /*b*/) override { return 0; }

  void read_missing(size_t b, std::vector<std::pair<size_t, int>>& missing) override {
    // Only the root receives the counts; reset() clears the other ranks' controls.
    if (c_.group->rank() != root_) return;
    auto& bucket = buckets_[b];
    read_controls(bucket.control, bucket.params,
                  op_ == ReduceOp::kAvg ? static_cast<float>(c_.world) : 1.0f, missing);
    bucket.control_set = false;
  }

  void write_back(size_t index, bool unused_everywhere, double scale) override {
    // The result is in place. A zero stand-in that some rank reduced into stays the
    // gradient; reset() restores the .grad it replaced for one nobody used.
    auto& slot = slots_[index];
    if (scale != 1.0 && !unused_everywhere && c_.group->rank() == root_) {
      (*c_.params)[index].mutable_grad().mul_(scale);
    }
    if (slot.replaced && !unused_everywhere) {
      slot.saved = at::Tensor();
      slot.replaced = false;
    }
  }

  void reset() override {
    for (auto& b : buckets_) {  // drop this iteration's gradient references; clear controls
      for (size_t k = 0; k + 1 < b.inputs.size(); ++k) b.inputs[k] = at::Tensor();
      if (b.control_set) b.control.zero_();
      b.control_set = false;
    }
    // The .grad a zero stand-in replaced, for a parameter no rank used or after a failure.
    for (size_t i = 0; i < slots_.size(); ++i) {
      auto& slot = slots_[i];
      if (!slot.replaced) continue;
      (*c_.params)[i].mutable_grad() = slot.saved;
      slot.saved = at::Tensor();
      slot.replaced = false;
    }
  }

 private:
  struct Bucket {
    std::vector<size_t> params;
    std::vector<at::Tensor> inputs;  // this rank's gradients, then `control`
    at::Tensor control;              // one control element per parameter
    bool control_set = false;        // a control element of this rank is 1
  };
  struct Slot {
    at::Tensor zeros;       // non-root rank: what a missing gradient contributes
    bool replaced = false;  // root: .grad set to zeros for a missing gradient
    at::Tensor saved;       // ... and the .grad it replaced
  };

  BucketContext c_;
  int root_ = 0;
  ReduceOp op_ = ReduceOp::kAvg;
  std::vector<Bucket> buckets_;
  std::vector<Slot> slots_;
  std::vector<std::pair<size_t, size_t>> position_;  // parameter -> (bucket, position)
};

}  // namespace

void copy_scaled(at::Tensor& dst, const at::Tensor& src, double scale) {
  if (dst.device().is_cpu() && src.device().is_cpu() && src.is_contiguous() &&
      dst.is_contiguous() && src.scalar_type() == dst.scalar_type() &&
      src.numel() == dst.numel()) {
    const int64_t n = src.numel();
    if (scale == 1.0) {
      std::memcpy(dst.data_ptr(), src.data_ptr(), n * src.element_size());
      return;
    }
    if (src.scalar_type() == at::kFloat) {
      return scale_loop(dst.data_ptr<float>(), src.data_ptr<float>(), n,
                        static_cast<float>(scale));
    }
    if (src.scalar_type() == at::kDouble) {
      return scale_loop(dst.data_ptr<double>(), src.data_ptr<double>(), n, scale);
    }
  }
  dst.copy_(src);
  if (scale != 1.0) dst.mul_(scale);
}

std::unique_ptr<BucketStrategy> make_flat_buckets(const BucketContext& context) {
  return std::make_unique<FlatBuckets>(context);
}

std::unique_ptr<BucketStrategy> make_root_lists(const BucketContext& context) {
  return std::make_unique<RootLists>(context);
}

}  // namespace ddp
}  // namespace lockstep
