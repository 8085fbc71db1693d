#pragma once
// Spawning real rank processes for tests: environment, captured output, bounded waits.
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace lockstep_test {

/// A child process with stdout and stderr redirected to files in a temp dir.
struct Child {
  pid_t pid = -1;
  std::string out_path, err_path;
  int status = -1;  // waitpid status once reaped
  bool reaped = false;

  std::string out() const { return slurp(out_path); }
  std::string err() const { return slurp(err_path); }
  int exit_code() const { return reaped && WIFEXITED(status) ? WEXITSTATUS(status) : -1; }

  static std::string slurp(const std::string& path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
};

/// A fresh directory under /tmp, removed with everything in it when the object dies.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/lockstep-test-XXXXXX";
    char* dir = mkdtemp(tmpl);
    path = dir ? dir : "";
  }
  ~TempDir() {
    std::error_code ec;
    if (!path.empty()) std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  operator const std::string&() const { return path; }
};

/// Spawns argv with the current environment plus `env` (which wins).
inline Child spawn(const std::vector<std::string>& argv, const std::map<std::string, std::string>& env,
                   const std::string& dir, const std::string& name) {
  Child child;
  child.out_path = dir + "/" + name + ".out";
  child.err_path = dir + "/" + name + ".err";
  std::map<std::string, std::string> merged;
  for (char** e = environ; *e; ++e) {
    std::string s(*e);
    auto eq = s.find('=');
    if (eq != std::string::npos) merged[s.substr(0, eq)] = s.substr(eq + 1);
  }
  for (const auto& kv : env) merged[kv.first] = kv.second;
  std::vector<std::string> env_strings;
  for (const auto& kv : merged) env_strings.push_back(kv.first + "=" + kv.second);
  std::vector<char*> envp, args;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_copy = argv;
  for (auto& s : argv_copy) args.push_back(s.data());
  args.push_back(nullptr);
  // fork + execve rather than posix_spawn: on one CUDA build of LibTorch (pip 2.11) the test
  // binaries crashed inside posix_spawn (a jump to address 0) while the same helper compiled
  // alone worked. Between fork and exec the child only makes async-signal-safe calls.
  const char* out_path = child.out_path.c_str();
  const char* err_path = child.err_path.c_str();
  pid_t pid = fork();
  if (pid == 0) {
    int out = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int err = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out < 0 || err < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0) _exit(126);
    close(out);
    close(err);
    execve(args[0], args.data(), envp.data());
    _exit(127);
  }
  child.pid = pid > 0 ? pid : -1;
  return child;
}

/// Waits for `child` to exit, up to `limit`; true if it exited (then status is set).
inline bool wait_for(Child& child, std::chrono::milliseconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!child.reaped) {
    int status = 0;
    pid_t r = waitpid(child.pid, &status, WNOHANG);
    if (r == child.pid) {
      child.status = status;
      child.reaped = true;
      break;
    }
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // bounded poll of waitpid
  }
  return true;
}

/// Polls `pred` until true or `limit` passes.
template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

/// Kills and reaps a child that is still running (test clean-up).
inline void reap(Child& child) {
  if (child.pid > 0 && !child.reaped) {
    kill(child.pid, SIGKILL);
    wait_for(child, std::chrono::seconds(5));
  }
}

/// A free loopback port (bound then released) for a store to listen on.
inline int free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  int port = ntohs(addr.sin_port);
  close(fd);
  return port;
}

/// A loopback socket listening on an ephemeral port (keeps the port busy while open).
inline int listen_on_ephemeral(int* port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  listen(fd, 4);
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  *port = ntohs(addr.sin_port);
  return fd;
}

}  // namespace lockstep_test
