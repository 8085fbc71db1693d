#pragma once
// Note [The campaign's leak check]
// Every test of a binary that includes this header ends with two checks, whatever it tested:
// no process it started outlives it, and it left nothing of lockstep in /dev/shm.
// - Processes: the test binary makes itself a child subreaper (prctl), so a worker orphaned
//   by a dead launcher is re-parented to the test, not to init; at the end of each test any
//   living child is a leak: the check names it (pid and command line), kills it and fails the
//   test. Zombies are reaped.
// - /dev/shm: entries named "lockstep*" that appeared during the test and are still there
//   throughout the next 2 s are a leak (other test binaries running at the same time create
//   segments too, but unlink them within their set-up).
// The checks run in a gtest listener's OnTestEnd, which may raise failures (googletest's
// sample10 does the same for memory leaks).
#include <dirent.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace lockstep_test {

/// Entries of /dev/shm whose name starts with "lockstep".
inline std::set<std::string> lockstep_shm_entries() {
  std::set<std::string> out;
  if (DIR* d = opendir("/dev/shm")) {
    while (dirent* e = readdir(d)) {
      std::string name = e->d_name;
      if (name.rfind("lockstep", 0) == 0) out.insert(name);
    }
    closedir(d);
  }
  return out;
}

/// Living (not zombie) children of this process: pid and command line.
inline std::vector<std::pair<pid_t, std::string>> living_children() {
  std::vector<std::pair<pid_t, std::string>> out;
  const pid_t me = getpid();
  DIR* d = opendir("/proc");
  if (!d) return out;
  while (dirent* e = readdir(d)) {
    const pid_t pid = static_cast<pid_t>(std::atoi(e->d_name));
    if (pid <= 0) continue;
    std::ifstream stat("/proc/" + std::string(e->d_name) + "/stat");
    std::string line;
    std::getline(stat, line);
    const auto paren = line.rfind(')');
    if (paren == std::string::npos) continue;
    std::istringstream rest(line.substr(paren + 2));
    char state = 0;
    pid_t ppid = 0;
    rest >> state >> ppid;
    if (ppid != me || state == 'Z' || state == 'X') continue;
    std::ifstream cmd("/proc/" + std::string(e->d_name) + "/cmdline");
    std::string c((std::istreambuf_iterator<char>(cmd)), std::istreambuf_iterator<char>());
    for (auto& ch : c) ch = ch == '\0' ? ' ' : ch;
    out.emplace_back(pid, c);
  }
  closedir(d);
  return out;
}

class NoLeaksListener : public ::testing::EmptyTestEventListener {
 public:
  void OnTestStart(const ::testing::TestInfo&) override { shm_before_ = lockstep_shm_entries(); }

  void OnTestEnd(const ::testing::TestInfo&) override {
    // Reap what already exited (orphans re-parented to us included).
    while (waitpid(-1, nullptr, WNOHANG) > 0) {
    }
    for (const auto& [pid, cmd] : living_children()) {
      ADD_FAILURE() << "leak check: process " << pid << " (" << cmd
                    << ") outlived the test that started it; killed now";
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
    std::set<std::string> fresh;
    for (const auto& n : lockstep_shm_entries()) {
      if (!shm_before_.count(n)) fresh.insert(n);
    }
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (!fresh.empty() && std::chrono::steady_clock::now() < until) {
      const auto now = lockstep_shm_entries();
      for (auto it = fresh.begin(); it != fresh.end();) it = now.count(*it) ? ++it : fresh.erase(it);
      std::this_thread::sleep_for(std::chrono::milliseconds(50));  // polling /dev/shm
    }
    for (const auto& n : fresh) {
      ADD_FAILURE() << "leak check: /dev/shm/" << n << " appeared during the test and is "
                    << "still there 2 s after it";
    }
  }

 private:
  std::set<std::string> shm_before_;
};

inline bool install_no_leaks_check() {
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  ::testing::UnitTest::GetInstance()->listeners().Append(new NoLeaksListener);
  return true;
}

// Installed before main() in every binary that includes this header.
inline const bool kNoLeaksCheckInstalled = install_no_leaks_check();

/// Prints a measured bound ("[bound] NAME: 0.41 s (limit 15 s)") for docs/reliability.md's
/// table, and records it in the test's XML properties.
inline void report_bound(const std::string& name, double seconds, double limit) {
  std::ostringstream os;
  os.precision(2);
  os << std::fixed << seconds;
  ::testing::Test::RecordProperty("bound_s", os.str());
  std::printf("[bound] %s: %s s (limit %g s)\n", name.c_str(), os.str().c_str(), limit);
  std::fflush(stdout);
}

}  // namespace lockstep_test
