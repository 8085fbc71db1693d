// See Note [Bucket planning] in bucket_planner.h.
#include "ddp/bucket_planner.h"

#include <c10/core/ScalarTypeToTypeMeta.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <tuple>

#include "lockstep/errors.h"

namespace lockstep {
namespace ddp {

int64_t mib_to_bytes(double mb) { return static_cast<int64_t>(std::llround(mb * 1024.0 * 1024.0)); }

std::vector<std::vector<size_t>> plan_buckets(const std::vector<ParamSpec>& params,
                                              const std::vector<size_t>& order_in,
                                              int64_t cap_bytes, int64_t first_cap_bytes) {
  const size_t n = params.size();
  std::vector<size_t> order = order_in;
  if (order.empty()) {
    order.resize(n);
    for (size_t i = 0; i < n; ++i) order[i] = n - 1 - i;
  }
  LOCKSTEP_CHECK(order.size() == n, "Expected a bucket order listing all ", n,
                 " parameters, but got ", order.size(), " entries.");
  std::vector<bool> seen(n, false);
  for (size_t idx : order) {
    LOCKSTEP_CHECK(idx < n && !seen[idx], "Expected the bucket order to be a permutation of 0..",
                   n - 1, ", but it ", idx < n ? "repeats " : "contains out-of-range index ",
                   idx, ".");
    seen[idx] = true;
  }
  if (first_cap_bytes <= 0) first_cap_bytes = cap_bytes;

  struct Open {
    std::vector<size_t> members;
    int64_t bytes = 0;
    bool closed_one = false;  // a bucket of this key was already closed: use cap_bytes
  };
  using Key = std::tuple<int, int, int>;  // dtype, device type, device index
  std::map<Key, Open> open;
  std::vector<std::vector<size_t>> result;
  for (size_t idx : order) {
    const auto& p = params[idx];
    LOCKSTEP_CHECK(p.numel >= 0, "Expected a parameter size >= 0, but parameter ", idx, " has ",
                   p.numel, " elements.");
    Key key{static_cast<int>(p.dtype), static_cast<int>(p.device.type()), p.device.index()};
    auto& bucket = open[key];
    bucket.members.push_back(idx);
    bucket.bytes += p.numel * static_cast<int64_t>(c10::elementSize(p.dtype));
    int64_t cap = bucket.closed_one ? cap_bytes : first_cap_bytes;
    if (cap > 0 && bucket.bytes >= cap) {
      result.push_back(std::move(bucket.members));
      bucket.members.clear();
      bucket.bytes = 0;
      bucket.closed_one = true;
    }
  }
  for (auto& kv : open) {
    if (!kv.second.members.empty()) result.push_back(std::move(kv.second.members));
  }
  // Launch order: by the walk position of each bucket's first parameter.
  std::vector<size_t> position(n);
  for (size_t i = 0; i < n; ++i) position[order[i]] = i;
  std::sort(result.begin(), result.end(),
            [&](const std::vector<size_t>& a, const std::vector<size_t>& b) {
              return position[a.front()] < position[b.front()];
            });
  return result;
}

}  // namespace ddp
}  // namespace lockstep
