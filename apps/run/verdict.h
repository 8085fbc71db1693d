#pragma once
// Who is to blame when a round fails: the events the launcher saw (a worker exited, was killed,
// stopped or continued), the failure record every node reports, the root-cause judgement
// (Note [Root cause]) and the summary lines. Pure: no processes, no sockets, no clock (times
// are given), so tests/launch/test_verdict.cpp covers every ordering of worker exits.

#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <vector>

namespace lockstep {
namespace run {

// Note [Root cause]
// A job fails when any worker fails, in any order; the summary and the exit code name the
// root cause, judged from every event seen so far (local ones, and other nodes' from the store):
//   1. Only events before the launcher began stopping the workers count: deaths after its
//      SIGTERM/SIGKILL are its own doing.
//   2. A *failure* is a worker that exited non-zero or was killed by a signal. Without one there
//      is no verdict: an exit 0 is not a failure, nor is a stop alone (the worker may be
//      continued).
//   3. Candidates for the root cause: every failure, and every stop that no continue followed
//      before the first failure (a stopped worker's peers time out waiting for it: the stop
//      came first, though the timeout is what ends the round).
//   4. A failure whose error is a lockstep::CommError or TimeoutError is *secondary*: a worker
//      that throws closes its sockets while it unwinds, before it reports, so a peer's
//      "connection reset" often exits first; a stopped or departed peer makes the others time
//      out. The root cause is the earliest primary candidate no later than `settle` seconds
//      after the first failure, else the first failure itself. The verdict is *ready* at the
//      first failure's time when its root cause is primary, else `settle` later: the agent
//      waits that long for a primary failure before it publishes (and publishes at once when
//      every local worker has ended).
//   5. A worker that exited 0 in a round that failed, before the launcher began stopping the
//      workers, left while its peers still ran; it is flagged in the summary (a rank that runs
//      one step fewer, evaluates alone or skips a collective makes its peers fail), never
//      counted as a success. Its exit may even come after its peer's failure: such a rank
//      destroys its process group first (the peer's collective fails at once), then unwinds
//      and unloads LibTorch before it exits. Events the launcher reaps in one pass share a
//      time; among them an exit 0 sorts before a failure.
//   6. The exit code is the root cause's: its exit code, or 128 + the signal that killed or
//      stopped it (as a shell reports a stopped job).

/// One change of state of a worker process, as waitpid reported it to some node's launcher.
struct WorkerEvent {
  enum class Kind { kExited, kKilled, kStopped, kContinued };
  Kind kind = Kind::kExited;
  int rank = -1;              ///< global rank; -1 for a launcher-level failure
  int local_rank = -1;        ///< rank on its node
  int node = 0;               ///< node rank of the launcher that saw it
  std::string host;           ///< that launcher's host name
  long pid = 0;               ///< the worker's pid (the launcher's for a launcher-level failure)
  int exit_code = 0;          ///< kExited: the exit code
  int signal = 0;             ///< kKilled: the fatal signal; kStopped: the stop signal
  double time = 0;            ///< seconds since the epoch (wall clock: comparable across nodes)
  bool requested = false;     ///< the launcher had begun stopping the workers (Note, step 1)
  std::string type;           ///< error type from the worker's error file; "" when none
  std::string message;        ///< error message from the worker's error file
  std::string last_stderr;    ///< the last line the worker wrote to stderr

  /// Exited non-zero or killed by a signal.
  bool failed() const;
  /// A failure whose error is a CommError or TimeoutError (Note [Root cause], step 4).
  bool secondary() const;
  /// The exit code this event stands for: exit code, or 128 + signal (killed or stopped).
  int code() const;
  /// "exit code 3", "killed by SIGKILL (exit code 137)", "stopped by SIGSTOP (exit code 147)".
  std::string exit_text() const;
  /// "lockstep::StateError: boom", the last stderr line when there is no error file, or "".
  std::string error_text() const;
};

/// The failure of a round: what every node's launcher reports (published in the store by the
/// first agent that saw one; Note [lockstep-run rounds], step 3).
struct Failure {
  /// The root cause. For a launcher-level failure (a launcher got SIGTERM, lost the store),
  /// rank is -1, `what` says what happened and the event holds the exit code or signal.
  WorkerEvent root;
  std::string what;
  /// The first failure, when the root cause is another event (a stop before a peer's
  /// timeout, or a primary failure that beat a secondary one).
  std::optional<WorkerEvent> then;
  /// Workers that exited 0 while their peers still ran (Note [Root cause], step 5).
  std::vector<WorkerEvent> early_exits;
  /// Not a failure: the membership of an elastic job changes (a node waits to join; Note
  /// [Elastic membership] in rounds.h). Every worker is stopped and the next round formed
  /// without using up a restart.
  bool membership = false;

  /// The launcher's exit code for this failure (Note [Root cause], step 6).
  int code() const { return root.code(); }
};

/// The judgement of a round so far (Note [Root cause]).
struct Verdict {
  Failure failure;
  double ready_at = 0;  ///< time from which the root cause may be published
};

/// Judges `events` (any order; equal times keep their order) with a settle window of `settle`
/// seconds. Returns nullopt while no worker has failed.
std::optional<Verdict> judge(const std::vector<WorkerEvent>& events, double settle);

/// Adds to `failure` the exits 0 among `events` that it does not list yet, not requested by the
/// launcher and no later than `settle` seconds after its first failure: a node adds its own
/// workers to a record another node published before it saw them.
void add_early_exits(Failure& failure, const std::vector<WorkerEvent>& events, double settle);

/// The summary of a failed round, one line each (no prefix): the root cause (rank, node, host,
/// pid, exit, error), what followed it, the workers that left early, and how each of this
/// node's workers ended (`local_ends`: each local worker's last event; `node`: this node).
std::vector<std::string> summary_lines(const Failure& failure,
                                       const std::vector<WorkerEvent>& local_ends, int node);

/// "SIGKILL", or "signal 99" for a number without a name.
std::string signal_name(int sig);

/// JSON forms for the store. The *_from_json functions throw (nlohmann::json::exception,
/// lockstep::InvalidArgument) on a malformed record.
nlohmann::json to_json(const WorkerEvent& e);
WorkerEvent event_from_json(const nlohmann::json& j);
nlohmann::json to_json(const Failure& f);
Failure failure_from_json(const nlohmann::json& j);

}  // namespace run
}  // namespace lockstep
