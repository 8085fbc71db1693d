// The ProcessGroup base: the argument checks every transport shares, and the collectives
// composed of others (reduce_scatter and reduce by default).
#include "lockstep/process_group.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <numeric>

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

// Note [Composed collectives]
// Transports without a direct path for gather, scatter or all-to-all (the hierarchical group)
// get these compositions of their own allgather and broadcast, so that the collective exists
// everywhere with the same checks; each moves more than the direct path, as docs/
// collectives.md tabulates:
//   gather: an allgather into temporaries; the root keeps them (every rank receives W blocks).
//   scatter: a broadcast of the root's concatenated inputs; each rank keeps its block.
//   all_to_all_single: an allgather of every rank's input padded to the longest; each rank
//     copies out the blocks addressed to it (every rank receives W x the longest input).
// The default send / recv go through store() (StoreMailbox below): message n from rank s to
// rank d is "p2p/s-d/n" (a header "tag dtype numel chunks") plus chunks of at most
// kStoreChunk bytes under "p2p/s-d/n/k". send writes the chunks, then the header, and
// completes at once (the store buffers it); recv's Work reads them on wait() (or on an
// is_completed() that finds the header), checks the header against its tensor before it
// reads a byte of payload, and deletes the keys. Every byte crosses the store's server twice:
// fine for metadata and small activations, slow for bulk data (use Gloo for that). The shm
// group has its own channel (Note [Shared-memory channel]); the hierarchical group uses this
// path only between ranks on different hosts.
struct ProcessGroup::StoreMailbox {
  std::mutex mutex;
  std::map<int, uint64_t> sent, received;  // per peer: messages so far
};

namespace {

constexpr size_t kStoreChunk = size_t{16} << 20;

std::string mailbox_key(int src, int dst, uint64_t n) { return concat("p2p/", src, "-", dst, "/", n); }

// Receives message `key` into `tensor` (Note [Composed collectives]).
class StoreRecvWork : public Work {
 public:
  StoreRecvWork(std::shared_ptr<Store> store, std::string key, at::Tensor tensor,
                std::chrono::milliseconds timeout, std::string what,
                std::function<std::string(int, int64_t, int64_t)> mismatch,
                std::function<void()> on_timeout)
      : store_(std::move(store)), key_(std::move(key)), tensor_(std::move(tensor)),
        timeout_(timeout), what_(std::move(what)), mismatch_(std::move(mismatch)),
        on_timeout_(std::move(on_timeout)) {}

  bool is_completed() override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (done_ || error_) return true;
    try {
      if (!store_->check({key_})) return false;
    } catch (const std::exception&) {
      return false;  // wait() reports it
    }
    finish();
    return true;
  }

  void wait() override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!done_ && !error_) {
      try {
        store_->wait({key_}, timeout_);
      } catch (const TimeoutError&) {
        error_ = std::make_exception_ptr(TimeoutError(concat(
            what_, " timed out after ", timeout_.count() / 1000.0, " s: the peer sent nothing. "
            "Check that it calls send for this recv (and its log).")));
        if (on_timeout_) on_timeout_();
      } catch (const std::exception& e) {
        error_ = std::make_exception_ptr(CommError(concat(what_, " failed: ", e.what())));
      }
      if (!error_) finish();
    }
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void finish() {  // the header exists; called with mutex_ held
    try {
      long long tag = 0, dtype = 0, numel = 0, chunks = 0;
      const std::string header = store_->get(key_);
      if (sscanf(header.c_str(), "%lld %lld %lld %lld", &tag, &dtype, &numel, &chunks) != 4) {
        throw CommError(concat(what_, ": malformed message header '", header, "' in the store."));
      }
      auto drop = [&] {
        for (long long k = 0; k < chunks; ++k) store_->remove(concat(key_, "/", k));
        store_->remove(key_);
      };
      std::string wrong = mismatch_(static_cast<int>(tag), dtype, numel);
      if (!wrong.empty()) {
        drop();
        throw InvalidArgument(wrong);
      }
      at::Tensor host = tensor_.device().is_cpu() ? tensor_ : at::empty_like(tensor_, at::kCPU);
      char* out = static_cast<char*>(host.data_ptr());
      const size_t bytes = static_cast<size_t>(host.numel()) * host.element_size();
      size_t offset = 0;
      for (long long k = 0; k < chunks; ++k) {
        std::string chunk = store_->get(concat(key_, "/", k));
        if (offset + chunk.size() > bytes) {
          throw CommError(concat(what_, ": the message holds more than the ", bytes,
                                 " bytes its header announced."));
        }
        std::memcpy(out + offset, chunk.data(), chunk.size());
        offset += chunk.size();
      }
      if (offset != bytes) {
        throw CommError(concat(what_, ": the message holds ", offset, " bytes, but its header "
                               "announced ", bytes, "."));
      }
      if (!tensor_.device().is_cpu()) tensor_.copy_(host);
      drop();
      done_ = true;
    } catch (const Error&) {
      error_ = std::current_exception();
    } catch (const std::exception& e) {
      error_ = std::make_exception_ptr(CommError(concat(what_, " failed: ", e.what())));
    }
  }

  std::shared_ptr<Store> store_;
  std::string key_;
  at::Tensor tensor_;
  std::chrono::milliseconds timeout_;
  std::string what_;
  std::function<std::string(int, int64_t, int64_t)> mismatch_;
  std::function<void()> on_timeout_;  // gives the recv's number back (ProcessGroup::run_recv)
  std::mutex mutex_;
  bool done_ = false;
  std::exception_ptr error_;
};

}  // namespace

ProcessGroup::ProcessGroup(int rank, int size, std::chrono::milliseconds timeout,
                           std::shared_ptr<Store> store)
    : rank_(rank), size_(size), timeout_(timeout), store_(std::move(store)),
      mailbox_(std::make_shared<StoreMailbox>()) {}

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

// ---------------------------------------------------------------------------------------------
// gather, scatter, all_to_all_single, send, recv: checks (Note [Checked collectives])

void ProcessGroup::check_gather(const std::vector<at::Tensor>& outputs, const at::Tensor& input,
                                int root) const {
  LOCKSTEP_CHECK(root >= 0 && root < size(), where(), " gather: expected a root in [0, ", size(),
                 "), but got ", root, ".");
  check_tensor("gather", input);
  if (rank() != root) {
    LOCKSTEP_CHECK(outputs.empty(), where(), " gather: expected no output tensors on a rank "
                   "other than the root (", root, "), but got ", outputs.size(),
                   ". Pass an empty list.");
    return;
  }
  LOCKSTEP_CHECK(static_cast<int>(outputs.size()) == size(), where(),
                 " gather: expected one output tensor per rank (", size(), ") on the root, but "
                 "got ", outputs.size(), ".");
  for (size_t i = 0; i < outputs.size(); ++i) {
    check_tensor("gather", outputs[i]);
    LOCKSTEP_CHECK(outputs[i].sizes() == input.sizes() &&
                       outputs[i].scalar_type() == input.scalar_type(),
                   where(), " gather: expected output ", i, " to match the input (",
                   input.sizes(), " ", input.scalar_type(), "), but got ", outputs[i].sizes(),
                   " ", outputs[i].scalar_type(), ".");
  }
}

void ProcessGroup::check_scatter(const at::Tensor& output, const std::vector<at::Tensor>& inputs,
                                 int root) const {
  LOCKSTEP_CHECK(root >= 0 && root < size(), where(), " scatter: expected a root in [0, ",
                 size(), "), but got ", root, ".");
  check_tensor("scatter", output);
  if (rank() != root) {
    LOCKSTEP_CHECK(inputs.empty(), where(), " scatter: expected no input tensors on a rank "
                   "other than the root (", root, "), but got ", inputs.size(),
                   ". Pass an empty list.");
    return;
  }
  LOCKSTEP_CHECK(static_cast<int>(inputs.size()) == size(), where(),
                 " scatter: expected one input tensor per rank (", size(), ") on the root, but "
                 "got ", inputs.size(), ".");
  for (size_t i = 0; i < inputs.size(); ++i) {
    check_tensor("scatter", inputs[i]);
    LOCKSTEP_CHECK(inputs[i].sizes() == output.sizes() &&
                       inputs[i].scalar_type() == output.scalar_type(),
                   where(), " scatter: expected input ", i, " to match the output (",
                   output.sizes(), " ", output.scalar_type(), "), but got ", inputs[i].sizes(),
                   " ", inputs[i].scalar_type(), ".");
  }
}

namespace {

std::string split_list(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += concat(i ? ", " : "", v[i]);
  return s + "]";
}

}  // namespace

void ProcessGroup::check_all_to_all(const at::Tensor& output, const at::Tensor& input,
                                    const std::vector<int64_t>& output_split_sizes,
                                    const std::vector<int64_t>& input_split_sizes) const {
  check_tensor("all_to_all_single", output);
  check_tensor("all_to_all_single", input);
  LOCKSTEP_CHECK(output.dim() >= 1 && input.dim() >= 1, where(), " all_to_all_single: expected "
                 "tensors of at least one dimension (split along dim 0), but got sizes ",
                 output.sizes(), " (output) and ", input.sizes(), " (input).");
  LOCKSTEP_CHECK(output.scalar_type() == input.scalar_type(), where(), " all_to_all_single: "
                 "expected the output's dtype to match the input's (", input.scalar_type(),
                 "), but got ", output.scalar_type(), ".");
  LOCKSTEP_CHECK(output.sizes().slice(1) == input.sizes().slice(1), where(),
                 " all_to_all_single: expected the output's rows to match the input's (sizes ",
                 input.sizes(), " after dim 0), but got sizes ", output.sizes(), ".");
  const int64_t out_bytes = output.numel() * static_cast<int64_t>(output.element_size());
  const int64_t in_bytes = input.numel() * static_cast<int64_t>(input.element_size());
  if (out_bytes > 0 && in_bytes > 0 && output.device() == input.device()) {
    const char* o = static_cast<const char*>(output.data_ptr());
    const char* i = static_cast<const char*>(input.data_ptr());
    LOCKSTEP_CHECK(o + out_bytes <= i || i + in_bytes <= o, where(), " all_to_all_single: "
                   "expected the output and the input not to overlap, but they share memory. "
                   "Pass a separate output tensor.");
  }
  auto check_splits = [&](const char* name, const std::vector<int64_t>& splits,
                          const at::Tensor& t) {
    if (splits.empty()) {
      LOCKSTEP_CHECK(t.size(0) % size() == 0, where(), " all_to_all_single: expected the ",
                     name == std::string("output_split_sizes") ? "output" : "input",
                     "'s dim 0 (", t.size(0), ") to be divisible by the group size (", size(),
                     ") for equal splits. Pass ", name, ".");
      return;
    }
    LOCKSTEP_CHECK(static_cast<int>(splits.size()) == size(), where(), " all_to_all_single: "
                   "expected ", name, " to hold one entry per rank (", size(), "), but got ",
                   splits.size(), ": ", split_list(splits), ".");
    int64_t sum = 0;
    for (int64_t v : splits) {
      LOCKSTEP_CHECK(v >= 0, where(), " all_to_all_single: expected non-negative ", name,
                     ", but got ", split_list(splits), ".");
      sum += v;
    }
    LOCKSTEP_CHECK(sum == t.size(0), where(), " all_to_all_single: expected ", name, " ",
                   split_list(splits), " to sum to dim 0 (", t.size(0), "), but they sum to ",
                   sum, ".");
  };
  check_splits("output_split_sizes", output_split_sizes, output);
  check_splits("input_split_sizes", input_split_sizes, input);
}

void ProcessGroup::check_point_to_point(const char* op, const at::Tensor& tensor,
                                        int peer) const {
  const bool send = std::string(op) == "send";
  check_tensor(op, tensor);
  LOCKSTEP_CHECK(peer >= 0 && peer < size(), where(), " ", op, ": expected a ",
                 send ? "destination" : "source", " rank in [0, ", size(), "), but got ", peer,
                 ".");
  LOCKSTEP_CHECK(peer != rank(), where(), " ", op, ": expected a ",
                 send ? "destination" : "source", " other than this rank (", rank(),
                 "), but got ", peer, ". Copy the tensor instead.");
}

namespace {

const char* descriptor_op(int64_t kind) {
  switch (kind) {
    case 1: return "gather";
    case 2: return "scatter";
    case 3: return "all_to_all_single";
  }
  return "?";
}

std::string dtype_name(int64_t dtype) {
  if (dtype < 0 || dtype >= static_cast<int64_t>(at::ScalarType::NumOptions)) {
    return concat("dtype #", dtype);
  }
  return c10::toString(static_cast<at::ScalarType>(dtype));
}

}  // namespace

std::vector<ProcessGroup::Descriptor> ProcessGroup::agree(const char* op, const Descriptor& mine,
                                                          std::exception_ptr local_error) {
  const int w = size();
  std::vector<Descriptor> all;
  if (w == 1) {
    if (local_error) std::rethrow_exception(local_error);
    all.push_back(mine);
  } else {
    const int64_t len = 4 + 2 * static_cast<int64_t>(w);
    auto packed = at::zeros({len}, at::kLong);
    int64_t* p = packed.data_ptr<int64_t>();
    p[0] = local_error ? 0 : mine.kind;
    p[1] = mine.root;
    p[2] = mine.dtype;
    p[3] = mine.numel;
    for (size_t i = 0; i < mine.input_splits.size() && i < static_cast<size_t>(w); ++i) {
      p[4 + i] = mine.input_splits[i];
    }
    for (size_t i = 0; i < mine.output_splits.size() && i < static_cast<size_t>(w); ++i) {
      p[4 + w + i] = mine.output_splits[i];
    }
    std::vector<at::Tensor> gathered;
    for (int r = 0; r < w; ++r) gathered.push_back(at::zeros({len}, at::kLong));
    try {
      allgather(gathered, packed)->wait();
    } catch (...) {
      if (local_error) std::rethrow_exception(local_error);
      throw;
    }
    if (local_error) std::rethrow_exception(local_error);
    for (int r = 0; r < w; ++r) {
      const int64_t* q = gathered[r].data_ptr<int64_t>();
      Descriptor d;
      d.kind = q[0];
      d.root = q[1];
      d.dtype = q[2];
      d.numel = q[3];
      if (mine.kind == 3) {
        d.input_splits.assign(q + 4, q + 4 + w);
        d.output_splits.assign(q + 4 + w, q + 4 + 2 * w);
      }
      all.push_back(std::move(d));
    }
  }
  auto fail = [&](const std::string& what) {
    throw InvalidArgument(concat(where(), " ", op, ": ", what, ". Every rank must pass matching "
                                 "arguments; nothing was sent."));
  };
  for (int r = 0; r < w; ++r) {
    if (all[r].kind == 0) {
      fail(concat("rank ", r, " passed invalid arguments (see its error)"));
    }
  }
  const Descriptor& first = all[0];
  for (int r = 1; r < w; ++r) {
    const Descriptor& d = all[r];
    if (d.kind != first.kind) {
      fail(concat("rank 0 called ", descriptor_op(first.kind), " but rank ", r, " called ",
                  descriptor_op(d.kind)));
    }
    if (d.root != first.root) {
      fail(concat("rank 0 names root ", first.root, " but rank ", r, " names root ", d.root));
    }
    if (d.dtype != first.dtype) {
      fail(concat("rank ", r, " passed ", dtype_name(d.dtype), " but rank 0 passed ",
                  dtype_name(first.dtype)));
    }
    if (d.numel != first.numel) {
      fail(first.kind == 3
               ? concat("rank ", r, "'s rows hold ", d.numel, " elements but rank 0's hold ",
                        first.numel)
               : concat("rank ", r, " passed ", d.numel, " elements but rank 0 passed ",
                        first.numel));
    }
  }
  if (first.kind == 3) {
    for (int dst = 0; dst < w; ++dst) {
      for (int src = 0; src < w; ++src) {
        const int64_t sent = all[src].input_splits[dst];
        const int64_t expected = all[dst].output_splits[src];
        if (sent != expected) {
          fail(concat("rank ", src, " sends ", sent, " rows to rank ", dst, " (its "
                      "input_split_sizes[", dst, "]), but rank ", dst, " expects ", expected,
                      " rows from rank ", src, " (its output_split_sizes[", src, "])"));
        }
      }
    }
  }
  return all;
}

namespace {

std::string p2p_mismatch_message(const std::string& where, int src, int tag, at::ScalarType dtype,
                                 int64_t numel, int sent_tag, int64_t sent_dtype,
                                 int64_t sent_numel) {
  if (sent_tag == tag && sent_dtype == static_cast<int64_t>(dtype) && sent_numel == numel) {
    return "";
  }
  return concat(where, " recv from rank ", src, " (tag ", tag, ", ", numel, " x ", dtype,
                "): rank ", src, " sent ", sent_numel, " x ", dtype_name(sent_dtype),
                " with tag ", sent_tag, ". Messages between two ranks are received in the order "
                "they were sent: give each recv the tag, dtype and element count of its send.");
}

}  // namespace

std::string ProcessGroup::p2p_mismatch(const std::string& where, int src, int tag,
                                       at::ScalarType dtype, int64_t numel, int sent_tag,
                                       int64_t sent_dtype, int64_t sent_numel) {
  return p2p_mismatch_message(where, src, tag, dtype, numel, sent_tag, sent_dtype, sent_numel);
}

// ---------------------------------------------------------------------------------------------
// gather, scatter, all_to_all_single, send, recv: entry points

WorkPtr ProcessGroup::gather(std::vector<at::Tensor>& outputs, const at::Tensor& input,
                             int root) {
  check_usable("gather");
  Descriptor mine;
  std::exception_ptr local;
  try {
    check_gather(outputs, input, root);
    mine = {1, root, static_cast<int64_t>(input.scalar_type()), input.numel(), {}, {}};
  } catch (const Error&) {
    local = std::current_exception();
  }
  agree("gather", mine, local);
  return run_gather(outputs, input, root);
}

WorkPtr ProcessGroup::scatter(at::Tensor& output, const std::vector<at::Tensor>& inputs,
                              int root) {
  check_usable("scatter");
  Descriptor mine;
  std::exception_ptr local;
  try {
    check_scatter(output, inputs, root);
    mine = {2, root, static_cast<int64_t>(output.scalar_type()), output.numel(), {}, {}};
  } catch (const Error&) {
    local = std::current_exception();
  }
  agree("scatter", mine, local);
  return run_scatter(output, inputs, root);
}

WorkPtr ProcessGroup::all_to_all_single(at::Tensor& output, const at::Tensor& input,
                                        const std::vector<int64_t>& output_split_sizes,
                                        const std::vector<int64_t>& input_split_sizes) {
  check_usable("all_to_all_single");
  Descriptor mine;
  std::exception_ptr local;
  try {
    check_all_to_all(output, input, output_split_sizes, input_split_sizes);
    auto equal = [&](const at::Tensor& t) {
      return std::vector<int64_t>(size(), t.size(0) / size());
    };
    int64_t row_elems = 1;
    for (size_t d = 1; d < static_cast<size_t>(input.dim()); ++d) row_elems *= input.size(d);
    mine = {3, 0, static_cast<int64_t>(input.scalar_type()), row_elems,
            input_split_sizes.empty() ? equal(input) : input_split_sizes,
            output_split_sizes.empty() ? equal(output) : output_split_sizes};
  } catch (const Error&) {
    local = std::current_exception();
  }
  auto all = agree("all_to_all_single", mine, local);
  std::vector<std::vector<int64_t>> splits;
  for (const auto& d : all) splits.push_back(d.input_splits);
  return run_all_to_all(output, input, splits, mine.numel);
}

WorkPtr ProcessGroup::send(const at::Tensor& tensor, int dst, int tag) {
  check_usable("send");
  check_point_to_point("send", tensor, dst);
  return run_send(tensor, dst, tag);
}

WorkPtr ProcessGroup::recv(at::Tensor& tensor, int src, int tag) {
  check_usable("recv");
  check_point_to_point("recv", tensor, src);
  return run_recv(tensor, src, tag);
}

// ---------------------------------------------------------------------------------------------
// The compositions (Note [Composed collectives])

WorkPtr ProcessGroup::run_gather(std::vector<at::Tensor>& outputs, const at::Tensor& input,
                                 int root) {
  if (input.numel() == 0) return PromiseWork::completed();
  std::vector<at::Tensor> all;
  for (int r = 0; r < size(); ++r) all.push_back(at::empty_like(input));
  std::vector<WorkPtr> inner = {allgather(all, input)};
  if (rank() != root) return then_work(std::move(inner), [all] {});
  std::vector<at::Tensor> outs = outputs;
  return then_work(std::move(inner), [all, outs]() mutable {
    for (size_t i = 0; i < outs.size(); ++i) outs[i].copy_(all[i]);
  });
}

WorkPtr ProcessGroup::run_scatter(at::Tensor& output, const std::vector<at::Tensor>& inputs,
                                  int root) {
  const int64_t n = output.numel();
  if (n == 0) return PromiseWork::completed();
  at::Tensor flat;
  if (rank() == root) {
    std::vector<at::Tensor> parts;
    for (const auto& t : inputs) parts.push_back(t.reshape({-1}));
    flat = at::cat(parts);
  } else {
    flat = at::empty({n * size()}, output.options());
  }
  std::vector<WorkPtr> inner = {broadcast(flat, root)};
  at::Tensor out = output;
  const int64_t offset = n * rank();
  return then_work(std::move(inner), [flat, out, n, offset]() mutable {
    out.view({-1}).copy_(flat.narrow(0, offset, n));
  });
}

WorkPtr ProcessGroup::run_all_to_all(at::Tensor& output, const at::Tensor& input,
                                     const std::vector<std::vector<int64_t>>& splits,
                                     int64_t row) {
  const int w = size();
  int64_t longest = 0;
  for (const auto& s : splits) {
    longest = std::max(longest, std::accumulate(s.begin(), s.end(), int64_t{0}) * row);
  }
  if (longest == 0) return PromiseWork::completed();
  auto padded = at::zeros({longest}, input.options());
  if (input.numel() > 0) padded.narrow(0, 0, input.numel()).copy_(input.reshape({-1}));
  std::vector<at::Tensor> all;
  for (int r = 0; r < w; ++r) all.push_back(at::empty_like(padded));
  std::vector<WorkPtr> inner = {allgather(all, padded)};
  at::Tensor out = output;
  const int me = rank();
  return then_work(std::move(inner), [all, out, splits, row, me, w]() mutable {
    auto flat_out = out.view({-1});
    int64_t at_out = 0;
    for (int src = 0; src < w; ++src) {
      const auto& s = splits[src];
      const int64_t from = std::accumulate(s.begin(), s.begin() + me, int64_t{0}) * row;
      const int64_t n = s[me] * row;
      if (n > 0) flat_out.narrow(0, at_out, n).copy_(all[src].narrow(0, from, n));
      at_out += n;
    }
  });
}

WorkPtr ProcessGroup::run_send(const at::Tensor& tensor, int dst, int tag) {
  uint64_t n;
  {
    std::lock_guard<std::mutex> lock(mailbox_->mutex);
    n = ++mailbox_->sent[dst];
  }
  const std::string key = mailbox_key(rank(), dst, n);
  const std::string what = concat(where(), " send #", n, " to rank ", dst, " (tag ", tag, ", ",
                                  tensor.numel(), " x ", tensor.scalar_type(), ") via the store");
  at::Tensor host = tensor.device().is_cpu() ? tensor : tensor.to(at::kCPU);
  const char* data = static_cast<const char*>(host.data_ptr());
  const size_t bytes = static_cast<size_t>(host.numel()) * host.element_size();
  const size_t chunks = (bytes + kStoreChunk - 1) / kStoreChunk;
  try {
    for (size_t k = 0; k < chunks; ++k) {
      const size_t len = std::min(kStoreChunk, bytes - k * kStoreChunk);
      store_->set(concat(key, "/", k), std::string(data + k * kStoreChunk, len));
    }
    store_->set(key, concat(tag, " ", static_cast<int64_t>(tensor.scalar_type()), " ",
                            tensor.numel(), " ", chunks));
  } catch (const Error& e) {
    throw CommError(concat(what, " failed: ", e.what()));
  } catch (const std::exception& e) {
    throw CommError(concat(what, " failed: ", e.what()));
  }
  return PromiseWork::completed();
}

WorkPtr ProcessGroup::run_recv(at::Tensor& tensor, int src, int tag) {
  uint64_t n;
  {
    std::lock_guard<std::mutex> lock(mailbox_->mutex);
    n = ++mailbox_->received[src];
  }
  const std::string what = concat(where(), " recv #", n, " from rank ", src, " (tag ", tag, ", ",
                                  tensor.numel(), " x ", tensor.scalar_type(), ") via the store");
  const at::ScalarType dtype = tensor.scalar_type();
  const int64_t numel = tensor.numel();
  auto mismatch = [where = where(), src, tag, dtype, numel](int sent_tag, int64_t sent_dtype,
                                                            int64_t sent_numel) {
    return p2p_mismatch_message(where, src, tag, dtype, numel, sent_tag, sent_dtype, sent_numel);
  };
  // A recv that times out leaves the queue, as on every transport: its number is given back
  // when no later recv from `src` took one, so that the next recv gets the next message.
  auto give_back = [mailbox = std::weak_ptr<StoreMailbox>(mailbox_), src, n] {
    if (auto m = mailbox.lock()) {
      std::lock_guard<std::mutex> lock(m->mutex);
      if (m->received[src] == n) --m->received[src];
    }
  };
  return std::make_shared<StoreRecvWork>(store_, mailbox_key(src, rank(), n), tensor, timeout(),
                                         what, mismatch, give_back);
}

}  // namespace lockstep
