#pragma once
// lockstep-run's process plumbing: the launcher's own signals (a self-pipe), worker processes
// (fork and exec in their own process group, tied to the launcher by a parent-death signal,
// stdout and stderr piped and forwarded line by line), their changes of state (waitpid) and
// signals to their process groups. Knows nothing of rounds, stores or root causes.

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "lockstep/launch_env.h"
#include "relay.h"

namespace lockstep {
namespace run {

/// The launcher's signals: SIGINT, SIGTERM, SIGHUP and SIGCHLD become bytes on a pipe (the
/// handler only writes), so the agent's poll loop sees them; SIGPIPE is ignored.
namespace signals {
/// Installs the handlers (once per process). Throws CommError when the pipe cannot be made.
void install();
/// The pipe's read end, to poll for POLLIN.
int fd();
/// Waits up to `timeout` for a signal; returns the signals received (none on timeout).
std::vector<int> wait(std::chrono::milliseconds timeout);
}  // namespace signals

/// One output stream of a worker, forwarded to the launcher's stdout or stderr one line at a
/// time with a "[rank r] " prefix (a partial line waits for its '\n' or '\r': Note [Carriage
/// returns in the relay] in relay.h) unless `console` is off (--redirects), and copied
/// verbatim to a log file when there is one.
struct Stream {
  int fd = -1;        ///< read end of the worker's pipe; -1 once closed
  int out_fd = 1;     ///< the launcher's stdout (1) or stderr (2)
  bool console = true;  ///< forward to out_fd (the last line is kept for the verdict either way)
  bool terminal = false;  ///< out_fd is a terminal (keep '\r' redraws)
  int log_fd = -1;    ///< the per-rank log file, or -1
  std::string prefix; ///< "[rank r] "
  RelayState relay;   ///< the partial line and the last line

  /// Forwards what is readable now; closes the stream at end of file.
  void pump();
  /// Forwards a pending partial line.
  void flush();
  /// Flushes and closes the pipe and the log file.
  void close();
};

/// A change of state of a worker process (waitpid with WUNTRACED | WCONTINUED).
struct ProcessChange {
  enum class Kind { kExited, kKilled, kStopped, kContinued };
  Kind kind = Kind::kExited;
  int value = 0;  ///< exit code (kExited) or signal (kKilled, kStopped)
};

/// What to start: the program, its environment, and where its output also goes.
struct ProcessSpec {
  std::string path;               ///< the program, already resolved (see find_program)
  std::vector<std::string> argv;  ///< argv[0] included
  EnvMap env;                     ///< the whole environment
  int rank = 0;                   ///< for the "[rank r] " prefix and messages
  std::string stdout_log;         ///< file for a verbatim copy of stdout; "" for none
  std::string stderr_log;         ///< same for stderr
  bool stdout_console = true;     ///< forward stdout to the launcher's stdout
  bool stderr_console = true;     ///< forward stderr to the launcher's stderr
};

/// A worker process. Not copyable: it owns its pipes. Single-threaded (the agent's loop).
class WorkerProcess {
 public:
  WorkerProcess() = default;
  WorkerProcess(const WorkerProcess&) = delete;
  WorkerProcess& operator=(const WorkerProcess&) = delete;
  ~WorkerProcess();

  /// Forks and execs `spec` in a new process group with stdin on /dev/null, PR_SET_PDEATHSIG
  /// (SIGKILL: if the launcher dies, the worker dies) and default signal dispositions. Throws
  /// CommError when a pipe or fork fails, InvalidArgument when a log file cannot be written.
  void start(const ProcessSpec& spec);
  pid_t pid() const { return pid_; }
  /// True until poll() reported its exit or death.
  bool running() const { return running_; }
  /// The next change of state, without blocking; nullopt when there is none.
  std::optional<ProcessChange> poll();
  /// Sends `sig` to its process group (to the worker alone when the group is gone).
  void signal(int sig) const;
  /// Its stdout (0) and stderr (1).
  Stream& stream(int i) { return streams_[i]; }
  const Stream& stream(int i) const { return streams_[i]; }

 private:
  pid_t pid_ = -1;
  bool running_ = false;
  Stream streams_[2];
};

/// The program's path, searched in env's PATH like execvp; nullopt when not found or not
/// executable.
std::optional<std::string> find_program(const std::string& program, const EnvMap& env);

/// mkdir -p. Throws InvalidArgument naming the directory and the reason.
void make_dirs(const std::string& path);

/// Writes all of `text` to `fd`, retrying short writes; drops it when `fd` is closed.
void write_all(int fd, const std::string& text);

/// This machine's host name.
std::string hostname();

/// Cores this process may run on (sched_getaffinity), at least 1.
int available_cpus();

}  // namespace run
}  // namespace lockstep
