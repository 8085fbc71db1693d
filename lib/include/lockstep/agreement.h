#pragma once
/// \file
/// Object collectives (strings and bytes: metadata, metrics, configurations) and the checks
/// that every rank agrees, built on them. Each is collective: every rank of the group calls it
/// at the same point, and every rank returns, or every rank throws the same error naming the
/// ranks that differ.
///
/// Note [Bounded object collectives]
/// Every helper first exchanges the lengths (one small collective), and every rank checks every
/// length against `max_bytes` before it allocates anything: a buggy or hostile peer claiming a
/// huge (or negative) length makes every rank throw InvalidArgument naming that rank, instead
/// of an allocation. Only then do the bytes move (padded to the longest).

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "lockstep/process_group.h"

namespace lockstep {

/// Default bound on one rank's bytes in an object collective: 64 MiB.
constexpr int64_t kMaxObjectBytes = int64_t{64} << 20;

using Bytes = std::vector<uint8_t>;

/// Every rank's `mine` (any bytes, any lengths), indexed by rank. One all-gather of lengths,
/// then one of the padded strings (skipped when every string is empty). Throws
/// InvalidArgument on every rank when a rank's string exceeds `max_bytes` (Note [Bounded
/// object collectives]). Collective.
std::vector<std::string> allgather_strings(ProcessGroup& group, const std::string& mine,
                                           int64_t max_bytes = kMaxObjectBytes);
/// allgather_strings for bytes. Collective.
std::vector<Bytes> allgather_bytes(ProcessGroup& group, const Bytes& mine,
                                   int64_t max_bytes = kMaxObjectBytes);
/// Root's `bytes` on every rank (the other ranks' argument is ignored). One broadcast of the
/// length, checked against `max_bytes` on every rank, then one of the bytes. Collective.
Bytes broadcast_bytes(ProcessGroup& group, const Bytes& bytes, int root = 0,
                      int64_t max_bytes = kMaxObjectBytes);
/// broadcast_bytes for a string. Collective.
std::string broadcast_string(ProcessGroup& group, const std::string& text, int root = 0,
                             int64_t max_bytes = kMaxObjectBytes);
/// Every rank's `mine` on root, indexed by rank; an empty list on the other ranks. One
/// all-gather of lengths (so every rank checks every length), then one gather of the padded
/// strings to root. Collective.
std::vector<std::string> gather_strings(ProcessGroup& group, const std::string& mine,
                                        int root = 0, int64_t max_bytes = kMaxObjectBytes);

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
