// lockstep-test-worker: a worker for the launcher tests. It joins the job through
// lockstep::init_process_group (so any launcher's environment works), prints what it resolved,
// and then behaves as --mode says:
//   ok         all-reduce rank+1 once, check the sum, exit 0
//   throw      ranks in --fail-rank throw lockstep::StateError(--message)
//   exit       ranks in --fail-rank return --code
//   fail-once  like throw, but only when the restart count is 0
//   loop       all-reduce forever (until killed, stopped or signalled)
//   loop-first loop in the first round (restart count 0), then like ok: an elastic job's
//              first membership runs until it changes, the next one finishes
// --signal-dir D: on SIGTERM, create D/sigterm_rank_<r> and exit 143.
// --wait-for F: after printing "ready", wait (at most 60 s) until file F exists, then go on.
#include <ATen/ATen.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

#include "lockstep/lockstep.h"

namespace {

char g_sigterm_path[4096] = {0};

extern "C" void on_sigterm(int) {
  int fd = open(g_sigterm_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) close(fd);
  _exit(143);
}

const char* env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

int body(int argc, char** argv) {
  std::string mode = "ok";
  std::string message = "worker failed on purpose";
  std::string signal_dir;
  std::string wait_for;
  int fail_rank = -1;
  int code = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    std::string value = argv[i + 1];
    if (flag == "--mode") mode = value;
    else if (flag == "--fail-rank") fail_rank = std::stoi(value);
    else if (flag == "--code") code = std::stoi(value);
    else if (flag == "--message") message = value;
    else if (flag == "--signal-dir") signal_dir = value;
    else if (flag == "--wait-for") wait_for = value;
    else throw lockstep::InvalidArgument("lockstep-test-worker: unknown flag " + flag);
  }
  auto launch = lockstep::resolve_launch_env(lockstep::process_environment());
  if (!signal_dir.empty()) {
    auto path = signal_dir + "/sigterm_rank_" + std::to_string(launch.rank);
    std::strncpy(g_sigterm_path, path.c_str(), sizeof(g_sigterm_path) - 1);
    signal(SIGTERM, on_sigterm);
  }
  auto pg = lockstep::init_process_group();
  const int r = pg->rank();
  const int w = pg->size();
  std::cout << "resolved rank=" << r << " world=" << w << " local_rank=" << launch.local_rank
            << " local_world=" << launch.local_world_size << " node=" << launch.node_rank
            << " launcher=" << launch.launcher << " agent_store=" << launch.launcher_hosts_store
            << " restart=" << launch.restart_count << " job=" << launch.job_id << std::endl;
  std::cout << "env RANK=" << env_or("RANK", "-") << " LOCAL_RANK=" << env_or("LOCAL_RANK", "-")
            << " WORLD_SIZE=" << env_or("WORLD_SIZE", "-")
            << " LOCAL_WORLD_SIZE=" << env_or("LOCAL_WORLD_SIZE", "-")
            << " GROUP_RANK=" << env_or("GROUP_RANK", "-")
            << " MASTER_ADDR=" << env_or("MASTER_ADDR", "-")
            << " MASTER_PORT=" << env_or("MASTER_PORT", "-")
            << " OMP_NUM_THREADS=" << env_or("OMP_NUM_THREADS", "-")
            << " LOCKSTEP_ERROR_FILE=" << env_or("LOCKSTEP_ERROR_FILE", "-")
            << " LOCKSTEP_STDOUT_TTY=" << env_or("LOCKSTEP_STDOUT_TTY", "-") << std::endl;
  std::cerr << "stderr line from rank " << r << std::endl;
  // Two redraws of one line, as a progress bar makes them, then its end of line.
  std::cout << "redraw 1 of rank " << r << "\rredraw 2 of rank " << r << "\r" << std::flush;
  std::cout << "\n" << std::flush;
  std::cout << "ready rank=" << r << " pid=" << getpid() << " restart=" << launch.restart_count
            << std::endl;

  if (!wait_for.empty()) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (access(wait_for.c_str(), F_OK) != 0) {
      if (std::chrono::steady_clock::now() > until) {
        throw lockstep::TimeoutError("lockstep-test-worker: " + wait_for + " never appeared");
      }
      usleep(10000);  // polls a file the test creates; bounded above
    }
  }
  const bool chosen = fail_rank < 0 || fail_rank == r;
  if (chosen && (mode == "throw" || (mode == "fail-once" && launch.restart_count == 0))) {
    throw lockstep::StateError(message);
  }
  if (chosen && mode == "exit") return code;
  auto t = at::full({1000}, static_cast<double>(r + 1), at::kDouble);
  do {
    t.fill_(r + 1);
    pg->allreduce(t, lockstep::ReduceOp::kSum)->wait();
    const double expected = w * (w + 1) / 2.0;
    if (t.min().item<double>() != expected || t.max().item<double>() != expected) {
      throw lockstep::InternalError(pg->where() + " wrong all-reduce sum");
    }
  } while (mode == "loop" || (mode == "loop-first" && launch.restart_count == 0));
  pg->barrier()->wait();
  std::cout << "done rank=" << r << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return lockstep::run_main([&] { return body(argc, argv); });
}
