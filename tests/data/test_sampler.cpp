// ShardedSampler: partition table, Python parity, epochs through make_data_loader, mid-epoch
// resume, resume at another world size, shard mode, degenerate cases.
#include <gtest/gtest.h>
#include <torch/data.h>
#include <torch/serialize.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "lockstep/errors.h"
#include "lockstep/sampler.h"
#include "support/threads.h"

namespace {

using lockstep::SamplerState;
using lockstep::ShardedSampler;
using lockstep::ShardedSamplerOptions;

std::vector<std::vector<int64_t>> all_ranks(int64_t n, int64_t w, int64_t epoch, uint64_t seed,
                                            bool drop_last, bool shuffle = true) {
  std::vector<std::vector<int64_t>> out;
  for (int64_t r = 0; r < w; ++r) {
    out.push_back(lockstep::distributed_indices(n, w, r, epoch, seed, shuffle, drop_last));
  }
  return out;
}

// Shards are equal in length; without drop_last they cover [0, N) and repeat exactly
// W * ceil(N / W) - N samples once more (padding); with drop_last they are disjoint and hold
// W * floor(N / W) samples. Table includes N < W, N == 0, N == 1, W == 1.
TEST(ShardedSamplerMath, PartitionTable) {
  for (int64_t n : {0, 1, 2, 3, 5, 7, 8, 10, 16, 17, 100, 101, 1000}) {
    for (int64_t w : {1, 2, 3, 4, 7, 8, 16}) {
      for (bool drop_last : {false, true}) {
        for (bool shuffle : {true, false}) {
          SCOPED_TRACE(::testing::Message() << "N=" << n << " W=" << w << " drop_last="
                                            << drop_last << " shuffle=" << shuffle);
          const auto shards = all_ranks(n, w, /*epoch=*/3, /*seed=*/7, drop_last, shuffle);
          const int64_t expect = drop_last ? n / w : (n + w - 1) / w;
          std::map<int64_t, int64_t> count;
          for (const auto& s : shards) {
            ASSERT_EQ(static_cast<int64_t>(s.size()), expect);
            for (int64_t i : s) {
              ASSERT_GE(i, 0);
              ASSERT_LT(i, n);
              ++count[i];
            }
          }
          if (drop_last) {
            EXPECT_EQ(static_cast<int64_t>(count.size()), expect * w);
            for (const auto& c : count) EXPECT_EQ(c.second, 1) << "sample " << c.first;
          } else {
            EXPECT_EQ(static_cast<int64_t>(count.size()), n) << "every sample is visited";
            int64_t extra = 0;
            for (const auto& c : count) extra += c.second - 1;
            EXPECT_EQ(extra, expect * w - n) << "only the padding repeats";
            if (n >= w) {
              for (const auto& c : count) EXPECT_LE(c.second, 2);
            }
          }
        }
      }
    }
  }
}

TEST(ShardedSamplerMath, PermutationIsSeededBySeedPlusEpoch) {
  EXPECT_EQ(lockstep::epoch_permutation(50, 10, 5, true),
            lockstep::epoch_permutation(50, 12, 3, true));
  EXPECT_NE(lockstep::epoch_permutation(50, 10, 5, true),
            lockstep::epoch_permutation(50, 10, 6, true));
  std::vector<int64_t> identity(50);
  for (int64_t i = 0; i < 50; ++i) identity[static_cast<size_t>(i)] = i;
  EXPECT_EQ(lockstep::epoch_permutation(50, 10, 5, false), identity);
}

TEST(ShardedSamplerMath, RejectsBadWorld) {
  EXPECT_THROW(lockstep::distributed_indices(10, 0, 0, 0, 0, true, false),
               lockstep::InvalidArgument);
  EXPECT_THROW(lockstep::distributed_indices(10, 4, 4, 0, 0, true, false),
               lockstep::InvalidArgument);
  EXPECT_THROW(lockstep::distributed_indices(10, 4, -1, 0, 0, true, false),
               lockstep::InvalidArgument);
  EXPECT_THROW(ShardedSampler(10, ShardedSamplerOptions().num_replicas(2).rank(2)),
               lockstep::InvalidArgument);
}

// ---- Python parity ----

struct ParityCase {
  int64_t n, w, epoch;
  uint64_t seed;
  bool drop_last, shuffle;
};

std::string run_python(const std::string& script, const std::string& dir) {
  const std::string path = dir + "/oracle.py";
  std::ofstream(path) << script;
  const std::string out_path = dir + "/oracle.out";
  const std::string cmd = "/usr/bin/python3 " + path + " > " + out_path + " 2>&1";
  const int rc = std::system(cmd.c_str());
  std::ifstream in(out_path);
  std::stringstream ss;
  ss << in.rdbuf();
  if (rc != 0) return "ERROR rc=" + std::to_string(rc) + "\n" + ss.str();
  return ss.str();
}

std::string temp_dir() {
  const char* base = std::getenv("TMPDIR");
  std::string templ = std::string(base ? base : "/tmp") + "/lockstep_sampler_XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) throw std::runtime_error("mkdtemp failed");
  return buf.data();
}

TEST(ShardedSamplerParity, MatchesPythonDistributedSamplerBitForBit) {
  std::ifstream exists("/usr/bin/python3");
  if (!exists.good()) GTEST_SKIP() << "/usr/bin/python3 not found: Python parity not checked";
  const std::string dir = temp_dir();
  const std::string probe = run_python("import torch\nprint('ok')\n", dir);
  if (probe.rfind("ok", 0) != 0) {
    GTEST_SKIP() << "/usr/bin/python3 cannot import torch (install python3-torch): Python "
                    "parity not checked. Output: "
                 << probe;
  }
  std::vector<ParityCase> cases;
  for (int64_t n : {0, 1, 3, 10, 17, 64, 101, 1000, 4099}) {
    for (int64_t w : {1, 2, 3, 4, 8}) {
      for (bool drop_last : {false, true}) {
        cases.push_back({n, w, (n + w) % 4, static_cast<uint64_t>(n * 31 + w), drop_last, true});
      }
    }
  }
  cases.push_back({100, 3, 0, 0, false, false});
  cases.push_back({100, 3, 2, 0, true, false});
  cases.push_back({60000, 4, 7, 42, false, true});
  cases.push_back({60000, 7, 1, 1234567, true, true});
  cases.push_back({5, 8, 9, 0, false, true});
  cases.push_back({777, 5, 123, 18446744073709551615ull - 200, false, true});  // 64-bit seed

  std::ostringstream script;
  script << "import torch\nfrom torch.utils.data.distributed import DistributedSampler\n"
            "cases = [\n";
  for (const auto& c : cases) {
    script << "  (" << c.n << "," << c.w << "," << c.epoch << "," << c.seed << ","
           << (c.drop_last ? "True" : "False") << "," << (c.shuffle ? "True" : "False") << "),\n";
  }
  script << "]\n"
            "for (n, w, epoch, seed, drop_last, shuffle) in cases:\n"
            "  for r in range(w):\n"
            "    s = DistributedSampler(range(n), num_replicas=w, rank=r, shuffle=shuffle,\n"
            "                           seed=seed, drop_last=drop_last)\n"
            "    s.set_epoch(epoch)\n"
            "    print(' '.join(str(i) for i in s))\n";
  const std::string out = run_python(script.str(), dir);
  ASSERT_EQ(out.rfind("ERROR", 0), std::string::npos) << out;
  std::istringstream lines(out);
  size_t compared = 0;
  for (const auto& c : cases) {
    for (int64_t r = 0; r < c.w; ++r) {
      std::string line;
      ASSERT_TRUE(static_cast<bool>(std::getline(lines, line))) << "python output too short";
      std::istringstream fields(line);
      std::vector<int64_t> expected;
      int64_t v;
      while (fields >> v) expected.push_back(v);
      const auto got =
          lockstep::distributed_indices(c.n, c.w, r, c.epoch, c.seed, c.shuffle, c.drop_last);
      ASSERT_EQ(got, expected) << "N=" << c.n << " W=" << c.w << " rank=" << r
                               << " epoch=" << c.epoch << " seed=" << c.seed
                               << " drop_last=" << c.drop_last << " shuffle=" << c.shuffle;
      // And the sampler object yields the same through next().
      ShardedSampler sampler(static_cast<size_t>(c.n), ShardedSamplerOptions()
                                                           .num_replicas(c.w)
                                                           .rank(r)
                                                           .seed(c.seed)
                                                           .shuffle(c.shuffle)
                                                           .drop_last(c.drop_last));
      sampler.set_epoch(c.epoch);
      EXPECT_EQ(sampler.indices(), expected);
      ++compared;
    }
  }
  EXPECT_GT(compared, 100u);
  std::system(("rm -rf '" + dir + "'").c_str());
}

// ---- through make_data_loader ----

// A dataset whose examples are their own index, so batches reveal the sampler's order.
struct IndexDataset : torch::data::datasets::Dataset<IndexDataset, int64_t> {
  explicit IndexDataset(size_t n) : n_(n) {}
  int64_t get(size_t index) override { return static_cast<int64_t>(index); }
  torch::optional<size_t> size() const override { return n_; }
  size_t n_;
};

template <typename Loader>
std::vector<int64_t> drain(Loader& loader, size_t max_batches = SIZE_MAX,
                           int64_t* consumed = nullptr) {
  std::vector<int64_t> seen;
  size_t batches = 0;
  for (auto& batch : loader) {
    for (int64_t i : batch) seen.push_back(i);
    if (consumed) *consumed += static_cast<int64_t>(batch.size());
    if (++batches == max_batches) break;
  }
  return seen;
}

TEST(ShardedSamplerLoader, SetEpochReachesTheLoadersCopy) {
  for (size_t workers : {0, 2}) {
    SCOPED_TRACE(::testing::Message() << "workers=" << workers);
    ShardedSampler sampler(103, ShardedSamplerOptions().num_replicas(3).rank(1).seed(5));
    auto loader = torch::data::make_data_loader(
        IndexDataset(103), sampler, torch::data::DataLoaderOptions().batch_size(8).workers(workers));
    std::vector<std::vector<int64_t>> epochs;
    for (int64_t e = 0; e < 3; ++e) {
      sampler.set_epoch(e);
      epochs.push_back(drain(*loader));
      EXPECT_EQ(epochs.back(), lockstep::distributed_indices(103, 3, 1, e, 5, true, false));
    }
    EXPECT_NE(epochs[0], epochs[1]);
    EXPECT_NE(epochs[1], epochs[2]);
    // Iterating again without set_epoch repeats the epoch from its start.
    EXPECT_EQ(drain(*loader), epochs[2]);
  }
}

TEST(ShardedSamplerLoader, AdvanceEpochOnReset) {
  ShardedSampler sampler(50, ShardedSamplerOptions().num_replicas(2).rank(0).seed(1)
                                 .advance_epoch_on_reset(true));
  auto loader = torch::data::make_data_loader(IndexDataset(50), sampler,
                                              torch::data::DataLoaderOptions().batch_size(4));
  for (int64_t e = 0; e < 3; ++e) {
    EXPECT_EQ(drain(*loader), lockstep::distributed_indices(50, 2, 0, e, 1, true, false));
    EXPECT_EQ(sampler.epoch(), e);
  }
  // An explicit set_epoch wins over the automatic advance for the next loop.
  sampler.set_epoch(10);
  EXPECT_EQ(drain(*loader), lockstep::distributed_indices(50, 2, 0, 10, 1, true, false));
  EXPECT_EQ(drain(*loader), lockstep::distributed_indices(50, 2, 0, 11, 1, true, false));
}

// Mid-epoch resume through a torch archive, with and without workers (prefetch).
TEST(ShardedSamplerResume, MidEpochSaveLoadIsExact) {
  for (size_t workers : {0, 3}) {
    SCOPED_TRACE(::testing::Message() << "workers=" << workers);
    const auto opts = ShardedSamplerOptions().num_replicas(4).rank(2).seed(99);
    const auto full = lockstep::distributed_indices(1001, 4, 2, /*epoch=*/6, 99, true, false);
    ShardedSampler sampler(1001, opts);
    sampler.set_epoch(6);
    auto loader = torch::data::make_data_loader(
        IndexDataset(1001), sampler,
        torch::data::DataLoaderOptions().batch_size(10).workers(workers));
    int64_t consumed = 0;
    const auto first = drain(*loader, /*max_batches=*/7, &consumed);
    ASSERT_EQ(consumed, 70);
    // With workers the sampler ran ahead (prefetch); state(consumed) is what the loop saw.
    if (workers > 0) {
      EXPECT_GT(sampler.position(), consumed);
    }
    torch::serialize::OutputArchive out;
    std::stringstream buffer;
    {
      // Save through the Sampler interface of a sampler holding the consumed state.
      ShardedSampler snapshot(1001, opts);
      snapshot.load_state(sampler.state(consumed));
      snapshot.save(out);
      out.save_to(buffer);
    }
    // Fresh process: new sampler, new loader; the usual loop calls set_epoch(restored epoch).
    ShardedSampler resumed(1001, opts);
    torch::serialize::InputArchive in;
    in.load_from(buffer);
    resumed.load(in);
    EXPECT_EQ(resumed.epoch(), 6);
    resumed.set_epoch(6);  // keeps the restored position
    auto loader2 = torch::data::make_data_loader(
        IndexDataset(1001), resumed,
        torch::data::DataLoaderOptions().batch_size(10).workers(workers));
    auto rest = drain(*loader2);
    std::vector<int64_t> joined = first;
    joined.insert(joined.end(), rest.begin(), rest.end());
    EXPECT_EQ(joined, full);
    // The next epoch starts from the top again.
    resumed.set_epoch(7);
    EXPECT_EQ(drain(*loader2), lockstep::distributed_indices(1001, 4, 2, 7, 99, true, false));
  }
}

TEST(ShardedSamplerResume, StateTextRoundTripAndErrors) {
  SamplerState s;
  s.epoch = 4;
  s.seed = 18446744073709551615ull;
  s.drop_last = true;
  s.dataset_size = 77;
  s.segments = {{4, 3}, {2, 5}};
  EXPECT_EQ(SamplerState::from_string(s.to_string()), s);
  s.shard_sizes = {3, 0, 9};
  s.dataset_size = 3;
  EXPECT_EQ(SamplerState::from_string(s.to_string()), s);
  EXPECT_THROW(SamplerState::from_string("epoch=1"), lockstep::InvalidArgument);
  EXPECT_THROW(SamplerState::from_string("lockstep-sampler-v1 epoch=x size=3"),
               lockstep::InvalidArgument);
  EXPECT_THROW(SamplerState::from_string("lockstep-sampler-v1 size=3"), lockstep::InvalidArgument);
  // A state from another configuration or dataset is refused with a message.
  ShardedSampler sampler(10, ShardedSamplerOptions().seed(1));
  SamplerState other = sampler.state();
  other.seed = 2;
  EXPECT_THROW(sampler.load_state(other), lockstep::InvalidArgument);
  other = sampler.state();
  other.dataset_size = 11;
  EXPECT_THROW(sampler.load_state(other), lockstep::InvalidArgument);
  other = sampler.state();
  other.segments = {{1, 11}};
  EXPECT_THROW(sampler.load_state(other), lockstep::InvalidArgument);
  EXPECT_THROW(sampler.state(11), lockstep::InvalidArgument);
}

// Resume at another world size: the new ranks together visit exactly the samples the old
// ranks had not, in equal-length shards, with repeats only from padding; twice in a row.
TEST(ShardedSamplerResume, WorldSizeChangeVisitsExactlyTheUnseen) {
  struct Case {
    int64_t n, w0, p0, w1, p1, w2;
    bool drop_last;
  };
  const std::vector<Case> cases = {
      {103, 4, 10, 3, 5, 5, false}, {103, 4, 10, 3, 5, 5, true}, {1000, 8, 0, 3, 100, 1, false},
      {1000, 3, 334, 2, 0, 4, false}, {10, 4, 2, 16, 0, 2, false}, {60000, 4, 7000, 6, 123, 7, true},
      {50, 1, 25, 4, 3, 3, false}};
  for (const auto& c : cases) {
    SCOPED_TRACE(::testing::Message() << "N=" << c.n << " W " << c.w0 << "@" << c.p0 << " -> "
                                      << c.w1 << "@" << c.p1 << " -> " << c.w2
                                      << " drop_last=" << c.drop_last);
    const auto opts = [&](int64_t w, int64_t r) {
      return ShardedSamplerOptions().num_replicas(w).rank(r).seed(3).drop_last(c.drop_last);
    };
    std::multiset<int64_t> seen;
    std::set<int64_t> expected_total;
    // Segment 0: every rank consumes p0 samples of epoch 2.
    SamplerState state;
    for (int64_t r = 0; r < c.w0; ++r) {
      ShardedSampler s(static_cast<size_t>(c.n), opts(c.w0, r));
      s.set_epoch(2);
      for (int64_t i : s.indices()) expected_total.insert(i);
      const auto batch = s.next(static_cast<size_t>(std::max<int64_t>(c.p0, 1)));
      if (c.p0 > 0) {
        ASSERT_TRUE(batch.has_value());
        for (size_t i : *batch) seen.insert(static_cast<int64_t>(i));
      }
      const SamplerState st = s.state(c.p0);
      if (r == 0) state = st;
      EXPECT_EQ(st, state) << "every rank saves the same state";
    }
    // Segments 1 and 2 at other world sizes.
    for (int seg = 1; seg <= 2; ++seg) {
      const int64_t w = seg == 1 ? c.w1 : c.w2;
      const bool last = seg == 2;
      const int64_t p = last ? -1 : c.p1;
      std::vector<std::vector<int64_t>> lists;
      SamplerState next_state;
      for (int64_t r = 0; r < w; ++r) {
        ShardedSampler s(static_cast<size_t>(c.n), opts(w, r));
        s.load_state(state);
        s.set_epoch(2);  // keeps the restored position
        s.reset();       // as make_data_loader's begin() does: keeps it too
        lists.push_back(s.indices());
        const int64_t take = last ? static_cast<int64_t>(lists.back().size()) : p;
        for (int64_t i = 0; i < take; ++i) seen.insert(lists.back()[static_cast<size_t>(i)]);
        if (!last) {
          const SamplerState st = s.state(p);
          if (r == 0) next_state = st;
          EXPECT_EQ(st, next_state);
        }
      }
      for (const auto& l : lists) EXPECT_EQ(l.size(), lists[0].size()) << "equal shard lengths";
      if (!last) state = next_state;
      // The last segment's ranks together hold exactly the unseen pool (plus padding).
      if (last && !c.drop_last) {
        const auto pool = lockstep::unseen_pool(state);
        std::set<int64_t> held;
        for (const auto& l : lists) held.insert(l.begin(), l.end());
        EXPECT_EQ(held, std::set<int64_t>(pool.begin(), pool.end()));
      }
    }
    std::map<int64_t, int64_t> count;
    for (int64_t i : seen) ++count[i];
    int64_t repeats = 0;
    for (const auto& kv : count) repeats += kv.second - 1;
    if (!c.drop_last) {
      EXPECT_EQ(static_cast<int64_t>(count.size()), c.n) << "every sample seen";
      // Repeats only from padding: at most W-1 per segment.
      EXPECT_LE(repeats, (c.w0 - 1) + (c.w1 - 1) + (c.w2 - 1));
    } else {
      EXPECT_EQ(repeats, 0) << "drop_last never repeats";
      // At most W-1 dropped per segment.
      EXPECT_GE(static_cast<int64_t>(count.size()), c.n - (c.w0 - 1) - (c.w1 - 1) - (c.w2 - 1));
    }
  }
}

TEST(ShardedSamplerResume, SameWorldSizeContinuesTheOriginalShard) {
  const auto opts = ShardedSamplerOptions().num_replicas(3).rank(1).seed(8);
  ShardedSampler a(20, opts);
  a.set_epoch(1);
  a.next(2);
  ShardedSampler b(20, opts);
  b.load_state(a.state());
  EXPECT_EQ(b.indices(), a.indices()) << "same padding as an uninterrupted run";
  EXPECT_EQ(b.position(), 2);
}

// ---- shard mode ----

TEST(ShardedSamplerShards, AssignmentIsBalancedDisjointAndDeterministic) {
  const std::vector<std::vector<int64_t>> tables = {
      {100, 90, 80, 70, 60, 50, 40, 30, 20, 10},
      {5, 5, 5, 5, 5, 5, 5},
      {1000, 1, 1, 1, 1, 1, 1, 1},
      {7, 0, 3, 9, 12, 1, 4, 4, 8, 2, 6, 11, 5}};
  for (const auto& sizes : tables) {
    for (int64_t w : {1, 2, 3, 4}) {
      SCOPED_TRACE(::testing::Message() << "shards=" << sizes.size() << " W=" << w);
      const auto a = lockstep::assign_shards(sizes, w, /*seed=*/4, /*epoch=*/2, true);
      std::multiset<int64_t> all;
      const int64_t biggest = *std::max_element(sizes.begin(), sizes.end());
      for (int64_t r = 0; r < w; ++r) {
        int64_t load = 0;
        for (int64_t s : a.shards_of_rank[static_cast<size_t>(r)]) {
          all.insert(s);
          load += sizes[static_cast<size_t>(s)];
        }
        EXPECT_EQ(load, a.load_of_rank[static_cast<size_t>(r)]);
      }
      EXPECT_EQ(all.size(), sizes.size());
      EXPECT_EQ(std::set<int64_t>(all.begin(), all.end()).size(), sizes.size()) << "disjoint";
      const auto mm = std::minmax_element(a.load_of_rank.begin(), a.load_of_rank.end());
      EXPECT_LE(*mm.second - *mm.first, biggest) << "LPT bound";
      // Deterministic for (seed, epoch).
      const auto again = lockstep::assign_shards(sizes, w, 4, 2, true);
      EXPECT_EQ(again.shards_of_rank, a.shards_of_rank);
    }
  }
  // The 10-shard table over 2 ranks splits its 550 evenly.
  const auto even = lockstep::assign_shards(tables[0], 2, 0, 0, true);
  EXPECT_EQ(even.load_of_rank[0] + even.load_of_rank[1], 550);
  EXPECT_LE(std::abs(even.load_of_rank[0] - even.load_of_rank[1]), 10);
  // Equal-size shards move between ranks from epoch to epoch.
  bool moved = false;
  const auto e0 = lockstep::assign_shards(tables[1], 3, 4, 0, true);
  for (int64_t e = 1; e < 5 && !moved; ++e) {
    moved = lockstep::assign_shards(tables[1], 3, 4, e, true).shards_of_rank != e0.shards_of_rank;
  }
  EXPECT_TRUE(moved);
}

TEST(ShardedSamplerShards, SamplerVisitsOnlyItsShardsInEqualCounts) {
  const std::vector<int64_t> sizes = {7, 0, 3, 9, 12, 1, 4, 4, 8, 2, 6, 11, 5};
  for (bool drop_last : {false, true}) {
    for (int64_t w : {1, 2, 3, 5}) {
      SCOPED_TRACE(::testing::Message() << "W=" << w << " drop_last=" << drop_last);
      std::set<int64_t> covered;
      size_t length = 0;
      for (int64_t r = 0; r < w; ++r) {
        auto s = ShardedSampler::over_shards(
            sizes, ShardedSamplerOptions().num_replicas(w).rank(r).seed(9).drop_last(drop_last));
        s.set_epoch(1);
        const auto offsets = s.shard_offsets();
        const auto shards = s.shards();
        const auto idx = s.indices();
        if (r == 0) length = idx.size();
        EXPECT_EQ(idx.size(), length) << "rank " << r;
        for (int64_t i : idx) {
          bool mine = false;
          for (int64_t k : shards) {
            mine |= i >= offsets[static_cast<size_t>(k)] && i < offsets[static_cast<size_t>(k) + 1];
          }
          EXPECT_TRUE(mine) << "rank " << r << " index " << i << " outside its shards";
          covered.insert(i);
        }
      }
      if (!drop_last) {
        EXPECT_EQ(covered.size(), 72u) << "every sample visited";
      }
    }
  }
  // Fewer non-empty shards than ranks: a clear error.
  EXPECT_THROW(ShardedSampler::over_shards({4, 0, 5}, ShardedSamplerOptions().num_replicas(3).rank(0)),
               lockstep::InvalidArgument);
  // Shard mode resumes at the same world size only.
  auto a = ShardedSampler::over_shards(sizes, ShardedSamplerOptions().num_replicas(2).rank(0));
  a.next(5);
  auto b = ShardedSampler::over_shards(sizes, ShardedSamplerOptions().num_replicas(2).rank(0));
  b.load_state(a.state());
  EXPECT_EQ(b.position(), 5);
  EXPECT_EQ(b.indices(), a.indices());
  auto c = ShardedSampler::over_shards(sizes, ShardedSamplerOptions().num_replicas(3).rank(0));
  EXPECT_THROW(c.load_state(a.state()), lockstep::InvalidArgument);
}

// ---- degenerate cases ----

TEST(ShardedSamplerDegenerate, EmptyOneSampleOneRankAndTinyDatasets) {
  // Empty dataset: an empty epoch on every rank (as Python's DistributedSampler).
  ShardedSampler empty(0, ShardedSamplerOptions().num_replicas(4).rank(3));
  EXPECT_EQ(empty.size(), 0u);
  EXPECT_FALSE(empty.next(8).has_value());
  // One sample over four ranks: every rank gets sample 0.
  for (int64_t r = 0; r < 4; ++r) {
    ShardedSampler one(1, ShardedSamplerOptions().num_replicas(4).rank(r));
    EXPECT_EQ(one.indices(), std::vector<int64_t>{0});
    // drop_last: nothing for anyone.
    ShardedSampler none(1, ShardedSamplerOptions().num_replicas(4).rank(r).drop_last(true));
    EXPECT_EQ(none.size(), 0u);
  }
  // N < W: ranks 0..N-1 get distinct samples, the rest repeat from the start.
  std::vector<int64_t> got;
  for (int64_t r = 0; r < 5; ++r) {
    ShardedSampler s(3, ShardedSamplerOptions().num_replicas(5).rank(r).seed(2));
    ASSERT_EQ(s.size(), 1u);
    got.push_back(s.indices()[0]);
  }
  EXPECT_EQ(got[3], got[0]);
  EXPECT_EQ(got[4], got[1]);
  EXPECT_EQ(std::set<int64_t>(got.begin(), got.begin() + 3).size(), 3u);
  // One rank: the whole permutation, in batches, then nullopt.
  ShardedSampler all(10);
  std::vector<int64_t> seen;
  while (auto b = all.next(3)) {
    EXPECT_LE(b->size(), 3u);
    for (size_t i : *b) seen.push_back(static_cast<int64_t>(i));
  }
  EXPECT_EQ(seen, lockstep::epoch_permutation(10, 0, 0, true));
  EXPECT_THROW(all.next(0), lockstep::InvalidArgument);
}

TEST(ShardedSamplerGroup, TakesWorldAndRankFromTheProcessGroup) {
  lockstep_test::with_groups(3, [](const lockstep::ProcessGroupPtr& pg) {
    ShardedSampler s(100, *pg, ShardedSamplerOptions().seed(1));
    EXPECT_EQ(s.num_replicas(), 3);
    EXPECT_EQ(s.rank(), pg->rank());
    EXPECT_EQ(s.indices(), lockstep::distributed_indices(100, 3, pg->rank(), 0, 1, true, false));
  });
}

}  // namespace
