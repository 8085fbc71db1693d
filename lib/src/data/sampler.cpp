// ShardedSampler and the pure index math under it. See lockstep/sampler.h.
#include "lockstep/sampler.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/randperm.h>
#include <torch/serialize/archive.h>

#include <algorithm>
#include <mutex>
#include <numeric>
#include <sstream>

#include "lockstep/errors.h"
#include "lockstep/process_group.h"

namespace lockstep {

// Note [DistributedSampler order]
// PyTorch's Python DistributedSampler (torch/utils/data/distributed.py, 1.13) does, per epoch:
//   g = torch.Generator(); g.manual_seed(seed + epoch)
//   indices = torch.randperm(N, generator=g).tolist()      (or range(N) without shuffle)
//   num_samples = ceil((N - W) / W) if drop_last and N % W else ceil(N / W)
//   total = num_samples * W
//   pad: indices += (indices * ceil(pad / N))[:pad]   /  drop: indices = indices[:total]
//   return indices[rank:total:W]
// `g.manual_seed(s)` and `createCPUGenerator(s)` both construct the mt19937 state from s, and
// both languages call the same at::randperm CPU kernel, so the permutations agree bit for
// bit. The cyclic padding below equals Python's list repetition. Where seed + epoch reaches
// 2^64, Python's manual_seed raises "Overflow when unpacking long"; we wrap modulo 2^64.

namespace {

std::vector<int64_t> randperm(int64_t n, uint64_t generator_seed) {
  auto gen = at::detail::createCPUGenerator(generator_seed);
  at::Tensor perm = at::randperm(n, gen, at::TensorOptions().dtype(at::kLong));
  const int64_t* p = perm.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + n);
}

void check_world(int64_t world_size, int64_t rank, const char* where) {
  LOCKSTEP_CHECK(world_size >= 1, "Expected num_replicas >= 1, but got ", world_size, " (",
                 where, ").");
  LOCKSTEP_CHECK(rank >= 0 && rank < world_size, "Expected rank in [0, ", world_size,
                 "), but got ", rank, " (", where, ").");
}

}  // namespace

std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch, bool shuffle) {
  LOCKSTEP_CHECK(n >= 0, "Expected a dataset size >= 0, but got ", n, " (epoch_permutation).");
  if (!shuffle) {
    std::vector<int64_t> identity(static_cast<size_t>(n));
    std::iota(identity.begin(), identity.end(), int64_t{0});
    return identity;
  }
  return randperm(n, seed + static_cast<uint64_t>(epoch));
}

int64_t samples_per_rank(int64_t n, int64_t world_size, bool drop_last) {
  LOCKSTEP_CHECK(world_size >= 1, "Expected num_replicas >= 1, but got ", world_size,
                 " (samples_per_rank).");
  return drop_last ? n / world_size : (n + world_size - 1) / world_size;
}

std::vector<int64_t> stride_partition(const std::vector<int64_t>& pool, int64_t world_size,
                                      int64_t rank, bool drop_last) {
  check_world(world_size, rank, "stride_partition");
  const int64_t n = static_cast<int64_t>(pool.size());
  const int64_t count = samples_per_rank(n, world_size, drop_last);
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    // Position rank + i * W of the padded list; padding repeats the list cyclically.
    const int64_t pos = rank + i * world_size;
    out.push_back(pool[static_cast<size_t>(pos % n)]);
  }
  return out;
}

std::vector<int64_t> distributed_indices(int64_t n, int64_t world_size, int64_t rank,
                                         int64_t epoch, uint64_t seed, bool shuffle,
                                         bool drop_last) {
  check_world(world_size, rank, "distributed_indices");
  return stride_partition(epoch_permutation(n, seed, epoch, shuffle), world_size, rank,
                          drop_last);
}

std::vector<int64_t> unseen_pool(const SamplerState& state) {
  LOCKSTEP_CHECK(state.shard_sizes.empty(),
                 "unseen_pool() is for sample mode, but the state has ", state.shard_sizes.size(),
                 " shard sizes (shard mode).");
  std::vector<int64_t> pool =
      epoch_permutation(state.dataset_size, state.seed, state.epoch, state.shuffle);
  for (size_t k = 0; k < state.segments.size(); ++k) {
    const int64_t world = state.segments[k].first;
    const int64_t position = state.segments[k].second;
    const int64_t n = static_cast<int64_t>(pool.size());
    LOCKSTEP_CHECK(world >= 1, "Expected a world size >= 1 in segment ", k,
                   " of the sampler state, but got ", world, ".");
    const int64_t per_rank = samples_per_rank(n, world, state.drop_last);
    LOCKSTEP_CHECK(position >= 0 && position <= per_rank, "Expected segment ", k,
                   " of the sampler state to have consumed between 0 and ", per_rank,
                   " samples per rank (", n, " samples over ", world, " ranks), but it says ",
                   position, ". The state does not belong to this dataset or epoch.");
    const int64_t usable = state.drop_last ? per_rank * world : n;
    const int64_t consumed = std::min(world * position, usable);
    pool = std::vector<int64_t>(pool.begin() + consumed, pool.begin() + usable);
  }
  return pool;
}

ShardAssignment assign_shards(const std::vector<int64_t>& shard_sizes, int64_t world_size,
                              uint64_t seed, int64_t epoch, bool shuffle) {
  check_world(world_size, 0, "assign_shards");
  const int64_t num_shards = static_cast<int64_t>(shard_sizes.size());
  for (int64_t k = 0; k < num_shards; ++k) {
    LOCKSTEP_CHECK(shard_sizes[static_cast<size_t>(k)] >= 0, "Expected shard sizes >= 0, but shard ",
                   k, " has size ", shard_sizes[static_cast<size_t>(k)], ".");
  }
  const std::vector<int64_t> order = epoch_permutation(num_shards, seed, epoch, shuffle);
  std::vector<int64_t> rank_in_order(static_cast<size_t>(num_shards));
  for (int64_t i = 0; i < num_shards; ++i) rank_in_order[static_cast<size_t>(order[static_cast<size_t>(i)])] = i;

  // Longest processing time first: largest shards first (ties in permutation order), each to
  // the least-loaded rank (lowest rank on ties).
  std::vector<int64_t> by_size = order;
  std::stable_sort(by_size.begin(), by_size.end(), [&](int64_t a, int64_t b) {
    return shard_sizes[static_cast<size_t>(a)] > shard_sizes[static_cast<size_t>(b)];
  });
  ShardAssignment out;
  out.shards_of_rank.resize(static_cast<size_t>(world_size));
  out.load_of_rank.assign(static_cast<size_t>(world_size), 0);
  for (int64_t shard : by_size) {
    const auto lightest = std::min_element(out.load_of_rank.begin(), out.load_of_rank.end());
    const auto r = static_cast<size_t>(lightest - out.load_of_rank.begin());
    out.shards_of_rank[r].push_back(shard);
    out.load_of_rank[r] += shard_sizes[static_cast<size_t>(shard)];
  }
  for (auto& shards : out.shards_of_rank) {
    std::sort(shards.begin(), shards.end(), [&](int64_t a, int64_t b) {
      return rank_in_order[static_cast<size_t>(a)] < rank_in_order[static_cast<size_t>(b)];
    });
  }
  return out;
}

// ---- SamplerState ----

std::string SamplerState::to_string() const {
  std::ostringstream os;
  os << "lockstep-sampler-v1 epoch=" << epoch << " seed=" << seed << " shuffle=" << shuffle
     << " drop_last=" << drop_last << " size=" << dataset_size << " shards=";
  for (size_t i = 0; i < shard_sizes.size(); ++i) os << (i ? "," : "") << shard_sizes[i];
  os << " segments=";
  for (size_t i = 0; i < segments.size(); ++i) {
    os << (i ? "," : "") << segments[i].first << ":" << segments[i].second;
  }
  return os.str();
}

namespace {

int64_t parse_int(const std::string& text, const std::string& field) {
  size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  LOCKSTEP_CHECK(used == text.size() && !text.empty(), "Expected an integer for sampler state field '",
                 field, "', but got '", text, "'.");
  return static_cast<int64_t>(value);
}

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  if (text.empty()) return parts;
  std::string part;
  std::istringstream is(text);
  while (std::getline(is, part, sep)) parts.push_back(part);
  if (text.back() == sep) parts.emplace_back();
  return parts;
}

}  // namespace

SamplerState SamplerState::from_string(const std::string& text) {
  std::istringstream is(text);
  std::string tag;
  is >> tag;
  LOCKSTEP_CHECK(tag == "lockstep-sampler-v1", "Expected a sampler state starting with "
                 "'lockstep-sampler-v1', but got '", text, "'.");
  SamplerState s;
  bool seen_epoch = false, seen_size = false;
  std::string item;
  while (is >> item) {
    const auto eq = item.find('=');
    LOCKSTEP_CHECK(eq != std::string::npos, "Expected key=value in sampler state, but got '",
                   item, "' in '", text, "'.");
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    if (key == "epoch") {
      s.epoch = parse_int(value, key);
      seen_epoch = true;
    } else if (key == "seed") {
      size_t used = 0;
      try {
        s.seed = std::stoull(value, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      LOCKSTEP_CHECK(used == value.size() && !value.empty(),
                     "Expected an unsigned integer for sampler state field 'seed', but got '",
                     value, "'.");
    } else if (key == "shuffle") {
      s.shuffle = parse_int(value, key) != 0;
    } else if (key == "drop_last") {
      s.drop_last = parse_int(value, key) != 0;
    } else if (key == "size") {
      s.dataset_size = parse_int(value, key);
      seen_size = true;
    } else if (key == "shards") {
      for (const auto& v : split(value, ',')) s.shard_sizes.push_back(parse_int(v, key));
    } else if (key == "segments") {
      for (const auto& v : split(value, ',')) {
        const auto colon = v.find(':');
        LOCKSTEP_CHECK(colon != std::string::npos,
                       "Expected world:position in sampler state segments, but got '", v, "'.");
        s.segments.emplace_back(parse_int(v.substr(0, colon), "segments"),
                                parse_int(v.substr(colon + 1), "segments"));
      }
    } else {
      LOCKSTEP_CHECK(false, "Unknown sampler state field '", key, "' in '", text, "'.");
    }
  }
  LOCKSTEP_CHECK(seen_epoch && seen_size, "Expected the fields epoch= and size= in sampler state '",
                 text, "'.");
  return s;
}

bool SamplerState::operator==(const SamplerState& o) const {
  return epoch == o.epoch && seed == o.seed && shuffle == o.shuffle &&
         drop_last == o.drop_last && dataset_size == o.dataset_size &&
         shard_sizes == o.shard_sizes && segments == o.segments;
}

// ---- ShardedSampler ----

struct ShardedSampler::Impl {
  std::mutex mu;
  int64_t world = 1;
  int64_t rank = 0;
  bool shuffle = true;
  uint64_t seed = 0;
  bool drop_last = false;
  bool advance_on_reset = false;

  bool shard_mode = false;
  int64_t n = 0;                      // samples (sample mode) or total samples (shard mode)
  std::vector<int64_t> shard_sizes;   // shard mode
  std::vector<int64_t> shard_offsets; // shard mode, size shards + 1

  int64_t epoch = 0;
  // Completed segments of the current epoch at other world sizes (Note [Resume segments]).
  std::vector<std::pair<int64_t, int64_t>> past_segments;
  std::vector<int64_t> indices;
  std::vector<int64_t> shards;
  bool built = false;
  int64_t position = 0;
  bool keep_position_once = false;  // set by load_state: the next reset() keeps `position`
  bool reset_before = false;        // for advance_on_reset
  bool epoch_chosen = false;        // set_epoch since the last reset(): do not advance

  SamplerState make_state(int64_t consumed) const {
    SamplerState s;
    s.epoch = epoch;
    s.seed = seed;
    s.shuffle = shuffle;
    s.drop_last = drop_last;
    s.dataset_size = shard_mode ? static_cast<int64_t>(shard_sizes.size()) : n;
    s.shard_sizes = shard_sizes;
    s.segments = past_segments;
    s.segments.emplace_back(world, consumed);
    return s;
  }

  void build() {
    if (built) return;
    if (!shard_mode) {
      SamplerState past = make_state(0);
      past.segments.pop_back();
      indices = stride_partition(unseen_pool(past), world, rank, drop_last);
    } else {
      const ShardAssignment a = assign_shards(shard_sizes, world, seed, epoch, shuffle);
      shards = a.shards_of_rank[static_cast<size_t>(rank)];
      std::vector<int64_t> mine;
      for (int64_t s : shards) {
        for (int64_t i = shard_offsets[static_cast<size_t>(s)]; i < shard_offsets[static_cast<size_t>(s) + 1]; ++i) {
          mine.push_back(i);
        }
      }
      if (shuffle) {
        const std::vector<int64_t> perm =
            randperm(static_cast<int64_t>(mine.size()), seed + static_cast<uint64_t>(epoch));
        std::vector<int64_t> shuffled(mine.size());
        for (size_t i = 0; i < mine.size(); ++i) shuffled[i] = mine[static_cast<size_t>(perm[i])];
        mine.swap(shuffled);
      }
      const int64_t target =
          drop_last ? *std::min_element(a.load_of_rank.begin(), a.load_of_rank.end())
                    : *std::max_element(a.load_of_rank.begin(), a.load_of_rank.end());
      indices.clear();
      for (int64_t i = 0; i < target; ++i) {
        indices.push_back(mine[static_cast<size_t>(i % static_cast<int64_t>(mine.size()))]);
      }
    }
    built = true;
  }

  void start_epoch(int64_t e) {
    epoch = e;
    past_segments.clear();
    position = 0;
    built = false;
    keep_position_once = false;
  }
};

ShardedSampler::ShardedSampler(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

namespace {

struct Resolved {
  int64_t world;
  int64_t rank;
};

Resolved resolve(const ShardedSamplerOptions& o, int64_t group_world, int64_t group_rank) {
  Resolved r{o.num_replicas() >= 0 ? o.num_replicas() : group_world,
             o.rank() >= 0 ? o.rank() : group_rank};
  check_world(r.world, r.rank, "ShardedSamplerOptions");
  return r;
}

}  // namespace

ShardedSampler::ShardedSampler(size_t dataset_size, ShardedSamplerOptions options)
    : impl_(std::make_shared<Impl>()) {
  const Resolved r = resolve(options, 1, 0);
  impl_->world = r.world;
  impl_->rank = r.rank;
  impl_->shuffle = options.shuffle();
  impl_->seed = options.seed();
  impl_->drop_last = options.drop_last();
  impl_->advance_on_reset = options.advance_epoch_on_reset();
  impl_->n = static_cast<int64_t>(dataset_size);
}

ShardedSampler::ShardedSampler(size_t dataset_size, const ProcessGroup& group,
                               ShardedSamplerOptions options)
    : ShardedSampler(dataset_size,
                     options.num_replicas(options.num_replicas() >= 0 ? options.num_replicas()
                                                                      : group.size())
                         .rank(options.rank() >= 0 ? options.rank() : group.rank())) {}

ShardedSampler ShardedSampler::over_shards(std::vector<int64_t> shard_sizes,
                                           ShardedSamplerOptions options) {
  int64_t total = 0, non_empty = 0;
  for (size_t k = 0; k < shard_sizes.size(); ++k) {
    LOCKSTEP_CHECK(shard_sizes[k] >= 0, "Expected shard sizes >= 0, but shard ", k, " has size ",
                   shard_sizes[k], ".");
    total += shard_sizes[k];
    non_empty += shard_sizes[k] > 0;
  }
  ShardedSampler sampler(static_cast<size_t>(total), options);
  Impl& impl = *sampler.impl_;
  LOCKSTEP_CHECK(non_empty >= impl.world, "Shard mode needs at least one non-empty shard per rank: "
                 "expected >= ", impl.world, " non-empty shards, but got ", non_empty, " (of ",
                 shard_sizes.size(), "). Use sample mode (the size_t constructor), or split the "
                 "data into more shards.");
  impl.shard_mode = true;
  impl.shard_offsets.assign(1, 0);
  for (int64_t size : shard_sizes) impl.shard_offsets.push_back(impl.shard_offsets.back() + size);
  impl.shard_sizes = std::move(shard_sizes);
  return sampler;
}

ShardedSampler ShardedSampler::over_shards(std::vector<int64_t> shard_sizes,
                                           const ProcessGroup& group,
                                           ShardedSamplerOptions options) {
  if (options.num_replicas() < 0) options.num_replicas(group.size());
  if (options.rank() < 0) options.rank(group.rank());
  return over_shards(std::move(shard_sizes), options);
}

void ShardedSampler::reset(torch::optional<size_t> new_size) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  Impl& s = *impl_;
  if (new_size && static_cast<int64_t>(*new_size) != s.n) {
    LOCKSTEP_CHECK(!s.shard_mode, "Expected reset() with the total of the shard sizes (", s.n,
                   "), but got ", *new_size, ". In shard mode build a new sampler instead.");
    s.n = static_cast<int64_t>(*new_size);
    s.start_epoch(s.epoch);
  }
  if (s.keep_position_once) {
    s.keep_position_once = false;
  } else {
    const bool advance = s.advance_on_reset && s.reset_before && !s.epoch_chosen;
    s.start_epoch(advance ? s.epoch + 1 : s.epoch);
  }
  s.reset_before = true;
  s.epoch_chosen = false;
}

torch::optional<std::vector<size_t>> ShardedSampler::next(size_t batch_size) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  Impl& s = *impl_;
  LOCKSTEP_CHECK(batch_size > 0, "Expected batch_size > 0 in ShardedSampler::next(), but got 0.");
  s.build();
  const int64_t left = static_cast<int64_t>(s.indices.size()) - s.position;
  if (left <= 0) return torch::nullopt;
  const int64_t take = std::min<int64_t>(left, static_cast<int64_t>(batch_size));
  std::vector<size_t> batch(static_cast<size_t>(take));
  for (int64_t i = 0; i < take; ++i) {
    batch[static_cast<size_t>(i)] = static_cast<size_t>(s.indices[static_cast<size_t>(s.position + i)]);
  }
  s.position += take;
  return batch;
}

void ShardedSampler::save(torch::serialize::OutputArchive& archive) const {
  archive.write("lockstep_sampler_state", c10::IValue(state().to_string()));
}

void ShardedSampler::load(torch::serialize::InputArchive& archive) {
  c10::IValue value;
  LOCKSTEP_CHECK(archive.try_read("lockstep_sampler_state", value) && value.isString(),
                 "Expected the key 'lockstep_sampler_state' (a string) in the archive given to "
                 "ShardedSampler::load(); was it written by ShardedSampler::save()?");
  load_state(SamplerState::from_string(value.toStringRef()));
}

void ShardedSampler::set_epoch(int64_t epoch) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  // Keep a just-restored position when the training loop re-selects the restored epoch, so
  // that `load_state(); for (e = state.epoch; ...) { set_epoch(e); ... }` resumes exactly.
  impl_->epoch_chosen = true;
  if (impl_->keep_position_once && epoch == impl_->epoch) return;
  impl_->start_epoch(epoch);
}

int64_t ShardedSampler::epoch() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->epoch;
}

std::vector<int64_t> ShardedSampler::indices() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->build();
  return impl_->indices;
}

size_t ShardedSampler::size() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->build();
  return impl_->indices.size();
}

int64_t ShardedSampler::position() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->position;
}

int64_t ShardedSampler::num_replicas() const { return impl_->world; }
int64_t ShardedSampler::rank() const { return impl_->rank; }

std::vector<int64_t> ShardedSampler::shards() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->build();
  return impl_->shards;
}

std::vector<int64_t> ShardedSampler::shard_offsets() const { return impl_->shard_offsets; }

SamplerState ShardedSampler::state() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->make_state(impl_->position);
}

SamplerState ShardedSampler::state(int64_t consumed_samples) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->build();
  const auto size = static_cast<int64_t>(impl_->indices.size());
  LOCKSTEP_CHECK(consumed_samples >= 0 && consumed_samples <= size,
                 "Expected consumed_samples in [0, ", size, "] (this rank's samples in epoch ",
                 impl_->epoch, "), but got ", consumed_samples, ".");
  return impl_->make_state(consumed_samples);
}

void ShardedSampler::load_state(const SamplerState& state) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  Impl& s = *impl_;
  LOCKSTEP_CHECK(state.seed == s.seed && state.shuffle == s.shuffle &&
                     state.drop_last == s.drop_last,
                 "Expected a sampler state with seed=", s.seed, " shuffle=", s.shuffle,
                 " drop_last=", s.drop_last, " like this sampler, but got '", state.to_string(),
                 "'. Build the sampler with the options of the run that saved it.");
  LOCKSTEP_CHECK(state.shard_sizes == s.shard_sizes,
                 "Expected a sampler state for ",
                 s.shard_mode ? "shard mode with the same shard sizes" : "sample mode",
                 ", but got '", state.to_string(), "'.");
  const int64_t expected_size = s.shard_mode ? static_cast<int64_t>(s.shard_sizes.size()) : s.n;
  LOCKSTEP_CHECK(state.dataset_size == expected_size, "Expected a sampler state for a dataset of ",
                 expected_size, s.shard_mode ? " shards" : " samples", ", but got '",
                 state.to_string(), "'.");
  std::vector<std::pair<int64_t, int64_t>> past = state.segments;
  int64_t position = 0;
  if (!past.empty() && past.back().first == s.world) {
    position = past.back().second;
    past.pop_back();
  } else if (!past.empty() && past.back().second == 0) {
    past.pop_back();  // a segment that consumed nothing
  }
  LOCKSTEP_CHECK(!s.shard_mode || past.empty(),
                 "Shard mode resumes only with the world size it was saved with (",
                 state.segments.empty() ? 0 : state.segments.back().first,
                 "); this sampler has ", s.world, " ranks. Use sample mode to change world size.");
  if (!s.shard_mode) {
    SamplerState check = state;
    (void)unseen_pool(check);  // validates every segment's position
  }
  s.epoch = state.epoch;
  s.past_segments = std::move(past);
  s.built = false;
  s.build();
  LOCKSTEP_CHECK(position >= 0 && position <= static_cast<int64_t>(s.indices.size()),
                 "Expected a position in [0, ", s.indices.size(), "] in the sampler state, but got ",
                 position, " ('", state.to_string(), "').");
  s.position = position;
  s.keep_position_once = true;
}

}  // namespace lockstep
