// The in-process thread group: world sizes 1..4, element counts 0, 1, odd and several MiB,
// float32 / float64 / int64, every reduce op, exact and bitwise-identical results; many
// collectives in flight; mismatches, timeouts and abort named.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <map>
#include <tuple>

#include "lockstep/errors.h"
#include "lockstep/thread_group.h"
#include "support/threads.h"

using lockstep::ReduceOp;
using lockstep_test::run_ranks;

namespace {

// The last count spans several 256 KiB slices in every dtype.
const std::vector<int64_t> kCounts = {0, 1, 1001, 300 * 1024 + 7};
const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kLong};

at::Tensor input(int r, int64_t n, at::ScalarType dtype) {
  return (at::arange(n, at::kLong).remainder(3) + (r + 1)).to(dtype);
}

at::Tensor expected(ReduceOp op, int world, int64_t n, at::ScalarType dtype) {
  auto acc = input(0, n, at::kDouble);
  for (int r = 1; r < world; ++r) {
    auto x = input(r, n, at::kDouble);
    switch (op) {
      case ReduceOp::kSum:
      case ReduceOp::kAvg: acc = acc + x; break;
      case ReduceOp::kMin: acc = at::minimum(acc, x); break;
      case ReduceOp::kMax: acc = at::maximum(acc, x); break;
      case ReduceOp::kProduct: acc = acc * x; break;
    }
  }
  if (op == ReduceOp::kAvg) acc = acc / world;
  return acc.to(dtype);
}

// Runs fn(group) on one thread per rank over fresh thread groups.
void with_thread_groups(int world, const std::function<void(const lockstep::ProcessGroupPtr&)>& fn,
                        lockstep::ThreadGroupOptions options = lockstep::ThreadGroupOptions()) {
  auto groups = lockstep::new_thread_groups(world, options.timeout(std::chrono::seconds(20)));
  run_ranks(world, [&](int r) { fn(groups[r]); });
}

class ThreadGroup : public ::testing::TestWithParam<int> {};

TEST_P(ThreadGroup, AllreduceEveryOpDtypeAndSize) {
  const int world = GetParam();
  const std::vector<ReduceOp> ops = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin,
                                     ReduceOp::kMax, ReduceOp::kProduct};
  std::map<std::tuple<int, int, int64_t>, at::Tensor> want;  // computed once, not per rank
  for (auto dtype : kDtypes) {
    for (int64_t n : kCounts) {
      for (auto op : ops) {
        want[{static_cast<int>(dtype), static_cast<int>(op), n}] = expected(op, world, n, dtype);
      }
    }
  }
  with_thread_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    EXPECT_EQ(pg->backend(), "threads");
    for (auto dtype : kDtypes) {
      for (int64_t n : kCounts) {
        auto mine = input(pg->rank(), n, dtype);
        for (auto op : ops) {
          if (op == ReduceOp::kAvg && dtype == at::kLong) continue;
          auto t = mine.clone();
          pg->allreduce(t, op)->wait();
          ASSERT_TRUE(at::equal(t, want.at({static_cast<int>(dtype), static_cast<int>(op), n})))
              << pg->where() << " op " << lockstep::to_string(op) << " dtype " << dtype << " n " << n;
        }
      }
    }
  });
}

// Random floats, whose sum depends on the order: every rank must hold the same bits, and the
// bits of a left-to-right sum over ranks 0..world-1.
TEST_P(ThreadGroup, FloatSumIsBitwiseIdenticalOnEveryRankInRankOrder) {
  const int world = GetParam();
  const int64_t n = 700 * 1000 + 3;
  std::vector<at::Tensor> inputs, results(world);
  for (int r = 0; r < world; ++r) inputs.push_back(at::randn({n}, at::kFloat) * (r + 1) * 1e3);
  auto want = inputs[0].clone();
  for (int r = 1; r < world; ++r) want.add_(inputs[r]);
  with_thread_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    results[pg->rank()] = inputs[pg->rank()].clone();
    pg->allreduce(results[pg->rank()])->wait();
  }, lockstep::ThreadGroupOptions().slice_bytes(4096));
  for (int r = 0; r < world; ++r) {
    ASSERT_TRUE(at::equal(results[r], want)) << "rank " << r;
  }
}

TEST_P(ThreadGroup, BroadcastFromEveryRoot) {
  const int world = GetParam();
  with_thread_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    for (int root = 0; root < world; ++root) {
      for (int64_t n : kCounts) {
        auto t = input(pg->rank(), n, at::kFloat);
        pg->broadcast(t, root)->wait();
        ASSERT_TRUE(at::equal(t, input(root, n, at::kFloat))) << pg->where();
      }
    }
  });
}

TEST_P(ThreadGroup, AllgatherAndReduceScatter) {
  const int world = GetParam();
  with_thread_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{1001}}) {
      std::vector<at::Tensor> out;
      for (int i = 0; i < world; ++i) out.push_back(at::empty({n}, at::kDouble));
      pg->allgather(out, input(pg->rank(), n, at::kDouble))->wait();
      for (int i = 0; i < world; ++i) {
        ASSERT_TRUE(at::equal(out[i], input(i, n, at::kDouble))) << pg->where();
      }
      for (auto op : {ReduceOp::kSum, ReduceOp::kMax}) {
        std::vector<at::Tensor> ins;
        for (int i = 0; i < world; ++i) ins.push_back(input(pg->rank(), n, at::kLong) * (i + 1));
        auto res = at::empty({n}, at::kLong);
        pg->reduce_scatter(res, ins, op)->wait();
        ASSERT_TRUE(at::equal(res, expected(op, world, n, at::kLong) * (pg->rank() + 1)))
            << pg->where();
      }
    }
    pg->barrier()->wait();
  });
}

// reduce straight into root's tensors: a list of mixed dtypes and sizes (one spanning many
// slices), every root, sum and avg; root's values are the bits of a sum starting from its own
// tensor and adding the others in rank order; the other ranks' tensors are untouched.
TEST_P(ThreadGroup, ReduceListIntoEveryRootInRankOrder) {
  const int world = GetParam();
  const std::vector<std::pair<int64_t, at::ScalarType>> shapes = {
      {700 * 1000 + 3, at::kFloat}, {1001, at::kDouble}, {0, at::kFloat}, {1, at::kLong}};
  std::vector<std::vector<at::Tensor>> inputs(world);
  for (int r = 0; r < world; ++r) {
    for (const auto& s : shapes) {
      inputs[r].push_back(s.second == at::kLong
                              ? at::full({s.first}, static_cast<int64_t>(r + 2), at::kLong)
                              : (at::randn({s.first}, at::kDouble) * (r + 1) * 1e3).to(s.second));
    }
  }
  for (auto options : {lockstep::ThreadGroupOptions().slice_bytes(4096),
                       lockstep::ThreadGroupOptions().spin(std::chrono::microseconds(50))}) {
    for (int root = 0; root < world; ++root) {
      for (auto op : {ReduceOp::kSum, ReduceOp::kAvg}) {
        std::vector<std::vector<at::Tensor>> results(world);
        with_thread_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
          auto& mine = results[pg->rank()];
          for (const auto& t : inputs[pg->rank()]) mine.push_back(t.clone());
          // Avg needs floating tensors: leave the int64 one out for avg.
          if (op == ReduceOp::kAvg) mine.pop_back();
          pg->reduce(mine, root, op)->wait();
        }, options);
        for (int r = 0; r < world; ++r) {
          for (size_t i = 0; i < results[r].size(); ++i) {
            at::Tensor want = inputs[r][i];
            if (r == root) {
              want = inputs[root][i].clone();
              for (int q = 0; q < world; ++q) {
                if (q != root) want.add_(inputs[q][i]);
              }
              if (op == ReduceOp::kAvg) want.div_(world);
            }
            ASSERT_TRUE(at::equal(results[r][i], want))
                << "rank " << r << " root " << root << " tensor " << i << " op "
                << lockstep::to_string(op);
          }
        }
      }
    }
  }
}

TEST_P(ThreadGroup, ManyAsyncInFlightComplete) {
  const int world = GetParam();
  with_thread_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    std::vector<at::Tensor> ts;
    std::vector<lockstep::WorkPtr> works;
    for (int i = 0; i < 64; ++i) {
      ts.push_back(at::full({4096 + i * 997}, static_cast<float>(i + pg->rank())));
      works.push_back(pg->allreduce(ts.back()));
    }
    for (int i = 63; i >= 0; --i) {  // waiting out of order is fine
      works[i]->wait();
      EXPECT_TRUE(works[i]->is_completed());
      float want = static_cast<float>(world * i + world * (world - 1) / 2);
      ASSERT_TRUE(at::equal(ts[i], at::full({4096 + i * 997}, want))) << pg->where() << i;
    }
  }, lockstep::ThreadGroupOptions().slice_bytes(8192));
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, ThreadGroup, ::testing::Values(1, 2, 3, 4));

std::string message_of(const lockstep::WorkPtr& work) {
  try {
    work->wait();
  } catch (const lockstep::Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(ThreadGroupErrors, BadArgumentsThrowLocallyAndFailPeers) {
  std::vector<std::string> peer(2);
  with_thread_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    if (pg->rank() == 0) {
      auto ints = at::ones({3}, at::kLong);
      try {
        pg->allreduce(ints, ReduceOp::kAvg);
        ADD_FAILURE() << "expected InvalidArgument";
      } catch (const lockstep::InvalidArgument& e) {
        EXPECT_NE(std::string(e.what()).find("[rank 0/2] allreduce"), std::string::npos) << e.what();
      }
    } else {
      auto t = at::ones({3}, at::kLong);
      peer[1] = message_of(pg->allreduce(t));
    }
    auto strided = at::ones({4, 4}).t();
    EXPECT_THROW(pg->allreduce(strided), lockstep::InvalidArgument);
  });
  EXPECT_NE(peer[1].find("rank 0 passed invalid arguments"), std::string::npos) << peer[1];
}

TEST(ThreadGroupErrors, MismatchedCollectivesAreNamed) {
  std::vector<std::string> msgs(2), sizes(2);
  with_thread_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto t = at::ones({4});
    msgs[pg->rank()] = message_of(pg->rank() == 0 ? pg->allreduce(t) : pg->broadcast(t, 0));
    auto u = at::ones({pg->rank() == 0 ? 4 : 5});
    sizes[pg->rank()] = message_of(pg->allreduce(u));
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(msgs[r].find("rank 0 issued allreduce but rank 1 issued broadcast"), std::string::npos)
        << msgs[r];
    EXPECT_NE(sizes[r].find("rank 0 has 4 x Float but rank 1 has 5 x Float"), std::string::npos)
        << sizes[r];
  }
}

TEST(ThreadGroupErrors, MismatchedReduceListsAreNamed) {
  std::vector<std::string> counts(2), roots(2), shapes(2);
  with_thread_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    std::vector<at::Tensor> list(pg->rank() == 0 ? 2 : 3, at::ones({4}));
    counts[pg->rank()] = message_of(pg->reduce(list, 0));
    std::vector<at::Tensor> two = {at::ones({4}), at::ones({4})};
    roots[pg->rank()] = message_of(pg->reduce(two, pg->rank()));
    std::vector<at::Tensor> odd = {at::ones({4}), at::ones({pg->rank() == 0 ? 4 : 6})};
    shapes[pg->rank()] = message_of(pg->reduce(odd, 0));
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(counts[r].find("reduce: rank 0 passes 2 tensors but rank 1 passes 3"),
              std::string::npos) << counts[r];
    EXPECT_NE(roots[r].find("reduce: rank 0 names root 0 but rank 1 names root 1"),
              std::string::npos) << roots[r];
    EXPECT_NE(shapes[r].find("reduce: tensor 1 is 4 x Float on rank 0 but 6 x Float on rank 1"),
              std::string::npos) << shapes[r];
  }
  with_thread_groups(1, [&](const lockstep::ProcessGroupPtr& pg) {
    std::vector<at::Tensor> one = {at::ones({2})};
    EXPECT_THROW(pg->reduce(one, 1), lockstep::InvalidArgument);
  });
}

TEST(ThreadGroupErrors, MissingRankTimesOutNamingIt) {
  auto groups = lockstep::new_thread_groups(
      3, lockstep::ThreadGroupOptions().timeout(std::chrono::milliseconds(200)));
  auto t = at::ones({8});
  auto work = groups[0]->allreduce(t);
  auto msg = message_of(work);
  EXPECT_NE(msg.find("waiting for rank(s) 1, 2"), std::string::npos) << msg;
}

TEST(ThreadGroupErrors, AbortFailsPendingAndLaterCollectives) {
  auto groups = lockstep::new_thread_groups(2);
  auto t = at::ones({8});
  auto work = groups[0]->allreduce(t);
  lockstep::abort_thread_groups(groups[1], "replica 1 threw");
  try {
    work->wait();
    FAIL() << "expected CommError";
  } catch (const lockstep::CommError& e) {
    EXPECT_NE(std::string(e.what()).find("replica 1 threw"), std::string::npos) << e.what();
  }
  EXPECT_THROW(groups[1]->allreduce(t)->wait(), lockstep::CommError);
  auto gloo_like = std::shared_ptr<lockstep::ProcessGroup>();
  EXPECT_THROW(lockstep::abort_thread_groups(gloo_like, "x"), lockstep::InvalidArgument);
}

}  // namespace
