#pragma once
// The hierarchical group: shared memory within each host, Gloo between one leader per host
// (Note [Hierarchical collectives]). Internal: make_group (shm_group.h) builds it.

#include <vector>

#include "comm/shm_group.h"

namespace lockstep {
namespace shm {

/// The group of `spec.rank` over `hosts` (global ranks per host, in host order): `host` is
/// this rank's host, `local` its host's shared-memory group, `leaders` the Gloo group of the
/// hosts' leaders (null on non-leaders).
ProcessGroupPtr make_hier_group(const GroupSpec& spec, std::vector<std::vector<int>> hosts,
                                int host, ProcessGroupPtr local, ProcessGroupPtr leaders);

}  // namespace shm
}  // namespace lockstep
