#pragma once
/// \file
/// Collective checks that every rank agrees, and the all-gather of strings they are built on.
/// Each is collective: every rank of the group calls it at the same point, and every rank
/// returns, or every rank throws the same error naming the ranks that differ.

#include <map>
#include <string>
#include <vector>

#include "lockstep/process_group.h"

namespace lockstep {

/// Every rank's `mine` (any bytes, any lengths), indexed by rank. One all-gather of lengths,
/// then one of the padded strings (skipped when every string is empty). Collective.
std::vector<std::string> allgather_strings(ProcessGroup& group, const std::string& mine);

/// Each rank passes its own error ("" when it is fine). When some rank has one, every rank
/// throws lockstep::Error "<where> <what> failed:" followed by one line per failing rank;
/// otherwise returns. One collective when every rank is fine. Collective.
void raise_if_any_rank_failed(ProcessGroup& group, const std::string& local_error,
                              const std::string& what);

/// A stable 64-bit hash (FNV-1a) of `config` as sorted "key=value" lines, as 16 hex digits.
std::string config_hash(const std::map<std::string, std::string>& config);

/// Compares `config` across ranks. Collective. Returns normally when all ranks hold the same
/// configuration; otherwise every rank throws InvalidArgument naming each differing key, its
/// value on rank 0 and the ranks that differ (e.g. "lr: rank 0 has 0.1, ranks 1,3 have 0.2").
/// Keys must not contain '=' or newlines, values no newlines (InvalidArgument).
void check_config_agreement(ProcessGroup& group, const std::map<std::string, std::string>& config);

}  // namespace lockstep
