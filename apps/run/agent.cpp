// The lockstep-run agent (see agent.h): runs rounds (rounds.h, Note [lockstep-run rounds]) of
// worker processes (processes.h), judges who failed (verdict.h, Note [Root cause]) and prints
// the summary.
#include "agent.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <poll.h>
#include <sstream>

#include "lockstep/env_vars.h"
#include "lockstep/errors.h"
#include "heartbeat.h"
#include "processes.h"
#include "rounds.h"
#include "verdict.h"

namespace lockstep {
namespace run {
namespace {

using Clock = std::chrono::steady_clock;
using detail::concat;
using nlohmann::json;
using Kind = WorkerEvent::Kind;

// Seconds since the epoch: event times must compare across nodes (Note [Root cause]).
double wall_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
      .count();
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

struct Worker {
  int local_rank = 0;
  int rank = 0;
  std::string error_file;
  WorkerProcess process;
  std::optional<WorkerEvent> end;  // its exit or death
};

enum class Outcome { kSuccess, kFailure, kStopSignal, kStoreLost };

class Agent {
 public:
  Agent(const RunOptions& options, const EnvMap& env, int cpu_count)
      : o_(options), env_(env), cpus_(cpu_count), say_(options.quiet), host_(hostname()) {}

  int run();

 private:
  std::chrono::milliseconds interval() const {
    return std::chrono::milliseconds(std::max<long>(1, static_cast<long>(o_.monitor_interval * 1000)));
  }
  double settle_window() const { return std::min(1.0, o_.grace_period); }
  // Waits one monitor interval; true when SIGINT/SIGTERM/SIGHUP arrived (stop_signal_ set).
  bool wait_interval();
  void spawn(Worker& w, const RoundLayout& layout);
  Outcome supervise();
  void reap();
  WorkerEvent event_of(Worker& w, const ProcessChange& change, double time);
  void on_launcher_signal(int sig);
  // Publishes the verdict once it is ready (or now, when `now`); returns true if one is
  // pending (a worker failed, the verdict waits out its settle window).
  bool judge_and_publish(bool now);
  void begin_stop(int sig);
  bool others_done();
  // Note [Launcher heartbeats]: beats and reads the others' beats when due; returns the
  // failure to publish when another node's launcher is hung. Throws when the store is gone.
  std::optional<Failure> heartbeat();
  void print_summary(const std::string& headline);
  void cleanup_files();

  RunOptions o_;
  EnvMap env_;
  int cpus_;
  Say say_;
  std::string host_;
  std::string program_path_;
  std::unique_ptr<Rounds> rounds_;
  std::string files_dir_;
  bool temp_files_ = false;
  int round_ = 0;
  std::deque<Worker> workers_;       // deque: a Worker owns pipes and never moves
  std::vector<WorkerEvent> events_;  // this round's events of local workers
  std::optional<Failure> failure_;   // the round's published failure
  double ready_at_ = 0;              // when a pending verdict may be published (wall clock)
  int stop_signal_ = 0;              // SIGINT/SIGTERM/SIGHUP received
  bool stopping_ = false;
  std::optional<HeartbeatWatch> watch_;  // this round's view of the other nodes' beats
  Clock::time_point next_beat_;
  std::vector<std::string> hosts_;       // each node's host, from the round's join
  Clock::time_point kill_at_;
  bool killed_ = false;
};

bool Agent::wait_interval() {
  for (int sig : signals::wait(interval())) {
    if (sig == SIGINT || sig == SIGTERM || sig == SIGHUP) {
      stop_signal_ = sig;
      return true;
    }
  }
  return false;
}

void Agent::spawn(Worker& w, const RoundLayout& layout) {
  std::string dir = concat(files_dir_, "/attempt_", round_, "/rank_", w.rank);
  make_dirs(dir);
  w.error_file = dir + "/error.json";
  unlink(w.error_file.c_str());
  ProcessSpec spec;
  spec.path = program_path_;
  spec.argv = {o_.program};
  spec.argv.insert(spec.argv.end(), o_.args.begin(), o_.args.end());
  spec.env = env_;
  for (auto& [name, value] : worker_env(o_, layout, w.local_rank, w.error_file, env_, cpus_)) {
    spec.env[name] = value;
  }
  spec.rank = w.rank;
  const StreamPlan plan = stream_plan(o_, w.local_rank);
  if (plan.file[0]) spec.stdout_log = dir + "/stdout.log";
  if (plan.file[1]) spec.stderr_log = dir + "/stderr.log";
  spec.env[env::kStdoutTty] = stdout_tty_env(plan, ::isatty(STDOUT_FILENO) == 1);
  spec.stdout_console = plan.console[0];
  spec.stderr_console = plan.console[1];
  w.process.start(spec);
}

WorkerEvent Agent::event_of(Worker& w, const ProcessChange& change, double time) {
  WorkerEvent e;
  e.rank = w.rank;
  e.local_rank = w.local_rank;
  e.node = o_.node_rank;
  e.host = host_;
  e.pid = w.process.pid();
  e.time = time;
  e.requested = stopping_;
  switch (change.kind) {
    case ProcessChange::Kind::kExited:
      e.kind = Kind::kExited;
      e.exit_code = change.value;
      break;
    case ProcessChange::Kind::kKilled:
      e.kind = Kind::kKilled;
      e.signal = change.value;
      break;
    case ProcessChange::Kind::kStopped:
      e.kind = Kind::kStopped;
      e.signal = change.value;
      return e;
    case ProcessChange::Kind::kContinued:
      e.kind = Kind::kContinued;
      return e;
  }
  w.process.stream(1).pump();  // what it wrote last is in the pipe already
  e.last_stderr = w.process.stream(1).relay.last_line;
  std::ifstream in(w.error_file);
  if (in) {
    try {
      json j = json::parse(in);
      e.type = j.value("type", "");
      e.message = j.value("message", "");
    } catch (const std::exception& ex) {
      e.message = concat("(unreadable error file ", w.error_file, ": ", ex.what(), ")");
    }
  }
  return e;
}

void Agent::reap() {
  const double pass = wall_now();  // one time per pass: the order within it is unknown
  for (auto& w : workers_) {
    while (auto change = w.process.poll()) {
      WorkerEvent e = event_of(w, *change, pass);
      events_.push_back(e);
      if (e.kind == Kind::kStopped && !e.requested) {
        say_.always(concat("rank ", w.rank, " (pid ", e.pid, ") was stopped by ",
                           signal_name(e.signal), "; its peers will time out"));
      }
      if (e.kind == Kind::kExited || e.kind == Kind::kKilled) w.end = e;
      // Exits 0, stops and continues are evidence for other nodes' verdicts; failures
      // travel in the published record.
      if (!e.requested && !e.failed()) rounds_->share(e);
    }
  }
}

bool Agent::judge_and_publish(bool now) {
  if (failure_ || stopping_) return false;
  auto verdict = judge(events_, settle_window());
  if (!verdict) return false;
  ready_at_ = verdict->ready_at;
  if (!now && wall_now() < ready_at_) return true;
  if (o_.nnodes > 1) {
    auto all = rounds_->shared_events();
    all.insert(all.end(), events_.begin(), events_.end());
    verdict = judge(all, settle_window());
  }
  failure_ = rounds_->publish(verdict->failure);
  begin_stop(SIGTERM);
  return false;
}

void Agent::begin_stop(int sig) {
  if (stopping_) return;
  stopping_ = true;
  kill_at_ = Clock::now() + std::chrono::milliseconds(static_cast<long>(o_.grace_period * 1000));
  for (auto& w : workers_) {
    if (!w.process.running()) continue;
    w.process.signal(sig);
    w.process.signal(SIGCONT);  // a stopped worker handles SIGTERM only once continued
  }
}

void Agent::on_launcher_signal(int sig) {
  if (stop_signal_ == sig || killed_) {
    say_.always(concat("second ", signal_name(sig), ": killing the workers now"));
    kill_at_ = Clock::now();
    return;
  }
  if (stop_signal_) return;
  stop_signal_ = sig;
  say_.always(concat("received ", signal_name(sig), ": forwarding it to ", workers_.size(),
                     " worker(s); SIGKILL in ", o_.grace_period, " s"));
  Failure f;
  f.root.kind = Kind::kKilled;
  f.root.signal = sig;
  f.root.node = o_.node_rank;
  f.root.host = host_;
  f.root.pid = getpid();
  f.root.time = wall_now();
  f.what = concat("node ", o_.node_rank, "'s launcher (", host_, ", pid ", getpid(),
                  ") received ", signal_name(sig));
  if (!failure_ && !stopping_) failure_ = rounds_->publish(f);
  stopping_ = false;  // forward this signal even if a SIGTERM went out already
  begin_stop(sig);
}

Outcome Agent::supervise() {
  auto next_check = Clock::now();
  Outcome outcome = Outcome::kSuccess;
  std::optional<Clock::time_point> drain_until;
  bool pending = false;  // a verdict waits out its settle window
  while (true) {
    bool any_running = false;
    std::vector<pollfd> fds = {{signals::fd(), POLLIN, 0}};
    std::vector<Stream*> owners = {nullptr};
    for (auto& w : workers_) {
      any_running |= w.process.running();
      for (int s = 0; s < 2; ++s) {
        Stream& stream = w.process.stream(s);
        if (stream.fd < 0) continue;
        fds.push_back({stream.fd, POLLIN, 0});
        owners.push_back(&stream);
      }
    }
    if (!any_running) {
      // Every worker is gone. With one node nothing more can come: judge now. With several,
      // a pending verdict waits for the other nodes' evidence (Note [Root cause], step 4).
      if (pending && o_.nnodes == 1) pending = judge_and_publish(/*now=*/true);
      // Drain what the workers' children may still write, bounded.
      if (!drain_until) drain_until = Clock::now() + std::chrono::seconds(2);
      if (fds.size() == 1 || Clock::now() >= *drain_until) {
        for (Stream* s : owners) {
          if (s) s->close();
        }
        if (!pending) break;
      }
    }
    auto now = Clock::now();
    auto wake = next_check;
    if (stopping_ && !killed_) wake = std::min(wake, kill_at_);
    if (drain_until) wake = std::min(wake, *drain_until);
    if (pending) {
      auto left = std::chrono::duration<double>(std::max(0.0, ready_at_ - wall_now()));
      wake = std::min(wake, now + std::chrono::duration_cast<Clock::duration>(left));
    }
    int timeout_ms = static_cast<int>(std::max<long>(
        0, std::chrono::duration_cast<std::chrono::milliseconds>(wake - now).count() + 1));
    int ready = poll(fds.data(), fds.size(), timeout_ms);
    if (ready < 0 && errno != EINTR) throw CommError(concat("poll: ", std::strerror(errno)));
    for (size_t i = 1; ready > 0 && i < fds.size(); ++i) {
      if (fds[i].revents) owners[i]->pump();
    }
    if (ready > 0 && (fds[0].revents & POLLIN)) {
      for (int sig : signals::wait(std::chrono::milliseconds(0))) {
        if (sig != SIGCHLD) on_launcher_signal(sig);  // children are reaped below
      }
    }
    reap();
    pending = judge_and_publish(/*now=*/false);
    if (stopping_ && !killed_ && Clock::now() >= kill_at_) {
      for (auto& w : workers_) {
        if (!w.process.running()) continue;
        say_.always(concat("rank ", w.rank, " (pid ", w.process.pid(), ") did not exit within ",
                           o_.grace_period, " s of SIGTERM: sending SIGKILL"));
        w.process.signal(SIGKILL);
      }
      killed_ = true;
    }
    if (Clock::now() >= next_check) {
      next_check = Clock::now() + interval();
      if (o_.nnodes > 1 && outcome != Outcome::kStoreLost) {
        const bool handling = failure_.has_value();  // ours, or another node's, already
        try {
          auto hung = heartbeat();  // beats while stopping too, so no peer thinks us hung
          if (handling) {
          } else if (auto remote = rounds_->published()) {
            failure_ = remote;
            pending = false;
            say_.progress(remote->membership
                              ? concat(remote->what, ": stopping local workers")
                              : concat("node ", remote->root.node,
                                       " reported a failure: stopping local workers"));
            begin_stop(SIGTERM);
          } else if (o_.elastic() && rounds_->member_count() < o_.nnodes &&
                     rounds_->waiting() > 0) {
            // Note [Elastic membership], step 2: a node waits to join.
            Failure change;
            change.membership = true;
            change.root.node = o_.node_rank;
            change.what = concat("a node waits to join (this round has ",
                                 rounds_->member_count(), " of at most ", o_.nnodes,
                                 " nodes): restarting every worker with the new membership");
            failure_ = rounds_->publish(change);
            pending = false;
            say_.progress(concat(failure_->what, ": stopping local workers"));
            begin_stop(SIGTERM);
          } else if (hung) {
            failure_ = rounds_->publish(*hung);
            pending = false;
            say_.always(failure_->what + ": stopping local workers");
            begin_stop(SIGTERM);
          }
        } catch (const std::exception& e) {
          if (handling) {
            watch_.reset();  // the store may go while a failure is handled: stop beating
            continue;
          }
          Failure f;
          f.root.node = o_.node_rank;
          f.root.exit_code = kExitLauncherError;
          f.what = concat("lost the rendezvous store ", rounds_->describe(), ": ", e.what());
          failure_ = f;
          pending = false;
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

std::optional<Failure> Agent::heartbeat() {
  if (!watch_ || Clock::now() < next_beat_) return std::nullopt;
  next_beat_ = Clock::now() + std::chrono::milliseconds(static_cast<long>(
                                  1000 * heartbeat_interval(o_.heartbeat_timeout,
                                                            o_.monitor_interval)));
  rounds_->beat();
  auto seconds_now = [] {
    return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
  };
  for (int k : rounds_->members()) {
    if (k != o_.node_rank) watch_->observe(k, rounds_->beats(k), seconds_now());
  }
  auto silence = watch_->hung(seconds_now());
  if (!silence) return std::nullopt;
  Failure f;
  f.root.node = silence->node;
  f.root.host = static_cast<size_t>(silence->node) < hosts_.size() ? hosts_[silence->node] : "";
  f.root.exit_code = kExitLauncherError;
  f.root.time = wall_now();
  f.what = concat("node ", silence->node, "'s launcher",
                  f.root.host.empty() ? "" : " (" + f.root.host + ")",
                  " is hung: its heartbeat has not moved for ",
                  static_cast<long>(silence->seconds), " s (--heartbeat-timeout ",
                  o_.heartbeat_timeout, "); it is stopped, or its machine is overloaded or cut "
                  "off. Look at that node; with restarts left the job starts a new round");
  return f;
}

bool Agent::others_done() {
  // Local workers all exited 0: wait for the other nodes, or for a failure anywhere.
  rounds_->set_done();
  if (o_.nnodes == 1) return true;
  while (true) {
    if (auto remote = rounds_->published()) {
      failure_ = remote;
      return false;
    }
    if (auto hung = heartbeat()) {
      failure_ = rounds_->publish(*hung);
      say_.always(failure_->what);
      return false;
    }
    if (rounds_->all_done()) return true;
    if (wait_interval()) return false;
  }
}

void Agent::print_summary(const std::string& headline) {
  add_early_exits(*failure_, events_, settle_window());
  std::vector<WorkerEvent> ends;
  for (const auto& w : workers_) {
    if (w.end) ends.push_back(*w.end);
  }
  say_.always("==================== " + headline + " ====================");
  for (const auto& line : summary_lines(*failure_, ends, o_.node_rank)) say_.always(line);
}

void Agent::cleanup_files() {
  if (!temp_files_ || files_dir_.empty()) return;
  // Remove the temporary tree: error files only, written by our workers.
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

  rounds_ = std::make_unique<Rounds>(o_, env_);
  if (o_.node_rank == 0) o_.master_port = rounds_->port();
  say_.progress(concat(o_.node_rank == 0 ? "hosting" : "joined", " the rendezvous store at ",
                       o_.master_addr, ":", o_.master_port, " (run id '", o_.run_id, "', node ",
                       o_.node_rank, "/", o_.nnodes, ", ", o_.nproc_per_node, " worker(s))"));

  if (o_.log_dir.empty() && needs_log_files(o_)) {
    // --redirects/--tee without --log-dir: a directory of our own, kept (as torchrun does).
    char tmpl[] = "/tmp/lockstep-run-logs-XXXXXX";
    if (!mkdtemp(tmpl)) throw InvalidArgument(concat("mkdtemp: ", std::strerror(errno)));
    o_.log_dir = tmpl;
    say_.always(concat("worker logs (--redirects/--tee) go to ", o_.log_dir, "/", o_.run_id));
  }
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
  int failures = 0;  // rounds that failed; --max-restarts bounds them (membership changes don't count)
  for (round_ = 0;; ++round_) {
    failure_.reset();
    events_.clear();
    stopping_ = false;
    killed_ = false;
    workers_.clear();
    Outcome outcome;
    auto layout = rounds_->join(round_, host_, [this] { return wait_interval(); });
    if (layout && !layout->member) {
      // Note [Elastic membership]: the round formed without this node.
      say_.progress(concat("round ", round_, " formed without this node: waiting to join the "
                           "next (a running job restarts its workers to take it)"));
      auto ended = rounds_->stand_by([this] { return wait_interval(); });
      if (!ended) {
        say_.always(concat("stopped by ", signal_name(stop_signal_), " while waiting to join"));
        code = 128 + stop_signal_;
        break;
      }
      if (*ended) {
        say_.progress("the job finished without this node");
        code = 0;
        break;
      }
      continue;
    }
    if (!layout) {
      outcome = Outcome::kStopSignal;
    } else {
      layout->master_addr = o_.master_addr;
      layout->master_port = o_.master_port;
      say_.progress(concat("attempt ", failures + 1, " of ", o_.max_restarts + 1, ": ranks ",
                           layout->rank_offset, "..", layout->rank_offset + o_.nproc_per_node - 1,
                           " of world size ", layout->world_size,
                           o_.elastic() ? concat(" (", layout->group_world_size, " of ",
                                                 o_.nnodes_min, "..", o_.nnodes, " nodes)")
                                        : std::string(),
                           ": ", program_path_));
      for (int i = 0; i < o_.nproc_per_node; ++i) {
        Worker& w = workers_.emplace_back();
        w.local_rank = i;
        w.rank = layout->rank_offset + i;
      }
      hosts_ = layout->hosts;
      watch_.reset();
      if (o_.nnodes > 1 && o_.heartbeat_timeout > 0) {
        watch_.emplace(o_.nnodes, o_.node_rank, o_.heartbeat_timeout,
                       std::chrono::duration<double>(Clock::now().time_since_epoch()).count());
        const auto& members = rounds_->members();
        for (int k = 0; k < o_.nnodes; ++k) {
          if (std::find(members.begin(), members.end(), k) == members.end()) watch_->leave_out(k);
        }
        next_beat_ = Clock::now();
      }
      for (auto& w : workers_) spawn(w, *layout);
      outcome = supervise();
      if (outcome == Outcome::kSuccess && !others_done()) {
        outcome = stop_signal_ ? Outcome::kStopSignal : Outcome::kFailure;
      }
    }
    if (outcome == Outcome::kSuccess) {
      say_.progress(concat("all ", layout->world_size, " worker(s) exited 0 (attempt ",
                           failures + 1, ")"));
      code = 0;
      break;
    }
    if (outcome == Outcome::kStopSignal) {
      say_.always(concat("stopped by ", signal_name(stop_signal_), ": all local workers exited"));
      code = 128 + stop_signal_;
      break;
    }
    if (outcome == Outcome::kFailure && failure_ && failure_->membership) {
      say_.progress(concat("membership change: forming round ", round_ + 1));
      continue;
    }
    bool last = outcome == Outcome::kStoreLost || failures >= o_.max_restarts;
    print_summary(concat("attempt ", failures + 1, " of ", o_.max_restarts + 1, " failed"));
    code = failure_->code();
    if (last) {
      say_.always(concat("giving up after ", failures + 1, " attempt(s) (--max-restarts ",
                         o_.max_restarts, "); exit code ", code));
      break;
    }
    ++failures;
    say_.always(concat("restarting every worker: attempt ", failures + 1, " of ",
                       o_.max_restarts + 1));
  }
  rounds_->exit_handshake([this] { wait_interval(); });
  cleanup_files();
  return code;
}

}  // namespace

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
     << "\n  rendezvous:    " << o.rdzv_backend << " (lockstep's store on node 0)"
     << "\n  run id:        " << o.run_id << "\n  role:          " << o.role
     << "\n  max restarts:  " << o.max_restarts
     << "\n  grace period:  " << o.grace_period << " s\n  log dir:       "
     << (!o.log_dir.empty()       ? o.log_dir
         : needs_log_files(o) ? "(none: a new /tmp/lockstep-run-logs-XXXXXX for --redirects/--tee)"
                              : "(none: output only to this terminal)")
     << "\n";
  RoundLayout layout;
  layout.world_size = o.nnodes * o.nproc_per_node;
  layout.rank_offset = o.node_rank * o.nproc_per_node;
  layout.group_rank = o.node_rank;
  layout.group_world_size = o.nnodes;
  layout.master_addr = o.master_addr;
  layout.master_port = o.master_port;
  for (int i = 0; i < o.nproc_per_node; ++i) {
    std::string files = o.log_dir.empty() ? "/tmp/lockstep-run-XXXXXX" : o.log_dir + "/" + o.run_id;
    auto vars = worker_env(o, layout, i, concat(files, "/attempt_0/rank_", layout.rank_offset + i,
                                                "/error.json"), env, cpu_count);
    StreamPlan plan = stream_plan(o, i);
    vars[env::kStdoutTty] = stdout_tty_env(plan, ::isatty(STDOUT_FILENO) == 1);
    auto where = [&](int s) {
      return std::string(plan.console[s] && plan.file[s] ? "console+file"
                         : plan.file[s]                  ? "file"
                                                         : "console");
    };
    os << "  local rank " << i << ": (stdout to " << where(0) << ", stderr to " << where(1)
       << ")";
    for (const auto& [name, value] : vars) os << " " << name << "=" << value;
    os << "\n";
  }
  std::cout << os.str() << std::flush;
}

int run_agent(const RunOptions& options, const EnvMap& env, int cpu_count) {
  signals::install();
  Agent agent(options, env, cpu_count);
  return agent.run();
}

}  // namespace run
}  // namespace lockstep
