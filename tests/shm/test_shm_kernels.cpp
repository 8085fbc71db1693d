// The shared-memory transport's reduction kernels (comm/shm_kernels.h) as pure functions: no
// processes, no segment. Every dtype and op the transport reduces, the fixed source order,
// float accumulation of 16-bit floats, averages, destinations that are the sources (the
// in-place all-reduce writes every region), the one-pass and blocked loops agreeing bit for
// bit (Note [One pass per element]), and the dtypes it refuses.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <vector>

#include "comm/shm_kernels.h"

namespace {

using lockstep::ReduceOp;
using lockstep::shm::pick_kernel;

// Runs the kernel over `sources` (each a 1-d tensor of one dtype) into a fresh tensor.
at::Tensor run(const std::vector<at::Tensor>& sources, ReduceOp op) {
  auto fn = pick_kernel(sources[0].scalar_type(), op);
  EXPECT_NE(fn, nullptr) << sources[0].scalar_type();
  auto out = at::empty_like(sources[0]);
  std::vector<const void*> srcs;
  for (const auto& s : sources) srcs.push_back(s.data_ptr());
  void* dst = out.data_ptr();
  fn(&dst, 1, srcs.data(), static_cast<int>(srcs.size()), out.numel(), op == ReduceOp::kAvg);
  return out;
}

// The reference: fold in source order, in double, then cast.
at::Tensor reference(const std::vector<at::Tensor>& sources, ReduceOp op) {
  auto acc = sources[0].to(at::kDouble);
  for (size_t k = 1; k < sources.size(); ++k) {
    auto s = sources[k].to(at::kDouble);
    switch (op) {
      case ReduceOp::kSum:
      case ReduceOp::kAvg: acc = acc + s; break;
      case ReduceOp::kProduct: acc = acc * s; break;
      case ReduceOp::kMin: acc = at::minimum(acc, s); break;
      case ReduceOp::kMax: acc = at::maximum(acc, s); break;
    }
  }
  if (op == ReduceOp::kAvg) acc = acc / static_cast<double>(sources.size());
  return acc.to(sources[0].scalar_type());
}

TEST(ShmKernels, EveryDtypeAndOpMatchesTheSourceOrderFold) {
  const std::vector<at::ScalarType> dtypes = {at::kFloat, at::kDouble, at::kLong, at::kInt,
                                              at::kShort, at::kChar,   at::kByte};
  const std::vector<ReduceOp> ops = {ReduceOp::kSum, ReduceOp::kProduct, ReduceOp::kMin,
                                     ReduceOp::kMax};
  for (auto dtype : dtypes) {
    for (auto op : ops) {
      for (int nsrc : {1, 2, 3, 4}) {
        for (int64_t n : {0, 1, 7, 1025, 5000}) {  // below, at and across the 1024 block
          std::vector<at::Tensor> sources;
          for (int k = 0; k < nsrc; ++k) {
            sources.push_back(at::randint(0, 5, {n}, at::TensorOptions().dtype(dtype)));
          }
          auto got = run(sources, op);
          EXPECT_TRUE(at::equal(got, reference(sources, op)))
              << dtype << " " << lockstep::to_string(op) << " nsrc " << nsrc << " n " << n;
        }
      }
    }
  }
}

TEST(ShmKernels, AverageDividesFloatingTypesOnly) {
  std::vector<at::Tensor> f = {at::full({3}, 1.0), at::full({3}, 2.0), at::full({3}, 6.0)};
  EXPECT_TRUE(at::equal(run(f, ReduceOp::kAvg), at::full({3}, 3.0)));
  std::vector<at::Tensor> f32 = {at::full({5}, 1.0f), at::full({5}, 2.0f)};
  EXPECT_TRUE(at::equal(run(f32, ReduceOp::kAvg), at::full({5}, 1.5f)));
}

TEST(ShmKernels, HalfPrecisionAccumulatesInFloatInSourceOrder) {
  // 2048 + 1 + 1 in float16 step by step is 2048 (1 is below half an ulp at 2048); in float
  // it is 2050, which float16 represents exactly.
  for (auto dtype : {at::kHalf, at::kBFloat16}) {
    std::vector<at::Tensor> s = {at::full({9}, 2048.0, at::TensorOptions().dtype(dtype)),
                                 at::full({9}, 1.0, at::TensorOptions().dtype(dtype)),
                                 at::full({9}, 1.0, at::TensorOptions().dtype(dtype))};
    auto got = run(s, ReduceOp::kSum).to(at::kFloat);
    auto want = at::full({9}, 2050.0f).to(dtype).to(at::kFloat);
    EXPECT_TRUE(at::equal(got, want)) << dtype << " " << got;
    auto avg = run(s, ReduceOp::kAvg).to(at::kFloat);
    EXPECT_TRUE(at::equal(avg, at::full({9}, 2050.0f / 3).to(dtype).to(at::kFloat))) << dtype;
  }
}

TEST(ShmKernels, DestinationMayBeTheFirstSource) {
  auto a = at::arange(3000, at::kFloat);
  auto b = at::full({3000}, 0.5f);
  auto want = a + b;
  auto fn = pick_kernel(at::kFloat, ReduceOp::kSum);
  const void* srcs[] = {a.data_ptr(), b.data_ptr()};
  void* dst = a.data_ptr();
  fn(&dst, 1, srcs, 2, a.numel(), /*avg=*/false);
  EXPECT_TRUE(at::equal(a, want));
}

// A sum or average of floating values the way the kernels do it: fold in source order in the
// accumulation type (float for 16-bit floats), divide element by element, cast.
at::Tensor same_order_fold(const std::vector<at::Tensor>& sources, bool avg) {
  const auto acc_type =
      sources[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto acc = sources[0].to(acc_type);
  for (size_t k = 1; k < sources.size(); ++k) acc = acc + sources[k].to(acc_type);
  if (avg) acc = acc / at::full_like(acc, static_cast<double>(sources.size()));
  return acc.to(sources[0].scalar_type());
}

// Every floating dtype, sum and average, 1 to 10 sources (8 and fewer take the one-pass loop,
// 9 and 10 the blocked one), written to one fresh destination, to every source in place, and
// to two fresh destinations of three sources (the blocked loop): each destination holds the
// same bits as the same-order fold of random values.
TEST(ShmKernels, OnePassAndBlockedLoopsAgreeBitForBitWithTheSameOrderFold) {
  at::manual_seed(20);
  for (auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    for (auto op : {ReduceOp::kSum, ReduceOp::kAvg}) {
      auto fn = pick_kernel(dtype, op);
      ASSERT_NE(fn, nullptr);
      const bool avg = op == ReduceOp::kAvg;
      for (int nsrc = 1; nsrc <= 10; ++nsrc) {
        for (int64_t n : {0, 1, 7, 1025, 5000}) {
          const std::string where = c10::str(dtype, " ", lockstep::to_string(op), " nsrc ",
                                             nsrc, " n ", n);
          std::vector<at::Tensor> sources;
          for (int k = 0; k < nsrc; ++k) {
            sources.push_back(at::randn({n}, at::kDouble).mul(1000).to(dtype));
          }
          const auto want = same_order_fold(sources, avg);
          EXPECT_TRUE(at::equal(run(sources, op), want)) << where << " one destination";

          std::vector<at::Tensor> regions;
          std::vector<void*> dsts;
          for (const auto& src : sources) {
            regions.push_back(src.clone());
            dsts.push_back(regions.back().data_ptr());
          }
          std::vector<const void*> srcs(dsts.begin(), dsts.end());
          fn(dsts.data(), nsrc, srcs.data(), nsrc, n, avg);
          for (int q = 0; q < nsrc; ++q) {
            EXPECT_TRUE(at::equal(regions[q], want)) << where << " in place, region " << q;
          }

          if (nsrc == 3) {
            auto out0 = at::empty_like(sources[0]), out1 = at::empty_like(sources[0]);
            void* two[] = {out0.data_ptr(), out1.data_ptr()};
            std::vector<const void*> fresh;
            for (const auto& src : sources) fresh.push_back(src.data_ptr());
            fn(two, 2, fresh.data(), nsrc, n, avg);
            EXPECT_TRUE(at::equal(out0, want) && at::equal(out1, want)) << where << " two";
          }
        }
      }
    }
  }
}

TEST(ShmKernels, UnsupportedDtypesHaveNoKernel) {
  EXPECT_EQ(pick_kernel(at::kBool, ReduceOp::kSum), nullptr);
  EXPECT_EQ(pick_kernel(at::kComplexFloat, ReduceOp::kSum), nullptr);
  EXPECT_EQ(pick_kernel(at::kComplexDouble, ReduceOp::kMax), nullptr);
}

}  // namespace
