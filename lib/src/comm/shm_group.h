#pragma once
// Shared-memory collectives among the ranks of one host, and the hierarchical group that
// joins several hosts through Gloo. Internal: users reach them through init_process_group
// (LOCKSTEP_TRANSPORT / ProcessGroupOptions::transport) or new_shm_group.

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/shm_channel.h"
#include "lockstep/process_group.h"
#include "lockstep/store.h"

namespace lockstep {
namespace shm {

/// This machine's identity: hostname + "/" + the kernel's boot id. Ranks with equal
/// identities share /dev/shm (modulo containers; see ProcessGroupOptions::host_id).
std::string host_identity();

/// Creates a Gloo group of `size` host leaders over `store` (already scoped).
using LeaderGroupFactory =
    std::function<ProcessGroupPtr(int rank, int size, const std::shared_ptr<Store>& store)>;

struct GroupSpec {
  int rank = 0;
  int size = 1;
  std::shared_ptr<Store> store;               ///< scoped to this group
  std::vector<std::string> host_of_rank;      ///< host identity of every rank (size entries)
  std::chrono::milliseconds timeout{300000};  ///< per collective
  std::chrono::milliseconds rendezvous_timeout{120000};
  std::string job_id = "default";             ///< goes into the segment name
  LeaderGroupFactory make_leader_group;       ///< used when there is more than one host
};

/// One host: a pure shared-memory group ("shm"). Several hosts: shared memory within each
/// host and Gloo between one leader per host ("hier"). Collective.
ProcessGroupPtr make_group(const GroupSpec& spec);

/// The send / recv channel of `group` when make_group built it for one host (shm) of at most
/// kChannelMaxRanks ranks, else null.
Channel* channel_of(ProcessGroup& group);

/// A send's description ("<where> send to rank <dst> (tag, count x dtype) via shm"), with
/// ranks numbered as `where` numbers them.
ChannelMessage channel_send_message(const std::string& where, const at::Tensor& tensor, int dst,
                                    int tag);

/// A recv's description ("<where> recv from rank <src> (tag, count x dtype) via shm") and its
/// check of what was sent, with ranks numbered as `where` numbers them.
ChannelMessage channel_recv_message(const std::string& where, const at::Tensor& tensor, int src,
                                    int tag);

}  // namespace shm
}  // namespace lockstep
