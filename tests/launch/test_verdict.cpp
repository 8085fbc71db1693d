// The launcher's root-cause verdict (apps/run/verdict.h, Note [Root cause]), table-driven over
// orderings of worker exits, and the summary lines it prints. Pure: no processes.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "verdict.h"

namespace {

using lockstep::run::Failure;
using lockstep::run::judge;
using lockstep::run::summary_lines;
using lockstep::run::WorkerEvent;
using Kind = WorkerEvent::Kind;

// Event builders: rank, time, and (for nodes) the node.
WorkerEvent ev(Kind kind, int rank, double time, int node = 0) {
  WorkerEvent e;
  e.kind = kind;
  e.rank = rank;
  e.local_rank = rank;
  e.node = node;
  e.host = node == 0 ? "h0" : "h1";
  e.pid = 1000 + rank;
  e.time = time;
  return e;
}
WorkerEvent exit0(int rank, double t, int node = 0) { return ev(Kind::kExited, rank, t, node); }
WorkerEvent fail(int rank, double t, int code, const std::string& type = "",
                 const std::string& message = "", int node = 0) {
  auto e = ev(Kind::kExited, rank, t, node);
  e.exit_code = code;
  e.type = type;
  e.message = message;
  return e;
}
WorkerEvent comm(int rank, double t, int node = 0) {
  return fail(rank, t, 1, "lockstep::CommError", "Connection reset by peer", node);
}
WorkerEvent timeout(int rank, double t, int node = 0) {
  return fail(rank, t, 1, "lockstep::TimeoutError", "allreduce timed out", node);
}
WorkerEvent killed(int rank, double t, int sig, int node = 0) {
  auto e = ev(Kind::kKilled, rank, t, node);
  e.signal = sig;
  return e;
}
WorkerEvent stopped(int rank, double t, int node = 0) {
  auto e = ev(Kind::kStopped, rank, t, node);
  e.signal = SIGSTOP;
  return e;
}
WorkerEvent requested(WorkerEvent e) {
  e.requested = true;
  return e;
}

struct Case {
  const char* name;
  std::vector<WorkerEvent> events;
  bool failed;
  int root_rank = -1;
  Kind root_kind = Kind::kExited;
  int code = 0;
  int then_rank = -1;             // -1: no "then"
  std::vector<int> early = {};    // ranks flagged as early exits
  double ready_at = 0;
};

constexpr double kSettle = 1.0;

class Verdicts : public ::testing::TestWithParam<Case> {};

TEST_P(Verdicts, NameTheRootCause) {
  const Case& c = GetParam();
  auto v = judge(c.events, kSettle);
  ASSERT_EQ(v.has_value(), c.failed);
  if (!v) return;
  const Failure& f = v->failure;
  EXPECT_EQ(f.root.rank, c.root_rank);
  EXPECT_EQ(f.root.kind, c.root_kind);
  EXPECT_EQ(f.code(), c.code);
  EXPECT_EQ(f.then ? f.then->rank : -1, c.then_rank);
  std::vector<int> early;
  for (const auto& e : f.early_exits) early.push_back(e.rank);
  EXPECT_EQ(early, c.early);
  EXPECT_DOUBLE_EQ(v->ready_at, c.ready_at);
}

INSTANTIATE_TEST_SUITE_P(
    Orderings, Verdicts,
    ::testing::Values(
        Case{"nothing_yet", {}, false},
        Case{"all_exit_zero", {exit0(1, 1), exit0(0, 2)}, false},
        Case{"stop_alone_is_no_failure", {stopped(1, 1)}, false},
        // The issue: rank 1 exits 0 early, rank 0 then fails in a collective.
        Case{"zero_first_then_failure", {exit0(1, 1), comm(0, 2)}, true, 0, Kind::kExited, 1,
             -1, {1}, 2 + kSettle},
        Case{"zero_and_failure_reaped_in_the_same_pass", {comm(0, 1), exit0(1, 1)}, true, 0,
             Kind::kExited, 1, -1, {1}, 1 + kSettle},
        Case{"zero_first_then_primary_failure", {exit0(1, 1), fail(0, 2, 4, "lockstep::StateError")},
             true, 0, Kind::kExited, 4, -1, {1}, 2},
        // A primary failure is published at once: a later exit 0 is the launcher's doing.
        Case{"failure_then_zero", {fail(1, 1, 3), requested(exit0(0, 2))}, true, 1,
             Kind::kExited, 3, -1, {}, 1},
        // A rank that destroys its group fails its peer at once, and exits 0 a little later.
        Case{"zero_in_the_settle_window_is_flagged", {comm(0, 1), exit0(1, 1.5)}, true, 0,
             Kind::kExited, 1, -1, {1}, 1 + kSettle},
        Case{"secondary_then_primary_within_settle",
             {comm(0, 1), fail(1, 1.4, 1, "lockstep::StateError", "boom")}, true, 1,
             Kind::kExited, 1, 0, {}, 1},
        Case{"secondary_then_primary_after_settle",
             {comm(0, 1), fail(1, 5, 1, "lockstep::StateError", "boom")}, true, 0, Kind::kExited,
             1, -1, {}, 1 + kSettle},
        Case{"exit_code_without_error_file_is_primary", {comm(0, 1), fail(1, 1.5, 2)}, true, 1,
             Kind::kExited, 2, 0, {}, 1},
        Case{"signal_beats_exit_code_reaped_in_the_same_pass",
             {comm(0, 1), killed(1, 1, SIGKILL)}, true, 1, Kind::kKilled, 128 + SIGKILL, 0, {},
             1},
        Case{"killed_first", {killed(1, 1, SIGSEGV), comm(0, 1.2)}, true, 1, Kind::kKilled,
             128 + SIGSEGV, -1, {}, 1},
        Case{"two_primaries_first_wins", {fail(1, 1, 3), fail(0, 1.1, 7)}, true, 1,
             Kind::kExited, 3, -1, {}, 1},
        Case{"stop_then_timeout", {stopped(1, 1), timeout(0, 4)}, true, 1, Kind::kStopped,
             128 + SIGSTOP, 0, {}, 4},
        Case{"stop_then_primary_failure", {stopped(1, 1), fail(0, 2, 5)}, true, 1,
             Kind::kStopped, 128 + SIGSTOP, 0, {}, 2},
        Case{"stop_continued_then_timeout",
             {stopped(1, 1), ev(Kind::kContinued, 1, 2), timeout(0, 4)}, true, 0, Kind::kExited,
             1, -1, {}, 4 + kSettle},
        Case{"stop_after_the_failure_is_not_the_cause",
             {fail(0, 1, 6, "lockstep::StateError"), stopped(1, 1.5)}, true, 0, Kind::kExited, 6,
             -1, {}, 1},
        Case{"launcher_stops_are_ignored",
             {comm(0, 1), requested(killed(1, 1.5, SIGTERM)), requested(exit0(2, 1.6))}, true, 0,
             Kind::kExited, 1, -1, {}, 1 + kSettle},
        Case{"only_requested_deaths_are_no_failure", {requested(killed(1, 1, SIGTERM))}, false},
        Case{"events_in_any_order", {timeout(0, 4), exit0(2, 0.5), stopped(1, 1)}, true, 1,
             Kind::kStopped, 128 + SIGSTOP, 0, {2}, 4},
        Case{"two_nodes_zero_first", {exit0(2, 1, /*node=*/1), comm(0, 2), requested(exit0(1, 3))},
             true, 0, Kind::kExited, 1, -1, {2}, 2 + kSettle},
        Case{"two_nodes_stop_on_the_other_node", {stopped(1, 1, /*node=*/1), timeout(0, 4)}, true,
             1, Kind::kStopped, 128 + SIGSTOP, 0, {}, 4},
        Case{"two_nodes_primary_on_the_other_node",
             {comm(0, 1), fail(1, 1.3, 9, "lockstep::StateError", "x", /*node=*/1)}, true, 1,
             Kind::kExited, 9, 0, {}, 1}),
    [](const auto& info) { return std::string(info.param.name); });

// Every ordering of two ranks' ends (each: exit 0, a primary exit code, a CommError, SIGKILL,
// a stop), far apart and close together: the invariants of Note [Root cause].
TEST(Verdicts, EveryOrderingOfTwoRanks) {
  enum End { kZero, kPrimary, kComm, kKill, kStop };
  auto make = [](End end, int rank, double t) {
    switch (end) {
      case kZero: return exit0(rank, t);
      case kPrimary: return fail(rank, t, 3);
      case kComm: return comm(rank, t);
      case kKill: return killed(rank, t, SIGKILL);
      case kStop: return stopped(rank, t);
    }
    return exit0(rank, t);
  };
  auto is_failure = [](End e) { return e == kPrimary || e == kComm || e == kKill; };
  for (End a : {kZero, kPrimary, kComm, kKill, kStop}) {
    for (End b : {kZero, kPrimary, kComm, kKill, kStop}) {
      for (double gap : {0.0, 0.5, 3.0}) {
        SCOPED_TRACE(testing::Message() << "rank 1: " << a << " at 1, rank 0: " << b << " at "
                                        << 1 + gap);
        std::vector<WorkerEvent> events = {make(a, 1, 1), make(b, 0, 1 + gap)};
        auto v = judge(events, kSettle);
        // The job fails exactly when some worker failed.
        ASSERT_EQ(v.has_value(), is_failure(a) || is_failure(b));
        if (!v) continue;
        const Failure& f = v->failure;
        EXPECT_NE(f.code(), 0);
        // An exit 0 not caused by the launcher is flagged, before or after the failure.
        EXPECT_EQ(!f.early_exits.empty(), a == kZero || b == kZero);
        // A stop before a failure is the root cause.
        if (a == kStop) {
          EXPECT_EQ(f.root.rank, 1);
          EXPECT_EQ(f.root.kind, Kind::kStopped);
          EXPECT_EQ(f.then->rank, 0);
        }
        // A primary failure first is the root cause; a first secondary yields to a primary
        // within the settle window only.
        if (is_failure(a) && a != kComm) {
          EXPECT_EQ(f.root.rank, 1);
        }
        if (a == kComm && is_failure(b) && b != kComm) {
          EXPECT_EQ(f.root.rank, gap <= kSettle ? 0 : 1);
        }
        if (a == kComm && !(is_failure(b) && b != kComm)) {
          EXPECT_EQ(f.root.rank, 1);
        }
        if (a == kZero) {
          EXPECT_EQ(f.root.rank, 0);
        }
      }
    }
  }
}

std::string joined(const std::vector<std::string>& lines) {
  std::string all;
  for (const auto& l : lines) all += l + "\n";
  return all;
}

TEST(Summary, EarlyExitThenFailure) {
  auto v = judge({exit0(1, 1), comm(0, 2)}, kSettle);
  ASSERT_TRUE(v);
  auto text = joined(summary_lines(v->failure, {comm(0, 2), exit0(1, 1)}, 0));
  EXPECT_EQ(text,
            "first failure: rank 0 (local rank 0, node 0) on host h0, pid 1000\n"
            "  exit:  exit code 1\n"
            "  error: lockstep::CommError: Connection reset by peer\n"
            "  suspicious: rank 1 exited 0 while its peers were still running; rank 0 then "
            "failed: lockstep::CommError: Connection reset by peer\n"
            "  hint:  every rank must run the same collectives in the same order; a rank that "
            "finishes early (one step fewer, an evaluation on one rank only) makes its peers "
            "fail\n"
            "  rank 1 (pid 1001): exit code 0\n");
}

TEST(Summary, StoppedWorkerIsTheRootCause) {
  auto stop = stopped(1, 1);
  auto v = judge({stop, timeout(0, 4)}, kSettle);
  ASSERT_TRUE(v);
  auto end1 = requested(killed(1, 5, SIGTERM));
  auto text = joined(summary_lines(v->failure, {timeout(0, 4), end1}, 0));
  EXPECT_EQ(text,
            "first failure: rank 1 (local rank 1, node 0) on host h0, pid 1001\n"
            "  exit:  stopped by SIGSTOP (exit code 147): it stopped running while its peers "
            "waited for it\n"
            "  then:  rank 0 (node 0, pid 1000) failed: lockstep::TimeoutError: allreduce timed "
            "out\n"
            "  rank 0 (pid 1000): exit code 1: lockstep::TimeoutError: allreduce timed out\n");
}

TEST(Summary, NoErrorFileAndSeveralEarlyExits) {
  auto crash = killed(0, 3, SIGSEGV);
  crash.last_stderr = "Segmentation fault in step 7";
  auto v = judge({exit0(1, 1), exit0(2, 2), crash}, kSettle);
  ASSERT_TRUE(v);
  auto lines = summary_lines(v->failure, {}, 0);
  ASSERT_GE(lines.size(), 5u);
  EXPECT_EQ(lines[1], "  exit:  killed by SIGSEGV (exit code 139)");
  EXPECT_EQ(lines[2], "  error: (none reported: the worker wrote no LOCKSTEP_ERROR_FILE; wrap its "
                      "main in lockstep::run_main)");
  EXPECT_EQ(lines[3], "  last stderr line: Segmentation fault in step 7");
  EXPECT_EQ(lines[4], "  suspicious: ranks 1, 2 exited 0 while their peers were still running; "
                      "rank 0 then failed: Segmentation fault in step 7");
}

TEST(Summary, LauncherLevelFailure) {
  Failure f;
  f.root.kind = Kind::kKilled;
  f.root.signal = SIGTERM;
  f.what = "node 1's launcher (h1, pid 7) received SIGTERM";
  EXPECT_EQ(f.code(), 143);
  auto lines = summary_lines(f, {requested(killed(0, 1, SIGTERM))}, 0);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0], "first failure: node 1's launcher (h1, pid 7) received SIGTERM");
  EXPECT_EQ(lines[1], "  rank 0 (pid 1000): killed by SIGTERM (exit code 143) (stopped by the "
                      "launcher)");
}

// A node adds its own early exits to a record another node published without them.
TEST(Summary, AddEarlyExitsFromThisNode) {
  auto v = judge({comm(0, 2)}, kSettle);
  ASSERT_TRUE(v);
  Failure f = v->failure;
  lockstep::run::add_early_exits(f,
                                 {exit0(2, 1, 1), exit0(3, 2.5, 1), exit0(6, 3.5, 1),
                                  requested(exit0(4, 1, 1)), fail(5, 1, 2, "", "", 1)},
                                 kSettle);
  ASSERT_EQ(f.early_exits.size(), 2u);
  EXPECT_EQ(f.early_exits[0].rank, 2);
  EXPECT_EQ(f.early_exits[1].rank, 3) << "within the settle window of the failure at 2";
  lockstep::run::add_early_exits(f, {exit0(2, 1, 1)}, kSettle);
  EXPECT_EQ(f.early_exits.size(), 2u) << "listed once";
}

TEST(Json, FailureRoundTrips) {
  auto v = judge({exit0(2, 0.5, 1), stopped(1, 1), timeout(0, 4)}, kSettle);
  ASSERT_TRUE(v);
  Failure f = lockstep::run::failure_from_json(lockstep::run::to_json(v->failure));
  EXPECT_EQ(f.root.rank, 1);
  EXPECT_EQ(f.root.kind, Kind::kStopped);
  EXPECT_EQ(f.root.signal, SIGSTOP);
  EXPECT_EQ(f.root.host, "h0");
  ASSERT_TRUE(f.then);
  EXPECT_EQ(f.then->type, "lockstep::TimeoutError");
  EXPECT_DOUBLE_EQ(f.then->time, 4);
  ASSERT_EQ(f.early_exits.size(), 1u);
  EXPECT_EQ(f.early_exits[0].node, 1);
  EXPECT_EQ(summary_lines(f, {}, 0), summary_lines(v->failure, {}, 0));
  EXPECT_ANY_THROW(lockstep::run::failure_from_json(nlohmann::json::parse("{\"what\": 1}")));
  EXPECT_ANY_THROW(lockstep::run::event_from_json(nlohmann::json::parse("{\"kind\": \"eaten\"}")));
}

}  // namespace
