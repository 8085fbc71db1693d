#pragma once
/// \file
/// Process groups: the collectives lockstep's DDP and users run across ranks.
///
/// `init_process_group()` rendezvouses through a Store and returns a `ProcessGroup` backed by
/// c10d's ProcessGroupGloo (or, where ranks share a host and the transport allows, lockstep's
/// shared-memory path). Every collective is asynchronous and returns a `Work`; `wait()`
/// rethrows failures as lockstep errors carrying `[rank r/w]`, the operation and its sequence
/// number. Collectives are *collective*: every rank must call the same ones in the same order.

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/launch_env.h"
#include "lockstep/options.h"
#include "lockstep/store.h"

namespace lockstep {

/// Reduction applied by allreduce / reduce_scatter.
enum class ReduceOp { kSum, kAvg, kMin, kMax, kProduct };

/// "sum", "avg", "min", "max", "product".
const char* to_string(ReduceOp op);

class ProcessGroup;
using ProcessGroupPtr = std::shared_ptr<ProcessGroup>;
ProcessGroupPtr new_group(ProcessGroup& parent, const std::vector<int>& ranks);

/// Handle to an asynchronous operation. Thread-safe.
class Work {
 public:
  virtual ~Work() = default;
  /// True once the operation finished, successfully or not. Does not throw.
  virtual bool is_completed() = 0;
  /// Blocks until the operation finished; rethrows its failure (CommError, TimeoutError, ...).
  /// May be called more than once; every call after a failure rethrows it.
  virtual void wait() = 0;
};
using WorkPtr = std::shared_ptr<Work>;

/// A Work completed by whoever runs the operation (`set_completed` / `set_error`); for
/// ProcessGroup implementations that run collectives on their own threads.
class PromiseWork : public Work {
 public:
  PromiseWork();
  ~PromiseWork() override;
  bool is_completed() override;
  void wait() override;
  /// Marks success and wakes waiters. Idempotent with respect to the first outcome.
  void set_completed();
  /// Marks failure and wakes waiters; `wait()` rethrows `error`.
  void set_error(std::exception_ptr error);
  /// A Work that is already complete.
  static WorkPtr completed();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

/// A Work that completes when every Work of `inner` completed, after running `then` exactly
/// once: the step of a composite operation that needs their result (a copy back, a division,
/// a cast back after compression). `then` runs on the first wait(), or on the first
/// is_completed() that finds every inner Work complete, so nobody observes completion before
/// it ran. wait() rethrows the first inner failure (and `then` does not run); a `then` that
/// throws is rethrown by that wait() and runs again on the next one.
WorkPtr then_work(std::vector<WorkPtr> inner, std::function<void()> then);
/// then_work over one Work.
WorkPtr then_work(WorkPtr inner, std::function<void()> then);

/// Options for `init_process_group`. Every field has a default; unset durations fall back to
/// the `LOCKSTEP_*` environment variable, then the built-in default.
struct ProcessGroupOptions {
  /// "env://" (the launch environment; default), "tcp://host:port" or "file:///path".
  LOCKSTEP_ARG(std::string, init_method) = "env://";
  /// Rank of this process; -1 (default): from the launch environment.
  LOCKSTEP_ARG(int, rank) = -1;
  /// Number of processes; -1 (default): from the launch environment.
  LOCKSTEP_ARG(int, world_size) = -1;
  /// Scopes store keys so that two jobs sharing a store never mix; "" (default): the launch
  /// environment's job id (LOCKSTEP_JOB_ID, TORCHELASTIC_RUN_ID, SLURM_JOB_ID) or "default".
  LOCKSTEP_ARG(std::string, job_id) = "";
  /// Time for the store connection and for all ranks to join; 0 (default):
  /// LOCKSTEP_RENDEZVOUS_TIMEOUT seconds, else 120 s.
  LOCKSTEP_ARG(std::chrono::milliseconds, rendezvous_timeout) = std::chrono::milliseconds(0);
  /// Time one collective may take before it fails; 0 (default): LOCKSTEP_TIMEOUT seconds,
  /// else 300 s (c10d's default is 30 minutes, which hides a dead peer far too long).
  LOCKSTEP_ARG(std::chrono::milliseconds, timeout) = std::chrono::milliseconds(0);
  /// Gloo worker threads (concurrent collectives). Default 2.
  LOCKSTEP_ARG(int, threads) = 2;
  /// Network interface Gloo binds to; "" (default): LOCKSTEP_SOCKET_IFNAME, GLOO_SOCKET_IFNAME,
  /// else loopback for a loopback master and the hostname's address otherwise.
  LOCKSTEP_ARG(std::string, socket_ifname) = "";
  /// "gloo", "shm", "nccl" or "auto"; "" (default): LOCKSTEP_TRANSPORT, else "auto". "auto":
  /// shared memory among ranks that share a host (one host: "shm"; several: "hier", Gloo
  /// between hosts), Gloo when no two ranks share one, and CUDA tensors over NCCL when every
  /// rank has its own GPU (docs/gpu.md). "nccl" insists on NCCL for CUDA tensors; "shm"
  /// always builds the shm or hier group; "gloo" always Gloo.
  LOCKSTEP_ARG(std::string, transport) = "";
  /// This rank's host identity: ranks with equal identities use shared memory among
  /// themselves. "" (default): hostname + "/" + the kernel's boot id. Set it when containers
  /// on one machine share /dev/shm but not a hostname, or to emulate several hosts in a test.
  LOCKSTEP_ARG(std::string, host_id) = "";
  /// A store to rendezvous through instead of `init_method` (ranks as threads share
  /// `Store::hash()`). Default: none.
  LOCKSTEP_ARG(std::shared_ptr<Store>, store) = nullptr;
  /// The environment to resolve the topology from; empty (default): this process's.
  LOCKSTEP_ARG(EnvMap, environment) = {};
};

/// A group of ranks running collectives together. Obtain one from `init_process_group`.
/// Methods may be called from any thread, but collectives must be issued in the same order
/// on every rank.
class ProcessGroup {
 public:
  virtual ~ProcessGroup();

  /// This process's rank in the group.
  int rank() const { return rank_; }
  /// Number of ranks in the group.
  int size() const { return size_; }
  /// "[rank r/w]", the prefix of every message that concerns this group.
  std::string where() const;

  /// Name of the transport: "gloo", "shm", "hier", ...
  virtual std::string backend() const = 0;

  /// Reduces `tensor` in place across ranks. kAvg divides the sum by size() (floating
  /// types only). Collective.
  virtual WorkPtr allreduce(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum) = 0;
  /// Replaces `tensor` with root's on every rank. Collective.
  virtual WorkPtr broadcast(at::Tensor& tensor, int root = 0) = 0;
  /// outputs[i] receives rank i's `input`; outputs must hold size() tensors shaped like
  /// `input`. Collective.
  virtual WorkPtr allgather(std::vector<at::Tensor>& outputs, const at::Tensor& input) = 0;
  /// `output` receives the reduction over ranks of inputs[rank()]. Collective. The default
  /// implementation all-reduces the concatenated inputs (Gloo has no native reduce_scatter).
  virtual WorkPtr reduce_scatter(at::Tensor& output, const std::vector<at::Tensor>& inputs,
                                 ReduceOp op = ReduceOp::kSum);
  /// Reduces each tensor of `tensors` element-wise across ranks into root's tensors, as one
  /// collective: every rank passes a list of the same length, with the same element counts
  /// and dtypes in the same order. Only root's tensors change; the other ranks' are only
  /// read (and must not be touched until the Work completed). kAvg divides by size()
  /// (floating types only). The default implementation all-reduces the concatenated tensors
  /// of each dtype and copies the result back on root; the thread group reduces straight
  /// into root's tensors, with no copy (DataParallel's gradient reduction). Collective.
  virtual WorkPtr reduce(std::vector<at::Tensor>& tensors, int root = 0,
                         ReduceOp op = ReduceOp::kSum);
  /// Completes when every rank reached it. Collective.
  virtual WorkPtr barrier() = 0;

  // Note [Checked collectives]
  // gather, scatter and all_to_all_single check their arguments in two rounds before any
  // payload moves: each rank checks its own (ProcessGroup::check_*), then the ranks exchange a
  // small descriptor (operation, root, dtype, element counts, split sizes: one all-gather of
  // 4 + 2 x size() int64s, waited for on the caller's thread) and every rank checks every
  // other's. A mistake on one rank therefore fails every rank with the same InvalidArgument
  // naming the rank and what it passed against what was expected, and the group stays usable:
  // nothing was sent. The payload then moves on the transport's own path (Gloo's, the shared
  // segment's or the thread group's); a transport without one uses the compositions of the
  // base class (docs/collectives.md lists each transport's cost).

  /// Rank i's `input` lands in `outputs[i]` on `root`. On root, `outputs` holds size() tensors
  /// shaped and typed like `input`; on the other ranks it must be empty. Every rank passes an
  /// input of the same dtype and element count. Collective; the call returns once every rank
  /// has reached it (Note [Checked collectives]), the Work when the data moved.
  WorkPtr gather(std::vector<at::Tensor>& outputs, const at::Tensor& input, int root = 0);
  /// `output` receives root's `inputs[rank()]`. On root, `inputs` holds size() tensors shaped
  /// and typed like root's `output`; on the other ranks it must be empty. Every rank passes an
  /// output of the same dtype and element count. Collective (Note [Checked collectives]).
  WorkPtr scatter(at::Tensor& output, const std::vector<at::Tensor>& inputs, int root = 0);
  /// torch.distributed.all_to_all_single: `input` is cut along dim 0 into size() blocks of
  /// `input_split_sizes[j]` rows, block j goes to rank j, and the block from rank i lands in
  /// `output` at rows sum(output_split_sizes[0..i)). Empty split sizes mean equal splits (dim 0
  /// divisible by size()). Splits must sum to dim 0, the rows' other dimensions and the dtype
  /// must agree, and rank i's `output_split_sizes[j]` must equal rank j's
  /// `input_split_sizes[i]`. `input` and `output` must not overlap. Collective (Note [Checked
  /// collectives]).
  WorkPtr all_to_all_single(at::Tensor& output, const at::Tensor& input,
                            const std::vector<int64_t>& output_split_sizes = {},
                            const std::vector<int64_t>& input_split_sizes = {});
  /// Sends `tensor` to rank `dst`. Messages from one rank to another are received in the
  /// order they were sent; `tag` is checked, not used to select (a recv whose tag differs
  /// from the next message's fails naming both tags). `tensor` must not change until the
  /// Work completed. Not collective: only `dst` takes part, with a matching recv.
  WorkPtr send(const at::Tensor& tensor, int dst, int tag = 0);
  /// Receives the next message from rank `src` into `tensor`, which must have the sender's
  /// dtype and element count (else wait() throws InvalidArgument naming both). wait() is
  /// bounded by timeout(). Not collective.
  WorkPtr recv(at::Tensor& tensor, int src, int tag = 0);

  /// A zero-filled flat tensor of `numel` elements meant to be all-reduced again and again
  /// (a DDP bucket). A transport with a faster path for memory it owns returns such memory:
  /// the shared-memory group maps a region every local rank can read, and an all-reduce of
  /// exactly this tensor then reduces in place with no copy in or out. The default returns
  /// at::zeros. The tensor keeps its memory alive; views of it are fine, but only the whole
  /// tensor takes the fast path. Collective: every rank calls it in the same order with the
  /// same `numel` and options.
  virtual at::Tensor new_buffer(int64_t numel, const at::TensorOptions& options);
  /// How an all-reduce of `tensor` would travel, for statistics and traces: backend() by
  /// default; e.g. "shm (in place)" for a shared-memory group's own buffer.
  virtual std::string transport_for(const at::Tensor& tensor);

  /// True for the placeholder new_group() returns to a rank outside the subgroup.
  virtual bool is_member() const { return true; }

  /// Timeout of one collective.
  std::chrono::milliseconds timeout() const { return timeout_; }
  /// The store the group rendezvoused through (scoped to this group), for small metadata.
  const std::shared_ptr<Store>& store() const { return store_; }

 protected:
  ProcessGroup(int rank, int size, std::chrono::milliseconds timeout,
               std::shared_ptr<Store> store);
  /// Next collective sequence number of this group (1, 2, ...), for error messages.
  uint64_t next_sequence();

  // Note [Argument checks]
  // Every transport validates a collective's arguments with these, before anything is sent or
  // any rank waits, so the same mistake gets the same message on every transport. Each
  // throws InvalidArgument naming this rank, the operation and the offending tensor.
  /// A defined, dense, contiguous tensor.
  void check_tensor(const char* op, const at::Tensor& tensor) const;
  /// check_tensor, and a floating-point or complex dtype for kAvg.
  void check_allreduce(const at::Tensor& tensor, ReduceOp op) const;
  /// check_tensor, and a root in [0, size()).
  void check_broadcast(const at::Tensor& tensor, int root) const;
  /// A root in [0, size()), valid tensors, floating-point or complex ones for kAvg.
  void check_reduce(const std::vector<at::Tensor>& tensors, int root, ReduceOp op) const;
  /// One output per rank, each a valid tensor shaped and typed like `input`.
  void check_allgather(const std::vector<at::Tensor>& outputs, const at::Tensor& input) const;
  /// One input per rank, each shaped and typed like a valid `output`; a floating-point or
  /// complex dtype for kAvg.
  void check_reduce_scatter(const at::Tensor& output, const std::vector<at::Tensor>& inputs,
                            ReduceOp op) const;
  /// A root in [0, size()), a valid input; on root one output per rank shaped and typed like
  /// it, elsewhere no outputs.
  void check_gather(const std::vector<at::Tensor>& outputs, const at::Tensor& input,
                    int root) const;
  /// A root in [0, size()), a valid output; on root one input per rank shaped and typed like
  /// it, elsewhere no inputs.
  void check_scatter(const at::Tensor& output, const std::vector<at::Tensor>& inputs,
                     int root) const;
  /// Valid, non-overlapping tensors of one dtype with at least one dimension and the same
  /// row shape; split sizes (size() non-negative entries, or none for equal splits) that sum
  /// to each tensor's dim 0.
  void check_all_to_all(const at::Tensor& output, const at::Tensor& input,
                        const std::vector<int64_t>& output_split_sizes,
                        const std::vector<int64_t>& input_split_sizes) const;
  /// A valid tensor and a peer in [0, size()) other than this rank (`op` "send" or "recv").
  void check_point_to_point(const char* op, const at::Tensor& tensor, int peer) const;

  /// The exchanged descriptor of a checked collective (Note [Checked collectives]).
  struct Descriptor {
    int64_t kind = 0;   ///< 1 gather, 2 scatter, 3 all_to_all_single; 0: this rank's own
                        ///< check failed
    int64_t root = 0;
    int64_t dtype = 0;
    int64_t numel = 0;  ///< element count (gather, scatter) or elements per row (all-to-all)
    std::vector<int64_t> input_splits, output_splits;  ///< all-to-all: size() each
  };
  /// Exchanges `mine` and checks every rank's against every other's; throws InvalidArgument
  /// naming the first rank that disagrees (every rank throws the same). `local_error` is this
  /// rank's own check failure: exchanged as kind 0 and rethrown here after the exchange.
  /// Returns every rank's descriptor. Collective.
  std::vector<Descriptor> agree(const char* op, const Descriptor& mine,
                                std::exception_ptr local_error);

  /// A group of this group's transport over `ranks` (this group's ranks, sorted), in which this
  /// rank is `sub_rank`, rendezvousing through `store` (scoped to the subgroup). Called by
  /// new_group on members only, after the ranks were agreed; `id` numbers this group's
  /// subgroups (1, 2, ...; equal on every rank). Collective over the members. The default
  /// throws StateError (a ProcessGroup written outside lockstep has no transport to copy).
  virtual ProcessGroupPtr make_subgroup(const std::vector<int>& ranks, int sub_rank, uint64_t id,
                                        const std::shared_ptr<Store>& store);
  /// Throws StateError when this group may not be used (new_group's placeholder for
  /// non-members); called first by gather, scatter, all_to_all_single, send and recv.
  virtual void check_usable(const char* /*op*/) const {}

  /// The transport's part of gather / scatter / all_to_all_single / send / recv, called after
  /// the checks with resolved arguments (explicit split sizes, every rank's descriptor). The
  /// defaults compose allgather and broadcast, and send messages through store() (Note
  /// [Composed collectives] in process_group.cpp); transports with a direct path override.
  virtual WorkPtr run_gather(std::vector<at::Tensor>& outputs, const at::Tensor& input,
                             int root);
  virtual WorkPtr run_scatter(at::Tensor& output, const std::vector<at::Tensor>& inputs,
                              int root);
  /// `splits[i]` holds rank i's input split sizes (rows); `row` the elements per row.
  virtual WorkPtr run_all_to_all(at::Tensor& output, const at::Tensor& input,
                                 const std::vector<std::vector<int64_t>>& splits, int64_t row);
  virtual WorkPtr run_send(const at::Tensor& tensor, int dst, int tag);
  virtual WorkPtr run_recv(at::Tensor& tensor, int src, int tag);
  /// The recv failure message shared by every transport: what rank `src` sent against what
  /// the receiver (`where`, its where()) expects, or "" when they match.
  static std::string p2p_mismatch(const std::string& where, int src, int tag,
                                  at::ScalarType dtype, int64_t numel, int sent_tag,
                                  int64_t sent_dtype, int64_t sent_numel);

 private:
  int rank_;
  int size_;
  std::chrono::milliseconds timeout_;
  std::shared_ptr<Store> store_;
  uint64_t sequence_ = 0;
  struct StoreMailbox;  // the default send / recv (process_group.cpp)
  std::shared_ptr<StoreMailbox> mailbox_;  // shared with pending store recvs (weakly)
  uint64_t subgroups_ = 0;  // new_group calls so far
  friend ProcessGroupPtr new_group(ProcessGroup& parent, const std::vector<int>& ranks);
};

/// A subgroup of `parent` over `ranks` (ranks of `parent`: sorted, distinct, in range, at
/// least one), like torch.distributed.new_group. Collective over the parent: every rank of
/// `parent` calls it with the same ranks, in the same order as its other new_group calls;
/// disagreeing or invalid ranks throw InvalidArgument on every rank, naming the rank. A member
/// gets a group of the parent's transport (Gloo, shm, hier or threads) whose rank() is its
/// position in `ranks`; a rank outside gets a placeholder (is_member() false, rank() -1) whose
/// every operation throws StateError naming the rank and the subgroup's ranks. Subgroups are
/// independent groups (Note [Subgroups] in subgroup.cpp): several may be alive at once,
/// overlapping or not, and collectives on disjoint subgroups may run concurrently. Each costs
/// what a new group of its transport costs (Gloo connections, a shared-memory segment).
ProcessGroupPtr new_group(ProcessGroup& parent, const std::vector<int>& ranks);

/// Rendezvous and create this process's group (see ProcessGroupOptions). Collective: every
/// rank of the job calls it. At rendezvous every rank checks that all agree on the world size
/// and that no rank is claimed twice, and raises an error naming the disagreeing ranks.
/// Throws InvalidArgument (bad topology or init_method), TimeoutError (a rank never joined;
/// names the missing ranks and the store address) or CommError.
ProcessGroupPtr init_process_group(const ProcessGroupOptions& options = ProcessGroupOptions());

/// Creates a Gloo group over an existing store, skipping the launch environment: for ranks
/// that are threads of one process (tests) and for launchers. Collective.
ProcessGroupPtr new_gloo_group(int rank, int size, std::shared_ptr<Store> store,
                               const ProcessGroupOptions& options = ProcessGroupOptions());

/// Creates a shared-memory group over an existing store, like `new_gloo_group`: ranks that
/// are threads of one process (tests) or processes given a store. When the ranks' host
/// identities (ProcessGroupOptions::host_id) differ it builds the hierarchical group. The
/// segment is named after options.job_id() ("default" when empty). Collective.
ProcessGroupPtr new_shm_group(int rank, int size, std::shared_ptr<Store> store,
                              const ProcessGroupOptions& options = ProcessGroupOptions());

}  // namespace lockstep
