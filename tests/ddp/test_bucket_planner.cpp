// Table-driven tests of the pure bucket planner (Note [Bucket planning]); no sockets.
#include <gtest/gtest.h>

#include "ddp/bucket_planner.h"
#include "lockstep/errors.h"

namespace {

using lockstep::ddp::ParamSpec;
using lockstep::ddp::plan_buckets;
using Plan = std::vector<std::vector<size_t>>;

ParamSpec f32(int64_t numel) { return {numel, c10::kFloat, c10::Device(c10::kCPU)}; }
ParamSpec f64(int64_t numel) { return {numel, c10::kDouble, c10::Device(c10::kCPU)}; }
ParamSpec f16(int64_t numel) { return {numel, c10::kHalf, c10::Device(c10::kCPU)}; }

struct Case {
  const char* name;
  std::vector<ParamSpec> params;
  std::vector<size_t> order;
  int64_t cap;
  int64_t first_cap;
  Plan expected;
};

TEST(BucketPlanner, Table) {
  const std::vector<Case> cases = {
      {"empty", {}, {}, 100, 10, {}},
      {"one parameter", {f32(3)}, {}, 100, 10, {{0}}},
      // Reverse registration order; first bucket closes at 10 bytes (3 floats = 12 bytes).
      {"small first bucket", {f32(3), f32(3), f32(3), f32(3)}, {}, 100, 10, {{3}, {2, 1, 0}}},
      {"cap closes buckets", {f32(5), f32(5), f32(5), f32(5), f32(5)}, {}, 40, 20,
       {{4}, {3, 2}, {1, 0}}},
      {"parameter larger than the cap", {f32(1), f32(1000), f32(1)}, {}, 16, 16,
       {{2, 1}, {0}}},
      {"huge parameter alone", {f32(1000), f32(1)}, {}, 16, 4, {{1}, {0}}},
      {"zero-size parameters", {f32(0), f32(4), f32(0)}, {}, 16, 16, {{2, 1}, {0}}},
      {"all zero-size", {f32(0), f32(0)}, {}, 16, 16, {{1, 0}}},
      // One open bucket per dtype; first caps apply per dtype; sorted by first parameter.
      {"mixed dtypes", {f32(2), f64(2), f32(2), f64(2)}, {}, 1000, 1000, {{3, 1}, {2, 0}}},
      {"mixed dtypes with caps", {f32(4), f64(2), f16(8), f32(4)}, {}, 16, 16,
       {{3}, {2}, {1}, {0}}},
      {"mixed dtypes, first cap per dtype", {f32(1), f64(1), f32(1), f64(1), f32(1)}, {}, 100, 4,
       {{4}, {3}, {2, 0}, {1}}},
      {"explicit order", {f32(4), f32(4), f32(4)}, {0, 2, 1}, 32, 32, {{0, 2}, {1}}},
      {"cap <= 0 means one bucket", {f32(4), f32(4), f32(4)}, {}, 0, 0, {{2, 1, 0}}},
      {"first cap <= 0 uses cap", {f32(4), f32(4), f32(4)}, {}, 32, 0, {{2, 1}, {0}}},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(plan_buckets(c.params, c.order, c.cap, c.first_cap), c.expected) << c.name;
  }
}

TEST(BucketPlanner, DevicesGetSeparateBuckets) {
  std::vector<ParamSpec> params = {f32(2), {2, c10::kFloat, c10::Device(c10::kCUDA, 0)},
                                   {2, c10::kFloat, c10::Device(c10::kCUDA, 1)}, f32(2)};
  EXPECT_EQ(plan_buckets(params, {}, 1000, 1000), (Plan{{3, 0}, {2}, {1}}));
}

TEST(BucketPlanner, RejectsBadOrders) {
  std::vector<ParamSpec> params = {f32(1), f32(1)};
  EXPECT_THROW(plan_buckets(params, {0}, 8, 8), lockstep::InvalidArgument);
  EXPECT_THROW(plan_buckets(params, {0, 0}, 8, 8), lockstep::InvalidArgument);
  EXPECT_THROW(plan_buckets(params, {0, 5}, 8, 8), lockstep::InvalidArgument);
}

TEST(BucketPlanner, MibToBytes) {
  EXPECT_EQ(lockstep::ddp::mib_to_bytes(25), 25 * 1024 * 1024);
  EXPECT_EQ(lockstep::ddp::mib_to_bytes(0.5), 512 * 1024);
}

}  // namespace
