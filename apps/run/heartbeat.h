#pragma once
// Heartbeats between the launchers of a multi-node job: how a launcher decides that another
// node's launcher is hung. Pure (counters and times in, a verdict out), so
// tests/launch/test_heartbeat.cpp covers it without processes.
//
// Note [Launcher heartbeats]
// A launcher that stops running (SIGSTOP, a debugger, a machine swapping to death, a network
// cut that leaves the store reachable from the others) neither fails nor reports: its workers
// may go on, or hang in a collective until LOCKSTEP_TIMEOUT, and a job whose other nodes
// finished waits for its "done" (Note [lockstep-run rounds], step 5) for ever. So, with
// several nodes and --heartbeat-timeout T > 0, every launcher adds 1 to the round's key
// "beat/<k>" every T/5 seconds (at least every --monitor-interval) while it supervises its
// workers or waits for the others to finish, and reads every other node's counter as often.
// A counter that has not moved for T seconds, measured on the reader's own steady clock
// (nothing compares clocks across machines), means that node's launcher is hung: the reader
// publishes a failure naming the node (step 4), and every launcher stops its workers and ends
// the round like any other failure (restarting when restarts are left). Every node counts as
// seen when the round starts, so a launcher that hangs before its first beat is caught too.
// Node 0's launcher hosts the store: when it hangs, the others' store calls fail instead
// ("lost the rendezvous store").

#include <cstdint>
#include <optional>
#include <vector>

namespace lockstep {
namespace run {

/// A node whose heartbeat stopped: which, and for how many seconds it has not moved.
struct Silence {
  int node = 0;
  double seconds = 0;
};

/// The other nodes' heartbeat counters as one launcher sees them. Times are seconds on the
/// caller's steady clock.
class HeartbeatWatch {
 public:
  /// Watches nodes 0..nnodes-1 except `self`, every one counted as seen at `start`, and calls
  /// a node hung after `timeout` seconds without a change of its counter.
  HeartbeatWatch(int nnodes, int self, double timeout, double start);
  /// Stops watching `node`: not in this round (Note [Elastic membership] in rounds.h).
  void leave_out(int node);
  /// Records `node`'s counter as read at `now`.
  void observe(int node, int64_t beats, double now);
  /// The node silent the longest, if longer than the timeout at `now`; nullopt when none is.
  std::optional<Silence> hung(double now) const;

 private:
  struct Seen {
    int64_t beats = -1;  ///< last counter read (-1: none yet)
    double changed = 0;  ///< when it last changed (or the start)
    bool watched = true;
  };
  int self_;
  double timeout_;
  std::vector<Seen> seen_;
};

/// Seconds between a launcher's heartbeats (and its reads of the others'): a fifth of the
/// timeout, but not more often than every `monitor_interval`.
double heartbeat_interval(double timeout, double monitor_interval);

}  // namespace run
}  // namespace lockstep
