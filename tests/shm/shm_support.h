#pragma once
// Helpers shared by the shared-memory tests: inputs, sequential-order references, /dev/shm.
#include <ATen/ATen.h>
#include <dirent.h>

#include <string>
#include <vector>

#include "lockstep/process_group.h"

namespace shm_test {

/// Rank r's input: small integers, so sums, products and averages are exact in every dtype.
inline at::Tensor small_input(int r, int64_t n, at::ScalarType dtype) {
  return (at::arange(n, at::kLong).remainder(3) + (r + 1)).to(dtype);
}

/// Rank r's input: normal floats from a generator seeded by (seed, r).
inline at::Tensor random_input(int r, int64_t n, at::ScalarType dtype, uint64_t seed = 7) {
  auto gen = at::detail::createCPUGenerator(seed * 1000 + static_cast<uint64_t>(r));
  return at::normal(0.0, 1.0, {n}, gen).to(dtype);
}

/// The reduction in the shm transport's fixed order (rank 0, 1, ...), accumulating 16-bit
/// floats in float32 and rounding once: what every rank must receive, bit for bit.
inline at::Tensor ordered_reference(const std::vector<at::Tensor>& inputs, lockstep::ReduceOp op) {
  auto dtype = inputs[0].scalar_type();
  bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  auto acc = half ? inputs[0].to(at::kFloat) : inputs[0].clone();
  for (size_t k = 1; k < inputs.size(); ++k) {
    auto x = half ? inputs[k].to(at::kFloat) : inputs[k];
    switch (op) {
      case lockstep::ReduceOp::kSum:
      case lockstep::ReduceOp::kAvg: acc = acc + x; break;
      case lockstep::ReduceOp::kProduct: acc = acc * x; break;
      case lockstep::ReduceOp::kMin: acc = at::minimum(acc, x); break;
      case lockstep::ReduceOp::kMax: acc = at::maximum(acc, x); break;
    }
  }
  if (op == lockstep::ReduceOp::kAvg) acc = acc / static_cast<double>(inputs.size());
  return acc.to(dtype);
}

/// Entries of /dev/shm whose name contains `needle`.
inline std::vector<std::string> shm_entries(const std::string& needle) {
  std::vector<std::string> found;
  if (DIR* d = opendir("/dev/shm")) {
    while (dirent* e = readdir(d)) {
      std::string name = e->d_name;
      if (name.find(needle) != std::string::npos) found.push_back(name);
    }
    closedir(d);
  }
  return found;
}

inline bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  auto ac = a.contiguous(), bc = b.contiguous();
  return std::memcmp(ac.data_ptr(), bc.data_ptr(), ac.numel() * ac.element_size()) == 0;
}

}  // namespace shm_test
