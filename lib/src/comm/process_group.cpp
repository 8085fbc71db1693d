// The ProcessGroup base: the argument checks every transport shares, and the collectives
// composed of others (reduce_scatter and reduce by default).
#include "lockstep/process_group.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <functional>
#include <mutex>

#include "lockstep/errors.h"

namespace lockstep {

using detail::concat;

const char* to_string(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kAvg: return "avg";
    case ReduceOp::kMin: return "min";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kProduct: return "product";
  }
  return "?";
}

// ---------------------------------------------------------------------------------------------
// ProcessGroup

ProcessGroup::ProcessGroup(int rank, int size, std::chrono::milliseconds timeout,
                           std::shared_ptr<Store> store)
    : rank_(rank), size_(size), timeout_(timeout), store_(std::move(store)) {}

ProcessGroup::~ProcessGroup() = default;

std::string ProcessGroup::where() const { return concat("[rank ", rank_, "/", size_, "]"); }

uint64_t ProcessGroup::next_sequence() { return ++sequence_; }

void ProcessGroup::check_tensor(const char* op, const at::Tensor& tensor) const {
  LOCKSTEP_CHECK(tensor.defined(), where(), " ", op, ": expected a defined tensor, but got an "
                 "undefined one.");
  LOCKSTEP_CHECK(tensor.layout() == at::kStrided, where(), " ", op,
                 ": expected a dense tensor, but got layout ", tensor.layout(), ".");
  LOCKSTEP_CHECK(tensor.is_contiguous(), where(), " ", op,
                 ": expected a contiguous tensor, but got sizes ", tensor.sizes(), " strides ",
                 tensor.strides(), ". Call .contiguous() first.");
}

namespace {

bool averageable(const at::Tensor& t) {
  return at::isFloatingType(t.scalar_type()) || at::isComplexType(t.scalar_type());
}

}  // namespace

void ProcessGroup::check_allreduce(const at::Tensor& tensor, ReduceOp op) const {
  check_tensor("allreduce", tensor);
  LOCKSTEP_CHECK(op != ReduceOp::kAvg || averageable(tensor), where(),
                 " allreduce: expected a floating-point tensor for ReduceOp avg, but got ",
                 tensor.scalar_type(), ". Use sum and divide, or convert the tensor.");
}

void ProcessGroup::check_broadcast(const at::Tensor& tensor, int root) const {
  check_tensor("broadcast", tensor);
  LOCKSTEP_CHECK(root >= 0 && root < size(), where(), " broadcast: expected a root in [0, ",
                 size(), "), but got ", root, ".");
}

void ProcessGroup::check_reduce(const std::vector<at::Tensor>& tensors, int root,
                                ReduceOp op) const {
  LOCKSTEP_CHECK(root >= 0 && root < size(), where(), " reduce: expected a root in [0, ", size(),
                 "), but got ", root, ".");
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_tensor("reduce", tensors[i]);
    LOCKSTEP_CHECK(op != ReduceOp::kAvg || averageable(tensors[i]), where(),
                   " reduce: expected floating-point tensors for ReduceOp avg, but tensor ", i,
                   " is ", tensors[i].scalar_type(), ". Use sum and divide.");
  }
}

void ProcessGroup::check_allgather(const std::vector<at::Tensor>& outputs,
                                   const at::Tensor& input) const {
  check_tensor("allgather", input);
  LOCKSTEP_CHECK(static_cast<int>(outputs.size()) == size(), where(),
                 " allgather: expected one output tensor per rank (", size(), "), but got ",
                 outputs.size(), ".");
  for (size_t i = 0; i < outputs.size(); ++i) {
    check_tensor("allgather", outputs[i]);
    LOCKSTEP_CHECK(outputs[i].sizes() == input.sizes() &&
                       outputs[i].scalar_type() == input.scalar_type(),
                   where(), " allgather: expected output ", i, " to match the input (",
                   input.sizes(), " ", input.scalar_type(), "), but got ", outputs[i].sizes(),
                   " ", outputs[i].scalar_type(), ".");
  }
}

void ProcessGroup::check_reduce_scatter(const at::Tensor& output,
                                        const std::vector<at::Tensor>& inputs,
                                        ReduceOp op) const {
  check_tensor("reduce_scatter", output);
  LOCKSTEP_CHECK(op != ReduceOp::kAvg || averageable(output), where(),
                 " reduce_scatter: expected a floating-point tensor for ReduceOp avg, but got ",
                 output.scalar_type(), ". Use sum and divide.");
  LOCKSTEP_CHECK(static_cast<int>(inputs.size()) == size(), where(),
                 " reduce_scatter: expected one input per rank (", size(), "), but got ",
                 inputs.size(), ".");
  for (size_t i = 0; i < inputs.size(); ++i) {
    LOCKSTEP_CHECK(inputs[i].defined() && inputs[i].sizes() == output.sizes() &&
                       inputs[i].scalar_type() == output.scalar_type(),
                   where(), " reduce_scatter: expected input ", i, " to match the output (",
                   output.sizes(), " ", output.scalar_type(), "), but got ",
                   inputs[i].defined() ? concat(inputs[i].sizes(), " ", inputs[i].scalar_type())
                                       : std::string("an undefined tensor"),
                   ".");
  }
}

at::Tensor ProcessGroup::new_buffer(int64_t numel, const at::TensorOptions& options) {
  LOCKSTEP_CHECK(numel >= 0, where(), " new_buffer: expected a non-negative element count, but "
                 "got ", numel, ".");
  return at::zeros({numel}, options);
}

std::string ProcessGroup::transport_for(const at::Tensor& /*tensor*/) { return backend(); }


WorkPtr ProcessGroup::reduce_scatter(at::Tensor& output, const std::vector<at::Tensor>& inputs,
                                     ReduceOp op) {
  check_reduce_scatter(output, inputs, op);
  // Flat parts: at::cat of multi-dimensional inputs would stack them along dim 0 instead.
  std::vector<at::Tensor> parts;
  for (const auto& t : inputs) parts.push_back(t.reshape({-1}));
  auto flat = at::cat(parts);
  std::vector<WorkPtr> inner = {allreduce(flat, op)};
  at::Tensor out = output;
  const int64_t n = output.numel();
  const int64_t offset = static_cast<int64_t>(rank()) * n;
  return then_work(std::move(inner), [flat, out, n, offset]() mutable {
    out.copy_(flat.narrow(0, offset, n).view(out.sizes()));
  });
}


WorkPtr ProcessGroup::reduce(std::vector<at::Tensor>& tensors, int root, ReduceOp op) {
  check_reduce(tensors, root, op);
  // One all-reduce per dtype, over the concatenation of that dtype's tensors (in list order).
  std::vector<std::vector<size_t>> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    auto it = std::find_if(groups.begin(), groups.end(), [&](const std::vector<size_t>& g) {
      return tensors[g.front()].scalar_type() == tensors[i].scalar_type() &&
             tensors[g.front()].device() == tensors[i].device();
    });
    if (it == groups.end()) groups.push_back({i});
    else it->push_back(i);
  }
  std::vector<WorkPtr> works;
  std::vector<at::Tensor> flats;
  for (const auto& g : groups) {
    std::vector<at::Tensor> parts;
    for (size_t i : g) parts.push_back(tensors[i].reshape({-1}));
    flats.push_back(at::cat(parts));
    works.push_back(allreduce(flats.back(), op));
  }
  if (rank() != root) return then_work(std::move(works), [flats] {});
  std::vector<at::Tensor> outs = tensors;
  return then_work(std::move(works), [groups, flats, outs]() mutable {
    for (size_t k = 0; k < groups.size(); ++k) {
      int64_t offset = 0;
      for (size_t i : groups[k]) {
        const int64_t n = outs[i].numel();
        outs[i].view({-1}).copy_(flats[k].narrow(0, offset, n));
        offset += n;
      }
    }
  });
}

}  // namespace lockstep
