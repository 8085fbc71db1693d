#pragma once
/// \file
/// `ShardedSampler`: the distributed, resumable sampler LibTorch's `DistributedRandomSampler`
/// should have been.
///
/// Usage with `torch::data::make_data_loader` (workers allowed):
///
///     lockstep::ShardedSampler sampler(dataset.size().value(), *pg,
///         lockstep::ShardedSamplerOptions().seed(42));
///     auto loader = torch::data::make_data_loader(dataset, sampler,
///         torch::data::DataLoaderOptions().batch_size(64).workers(2));
///     for (int64_t epoch = 0; epoch < epochs; ++epoch) {
///       sampler.set_epoch(epoch);        // reaches the loader's copy: see Note [Shared handle]
///       for (auto& batch : *loader) { ... }
///     }
///
/// Order (Note [DistributedSampler order]): a permutation of [0, N) from a CPU generator seeded
/// with `seed + epoch` (`torch.randperm(N, generator=g)` after `g.manual_seed(seed + epoch)`),
/// then padding to a multiple of the world size by repeating the list from its start (or,
/// with `drop_last`, dropping the tail), then the strided partition `rank, rank + W, ...`.
/// This is bit for bit the order of PyTorch's Python `DistributedSampler`
/// (tests/data/test_sampler.cpp checks it against python3-torch).
///
/// Degenerate cases (all tested):
///   - N == 0: every epoch is empty on every rank (as in Python); `next()` returns nullopt.
///   - N < W: without drop_last every rank gets one sample (the list is repeated cyclically);
///     with drop_last every rank gets zero samples, i.e. an empty epoch.
///   - N == 1 or W == 1: the obvious thing (one rank sees the whole permutation).
///   - shard mode with fewer non-empty shards than ranks: InvalidArgument at construction.

#include <torch/data/samplers/base.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lockstep/options.h"

namespace lockstep {

class ProcessGroup;

/// Configuration of a `ShardedSampler`. Every field has a default.
struct ShardedSamplerOptions {
  /// Number of ranks the data is split across; -1 (default): the group's size when the
  /// sampler is built from a ProcessGroup, else 1.
  LOCKSTEP_ARG(int64_t, num_replicas) = -1;
  /// This rank, in [0, num_replicas); -1 (default): the group's rank, else 0.
  LOCKSTEP_ARG(int64_t, rank) = -1;
  /// Shuffle each epoch (default true); false visits 0, 1, 2, ... before partitioning.
  LOCKSTEP_ARG(bool, shuffle) = true;
  /// Seed of the permutation; the generator is seeded with `seed + epoch` (default 0), modulo
  /// 2^64 (Python raises there instead). Every rank must use the same seed.
  LOCKSTEP_ARG(uint64_t, seed) = 0;
  /// Drop the tail so that every rank gets floor(N / W) samples, instead of padding to
  /// ceil(N / W) by repeating samples (default false).
  LOCKSTEP_ARG(bool, drop_last) = false;
  /// Advance the epoch by one on every `reset()` after the first (default false). The data
  /// loader calls `reset()` in `begin()`, so each `for (auto& b : *loader)` is a new epoch
  /// without any `set_epoch` call; a `set_epoch(e)` before a loop makes that loop epoch e.
  /// See Note [Shared handle].
  LOCKSTEP_ARG(bool, advance_epoch_on_reset) = false;
};

/// Where a sampler stands within an epoch: enough to resume exactly, with the same or a
/// different world size. Plain data: store it in your own checkpoint or with `to_string()`.
///
/// Note [Resume segments]
/// An epoch may be run in segments, each at one world size. `segments[k] = {W_k, p_k}` means
/// that W_k ranks each consumed the first p_k samples of their shard of the pool left by the
/// segments before. The pool starts as the epoch's permutation; a segment consumes the first
/// min(W_k * p_k, pool size) entries of its (padded) list, so the next pool is exactly the
/// samples not yet seen. With drop_last a segment also discards the tail it dropped.
/// Resuming with the same world size continues the last segment (the same padding as an
/// uninterrupted run); with another world size it starts a new segment over the unseen pool.
struct SamplerState {
  /// Epoch the state belongs to.
  int64_t epoch = 0;
  /// The sampler's seed, shuffle and drop_last; a state only loads into a sampler that agrees.
  uint64_t seed = 0;
  bool shuffle = true;
  bool drop_last = false;
  /// Dataset size N (sample mode) or the number of shards (shard mode).
  int64_t dataset_size = 0;
  /// Shard mode only: the size of every shard; empty in sample mode.
  std::vector<int64_t> shard_sizes;
  /// {world size, samples each rank consumed} per segment; see Note [Resume segments].
  std::vector<std::pair<int64_t, int64_t>> segments;

  /// A one-line text form ("lockstep-sampler-v1 epoch=... segments=4:10,2:3 ...").
  std::string to_string() const;
  /// Parses `to_string()`'s output; InvalidArgument naming the bad field otherwise.
  static SamplerState from_string(const std::string& text);
  bool operator==(const SamplerState& other) const;
};

// ---- Pure index math (no sockets, no state): what the sampler is built from. ----

/// The epoch's visiting order before partitioning: `torch.randperm(n)` from a CPU generator
/// seeded with `seed + epoch` when `shuffle`, else 0..n-1.
std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch, bool shuffle);

/// Samples per rank for a pool of `n` over `world_size` ranks: ceil(n / W), or floor(n / W)
/// with drop_last (Python's `num_samples`).
int64_t samples_per_rank(int64_t n, int64_t world_size, bool drop_last);

/// Rank `rank`'s shard of `pool`: pad cyclically from the start (or drop the tail) to a
/// multiple of `world_size`, then take positions rank, rank + W, ...
std::vector<int64_t> stride_partition(const std::vector<int64_t>& pool, int64_t world_size,
                                      int64_t rank, bool drop_last);

/// Exactly what Python's `DistributedSampler(dataset_of_size_n, W, rank, shuffle, seed,
/// drop_last)` yields after `set_epoch(epoch)`.
std::vector<int64_t> distributed_indices(int64_t n, int64_t world_size, int64_t rank,
                                         int64_t epoch, uint64_t seed, bool shuffle,
                                         bool drop_last);

/// The samples of `state.epoch` not yet seen after all of `state`'s segments, in order
/// (sample mode). Throws InvalidArgument if a segment's position exceeds its shard length.
std::vector<int64_t> unseen_pool(const SamplerState& state);

/// Shard mode: whole shards assigned to ranks.
struct ShardAssignment {
  /// shards_of_rank[r]: shard ids given to rank r, in visiting order.
  std::vector<std::vector<int64_t>> shards_of_rank;
  /// Sum of the sizes of rank r's shards.
  std::vector<int64_t> load_of_rank;
};

/// Assigns whole shards to `world_size` ranks, balanced by size: shards are visited in the
/// epoch's permutation (seed + epoch; identity without shuffle), stably sorted by size,
/// largest first, and each goes to the least-loaded rank (lowest rank on ties). Deterministic
/// for (sizes, W, seed, epoch, shuffle). Longest-processing-time greedy: the heaviest rank
/// carries at most the lightest rank's load plus the largest shard, and at most 4/3 of the
/// best possible maximum load.
ShardAssignment assign_shards(const std::vector<int64_t>& shard_sizes, int64_t world_size,
                              uint64_t seed, int64_t epoch, bool shuffle);

/// A `torch::data::samplers::Sampler<>` that gives each rank its part of the dataset.
///
/// Note [Shared handle]
/// `make_data_loader` takes its sampler by value, so in LibTorch a `set_epoch` on the caller's
/// sampler never reaches the loader's copy (PyTorch issue 73141). A ShardedSampler is a
/// handle: copies share one state (behind a mutex), so `set_epoch`, `state()` and
/// `load_state()` on the caller's object act on the sampler the loader uses. Copy it into as
/// many loaders as you like, but all copies are the same sampler: two loaders iterating at
/// once would share one position. Alternatively set `advance_epoch_on_reset`.
///
/// The loader calls `reset()` in `begin()`: that rewinds to the start of the current epoch,
/// except right after `load_state()`/`load()`, where it keeps the restored position once.
///
/// Threading: all methods are thread-safe. The data loader calls `next()` on the thread that
/// iterates it; worker threads only receive the index lists.
class ShardedSampler : public torch::data::samplers::Sampler<std::vector<size_t>> {
 public:
  /// Sample mode over a dataset of `dataset_size` samples. num_replicas/rank default to 1/0.
  explicit ShardedSampler(size_t dataset_size,
                          ShardedSamplerOptions options = ShardedSamplerOptions());
  /// Sample mode; num_replicas and rank default to the group's size and rank.
  ShardedSampler(size_t dataset_size, const ProcessGroup& group,
                 ShardedSamplerOptions options = ShardedSamplerOptions());

  /// Shard mode: the dataset is the concatenation of shards (files, chunks) with these sizes;
  /// global index i lies in shard k where shard_offsets()[k] <= i < shard_offsets()[k + 1].
  /// Each epoch, whole shards go to ranks by `assign_shards`; a rank visits the samples of
  /// its shards (shuffled together with the epoch's generator when `shuffle`). Ranks get equal
  /// counts: the longest rank's count, padding by repeating the rank's own list cyclically,
  /// or with drop_last the shortest rank's count. Requires at least num_replicas non-empty
  /// shards. Resuming in shard mode requires the same world size.
  static ShardedSampler over_shards(std::vector<int64_t> shard_sizes,
                                    ShardedSamplerOptions options = ShardedSamplerOptions());
  static ShardedSampler over_shards(std::vector<int64_t> shard_sizes, const ProcessGroup& group,
                                    ShardedSamplerOptions options = ShardedSamplerOptions());

  // ---- torch::data::samplers::Sampler<> ----
  /// Rewinds to the start of the current epoch (see the class comment). `new_size` changes the
  /// dataset size (sample mode only).
  void reset(torch::optional<size_t> new_size = torch::nullopt) override;
  /// Up to `batch_size` of this rank's next indices; nullopt when the epoch is exhausted.
  torch::optional<std::vector<size_t>> next(size_t batch_size) override;
  /// Writes `state()` into a torch archive (key "lockstep_sampler_state").
  void save(torch::serialize::OutputArchive& archive) const override;
  /// Reads what `save` wrote and calls `load_state`.
  void load(torch::serialize::InputArchive& archive) override;

  // ---- lockstep ----
  /// Selects the epoch (rewinds to its start). Call with the same value on every rank.
  void set_epoch(int64_t epoch);
  int64_t epoch() const;
  /// This rank's whole index list for the current epoch (segment), including what `next()`
  /// already handed out.
  std::vector<int64_t> indices() const;
  /// Number of indices this rank visits in the current epoch (segment).
  size_t size() const;
  /// Indices handed out by `next()` so far in the current epoch (segment).
  int64_t position() const;
  int64_t num_replicas() const;
  int64_t rank() const;
  /// Shard mode: the shards this rank reads in the current epoch; empty in sample mode.
  std::vector<int64_t> shards() const;
  /// Shard mode: prefix sums of the shard sizes (size shards + 1); empty in sample mode.
  std::vector<int64_t> shard_offsets() const;

  /// The state after the indices handed out by `next()`. Exact when the loader has no
  /// workers; with workers the loader prefetches, so use `state(consumed)`.
  ///
  /// Note [Resume with prefetching loaders]
  /// A loader with workers asks the sampler for up to `max_jobs` batches ahead of what the
  /// training loop has seen, so the sampler's own position runs ahead. Count the samples the
  /// loop consumed this epoch (e.g. `seen += batch.size()`) and save `state(seen)`.
  SamplerState state() const;
  /// The state after this rank consumed `consumed_samples` of the current epoch (segment).
  /// Every rank must pass the same count (they consume in lockstep under DDP).
  SamplerState state(int64_t consumed_samples) const;
  /// Restores `state`: the epoch, and the position within it. With a different num_replicas
  /// (sample mode) the rest of the epoch is re-sharded over the new ranks; see
  /// Note [Resume segments]. The next `reset()` keeps this position.
  void load_state(const SamplerState& state);

 private:
  struct Impl;
  explicit ShardedSampler(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace lockstep
