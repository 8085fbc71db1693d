#pragma once
// CUDA tensors on NCCL, everything else on the host transport (Note [CUDA routing] in
// nccl_group.cpp). Internal: init_process_group builds it for LOCKSTEP_TRANSPORT=nccl, and for
// "auto" when lockstep was built with its NCCL adapter.

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/process_group.h"
#include "lockstep/store.h"

namespace lockstep {
namespace comm {

/// Where one rank's tensors of the first CUDA collective live.
struct CudaPlacement {
  std::string host;  ///< host identity
  int device = -1;   ///< CUDA device index; -1: the rank passed a tensor that is not on CUDA
  std::string gpu;   ///< the GPU's identity on its host (PCI bus id); "": use `device`
};

/// The route of a group's CUDA tensors.
struct CudaRoute {
  bool nccl = false;
  std::string reason;  ///< why, for the log and transport_for
};

/// Decides where CUDA tensors go, the same on every rank (a pure function of what every rank
/// published). Two ranks share a GPU when host and GPU identity agree (ranks with their own
/// CUDA_VISIBLE_DEVICES all see cuda:0). `transport` is "nccl" (forced) or "auto". Forced NCCL fails with
/// InvalidArgument (naming `where`, the ranks and what to do) when lockstep has no NCCL
/// adapter, when two ranks share one GPU (NCCL refuses that), or when a rank's tensor is not
/// on CUDA; "auto" then takes the host transport instead and says why.
CudaRoute plan_cuda_route(const std::string& transport, bool nccl_compiled,
                          const std::vector<CudaPlacement>& ranks, const std::string& where);

/// Builds the host group of a subgroup from its members' host identities (one per member, in
/// rank order), this rank's position among them and the subgroup's store.
using HostGroupFactory = std::function<ProcessGroupPtr(
    const std::vector<std::string>& host_of_rank, int sub_rank,
    const std::shared_ptr<Store>& store)>;

/// A group that runs collectives on CUDA tensors over NCCL (when plan_cuda_route says so, at
/// the group's first CUDA collective) and everything else over `host`. `host_of_rank` holds
/// every rank's host identity; `make_host` builds the host group of a subgroup.
ProcessGroupPtr make_cuda_routing_group(ProcessGroupPtr host, std::string transport,
                                        std::vector<std::string> host_of_rank,
                                        std::chrono::milliseconds rendezvous_timeout,
                                        HostGroupFactory make_host);

}  // namespace comm
}  // namespace lockstep
