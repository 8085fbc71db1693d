// Ranks as real processes: peer death, unreachable master, busy port, world-size disagreement
// and duplicate ranks each fail with a clear message, within a bound the test asserts.
#include <execinfo.h>
#include <gtest/gtest.h>

#include <arpa/inet.h>

#include <csignal>
#include <cstdio>
#include <random>
#include <regex>

#include "support/no_leaks.h"
#include "support/process.h"

using namespace lockstep_test;
using std::chrono::seconds;
using Clock = std::chrono::steady_clock;

double secs(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

namespace {

// A crash of the harness itself (seen once on a foreign toolchain) prints its stack to stderr.
void print_stack_and_reraise(int sig) {
  void* frames[64];
  int n = backtrace(frames, 64);
  backtrace_symbols_fd(frames, n, 2);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}
const bool kStackOnCrash = [] {
  std::signal(SIGSEGV, print_stack_and_reraise);
  std::signal(SIGBUS, print_stack_and_reraise);
  return true;
}();

std::map<std::string, std::string> rank_env(int rank, int world, int port) {
  return {{"RANK", std::to_string(rank)},
          {"WORLD_SIZE", std::to_string(world)},
          {"MASTER_ADDR", "127.0.0.1"},
          {"MASTER_PORT", std::to_string(port)},
          {"LOCKSTEP_LOG_LEVEL", "warn"},
          {"LOCKSTEP_RENDEZVOUS_TIMEOUT", "10"},
          {"LOCKSTEP_TIMEOUT", "10"},
          {"OMP_NUM_THREADS", "1"}};
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

TEST(ProcessFaults, KilledPeerFailsTheOthersWithinTheBound) {
  TempDir dir;
  int port = free_port();
  std::vector<Child> ranks;
  for (int r = 0; r < 3; ++r) {
    ranks.push_back(spawn({LOCKSTEP_RANK_WORKER, "loop", "1000000000"}, rank_env(r, 3, port), dir,
                          "rank" + std::to_string(r)));
  }
  for (auto& c : ranks) {
    ASSERT_TRUE(eventually([&] { return contains(c.out(), "ready"); }, seconds(60)))
        << "a rank never got through its first all-reduce; stderr: " << c.err();
  }
  kill(ranks[1].pid, SIGKILL);
  auto killed_at = Clock::now();
  for (int r : {0, 2}) {
    ASSERT_TRUE(wait_for(ranks[r], seconds(30)))
        << "rank " << r << " still running 30 s after its peer was killed";
    EXPECT_EQ(ranks[r].exit_code(), 3) << ranks[r].err();
    auto err = ranks[r].err();
    EXPECT_TRUE(contains(err, "ERROR CommError") || contains(err, "ERROR TimeoutError")) << err;
    EXPECT_TRUE(contains(err, "allreduce #")) << "the failing operation is not named: " << err;
    EXPECT_TRUE(contains(err, "[rank " + std::to_string(r) + "/3]")) << err;
  }
  // Bound: the collective timeout (10 s) plus slack; a closed socket is usually seen at once.
  const double took = secs(Clock::now() - killed_at);
  report_bound("kill -9 of 1 of 3 ranks (shared memory): the survivors fail", took, 15);
  EXPECT_LT(took, 15.0);
  for (auto& c : ranks) reap(c);
}

TEST(ProcessFaults, UnreachableMasterFailsWithinTheRendezvousTimeout) {
  TempDir dir;
  int port = free_port();  // nobody listens here
  auto env = rank_env(1, 2, port);
  env["LOCKSTEP_RENDEZVOUS_TIMEOUT"] = "2";
  auto start = Clock::now();
  auto child = spawn({LOCKSTEP_RANK_WORKER, "loop", "1"}, env, dir, "rank1");
  ASSERT_TRUE(wait_for(child, seconds(20))) << "still waiting for an unreachable master";
  const double took = secs(Clock::now() - start);
  report_bound("unreachable master (rendezvous timeout 2 s)", took, 12);
  EXPECT_LT(took, 12.0);
  EXPECT_EQ(child.exit_code(), 3);
  EXPECT_TRUE(contains(child.err(), "ERROR TimeoutError")) << child.err();
  EXPECT_TRUE(contains(child.err(), "127.0.0.1:" + std::to_string(port))) << child.err();
}

TEST(ProcessFaults, BusyPortIsReported) {
  TempDir dir;
  int port = 0;
  int fd = listen_on_ephemeral(&port);
  auto child = spawn({LOCKSTEP_RANK_WORKER, "loop", "1"}, rank_env(0, 2, port), dir, "rank0");
  ASSERT_TRUE(wait_for(child, seconds(20)));
  close(fd);
  EXPECT_EQ(child.exit_code(), 3);
  EXPECT_TRUE(contains(child.err(), "in use")) << child.err();
  EXPECT_TRUE(contains(child.err(), std::to_string(port))) << child.err();
}

TEST(ProcessFaults, WorldSizeDisagreementIsNamedOnEveryRank) {
  TempDir dir;
  int port = free_port();
  auto r0 = spawn({LOCKSTEP_RANK_WORKER, "loop", "1"}, rank_env(0, 2, port), dir, "rank0");
  auto r1 = spawn({LOCKSTEP_RANK_WORKER, "loop", "1"}, rank_env(1, 3, port), dir, "rank1");
  for (Child* c : {&r0, &r1}) {
    ASSERT_TRUE(wait_for(*c, seconds(20))) << c->err();
    EXPECT_EQ(c->exit_code(), 3);
    EXPECT_TRUE(contains(c->err(), "world sizes disagree")) << c->err();
  }
}

TEST(ProcessFaults, DuplicateRankIsNamed) {
  TempDir dir;
  int port = free_port();
  // Rank 0 and the first rank 1 keep the job (and rank 0's store) alive, so the second
  // claimant of rank 1 always reaches the store and must fail naming the claimed rank.
  auto r0 = spawn({LOCKSTEP_RANK_WORKER, "loop", "1000000000"}, rank_env(0, 2, port), dir, "rank0");
  auto a = spawn({LOCKSTEP_RANK_WORKER, "loop", "1000000000"}, rank_env(1, 2, port), dir, "rank1a");
  auto b = spawn({LOCKSTEP_RANK_WORKER, "loop", "1000000000"}, rank_env(1, 2, port), dir, "rank1b");
  // One of the two claimants must fail with the duplicate message, within the bound.
  ASSERT_TRUE(eventually([&] { return contains(a.err(), "claimed") || contains(b.err(), "claimed"); },
                         seconds(30)))
      << "rank1a: " << a.err() << "\nrank1b: " << b.err() << "\nrank0: " << r0.err();
  Child& dup = contains(a.err(), "claimed") ? a : b;
  ASSERT_TRUE(wait_for(dup, seconds(10)));
  EXPECT_EQ(dup.exit_code(), 3);
  EXPECT_TRUE(contains(dup.err(), "rank 1 was already claimed")) << dup.err();
  for (Child* c : {&r0, &a, &b}) reap(*c);
}

// Over Gloo a lost peer shows as a socket error ("Connection reset by peer" at some address);
// the survivor's error must still name the dead rank and its pid, the operation and its
// sequence number, and what to do (Note [Naming the peer of a Gloo failure]).
void expect_gloo_death_named(int world, int victim) {
  TempDir dir;
  int port = free_port();
  std::vector<Child> ranks;
  for (int r = 0; r < world; ++r) {
    auto env = rank_env(r, world, port);
    env["LOCKSTEP_TRANSPORT"] = "gloo";
    ranks.push_back(spawn({LOCKSTEP_RANK_WORKER, "loop", "1000000000"}, env, dir,
                          "rank" + std::to_string(r)));
  }
  for (auto& c : ranks) {
    ASSERT_TRUE(eventually([&] { return contains(c.out(), "ready"); }, seconds(60)))
        << "a rank never got through its first all-reduce; stderr: " << c.err();
  }
  kill(ranks[victim].pid, SIGKILL);
  auto killed_at = Clock::now();
  ASSERT_TRUE(wait_for(ranks[0], seconds(30))) << "rank 0 still running 30 s after the kill";
  const double took = secs(Clock::now() - killed_at);
  report_bound("kill -9 of rank " + std::to_string(victim) + " of " + std::to_string(world) +
                   " (Gloo): rank 0 fails naming it",
               took, 5);
  EXPECT_LT(took, 5.0) << ranks[0].err();
  auto err = ranks[0].err();
  EXPECT_EQ(ranks[0].exit_code(), 3) << err;
  EXPECT_TRUE(contains(err, "ERROR CommError")) << err;
  EXPECT_TRUE(contains(err, "[rank 0/" + std::to_string(world) + "] allreduce #")) << err;
  EXPECT_TRUE(contains(err, "rank " + std::to_string(victim) + " (pid " +
                                std::to_string(ranks[victim].pid) + " on "))
      << "the dead rank is not named: " << err;
  EXPECT_TRUE(contains(err, "died while its peers waited for it")) << err;
  EXPECT_TRUE(contains(err, "Check rank " + std::to_string(victim) + "'s log")) << err;
  EXPECT_TRUE(contains(err, "restart the job")) << err;
  for (auto& c : ranks) reap(c);
}

// Note [Naming a lost peer on another host] in lib/src/comm/gloo_group.cpp: ranks 1 and 2
// run on "another host" (a UTS namespace with its own hostname, so lockstep cannot check their
// processes from rank 0). Rank 2 is killed; rank 1 (beside it) names it as dead, and rank 0
// names it as the remote rank that did not report the failure.
TEST(ProcessFaults, GlooErrorNamesALostPeerOnAnotherHost) {
  if (geteuid() != 0 || access("/usr/bin/unshare", X_OK) != 0) {
    GTEST_SKIP() << "needs root and /usr/bin/unshare to give ranks another host name";
  }
  TempDir dir;
  int port = free_port();
  std::vector<Child> ranks;
  for (int r = 0; r < 3; ++r) {
    auto env = rank_env(r, 3, port);
    env["LOCKSTEP_TRANSPORT"] = "gloo";
    std::vector<std::string> argv = {LOCKSTEP_RANK_WORKER, "loop", "1000000000"};
    if (r > 0) {
      argv = {"/usr/bin/unshare", "--uts", "/bin/sh", "-c",
              "hostname lockstep-hostb && exec \"$0\" loop 1000000000", LOCKSTEP_RANK_WORKER};
    }
    ranks.push_back(spawn(argv, env, dir, "rank" + std::to_string(r)));
  }
  for (auto& c : ranks) {
    ASSERT_TRUE(eventually([&] { return contains(c.out(), "ready"); }, seconds(60)))
        << "a rank never got through its first all-reduce; stderr: " << c.err();
  }
  kill(ranks[2].pid, SIGKILL);
  const auto killed_at = Clock::now();
  ASSERT_TRUE(wait_for(ranks[0], seconds(30))) << "rank 0 still running 30 s after the kill";
  ASSERT_TRUE(wait_for(ranks[1], seconds(30))) << "rank 1 still running 30 s after the kill";
  const double took = secs(Clock::now() - killed_at);
  report_bound("kill -9 of a rank on another host (Gloo): rank 0 names it", took, 5);
  EXPECT_LT(took, 5.0);
  const std::string pid = std::to_string(ranks[2].pid);
  EXPECT_TRUE(contains(ranks[1].err(), "rank 2 (pid " + pid + " on lockstep-hostb) died"))
      << ranks[1].err();
  const auto err0 = ranks[0].err();
  EXPECT_EQ(ranks[0].exit_code(), 3) << err0;
  EXPECT_TRUE(contains(err0, "the other remote ranks reported the failure within 1 s while "
                             "rank 2 (pid " + pid + " on lockstep-hostb) did not"))
      << err0;
  EXPECT_TRUE(contains(err0, "Check rank 2's log and host")) << err0;
  for (auto& c : ranks) reap(c);
}

TEST(ProcessFaults, GlooErrorNamesTheKilledPeer) { expect_gloo_death_named(2, 1); }

TEST(ProcessFaults, GlooErrorNamesTheKilledPeerOfThree) { expect_gloo_death_named(3, 2); }

// A stopped peer (SIGSTOP, Ctrl-Z, a debugger) on the same host is named as such in the
// timeout, on Gloo and on shared memory, within the collective timeout plus slack.
void expect_stopped_peer_named(const std::string& transport) {
  TempDir dir;
  int port = free_port();
  std::vector<Child> ranks;
  for (int r = 0; r < 2; ++r) {
    auto env = rank_env(r, 2, port);
    env["LOCKSTEP_TRANSPORT"] = transport;
    env["LOCKSTEP_TIMEOUT"] = "3";
    ranks.push_back(spawn({LOCKSTEP_RANK_WORKER, "loop", "1000000000"}, env, dir,
                          "rank" + std::to_string(r)));
  }
  for (auto& c : ranks) {
    ASSERT_TRUE(eventually([&] { return contains(c.out(), "ready"); }, seconds(60)))
        << "a rank never got through its first all-reduce; stderr: " << c.err();
  }
  kill(ranks[1].pid, SIGSTOP);
  auto stopped_at = Clock::now();
  ASSERT_TRUE(wait_for(ranks[0], seconds(30))) << "rank 0 still running 30 s after the stop";
  // Bound: the collective timeout (3 s) plus slack.
  const double took = secs(Clock::now() - stopped_at);
  report_bound("SIGSTOP of rank 1 (" + transport + ", timeout 3 s): rank 0 names it", took, 8);
  EXPECT_LT(took, 8.0) << ranks[0].err();
  auto err = ranks[0].err();
  EXPECT_EQ(ranks[0].exit_code(), 3) << err;
  EXPECT_TRUE(contains(err, "ERROR TimeoutError")) << err;
  EXPECT_TRUE(contains(err, "allreduce #")) << err;
  EXPECT_TRUE(contains(err, "rank 1 (pid " + std::to_string(ranks[1].pid) + ")")) << err;
  EXPECT_TRUE(contains(err, "stopped (SIGSTOP, Ctrl-Z or a debugger)")) << err;
  EXPECT_TRUE(contains(err, "SIGCONT")) << err;
  kill(ranks[1].pid, SIGKILL);
  for (auto& c : ranks) reap(c);
}

TEST(ProcessFaults, GlooTimeoutNamesTheStoppedPeer) { expect_stopped_peer_named("gloo"); }

TEST(ProcessFaults, SharedMemoryTimeoutNamesTheStoppedPeer) { expect_stopped_peer_named("shm"); }

// The load case: a rank slowed down (here by a pause before each all-reduce, as a loaded
// machine would) but within the collective timeout is waited for, never failed: the job ends
// with exit 0 and correct sums on every rank.
TEST(ProcessFaults, SlowRankWithinTheTimeoutIsWaitedFor) {
  TempDir dir;
  int port = free_port();
  std::vector<Child> ranks;
  for (int r = 0; r < 2; ++r) {
    auto env = rank_env(r, 2, port);
    env["LOCKSTEP_TIMEOUT"] = "3";
    ranks.push_back(spawn({LOCKSTEP_RANK_WORKER, "slow", "4", "1500"}, env, dir,
                          "rank" + std::to_string(r)));
  }
  for (auto& c : ranks) {
    ASSERT_TRUE(wait_for(c, seconds(60))) << "a rank still runs after 60 s";
  }
  for (auto& c : ranks) {
    EXPECT_EQ(c.exit_code(), 0) << c.err();
    EXPECT_TRUE(contains(c.out(), "done 4")) << c.out() << c.err();
    EXPECT_FALSE(contains(c.err(), "ERROR")) << c.err();
  }
}

// The TCP ports process `pid` listens on, from `ss` (iproute2).
std::vector<int> listening_ports(pid_t pid) {
  std::vector<int> ports;
  FILE* p = popen("ss -ltnpH 2>/dev/null", "r");
  if (!p) return ports;
  char line[1024];
  const std::regex port_re(R"(:(\d+)\s)");
  const std::string owner = "pid=" + std::to_string(pid) + ",";
  while (fgets(line, sizeof(line), p)) {
    std::string l = line;
    if (l.find(owner) == std::string::npos) continue;
    // "LISTEN 0 128 127.0.0.1:41234 0.0.0.0:* users:(...)": the local address's port.
    std::smatch m;
    if (std::regex_search(l, m, port_re)) ports.push_back(std::stoi(m[1]));
  }
  pclose(p);
  return ports;
}

// Connects to 127.0.0.1:port and writes `bytes` (may be empty); returns the socket (or -1).
int connect_and_send(int port, const std::string& bytes) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  if (!bytes.empty()) (void)!send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
  return fd;
}

// Note [A stranger on Gloo's data plane]
// Gloo's own connections cannot be authenticated without TLS (docs/reliability.md). What
// lockstep promises is that a stranger connecting to a rank's Gloo port mid-job fails closed:
// the job either finishes with correct sums or fails with a clear error within the collective
// timeout, never with wrong gradients and never hanging. The stranger here connects to every
// port each rank listens on (the store's excepted), three ways: garbage, a plausible
// 8-byte sequence number followed by garbage, and a silent connection held open.
TEST(ProcessFaults, StrangerOnTheGlooDataPlaneFailsClosed) {
  TempDir dir;
  int port = free_port();
  const std::string stop = dir.path + "/stop";
  std::vector<Child> ranks;
  struct Reaper {  // no rank outlives a failed assertion
    std::vector<Child>& v;
    ~Reaper() {
      for (auto& c : v) reap(c);
    }
  } reaper{ranks};
  for (int r = 0; r < 2; ++r) {
    auto env = rank_env(r, 2, port);
    env["LOCKSTEP_TRANSPORT"] = "gloo";
    env["LOCKSTEP_TIMEOUT"] = "5";
    ranks.push_back(spawn({LOCKSTEP_RANK_WORKER, "until", stop}, env, dir,
                          "rank" + std::to_string(r)));
  }
  for (auto& c : ranks) {
    ASSERT_TRUE(eventually([&] { return contains(c.out(), "ready"); }, seconds(60)))
        << "a rank never got through its first all-reduce; stderr: " << c.err();
  }
  std::mt19937 rng(7);
  std::string garbage(4096, '\0');
  for (auto& ch : garbage) ch = static_cast<char>(rng());
  std::vector<int> held;
  int attacked = 0;
  for (auto& c : ranks) {
    for (int p : listening_ports(c.pid)) {
      if (p == port) continue;
      ++attacked;
      int a = connect_and_send(p, garbage);
      if (a >= 0) close(a);
      std::string seq(8, '\0');  // sequence number 0, then garbage
      int b = connect_and_send(p, seq + garbage);
      if (b >= 0) close(b);
      int h = connect_and_send(p, "");
      if (h >= 0) held.push_back(h);
    }
  }
  // Gloo in LibTorch 1.13 listens per pair only while the mesh connects, so mid-job no rank
  // listens on anything but the store (rank 0): nothing to attack. Later Gloo keeps one
  // listener per device open, and the attack runs.
  ::testing::Test::RecordProperty("gloo_ports_attacked", attacked);
  if (attacked == 0) {
    EXPECT_EQ(listening_ports(ranks[1].pid).size(), 0u)
        << "rank 1 listens on a port that the stranger did not try";
  }
  { std::ofstream(stop) << "stop"; }
  auto stop_at = Clock::now();
  for (auto& c : ranks) {
    ASSERT_TRUE(wait_for(c, seconds(30))) << "a rank still runs 30 s after the stop file";
  }
  // Bound: the collective timeout (5 s) plus slack.
  const double took = secs(Clock::now() - stop_at);
  report_bound("stranger on Gloo's data plane: the job ends", took, 10);
  EXPECT_LT(took, 10.0);
  for (auto& c : ranks) {
    auto err = c.err();
    EXPECT_FALSE(contains(err, "WrongSum")) << err;
    if (c.exit_code() == 0) {
      EXPECT_TRUE(contains(c.out(), "done")) << c.out();
    } else {
      EXPECT_EQ(c.exit_code(), 3) << err;
      EXPECT_TRUE(contains(err, "ERROR CommError") || contains(err, "ERROR TimeoutError")) << err;
    }
  }
  for (int h : held) close(h);
}

}  // namespace
