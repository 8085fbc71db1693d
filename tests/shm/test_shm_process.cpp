// Shared-memory groups with ranks as forked processes, through init_process_group with a file
// store: world sizes 1..4, all dtypes, bitwise agreement with the fixed-order reference; a rank
// killed with SIGKILL (by itself at a known point, and by the parent in the middle of a stream
// of 8 MiB all-reduces) makes every survivor raise a CommError naming it, quickly; so does a
// rank that dies during set-up (rank 0 killed by a file-size limit while it reserves the
// segment; rank 0 ended by SIGTERM, promptly, while it waits in a shared buffer's set-up);
// /dev/shm holds nothing of the job afterwards in every case.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <thread>

#include "lockstep/errors.h"
#include "lockstep/process_group.h"
#include "shm/shm_support.h"
#include "support/no_leaks.h"

using lockstep::ReduceOp;

namespace {

struct Job {
  std::string id;
  std::string dir;
  ~Job() {
    if (getpid() == parent) std::filesystem::remove_all(dir);  // not in the forked ranks
  }
  pid_t parent = getpid();
};

Job make_job(const char* tag) {
  static int n = 0;
  char tmpl[] = "/tmp/lockstep-shm-test-XXXXXX";
  Job job;
  job.dir = mkdtemp(tmpl);
  job.id = std::string("shmproc-") + tag + "-" + std::to_string(getpid()) + "-" +
           std::to_string(n++);
  return job;
}

lockstep::ProcessGroupPtr join(const Job& job, int rank, int world, int timeout_s = 20,
                               int rendezvous_timeout_s = 20) {
  return lockstep::init_process_group(lockstep::ProcessGroupOptions()
                                          .init_method("file://" + job.dir + "/store")
                                          .rank(rank)
                                          .world_size(world)
                                          .job_id(job.id)
                                          .transport("shm")
                                          .timeout(std::chrono::seconds(timeout_s))
                                          .rendezvous_timeout(std::chrono::seconds(rendezvous_timeout_s))
                                          .environment({{"LOCKSTEP_LOG_LEVEL", "warn"}}));
}

// Forks one process per rank running body(rank) -> exit code (an exception: 99, printed with
// the rank). `on_started(pids)` runs in the parent once all are forked. Waits for every child,
// killing all of them after `limit` (then the test fails); returns each rank's wait status.
std::vector<int> run_processes(int world, const std::function<int(int)>& body,
                               const std::function<void(const std::vector<pid_t>&)>& on_started =
                                   nullptr,
                               std::chrono::seconds limit = std::chrono::seconds(60)) {
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    pid_t pid = fork();
    if (pid == 0) {
      int code = 98;
      try {
        code = body(r);
      } catch (const std::exception& e) {
        fprintf(stderr, "rank %d/%d threw: %s\n", r, world, e.what());
        code = 99;
      }
      fflush(stderr);
      _exit(code);
    }
    pids.push_back(pid);
  }
  if (on_started) on_started(pids);
  std::vector<int> status(world, -1);
  int left = world;
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (left > 0) {
    for (int r = 0; r < world; ++r) {
      if (status[r] != -1) continue;
      int st = 0;
      if (waitpid(pids[r], &st, WNOHANG) == pids[r]) {
        status[r] = st;
        --left;
      }
    }
    if (left > 0 && std::chrono::steady_clock::now() > deadline) {
      ADD_FAILURE() << "ranks still running after " << limit.count() << " s: a hang";
      for (int r = 0; r < world; ++r) {
        if (status[r] == -1) kill(pids[r], SIGKILL);
      }
      limit = std::chrono::seconds(3600);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling the children only
  }
  return status;
}

void expect_exit_zero(const std::vector<int>& status, int skip = -1) {
  for (size_t r = 0; r < status.size(); ++r) {
    if (static_cast<int>(r) == skip) continue;
    EXPECT_TRUE(WIFEXITED(status[r]) && WEXITSTATUS(status[r]) == 0)
        << "rank " << r << " ended with status " << status[r] << " (exit code "
        << (WIFEXITED(status[r]) ? WEXITSTATUS(status[r]) : -1) << "; see its stderr above)";
  }
}

class ShmProcesses : public ::testing::TestWithParam<int> {};

TEST_P(ShmProcesses, AllDtypesBitwiseEqualToFixedOrderAndNothingLeftInDevShm) {
  const int world = GetParam();
  auto job = make_job("ok");
  auto status = run_processes(world, [&](int rank) {
    auto pg = join(job, rank, world);
    if (pg->backend() != "shm") return 10;
    if (!shm_test::shm_entries(job.id).empty()) return 11;  // unlinked once everyone mapped
    for (auto dtype : {at::kFloat, at::kDouble, at::kLong, at::kBFloat16, at::kHalf}) {
      for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{1001}, int64_t{3 * 512 * 1024 + 7}}) {
        std::vector<at::Tensor> all;
        for (int r = 0; r < world; ++r) {
          all.push_back(dtype == at::kLong ? shm_test::small_input(r, n, dtype)
                                           : shm_test::random_input(r, n, dtype));
        }
        auto t = all[rank].clone();
        pg->allreduce(t)->wait();
        if (!shm_test::bitwise_equal(t, shm_test::ordered_reference(all, ReduceOp::kSum))) {
          fprintf(stderr, "rank %d: %s n=%lld differs from the fixed-order sum\n", rank,
                  c10::toString(dtype), static_cast<long long>(n));
          return 12;
        }
      }
    }
    auto b = at::full({777}, static_cast<double>(rank));
    pg->broadcast(b, world - 1)->wait();
    if (!at::equal(b, at::full({777}, static_cast<double>(world - 1)))) return 13;
    pg->barrier()->wait();
    return 0;
  });
  expect_exit_zero(status);
  EXPECT_TRUE(shm_test::shm_entries(job.id).empty());
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, ShmProcesses, ::testing::Values(1, 2, 3, 4));

// Survivors' verdict: 0 when the collective failed with a CommError naming `dead` as dead,
// within `bound`; otherwise a distinct code, with the message on stderr.
int expect_death_named(const lockstep::ProcessGroupPtr& pg, int dead, at::Tensor t,
                       double bound_s) {
  auto start = std::chrono::steady_clock::now();
  try {
    for (int i = 0; i < 1000; ++i) pg->allreduce(t)->wait();
    fprintf(stderr, "%s: no error although rank %d died\n", pg->where().c_str(), dead);
    return 20;
  } catch (const lockstep::CommError& e) {
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::string what = e.what();
    std::string want = "rank " + std::to_string(dead) + " (pid ";
    if (what.find(want) == std::string::npos || what.find("died") == std::string::npos ||
        what.find("allreduce #") == std::string::npos) {
      fprintf(stderr, "%s: message does not name dead rank %d: %s\n", pg->where().c_str(), dead,
              what.c_str());
      return 21;
    }
    if (s > bound_s) {
      fprintf(stderr, "%s: took %.2f s to notice: %s\n", pg->where().c_str(), s, what.c_str());
      return 22;
    }
    return 0;
  } catch (const std::exception& e) {
    fprintf(stderr, "%s: wrong error: %s\n", pg->where().c_str(), e.what());
    return 23;
  }
}

TEST(ShmProcessFaults, RankKilledAtAKnownPointIsNamedByEverySurvivor) {
  const int world = 3;
  auto job = make_job("kill");
  auto status = run_processes(world, [&](int rank) {
    auto pg = join(job, rank, world, /*timeout_s=*/60);
    auto t = at::ones({100000});
    pg->allreduce(t)->wait();
    if (rank == 2) raise(SIGKILL);
    return expect_death_named(pg, 2, t, /*bound_s=*/5.0);
  });
  expect_exit_zero(status, /*skip=*/2);
  EXPECT_TRUE(WIFSIGNALED(status[2]) && WTERMSIG(status[2]) == SIGKILL);
  EXPECT_TRUE(shm_test::shm_entries(job.id).empty()) << "segment left in /dev/shm after a kill";
}

TEST(ShmProcessFaults, RankKilledByParentMidStreamIsNamedByEverySurvivor) {
  const int world = 4;
  auto job = make_job("kill9");
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  auto status = run_processes(
      world,
      [&](int rank) {
        close(ready[0]);
        auto pg = join(job, rank, world, /*timeout_s=*/60);
        auto t = at::ones({2 * 1024 * 1024});  // 8 MiB: four steps per all-reduce
        for (int i = 0; i < 3; ++i) pg->allreduce(t)->wait();
        char c = 'r';
        if (write(ready[1], &c, 1) != 1) return 30;
        close(ready[1]);
        return expect_death_named(pg, 1, t, /*bound_s=*/5.0);
      },
      [&](const std::vector<pid_t>& pids) {
        close(ready[1]);
        char c;
        int got = 0;
        while (got < world && read(ready[0], &c, 1) == 1) ++got;  // everyone is streaming
        close(ready[0]);
        kill(pids[1], SIGKILL);
      });
  expect_exit_zero(status, /*skip=*/1);
  EXPECT_TRUE(WIFSIGNALED(status[1]) && WTERMSIG(status[1]) == SIGKILL);
  EXPECT_TRUE(shm_test::shm_entries(job.id).empty()) << "segment left in /dev/shm after kill -9";
}

// Death during set-up (Note [Shared-memory setup faults]): a survivor's join must fail with a
// CommError naming `dead` within `bound_s`, far below the 60 s rendezvous timeout.
int expect_setup_death_named(const Job& job, int rank, int world, int dead, double bound_s) {
  auto start = std::chrono::steady_clock::now();
  try {
    auto pg = join(job, rank, world, /*timeout_s=*/60, /*rendezvous_timeout_s=*/60);
    fprintf(stderr, "rank %d: joined although rank %d died during set-up\n", rank, dead);
    return 40;
  } catch (const lockstep::CommError& e) {
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::string what = e.what();
    std::string want = "rank " + std::to_string(dead) + " (pid ";
    if (what.find(want) == std::string::npos || what.find("died") == std::string::npos ||
        what.find("shared-memory setup") == std::string::npos ||
        what.find("check its log") == std::string::npos ||
        what.find("[rank " + std::to_string(rank) + "/") == std::string::npos) {
      fprintf(stderr, "rank %d: message does not name dead rank %d: %s\n", rank, dead,
              what.c_str());
      return 41;
    }
    if (s > bound_s) {
      fprintf(stderr, "rank %d: took %.2f s to notice: %s\n", rank, s, what.c_str());
      return 42;
    }
    return 0;
  } catch (const std::exception& e) {
    fprintf(stderr, "rank %d: wrong error: %s\n", rank, e.what());
    return 43;
  }
}

// The issue's reproduction: a file-size limit kills rank 0 (SIGXFSZ) in posix_fallocate, right
// after it created the segment's entry in /dev/shm.
TEST(ShmProcessFaults, RankZeroDyingDuringSetupIsNamedAndLeavesNothingInDevShm) {
  const int world = 2;
  auto job = make_job("setup");
  auto status = run_processes(world, [&](int rank) {
    if (rank == 0) {
      rlimit none{0, 0}, small{1 << 20, 1 << 20};  // the segment is 32 MiB
      setrlimit(RLIMIT_CORE, &none);
      setrlimit(RLIMIT_FSIZE, &small);
      auto pg = join(job, rank, world, /*timeout_s=*/60, /*rendezvous_timeout_s=*/60);
      return 50;  // must not get here
    }
    return expect_setup_death_named(job, rank, world, /*dead=*/0, /*bound_s=*/5.0);
  });
  EXPECT_TRUE(WIFSIGNALED(status[0]) && WTERMSIG(status[0]) == SIGXFSZ)
      << "rank 0 ended with status " << status[0];
  expect_exit_zero(status, /*skip=*/0);
  EXPECT_TRUE(shm_test::shm_entries(job.id).empty()) << "segment left in /dev/shm";
}

// SIGTERM reaches rank 0 while it waits in the set-up of a shared reduction buffer (rank 1
// has not come yet): it ends at once. Rank 1 then comes, finds rank 0 dead, names it well
// before the rendezvous timeout, and removes the buffer's name from /dev/shm.
TEST(ShmProcessFaults, SigtermDuringBufferSetupEndsTheRankAndItsPeerNamesIt) {
  const int world = 2;
  auto job = make_job("sigterm");
  int joined[2], go[2];
  ASSERT_EQ(pipe(joined), 0);
  ASSERT_EQ(pipe(go), 0);
  auto status = run_processes(
      world,
      [&](int rank) {
        close(joined[0]);
        close(go[1]);
        auto pg = join(job, rank, world, /*timeout_s=*/60, /*rendezvous_timeout_s=*/60);
        char c = 'j';
        if (write(joined[1], &c, 1) != 1) return 30;
        close(joined[1]);
        if (rank == 0) {
          pg->new_buffer(1000, at::kFloat);  // waits for rank 1 until SIGTERM
          return 52;  // must not get here
        }
        if (read(go[0], &c, 1) != 0) return 31;  // until the parent closes it: rank 0 is dead
        auto start = std::chrono::steady_clock::now();
        try {
          // Rank 0 may have mapped the buffer before it died: then the setup completes and
          // the first collective on it names the dead rank instead.
          auto buffer = pg->new_buffer(1000, at::kFloat);
          pg->allreduce(buffer)->wait();
          return 53;
        } catch (const lockstep::CommError& e) {
          double s =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          std::string what = e.what();
          if (what.find("[rank 1/2] ") == std::string::npos ||
              what.find("rank 0 (pid ") == std::string::npos ||
              what.find("died") == std::string::npos || s > 5.0) {
            fprintf(stderr, "rank 1 after %.2f s: %s\n", s, what.c_str());
            return 54;
          }
          return 0;
        }
      },
      [&](const std::vector<pid_t>& pids) {
        close(joined[1]);
        close(go[0]);
        char c;
        int got = 0;
        while (got < 2 && read(joined[0], &c, 1) == 1) ++got;
        close(joined[0]);
        // Rank 0 is in the buffer's set-up once the buffer exists in /dev/shm (the segment's
        // name is gone by then: it is unlinked before join returns).
        auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(30);
        while (shm_test::shm_entries(job.id).empty() && std::chrono::steady_clock::now() < limit) {
          std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling /dev/shm
        }
        EXPECT_FALSE(shm_test::shm_entries(job.id).empty()) << "rank 0 never created the buffer";
        auto sent = std::chrono::steady_clock::now();
        kill(pids[0], SIGTERM);
        siginfo_t info{};
        // WNOWAIT: run_processes reaps it
        while (waitid(P_PID, pids[0], &info, WEXITED | WNOHANG | WNOWAIT) == 0 &&
               info.si_pid == 0 &&
               std::chrono::steady_clock::now() - sent < std::chrono::seconds(10)) {
          std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling the child
        }
        double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - sent).count();
        EXPECT_LT(s, 2.0) << "rank 0 still running " << s << " s after SIGTERM";
        close(go[1]);  // rank 1 goes on to the buffer's set-up
      });
  EXPECT_TRUE(WIFSIGNALED(status[0]) && WTERMSIG(status[0]) == SIGTERM)
      << "rank 0 ended with status " << status[0];
  expect_exit_zero(status, /*skip=*/0);
  EXPECT_TRUE(shm_test::shm_entries(job.id).empty()) << "buffer left in /dev/shm";
}

// send / recv on the shm channel: a peer that is stopped is named as stopped when the recv
// times out, and once resumed its message arrives (the channel stays usable); a peer that
// dies is named as dead by a waiting recv and by a send that waits for room, well before the
// timeout.
TEST(ShmProcessFaults, SendRecvNameAStoppedAndADeadPeer) {
  auto job = make_job("p2p");
  auto status = run_processes(2, [&](int rank) {
    auto pg = join(job, rank, 2, /*timeout_s=*/3);
    auto t = at::zeros({3});
    pg->barrier()->wait();
    if (rank == 1) {
      raise(SIGSTOP);  // rank 0 resumes it after its recv timed out
      pg->send(at::full({3}, 7.0f), 0, 1)->wait();
      pg->barrier()->wait();
      raise(SIGKILL);
    }
    try {
      pg->recv(t, 1, 1)->wait();
      fprintf(stderr, "recv from a stopped rank: no error\n");
      return 10;
    } catch (const lockstep::TimeoutError& e) {
      const std::string what = e.what();
      const auto at = what.find("(pid ");
      const std::string want = "[rank 0/2] recv from rank 1 (tag 1, 3 x Float) via shm timed "
                               "out after 3 s: rank 1 (pid ";
      if (what.compare(0, want.size(), want) != 0 || at == std::string::npos ||
          what.find(") is stopped (SIGSTOP, Ctrl-Z or a debugger). Resume it with SIGCONT or "
                    "kill it.") == std::string::npos) {
        fprintf(stderr, "wrong message for a stopped peer: %s\n", what.c_str());
        return 11;
      }
      kill(std::atoi(what.c_str() + at + 5), SIGCONT);
    }
    pg->recv(t, 1, 1)->wait();
    if (!at::equal(t, at::full({3}, 7.0f))) return 12;
    pg->barrier()->wait();  // rank 1 dies after it
    const auto start = std::chrono::steady_clock::now();
    auto expect_died = [&](const lockstep::WorkPtr& work, const std::string& want) {
      try {
        work->wait();
        fprintf(stderr, "no error although rank 1 died: %s\n", want.c_str());
        return 20;
      } catch (const lockstep::CommError& e) {
        const std::string what = e.what();
        const double s =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (what.compare(0, want.size(), want) != 0 ||
            what.find(") died while this rank waited for it. Check rank 1's log (killed, out of "
                      "memory?).") == std::string::npos || s > 2.5) {
          fprintf(stderr, "after %.2f s: %s\n", s, what.c_str());
          return 21;
        }
      }
      return 0;
    };
    const int recv_code = expect_died(
        pg->recv(t, 1, 2), "[rank 0/2] recv from rank 1 (tag 2, 3 x Float) via shm: rank 1 (pid ");
    if (recv_code != 0) return recv_code;
    return expect_died(pg->send(at::zeros({1 << 20}), 1, 3),
                       "[rank 0/2] send to rank 1 (tag 3, 1048576 x Float) via shm: rank 1 (pid ");
  });
  expect_exit_zero(status, /*skip=*/1);
  EXPECT_TRUE(WIFSIGNALED(status[1]) && WTERMSIG(status[1]) == SIGKILL);
  EXPECT_TRUE(shm_test::shm_entries(job.id).empty()) << "channel left in /dev/shm";
}

}  // namespace
