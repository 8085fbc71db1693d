// Collectives with ranks as threads over an in-process store: world sizes 1..4, element
// counts 0, 1, odd and several MiB, float32 / float64 / int64, every reduce op; exact results.
#include <torch/torch.h>

#include "lockstep/errors.h"
#include "lockstep/process_group.h"
#include "support/threads.h"

using lockstep::ReduceOp;
using lockstep_test::with_groups;

namespace {

const std::vector<int64_t> kCounts = {0, 1, 1001, 3 * 512 * 1024 + 7};  // last: ~6 MiB f32
const std::vector<torch::Dtype> kDtypes = {torch::kFloat32, torch::kFloat64, torch::kInt64};

// Rank r's input: small integers, so sums, products and averages are exact in every dtype.
torch::Tensor input(int r, int64_t n, torch::Dtype dtype) {
  return (torch::arange(n, torch::kInt64).remainder(3) + (r + 1)).to(dtype);
}

torch::Tensor expected(ReduceOp op, int world, int64_t n, torch::Dtype dtype) {
  auto acc = input(0, n, torch::kFloat64);
  for (int r = 1; r < world; ++r) {
    auto x = input(r, n, torch::kFloat64);
    switch (op) {
      case ReduceOp::kSum:
      case ReduceOp::kAvg: acc = acc + x; break;
      case ReduceOp::kMin: acc = torch::minimum(acc, x); break;
      case ReduceOp::kMax: acc = torch::maximum(acc, x); break;
      case ReduceOp::kProduct: acc = acc * x; break;
    }
  }
  if (op == ReduceOp::kAvg) acc = acc / world;
  return acc.to(dtype);
}

class Collectives : public ::testing::TestWithParam<int> {};

TEST_P(Collectives, AllreduceEveryOpDtypeAndSize) {
  const int world = GetParam();
  with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    for (auto dtype : kDtypes) {
      for (int64_t n : kCounts) {
        for (auto op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin, ReduceOp::kMax,
                        ReduceOp::kProduct}) {
          if (op == ReduceOp::kAvg && dtype == torch::kInt64) continue;
          auto t = input(pg->rank(), n, dtype);
          pg->allreduce(t, op)->wait();
          ASSERT_TRUE(torch::equal(t, expected(op, world, n, dtype)))
              << pg->where() << " op " << lockstep::to_string(op) << " dtype " << dtype
              << " n " << n;
        }
      }
    }
  });
}

TEST_P(Collectives, BroadcastFromEveryRoot) {
  const int world = GetParam();
  with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    for (int root = 0; root < world; ++root) {
      for (int64_t n : kCounts) {
        auto t = input(pg->rank(), n, torch::kFloat32);
        pg->broadcast(t, root)->wait();
        ASSERT_TRUE(torch::equal(t, input(root, n, torch::kFloat32))) << pg->where();
      }
    }
  });
}

TEST_P(Collectives, AllgatherAndReduceScatter) {
  const int world = GetParam();
  with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{1001}}) {
      std::vector<torch::Tensor> out;
      for (int i = 0; i < world; ++i) out.push_back(torch::empty({n}, torch::kFloat64));
      pg->allgather(out, input(pg->rank(), n, torch::kFloat64))->wait();
      for (int i = 0; i < world; ++i) {
        ASSERT_TRUE(torch::equal(out[i], input(i, n, torch::kFloat64))) << pg->where();
      }
      std::vector<torch::Tensor> ins;
      for (int i = 0; i < world; ++i) ins.push_back(input(pg->rank(), n, torch::kInt64) * (i + 1));
      auto res = torch::empty({n}, torch::kInt64);
      pg->reduce_scatter(res, ins, ReduceOp::kSum)->wait();
      ASSERT_TRUE(torch::equal(res, expected(ReduceOp::kSum, world, n, torch::kInt64) *
                                        (pg->rank() + 1)))
          << pg->where();
    }
    pg->barrier()->wait();
  });
}

// ProcessGroup::reduce's default implementation (one all-reduce per dtype, copied back on the
// root): a mixed list, every root, sum and avg; the other ranks' tensors stay unchanged.
TEST_P(Collectives, ReduceListIntoEveryRoot) {
  const int world = GetParam();
  with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    for (int root = 0; root < world; ++root) {
      for (auto op : {ReduceOp::kSum, ReduceOp::kAvg}) {
        std::vector<torch::Tensor> mine = {input(pg->rank(), 1001, torch::kFloat32),
                                           input(pg->rank(), 0, torch::kFloat64),
                                           input(pg->rank(), 6, torch::kFloat64).view({2, 3}),
                                           input(pg->rank(), 1, torch::kFloat32)};
        std::vector<torch::Tensor> before;
        for (auto& t : mine) before.push_back(t.clone());
        pg->reduce(mine, root, op)->wait();
        for (size_t i = 0; i < mine.size(); ++i) {
          auto want = pg->rank() == root
                          ? expected(op, world, before[i].numel(), before[i].scalar_type())
                                .view(before[i].sizes())
                          : before[i];
          ASSERT_TRUE(torch::equal(mine[i], want))
              << pg->where() << " root " << root << " op " << lockstep::to_string(op) << " tensor " << i;
        }
      }
    }
  });
}

TEST_P(Collectives, ManyAsyncInFlightCompleteInOrder) {
  const int world = GetParam();
  with_groups(world, [&](const lockstep::ProcessGroupPtr& pg) {
    std::vector<torch::Tensor> ts;
    std::vector<lockstep::WorkPtr> works;
    for (int i = 0; i < 16; ++i) {
      ts.push_back(torch::full({4096 + i}, static_cast<float>(i + pg->rank())));
      works.push_back(pg->allreduce(ts.back()));
    }
    for (int i = 0; i < 16; ++i) {
      works[i]->wait();
      EXPECT_TRUE(works[i]->is_completed());
      float want = static_cast<float>(world * i + world * (world - 1) / 2);
      ASSERT_TRUE(torch::equal(ts[i], torch::full({4096 + i}, want))) << pg->where() << i;
    }
  });
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, Collectives, ::testing::Values(1, 2, 3, 4));

TEST(CollectiveErrors, BadArgumentsNameTheOperation) {
  with_groups(2, [&](const lockstep::ProcessGroupPtr& pg) {
    auto ints = torch::ones({3}, torch::kInt64);
    try {
      pg->allreduce(ints, ReduceOp::kAvg);
      ADD_FAILURE() << "expected InvalidArgument";
    } catch (const lockstep::InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("allreduce"), std::string::npos);
      EXPECT_NE(std::string(e.what()).find("[rank"), std::string::npos);
    }
    auto strided = torch::ones({4, 4}).t();
    EXPECT_THROW(pg->allreduce(strided), lockstep::InvalidArgument);
    auto t = torch::ones({2});
    EXPECT_THROW(pg->broadcast(t, 5), lockstep::InvalidArgument);
    std::vector<torch::Tensor> one{torch::ones({2})};
    EXPECT_THROW(pg->allgather(one, t), lockstep::InvalidArgument);
    pg->barrier()->wait();
  });
}

TEST(Rendezvous, WorldSizeDisagreementIsNamed) {
  auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
  auto opts = lockstep::ProcessGroupOptions()
                  .rendezvous_timeout(std::chrono::seconds(10))
                  .timeout(std::chrono::seconds(10));
  std::vector<std::string> messages(2);
  lockstep_test::run_ranks(2, [&](int r) {
    try {
      lockstep::new_gloo_group(r, r == 0 ? 2 : 3, store, opts);
      messages[r] = "no error";
    } catch (const lockstep::InvalidArgument& e) {
      messages[r] = e.what();
    }
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(messages[r].find("world sizes disagree"), std::string::npos) << messages[r];
  }
}

TEST(Rendezvous, DuplicateRankIsNamed) {
  auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
  auto opts = lockstep::ProcessGroupOptions().rendezvous_timeout(std::chrono::seconds(10));
  std::vector<std::string> messages(2);
  lockstep_test::run_ranks(2, [&](int r) {
    try {
      lockstep::new_gloo_group(0, 2, store, opts);  // both claim rank 0
      messages[r] = "no error";
    } catch (const lockstep::InvalidArgument& e) {
      messages[r] = e.what();
    }
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(messages[r].find("claimed"), std::string::npos) << messages[r];
  }
}

TEST(Rendezvous, MissingRankTimesOutNamingIt) {
  auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
  auto opts = lockstep::ProcessGroupOptions().rendezvous_timeout(std::chrono::milliseconds(500));
  auto start = std::chrono::steady_clock::now();
  try {
    lockstep::new_gloo_group(0, 3, store, opts);
    FAIL() << "expected TimeoutError";
  } catch (const lockstep::TimeoutError& e) {
    EXPECT_NE(std::string(e.what()).find("rank(s) 1, 2 of 3 never joined"), std::string::npos)
        << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

}  // namespace
