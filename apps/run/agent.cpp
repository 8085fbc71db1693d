// The lockstep-run agent (see agent.h).
#include "agent.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "lockstep/env_vars.h"
#include "lockstep/errors.h"
#include "lockstep/store.h"

namespace lockstep {
namespace run {
namespace {

// Note [lockstep-run rounds]
// One attempt of the job is a *round* r (0, 1, ... max_restarts). The agent on node 0 hosts a
// TCP store for the whole run, so it outlives every worker; agents on other nodes and every
// worker connect to it as clients. Keys live under "lockstep-run/<run-id>/<r>/":
//   1. Join: add("claim/<k>") must return 1 (a second agent with node rank k fails), then
//      set("node/<k>", "<nproc> <host>"). Each agent polls until all nnodes nodes joined
//      (deadline --rdzv-timeout) and takes world size = sum of nproc and its rank offset =
//      sum over lower node ranks, so nodes may run different numbers of workers.
//   2. Run: workers start with LOCKSTEP_RESTART_COUNT=r, so their own rendezvous (keys
//      "lockstep/<run-id>/<r>/...") never sees a previous round's keys.
//   3. Fail fast: the first agent that sees a failure (a worker exits non-zero or dies, or the
//      agent gets SIGINT/SIGTERM/SIGHUP) wins add("failed", 1) == 1 and writes "failure" (JSON:
//      rank, node, host, pid, exit code or signal, the worker's error file). Every agent polls
//      "failed" every --monitor-interval and stops its workers: SIGTERM (+SIGCONT for stopped
//      ones) to each worker's process group, SIGKILL after --grace-period.
//   4. Success: an agent whose workers all exited 0 sets "done/<k>" and waits for every node's
//      "done" (or a "failed": a remote failure fails the round for everyone).
//   5. A failed round with restarts left starts round r+1 on every node; otherwise each agent
//      prints the summary of the first failure and exits with its code.
//   6. Before exiting, each agent sets "exit/<k>"; node 0 waits (bounded) for all of them, so
//      no agent loses the store while it still reads the outcome.
// Workers get PR_SET_PDEATHSIG(SIGKILL) and their own process group: if the agent dies, they
// die; when it stops them, their children go too.

using Clock = std::chrono::steady_clock;
using detail::concat;
using nlohmann::json;

int g_signal_pipe[2] = {-1, -1};

extern "C" void on_signal(int sig) {
  int saved = errno;
  unsigned char byte = static_cast<unsigned char>(sig);
  if (g_signal_pipe[1] >= 0) (void)!write(g_signal_pipe[1], &byte, 1);
  errno = saved;
}

std::string signal_name(int sig) {
  const char* abbrev = sigabbrev_np(sig);
  return abbrev ? concat("SIG", abbrev) : concat("signal ", sig);
}

std::string hostname() {
  char name[256] = {0};
  gethostname(name, sizeof(name) - 1);
  return name;
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

class Say {
 public:
  explicit Say(bool quiet) : quiet_(quiet) {}
  void progress(const std::string& line) const {
    if (!quiet_) write_all(2, "[lockstep-run] " + line + "\n");
  }
  void always(const std::string& line) const { write_all(2, "[lockstep-run] " + line + "\n"); }

 private:
  bool quiet_;
};

// Fails with one line when `port` is taken, before c10d's TCPStore logs its own bind
// warnings; binds like TCPStore does (SO_REUSEADDR), so a port in TIME_WAIT still counts free.
void check_port_free(int port) {
  if (port == 0) return;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  int rc = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  int err = errno;
  close(fd);
  if (rc != 0 && err == EADDRINUSE) {
    throw CommError(concat("cannot host the rendezvous store: --master-port ", port,
                           " is already in use on this host; pick another port, or use "
                           "--standalone (or --master-port 0) for a free one"));
  }
}

// The program's path, searched in PATH like execvp, resolved before fork.
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

// One line per stream, prefixed with the rank; partial lines wait for their newline.
struct Stream {
  int fd = -1;
  int out_fd = 1;     // launcher's stdout or stderr
  int log_fd = -1;    // per-rank file, when --log-dir
  std::string pending;
  std::string last_line;
};

struct Worker {
  int local_rank = 0;
  int rank = 0;
  pid_t pid = -1;
  bool running = false;
  bool stopped_reported = false;
  int status = 0;
  std::string error_file;
  Stream streams[2];
};

struct Failure {
  int rank = -1;
  int local_rank = -1;
  int node = 0;
  std::string host;
  long pid = 0;
  int exit_code = 0;  // when exited
  int signal = 0;     // when killed
  std::string type;
  std::string message;
  std::string last_stderr;
  std::string what;  // for launcher-level failures ("node 1's launcher got SIGTERM")

  int code() const { return signal ? 128 + signal : exit_code; }
  std::string exit_text() const {
    return signal ? concat("killed by ", signal_name(signal), " (exit code ", 128 + signal, ")")
                  : concat("exit code ", exit_code);
  }
  json to_json() const {
    return {{"rank", rank},       {"local_rank", local_rank}, {"node", node},
            {"host", host},       {"pid", pid},               {"exit_code", exit_code},
            {"signal", signal},   {"type", type},             {"message", message},
            {"last_stderr", last_stderr}, {"what", what}};
  }
  static Failure from_json(const json& j) {
    Failure f;
    f.rank = j.value("rank", -1);
    f.local_rank = j.value("local_rank", -1);
    f.node = j.value("node", 0);
    f.host = j.value("host", "");
    f.pid = j.value("pid", 0L);
    f.exit_code = j.value("exit_code", 1);
    f.signal = j.value("signal", 0);
    f.type = j.value("type", "");
    f.message = j.value("message", "");
    f.last_stderr = j.value("last_stderr", "");
    f.what = j.value("what", "");
    return f;
  }
};

enum class Outcome { kSuccess, kFailure, kStopSignal, kStoreLost };

class Agent {
 public:
  Agent(const RunOptions& options, const EnvMap& env, int cpu_count)
      : o_(options), env_(env), cpus_(cpu_count), say_(options.quiet), host_(hostname()) {}

  int run();

 private:
  std::string key(const std::string& name) const {
    return concat("lockstep-run/", o_.run_id, "/", round_, "/", name);
  }
  std::chrono::milliseconds interval() const {
    return std::chrono::milliseconds(std::max<long>(1, static_cast<long>(o_.monitor_interval * 1000)));
  }
  // Waits up to `timeout` for a signal; returns the signals received.
  std::vector<int> wait_signals(std::chrono::milliseconds timeout);
  bool join_round(RoundLayout& layout);
  void spawn(Worker& w, const RoundLayout& layout);
  Outcome supervise();
  void reap();
  void pump(Stream& s, const Worker& w);
  void flush(Stream& s, const Worker& w);
  void begin_stop(int sig);
  Failure local_failure(const Worker& w) const;
  static bool secondary(const Failure& f) { return f.type == "lockstep::CommError"; }
  Clock::duration settle_window() const {
    return std::chrono::milliseconds(static_cast<long>(std::min(1.0, o_.grace_period) * 1000));
  }
  void publish(const Failure& f);
  std::optional<Failure> remote_failure();
  bool others_done();
  void print_summary(const std::string& headline);
  void exit_handshake();
  void cleanup_files();

  RunOptions o_;
  EnvMap env_;
  int cpus_;
  Say say_;
  std::string host_;
  std::string program_path_;
  std::unique_ptr<Store> store_;
  std::string files_dir_;
  bool temp_files_ = false;
  int round_ = 0;
  std::vector<Worker> workers_;
  std::optional<Failure> failure_;     // first failure of this round
  std::optional<Failure> candidate_;   // local failure waiting out the settle window
  Clock::time_point settle_until_;
  int stop_signal_ = 0;                // SIGINT/SIGTERM/SIGHUP received
  bool stopping_ = false;
  Clock::time_point kill_at_;
  bool killed_ = false;
};

std::vector<int> Agent::wait_signals(std::chrono::milliseconds timeout) {
  pollfd p{g_signal_pipe[0], POLLIN, 0};
  std::vector<int> got;
  if (poll(&p, 1, static_cast<int>(timeout.count())) > 0) {
    unsigned char buf[64];
    ssize_t n = read(g_signal_pipe[0], buf, sizeof(buf));
    for (ssize_t i = 0; i < n; ++i) got.push_back(buf[i]);
  }
  return got;
}

bool Agent::join_round(RoundLayout& layout) {
  if (store_->add(key(concat("claim/", o_.node_rank)), 1) > 1) {
    throw InvalidArgument(concat("node rank ", o_.node_rank, " joined round ", round_,
                                 " twice: every launcher needs a distinct --node-rank"));
  }
  store_->set(key(concat("node/", o_.node_rank)), concat(o_.nproc_per_node, " ", host_));
  auto deadline = Clock::now() + std::chrono::milliseconds(static_cast<long>(o_.rdzv_timeout * 1000));
  std::vector<int> nproc(o_.nnodes, -1);
  int missing = o_.nnodes;
  while (true) {
    for (int k = 0; k < o_.nnodes; ++k) {
      if (nproc[k] >= 0 || !store_->check({key(concat("node/", k))})) continue;
      nproc[k] = std::stoi(store_->get(key(concat("node/", k))));
      --missing;
    }
    if (missing == 0) break;
    if (Clock::now() >= deadline) {
      std::string absent;
      for (int k = 0; k < o_.nnodes; ++k) {
        if (nproc[k] < 0) absent += (absent.empty() ? "" : ", ") + std::to_string(k);
      }
      throw TimeoutError(concat("round ", round_, ": node(s) ", absent, " of ", o_.nnodes,
                                " did not join within ", o_.rdzv_timeout, " s at ",
                                store_->describe(), ". Start a launcher with each --node-rank "
                                "and the same --master-addr/--master-port/--run-id, or raise "
                                "--rdzv-timeout."));
    }
    for (int sig : wait_signals(interval())) {
      if (sig == SIGINT || sig == SIGTERM || sig == SIGHUP) {
        stop_signal_ = sig;
        return false;
      }
    }
  }
  layout.world_size = 0;
  layout.rank_offset = 0;
  for (int k = 0; k < o_.nnodes; ++k) {
    if (k < o_.node_rank) layout.rank_offset += nproc[k];
    layout.world_size += nproc[k];
  }
  layout.restart_count = round_;
  return true;
}

void Agent::spawn(Worker& w, const RoundLayout& layout) {
  std::string dir = concat(files_dir_, "/attempt_", round_, "/rank_", w.rank);
  make_dirs(dir);
  w.error_file = dir + "/error.json";
  unlink(w.error_file.c_str());
  EnvMap env = env_;
  for (auto& [name, value] : worker_env(o_, layout, w.local_rank, w.error_file, env_, cpus_)) {
    env[name] = value;
  }
  std::vector<std::string> env_strings;
  for (auto& [name, value] : env) env_strings.push_back(name + "=" + value);
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> arg_strings = {o_.program};
  arg_strings.insert(arg_strings.end(), o_.args.begin(), o_.args.end());
  std::vector<char*> argv;
  for (auto& s : arg_strings) argv.push_back(s.data());
  argv.push_back(nullptr);

  int pipes[2][2];
  for (int s = 0; s < 2; ++s) {
    if (pipe2(pipes[s], O_CLOEXEC) != 0) {
      throw CommError(concat("pipe: ", std::strerror(errno)));
    }
    w.streams[s] = Stream();
    w.streams[s].fd = pipes[s][0];
    w.streams[s].out_fd = s == 0 ? 1 : 2;
    if (!o_.log_dir.empty()) {
      auto path = dir + (s == 0 ? "/stdout.log" : "/stderr.log");
      w.streams[s].log_fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (w.streams[s].log_fd < 0) {
        throw InvalidArgument(concat("cannot write ", path, ": ", std::strerror(errno)));
      }
    }
  }
  std::string exec_error = concat("lockstep-run: cannot execute ", program_path_, "\n");
  long max_fd = sysconf(_SC_OPEN_MAX);
  pid_t parent = getpid();

  sigset_t all, old;
  sigfillset(&all);
  sigprocmask(SIG_BLOCK, &all, &old);
  pid_t pid = fork();
  if (pid == 0) {
    // Child: async-signal-safe calls only until execve.
    for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGCHLD, SIGPIPE}) signal(sig, SIG_DFL);
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
      for (long fd = 3; fd < max_fd; ++fd) close(static_cast<int>(fd));
    }
    execve(program_path_.c_str(), argv.data(), envp.data());
    (void)!write(2, exec_error.data(), exec_error.size());
    _exit(127);
  }
  int fork_errno = errno;
  if (pid > 0) setpgid(pid, pid);
  sigprocmask(SIG_SETMASK, &old, nullptr);
  close(pipes[0][1]);
  close(pipes[1][1]);
  if (pid < 0) {
    close(pipes[0][0]);
    close(pipes[1][0]);
    throw CommError(concat("fork failed for rank ", w.rank, ": ", std::strerror(fork_errno)));
  }
  for (auto& s : w.streams) fcntl(s.fd, F_SETFL, fcntl(s.fd, F_GETFL) | O_NONBLOCK);
  w.pid = pid;
  w.running = true;
  w.stopped_reported = false;
}

void Agent::flush(Stream& s, const Worker& w) {
  if (s.pending.empty()) return;
  s.last_line = s.pending;
  write_all(s.out_fd, concat("[rank ", w.rank, "] ", s.pending, "\n"));
  s.pending.clear();
}

void Agent::pump(Stream& s, const Worker& w) {
  char buf[65536];
  while (true) {
    ssize_t n = read(s.fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) {  // EOF or error: the worker closed the stream
      flush(s, w);
      if (s.log_fd >= 0) close(s.log_fd);
      close(s.fd);
      s.fd = -1;
      s.log_fd = -1;
      return;
    }
    if (s.log_fd >= 0) write_all(s.log_fd, std::string(buf, static_cast<size_t>(n)));
    s.pending.append(buf, static_cast<size_t>(n));
    std::string out;
    size_t start = 0;
    for (size_t nl; (nl = s.pending.find('\n', start)) != std::string::npos; start = nl + 1) {
      s.last_line = s.pending.substr(start, nl - start);
      out += concat("[rank ", w.rank, "] ", s.last_line, "\n");
    }
    s.pending.erase(0, start);
    if (s.pending.size() > 65536) flush(s, w);  // a very long line without a newline
    if (!out.empty()) write_all(s.out_fd, out);
  }
}

Failure Agent::local_failure(const Worker& w) const {
  Failure f;
  f.rank = w.rank;
  f.local_rank = w.local_rank;
  f.node = o_.node_rank;
  f.host = host_;
  f.pid = w.pid;
  if (WIFSIGNALED(w.status)) {
    f.signal = WTERMSIG(w.status);
  } else {
    f.exit_code = WEXITSTATUS(w.status);
  }
  f.last_stderr = w.streams[1].last_line;
  std::ifstream in(w.error_file);
  if (in) {
    try {
      json j = json::parse(in);
      f.type = j.value("type", "");
      f.message = j.value("message", "");
    } catch (const std::exception& e) {
      f.message = concat("(unreadable error file ", w.error_file, ": ", e.what(), ")");
    }
  }
  return f;
}

void Agent::publish(const Failure& f) {
  // The first agent to fail writes the failure every node reports (Note [lockstep-run rounds]).
  try {
    if (store_->add(key("failed"), 1) == 1) {
      store_->set(key("failure"), f.to_json().dump());
      failure_ = f;
    } else {
      failure_ = Failure::from_json(json::parse(store_->get(key("failure"))));
    }
  } catch (const std::exception&) {
    failure_ = f;  // store gone: report what we saw
  }
}

std::optional<Failure> Agent::remote_failure() {
  if (!store_->check({key("failed")})) return std::nullopt;
  return Failure::from_json(json::parse(store_->get(key("failure"))));
}

void Agent::begin_stop(int sig) {
  if (stopping_) return;
  stopping_ = true;
  kill_at_ = Clock::now() + std::chrono::milliseconds(static_cast<long>(o_.grace_period * 1000));
  for (auto& w : workers_) {
    if (!w.running) continue;
    if (killpg(w.pid, sig) != 0) kill(w.pid, sig);
    killpg(w.pid, SIGCONT);  // a stopped worker handles SIGTERM only once continued
  }
}

void Agent::reap() {
  for (auto& w : workers_) {
    if (!w.running) continue;
    int status = 0;
    pid_t r = waitpid(w.pid, &status, WNOHANG | WUNTRACED | WCONTINUED);
    if (r != w.pid) continue;
    if (WIFSTOPPED(status)) {
      if (!w.stopped_reported) {
        say_.always(concat("rank ", w.rank, " (pid ", w.pid, ") was stopped by ",
                           signal_name(WSTOPSIG(status)), "; its peers will time out"));
        w.stopped_reported = true;
      }
      continue;
    }
    if (WIFCONTINUED(status)) continue;
    w.running = false;
    w.status = status;
    bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (ok || failure_ || stopping_) continue;
    // Note [Root cause]: a worker that throws closes its sockets while unwinding, before it
    // reports, so a peer's "connection reset" (CommError) often exits first. A CommError
    // first failure waits a short settle window for a root cause to show up.
    Failure f = local_failure(w);
    if (!candidate_ || (secondary(*candidate_) && !secondary(f))) {
      candidate_ = f;
      settle_until_ = Clock::now() + (secondary(f) ? settle_window() : Clock::duration(0));
    }
  }
}

Outcome Agent::supervise() {
  auto next_check = Clock::now();
  Outcome outcome = Outcome::kSuccess;
  std::optional<Clock::time_point> drain_until;
  while (true) {
    bool any_running = false;
    std::vector<pollfd> fds = {{g_signal_pipe[0], POLLIN, 0}};
    std::vector<std::pair<Worker*, Stream*>> owners = {{nullptr, nullptr}};
    for (auto& w : workers_) {
      any_running |= w.running;
      for (auto& s : w.streams) {
        if (s.fd < 0) continue;
        fds.push_back({s.fd, POLLIN, 0});
        owners.emplace_back(&w, &s);
      }
    }
    if (!any_running) {
      // Every worker is gone; drain what their children may still write, bounded.
      if (fds.size() == 1) break;
      if (!drain_until) drain_until = Clock::now() + std::chrono::seconds(2);
      if (Clock::now() >= *drain_until) {
        for (auto& [w, s] : owners) {
          if (s) {
            flush(*s, *w);
            close(s->fd);
            s->fd = -1;
            if (s->log_fd >= 0) close(s->log_fd);
            s->log_fd = -1;
          }
        }
        break;
      }
    }
    auto now = Clock::now();
    auto wake = next_check;
    if (stopping_ && !killed_) wake = std::min(wake, kill_at_);
    if (candidate_ && !failure_) wake = std::min(wake, settle_until_);
    if (drain_until) wake = std::min(wake, *drain_until);
    int timeout_ms = static_cast<int>(std::max<long>(
        0, std::chrono::duration_cast<std::chrono::milliseconds>(wake - now).count() + 1));
    int ready = poll(fds.data(), fds.size(), timeout_ms);
    if (ready < 0 && errno != EINTR) throw CommError(concat("poll: ", std::strerror(errno)));
    for (size_t i = 1; ready > 0 && i < fds.size(); ++i) {
      if (fds[i].revents) pump(*owners[i].second, *owners[i].first);
    }
    if (ready > 0 && (fds[0].revents & POLLIN)) {
      for (int sig : wait_signals(std::chrono::milliseconds(0))) {
        if (sig == SIGCHLD) continue;  // reaped below in every iteration
        if (stop_signal_ == sig || killed_) {
          say_.always(concat("second ", signal_name(sig), ": killing the workers now"));
          kill_at_ = Clock::now();
        } else if (!stop_signal_) {
          stop_signal_ = sig;
          say_.always(concat("received ", signal_name(sig), ": forwarding it to ",
                             workers_.size(), " worker(s); SIGKILL in ", o_.grace_period, " s"));
          Failure f;
          f.node = o_.node_rank;
          f.host = host_;
          f.pid = getpid();
          f.signal = sig;
          f.what = concat("node ", o_.node_rank, "'s launcher (", host_, ", pid ", getpid(),
                          ") received ", signal_name(sig));
          if (!failure_ && !stopping_) publish(f);
          stopping_ = false;  // forward this signal even if a SIGTERM went out already
          begin_stop(sig);
        }
      }
    }
    reap();
    if (candidate_ && !failure_ && !stopping_ && Clock::now() >= settle_until_) {
      publish(*candidate_);
      begin_stop(SIGTERM);
    }
    if (stopping_ && !killed_ && Clock::now() >= kill_at_) {
      for (auto& w : workers_) {
        if (w.running) {
          say_.always(concat("rank ", w.rank, " (pid ", w.pid, ") did not exit within ",
                             o_.grace_period, " s of SIGTERM: sending SIGKILL"));
          if (killpg(w.pid, SIGKILL) != 0) kill(w.pid, SIGKILL);
        }
      }
      killed_ = true;
    }
    if (Clock::now() >= next_check) {
      next_check = Clock::now() + interval();
      if (!failure_ && o_.nnodes > 1) {
        try {
          if (auto remote = remote_failure()) {
            failure_ = remote;
            say_.progress(concat("node ", remote->node, " reported a failure: stopping local workers"));
            begin_stop(SIGTERM);
          }
        } catch (const std::exception& e) {
          Failure f;
          f.node = o_.node_rank;
          f.exit_code = kExitLauncherError;
          f.what = concat("lost the rendezvous store ", store_->describe(), ": ", e.what());
          failure_ = f;
          outcome = Outcome::kStoreLost;
          begin_stop(SIGTERM);
        }
      }
    }
  }
  if (outcome == Outcome::kStoreLost) return outcome;
  if (stop_signal_) return Outcome::kStopSignal;
  return failure_ ? Outcome::kFailure : Outcome::kSuccess;
}

bool Agent::others_done() {
  // Local workers all succeeded: wait for the other nodes, or for a failure anywhere.
  store_->set(key(concat("done/", o_.node_rank)), "1");
  if (o_.nnodes == 1) return true;
  std::vector<std::string> keys;
  for (int k = 0; k < o_.nnodes; ++k) keys.push_back(key(concat("done/", k)));
  while (true) {
    if (auto remote = remote_failure()) {
      failure_ = remote;
      return false;
    }
    if (store_->check(keys)) return true;
    for (int sig : wait_signals(interval())) {
      if (sig == SIGINT || sig == SIGTERM || sig == SIGHUP) {
        stop_signal_ = sig;
        return false;
      }
    }
  }
}

void Agent::print_summary(const std::string& headline) {
  const Failure& f = *failure_;
  say_.always("==================== " + headline + " ====================");
  if (f.rank >= 0) {
    say_.always(concat("first failure: rank ", f.rank, " (local rank ", f.local_rank, ", node ",
                       f.node, ") on host ", f.host, ", pid ", f.pid));
    say_.always(concat("  exit:  ", f.exit_text()));
    if (!f.message.empty()) {
      say_.always(concat("  error: ", f.type.empty() ? "" : f.type + ": ", f.message));
    } else {
      say_.always(concat("  error: (none reported: the worker wrote no ", env::kErrorFile,
                         "; wrap its main in lockstep::run_main)"));
      if (!f.last_stderr.empty()) say_.always(concat("  last stderr line: ", f.last_stderr));
    }
  } else {
    say_.always(concat("first failure: ", f.what));
  }
  for (const auto& w : workers_) {
    if (w.rank == f.rank && f.node == o_.node_rank) continue;
    Failure end = local_failure(w);
    std::string error = end.message.empty() ? "" : ": " + end.type + ": " + end.message;
    if (error.size() > 240) error = error.substr(0, 237) + "...";
    say_.always(concat("  rank ", w.rank, " (pid ", w.pid, "): ",
                       end.signal || end.exit_code ? end.exit_text() : "exit code 0", error));
  }
}

void Agent::exit_handshake() {
  if (o_.nnodes == 1 || !store_) return;
  try {
    store_->set(key(concat("exit/", o_.node_rank)), "1");
    if (o_.node_rank != 0) return;
    std::vector<std::string> keys;
    for (int k = 0; k < o_.nnodes; ++k) keys.push_back(key(concat("exit/", k)));
    auto deadline = Clock::now() + std::chrono::seconds(10);
    while (!store_->check(keys) && Clock::now() < deadline) wait_signals(interval());
  } catch (const std::exception&) {
  }
}

void Agent::cleanup_files() {
  if (!temp_files_ || files_dir_.empty()) return;
  std::string cmd;  // remove the temporary tree: error files only, written by our workers
  for (int r = 0; r <= round_; ++r) {
    for (auto& w : workers_) {
      auto dir = concat(files_dir_, "/attempt_", r, "/rank_", w.rank);
      unlink((dir + "/error.json").c_str());
      rmdir(dir.c_str());
    }
    rmdir(concat(files_dir_, "/attempt_", r).c_str());
  }
  rmdir(files_dir_.c_str());
}

int Agent::run() {
  auto found = find_program(o_.program, env_);
  if (!found) {
    throw InvalidArgument(concat("program '", o_.program, "' not found or not executable",
                                 o_.program.find('/') == std::string::npos ? " in PATH" : ""));
  }
  program_path_ = *found;

  std::chrono::milliseconds timeout(static_cast<long>(o_.rdzv_timeout * 1000));
  if (o_.node_rank == 0) {
    check_port_free(o_.master_port);
    store_ = std::make_unique<Store>(Store::tcp(o_.master_addr, o_.master_port, true, timeout));
    o_.master_port = store_->port();
  } else {
    store_ = std::make_unique<Store>(Store::tcp(o_.master_addr, o_.master_port, false, timeout));
  }
  say_.progress(concat(o_.node_rank == 0 ? "hosting" : "joined", " the rendezvous store at ",
                       o_.master_addr, ":", o_.master_port, " (run id '", o_.run_id, "', node ",
                       o_.node_rank, "/", o_.nnodes, ", ", o_.nproc_per_node, " worker(s))"));

  if (o_.log_dir.empty()) {
    char tmpl[] = "/tmp/lockstep-run-XXXXXX";
    if (!mkdtemp(tmpl)) throw InvalidArgument(concat("mkdtemp: ", std::strerror(errno)));
    files_dir_ = tmpl;
    temp_files_ = true;
  } else {
    files_dir_ = concat(o_.log_dir, "/", o_.run_id);
    make_dirs(files_dir_);
  }

  int code = 0;
  for (round_ = 0;; ++round_) {
    failure_.reset();
    candidate_.reset();
    stopping_ = false;
    killed_ = false;
    workers_.clear();
    RoundLayout layout;
    layout.master_addr = o_.master_addr;
    layout.master_port = o_.master_port;
    Outcome outcome;
    if (!join_round(layout)) {
      outcome = Outcome::kStopSignal;
    } else {
      say_.progress(concat("attempt ", round_ + 1, " of ", o_.max_restarts + 1, ": ranks ",
                           layout.rank_offset, "..", layout.rank_offset + o_.nproc_per_node - 1,
                           " of world size ", layout.world_size, ": ", program_path_));
      for (int i = 0; i < o_.nproc_per_node; ++i) {
        Worker w;
        w.local_rank = i;
        w.rank = layout.rank_offset + i;
        workers_.push_back(std::move(w));
      }
      for (auto& w : workers_) spawn(w, layout);
      outcome = supervise();
      if (outcome == Outcome::kSuccess && !others_done()) {
        outcome = stop_signal_ ? Outcome::kStopSignal : Outcome::kFailure;
      }
    }
    if (outcome == Outcome::kSuccess) {
      say_.progress(concat("all ", layout.world_size, " worker(s) exited 0 (attempt ",
                           round_ + 1, ")"));
      code = 0;
      break;
    }
    if (outcome == Outcome::kStopSignal) {
      say_.always(concat("stopped by ", signal_name(stop_signal_), ": all local workers exited"));
      code = 128 + stop_signal_;
      break;
    }
    bool last = outcome == Outcome::kStoreLost || round_ >= o_.max_restarts;
    print_summary(concat("attempt ", round_ + 1, " of ", o_.max_restarts + 1, " failed"));
    code = failure_->code();
    if (last) {
      say_.always(concat("giving up after ", round_ + 1, " attempt(s) (--max-restarts ",
                         o_.max_restarts, "); exit code ", code));
      break;
    }
    say_.always(concat("restarting every worker: attempt ", round_ + 2, " of ",
                       o_.max_restarts + 1));
  }
  exit_handshake();
  cleanup_files();
  return code;
}

}  // namespace

int available_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)) > 0
             ? static_cast<int>(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)))
             : 1;
}

void print_plan(const RunOptions& o, const EnvMap& env, int cpu_count) {
  std::ostringstream os;
  os << "lockstep-run dry run: nothing is started\n"
     << "  program:       " << o.program;
  for (const auto& a : o.args) os << " " << a;
  os << "\n  nodes:         " << o.nnodes << " (this is node " << o.node_rank << ")\n"
     << "  workers:       " << o.nproc_per_node << " on this node, world size "
     << o.nnodes * o.nproc_per_node
     << (o.nnodes > 1 ? " if every node runs as many" : "") << "\n"
     << "  store:         " << (o.node_rank == 0 ? "hosted here on " : "on node 0 at ")
     << o.master_addr << ":" << (o.master_port == 0 ? std::string("<a free port>")
                                                     : std::to_string(o.master_port))
     << "\n  run id:        " << o.run_id << "\n  max restarts:  " << o.max_restarts
     << "\n  grace period:  " << o.grace_period << " s\n  log dir:       "
     << (o.log_dir.empty() ? "(none: output only to this terminal)" : o.log_dir) << "\n";
  RoundLayout layout;
  layout.world_size = o.nnodes * o.nproc_per_node;
  layout.rank_offset = o.node_rank * o.nproc_per_node;
  layout.master_addr = o.master_addr;
  layout.master_port = o.master_port;
  for (int i = 0; i < o.nproc_per_node; ++i) {
    std::string files = o.log_dir.empty() ? "/tmp/lockstep-run-XXXXXX" : o.log_dir + "/" + o.run_id;
    auto vars = worker_env(o, layout, i, concat(files, "/attempt_0/rank_", layout.rank_offset + i,
                                                "/error.json"), env, cpu_count);
    os << "  local rank " << i << ":";
    for (const auto& [name, value] : vars) os << " " << name << "=" << value;
    os << "\n";
  }
  std::cout << os.str() << std::flush;
}

int run_agent(const RunOptions& options, const EnvMap& env, int cpu_count) {
  if (pipe2(g_signal_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
    throw CommError(concat("pipe: ", std::strerror(errno)));
  }
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGCHLD}) sigaction(sig, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);
  Agent agent(options, env, cpu_count);
  return agent.run();
}

}  // namespace run
}  // namespace lockstep
