// One conformance suite for every ProcessGroup transport: Gloo, shared memory ("shm"),
// hierarchical ("hier": shared memory within an emulated host, Gloo between hosts) and the
// in-process thread group ("threads"), with ranks as threads. Every collective is checked
// against a reference computed here, over world sizes 1..4, element counts {0, 1, odd, large}
// (and a 2-D shape), every dtype the transport supports and every reduce op; the shared
// argument checks must give the same message on every transport.
//
// Adding a collective (gather, scatter, all-to-all, send/recv, ...): write one TEST_P on
// `Conformance` (a collective whose result depends on the dtype) or on `GroupConformance`
// (one that does not), with rank r's data from `input` and the expected result from
// `reference`, run through `on_ranks`; add its argument mistakes to `GroupConformance.
// ArgumentChecksGiveOneMessageOnEveryTransport`. A transport that lacks a dtype says why in
// `unsupported`. Every instance then runs it over every transport and world size.
//
// Groups are built once per transport and world size and reused by every test (Gloo and shm
// rendezvous dominate the runtime otherwise); a test that fails drops its groups so that the
// next one starts from fresh ones. Rank bodies use EXPECT, not ASSERT, so that a wrong result
// on one rank never leaves the others waiting in a collective it skipped.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "comm/nccl_group.h"
#include "lockstep/agreement.h"
#include "lockstep/errors.h"
#include "lockstep/process_group.h"
#include "lockstep/thread_group.h"
#include "shm/shm_support.h"
#include "support/threads.h"

using lockstep::ProcessGroup;
using lockstep::ProcessGroupPtr;
using lockstep::ReduceOp;
using lockstep::WorkPtr;
using shm_test::bitwise_equal;

namespace {

// ---------------------------------------------------------------------------------------------
// Sizes, dtypes, ops

// The large count spans several internal units of every transport: two shared-memory slots
// (6 to 8 MiB) in 8-byte dtypes, hundreds of thread-group slices, many Gloo chunks.
constexpr int64_t kLarge = (1 << 20) + 7;
const std::vector<int64_t> kCounts = {0, 1, 1001, kLarge};
// The list-shaped collectives (allgather, reduce_scatter, reduce) move world_size times the
// data, and the default reduce_scatter all-reduces all of it: a smaller large count keeps the
// suite's runtime in bounds while still spanning many slices.
constexpr int64_t kLargeList = 64 * 1024 + 3;
const std::vector<int64_t> kListCounts = {0, 1, 1001, kLargeList};
const std::vector<int64_t> kShape2d = {7, 3};

const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16,
                                             at::kLong,  at::kInt,    at::kShort, at::kChar,
                                             at::kByte};
const std::vector<ReduceOp> kOps = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin,
                                    ReduceOp::kMax, ReduceOp::kProduct};

bool allowed(ReduceOp op, at::ScalarType dtype) {
  return op != ReduceOp::kAvg || at::isFloatingType(dtype);
}

// ---------------------------------------------------------------------------------------------
// Transports

// What a transport promises about the bits of a floating-point sum.
enum class Order {
  kAny,             // any association: compared with allclose (Gloo, hier)
  kRankOrder,       // ranks 0, 1, ... in order, rounding after each step (threads)
  kRankOrderWide,   // ranks 0, 1, ... in order, 16-bit floats accumulated in float32 and
                    // rounded once (shm)
};

struct Transport {
  std::string backend;             // "gloo", "shm", "hier" or "threads"
  std::vector<std::string> hosts;  // each rank's host_id; hier: two hosts or more
  bool routed = false;  // behind the CUDA router (Note [CUDA routing]), with CPU tensors
  int world() const { return static_cast<int>(hosts.size()); }
  std::string name() const {
    if (routed) return "cudarouter_" + backend + "_world" + std::to_string(world());
    if (backend != "hier") return backend + "_world" + std::to_string(world());
    std::string layout;
    for (const auto& h : hosts) layout += h;
    return "hier_" + layout;
  }
  Order order() const {
    if (backend == "shm") return Order::kRankOrderWide;
    if (backend == "threads") return Order::kRankOrder;
    return Order::kAny;
  }
};

void PrintTo(const Transport& transport, std::ostream* os) { *os << transport.name(); }

std::vector<Transport> all_transports() {
  std::vector<Transport> transports;
  for (const char* backend : {"gloo", "shm", "threads"}) {
    for (int world = 1; world <= 4; ++world) {
      transports.push_back({backend, std::vector<std::string>(world, "A")});
    }
  }
  // Two emulated hosts: one rank each, uneven and interleaved (local ranks differ from global
  // ones), two each, and three on one host with a one-rank host in between.
  for (const char* layout : {"AB", "ABA", "AABB", "ABAA"}) {
    Transport s{"hier", {}};
    for (const char* c = layout; *c; ++c) s.hosts.push_back(std::string(1, *c));
    transports.push_back(s);
  }
  // What every CPU collective of a CUDA build's default group passes through: the router
  // in front of shared memory.
  for (int world = 1; world <= 3; ++world) {
    transports.push_back({"shm", std::vector<std::string>(world, "A"), true});
  }
  return transports;
}

// Why `transport` cannot carry `dtype`, or "" when it can.
std::string unsupported(const Transport& transport, at::ScalarType dtype) {
  const bool gloo = transport.backend == "gloo" || transport.backend == "hier";
  const char* between = transport.backend == "hier" ? " (hier: between hosts)" : "";
  if (gloo && dtype == at::kBFloat16) {
    return std::string("Gloo in LibTorch 1.13 has no bfloat16 collectives") + between;
  }
  if (gloo && dtype == at::kShort) {
    return std::string("Gloo has no int16 collectives") + between;
  }
  return "";
}

std::string job_prefix() { return "conformance-" + std::to_string(getpid()) + "-"; }

std::vector<ProcessGroupPtr> make_groups(const Transport& transport) {
  const int world = transport.world();
  if (transport.backend == "threads") {
    // Small slices, so that the large count is cut into hundreds and waiting ranks help.
    return lockstep::new_thread_groups(
        world, lockstep::ThreadGroupOptions().timeout(std::chrono::seconds(20)).slice_bytes(16384));
  }
  static std::atomic<int> jobs{0};
  const std::string job = job_prefix() + transport.name() + "-" + std::to_string(jobs++);
  auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
  std::vector<ProcessGroupPtr> groups(world);
  lockstep_test::run_ranks(world, [&](int r) {
    auto options = lockstep::ProcessGroupOptions()
                       .timeout(std::chrono::seconds(20))
                       .rendezvous_timeout(std::chrono::seconds(20))
                       .job_id(job)
                       .host_id(transport.hosts[r]);
    groups[r] = transport.backend == "gloo" ? lockstep::new_gloo_group(r, world, store, options)
                                          : lockstep::new_shm_group(r, world, store, options);
    if (transport.routed) {
      auto make_host = [options](const std::vector<std::string>& hosts, int sub_rank,
                                 const std::shared_ptr<lockstep::Store>& s) {
        return lockstep::new_shm_group(sub_rank, static_cast<int>(hosts.size()), s, options);
      };
      groups[r] = lockstep::comm::make_cuda_routing_group(
          groups[r], "auto", transport.hosts, std::chrono::seconds(20), make_host);
    }
    // Keep every rank's group until all have connected (a Gloo group destroyed early closes
    // sockets a slower rank is still connecting to).
    groups[r]->barrier()->wait();
  });
  return groups;
}

// The groups of every transport, built on first use and kept for the following tests.
std::map<std::string, std::vector<ProcessGroupPtr>>& pool() {
  static std::map<std::string, std::vector<ProcessGroupPtr>> groups;
  return groups;
}

const std::vector<ProcessGroupPtr>& groups_for(const Transport& transport) {
  auto& groups = pool()[transport.name()];
  if (groups.empty()) {
    groups = make_groups(transport);
    for (const auto& g : groups) {
      if (!g) {  // run_ranks reported the rank's error
        groups.clear();
        return groups;
      }
      EXPECT_EQ(g->backend(), transport.backend) << transport.name();
    }
  }
  return groups;
}

// Destroys every group at the end of the program, and checks that the shared-memory ones
// left nothing in /dev/shm.
class PoolEnvironment : public ::testing::Environment {
 public:
  void TearDown() override {
    pool().clear();
    EXPECT_TRUE(shm_test::shm_entries(job_prefix()).empty())
        << "a shared-memory group left " << shm_test::shm_entries(job_prefix()).front();
  }
};
[[maybe_unused]] const auto* const kPoolEnvironment =
    ::testing::AddGlobalTestEnvironment(new PoolEnvironment);

// Runs fn(group) on one thread per rank of `transport`'s groups.
void on_ranks(const Transport& transport, const std::function<void(ProcessGroup&)>& fn) {
  const auto& groups = groups_for(transport);
  if (static_cast<int>(groups.size()) != transport.world()) return;
  lockstep_test::run_ranks(transport.world(), [&](int r) { fn(*groups[r]); });
}

// ---------------------------------------------------------------------------------------------
// Inputs and references

// Rank k's input: element i is i % 3 + k + 1 (shm_test::small_input's values): small integers,
// so sums, products and averages are exact in every dtype. Built by tiling one period, far
// cheaper than computing the large count element by element.
at::Tensor input(int k, int64_t n, at::ScalarType dtype) {
  auto period = (at::arange(3, at::kLong) + (k + 1)).to(dtype);
  return period.repeat({(n + 2) / 3}).narrow(0, 0, n).contiguous();
}

// The reduction with `op` of input(k, n, dtype) over k in `ranks`, exact: computed in double
// (floating dtypes; the one rounding is that of avg's division) or int64 (integer dtypes;
// wrapping like the dtype's own arithmetic when cast back), on one period, then tiled.
at::Tensor reference(ReduceOp op, const std::vector<int>& ranks, int64_t n, at::ScalarType dtype) {
  const auto wide = at::isFloatingType(dtype) ? at::kDouble : at::kLong;
  auto acc = input(ranks[0], 3, wide);
  for (size_t i = 1; i < ranks.size(); ++i) {
    auto x = input(ranks[i], 3, wide);
    switch (op) {
      case ReduceOp::kSum:
      case ReduceOp::kAvg: acc = acc + x; break;
      case ReduceOp::kMin: acc = at::minimum(acc, x); break;
      case ReduceOp::kMax: acc = at::maximum(acc, x); break;
      case ReduceOp::kProduct: acc = acc * x; break;
    }
  }
  if (op == ReduceOp::kAvg) acc = acc / static_cast<double>(ranks.size());
  return acc.to(dtype).repeat({(n + 2) / 3}).narrow(0, 0, n).contiguous();
}

std::vector<int> ranks_from(int first, int world) {
  std::vector<int> ranks;
  for (int r = 0; r < world; ++r) ranks.push_back(first + r);
  return ranks;
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string describe(const ProcessGroup& pg, at::ScalarType dtype, int64_t n) {
  return lockstep::detail::concat(pg.where(), " ", dtype, " n ", n);
}

// ---------------------------------------------------------------------------------------------
// Fixtures

// Drops a failed test's groups: a collective may have been left half-issued.
void drop_after_failure(const Transport& transport) {
  if (::testing::Test::HasFailure()) pool().erase(transport.name());
}

// Collectives whose result depends on the dtype: every transport x every dtype.
class Conformance
    : public ::testing::TestWithParam<std::tuple<Transport, at::ScalarType>> {
 protected:
  void SetUp() override {
    auto why = unsupported(transport(), dtype());
    if (!why.empty()) GTEST_SKIP() << why;
  }
  void TearDown() override { drop_after_failure(transport()); }
  const Transport& transport() const { return std::get<0>(GetParam()); }
  at::ScalarType dtype() const { return std::get<1>(GetParam()); }
  int world() const { return transport().world(); }
};

// Collectives and checks that do not depend on the dtype: every transport.
class GroupConformance : public ::testing::TestWithParam<Transport> {
 protected:
  void TearDown() override { drop_after_failure(GetParam()); }
  const Transport& transport() const { return GetParam(); }
  int world() const { return transport().world(); }
};

// ---------------------------------------------------------------------------------------------
// allreduce

TEST_P(Conformance, AllreduceEveryOpAndCountExact) {
  std::map<std::pair<int, int64_t>, at::Tensor> want;  // (op, n): computed once, not per rank
  for (auto op : kOps) {
    for (int64_t n : kCounts) {
      want[{static_cast<int>(op), n}] = reference(op, ranks_from(0, world()), n, dtype());
    }
  }
  on_ranks(transport(), [&](ProcessGroup& pg) {
    for (int64_t n : kCounts) {
      const auto mine = input(pg.rank(), n, dtype());
      for (auto op : kOps) {
        if (!allowed(op, dtype())) continue;
        auto t = mine.clone();
        pg.allreduce(t, op)->wait();
        EXPECT_TRUE(bitwise_equal(t, want.at({static_cast<int>(op), n})))
            << describe(pg, dtype(), n) << " op " << lockstep::to_string(op);
      }
    }
    // The shape is kept.
    auto t = input(pg.rank(), 21, dtype()).view(kShape2d);
    pg.allreduce(t, ReduceOp::kMax)->wait();
    EXPECT_TRUE(bitwise_equal(t, reference(ReduceOp::kMax, ranks_from(0, world()), 21, dtype())
                                     .view(kShape2d)))
        << describe(pg, dtype(), 21) << " 2-D";
  });
}

// Random floats, whose sum depends on the association: transports that promise rank order
// give exactly its bits on every rank (and again on a second run); the others come within
// the dtype's rounding of the exact sum, with the same bits on every rank.
TEST_P(Conformance, AllreduceRandomFloatSumMatchesThePromisedOrder) {
  if (!at::isFloatingType(dtype())) {
    GTEST_SKIP() << "integer sums do not depend on the order (exact results: "
                    "AllreduceEveryOpAndCountExact)";
  }
  const int64_t n = kLarge;
  std::vector<at::Tensor> inputs;
  for (int r = 0; r < world(); ++r) inputs.push_back(shm_test::random_input(r, n, dtype()));
  at::Tensor want;
  switch (transport().order()) {
    case Order::kRankOrderWide: want = shm_test::ordered_reference(inputs, ReduceOp::kSum); break;
    case Order::kRankOrder:
      want = inputs[0].clone();
      for (int r = 1; r < world(); ++r) want.add_(inputs[r]);
      break;
    case Order::kAny:
      want = inputs[0].to(at::kDouble);
      for (int r = 1; r < world(); ++r) want = want + inputs[r].to(at::kDouble);
      break;
  }
  const double tol = dtype() == at::kBFloat16 ? 0.1
                     : dtype() == at::kHalf   ? 1e-2
                     : dtype() == at::kFloat  ? 1e-5
                                              : 1e-12;
  std::vector<at::Tensor> results(world());
  on_ranks(transport(), [&](ProcessGroup& pg) {
    for (int run = 0; run < 2; ++run) {
      auto t = inputs[pg.rank()].clone();
      pg.allreduce(t)->wait();
      if (run == 0) results[pg.rank()] = t;
      if (transport().order() == Order::kAny) {
        EXPECT_TRUE(at::allclose(t.to(at::kDouble), want, tol, tol))
            << describe(pg, dtype(), n) << " run " << run << ": beyond reassociation";
      } else {
        EXPECT_TRUE(bitwise_equal(t, want))
            << describe(pg, dtype(), n) << " run " << run << ": not the rank-order bits";
      }
    }
  });
  // Every rank holds the same bits, whatever the order (hier: each host's leader's, and
  // Gloo's ring gives every leader the same).
  for (int r = 1; r < world(); ++r) {
    if (results[r].defined() && results[0].defined()) {
      EXPECT_TRUE(bitwise_equal(results[r], results[0])) << "rank " << r << " differs from rank 0";
    }
  }
}

// ---------------------------------------------------------------------------------------------
// broadcast

TEST_P(Conformance, BroadcastFromEveryRoot) {
  on_ranks(transport(), [&](ProcessGroup& pg) {
    for (int root = 0; root < pg.size(); ++root) {
      for (int64_t n : kCounts) {
        auto t = input(pg.rank(), n, dtype());
        pg.broadcast(t, root)->wait();
        EXPECT_TRUE(bitwise_equal(t, input(root, n, dtype())))
            << describe(pg, dtype(), n) << " root " << root;
      }
      auto t = input(pg.rank(), 21, dtype()).view(kShape2d);
      pg.broadcast(t, root)->wait();
      EXPECT_TRUE(bitwise_equal(t, input(root, 21, dtype()).view(kShape2d)))
          << describe(pg, dtype(), 21) << " 2-D root " << root;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// allgather

TEST_P(Conformance, AllgatherEveryCountAndShape) {
  std::vector<std::vector<int64_t>> shapes;
  for (int64_t n : kListCounts) shapes.push_back({n});
  shapes.push_back(kShape2d);
  on_ranks(transport(), [&](ProcessGroup& pg) {
    for (const auto& shape : shapes) {
      const int64_t n = numel_of(shape);
      std::vector<at::Tensor> out;
      for (int i = 0; i < pg.size(); ++i) out.push_back(at::full(shape, 99, dtype()));
      pg.allgather(out, input(pg.rank(), n, dtype()).view(shape))->wait();
      for (int i = 0; i < pg.size(); ++i) {
        EXPECT_TRUE(bitwise_equal(out[i], input(i, n, dtype()).view(shape)))
            << describe(pg, dtype(), n) << " output " << i;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// reduce_scatter: rank r's inputs[i] is input(r + i), so rank i receives the reduction
// of input(i), ..., input(i + world - 1).

TEST_P(Conformance, ReduceScatterEveryOpAndCountExact) {
  std::map<std::tuple<int, int64_t, int>, at::Tensor> want;  // (op, n, rank)
  for (auto op : kOps) {
    for (int64_t n : kListCounts) {
      for (int r = 0; r < world(); ++r) {
        want[{static_cast<int>(op), n, r}] = reference(op, ranks_from(r, world()), n, dtype());
      }
    }
  }
  on_ranks(transport(), [&](ProcessGroup& pg) {
    for (int64_t n : kListCounts) {
      for (auto op : kOps) {
        if (!allowed(op, dtype())) continue;
        std::vector<at::Tensor> inputs;
        for (int i = 0; i < pg.size(); ++i) inputs.push_back(input(pg.rank() + i, n, dtype()));
        auto out = at::full({n}, 99, dtype());
        pg.reduce_scatter(out, inputs, op)->wait();
        EXPECT_TRUE(bitwise_equal(out, want.at({static_cast<int>(op), n, pg.rank()})))
            << describe(pg, dtype(), n) << " op " << lockstep::to_string(op);
      }
    }
    std::vector<at::Tensor> inputs;
    for (int i = 0; i < pg.size(); ++i) {
      inputs.push_back(input(pg.rank() + i, 21, dtype()).view(kShape2d));
    }
    auto out = at::empty(kShape2d, dtype());
    pg.reduce_scatter(out, inputs, ReduceOp::kSum)->wait();
    auto want = reference(ReduceOp::kSum, ranks_from(pg.rank(), pg.size()), 21, dtype());
    EXPECT_TRUE(bitwise_equal(out, want.view(kShape2d)))
        << describe(pg, dtype(), 21) << " 2-D";
  });
}

// ---------------------------------------------------------------------------------------------
// reduce: a list of this dtype in every count (one 2-D) plus a float64 tensor (a mixed list),
// into every root with every op; only the root's tensors change.

TEST_P(Conformance, ReduceListIntoEveryRootExact) {
  std::vector<std::pair<std::vector<int64_t>, at::ScalarType>> list;
  for (int64_t n : kListCounts) list.push_back({{n}, dtype()});
  list.push_back({kShape2d, dtype()});
  list.push_back({{5}, at::kDouble});
  on_ranks(transport(), [&](ProcessGroup& pg) {
    for (int root = 0; root < pg.size(); ++root) {
      for (auto op : kOps) {
        if (!allowed(op, dtype())) continue;
        std::vector<at::Tensor> mine, before;
        for (const auto& entry : list) {
          const int64_t n = numel_of(entry.first);
          mine.push_back(input(pg.rank(), n, entry.second).view(entry.first));
          before.push_back(mine.back().clone());
        }
        pg.reduce(mine, root, op)->wait();
        for (size_t i = 0; i < list.size(); ++i) {
          const int64_t n = before[i].numel();
          auto want = pg.rank() == root
                          ? reference(op, ranks_from(0, pg.size()), n, list[i].second)
                                .view(list[i].first)
                          : before[i];
          EXPECT_TRUE(bitwise_equal(mine[i], want))
              << describe(pg, list[i].second, n) << " root " << root << " op "
              << lockstep::to_string(op) << " tensor " << i;
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// gather, scatter, all_to_all_single, send / recv: float32, float64 and int64 on every
// transport (they move bytes, so one floating, one wide and one integer dtype cover them).

const std::vector<at::ScalarType> kDataDtypes = {at::kFloat, at::kDouble, at::kLong};

class DataConformance : public Conformance {};

TEST_P(DataConformance, GatherToEveryRootEveryCount) {
  std::vector<std::vector<int64_t>> shapes;
  for (int64_t n : kListCounts) shapes.push_back({n});
  shapes.push_back(kShape2d);
  shapes.push_back({kLarge});  // several shared-memory slots
  on_ranks(transport(), [&](ProcessGroup& pg) {
    for (int root = 0; root < pg.size(); ++root) {
      for (const auto& shape : shapes) {
        const int64_t n = numel_of(shape);
        std::vector<at::Tensor> out;
        if (pg.rank() == root) {
          for (int i = 0; i < pg.size(); ++i) out.push_back(at::full(shape, 99, dtype()));
        }
        const auto mine = input(pg.rank(), n, dtype()).view(shape);
        pg.gather(out, mine, root)->wait();
        EXPECT_TRUE(bitwise_equal(mine, input(pg.rank(), n, dtype()).view(shape)))
            << describe(pg, dtype(), n) << " root " << root << ": the input changed";
        for (size_t i = 0; i < out.size(); ++i) {
          EXPECT_TRUE(bitwise_equal(out[i], input(static_cast<int>(i), n, dtype()).view(shape)))
              << describe(pg, dtype(), n) << " root " << root << " output " << i;
        }
      }
    }
  });
}

// The root's inputs[i] is input(10 * root + i): every (root, destination) pair distinct.
TEST_P(DataConformance, ScatterFromEveryRootEveryCount) {
  std::vector<std::vector<int64_t>> shapes;
  for (int64_t n : kListCounts) shapes.push_back({n});
  shapes.push_back(kShape2d);
  shapes.push_back({kLarge});  // several shared-memory slots
  on_ranks(transport(), [&](ProcessGroup& pg) {
    for (int root = 0; root < pg.size(); ++root) {
      for (const auto& shape : shapes) {
        const int64_t n = numel_of(shape);
        std::vector<at::Tensor> in;
        if (pg.rank() == root) {
          for (int i = 0; i < pg.size(); ++i) {
            in.push_back(input(10 * root + i, n, dtype()).view(shape));
          }
        }
        auto out = at::full(shape, 99, dtype());
        pg.scatter(out, in, root)->wait();
        EXPECT_TRUE(bitwise_equal(out, input(10 * root + pg.rank(), n, dtype()).view(shape)))
            << describe(pg, dtype(), n) << " root " << root;
      }
    }
  });
}

// Rank r's all-to-all input: element i is r * 1e6 + i (exact in every tested dtype), rows of
// `row` elements.
at::Tensor a2a_input(int r, int64_t rows, int64_t row, at::ScalarType dtype) {
  auto flat = (at::arange(rows * row, at::kLong) + static_cast<int64_t>(r) * 1000000).to(dtype);
  return row == 1 ? flat : flat.view({rows, row});
}

// What rank `dst` receives when rank i cuts its input by splits[i] (rows of `row` elements):
// the blocks addressed to it, in source order.
at::Tensor a2a_reference(const std::vector<std::vector<int64_t>>& splits, int dst, int64_t row,
                         at::ScalarType dtype) {
  std::vector<at::Tensor> parts;
  int64_t rows = 0;
  for (size_t src = 0; src < splits.size(); ++src) {
    const auto& s = splits[src];
    int64_t total = 0, from = 0;
    for (size_t j = 0; j < s.size(); ++j) {
      total += s[j];
      if (static_cast<int>(j) < dst) from += s[j];
    }
    auto whole = a2a_input(static_cast<int>(src), total, row, dtype).reshape({total, row});
    parts.push_back(whole.narrow(0, from, s[dst]));
    rows += s[dst];
  }
  auto out = parts.empty() ? at::empty({0, row}, dtype) : at::cat(parts);
  return row == 1 ? out.reshape({rows}) : out;
}

void check_all_to_all(ProcessGroup& pg, const std::vector<std::vector<int64_t>>& splits,
                      int64_t row, at::ScalarType dtype, bool explicit_splits) {
  const int w = pg.size();
  std::vector<int64_t> in_splits = splits[pg.rank()], out_splits;
  for (int src = 0; src < w; ++src) out_splits.push_back(splits[src][pg.rank()]);
  int64_t in_rows = 0, out_rows = 0;
  for (int j = 0; j < w; ++j) {
    in_rows += in_splits[j];
    out_rows += out_splits[j];
  }
  const auto in = a2a_input(pg.rank(), in_rows, row, dtype);
  auto out = row == 1 ? at::full({out_rows}, 99, dtype) : at::full({out_rows, row}, 99, dtype);
  if (explicit_splits) {
    pg.all_to_all_single(out, in, out_splits, in_splits)->wait();
  } else {
    pg.all_to_all_single(out, in)->wait();
  }
  EXPECT_TRUE(bitwise_equal(out, a2a_reference(splits, pg.rank(), row, dtype)))
      << pg.where() << " " << dtype << " row " << row << " rows in " << in_rows << " out "
      << out_rows << (explicit_splits ? " (explicit splits)" : " (equal splits)");
  EXPECT_TRUE(bitwise_equal(in, a2a_input(pg.rank(), in_rows, row, dtype)))
      << pg.where() << ": the input changed";
}

TEST_P(DataConformance, AllToAllEqualSplits) {
  on_ranks(transport(), [&](ProcessGroup& pg) {
    const int w = pg.size();
    for (int64_t per : {int64_t{0}, int64_t{1}, int64_t{7}, kLargeList}) {
      for (int64_t row : {int64_t{1}, int64_t{3}}) {
        if (per == kLargeList && row != 1) continue;
        std::vector<std::vector<int64_t>> splits(w, std::vector<int64_t>(w, per));
        check_all_to_all(pg, splits, row, dtype(), /*explicit_splits=*/false);
        check_all_to_all(pg, splits, row, dtype(), /*explicit_splits=*/true);
      }
    }
  });
}

// Rank i sends (i + 2 j) % 3 x scale rows to rank j: zero-row blocks, uneven totals, and a
// rank that sends or receives nothing at all (scale 0).
TEST_P(DataConformance, AllToAllUnequalSplits) {
  on_ranks(transport(), [&](ProcessGroup& pg) {
    const int w = pg.size();
    for (int64_t scale : {int64_t{0}, int64_t{1}, int64_t{5}, int64_t{20011}}) {
      for (int64_t row : {int64_t{1}, int64_t{3}}) {
        if (scale > 5 && row != 1) continue;
        std::vector<std::vector<int64_t>> splits(w, std::vector<int64_t>(w));
        for (int i = 0; i < w; ++i) {
          for (int j = 0; j < w; ++j) splits[i][j] = (i + 2 * j) % 3 * scale;
        }
        check_all_to_all(pg, splits, row, dtype(), /*explicit_splits=*/true);
      }
    }
    // One rank sends everything to rank 0, nobody else sends anything: 1001 rows, then kLarge
    // (a block that spans several steps of the shared-memory transport's slots).
    for (int64_t rows : {int64_t{1001}, kLarge}) {
      std::vector<std::vector<int64_t>> splits(w, std::vector<int64_t>(w, 0));
      splits[w - 1][0] = rows;
      check_all_to_all(pg, splits, 1, dtype(), /*explicit_splits=*/true);
    }
  });
}

// Every rank sends to every other rank several messages (every count, two tags) at once, then
// receives them all; the Works are waited for in reverse order. Messages from one rank to
// another arrive in order.
TEST_P(DataConformance, SendRecvEveryPairInOrder) {
  if (world() == 1) GTEST_SKIP() << "no peer to send to";
  on_ranks(transport(), [&](ProcessGroup& pg) {
    const int w = pg.size(), me = pg.rank();
    std::vector<WorkPtr> works;
    std::vector<at::Tensor> sent, received, want;
    for (int peer = 0; peer < w; ++peer) {
      if (peer == me) continue;
      for (size_t k = 0; k < kListCounts.size(); ++k) {
        sent.push_back(input(100 * me + peer + static_cast<int>(k), kListCounts[k], dtype()));
        works.push_back(pg.send(sent.back(), peer, static_cast<int>(k % 2)));
      }
    }
    for (int peer = w - 1; peer >= 0; --peer) {  // the peers' order differs from the sends'
      if (peer == me) continue;
      for (size_t k = 0; k < kListCounts.size(); ++k) {
        received.push_back(at::full({kListCounts[k]}, 99, dtype()));
        want.push_back(input(100 * peer + me + static_cast<int>(k), kListCounts[k], dtype()));
        works.push_back(pg.recv(received.back(), peer, static_cast<int>(k % 2)));
      }
    }
    for (auto it = works.rbegin(); it != works.rend(); ++it) (*it)->wait();
    for (size_t i = 0; i < received.size(); ++i) {
      EXPECT_TRUE(bitwise_equal(received[i], want[i])) << pg.where() << " message " << i;
    }
    // A 2-D message into a 2-D tensor of the same element count.
    const int next = (me + 1) % w, prev = (me + w - 1) % w;
    auto ring_in = at::full(kShape2d, 99, dtype());
    auto recv_work = pg.recv(ring_in, prev, 7);
    pg.send(input(me, 21, dtype()).view(kShape2d), next, 7)->wait();
    recv_work->wait();
    EXPECT_TRUE(bitwise_equal(ring_in, input(prev, 21, dtype()).view(kShape2d))) << pg.where();
  });
}

// Messages larger than any transport's buffering (the shm channel's ring holds at most 1 MiB
// per pair), with four tags in flight at once: every rank sends kLarge, 0, 1001 and 1
// elements (tags 3..6) to the next rank and receives as many from the previous one. Even ranks
// post their recvs first, odd ranks their sends, and no Work is waited for before all are
// posted.
TEST_P(DataConformance, SendRecvLargerThanTheChannelWithTagsInFlight) {
  if (world() == 1) GTEST_SKIP() << "no peer to send to";
  const std::vector<int64_t> counts = {kLarge, 0, 1001, 1};
  on_ranks(transport(), [&](ProcessGroup& pg) {
    const int w = pg.size(), me = pg.rank();
    const int next = (me + 1) % w, prev = (me + w - 1) % w;
    std::vector<WorkPtr> works;
    std::vector<at::Tensor> sent, received;
    auto post_sends = [&] {
      for (size_t k = 0; k < counts.size(); ++k) {
        sent.push_back(input(me + static_cast<int>(k), counts[k], dtype()));
        works.push_back(pg.send(sent.back(), next, 3 + static_cast<int>(k)));
      }
    };
    auto post_recvs = [&] {
      for (size_t k = 0; k < counts.size(); ++k) {
        received.push_back(at::full({counts[k]}, 99, dtype()));
        works.push_back(pg.recv(received.back(), prev, 3 + static_cast<int>(k)));
      }
    };
    if (me % 2 == 0) {
      post_recvs();
      post_sends();
    } else {
      post_sends();
      post_recvs();
    }
    for (auto& work : works) work->wait();
    for (size_t k = 0; k < counts.size(); ++k) {
      EXPECT_TRUE(bitwise_equal(received[k], input(prev + static_cast<int>(k), counts[k],
                                                    dtype())))
          << pg.where() << " message " << k << " (" << counts[k] << " elements)";
    }
  });
}

// Receiving tags out of their send order is a mismatch, not a wait for the other tag: the
// recv fails naming what was sent (a message larger than the shm channel is drained without
// writing a byte), and the following recvs get the following messages intact.
TEST_P(GroupConformance, RecvOfTagsOutOfOrderFailsAndKeepsTheChannel) {
  if (world() == 1) GTEST_SKIP() << "no peer to send to";
  using lockstep::detail::concat;
  on_ranks(transport(), [&](ProcessGroup& pg) {
    if (pg.rank() > 1) return;
    if (pg.rank() == 0) {
      std::vector<WorkPtr> works = {pg.send(at::arange(kLarge, at::kDouble), 1, 1),
                                    pg.send(at::full({2}, 8.0f), 1, 8),
                                    pg.send(at::full({2}, 9.0f), 1, 9)};
      for (auto& work : works) work->wait();
      return;
    }
    auto expect_mismatch = [&](at::Tensor t, int tag, const std::string& sent) {
      const auto before = t.clone();
      try {
        pg.recv(t, 0, tag)->wait();
        ADD_FAILURE() << pg.where() << " recv of " << sent << ": no error";
      } catch (const lockstep::InvalidArgument& e) {
        EXPECT_EQ(std::string(e.what()),
                  concat(pg.where(), " recv from rank 0 (tag ", tag, ", ", t.numel(), " x ",
                         t.scalar_type(), "): rank 0 sent ", sent,
                         ". Messages between two ranks are received in the order they were "
                         "sent: give each recv the tag, dtype and element count of its send."));
      }
      EXPECT_TRUE(at::equal(t, before)) << pg.where() << ": a rejected message was written";
    };
    expect_mismatch(at::zeros({kLarge}, at::kFloat), 1, concat(kLarge, " x Double with tag 1"));
    expect_mismatch(at::zeros({2}, at::kFloat), 9, "2 x Float with tag 8");
    auto t = at::zeros({2}, at::kFloat);
    pg.recv(t, 0, 9)->wait();
    EXPECT_TRUE(at::equal(t, at::full({2}, 9.0f))) << pg.where();
  });
}

// A recv that does not match the next message fails naming what was sent, and leaves the
// channel in order: the following message is received intact.
TEST_P(GroupConformance, RecvOfAMismatchedMessageNamesTheSend) {
  if (world() == 1) GTEST_SKIP() << "no peer to send to";
  using lockstep::detail::concat;
  on_ranks(transport(), [&](ProcessGroup& pg) {
    if (pg.rank() > 1) return;
    const int peer = 1 - pg.rank();
    if (pg.rank() == 0) {
      pg.send(at::ones({3}, at::kFloat), peer, 5)->wait();
      pg.send(at::ones({4}, at::kFloat), peer, 5)->wait();
      pg.send(at::ones({4}, at::kFloat), peer, 6)->wait();
      pg.send(at::arange(4, at::kFloat), peer, 5)->wait();
      return;
    }
    struct Case {
      at::Tensor tensor;
      int tag;
      std::string sent;
    };
    std::vector<Case> cases = {{at::zeros({4}, at::kFloat), 5, "3 x Float with tag 5"},
                               {at::zeros({4}, at::kDouble), 5, "4 x Float with tag 5"},
                               {at::zeros({4}, at::kFloat), 5, "4 x Float with tag 6"}};
    for (auto& c : cases) {
      try {
        pg.recv(c.tensor, peer, c.tag)->wait();
        ADD_FAILURE() << pg.where() << " recv of " << c.sent << ": no error";
      } catch (const lockstep::InvalidArgument& e) {
        EXPECT_EQ(std::string(e.what()),
                  concat(pg.where(), " recv from rank 0 (tag ", c.tag, ", 4 x ",
                         c.tensor.scalar_type(), "): rank 0 sent ", c.sent,
                         ". Messages between two ranks are received in the order they were "
                         "sent: give each recv the tag, dtype and element count of its send."));
      }
      EXPECT_TRUE(at::equal(c.tensor, at::zeros({4}, c.tensor.scalar_type())))
          << pg.where() << ": a rejected message was written into the tensor";
    }
    auto t = at::zeros({4}, at::kFloat);
    pg.recv(t, peer, 5)->wait();
    EXPECT_TRUE(at::equal(t, at::arange(4, at::kFloat))) << pg.where();
  });
}

// ---------------------------------------------------------------------------------------------
// Object collectives (lockstep/agreement.h)

// Rank r's object: r * 37 % 101 bytes (0 on rank 0), binary (every byte value, NULs included).
std::string object_of(int r) {
  std::string s;
  for (int i = 0; i < r * 37 % 101; ++i) s.push_back(static_cast<char>((r * 31 + i * 7) % 256));
  return s;
}

TEST_P(GroupConformance, ObjectCollectivesCarryEveryRanksBytes) {
  on_ranks(transport(), [&](ProcessGroup& pg) {
    const int w = pg.size(), me = pg.rank();
    const auto mine = object_of(me);
    auto strings = lockstep::allgather_strings(pg, mine);
    auto bytes = lockstep::allgather_bytes(pg, lockstep::Bytes(mine.begin(), mine.end()));
    ASSERT_EQ(static_cast<int>(strings.size()), w);
    ASSERT_EQ(static_cast<int>(bytes.size()), w);
    for (int r = 0; r < w; ++r) {
      EXPECT_EQ(strings[r], object_of(r)) << pg.where() << " allgather_strings of rank " << r;
      EXPECT_EQ(std::string(bytes[r].begin(), bytes[r].end()), object_of(r))
          << pg.where() << " allgather_bytes of rank " << r;
    }
    EXPECT_EQ(lockstep::allgather_strings(pg, ""), std::vector<std::string>(w))
        << pg.where() << " every string empty";
    for (int root = 0; root < w; ++root) {
      EXPECT_EQ(lockstep::broadcast_string(pg, me == root ? object_of(root + 1) : "ignored", root),
                object_of(root + 1))
          << pg.where() << " broadcast_string root " << root;
      auto b = object_of(root + 2);
      EXPECT_EQ(lockstep::broadcast_bytes(pg, lockstep::Bytes(b.begin(), b.end()), root),
                lockstep::Bytes(b.begin(), b.end()))
          << pg.where() << " broadcast_bytes root " << root;
      auto gathered = lockstep::gather_strings(pg, mine, root);
      if (me == root) {
        ASSERT_EQ(static_cast<int>(gathered.size()), w) << pg.where();
        for (int r = 0; r < w; ++r) {
          EXPECT_EQ(gathered[r], object_of(r)) << pg.where() << " gather_strings root " << root;
        }
      } else {
        EXPECT_TRUE(gathered.empty()) << pg.where() << " gather_strings on a non-root";
      }
    }
  });
}

// Note [Bounded object collectives]: a length over the bound (an honest one over max_bytes,
// or a peer that claims 2^62 bytes) fails every rank naming the rank, before any allocation;
// the group stays usable.
TEST_P(GroupConformance, ObjectCollectivesRejectOversizedLengthsBeforeAllocating) {
  using lockstep::detail::concat;
  constexpr int64_t kHuge = int64_t{1} << 62;
  auto expect_bound_error = [](ProcessGroup& pg, const std::function<void()>& call,
                               const std::string& want) {
    try {
      call();
      ADD_FAILURE() << pg.where() << ": no error; expected " << want;
    } catch (const lockstep::InvalidArgument& e) {
      EXPECT_EQ(std::string(e.what()), want);
    }
  };
  on_ranks(transport(), [&](ProcessGroup& pg) {
    const int w = pg.size(), last = w - 1;
    const std::string mine(pg.rank() == last ? 9 : 3, 'x');
    auto over = [&](const char* op, int r, int64_t n, int64_t bound) {
      return concat(pg.where(), " ", op, ": rank ", r, " announced ", n, " bytes, over the "
                    "bound of ", bound, " bytes (max_bytes); nothing was allocated. Send less "
                    "(or raise max_bytes on every rank).");
    };
    expect_bound_error(pg, [&] { lockstep::allgather_strings(pg, mine, 8); },
                       over("allgather_strings", last, 9, 8));
    expect_bound_error(pg, [&] { lockstep::gather_strings(pg, mine, 0, 8); },
                       over("gather_strings", last, 9, 8));
    expect_bound_error(pg, [&] { lockstep::broadcast_string(pg, mine, last, 8); },
                       over("broadcast_string", last, 9, 8));
    // A peer that claims 2^62 bytes (its raw length step, without the helper).
    if (pg.rank() == last) {
      std::vector<at::Tensor> lengths(w);
      for (auto& t : lengths) t = at::zeros({1}, at::kLong);
      pg.allgather(lengths, at::tensor({kHuge}, at::kLong))->wait();
      auto length = at::tensor({kHuge}, at::kLong);
      pg.broadcast(length, last)->wait();
    } else {
      expect_bound_error(pg, [&] { lockstep::allgather_bytes(pg, lockstep::Bytes(3, 1)); },
                         over("allgather_bytes", last, kHuge, lockstep::kMaxObjectBytes));
      expect_bound_error(pg, [&] { lockstep::broadcast_bytes(pg, {}, last); },
                         over("broadcast_bytes", last, kHuge, lockstep::kMaxObjectBytes));
    }
    EXPECT_EQ(lockstep::broadcast_string(pg, "still usable", 0), "still usable") << pg.where();
  });
}

// ---------------------------------------------------------------------------------------------
// Subgroups (new_group)

std::string list_of(const std::vector<int>& ranks) {
  std::string s = "[";
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s + "]";
}

// The backend a subgroup over `ranks` of `transport` has: the parent's, except that a
// hierarchical parent gives plain shared memory to members on one host.
std::string subgroup_backend(const Transport& transport, const std::vector<int>& ranks) {
  if (transport.backend != "hier") return transport.backend;
  for (int r : ranks) {
    if (transport.hosts[r] != transport.hosts[ranks[0]]) return "hier";
  }
  return "shm";
}

// Every shape of subgroup, all alive at once: the whole group, one rank, the last rank, the
// even ranks, the odd ranks, the first and the last. Members run collectives on each (their
// rank is their position); non-members hold a placeholder that refuses every operation.
TEST_P(GroupConformance, SubgroupsOfEveryShapeRunCollectives) {
  using lockstep::detail::concat;
  const int w = world();
  std::vector<std::vector<int>> shapes = {ranks_from(0, w), {0}, {w - 1}};
  std::vector<int> evens, odds;
  for (int r = 0; r < w; ++r) (r % 2 ? odds : evens).push_back(r);
  shapes.push_back(evens);
  if (!odds.empty()) shapes.push_back(odds);
  if (w > 2) shapes.push_back({0, w - 1});
  on_ranks(transport(), [&](ProcessGroup& pg) {
    std::vector<ProcessGroupPtr> subs;
    for (const auto& ranks : shapes) subs.push_back(lockstep::new_group(pg, ranks));
    for (size_t i = 0; i < shapes.size(); ++i) {
      const auto& ranks = shapes[i];
      auto& sub = *subs[i];
      const auto it = std::find(ranks.begin(), ranks.end(), pg.rank());
      if (it == ranks.end()) {
        EXPECT_FALSE(sub.is_member()) << pg.where() << " " << list_of(ranks);
        EXPECT_EQ(sub.rank(), -1);
        auto t = at::ones({2}, at::kFloat);
        try {
          sub.allreduce(t)->wait();
          ADD_FAILURE() << pg.where() << ": a non-member ran an allreduce";
        } catch (const lockstep::StateError& e) {
          EXPECT_EQ(std::string(e.what()),
                    concat(pg.where(), " allreduce on a subgroup: rank ", pg.rank(), " is not a "
                           "member of the subgroup of ranks ", list_of(ranks), ". Only its "
                           "members may use it; check is_member() first."));
        }
        std::vector<at::Tensor> none;
        EXPECT_THROW(sub.gather(none, t, 0), lockstep::StateError) << pg.where();
        EXPECT_THROW(sub.barrier(), lockstep::StateError) << pg.where();
        continue;
      }
      const int k = static_cast<int>(ranks.size());
      EXPECT_TRUE(sub.is_member());
      EXPECT_EQ(sub.rank(), static_cast<int>(it - ranks.begin())) << pg.where();
      EXPECT_EQ(sub.size(), k);
      EXPECT_EQ(sub.backend(), subgroup_backend(transport(), ranks)) << list_of(ranks);
      // allreduce: the sum of the members' parent ranks + 1.
      auto t = at::full({1001}, static_cast<double>(pg.rank() + 1), at::kDouble);
      sub.allreduce(t)->wait();
      double want = 0;
      for (int r : ranks) want += r + 1;
      EXPECT_TRUE(at::equal(t, at::full({1001}, want, at::kDouble)))
          << pg.where() << " subgroup " << list_of(ranks) << " allreduce";
      // broadcast from the last member, gather to the first.
      auto b = input(pg.rank(), 77, at::kFloat);
      sub.broadcast(b, k - 1)->wait();
      EXPECT_TRUE(bitwise_equal(b, input(ranks.back(), 77, at::kFloat)))
          << pg.where() << " subgroup " << list_of(ranks) << " broadcast";
      std::vector<at::Tensor> out;
      if (sub.rank() == 0) {
        for (int j = 0; j < k; ++j) out.push_back(at::zeros({5}, at::kLong));
      }
      sub.gather(out, input(pg.rank(), 5, at::kLong), 0)->wait();
      for (int j = 0; j < static_cast<int>(out.size()); ++j) {
        EXPECT_TRUE(bitwise_equal(out[j], input(ranks[j], 5, at::kLong)))
            << pg.where() << " subgroup " << list_of(ranks) << " gather " << j;
      }
    }
    // The parent is still in step.
    auto t = at::full({3}, 1.0f);
    pg.allreduce(t)->wait();
    EXPECT_TRUE(at::equal(t, at::full({3}, static_cast<float>(pg.size())))) << pg.where();
  });
}

// The even and the odd ranks each run many collectives on their own subgroup at the same
// time (and a subgroup of a subgroup), while both subgroups stay alive.
TEST_P(GroupConformance, DisjointSubgroupsRunConcurrently) {
  const int w = world();
  if (w < 2) GTEST_SKIP() << "one rank has no two disjoint subgroups";
  std::vector<int> evens, odds;
  for (int r = 0; r < w; ++r) (r % 2 ? odds : evens).push_back(r);
  on_ranks(transport(), [&](ProcessGroup& pg) {
    auto even = lockstep::new_group(pg, evens);
    auto odd = lockstep::new_group(pg, odds);
    auto& mine = pg.rank() % 2 ? *odd : *even;
    const auto& members = pg.rank() % 2 ? odds : evens;
    auto first = lockstep::new_group(mine, {0});  // collective over `mine` only
    std::vector<at::Tensor> ts;
    std::vector<WorkPtr> works;
    for (int i = 0; i < 20; ++i) {
      ts.push_back(at::full({4096 + 31 * i}, static_cast<float>(pg.rank() + i)));
      works.push_back(mine.allreduce(ts.back()));
    }
    float base = 0;
    for (int r : members) base += r;
    for (int i = 0; i < 20; ++i) {
      works[i]->wait();
      const float want = base + static_cast<float>(i * members.size());
      EXPECT_TRUE(at::equal(ts[i], at::full({4096 + 31 * i}, want)))
          << pg.where() << " allreduce " << i << " on " << list_of(members);
    }
    EXPECT_EQ(first->is_member(), mine.rank() == 0) << pg.where();
    if (first->is_member()) {
      EXPECT_EQ(first->size(), 1);
      first->barrier()->wait();
    }
  });
}

// A ProcessGroup written outside lockstep (here one that forwards to a thread group) gets
// a clear error from new_group instead of a half-built subgroup.
class ForwardingGroup : public ProcessGroup {
 public:
  explicit ForwardingGroup(ProcessGroupPtr inner)
      : ProcessGroup(inner->rank(), inner->size(), inner->timeout(), inner->store()),
        inner_(std::move(inner)) {}
  std::string backend() const override { return "forwarding"; }
  WorkPtr allreduce(at::Tensor& t, ReduceOp op) override { return inner_->allreduce(t, op); }
  WorkPtr broadcast(at::Tensor& t, int root) override { return inner_->broadcast(t, root); }
  WorkPtr allgather(std::vector<at::Tensor>& out, const at::Tensor& in) override {
    return inner_->allgather(out, in);
  }
  WorkPtr barrier() override { return inner_->barrier(); }

 private:
  ProcessGroupPtr inner_;
};

TEST(Subgroups, AGroupWithoutMakeSubgroupRefusesNewGroup) {
  auto inner = lockstep::new_thread_groups(2);
  lockstep_test::run_ranks(2, [&](int r) {
    ForwardingGroup pg(inner[r]);
    try {
      lockstep::new_group(pg, {1});
      EXPECT_NE(r, 1) << "rank 1 got a subgroup";
    } catch (const lockstep::StateError& e) {
      EXPECT_EQ(r, 1);
      EXPECT_EQ(std::string(e.what()),
                "[rank 1/2] new_group: the 'forwarding' group cannot build a subgroup of ranks "
                "[1] (it does not implement make_subgroup). Split a Gloo, shm, hier or thread "
                "group instead.");
    }
    // gather works on it too: the base class composes it of allgather.
    std::vector<at::Tensor> out;
    if (r == 0) out = {at::zeros({2}), at::zeros({2})};
    pg.gather(out, at::full({2}, static_cast<float>(r + 1)), 0)->wait();
    if (r == 0) {
      EXPECT_TRUE(at::equal(out[1], at::full({2}, 2.0f)));
    }
  });
}

TEST_P(GroupConformance, NewGroupRejectsBadRanksOnEveryRank) {
  using lockstep::detail::concat;
  const int w = world();
  struct Case {
    const char* name;
    std::function<std::vector<int>(int rank)> ranks;
    std::function<std::string(const ProcessGroup&)> message;
    int min_world;
  };
  auto same_for_all = [](std::vector<int> r) { return [r](int) { return r; }; };
  std::vector<Case> cases = {
      {"no ranks", same_for_all({}),
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " new_group: expected at least one rank, but got none.");
       },
       1},
      {"a rank == size", same_for_all({0, w}),
       [w](const ProcessGroup& pg) {
         return concat(pg.where(), " new_group: expected ranks in [0, ", w, "), but got ", w,
                       " in [0, ", w, "].");
       },
       1},
      {"a negative rank", same_for_all({-1}),
       [w](const ProcessGroup& pg) {
         return concat(pg.where(), " new_group: expected ranks in [0, ", w, "), but got -1 in "
                       "[-1].");
       },
       1},
      {"unsorted ranks", same_for_all({1, 0}),
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " new_group: expected sorted, distinct ranks, but got [1, 0]. "
                       "Sort them and drop duplicates.");
       },
       2},
      {"a duplicate rank", same_for_all({0, 0}),
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " new_group: expected sorted, distinct ranks, but got [0, 0]. "
                       "Sort them and drop duplicates.");
       },
       1},
      {"ranks that differ between ranks",
       [](int rank) { return rank == 0 ? std::vector<int>{0} : std::vector<int>{0, 1}; },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " new_group: rank 0 passes ranks [0] but rank 1 passes "
                       "[0, 1]. Every rank must pass the same ranks to the same new_group "
                       "call.");
       },
       2},
      {"an invalid list on the last rank only",
       [w](int rank) { return rank == w - 1 ? std::vector<int>{w} : std::vector<int>{0}; },
       [w](const ProcessGroup& pg) {
         if (pg.rank() == w - 1) {
           return concat(pg.where(), " new_group: expected ranks in [0, ", w, "), but got ", w,
                         " in [", w, "].");
         }
         return concat(pg.where(), " new_group: rank ", w - 1, " passed invalid ranks (see its "
                       "error); no subgroup was created.");
       },
       2},
  };
  on_ranks(transport(), [&](ProcessGroup& pg) {
    for (const auto& c : cases) {
      if (w < c.min_world) continue;
      try {
        lockstep::new_group(pg, c.ranks(pg.rank()));
        ADD_FAILURE() << pg.where() << " " << c.name << ": no error";
      } catch (const lockstep::InvalidArgument& e) {
        EXPECT_EQ(std::string(e.what()), c.message(pg)) << c.name;
      }
    }
    auto t = at::full({3}, 1.0f);
    pg.allreduce(t)->wait();
    EXPECT_TRUE(at::equal(t, at::full({3}, static_cast<float>(pg.size())))) << pg.where();
  });
}

// Fresh shm (one host) or hier (several) groups, one rank per entry of `hosts`, with a short
// timeout for the tests of timeouts.
std::vector<ProcessGroupPtr> small_timeout_groups(
    const std::vector<std::string>& hosts, const std::string& job,
    std::chrono::milliseconds timeout = std::chrono::milliseconds(300)) {
  const int world = static_cast<int>(hosts.size());
  std::vector<ProcessGroupPtr> groups(world);
  auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
  lockstep_test::run_ranks(world, [&](int r) {
    groups[r] = lockstep::new_shm_group(
        r, world, store,
        lockstep::ProcessGroupOptions().timeout(timeout).rendezvous_timeout(
            std::chrono::seconds(20)).job_id(job_prefix() + job).host_id(hosts[r]));
  });
  return groups;
}

void expect_timeout(const WorkPtr& work, const std::string& want) {
  try {
    work->wait();
    ADD_FAILURE() << "no timeout; expected " << want;
  } catch (const lockstep::TimeoutError& e) {
    EXPECT_EQ(std::string(e.what()), want);
  }
}

// A recv (or a thread group's send) whose peer never posts the other side fails with
// TimeoutError after the group's timeout, naming the peer; the channel stays usable. Fresh
// groups with a 300 ms timeout: the thread group's direct path, the shm channel, and a
// hierarchical group (hosts A A B) that uses the channel on host A and the store between hosts.
TEST(PointToPointTimeouts, AnUnmatchedMessageTimesOutNamingThePeer) {
  using lockstep::detail::concat;
  const auto timeout = std::chrono::milliseconds(300);
  auto threads = lockstep::new_thread_groups(2, lockstep::ThreadGroupOptions().timeout(timeout));
  auto shm = small_timeout_groups({"A", "A"}, "p2p-timeout");
  auto hier = small_timeout_groups({"A", "A", "B"}, "p2p-timeout-hier");
  ASSERT_TRUE(shm[0] && shm[1] && hier[0] && hier[1] && hier[2]);
  ASSERT_EQ(hier[0]->backend(), "hier");
  auto t = at::zeros({3}, at::kFloat);
  expect_timeout(threads[1]->recv(t, 0),
                 "[rank 1/2] recv from rank 0 (tag 0, 3 x Float, thread group) timed out after "
                 "0.3 s: the peer did not post the matching send. Check that it does, and its "
                 "log.");
  expect_timeout(threads[0]->send(t, 1, 4),
                 "[rank 0/2] send to rank 1 (tag 4, 3 x Float, thread group) timed out after "
                 "0.3 s: the peer did not post the matching recv. Check that it does, and its "
                 "log.");
  expect_timeout(shm[1]->recv(t, 0, 2),
                 "[rank 1/2] recv from rank 0 (tag 2, 3 x Float) via shm timed out after 0.3 s: "
                 "rank 0 sent nothing. Check that it calls send for this recv (and its log).");
  expect_timeout(hier[1]->recv(t, 0, 2),
                 "[rank 1/3] recv from rank 0 (tag 2, 3 x Float) via shm timed out after 0.3 s: "
                 "rank 0 sent nothing. Check that it calls send for this recv (and its log).");
  expect_timeout(hier[2]->recv(t, 0, 2),
                 "[rank 2/3] recv #1 from rank 0 (tag 2, 3 x Float) via the store timed out "
                 "after 0.3 s: the peer sent nothing. Check that it calls send for this recv "
                 "(and its log).");
  // The timed-out Works left their queues: the next pair matches (the store path included).
  lockstep_test::run_ranks(2, [&](int r) {
    auto x = at::full({3}, static_cast<float>(r + 1));
    if (r == 0) {
      threads[0]->send(x, 1)->wait();
      shm[0]->send(x, 1, 2)->wait();
      hier[0]->send(x, 1, 2)->wait();
      hier[0]->send(x, 2, 2)->wait();
    } else {
      threads[1]->recv(x, 0)->wait();
      EXPECT_TRUE(at::equal(x, at::full({3}, 1.0f)));
      auto y = at::zeros({3}, at::kFloat), z = at::zeros({3}, at::kFloat);
      shm[1]->recv(y, 0, 2)->wait();
      hier[1]->recv(z, 0, 2)->wait();
      EXPECT_TRUE(at::equal(y, at::full({3}, 1.0f)));
      EXPECT_TRUE(at::equal(z, at::full({3}, 1.0f)));
      auto w = at::zeros({3}, at::kFloat);
      hier[2]->recv(w, 0, 2)->wait();  // recv #1 again: the timed-out one gave its number back
      EXPECT_TRUE(at::equal(w, at::full({3}, 1.0f)));
    }
  });
}

// A shm group of more than kChannelMaxRanks (16) ranks reserves no channel (its rings would
// grow with W(W-1)) and sends through the store: the timeout names that path, and a message
// between its first and last rank arrives intact.
TEST(PointToPointTimeouts, AShmGroupAboveSixteenRanksSendsThroughTheStore) {
  auto groups = small_timeout_groups(std::vector<std::string>(17, "A"), "p2p-17",
                                     std::chrono::milliseconds(1000));
  for (const auto& g : groups) ASSERT_TRUE(g);
  // Rank 0 sends `value` to rank 16, which must receive exactly it.
  auto exchange = [&](float value) {
    lockstep_test::run_ranks(2, [&](int r) {
      if (r == 0) {
        groups[0]->send(at::full({3}, value), 16, 2)->wait();
      } else {
        auto y = at::zeros({3}, at::kFloat);
        groups[16]->recv(y, 0, 2)->wait();
        EXPECT_TRUE(at::equal(y, at::full({3}, value)));
      }
    });
  };
  exchange(7.0f);
  auto t = at::zeros({3}, at::kFloat);
  try {
    groups[16]->recv(t, 0, 2)->wait();
    ADD_FAILURE() << "no timeout";
  } catch (const lockstep::TimeoutError& e) {
    EXPECT_NE(std::string(e.what()).find("[rank 16/17] recv #2 from rank 0 (tag 2, 3 x Float) "
                                         "via the store timed out"),
              std::string::npos)
        << e.what();
  }
  exchange(8.0f);  // the timed-out recv left the queue: the next recv gets the next message
}

// A shm send larger than the channel times out when nobody receives it, naming the peer and
// what is buffered; its recv, posted later, times out after the buffered part; a recv that
// finds the next message where the rest of its own should be fails naming the abandonment;
// messages after either are received intact.
TEST(PointToPointTimeouts, AShmMessageLargerThanTheChannelTimesOutOnBothSides) {
  using lockstep::detail::concat;
  auto shm = small_timeout_groups({"A", "A"}, "p2p-timeout-large");
  ASSERT_TRUE(shm[0] && shm[1]);
  auto big = at::arange(kLarge, at::kFloat);
  const std::string send_what = concat("[rank 0/2] send to rank 1 (tag 0, ", kLarge,
                                       " x Float) via shm timed out after 0.3 s: rank 1 did not "
                                       "receive it (");
  const std::string send_tail = " bytes). Check that it calls recv for this send (and its log).";
  std::string buffered;
  try {
    shm[0]->send(big, 1, 0)->wait();
    ADD_FAILURE() << "no timeout";
  } catch (const lockstep::TimeoutError& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.substr(0, send_what.size()), send_what) << what;
    ASSERT_GE(what.size(), send_tail.size());
    EXPECT_EQ(what.substr(what.size() - send_tail.size()), send_tail) << what;
    // "<n> of its <total> bytes are in the channel, which buffers <n>"
    buffered = what.substr(send_what.size(), what.find(' ', send_what.size()) - send_what.size());
    EXPECT_EQ(what.find(concat(buffered, " of its ", kLarge * 4, " bytes are in the channel, "
                               "which buffers ", buffered)),
              send_what.size())
        << what;
  }
  auto out = at::zeros({kLarge}, at::kFloat);
  expect_timeout(shm[1]->recv(out, 0, 0),
                 concat("[rank 1/2] recv from rank 0 (tag 0, ", kLarge, " x Float) via shm timed "
                        "out after 0.3 s: rank 0 sent ", buffered, " of the message's ",
                        kLarge * 4, " bytes, then nothing. Check rank 0's log."));
  auto small = at::full({3}, 5.0f), small_out = at::zeros({3}, at::kFloat);
  shm[0]->send(small, 1, 1)->wait();
  shm[1]->recv(small_out, 0, 1)->wait();
  EXPECT_TRUE(at::equal(small_out, small));

  expect_timeout(shm[0]->send(big, 1, 0), send_what.substr(0, send_what.find(" timed out")) +
                                               " timed out after 0.3 s: rank 1 did not receive "
                                               "it (" + buffered + " of its " +
                                               std::to_string(kLarge * 4) +
                                               " bytes are in the channel, which buffers " +
                                               buffered + send_tail);
  auto small_sent = shm[0]->send(small, 1, 1);  // waits for room behind the abandoned chunks
  try {
    shm[1]->recv(out, 0, 0)->wait();
    ADD_FAILURE() << "no error for an abandoned message";
  } catch (const lockstep::CommError& e) {
    EXPECT_EQ(std::string(e.what()),
              concat("[rank 1/2] recv from rank 0 (tag 0, ", kLarge, " x Float) via shm: rank 0 "
                     "abandoned the message after ", buffered, " of its ", kLarge * 4, " bytes "
                     "(its send failed or timed out) and sent another; the tensor holds part of "
                     "it. Check rank 0's log."));
  }
  small_sent->wait();
  small_out.zero_();
  shm[1]->recv(small_out, 0, 1)->wait();
  EXPECT_TRUE(at::equal(small_out, small));
}

// A shm recv whose peer destroys its group fails at once naming it; destroying the group of a
// rank whose recv waits fails that recv with StateError.
TEST(PointToPointTimeouts, AShmRecvFailsWhenEitherSideLeaves) {
  using lockstep::detail::concat;
  {
    auto shm = small_timeout_groups({"A", "A"}, "p2p-departed", std::chrono::seconds(20));
    ASSERT_TRUE(shm[0] && shm[1]);
    auto t = at::zeros({3}, at::kFloat);
    auto work = shm[1]->recv(t, 0, 4);
    shm[0].reset();
    try {
      work->wait();
      ADD_FAILURE() << "no error";
    } catch (const lockstep::CommError& e) {
      EXPECT_EQ(std::string(e.what()),
                "[rank 1/2] recv from rank 0 (tag 4, 3 x Float) via shm: rank 0 destroyed its "
                "process group (or exited) first. Every send needs a recv on its peer before "
                "the peer leaves.");
    }
  }
  {
    auto shm = small_timeout_groups({"A", "A"}, "p2p-stopping", std::chrono::seconds(20));
    ASSERT_TRUE(shm[0] && shm[1]);
    auto t = at::zeros({3}, at::kFloat);
    auto work = shm[1]->recv(t, 0, 4);
    shm[1].reset();
    try {
      work->wait();
      ADD_FAILURE() << "no error";
    } catch (const lockstep::StateError& e) {
      EXPECT_EQ(std::string(e.what()),
                "[rank 1/2] recv from rank 0 (tag 4, 3 x Float) via shm: this rank destroyed "
                "its process group before the message was through.");
    }
  }
}

// ---------------------------------------------------------------------------------------------
// barrier

// No rank leaves a barrier before every rank reached it: a counter bumped before each
// barrier has every rank's bump when any rank leaves it.
TEST_P(GroupConformance, BarrierWaitsForEveryRank) {
  std::atomic<int> arrived{0};
  on_ranks(transport(), [&](ProcessGroup& pg) {
    for (int round = 1; round <= 5; ++round) {
      arrived.fetch_add(1);
      pg.barrier()->wait();
      EXPECT_GE(arrived.load(), round * pg.size()) << pg.where() << " round " << round;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Many collectives in flight, waited for out of order.

TEST_P(GroupConformance, ManyAsyncInFlightComplete) {
  on_ranks(transport(), [&](ProcessGroup& pg) {
    const int w = pg.size();
    constexpr int kWorks = 30;
    std::vector<at::Tensor> ts;
    std::vector<std::vector<at::Tensor>> gathered(kWorks);
    std::vector<WorkPtr> works;
    for (int i = 0; i < kWorks; ++i) {
      ts.push_back(at::full({4096 + i * 997}, static_cast<float>(i + pg.rank())));
      switch (i % 3) {
        case 0: works.push_back(pg.allreduce(ts.back())); break;
        case 1: works.push_back(pg.broadcast(ts.back(), i % w)); break;
        case 2:
          for (int k = 0; k < w; ++k) gathered[i].push_back(at::empty_like(ts.back()));
          works.push_back(pg.allgather(gathered[i], ts.back()));
          break;
      }
    }
    works.back()->wait();  // the last first, then in order
    for (int i = 0; i < kWorks; ++i) {
      works[i]->wait();
      EXPECT_TRUE(works[i]->is_completed()) << pg.where() << " work " << i;
      const auto shape = ts[i].sizes();
      switch (i % 3) {
        case 0: {
          const float sum = static_cast<float>(w * i + w * (w - 1) / 2);
          EXPECT_TRUE(at::equal(ts[i], at::full(shape, sum))) << pg.where() << " allreduce " << i;
          break;
        }
        case 1:
          EXPECT_TRUE(at::equal(ts[i], at::full(shape, static_cast<float>(i + i % w))))
              << pg.where() << " broadcast " << i;
          break;
        case 2:
          for (int k = 0; k < w; ++k) {
            EXPECT_TRUE(at::equal(gathered[i][k], at::full(shape, static_cast<float>(i + k))))
                << pg.where() << " allgather " << i << " output " << k;
          }
          break;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The shared argument checks (ProcessGroup::check_*): every transport rejects the same
// mistake with the same message, before anything is sent, and stays usable afterwards.

at::Tensor floats(at::IntArrayRef shape) { return at::ones(shape, at::kFloat); }

struct Mistake {
  const char* name;
  std::function<WorkPtr(ProcessGroup&)> call;
  std::function<std::string(const ProcessGroup&)> message;
  int min_world = 1;  // a mistake between ranks needs at least two
};

// The message every rank gets when rank `r` (not itself) made a mistake of its own in a
// checked collective (Note [Checked collectives]).
std::string other_rank_invalid(const ProcessGroup& pg, const char* op, int r) {
  return lockstep::detail::concat(pg.where(), " ", op, ": rank ", r, " passed invalid arguments "
                                  "(see its error). Every rank must pass matching arguments; "
                                  "nothing was sent.");
}

std::string ranks_disagree(const ProcessGroup& pg, const char* op, const std::string& what) {
  return lockstep::detail::concat(pg.where(), " ", op, ": ", what, ". Every rank must pass "
                                  "matching arguments; nothing was sent.");
}

// A list of `n` float tensors shaped `shape`.
std::vector<at::Tensor> float_list(int n, at::IntArrayRef shape) {
  std::vector<at::Tensor> list;
  for (int i = 0; i < n; ++i) list.push_back(at::ones(shape, at::kFloat));
  return list;
}

std::vector<Mistake> mistakes() {
  using lockstep::detail::concat;
  return {
      {"allreduce avg of integers",
       [](ProcessGroup& pg) {
         auto t = at::ones({3}, at::kLong);
         return pg.allreduce(t, ReduceOp::kAvg);
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " allreduce: expected a floating-point tensor for ReduceOp "
                       "avg, but got Long. Use sum and divide, or convert the tensor.");
       }},
      {"allreduce of a non-contiguous tensor",
       [](ProcessGroup& pg) {
         auto t = floats({4, 3}).t();
         return pg.allreduce(t);
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " allreduce: expected a contiguous tensor, but got sizes "
                       "[3, 4] strides [1, 3]. Call .contiguous() first.");
       }},
      {"broadcast of an undefined tensor",
       [](ProcessGroup& pg) {
         at::Tensor t;
         return pg.broadcast(t, 0);
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " broadcast: expected a defined tensor, but got an "
                       "undefined one.");
       }},
      {"broadcast from root == size",
       [](ProcessGroup& pg) {
         auto t = floats({2});
         return pg.broadcast(t, pg.size());
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " broadcast: expected a root in [0, ", pg.size(),
                       "), but got ", pg.size(), ".");
       }},
      {"broadcast from root -1",
       [](ProcessGroup& pg) {
         auto t = floats({2});
         return pg.broadcast(t, -1);
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " broadcast: expected a root in [0, ", pg.size(),
                       "), but got -1.");
       }},
      {"allgather with one output too many",
       [](ProcessGroup& pg) {
         std::vector<at::Tensor> outputs(pg.size() + 1, floats({2}));
         return pg.allgather(outputs, floats({2}));
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " allgather: expected one output tensor per rank (",
                       pg.size(), "), but got ", pg.size() + 1, ".");
       }},
      {"allgather into outputs of another shape",
       [](ProcessGroup& pg) {
         std::vector<at::Tensor> outputs(pg.size(), floats({6}));
         return pg.allgather(outputs, floats({2, 3}));
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " allgather: expected output 0 to match the input ([2, 3] "
                       "Float), but got [6] Float.");
       }},
      {"allgather of a non-contiguous input",
       [](ProcessGroup& pg) {
         std::vector<at::Tensor> outputs(pg.size(), floats({3, 4}));
         return pg.allgather(outputs, floats({4, 3}).t());
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " allgather: expected a contiguous tensor, but got sizes "
                       "[3, 4] strides [1, 3]. Call .contiguous() first.");
       }},
      {"reduce_scatter with one input too few",
       [](ProcessGroup& pg) {
         auto out = floats({2});
         std::vector<at::Tensor> inputs(pg.size() - 1, floats({2}));
         return pg.reduce_scatter(out, inputs);
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " reduce_scatter: expected one input per rank (", pg.size(),
                       "), but got ", pg.size() - 1, ".");
       }},
      {"reduce_scatter from inputs of another dtype",
       [](ProcessGroup& pg) {
         auto out = floats({2});
         std::vector<at::Tensor> inputs(pg.size(), at::ones({2}, at::kDouble));
         return pg.reduce_scatter(out, inputs);
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " reduce_scatter: expected input 0 to match the output ([2] "
                       "Float), but got [2] Double.");
       }},
      {"reduce_scatter avg of integers",
       [](ProcessGroup& pg) {
         auto out = at::ones({2}, at::kLong);
         std::vector<at::Tensor> inputs(pg.size(), at::ones({2}, at::kLong));
         return pg.reduce_scatter(out, inputs, ReduceOp::kAvg);
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " reduce_scatter: expected a floating-point tensor for "
                       "ReduceOp avg, but got Long. Use sum and divide.");
       }},
      {"reduce into root == size",
       [](ProcessGroup& pg) {
         std::vector<at::Tensor> list = {floats({2})};
         return pg.reduce(list, pg.size());
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " reduce: expected a root in [0, ", pg.size(), "), but got ",
                       pg.size(), ".");
       }},
      {"reduce avg with an integer tensor",
       [](ProcessGroup& pg) {
         std::vector<at::Tensor> list = {floats({2}), at::ones({2}, at::kInt)};
         return pg.reduce(list, 0, ReduceOp::kAvg);
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " reduce: expected floating-point tensors for ReduceOp avg, "
                       "but tensor 1 is Int. Use sum and divide.");
       }},
      // gather
      {"gather to root == size",
       [](ProcessGroup& pg) {
         std::vector<at::Tensor> none;
         return pg.gather(none, floats({2}), pg.size());
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " gather: expected a root in [0, ", pg.size(), "), but got ",
                       pg.size(), ".");
       }},
      {"gather with one output too few on the root",
       [](ProcessGroup& pg) {
         auto out = float_list(pg.rank() == 0 ? pg.size() - 1 : 0, {2});
         return pg.gather(out, floats({2}), 0);
       },
       [](const ProcessGroup& pg) {
         if (pg.rank() != 0) return other_rank_invalid(pg, "gather", 0);
         return concat(pg.where(), " gather: expected one output tensor per rank (", pg.size(),
                       ") on the root, but got ", pg.size() - 1, ".");
       }},
      {"gather into outputs of another dtype",
       [](ProcessGroup& pg) {
         std::vector<at::Tensor> out(pg.rank() == 0 ? pg.size() : 0, at::ones({2}, at::kDouble));
         return pg.gather(out, floats({2}), 0);
       },
       [](const ProcessGroup& pg) {
         if (pg.rank() != 0) return other_rank_invalid(pg, "gather", 0);
         return concat(pg.where(), " gather: expected output 0 to match the input ([2] Float), "
                       "but got [2] Double.");
       }},
      {"gather with outputs on a rank other than the root",
       [](ProcessGroup& pg) {
         auto out = float_list(pg.size(), {2});
         return pg.gather(out, floats({2}), 0);
       },
       [](const ProcessGroup& pg) {
         if (pg.rank() == 0) return other_rank_invalid(pg, "gather", 1);
         return concat(pg.where(), " gather: expected no output tensors on a rank other than "
                       "the root (0), but got ", pg.size(), ". Pass an empty list.");
       },
       2},
      {"gather of another dtype on the last rank",
       [](ProcessGroup& pg) {
         auto out = float_list(pg.rank() == 0 ? pg.size() : 0, {2});
         const bool last = pg.rank() == pg.size() - 1;
         return pg.gather(out, at::ones({2}, last ? at::kDouble : at::kFloat), 0);
       },
       [](const ProcessGroup& pg) {
         return ranks_disagree(pg, "gather", concat("rank ", pg.size() - 1, " passed Double but "
                                                    "rank 0 passed Float"));
       },
       2},
      {"gather of more elements on the last rank",
       [](ProcessGroup& pg) {
         auto out = float_list(pg.rank() == 0 ? pg.size() : 0, {2});
         return pg.gather(out, floats({pg.rank() == pg.size() - 1 ? 3 : 2}), 0);
       },
       [](const ProcessGroup& pg) {
         return ranks_disagree(pg, "gather", concat("rank ", pg.size() - 1, " passed 3 elements "
                                                    "but rank 0 passed 2"));
       },
       2},
      {"gather to a root that differs between ranks",
       [](ProcessGroup& pg) {
         const int root = pg.rank() == 0 ? 0 : 1;
         auto out = float_list(pg.rank() == root ? pg.size() : 0, {2});
         return pg.gather(out, floats({2}), root);
       },
       [](const ProcessGroup& pg) {
         return ranks_disagree(pg, "gather", "rank 0 names root 0 but rank 1 names root 1");
       },
       2},
      // scatter
      {"scatter from root -1",
       [](ProcessGroup& pg) {
         auto out = floats({2});
         return pg.scatter(out, {}, -1);
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " scatter: expected a root in [0, ", pg.size(),
                       "), but got -1.");
       }},
      {"scatter of inputs of another shape",
       [](ProcessGroup& pg) {
         auto out = floats({2, 3});
         auto in = float_list(pg.rank() == 0 ? pg.size() : 0, {6});
         return pg.scatter(out, in, 0);
       },
       [](const ProcessGroup& pg) {
         if (pg.rank() != 0) return other_rank_invalid(pg, "scatter", 0);
         return concat(pg.where(), " scatter: expected input 0 to match the output ([2, 3] "
                       "Float), but got [6] Float.");
       }},
      {"scatter with one input too many on the root",
       [](ProcessGroup& pg) {
         auto out = floats({2});
         auto in = float_list(pg.rank() == 0 ? pg.size() + 1 : 0, {2});
         return pg.scatter(out, in, 0);
       },
       [](const ProcessGroup& pg) {
         if (pg.rank() != 0) return other_rank_invalid(pg, "scatter", 0);
         return concat(pg.where(), " scatter: expected one input tensor per rank (", pg.size(),
                       ") on the root, but got ", pg.size() + 1, ".");
       }},
      {"scatter with inputs on a rank other than the root",
       [](ProcessGroup& pg) {
         auto out = floats({2});
         return pg.scatter(out, float_list(pg.size(), {2}), 0);
       },
       [](const ProcessGroup& pg) {
         if (pg.rank() == 0) return other_rank_invalid(pg, "scatter", 1);
         return concat(pg.where(), " scatter: expected no input tensors on a rank other than "
                       "the root (0), but got ", pg.size(), ". Pass an empty list.");
       },
       2},
      {"scatter into an output of another size on rank 1",
       [](ProcessGroup& pg) {
         auto out = floats({pg.rank() == 1 ? 5 : 2});
         return pg.scatter(out, float_list(pg.rank() == 0 ? pg.size() : 0, {2}), 0);
       },
       [](const ProcessGroup& pg) {
         return ranks_disagree(pg, "scatter", "rank 1 passed 5 elements but rank 0 passed 2");
       },
       2},
      // all_to_all_single
      {"all_to_all_single with splits that do not sum to dim 0",
       [](ProcessGroup& pg) {
         auto out = floats({pg.size()});
         std::vector<int64_t> splits(pg.size(), 1);
         splits[0] = 2;
         return pg.all_to_all_single(out, floats({pg.size()}), {}, splits);
       },
       [](const ProcessGroup& pg) {
         std::string list = "[2";
         for (int i = 1; i < pg.size(); ++i) list += ", 1";
         return concat(pg.where(), " all_to_all_single: expected input_split_sizes ", list,
                       "] to sum to dim 0 (", pg.size(), "), but they sum to ", pg.size() + 1,
                       ".");
       }},
      {"all_to_all_single with one split too many",
       [](ProcessGroup& pg) {
         auto out = floats({pg.size()});
         std::vector<int64_t> splits(pg.size() + 1, 0);
         return pg.all_to_all_single(out, floats({pg.size()}), splits, {});
       },
       [](const ProcessGroup& pg) {
         std::string list = "[0";
         for (int i = 0; i < pg.size(); ++i) list += ", 0";
         return concat(pg.where(), " all_to_all_single: expected output_split_sizes to hold "
                       "one entry per rank (", pg.size(), "), but got ", pg.size() + 1, ": ",
                       list, "].");
       }},
      {"all_to_all_single with a negative split",
       [](ProcessGroup& pg) {
         auto out = floats({pg.size()});
         std::vector<int64_t> splits(pg.size(), 1);
         splits[0] = -1;
         splits[pg.size() - 1] += 2;
         return pg.all_to_all_single(out, floats({pg.size()}), {}, splits);
       },
       [](const ProcessGroup& pg) {
         std::vector<int64_t> splits(pg.size(), 1);
         splits[0] = -1;
         splits[pg.size() - 1] += 2;
         std::string list = "[";
         for (int i = 0; i < pg.size(); ++i) list += concat(i ? ", " : "", splits[i]);
         return concat(pg.where(), " all_to_all_single: expected non-negative "
                       "input_split_sizes, but got ", list, "].");
       },
       2},
      {"all_to_all_single of equal splits of an indivisible dim 0",
       [](ProcessGroup& pg) {
         auto out = floats({pg.size()});
         return pg.all_to_all_single(out, floats({pg.size() + 1}));
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " all_to_all_single: expected the input's dim 0 (",
                       pg.size() + 1, ") to be divisible by the group size (", pg.size(),
                       ") for equal splits. Pass input_split_sizes.");
       },
       2},
      {"all_to_all_single into an output of another dtype",
       [](ProcessGroup& pg) {
         auto out = at::ones({pg.size()}, at::kDouble);
         return pg.all_to_all_single(out, floats({pg.size()}));
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " all_to_all_single: expected the output's dtype to match "
                       "the input's (Float), but got Double.");
       }},
      {"all_to_all_single with rows of another shape",
       [](ProcessGroup& pg) {
         auto out = floats({pg.size(), 2});
         return pg.all_to_all_single(out, floats({pg.size(), 3}));
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " all_to_all_single: expected the output's rows to match the "
                       "input's (sizes [", pg.size(), ", 3] after dim 0), but got sizes [",
                       pg.size(), ", 2].");
       }},
      {"all_to_all_single of a scalar",
       [](ProcessGroup& pg) {
         auto out = at::ones({}, at::kFloat);
         return pg.all_to_all_single(out, at::ones({}, at::kFloat));
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " all_to_all_single: expected tensors of at least one "
                       "dimension (split along dim 0), but got sizes [] (output) and [] "
                       "(input).");
       }},
      {"all_to_all_single in place",
       [](ProcessGroup& pg) {
         auto t = floats({pg.size()});
         return pg.all_to_all_single(t, t);
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " all_to_all_single: expected the output and the input not "
                       "to overlap, but they share memory. Pass a separate output tensor.");
       }},
      {"all_to_all_single where rank 0 expects more rows than are sent",
       [](ProcessGroup& pg) {
         const int w = pg.size();
         std::vector<int64_t> in_splits(w, 1), out_splits(w, 1);
         if (pg.rank() == 0) {
           out_splits[0] = 2;
           out_splits[1] = 0;
         }
         auto out = floats({w});
         return pg.all_to_all_single(out, floats({w}), out_splits, in_splits);
       },
       [](const ProcessGroup& pg) {
         return ranks_disagree(pg, "all_to_all_single",
                               "rank 0 sends 1 rows to rank 0 (its input_split_sizes[0]), but "
                               "rank 0 expects 2 rows from rank 0 (its output_split_sizes[0])");
       },
       2},
      {"all_to_all_single with wider rows on the last rank",
       [](ProcessGroup& pg) {
         const int64_t row = pg.rank() == pg.size() - 1 ? 4 : 3;
         auto out = floats({pg.size(), row});
         return pg.all_to_all_single(out, floats({pg.size(), row}));
       },
       [](const ProcessGroup& pg) {
         return ranks_disagree(pg, "all_to_all_single",
                               concat("rank ", pg.size() - 1, "'s rows hold 4 elements but rank "
                                      "0's hold 3"));
       },
       2},
      // send / recv
      {"send to this rank",
       [](ProcessGroup& pg) { return pg.send(floats({2}), pg.rank()); },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " send: expected a destination other than this rank (",
                       pg.rank(), "), but got ", pg.rank(), ". Copy the tensor instead.");
       }},
      {"recv from rank == size",
       [](ProcessGroup& pg) {
         auto t = floats({2});
         return pg.recv(t, pg.size());
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " recv: expected a source rank in [0, ", pg.size(),
                       "), but got ", pg.size(), ".");
       }},
      {"recv from this rank",
       [](ProcessGroup& pg) {
         auto t = floats({2});
         return pg.recv(t, pg.rank(), 3);
       },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " recv: expected a source other than this rank (",
                       pg.rank(), "), but got ", pg.rank(), ". Copy the tensor instead.");
       }},
      {"send of a non-contiguous tensor",
       [](ProcessGroup& pg) { return pg.send(floats({4, 3}).t(), (pg.rank() + 1) % pg.size()); },
       [](const ProcessGroup& pg) {
         return concat(pg.where(), " send: expected a contiguous tensor, but got sizes [3, 4] "
                       "strides [1, 3]. Call .contiguous() first.");
       }},
  };
}

TEST_P(GroupConformance, ArgumentChecksGiveOneMessageOnEveryTransport) {
  const auto all = mistakes();
  on_ranks(transport(), [&](ProcessGroup& pg) {
    for (const auto& mistake : all) {
      if (pg.size() < mistake.min_world) continue;
      try {
        auto work = mistake.call(pg);
        if (work) work->wait();
        ADD_FAILURE() << pg.where() << " " << mistake.name << ": no error";
      } catch (const lockstep::InvalidArgument& e) {
        EXPECT_EQ(std::string(e.what()), mistake.message(pg)) << mistake.name;
      } catch (const std::exception& e) {
        ADD_FAILURE() << pg.where() << " " << mistake.name << ": expected InvalidArgument, "
                      << "but got " << e.what();
      }
    }
    // Nothing was sent: the group still works, and the sequence agrees on every rank.
    auto t = at::full({3}, static_cast<float>(pg.rank() + 1));
    pg.allreduce(t)->wait();
    EXPECT_TRUE(at::equal(t, at::full({3}, pg.size() * (pg.size() + 1) / 2.0f))) << pg.where();
  });
}

// ---------------------------------------------------------------------------------------------
// Instances

std::string transport_name(const ::testing::TestParamInfo<Transport>& info) {
  return info.param.name();
}

std::string transport_dtype_name(
    const ::testing::TestParamInfo<std::tuple<Transport, at::ScalarType>>& info) {
  return std::get<0>(info.param).name() + "_" + c10::toString(std::get<1>(info.param));
}

INSTANTIATE_TEST_SUITE_P(Transports, Conformance,
                         ::testing::Combine(::testing::ValuesIn(all_transports()),
                                            ::testing::ValuesIn(kDtypes)),
                         transport_dtype_name);
INSTANTIATE_TEST_SUITE_P(Transports, DataConformance,
                         ::testing::Combine(::testing::ValuesIn(all_transports()),
                                            ::testing::ValuesIn(kDataDtypes)),
                         transport_dtype_name);
INSTANTIATE_TEST_SUITE_P(Transports, GroupConformance, ::testing::ValuesIn(all_transports()),
                         transport_name);

}  // namespace
