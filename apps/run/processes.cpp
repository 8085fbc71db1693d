// lockstep-run's process plumbing (see processes.h).
#include "processes.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sstream>

#include "lockstep/errors.h"

namespace lockstep {
namespace run {
namespace {

using detail::concat;

int g_signal_pipe[2] = {-1, -1};

extern "C" void on_signal(int sig) {
  int saved = errno;
  unsigned char byte = static_cast<unsigned char>(sig);
  if (g_signal_pipe[1] >= 0) (void)!write(g_signal_pipe[1], &byte, 1);
  errno = saved;
}

}  // namespace

namespace signals {

void install() {
  if (g_signal_pipe[0] >= 0) return;
  if (pipe2(g_signal_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
    throw CommError(concat("pipe: ", std::strerror(errno)));
  }
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGCHLD}) sigaction(sig, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
}

int fd() { return g_signal_pipe[0]; }

std::vector<int> wait(std::chrono::milliseconds timeout) {
  pollfd p{g_signal_pipe[0], POLLIN, 0};
  std::vector<int> got;
  if (poll(&p, 1, static_cast<int>(timeout.count())) > 0) {
    unsigned char buf[64];
    ssize_t n = read(g_signal_pipe[0], buf, sizeof(buf));
    for (ssize_t i = 0; i < n; ++i) got.push_back(buf[i]);
  }
  return got;
}

}  // namespace signals

void Stream::flush() {
  std::string out = relay_rest(relay, prefix, terminal);
  if (console && !out.empty()) write_all(out_fd, out);
}

void Stream::close() {
  if (fd < 0) return;
  flush();
  ::close(fd);
  fd = -1;
  if (log_fd >= 0) ::close(log_fd);
  log_fd = -1;
}

void Stream::pump() {
  char buf[65536];
  while (fd >= 0) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) {  // end of file or an error: the worker closed the stream
      close();
      return;
    }
    if (log_fd >= 0) write_all(log_fd, std::string(buf, static_cast<size_t>(n)));
    std::string out = run::relay(relay, std::string(buf, static_cast<size_t>(n)), prefix, terminal);
    if (!out.empty() && console) write_all(out_fd, out);
    if (relay.pending.size() > 65536) flush();  // a very long line without an end
  }
}

WorkerProcess::~WorkerProcess() {
  for (auto& s : streams_) s.close();
}

void WorkerProcess::start(const ProcessSpec& spec) {
  std::vector<std::string> env_strings;
  for (const auto& [name, value] : spec.env) env_strings.push_back(name + "=" + value);
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> arg_strings = spec.argv;
  std::vector<char*> argv;
  for (auto& s : arg_strings) argv.push_back(s.data());
  argv.push_back(nullptr);

  int pipes[2][2];
  for (int s = 0; s < 2; ++s) {
    if (pipe2(pipes[s], O_CLOEXEC) != 0) {
      throw CommError(concat("pipe: ", std::strerror(errno)));
    }
    streams_[s] = Stream();
    streams_[s].fd = pipes[s][0];
    streams_[s].out_fd = s == 0 ? 1 : 2;
    streams_[s].terminal = ::isatty(streams_[s].out_fd) == 1;
    streams_[s].prefix = concat("[rank ", spec.rank, "] ");
    streams_[s].console = s == 0 ? spec.stdout_console : spec.stderr_console;
    const std::string& path = s == 0 ? spec.stdout_log : spec.stderr_log;
    if (!path.empty()) {
      streams_[s].log_fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (streams_[s].log_fd < 0) {
        throw InvalidArgument(concat("cannot write ", path, ": ", std::strerror(errno)));
      }
    }
  }
  std::string exec_error = concat("lockstep-run: cannot execute ", spec.path, "\n");
  long max_fd = sysconf(_SC_OPEN_MAX);
  pid_t parent = getpid();

  sigset_t all, old;
  sigfillset(&all);
  sigprocmask(SIG_BLOCK, &all, &old);
  pid_t pid = fork();
  if (pid == 0) {
    // Child: async-signal-safe calls only until execve.
    for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGCHLD, SIGPIPE}) ::signal(sig, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(128 + SIGKILL);  // the launcher died before prctl
    int null_fd = open("/dev/null", O_RDONLY);
    if (null_fd >= 0) dup2(null_fd, 0);
    dup2(pipes[0][1], 1);
    dup2(pipes[1][1], 2);
    if (syscall(SYS_close_range, 3U, ~0U, 0U) != 0) {
      for (long fd = 3; fd < max_fd; ++fd) ::close(static_cast<int>(fd));
    }
    execve(spec.path.c_str(), argv.data(), envp.data());
    (void)!write(2, exec_error.data(), exec_error.size());
    _exit(127);
  }
  int fork_errno = errno;
  if (pid > 0) setpgid(pid, pid);  // also here, so the group exists before we signal it
  sigprocmask(SIG_SETMASK, &old, nullptr);
  ::close(pipes[0][1]);
  ::close(pipes[1][1]);
  if (pid < 0) {
    for (auto& s : streams_) s.close();
    throw CommError(concat("fork failed for rank ", spec.rank, ": ", std::strerror(fork_errno)));
  }
  for (auto& s : streams_) fcntl(s.fd, F_SETFL, fcntl(s.fd, F_GETFL) | O_NONBLOCK);
  pid_ = pid;
  running_ = true;
}

std::optional<ProcessChange> WorkerProcess::poll() {
  if (!running_) return std::nullopt;
  int status = 0;
  if (waitpid(pid_, &status, WNOHANG | WUNTRACED | WCONTINUED) != pid_) return std::nullopt;
  using Kind = ProcessChange::Kind;
  if (WIFSTOPPED(status)) return ProcessChange{Kind::kStopped, WSTOPSIG(status)};
  if (WIFCONTINUED(status)) return ProcessChange{Kind::kContinued, 0};
  running_ = false;
  if (WIFSIGNALED(status)) return ProcessChange{Kind::kKilled, WTERMSIG(status)};
  return ProcessChange{Kind::kExited, WEXITSTATUS(status)};
}

void WorkerProcess::signal(int sig) const {
  if (pid_ <= 0) return;
  if (killpg(pid_, sig) != 0) kill(pid_, sig);
}

std::optional<std::string> find_program(const std::string& program, const EnvMap& env) {
  if (program.find('/') != std::string::npos) {
    return access(program.c_str(), X_OK) == 0 ? std::optional<std::string>(program) : std::nullopt;
  }
  auto it = env.find("PATH");
  std::string path = it == env.end() ? "/usr/local/bin:/usr/bin:/bin" : it->second;
  std::stringstream ss(path);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    std::string candidate = (dir.empty() ? "." : dir) + "/" + program;
    struct stat st {};
    if (stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
        access(candidate.c_str(), X_OK) == 0) {
      return candidate;
    }
  }
  return std::nullopt;
}

void make_dirs(const std::string& path) {
  std::string partial;
  std::stringstream ss(path);
  std::string part;
  if (!path.empty() && path[0] == '/') partial = "/";
  while (std::getline(ss, part, '/')) {
    if (part.empty()) continue;
    partial += part + "/";
    if (mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
      throw InvalidArgument(concat("cannot create directory ", partial, ": ",
                                   std::strerror(errno)));
    }
  }
}

void write_all(int fd, const std::string& text) {
  const char* p = text.data();
  size_t left = text.size();
  while (left > 0) {
    ssize_t n = write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // launcher output closed: drop, keep supervising
    p += n;
    left -= static_cast<size_t>(n);
  }
}

std::string hostname() {
  char name[256] = {0};
  gethostname(name, sizeof(name) - 1);
  return name;
}

int available_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return static_cast<int>(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
}

}  // namespace run
}  // namespace lockstep
