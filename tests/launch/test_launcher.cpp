// lockstep-run end to end: real launchers and workers, bounded time, no sleeps to synchronise
// (the tests poll the launchers' output and /proc with deadlines).
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "lockstep/errors.h"
#include "lockstep/store.h"
#include "support/no_leaks.h"
#include "support/process.h"

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;
using Seconds = std::chrono::duration<double>;
using Env = std::map<std::string, std::string>;
using lockstep_test::free_port;
using lockstep_test::report_bound;
using lockstep_test::TempDir;

const std::string kRun = LOCKSTEP_RUN_PATH;
const std::string kWorker = LOCKSTEP_WORKER_PATH;
const std::string kSmoke = LOCKSTEP_SMOKE_PATH;

// A child process with its stdout and stderr captured.
class Proc {
 public:
  Proc(const std::vector<std::string>& argv, const Env& extra = {}) {
    Env env;
    for (char** e = environ; *e; ++e) {
      std::string s(*e);
      auto eq = s.find('=');
      if (eq != std::string::npos) env[s.substr(0, eq)] = s.substr(eq + 1);
    }
    for (const auto& [k, v] : extra) env[k] = v;
    std::vector<std::string> env_strings;
    for (const auto& [k, v] : env) env_strings.push_back(k + "=" + v);
    std::vector<char*> envp, args;
    for (auto& s : env_strings) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::vector<std::string> argv_copy = argv;
    for (auto& s : argv_copy) args.push_back(s.data());
    args.push_back(nullptr);
    int out[2], err[2];
    EXPECT_EQ(pipe2(out, O_CLOEXEC), 0);
    EXPECT_EQ(pipe2(err, O_CLOEXEC), 0);
    pid_ = fork();
    if (pid_ == 0) {
      setpgid(0, 0);  // so a failed test can kill whatever is left
      dup2(out[1], 1);
      dup2(err[1], 2);
      execve(args[0], args.data(), envp.data());
      _exit(127);
    }
    setpgid(pid_, pid_);
    close(out[1]);
    close(err[1]);
    fds_[0] = out[0];
    fds_[1] = err[0];
  }
  ~Proc() {
    if (!exited_) {
      killpg(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    for (int fd : fds_) {
      if (fd >= 0) close(fd);
    }
  }

  pid_t pid() const { return pid_; }
  const std::string& out() const { return text_[0]; }
  const std::string& err() const { return text_[1]; }
  std::string all() const { return text_[0] + text_[1]; }

  // Reads what is available, waiting up to `ms`.
  void pump(int ms) {
    pollfd p[2];
    int n = 0;
    int which[2];
    for (int s = 0; s < 2; ++s) {
      if (fds_[s] >= 0) {
        p[n] = {fds_[s], POLLIN, 0};
        which[n++] = s;
      }
    }
    if (n == 0) {
      if (ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(std::min(ms, 20)));
      return;
    }
    if (poll(p, static_cast<nfds_t>(n), ms) <= 0) return;
    for (int i = 0; i < n; ++i) {
      if (!p[i].revents) continue;
      char buf[65536];
      ssize_t got = read(p[i].fd, buf, sizeof(buf));
      if (got > 0) {
        text_[which[i]].append(buf, static_cast<size_t>(got));
      } else {
        close(fds_[which[i]]);
        fds_[which[i]] = -1;
      }
    }
  }

  // Pumps until `done()` or `limit` passes; returns whether done.
  bool until(const std::function<bool()>& done, Seconds limit) {
    auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(limit);
    while (!done()) {
      if (Clock::now() >= deadline) return false;
      pump(50);
      poll_exit();
    }
    return true;
  }
  bool wait_output(const std::string& needle, Seconds limit) {
    return until([&] { return all().find(needle) != std::string::npos; }, limit);
  }
  // Waits for exit and end of output; returns the exit code (128 + signal when killed), or
  // -1 after killing it when `limit` passed.
  int wait(Seconds limit) {
    if (!until([&] { return exited_ && fds_[0] < 0 && fds_[1] < 0; }, limit)) {
      killpg(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
      exited_ = true;
      return -1;
    }
    return WIFEXITED(status_) ? WEXITSTATUS(status_) : 128 + WTERMSIG(status_);
  }

 private:
  void poll_exit() {
    if (!exited_ && waitpid(pid_, &status_, WNOHANG) == pid_) exited_ = true;
  }
  pid_t pid_ = -1;
  int fds_[2] = {-1, -1};
  std::string text_[2];
  bool exited_ = false;
  int status_ = 0;
};

std::vector<std::string> launcher(const std::string& flags, const std::vector<std::string>& prog) {
  std::vector<std::string> argv = {kRun};
  std::stringstream ss(flags);
  for (std::string w; ss >> w;) argv.push_back(w);
  argv.push_back("--");
  argv.insert(argv.end(), prog.begin(), prog.end());
  return argv;
}

// Worker pids by rank, from their "ready rank=R pid=P restart=K" lines.
std::map<int, pid_t> ready_pids(const std::string& text, int restart = 0) {
  std::map<int, pid_t> pids;
  std::regex re("ready rank=(\\d+) pid=(\\d+) restart=(\\d+)");
  for (std::sregex_iterator it(text.begin(), text.end(), re), end; it != end; ++it) {
    if (std::stoi((*it)[3]) == restart) pids[std::stoi((*it)[1])] = std::stoi((*it)[2]);
  }
  return pids;
}

bool alive(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  if (!stat) return false;
  std::string line;
  std::getline(stat, line);
  auto close_paren = line.rfind(')');
  return close_paren != std::string::npos && close_paren + 2 < line.size() &&
         line[close_paren + 2] != 'Z';
}

// True when none of `pids` is alive within `limit` (exited processes are reaped by init).
bool all_gone(const std::map<int, pid_t>& pids, Seconds limit) {
  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(limit);
  while (true) {
    bool any = false;
    for (auto [rank, pid] : pids) any |= alive(pid);
    if (!any) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

size_t count(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

double since(Clock::time_point t) { return Seconds(Clock::now() - t).count(); }

// Worker start-up loads LibTorch (seconds on a loaded machine): bounds are generous, but
// every one is asserted.
constexpr double kJobBound = 120;

const Env kQuietLogs = {{"LOCKSTEP_LOG_LEVEL", "warn"}};
// The launchers of a multi-node job share a job token (Note [Job token] in apps/run/rounds.cpp).
const Env kNodesEnv = {{"LOCKSTEP_LOG_LEVEL", "warn"},
                       {"LOCKSTEP_STORE_TOKEN", std::string(64, 'a')}};

TEST(Launcher, TwoAndFourRankJobsCompleteWithTheRightEnvironment) {
  for (int n : {2, 4}) {
    SCOPED_TRACE(n);
    auto start = Clock::now();
    Proc p(launcher("--standalone --grace-period 2 --nproc-per-node " + std::to_string(n),
                    {kWorker, "--mode", "ok"}),
           kQuietLogs);
    ASSERT_EQ(p.wait(Seconds(kJobBound)), 0) << p.all();
    EXPECT_LT(since(start), kJobBound);
    std::string port;
    for (int r = 0; r < n; ++r) {
      SCOPED_TRACE(r);
      std::smatch m;
      std::regex env_re("\\[rank " + std::to_string(r) + "\\] env RANK=" + std::to_string(r) +
                        " LOCAL_RANK=" + std::to_string(r) + " WORLD_SIZE=" + std::to_string(n) +
                        " LOCAL_WORLD_SIZE=" + std::to_string(n) +
                        " GROUP_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=(\\d+) "
                        "OMP_NUM_THREADS=1 LOCKSTEP_ERROR_FILE=\\S+/attempt_0/rank_" +
                        std::to_string(r) + "/error.json LOCKSTEP_STDOUT_TTY=0\n");
      ASSERT_TRUE(std::regex_search(p.out(), m, env_re)) << p.out();
      if (port.empty()) port = m[1];
      EXPECT_EQ(m[1], port) << "every rank must get the same store port";
      EXPECT_NE(p.out().find("[rank " + std::to_string(r) + "] resolved rank=" +
                             std::to_string(r) + " world=" + std::to_string(n) + " local_rank=" +
                             std::to_string(r) + " local_world=" + std::to_string(n) +
                             " node=0 launcher=lockstep-run agent_store=1 restart=0 job=none"),
                std::string::npos)
          << p.out();
      EXPECT_NE(p.out().find("[rank " + std::to_string(r) + "] done rank=" + std::to_string(r)),
                std::string::npos);
      // stdout and stderr stay apart, each line prefixed with its rank.
      EXPECT_NE(p.err().find("[rank " + std::to_string(r) + "] stderr line from rank " +
                             std::to_string(r) + "\n"),
                std::string::npos)
          << p.err();
      EXPECT_EQ(p.out().find("stderr line"), std::string::npos);
      // '\r' ends a line (the launcher's stdout here is a pipe: each redraw its own line).
      const std::string rs = std::to_string(r);
      EXPECT_NE(p.out().find("[rank " + rs + "] redraw 1 of rank " + rs + "\n[rank " + rs +
                             "] redraw 2 of rank " + rs + "\n"),
                std::string::npos)
          << p.out();
    }
    EXPECT_NE(p.err().find("all " + std::to_string(n) + " worker(s) exited 0"), std::string::npos);
  }
}

TEST(Launcher, RunsTheSmokeWorker) {
  Proc p(launcher("--standalone --nproc-per-node 2", {kSmoke}), kQuietLogs);
  ASSERT_EQ(p.wait(Seconds(kJobBound)), 0) << p.all();
  EXPECT_NE(p.out().find("[rank 0] [rank 0/2] all-reduce ok"), std::string::npos) << p.out();
  EXPECT_NE(p.out().find("[rank 1] [rank 1/2] all-reduce ok"), std::string::npos) << p.out();
}

TEST(Launcher, KillNineOfOneWorkerFailsFastAndLeavesNoWorker) {
  Proc p(launcher("--standalone --grace-period 2 --nproc-per-node 2", {kWorker, "--mode", "loop"}),
         kQuietLogs);
  ASSERT_TRUE(p.until([&] { return ready_pids(p.out()).size() == 2; }, Seconds(kJobBound)))
      << p.all();
  auto pids = ready_pids(p.out());
  auto killed_at = Clock::now();
  ASSERT_EQ(kill(pids[1], SIGKILL), 0);
  int code = p.wait(Seconds(30));
  double took = since(killed_at);
  EXPECT_EQ(code, 128 + SIGKILL) << p.all();
  report_bound("kill -9 of a worker: the launcher fails the job", took, 10);
  EXPECT_LT(took, 10.0) << "the launcher must fail fast after a worker dies";
  EXPECT_NE(p.err().find("first failure: rank 1 (local rank 1, node 0) on host "), std::string::npos)
      << p.err();
  EXPECT_NE(p.err().find("pid " + std::to_string(pids[1])), std::string::npos);
  EXPECT_NE(p.err().find("exit:  killed by SIGKILL (exit code 137)"), std::string::npos) << p.err();
  EXPECT_TRUE(all_gone(pids, Seconds(5))) << "a worker outlived the launcher";
}

// The stopped worker is the root cause, though its peer's timeout ends the round (Note [Root
// cause]): the summary names rank 1, not rank 0, and the exit code says "stopped".
TEST(Launcher, StoppedWorkerIsTheRootCauseOfItsPeersTimeout) {
  Env env = kQuietLogs;
  env["LOCKSTEP_TIMEOUT"] = "3";
  Proc p(launcher("--standalone --grace-period 1 --nproc-per-node 2", {kWorker, "--mode", "loop"}),
         env);
  ASSERT_TRUE(p.until([&] { return ready_pids(p.out()).size() == 2; }, Seconds(kJobBound)))
      << p.all();
  auto pids = ready_pids(p.out());
  auto stopped_at = Clock::now();
  ASSERT_EQ(kill(pids[1], SIGSTOP), 0);
  int code = p.wait(Seconds(60));
  double took = since(stopped_at);
  EXPECT_EQ(code, 128 + SIGSTOP) << p.all();
  report_bound("SIGSTOP of a worker (timeout 3 s): the launcher names it", took, 20);
  EXPECT_LT(took, 20.0) << p.all();
  EXPECT_NE(p.err().find("rank 1 (pid " + std::to_string(pids[1]) + ") was stopped by SIGSTOP"),
            std::string::npos)
      << p.err();
  EXPECT_NE(p.err().find("first failure: rank 1 (local rank 1, node 0) on host "),
            std::string::npos)
      << p.err();
  EXPECT_NE(p.err().find("exit:  stopped by SIGSTOP (exit code 147): it stopped running while "
                         "its peers waited for it"),
            std::string::npos)
      << p.err();
  EXPECT_TRUE(std::regex_search(
      p.err(), std::regex("then:  rank 0 \\(node 0, pid " + std::to_string(pids[0]) +
                          "\\) failed: lockstep::TimeoutError: .*allreduce")))
      << p.err();
  EXPECT_EQ(p.err().find("first failure: rank 0"), std::string::npos) << p.err();
  EXPECT_NE(p.err().find("giving up after 1 attempt(s) (--max-restarts 0); exit code 147"),
            std::string::npos);
  EXPECT_TRUE(all_gone(pids, Seconds(5))) << "the stopped worker outlived the launcher";
}

// Issue: rank 1 exits 0 early, rank 0 then fails in its collective. The job failed: rank 0's
// error is the failure, rank 1 is flagged, the exit code is rank 0's.
TEST(Launcher, EarlyExitZeroThenAPeerFailureFailsTheJob) {
  Env env = kQuietLogs;
  env["LOCKSTEP_TIMEOUT"] = "10";
  auto start = Clock::now();
  Proc p(launcher("--standalone --grace-period 2 --nproc-per-node 2",
                  {kWorker, "--mode", "exit", "--fail-rank", "1", "--code", "0"}),
         env);
  EXPECT_EQ(p.wait(Seconds(kJobBound)), 1) << p.all();
  EXPECT_LT(since(start), kJobBound);
  EXPECT_EQ(p.err().find("exited 0 (attempt"), std::string::npos) << p.err();
  EXPECT_NE(p.err().find("first failure: rank 0 (local rank 0, node 0)"), std::string::npos)
      << p.err();
  EXPECT_NE(p.err().find("suspicious: rank 1 exited 0 while its peers were still running; "
                         "rank 0 then failed: lockstep::"),
            std::string::npos)
      << p.err();
  EXPECT_NE(p.err().find("  rank 1 (pid "), std::string::npos) << p.err();
  EXPECT_TRUE(all_gone(ready_pids(p.out()), Seconds(5)));
}

// The opposite order: rank 1 fails first; rank 0, stopped by the launcher or failing after it,
// is not the root cause and nobody is flagged.
TEST(Launcher, FailureFirstIsTheRootCause) {
  Proc p(launcher("--standalone --grace-period 2 --nproc-per-node 2",
                  {kWorker, "--mode", "exit", "--fail-rank", "1", "--code", "3"}),
         kQuietLogs);
  EXPECT_EQ(p.wait(Seconds(kJobBound)), 3) << p.all();
  EXPECT_NE(p.err().find("first failure: rank 1 (local rank 1, node 0)"), std::string::npos)
      << p.err();
  EXPECT_NE(p.err().find("exit:  exit code 3"), std::string::npos) << p.err();
  EXPECT_EQ(p.err().find("suspicious"), std::string::npos) << p.err();
  EXPECT_TRUE(all_gone(ready_pids(p.out()), Seconds(5)));
}

TEST(Launcher, ThrownErrorAppearsInTheSummary) {
  Proc p(launcher("--standalone --grace-period 2 --nproc-per-node 2",
                  {kWorker, "--mode", "throw", "--fail-rank", "1", "--message",
                   "boom: checkpoint shard 3 is corrupt"}),
         kQuietLogs);
  EXPECT_EQ(p.wait(Seconds(kJobBound)), 1) << p.all();
  EXPECT_NE(p.err().find("first failure: rank 1"), std::string::npos) << p.err();
  EXPECT_NE(p.err().find("error: lockstep::StateError: boom: checkpoint shard 3 is corrupt"),
            std::string::npos)
      << p.err();
  EXPECT_NE(p.err().find("giving up after 1 attempt(s)"), std::string::npos);
}

TEST(Launcher, RestartsAfterAFailureAndWorkersSeeTheRestartCount) {
  Proc p(launcher("--standalone --grace-period 2 --max-restarts 1 --nproc-per-node 2",
                  {kWorker, "--mode", "fail-once", "--fail-rank", "1"}),
         kQuietLogs);
  ASSERT_EQ(p.wait(Seconds(2 * kJobBound)), 0) << p.all();
  EXPECT_EQ(ready_pids(p.out(), 0).size(), 2u);
  EXPECT_EQ(ready_pids(p.out(), 1).size(), 2u) << p.out();
  EXPECT_NE(p.out().find("[rank 0] resolved rank=0 world=2 local_rank=0 local_world=2 node=0 "
                         "launcher=lockstep-run agent_store=1 restart=1"),
            std::string::npos);
  EXPECT_NE(p.err().find("restarting every worker: attempt 2 of 2"), std::string::npos);
  EXPECT_EQ(count(p.out(), "done rank="), 2u);
}

TEST(Launcher, AlwaysFailingWorkerGetsExactlyNPlusOneAttempts) {
  Proc p(launcher("--standalone --grace-period 2 --max-restarts 2 --nproc-per-node 2",
                  {kWorker, "--mode", "exit", "--fail-rank", "0", "--code", "7"}),
         kQuietLogs);
  EXPECT_EQ(p.wait(Seconds(3 * kJobBound)), 7) << p.all();
  for (int round = 0; round < 3; ++round) EXPECT_EQ(ready_pids(p.out(), round).size(), 2u);
  EXPECT_EQ(ready_pids(p.out(), 3).size(), 0u);
  EXPECT_EQ(count(p.err(), "attempt 1 of 3 failed"), 1u);
  EXPECT_EQ(count(p.err(), "attempt 3 of 3 failed"), 1u);
  EXPECT_EQ(count(p.err(), " failed ===="), 3u) << p.err();
  EXPECT_NE(p.err().find("giving up after 3 attempt(s) (--max-restarts 2); exit code 7"),
            std::string::npos);
}

TEST(Launcher, SigtermIsForwardedAndTheLauncherExits143) {
  TempDir tmp;
  const std::string& dir = tmp.path;
  Proc p(launcher("--standalone --grace-period 5 --nproc-per-node 2",
                  {kWorker, "--mode", "loop", "--signal-dir", dir}),
         kQuietLogs);
  ASSERT_TRUE(p.until([&] { return ready_pids(p.out()).size() == 2; }, Seconds(kJobBound)))
      << p.all();
  auto pids = ready_pids(p.out());
  auto sent = Clock::now();
  ASSERT_EQ(kill(p.pid(), SIGTERM), 0);
  EXPECT_EQ(p.wait(Seconds(30)), 143) << p.all();
  report_bound("SIGTERM to the launcher: forwarded, exit 143", since(sent), 5);
  EXPECT_LT(since(sent), 5.0) << "workers that exit on SIGTERM need no SIGKILL";
  for (int r = 0; r < 2; ++r) {
    auto marker = dir + "/sigterm_rank_" + std::to_string(r);
    EXPECT_EQ(access(marker.c_str(), F_OK), 0) << "rank " << r << " never saw SIGTERM";
  }
  EXPECT_NE(p.err().find("received SIGTERM: forwarding it to 2 worker(s)"), std::string::npos);
  EXPECT_TRUE(all_gone(pids, Seconds(5)));
}

TEST(Launcher, WorkersDieWithAKilledLauncher) {
  Proc p(launcher("--standalone --nproc-per-node 2", {kWorker, "--mode", "loop"}), kQuietLogs);
  ASSERT_TRUE(p.until([&] { return ready_pids(p.out()).size() == 2; }, Seconds(kJobBound)))
      << p.all();
  auto pids = ready_pids(p.out());
  ASSERT_EQ(kill(p.pid(), SIGKILL), 0);
  EXPECT_EQ(p.wait(Seconds(30)), 128 + SIGKILL);
  EXPECT_TRUE(all_gone(pids, Seconds(5))) << "orphaned workers (parent-death signal)";
}

TEST(Launcher, LogDirHoldsOneFilePerRankAndStream) {
  TempDir tmp;
  const std::string& dir = tmp.path;
  Proc p(launcher("--standalone --run-id logs --log-dir " + dir + " --nproc-per-node 2",
                  {kWorker, "--mode", "ok"}),
         kQuietLogs);
  ASSERT_EQ(p.wait(Seconds(kJobBound)), 0) << p.all();
  for (int r = 0; r < 2; ++r) {
    auto base = dir + "/logs/attempt_0/rank_" + std::to_string(r);
    std::ifstream out(base + "/stdout.log"), err(base + "/stderr.log");
    std::stringstream o, e;
    o << out.rdbuf();
    e << err.rdbuf();
    EXPECT_NE(o.str().find("done rank=" + std::to_string(r)), std::string::npos) << base;
    EXPECT_EQ(o.str().find("[rank"), std::string::npos) << "files hold the worker's own bytes";
    EXPECT_NE(e.str().find("stderr line from rank " + std::to_string(r)), std::string::npos);
  }
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool exists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

// A worker that writes one line to each stream (no LibTorch: these tests are about streams).
const std::vector<std::string> kEcho = {
    "/bin/sh", "-c", "echo out $RANK $ROLE_NAME; echo err $RANK >&2"};

// torchrun's --redirects/--tee: a redirected stream goes to its file only, a teed one to the
// file and the console, any other to the console only; ranks not named keep the console.
TEST(Launcher, RedirectsAndTeeSendEachStreamWhereTorchrunWould) {
  TempDir tmp;
  const std::string& dir = tmp.path;
  Proc p(launcher("--standalone --rdzv-id rt --role trainer --log-dir " + dir +
                      " --nproc-per-node 2 --redirects 0:1 --tee 1:2",
                  kEcho));
  ASSERT_EQ(p.wait(Seconds(30)), 0) << p.all();
  const std::string r0 = dir + "/rt/attempt_0/rank_0/", r1 = dir + "/rt/attempt_0/rank_1/";
  // Rank 0: stdout redirected (file only), stderr on the console only.
  EXPECT_EQ(p.out().find("out 0"), std::string::npos) << p.out();
  EXPECT_EQ(read_text(r0 + "stdout.log"), "out 0 trainer\n");
  EXPECT_NE(p.err().find("[rank 0] err 0\n"), std::string::npos) << p.err();
  EXPECT_FALSE(exists(r0 + "stderr.log"));
  // Rank 1: stderr teed (file and console), stdout on the console only.
  EXPECT_NE(p.err().find("[rank 1] err 1\n"), std::string::npos) << p.err();
  EXPECT_EQ(read_text(r1 + "stderr.log"), "err 1\n");
  EXPECT_NE(p.out().find("[rank 1] out 1 trainer\n"), std::string::npos) << p.out();
  EXPECT_FALSE(exists(r1 + "stdout.log"));
}

TEST(Launcher, RedirectsWithoutALogDirUseANewDirectoryAndSayWhere) {
  Proc p(launcher("--standalone -r 3 --nproc-per-node 1", kEcho));
  ASSERT_EQ(p.wait(Seconds(30)), 0) << p.all();
  std::smatch m;
  ASSERT_TRUE(std::regex_search(p.err(), m, std::regex("worker logs \\(--redirects/--tee\\) go "
                                                       "to (/tmp/lockstep-run-logs-\\w+)/none")))
      << p.err();
  TempDir cleanup;
  cleanup.path = m[1];  // removed at the end of the test
  EXPECT_EQ(read_text(cleanup.path + "/none/attempt_0/rank_0/stdout.log"), "out 0 default\n");
  EXPECT_EQ(read_text(cleanup.path + "/none/attempt_0/rank_0/stderr.log"), "err 0\n");
  EXPECT_EQ(p.out(), "");
  EXPECT_EQ(p.err().find("err 0"), std::string::npos) << p.err();
}

// A job opens with one short "process group ready" line (rank 0's); every rank's details
// (where each value came from, store, transport, LibTorch) only at debug level.
TEST(Launcher, OneShortStartupLinePerJobAndDetailsAtDebug) {
  for (const std::string level : {"info", "debug"}) {
    SCOPED_TRACE(level);
    Proc p(launcher("--standalone --quiet --nproc-per-node 2", {kWorker, "--mode", "ok"}),
           {{"LOCKSTEP_LOG_LEVEL", level}});
    ASSERT_EQ(p.wait(Seconds(kJobBound)), 0) << p.all();
    std::vector<std::string> info, debug;
    std::stringstream lines(p.all());
    for (std::string line; std::getline(lines, line);) {
      if (line.find("process group ready") == std::string::npos) continue;
      (line.find("[debug]") != std::string::npos ? debug : info).push_back(line);
    }
    ASSERT_EQ(info.size(), 1u) << p.all();
    EXPECT_LT(info[0].size(), 120u) << info[0];
    EXPECT_NE(info[0].find("[rank 0] "), std::string::npos) << info[0];
    EXPECT_NE(info[0].find("process group ready: 2 ranks, "), std::string::npos) << info[0];
    EXPECT_NE(info[0].find(", via lockstep-run"), std::string::npos) << info[0];
    EXPECT_EQ(debug.size(), level == "debug" ? 2u : 0u) << p.all();
    for (const auto& line : debug) EXPECT_NE(line.find("rank<-RANK"), std::string::npos) << line;
  }
}

// torchrun's rendezvous flags: the c10d endpoint is where node 0's store listens.
TEST(Launcher, RendezvousEndpointIsWhereTheStoreListens) {
  auto port = std::to_string(free_port());
  Proc p(launcher("--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:" + port +
                      " --rdzv-id ep --no-python --nproc-per-node 1",
                  {"/bin/sh", "-c", "echo at $MASTER_ADDR:$MASTER_PORT job $TORCHELASTIC_RUN_ID"}));
  ASSERT_EQ(p.wait(Seconds(30)), 0) << p.all();
  EXPECT_NE(p.err().find("hosting the rendezvous store at 127.0.0.1:" + port + " (run id 'ep'"),
            std::string::npos)
      << p.err();
  EXPECT_NE(p.out().find("[rank 0] at 127.0.0.1:" + port + " job ep\n"), std::string::npos)
      << p.out();
}

// Debian's torchrun, given the same flags, puts the same streams on its console and in files.
TEST(Interop, TorchrunRedirectsAndTeeAgree) {
  if (access("/usr/bin/torchrun", X_OK) != 0) GTEST_SKIP() << "/usr/bin/torchrun not installed";
  TempDir tmp;
  auto port = std::to_string(free_port());
  Proc p({"/usr/bin/torchrun", "--no_python", "--log_dir", tmp.path, "--redirects", "0:1",
          "--tee", "1:2", "--nnodes", "1", "--nproc_per_node", "2", "--master_port", port,
          "--role", "trainer", kEcho[0], kEcho[1], kEcho[2]},
         kQuietLogs);
  ASSERT_EQ(p.wait(Seconds(kJobBound)), 0) << p.all();
  EXPECT_EQ(p.all().find("out 0"), std::string::npos) << p.all();  // redirected
  EXPECT_NE(p.all().find("err 0"), std::string::npos) << p.all();  // console
  EXPECT_NE(p.all().find("err 1"), std::string::npos) << p.all();  // teed
  EXPECT_NE(p.all().find("out 1 trainer"), std::string::npos) << p.all();  // console
}

TEST(Launcher, DryRunPrintsTopologyAndEnvironment) {
  Proc p(launcher("--dry-run --nnodes 2 --node-rank 1 --master-addr 10.1.2.3 --nproc-per-node 2 "
                  "--run-id dr",
                  {kWorker}));
  ASSERT_EQ(p.wait(Seconds(30)), 0) << p.all();
  EXPECT_NE(p.out().find("nothing is started"), std::string::npos);
  EXPECT_NE(p.out().find("on node 0 at 10.1.2.3:29500"), std::string::npos) << p.out();
  EXPECT_TRUE(std::regex_search(p.out(), std::regex("local rank 1:.* RANK=3 .*WORLD_SIZE=4")))
      << p.out();
  EXPECT_NE(p.out().find("local rank 0: (stdout to console, stderr to console)"),
            std::string::npos)
      << p.out();

  // Where each rank's streams go, and the log directory --redirects will make.
  Proc q(launcher("--dry-run --nproc-per-node 2 -r 0:1 -t 1:2", {kWorker}));
  ASSERT_EQ(q.wait(Seconds(30)), 0) << q.all();
  EXPECT_NE(q.out().find("local rank 0: (stdout to file, stderr to console)"), std::string::npos)
      << q.out();
  EXPECT_NE(q.out().find("local rank 1: (stdout to console, stderr to console+file)"),
            std::string::npos)
      << q.out();
  EXPECT_NE(q.out().find("a new /tmp/lockstep-run-logs-XXXXXX"), std::string::npos) << q.out();
}

// Bad invocations: one clear line on stderr, a non-zero exit, nothing started.
TEST(Launcher, BadInvocationsGiveOneLine) {
  int busy_port = 0;
  int busy = lockstep_test::listen_on_ephemeral(&busy_port);
  const std::string used = std::to_string(busy_port);
  const std::vector<std::pair<std::vector<std::string>, std::string>> table = {
      {{kRun}, "no program"},
      {{kRun, "--nproc-per-node", "2"}, "no program"},
      {{kRun, "--nproc-per-node", "0", "--", kWorker}, "--nproc-per-node"},
      {{kRun, "--nnodes", "2", "--node-rank", "2", "--", kWorker}, "node rank"},
      {{kRun, "--master-port", "65536", "--", kWorker}, "--master-port"},
      {{kRun, "--master-port", "port", "--", kWorker}, "--master-port"},
      {{kRun, "--", "/nonexistent/train"}, "not found"},
      {{kRun, "--master-port", used, "--", kWorker}, "in use"},
  };
  for (const auto& [argv, says] : table) {
    SCOPED_TRACE(argv.size() > 1 ? argv[1] + " ..." : "(no arguments)");
    auto start = Clock::now();
    Proc p(argv);
    int code = p.wait(Seconds(60));
    EXPECT_GT(code, 0);
    EXPECT_LT(since(start), 60.0);
    EXPECT_EQ(count(p.err(), "\n"), 1u) << p.err();
    EXPECT_EQ(p.err().rfind("lockstep-run: error: ", 0), 0u) << p.err();
    EXPECT_NE(p.err().find(says), std::string::npos) << p.err();
    EXPECT_EQ(p.out(), "");
  }
  close(busy);
}

// --nproc-per-node gpu where no CUDA device is visible (CUDA_VISIBLE_DEVICES emptied, so this
// holds on a GPU machine too; the CPU-only LibTorch of CI sees none anyway) is a bad invocation:
// exit 2 (kExitUsage), the reason and what to give instead, nothing started.
TEST(Launcher, GpuWorkersWithoutAVisibleGpuAreAUsageError) {
  Proc p({kRun, "--nproc-per-node", "gpu", "--", kWorker}, {{"CUDA_VISIBLE_DEVICES", ""}});
  EXPECT_EQ(p.wait(Seconds(60)), 2) << p.all();
  EXPECT_NE(p.err().find("lockstep-run: error: --nproc-per-node gpu: expected one worker per "
                         "visible CUDA device, but no CUDA device is visible (this LibTorch is "
                         "CPU-only, there is no GPU, or CUDA_VISIBLE_DEVICES is empty); give a "
                         "number (--nproc-per-node 4), or auto/cpu for one worker per core\n"),
            std::string::npos)
      << p.err();
  EXPECT_EQ(p.out(), "");
}

// Two launchers on this machine form one job; node 1 runs fewer workers than node 0.
TEST(Launcher, TwoNodesOnThisMachineFormOneJob) {
  Proc node0(launcher("--nnodes 2 --node-rank 0 --master-port 0 --run-id mn --nproc-per-node 2",
                      {kWorker, "--mode", "ok"}),
             kNodesEnv);
  std::smatch m;
  std::regex hosting("hosting the rendezvous store at 127.0.0.1:(\\d+)");
  ASSERT_TRUE(node0.until([&] { return std::regex_search(node0.err(), m, hosting); },
                          Seconds(30)))
      << node0.all();
  std::string port = m[1];
  Proc node1(launcher("--nnodes 2 --node-rank 1 --master-port " + port +
                          " --run-id mn --nproc-per-node 1",
                      {kWorker, "--mode", "ok"}),
             kNodesEnv);
  EXPECT_EQ(node1.wait(Seconds(kJobBound)), 0) << node1.all();
  EXPECT_EQ(node0.wait(Seconds(kJobBound)), 0) << node0.all();
  EXPECT_NE(node1.out().find("[rank 2] resolved rank=2 world=3 local_rank=0 local_world=1 node=1"),
            std::string::npos)
      << node1.out();
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(node0.out().find("resolved rank=" + std::to_string(r) + " world=3 local_rank=" +
                               std::to_string(r) + " local_world=2 node=0"),
              std::string::npos)
        << node0.out();
  }
}

TEST(Launcher, AFailureOnOneNodeStopsTheOtherAndBothNameIt) {
  Proc node0(launcher("--nnodes 2 --node-rank 0 --master-port 0 --run-id mf --grace-period 2 "
                      "--nproc-per-node 1",
                      {kWorker, "--mode", "loop"}),
             kNodesEnv);
  std::smatch m;
  std::regex hosting("hosting the rendezvous store at 127.0.0.1:(\\d+)");
  ASSERT_TRUE(node0.until([&] { return std::regex_search(node0.err(), m, hosting); },
                          Seconds(30)));
  std::string port = m[1];
  Proc node1(launcher("--nnodes 2 --node-rank 1 --master-port " + port +
                          " --run-id mf --grace-period 2 --nproc-per-node 1",
                      {kWorker, "--mode", "throw", "--fail-rank", "1", "--message", "node1 broke"}),
             kNodesEnv);
  EXPECT_EQ(node1.wait(Seconds(kJobBound)), 1) << node1.all();
  EXPECT_EQ(node0.wait(Seconds(30)), 1) << node0.all();
  for (Proc* p : {&node0, &node1}) {
    EXPECT_NE(p->err().find("first failure: rank 1 (local rank 0, node 1)"), std::string::npos)
        << p->err();
    EXPECT_NE(p->err().find("error: lockstep::StateError: node1 broke"), std::string::npos);
  }
}

// Two launchers on this machine: node 0 hosts the store; returns its port.
std::string hosted_port(Proc& node0) {
  std::smatch m;
  std::regex hosting("hosting the rendezvous store at 127.0.0.1:(\\d+)");
  if (!node0.until([&] { return std::regex_search(node0.err(), m, hosting); }, Seconds(30))) {
    return "";
  }
  return m[1];
}

// Two launchers on this machine, one looping worker each (run id `run_id`), started until
// both workers are ready; `pids` holds ranks 0 and 1 (empty, with a failure added, when they
// did not get ready).
struct TwoNodes {
  std::unique_ptr<Proc> node0, node1;
  std::map<int, pid_t> pids;
};
TwoNodes start_two_looping_nodes(const std::string& run_id, const Env& env, int grace,
                                 const std::string& extra_flags = "") {
  TwoNodes job;
  const std::vector<std::string> worker = {kWorker, "--mode", "loop"};
  const std::string common = " --run-id " + run_id + " --grace-period " + std::to_string(grace) +
                             " --nproc-per-node 1" + extra_flags;
  job.node0 = std::make_unique<Proc>(
      launcher("--nnodes 2 --node-rank 0 --master-port 0" + common, worker), env);
  const std::string port = hosted_port(*job.node0);
  if (port.empty()) {
    ADD_FAILURE() << "node 0 hosted no store: " << job.node0->all();
    return job;
  }
  job.node1 = std::make_unique<Proc>(
      launcher("--nnodes 2 --node-rank 1 --master-port " + port + common, worker), env);
  Proc& n0 = *job.node0;
  Proc& n1 = *job.node1;
  if (!n1.until([&] { return ready_pids(n1.out()).count(1) == 1; }, Seconds(kJobBound)) ||
      !n0.until([&] { return ready_pids(n0.out()).count(0) == 1; }, Seconds(30))) {
    ADD_FAILURE() << "the workers did not get ready: " << n0.all() << n1.all();
    return job;
  }
  job.pids = ready_pids(n1.out());
  auto pids0 = ready_pids(n0.out());
  job.pids.insert(pids0.begin(), pids0.end());
  return job;
}

// The store's host dies: node 0's launcher (which hosts the rendezvous store) is killed with
// SIGKILL, its worker dies with it, and node 1's launcher fails within the bound saying it
// lost the store or that rank 0 died, with no worker left on either node.
TEST(Launcher, StoreHostDeathFailsTheOtherNodesNamingTheStore) {
  Env env = kNodesEnv;
  env["LOCKSTEP_TIMEOUT"] = "10";
  TwoNodes job = start_two_looping_nodes("sd", env, /*grace=*/2);
  ASSERT_EQ(job.pids.size(), 2u);
  Proc& node0 = *job.node0;
  Proc& node1 = *job.node1;
  const auto pids = job.pids;
  const auto killed_at = Clock::now();
  ASSERT_EQ(kill(node0.pid(), SIGKILL), 0);
  const int code = node1.wait(Seconds(60));
  const double took = since(killed_at);
  report_bound("the store's host (node 0's launcher) killed: node 1 fails", took, 30);
  EXPECT_LT(took, 30.0) << node1.all();
  EXPECT_NE(code, 0) << node1.all();
  // Whichever node 1 sees first: the store gone, or its worker's error naming rank 0's death.
  const std::string err = node1.err();
  EXPECT_TRUE(err.find("lost the rendezvous store") != std::string::npos ||
              err.find("rank 0 (pid " + std::to_string(pids.at(0)) + ") died") != std::string::npos)
      << err;
  EXPECT_TRUE(all_gone(pids, Seconds(5))) << "a worker outlived the store's host";
}

// Elastic membership (Note [Elastic membership] in apps/run/rounds.h), three launchers on
// this machine with --nnodes 2:3. A node that is lost (its launcher killed with SIGKILL, so
// its worker dies too) fails the round; the next round forms on the two that are left, with
// world size 2 and dense node ranks, and the job finishes with exit 0.
TEST(Launcher, ElasticJobLosesANodeAndFinishesOnTheRest) {
  Env env = kNodesEnv;
  env["LOCKSTEP_TIMEOUT"] = "10";
  const std::vector<std::string> worker = {kWorker, "--mode", "loop-first"};
  const std::string common = " --nnodes 2:3 --run-id el --grace-period 2 --nproc-per-node 1 "
                             "--max-restarts 1 --rdzv-last-call 1";
  Proc node0(launcher("--node-rank 0 --master-port 0" + common, worker), env);
  std::string port = hosted_port(node0);
  ASSERT_FALSE(port.empty()) << node0.all();
  Proc node1(launcher("--node-rank 1 --master-port " + port + common, worker), env);
  Proc node2(launcher("--node-rank 2 --master-port " + port + common, worker), env);
  for (Proc* p : {&node0, &node1, &node2}) {
    ASSERT_TRUE(p->until([&] { return ready_pids(p->out()).size() == 1; }, Seconds(kJobBound)))
        << p->all();
    EXPECT_NE(p->out().find("world=3"), std::string::npos) << p->out();
  }
  auto lost = ready_pids(node2.out());
  const auto killed_at = Clock::now();
  ASSERT_EQ(kill(node2.pid(), SIGKILL), 0);
  EXPECT_EQ(node2.wait(Seconds(10)), 128 + SIGKILL);
  EXPECT_EQ(node0.wait(Seconds(kJobBound)), 0) << node0.all();
  EXPECT_EQ(node1.wait(Seconds(30)), 0) << node1.all();
  report_bound("elastic: a node of 3 lost, the job finished on 2", since(killed_at), kJobBound);
  EXPECT_NE(node0.out().find("resolved rank=0 world=2 local_rank=0 local_world=1 node=0 "),
            std::string::npos)
      << node0.out();
  EXPECT_NE(node1.out().find("resolved rank=1 world=2 local_rank=0 local_world=1 node=1 "),
            std::string::npos)
      << node1.out();
  EXPECT_NE(node0.err().find("of world size 2 (2 of 2..3 nodes)"), std::string::npos)
      << node0.err();
  EXPECT_TRUE(all_gone(lost, Seconds(5))) << "the lost node's worker outlived its launcher";
}

// A node that arrives while an elastic job runs below its MAX waits, the running round
// restarts every worker to take it (without using up a restart: --max-restarts 0), and the
// job finishes on all three.
TEST(Launcher, ElasticJobTakesANodeThatJoinsLate) {
  Env env = kNodesEnv;
  env["LOCKSTEP_TIMEOUT"] = "10";
  const std::vector<std::string> worker = {kWorker, "--mode", "loop-first"};
  const std::string common = " --nnodes 2:3 --run-id ej --grace-period 2 --nproc-per-node 1 "
                             "--rdzv-last-call 1";
  Proc node0(launcher("--node-rank 0 --master-port 0" + common, worker), env);
  std::string port = hosted_port(node0);
  ASSERT_FALSE(port.empty()) << node0.all();
  Proc node1(launcher("--node-rank 1 --master-port " + port + common, worker), env);
  for (Proc* p : {&node0, &node1}) {
    ASSERT_TRUE(p->until([&] { return ready_pids(p->out()).size() == 1; }, Seconds(kJobBound)))
        << p->all();
    EXPECT_NE(p->out().find("world=2"), std::string::npos) << p->out();
  }
  Proc node2(launcher("--node-rank 2 --master-port " + port + common, worker), env);
  for (Proc* p : {&node0, &node1, &node2}) {
    EXPECT_EQ(p->wait(Seconds(kJobBound)), 0) << p->all();
  }
  for (int r = 0; r < 3; ++r) {
    Proc* p = r == 0 ? &node0 : r == 1 ? &node1 : &node2;
    EXPECT_NE(p->out().find("resolved rank=" + std::to_string(r) + " world=3 "),
              std::string::npos)
        << p->out();
  }
  EXPECT_NE(node0.err().find("a node waits to join"), std::string::npos) << node0.err();
  EXPECT_EQ(node0.err().find("failed"), std::string::npos) << node0.err();
}

// Below MIN: the round is not formed; every launcher fails within --rdzv-timeout, naming who
// joined, who did not, and the MIN.
TEST(Launcher, ElasticJobBelowMinFailsNamingTheNodes) {
  const auto start = Clock::now();
  Proc node0(launcher("--nnodes 2:3 --node-rank 0 --master-port 0 --run-id eb "
                      "--nproc-per-node 1 --rdzv-timeout 2 --rdzv-last-call 1",
                      {kWorker, "--mode", "ok"}),
             kNodesEnv);
  EXPECT_NE(node0.wait(Seconds(30)), 0) << node0.all();
  EXPECT_LT(since(start), 30.0);
  EXPECT_NE(node0.err().find("only 1 node(s) joined (0) within 2 s, fewer than the 2 that "
                             "--nnodes 2:3 needs; not joined: node(s) 1, 2"),
            std::string::npos)
      << node0.err();
}

// Across nodes: the worker of node 1 exits 0 early, node 0's then fails. Both launchers fail
// and both flag rank 1 (it travels as a shared event, Note [lockstep-run rounds] step 3).
TEST(Launcher, EarlyExitZeroOnOneNodeFailsBothNodes) {
  Env env = kNodesEnv;
  env["LOCKSTEP_TIMEOUT"] = "10";
  const std::vector<std::string> worker = {kWorker, "--mode", "exit", "--fail-rank", "1",
                                           "--code", "0"};
  Proc node0(launcher("--nnodes 2 --node-rank 0 --master-port 0 --run-id ez --grace-period 2 "
                      "--nproc-per-node 1",
                      worker),
             env);
  std::string port = hosted_port(node0);
  ASSERT_FALSE(port.empty()) << node0.all();
  Proc node1(launcher("--nnodes 2 --node-rank 1 --master-port " + port +
                          " --run-id ez --grace-period 2 --nproc-per-node 1",
                      worker),
             env);
  EXPECT_EQ(node0.wait(Seconds(kJobBound)), 1) << node0.all();
  EXPECT_EQ(node1.wait(Seconds(30)), 1) << node1.all();
  for (Proc* p : {&node0, &node1}) {
    EXPECT_NE(p->err().find("first failure: rank 0 (local rank 0, node 0)"), std::string::npos)
        << p->err();
    EXPECT_NE(p->err().find("suspicious: rank 1 exited 0 while its peers were still running; "
                            "rank 0 then failed: "),
              std::string::npos)
        << p->err();
    EXPECT_EQ(p->err().find("exited 0 (attempt"), std::string::npos) << p->err();
  }
  auto pids = ready_pids(node0.out());
  auto pids1 = ready_pids(node1.out());
  pids.insert(pids1.begin(), pids1.end());
  EXPECT_EQ(pids.size(), 2u);
  EXPECT_TRUE(all_gone(pids, Seconds(5))) << "a worker outlived its launcher";
}

// Across nodes: node 1's worker is stopped; node 0's times out. Both launchers name the
// stopped rank as the root cause and exit 128 + SIGSTOP; no worker is left.
TEST(Launcher, StoppedWorkerOnOneNodeIsTheRootCauseOnBoth) {
  Env env = kNodesEnv;
  env["LOCKSTEP_TIMEOUT"] = "3";
  TwoNodes job = start_two_looping_nodes("st", env, /*grace=*/1);
  ASSERT_EQ(job.pids.size(), 2u);
  Proc& node0 = *job.node0;
  Proc& node1 = *job.node1;
  auto pids = job.pids;
  auto stopped_at = Clock::now();
  ASSERT_EQ(kill(pids[1], SIGSTOP), 0);
  EXPECT_EQ(node0.wait(Seconds(60)), 128 + SIGSTOP) << node0.all();
  EXPECT_EQ(node1.wait(Seconds(30)), 128 + SIGSTOP) << node1.all();
  report_bound("SIGSTOP of a worker on node 1 of 2 (timeout 3 s): both launchers name it",
               since(stopped_at), 30);
  EXPECT_LT(since(stopped_at), 30.0);
  for (Proc* p : {&node0, &node1}) {
    EXPECT_NE(p->err().find("first failure: rank 1 (local rank 0, node 1)"), std::string::npos)
        << p->err();
    EXPECT_NE(p->err().find("exit:  stopped by SIGSTOP (exit code 147)"), std::string::npos)
        << p->err();
    EXPECT_NE(p->err().find("then:  rank 0 (node 0, pid " + std::to_string(pids[0]) +
                            ") failed: lockstep::TimeoutError"),
              std::string::npos)
        << p->err();
  }
  EXPECT_TRUE(all_gone(pids, Seconds(5))) << "a worker outlived its launcher";
}

// Note [Launcher heartbeats]: node 1's launcher is stopped (SIGSTOP) while its worker runs on.
// Node 0 sees node 1's heartbeat stand still, fails the job naming node 1 once
// --heartbeat-timeout has passed, and stops its worker; node 1, continued, reports the same
// failure. No worker is left.
TEST(Launcher, HungLauncherOnOneNodeIsNamedAfterTheHeartbeatTimeout) {
  Env env = kNodesEnv;
  env["LOCKSTEP_TIMEOUT"] = "120";  // the workers themselves would not notice within the test
  TwoNodes job = start_two_looping_nodes("hb", env, /*grace=*/1, " --heartbeat-timeout 2");
  ASSERT_EQ(job.pids.size(), 2u);
  Proc& node0 = *job.node0;
  Proc& node1 = *job.node1;
  auto pids = job.pids;
  const auto stopped_at = Clock::now();
  ASSERT_EQ(kill(node1.pid(), SIGSTOP), 0);
  const std::string hung = "node 1's launcher (";
  const bool named = node0.until([&] { return node0.err().find(hung) != std::string::npos; },
                                 Seconds(30));
  const double after = since(stopped_at);
  kill(node1.pid(), SIGCONT);
  ASSERT_TRUE(named) << node0.all();
  // Node 1's last beat came at most one heartbeat interval (2 s / 5) before the stop.
  EXPECT_GE(after, 2.0 - 0.4) << "declared hung before --heartbeat-timeout passed";
  EXPECT_LT(after, 15.0);
  EXPECT_EQ(node0.wait(Seconds(30)), 1) << node0.all();
  EXPECT_EQ(node1.wait(Seconds(30)), 1) << node1.all();
  for (Proc* p : {&node0, &node1}) {
    EXPECT_NE(p->err().find("first failure: node 1's launcher ("), std::string::npos) << p->err();
    EXPECT_NE(p->err().find(") is hung: its heartbeat has not moved for "), std::string::npos)
        << p->err();
    EXPECT_NE(p->err().find("(--heartbeat-timeout 2)"), std::string::npos) << p->err();
  }
  EXPECT_TRUE(all_gone(pids, Seconds(10))) << "a worker outlived the job";
}

// The same worker under Debian's torchrun (1.13, which needs `-r 1 -t 1` on Python 3.11 and
// hosts the store itself).
TEST(Interop, TorchrunNoPython) {
  if (access("/usr/bin/torchrun", X_OK) != 0) GTEST_SKIP() << "/usr/bin/torchrun not installed";
  auto port = std::to_string(free_port());
  Proc p({"/usr/bin/torchrun", "--no_python", "-r", "1", "-t", "1", "--nnodes", "1",
          "--nproc_per_node", "2", "--master_port", port, kWorker, "--mode", "ok"},
         kQuietLogs);
  ASSERT_EQ(p.wait(Seconds(kJobBound)), 0) << p.all();
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(p.all().find("resolved rank=" + std::to_string(r) + " world=2 local_rank=" +
                           std::to_string(r) + " local_world=2 node=0 launcher=torchrun "
                           "agent_store=1 restart=0"),
              std::string::npos)
        << p.all();
    EXPECT_NE(p.all().find("done rank=" + std::to_string(r)), std::string::npos);
  }
}

TEST(Interop, TorchrunShowsTheWorkersError) {
  if (access("/usr/bin/torchrun", X_OK) != 0) GTEST_SKIP() << "/usr/bin/torchrun not installed";
  auto port = std::to_string(free_port());
  Proc p({"/usr/bin/torchrun", "--no_python", "-r", "1", "-t", "1", "--nnodes", "1",
          "--nproc_per_node", "2", "--master_port", port, kWorker, "--mode", "throw",
          "--fail-rank", "1", "--message", "seen by torchrun"},
         kQuietLogs);
  EXPECT_EQ(p.wait(Seconds(kJobBound)), 1) << p.all();
  EXPECT_NE(p.err().find("lockstep::StateError: seen by torchrun"), std::string::npos) << p.err();
}

// Workers started with a launcher's variables set by hand (rank 0 hosts the store).
void run_by_hand(const std::function<Env(int rank)>& env_of, const std::string& launcher_name) {
  std::vector<std::unique_ptr<Proc>> ranks;
  for (int r = 0; r < 2; ++r) {
    Env env = env_of(r);
    env["LOCKSTEP_LOG_LEVEL"] = "warn";
    ranks.push_back(std::make_unique<Proc>(std::vector<std::string>{kWorker, "--mode", "ok"}, env));
  }
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE(r);
    ASSERT_EQ(ranks[r]->wait(Seconds(kJobBound)), 0) << ranks[r]->all();
    EXPECT_NE(ranks[r]->out().find("resolved rank=" + std::to_string(r) + " world=2 local_rank=" +
                                   std::to_string(r) + " local_world=2 node=0 launcher=" +
                                   launcher_name + " agent_store=0"),
              std::string::npos)
        << ranks[r]->out();
    EXPECT_NE(ranks[r]->out().find("done rank=" + std::to_string(r)), std::string::npos);
  }
}

TEST(Interop, SlurmStyleEnvironment) {
  auto port = std::to_string(free_port());
  run_by_hand(
      [&](int r) {
        return Env{{"SLURM_PROCID", std::to_string(r)}, {"SLURM_LOCALID", std::to_string(r)},
                   {"SLURM_NTASKS", "2"}, {"SLURM_NODEID", "0"}, {"SLURM_TASKS_PER_NODE", "2"},
                   {"SLURM_JOB_NODELIST", "localhost"}, {"SLURM_JOB_ID", "4242"},
                   {"MASTER_PORT", port}};
      },
      "slurm");
}

TEST(Interop, OpenMpiStyleEnvironment) {
  auto port = std::to_string(free_port());
  run_by_hand(
      [&](int r) {
        return Env{{"OMPI_COMM_WORLD_RANK", std::to_string(r)},
                   {"OMPI_COMM_WORLD_LOCAL_RANK", std::to_string(r)},
                   {"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                   {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", port}};
      },
      "openmpi");
}

// Two network namespaces joined by a veth pair: two "hosts" with their own addresses.
class NetNs {
 public:
  NetNs() {
    tag_ = std::to_string(getpid() % 100000);
    a_ = "lsa" + tag_;
    b_ = "lsb" + tag_;
    std::string sub = "10.231." + std::to_string(getpid() % 250) + ".";
    addr_a_ = sub + "1";
    addr_b_ = sub + "2";
    std::vector<std::string> cmds = {
        "ip netns add " + a_, "ip netns add " + b_,
        "ip link add va" + tag_ + " type veth peer name vb" + tag_,
        "ip link set va" + tag_ + " netns " + a_, "ip link set vb" + tag_ + " netns " + b_,
        "ip -n " + a_ + " addr add " + addr_a_ + "/24 dev va" + tag_,
        "ip -n " + b_ + " addr add " + addr_b_ + "/24 dev vb" + tag_,
        "ip -n " + a_ + " link set va" + tag_ + " up", "ip -n " + b_ + " link set vb" + tag_ + " up",
        "ip -n " + a_ + " link set lo up", "ip -n " + b_ + " link set lo up"};
    for (const auto& c : cmds) {
      if (std::system((c + " 2>/tmp/lockstep-netns-" + tag_ + ".err").c_str()) != 0) {
        std::ifstream in("/tmp/lockstep-netns-" + tag_ + ".err");
        std::stringstream ss;
        ss << in.rdbuf();
        error_ = "`" + c + "` failed: " + ss.str();
        return;
      }
    }
    ok_ = true;
  }
  ~NetNs() {
    std::system(("ip netns del " + a_ + " 2>/dev/null; ip netns del " + b_ + " 2>/dev/null").c_str());
    std::remove(("/tmp/lockstep-netns-" + tag_ + ".err").c_str());
  }
  bool ok_ = false;
  std::string error_, tag_, a_, b_, addr_a_, addr_b_;
};

// TCP ports `pid` listens on (its sockets in LISTEN state, from /proc).
std::vector<int> listening_ports(pid_t pid) {
  std::set<std::string> inodes;
  std::string fd_dir = "/proc/" + std::to_string(pid) + "/fd";
  for (int fd = 0; fd < 1024; ++fd) {
    char target[256] = {0};
    auto path = fd_dir + "/" + std::to_string(fd);
    ssize_t n = readlink(path.c_str(), target, sizeof(target) - 1);
    std::string t(target, n > 0 ? static_cast<size_t>(n) : 0);
    if (t.rfind("socket:[", 0) == 0) inodes.insert(t.substr(8, t.size() - 9));
  }
  std::vector<int> ports;
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      std::stringstream ss(line);
      std::string slot, local, remote, state, queues, timer, retr, uid, timeout, inode;
      ss >> slot >> local >> remote >> state >> queues >> timer >> retr >> uid >> timeout >> inode;
      if (state == "0A" && inodes.count(inode)) {
        ports.push_back(std::stoi(local.substr(local.find(':') + 1), nullptr, 16));
      }
    }
  }
  return ports;
}

// A program started without any launch variables fails, saying how to launch it; with
// LOCKSTEP_STANDALONE=1 it runs as one process and listens on no port; a partial set names
// what is missing.
TEST(LaunchVariables, NoneOrPartialFailAndStandaloneRunsAloneWithoutASocket) {
  for (const auto& var : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                          "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK",
                          "PMI_RANK", "PET_NODE_RANK", "LOCKSTEP_STANDALONE"}) {
    if (std::getenv(var)) GTEST_SKIP() << var << " is set in the test's own environment";
  }
  {
    Proc p({kWorker, "--mode", "ok"}, kQuietLogs);
    EXPECT_EQ(p.wait(Seconds(kJobBound)), 1) << p.all();
    EXPECT_NE(p.err().find("lockstep::InvalidArgument: Expected a launch environment"),
              std::string::npos)
        << p.err();
    EXPECT_NE(p.err().find("LOCKSTEP_STANDALONE=1"), std::string::npos) << p.err();
    EXPECT_NE(p.err().find("lockstep-run --standalone"), std::string::npos) << p.err();
  }
  {
    Env env = kQuietLogs;
    env["WORLD_SIZE"] = "2";
    Proc p({kWorker, "--mode", "ok"}, env);
    EXPECT_EQ(p.wait(Seconds(kJobBound)), 1) << p.all();
    EXPECT_NE(p.err().find("Expected RANK to be set because WORLD_SIZE is set"),
              std::string::npos)
        << p.err();
  }
  {
    Env env = kQuietLogs;
    env["LOCKSTEP_STANDALONE"] = "1";
    Proc p({kWorker, "--mode", "loop"}, env);
    ASSERT_TRUE(p.until([&] { return ready_pids(p.out()).size() == 1; }, Seconds(kJobBound)))
        << p.all();
    EXPECT_NE(p.out().find("resolved rank=0 world=1 local_rank=0 local_world=1 node=0 "
                           "launcher=none agent_store=0"),
              std::string::npos)
        << p.out();
    auto pid = ready_pids(p.out())[0];
    auto ports = listening_ports(pid);
    EXPECT_TRUE(ports.empty()) << "a standalone process listens on port " << ports.front();
    kill(pid, SIGKILL);
    EXPECT_EQ(p.wait(Seconds(30)), 128 + SIGKILL);
  }
}

TEST(Launcher, TwoNodesInNetworkNamespacesJoinedByAVethPair) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to create network namespaces (ip netns)";
  if (access("/usr/sbin/ip", X_OK) != 0 && access("/sbin/ip", X_OK) != 0 &&
      access("/usr/bin/ip", X_OK) != 0 && access("/bin/ip", X_OK) != 0) {
    GTEST_SKIP() << "iproute2's `ip` is not installed";
  }
  NetNs ns;
  if (!ns.ok_) GTEST_SKIP() << "network namespaces unavailable here: " << ns.error_;
  std::string ip = access("/usr/sbin/ip", X_OK) == 0 ? "/usr/sbin/ip" : "/sbin/ip";
  auto in_ns = [&](const std::string& name, std::vector<std::string> argv) {
    argv.insert(argv.begin(), {ip, "netns", "exec", name});
    return argv;
  };
  Env env0 = kNodesEnv, env1 = kNodesEnv;
  env0["LOCKSTEP_SOCKET_IFNAME"] = "va" + ns.tag_;
  env1["LOCKSTEP_SOCKET_IFNAME"] = "vb" + ns.tag_;
  Proc node0(in_ns(ns.a_, launcher("--nnodes 2 --node-rank 0 --master-addr " + ns.addr_a_ +
                                       " --master-port 0 --run-id ns --nproc-per-node 1",
                                   {kWorker, "--mode", "ok"})),
             env0);
  std::smatch m;
  std::regex hosting("hosting the rendezvous store at [0-9.]+:(\\d+)");
  ASSERT_TRUE(node0.until([&] { return std::regex_search(node0.err(), m, hosting); },
                          Seconds(30)))
      << node0.all();
  std::string port = m[1];
  Proc node1(in_ns(ns.b_, launcher("--nnodes 2 --node-rank 1 --master-addr " + ns.addr_a_ +
                                       " --master-port " + port + " --run-id ns --nproc-per-node 1",
                                   {kWorker, "--mode", "ok"})),
             env1);
  EXPECT_EQ(node1.wait(Seconds(kJobBound)), 0) << node1.all();
  EXPECT_EQ(node0.wait(Seconds(kJobBound)), 0) << node0.all();
  EXPECT_NE(node1.out().find("resolved rank=1 world=2 local_rank=0 local_world=1 node=1"),
            std::string::npos)
      << node1.all();
  EXPECT_NE(node0.out().find("done rank=0"), std::string::npos);
}

// N network namespaces ("hosts") whose veth ends meet on a bridge in a hub namespace of their
// own (so the host's firewall never sees the traffic): node k has address <sub>.(k+1)/24 on
// interface "e<k><tag>". Everything is removed by the destructor.
class NetNsCluster {
 public:
  explicit NetNsCluster(int n) {
    tag_ = std::to_string(getpid() % 100000);
    hub_ = "lsh" + tag_;
    const std::string sub = "10.232." + std::to_string(getpid() % 250) + ".";
    std::vector<std::string> cmds = {"ip netns add " + hub_,
                                     "ip -n " + hub_ + " link add br" + tag_ + " type bridge",
                                     "ip -n " + hub_ + " link set br" + tag_ + " up"};
    for (int k = 0; k < n; ++k) {
      const std::string ns = "lsn" + std::to_string(k) + "_" + tag_;
      const std::string in = "e" + std::to_string(k) + tag_, out = "h" + std::to_string(k) + tag_;
      nodes_.push_back(ns);
      ifnames_.push_back(in);
      addrs_.push_back(sub + std::to_string(k + 1));
      for (const std::string& c :
           {"ip netns add " + ns, "ip link add " + in + " type veth peer name " + out,
            "ip link set " + in + " netns " + ns, "ip link set " + out + " netns " + hub_,
            "ip -n " + hub_ + " link set " + out + " master br" + tag_,
            "ip -n " + hub_ + " link set " + out + " up",
            "ip -n " + ns + " addr add " + addrs_.back() + "/24 dev " + in,
            "ip -n " + ns + " link set " + in + " up", "ip -n " + ns + " link set lo up"}) {
        cmds.push_back(c);
      }
    }
    for (const auto& c : cmds) {
      if (std::system((c + " 2>/tmp/lockstep-netns-" + tag_ + ".err").c_str()) != 0) {
        std::ifstream in("/tmp/lockstep-netns-" + tag_ + ".err");
        std::stringstream ss;
        ss << in.rdbuf();
        error_ = "`" + c + "` failed: " + ss.str();
        return;
      }
    }
    ok_ = true;
  }
  ~NetNsCluster() {
    std::string del = "ip netns del " + hub_ + " 2>/dev/null";
    for (const auto& ns : nodes_) del += "; ip netns del " + ns + " 2>/dev/null";
    std::system(del.c_str());
    std::remove(("/tmp/lockstep-netns-" + tag_ + ".err").c_str());
  }
  bool ok_ = false;
  std::string error_, tag_, hub_;
  std::vector<std::string> nodes_, ifnames_, addrs_;
};

// Elastic membership across network namespaces: three "hosts" on a bridge, --nnodes 2:3. Node
// 2's launcher is killed with SIGKILL; the job finishes on nodes 0 and 1 with world size 2, and
// no namespace is left behind.
TEST(Launcher, ElasticJobInNetworkNamespacesLosesANode) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to create network namespaces (ip netns)";
  std::string ip = access("/usr/sbin/ip", X_OK) == 0 ? "/usr/sbin/ip" : "/sbin/ip";
  if (access(ip.c_str(), X_OK) != 0) GTEST_SKIP() << "iproute2's `ip` is not installed";
  std::vector<std::string> names;
  {
    NetNsCluster net(3);
    if (!net.ok_) GTEST_SKIP() << "network namespaces unavailable here: " << net.error_;
    names = net.nodes_;
    names.push_back(net.hub_);
    const std::vector<std::string> worker = {kWorker, "--mode", "loop-first"};
    auto node = [&](int k, const std::string& port) {
      Env env = kNodesEnv;
      env["LOCKSTEP_TIMEOUT"] = "10";
      env["LOCKSTEP_SOCKET_IFNAME"] = net.ifnames_[k];
      // The namespaces share one kernel, hostname and boot id, so lockstep would pick shared
      // memory between their workers; Gloo puts the data plane on the bridge too.
      env["LOCKSTEP_TRANSPORT"] = "gloo";
      auto argv = launcher("--nnodes 2:3 --node-rank " + std::to_string(k) + " --master-addr " +
                               net.addrs_[0] + " --master-port " + port +
                               " --run-id ens --grace-period 2 --nproc-per-node 1 "
                               "--max-restarts 1 --rdzv-last-call 1",
                           worker);
      argv.insert(argv.begin(), {ip, "netns", "exec", net.nodes_[k]});
      return std::make_unique<Proc>(argv, env);
    };
    auto node0 = node(0, "0");
    std::smatch m;
    std::regex hosting("hosting the rendezvous store at [0-9.]+:(\\d+)");
    ASSERT_TRUE(node0->until([&] { return std::regex_search(node0->err(), m, hosting); },
                             Seconds(30)))
        << node0->all();
    const std::string port = m[1];
    auto node1 = node(1, port);
    auto node2 = node(2, port);
    for (Proc* p : {node0.get(), node1.get(), node2.get()}) {
      ASSERT_TRUE(p->until([&] { return ready_pids(p->out()).size() == 1; }, Seconds(kJobBound)))
          << p->all();
      EXPECT_NE(p->out().find("world=3"), std::string::npos) << p->out();
    }
    auto lost = ready_pids(node2->out());
    ASSERT_EQ(kill(node2->pid(), SIGKILL), 0);
    EXPECT_EQ(node0->wait(Seconds(kJobBound)), 0) << node0->all();
    EXPECT_EQ(node1->wait(Seconds(30)), 0) << node1->all();
    EXPECT_NE(node1->out().find("resolved rank=1 world=2 "), std::string::npos) << node1->out();
    EXPECT_NE(node0->err().find("of world size 2 (2 of 2..3 nodes)"), std::string::npos)
        << node0->err();
    EXPECT_TRUE(all_gone(lost, Seconds(5)));
  }
  for (const auto& n : names) {
    EXPECT_NE(access(("/run/netns/" + n).c_str(), F_OK), 0) << "namespace " << n << " left behind";
  }
}

// The local addresses of `pid`'s TCP sockets, as "a.b.c.d:port" (from /proc/net/tcp and its
// fds): those listening only, or all of them.
std::vector<std::string> tcp_addresses(pid_t pid, bool listening_only) {
  std::set<std::string> inodes;
  std::string fd_dir = "/proc/" + std::to_string(pid) + "/fd";
  if (DIR* d = opendir(fd_dir.c_str())) {
    while (dirent* e = readdir(d)) {
      char target[256] = {0};
      std::string path = fd_dir + "/" + e->d_name;
      ssize_t n = readlink(path.c_str(), target, sizeof(target) - 1);
      std::string t(target, n > 0 ? static_cast<size_t>(n) : 0);
      if (t.rfind("socket:[", 0) == 0) inodes.insert(t.substr(8, t.size() - 9));
    }
    closedir(d);
  }
  std::vector<std::string> out;
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      std::istringstream is(line);
      std::string slot, local, remote, state, queues, timer, retr, uid, timeout, inode;
      is >> slot >> local >> remote >> state >> queues >> timer >> retr >> uid >> timeout >> inode;
      if ((listening_only && state != "0A") || inodes.count(inode) == 0) continue;  // 0A: LISTEN
      auto colon = local.find(':');
      std::string hex_addr = local.substr(0, colon);
      int port = std::stoi(local.substr(colon + 1), nullptr, 16);
      std::string addr = hex_addr;
      if (hex_addr.size() == 8) {
        unsigned long v = std::stoul(hex_addr, nullptr, 16);  // little-endian IPv4
        addr = std::to_string(v & 0xff) + "." + std::to_string((v >> 8) & 0xff) + "." +
               std::to_string((v >> 16) & 0xff) + "." + std::to_string((v >> 24) & 0xff);
      }
      out.push_back(addr + ":" + std::to_string(port));
    }
  }
  return out;
}

// Issue 15: a closed door. A single-node job's store (the launcher's) and Gloo's sockets listen
// on loopback only; a client without the job token, or with another job's, is refused within
// 2 s with a clear error, and the job goes on to the same result.
TEST(Launcher, ForeignClientsAreRefusedAndTheJobGoesOnListeningOnLoopbackOnly) {
  TempDir dir;
  const std::string go = dir.path + "/go";
  const int port = free_port();
  Env env = kQuietLogs;
  env["LOCKSTEP_TRANSPORT"] = "gloo";
  Proc p(launcher("--nproc-per-node 2 --master-port " + std::to_string(port),
                  {kWorker, "--mode", "ok", "--wait-for", go}),
         env);
  ASSERT_TRUE(p.until([&] { return ready_pids(p.out()).size() == 2; }, Seconds(60))) << p.all();

  // Every socket of the launcher and its workers, listening (the store) or connected (the
  // store clients, Gloo's pairs), is on 127.0.0.1.
  std::vector<pid_t> pids = {p.pid()};
  for (auto& [rank, pid] : ready_pids(p.out())) pids.push_back(pid);
  size_t listening = 0, sockets = 0;
  for (pid_t pid : pids) {
    listening += tcp_addresses(pid, /*listening_only=*/true).size();
    for (const auto& addr : tcp_addresses(pid, /*listening_only=*/false)) {
      ++sockets;
      EXPECT_EQ(addr.rfind("127.0.0.1:", 0), 0u) << "pid " << pid << " has a socket on " << addr;
    }
  }
  EXPECT_GE(listening, 1u) << "expected the launcher's store to listen";
  EXPECT_GE(sockets, 5u) << "expected the store, its clients and Gloo's pairs";

  // Without the token, and with another job's token: refused, within 2 s, naming the fix.
  for (const std::string& token : {std::string(), std::string(32, 'x')}) {
    auto start = Clock::now();
    try {
      lockstep::Store::tcp("127.0.0.1", port, /*is_server=*/false, std::chrono::seconds(5),
                           lockstep::TcpStoreOptions().token(token));
      ADD_FAILURE() << "a client with " << (token.empty() ? "no" : "a wrong")
                    << " token was let in";
    } catch (const lockstep::InvalidArgument& e) {
      std::string what = e.what();
      EXPECT_NE(what.find("refused this client: wrong or missing job token"), std::string::npos)
          << what;
      EXPECT_EQ(what.find(std::string(32, 'x')), std::string::npos) << what;
    }
    report_bound("a store client without the token is refused", since(start), 2);
    EXPECT_LT(since(start), 2.0);
  }
  { std::ofstream(go).put('1'); }
  EXPECT_EQ(p.wait(Seconds(kJobBound)), 0) << p.all();
  EXPECT_NE(p.out().find("done rank=0"), std::string::npos) << p.all();
  EXPECT_NE(p.out().find("done rank=1"), std::string::npos) << p.all();
}

TEST(Launcher, SeveralNodesWithoutASharedTokenAreRefusedWithHowToMakeOne) {
  Proc p(launcher("--nnodes 2 --node-rank 0 --master-port 0 --run-id nt", {kWorker}),
         kQuietLogs);
  EXPECT_EQ(p.wait(Seconds(30)), 2) << p.all();
  EXPECT_NE(p.err().find("needs a job token that every node's launcher shares"),
            std::string::npos)
      << p.all();
  EXPECT_NE(p.err().find("LOCKSTEP_STORE_TOKEN_FILE"), std::string::npos) << p.all();
}

}  // namespace
