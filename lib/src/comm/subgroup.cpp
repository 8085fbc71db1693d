// new_group: subgroups of any process group (lockstep/process_group.h).
//
// Note [Subgroups]
// A subgroup is an independent group of the parent's transport, built over the parent's store
// under a prefix no other group uses ("subgroup<id>", id counting the parent's new_group
// calls, equal on every rank because new_group is collective):
//   1. Every rank of the parent checks its `ranks` (sorted, distinct, in range, not empty) and
//      the ranks exchange them (one allgather_strings over the parent); an invalid or
//      differing list fails every rank, naming the rank, before anything is built.
//   2. Members build the group (ProcessGroup::make_subgroup): Gloo connects a new mesh among
//      the members, shm maps a new segment, hier groups the members by the parent's hosts
//      (shm within a host, a new Gloo group among the members' host leaders; one host gives
//      plain shm), the thread group shares a new in-process state among the member threads.
//   3. Non-members get a placeholder whose every operation throws StateError.
// Being independent groups, subgroups have their own sequence numbers, executors and
// connections: collectives on disjoint subgroups run concurrently, and a rank may belong to
// several (overlapping) subgroups, issuing each one's collectives in the same order on every
// member, as with any two groups. The parent stays usable meanwhile.
#include <ATen/ATen.h>

#include <algorithm>
#include <sstream>

#include "lockstep/agreement.h"
#include "lockstep/errors.h"
#include "lockstep/process_group.h"

namespace lockstep {

using detail::concat;

namespace {

std::string rank_list(const std::vector<int>& ranks) {
  std::string s = "[";
  for (size_t i = 0; i < ranks.size(); ++i) s += concat(i ? ", " : "", ranks[i]);
  return s + "]";
}

// What new_group returns to a rank outside the subgroup (Note [Subgroups], step 3).
class NonMemberGroup : public ProcessGroup {
 public:
  NonMemberGroup(const ProcessGroup& parent, std::vector<int> ranks)
      : ProcessGroup(-1, static_cast<int>(ranks.size()), parent.timeout(), parent.store()),
        parent_where_(parent.where()), parent_rank_(parent.rank()), ranks_(std::move(ranks)) {}

  std::string backend() const override { return "none (not a member)"; }
  bool is_member() const override { return false; }

  WorkPtr allreduce(at::Tensor&, ReduceOp) override { refuse("allreduce"); }
  WorkPtr broadcast(at::Tensor&, int) override { refuse("broadcast"); }
  WorkPtr allgather(std::vector<at::Tensor>&, const at::Tensor&) override { refuse("allgather"); }
  WorkPtr reduce_scatter(at::Tensor&, const std::vector<at::Tensor>&, ReduceOp) override {
    refuse("reduce_scatter");
  }
  WorkPtr reduce(std::vector<at::Tensor>&, int, ReduceOp) override { refuse("reduce"); }
  WorkPtr barrier() override { refuse("barrier"); }
  at::Tensor new_buffer(int64_t, const at::TensorOptions&) override { refuse("new_buffer"); }
  std::string transport_for(const at::Tensor&) override { refuse("transport_for"); }

 protected:
  void check_usable(const char* op) const override { refuse(op); }
  ProcessGroupPtr make_subgroup(const std::vector<int>&, int, uint64_t,
                                const std::shared_ptr<Store>&) override {
    refuse("new_group");
  }

 private:
  [[noreturn]] void refuse(const char* op) const {
    throw StateError(concat(parent_where_, " ", op, " on a subgroup: rank ", parent_rank_,
                            " is not a member of the subgroup of ranks ", rank_list(ranks_),
                            ". Only its members may use it; check is_member() first."));
  }

  std::string parent_where_;
  int parent_rank_;
  std::vector<int> ranks_;
};

}  // namespace

ProcessGroupPtr ProcessGroup::make_subgroup(const std::vector<int>& ranks, int /*sub_rank*/,
                                            uint64_t /*id*/,
                                            const std::shared_ptr<Store>& /*store*/) {
  throw StateError(concat(where(), " new_group: the '", backend(), "' group cannot build a "
                          "subgroup of ranks ", rank_list(ranks), " (it does not implement "
                          "make_subgroup). Split a Gloo, shm, hier or thread group instead."));
}

ProcessGroupPtr new_group(ProcessGroup& parent, const std::vector<int>& ranks) {
  // Step 1: check, then agree.
  std::string local_error;
  try {
    LOCKSTEP_CHECK(!ranks.empty(), parent.where(), " new_group: expected at least one rank, but "
                   "got none.");
    for (int r : ranks) {
      LOCKSTEP_CHECK(r >= 0 && r < parent.size(), parent.where(), " new_group: expected ranks "
                     "in [0, ", parent.size(), "), but got ", r, " in ", rank_list(ranks), ".");
    }
    for (size_t i = 1; i < ranks.size(); ++i) {
      LOCKSTEP_CHECK(ranks[i - 1] < ranks[i], parent.where(), " new_group: expected sorted, "
                     "distinct ranks, but got ", rank_list(ranks), ". Sort them and drop "
                     "duplicates.");
    }
  } catch (const InvalidArgument& e) {
    local_error = e.what();
  }
  auto lists = allgather_strings(parent, local_error.empty() ? rank_list(ranks) : "!");
  if (!local_error.empty()) throw InvalidArgument(local_error);
  for (size_t r = 0; r < lists.size(); ++r) {
    if (lists[r] == "!") {
      throw InvalidArgument(concat(parent.where(), " new_group: rank ", r, " passed invalid "
                                   "ranks (see its error); no subgroup was created."));
    }
    if (lists[r] != lists[0]) {
      throw InvalidArgument(concat(parent.where(), " new_group: rank 0 passes ranks ", lists[0],
                                   " but rank ", r, " passes ", lists[r], ". Every rank must "
                                   "pass the same ranks to the same new_group call."));
    }
  }
  // Step 2: members build the group; step 3: the others get the placeholder.
  const uint64_t id = ++parent.subgroups_;
  auto it = std::find(ranks.begin(), ranks.end(), parent.rank());
  if (it == ranks.end()) return std::make_shared<NonMemberGroup>(parent, ranks);
  auto store = std::make_shared<Store>(parent.store()->prefixed(concat("subgroup", id)));
  return parent.make_subgroup(ranks, static_cast<int>(it - ranks.begin()), id, store);
}

}  // namespace lockstep
