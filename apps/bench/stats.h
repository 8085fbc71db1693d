#pragma once
/// \file
/// Order statistics of step times and number formatting, shared by lockstep-bench's worker,
/// coordinator, scenarios and report.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <iomanip>
#include <sstream>
#include <string>
#include <vector>

namespace lockstep {
namespace bench {

/// The `q` quantile (0..1) of `v`, linearly interpolated between the two nearest samples;
/// NaN for an empty `v`.
inline double percentile(std::vector<double> v, double q) {
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

/// The median of `v` (the mean of the two middle samples for an even count).
inline double median(const std::vector<double>& v) { return percentile(v, 0.5); }

/// `v` with `prec` digits after the point ("1.50").
inline std::string fixed(double v, int prec = 2) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(prec) << v;
  return os.str();
}

}  // namespace bench
}  // namespace lockstep
