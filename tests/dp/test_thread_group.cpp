// The in-process thread group, what only it has: reduce straight into the root's tensors in
// rank order with small slices and with spinning waiters (world sizes 1..4); arguments that fail
// the peers too; mismatches, timeouts and abort named. Every collective (exact, bitwise in rank
// order, every dtype and count, many in flight) is in tests/comm/test_conformance.cpp.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "lockstep/errors.h"
#include "lockstep/thread_group.h"
#include "support/threads.h"

using lockstep::ReduceOp;
using lockstep_test::run_ranks;

namespace {

// Runs fn(group) on one thread per rank over fresh thread groups.
void with_thread_groups(int world, const std::function<void(const lockstep::ProcessGroupPtr&)>& fn,
                        lockstep::ThreadGroupOptions options = lockstep::ThreadGroupOptions()) {
  auto groups = lockstep::new_thread_groups(world, options.timeout(std::chrono::seconds(20)));
  run_ranks(world, [&](int r) { fn(groups[r]); });
}

class ThreadGroup : public ::testing::TestWithParam<int> {};

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
  EXPECT_NE(msg.find("allreduce #1 (thread group) timed out after 0.2 s waiting for rank(s) 1, 2"),
            std::string::npos)
      << msg;
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
