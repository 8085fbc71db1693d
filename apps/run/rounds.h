#pragma once
// The launchers' round protocol over the rendezvous store: joining a round, publishing the
// failure every node reports, sharing worker events between nodes, success and exit. Uses only
// the public lockstep::Store; knows nothing of processes.

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lockstep/errors.h"
#include "lockstep/store.h"
#include "options.h"
#include "verdict.h"

namespace lockstep {
namespace run {

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
//   3. Share: with several nodes, each agent appends its workers' exits 0, stops and
//      continues to the round's event list (n = add("events", 1), set("event/<n>", JSON)), so
//      that whichever agent judges a failure sees the whole job (Note [Root cause]).
//   4. Fail fast: the first agent whose verdict is ready (a worker failed; Note [Root cause]),
//      or that gets SIGINT/SIGTERM/SIGHUP, wins add("failed", 1) == 1 and writes "failure"
//      (JSON: the root cause, the failure that followed it, the workers that exited 0 early).
//      Every agent polls "failed" every --monitor-interval and stops its workers: SIGTERM
//      (+SIGCONT for stopped ones) to each worker's process group, SIGKILL after
//      --grace-period.
//   5. Success: an agent whose workers all exited 0 sets "done/<k>" and waits for every
//      node's "done" (or a "failed": a remote failure fails the round for everyone).
//   6. A failed round with restarts left starts round r+1 on every node; otherwise each agent
//      prints the summary of the published failure and exits with its code.
//   Throughout steps 2-5 each agent beats "beat/<k>" and watches the others' beats
//      (Note [Launcher heartbeats] in heartbeat.h): one that stops beating fails the round.
//   7. Before exiting, each agent sets "exit/<k>"; node 0 waits (bounded) for all of them, so
//      no agent loses the store while it still reads the outcome.
// Workers get PR_SET_PDEATHSIG(SIGKILL) and their own process group: if the agent dies, they
// die; when it stops them, their children go too (processes.h).

// Note [Elastic membership]
// With --nnodes MIN:MAX (MIN < MAX) a round runs on the nodes that joined it, between MIN and
// MAX of them; node ranks name launchers (node 0 hosts the store and must be there), and each
// round numbers its nodes densely (GROUP_RANK) and gives ranks in node-rank order.
//   1. Join: as above, then node 0 decides the round's members: every node that joined once
//      MAX did, or once MIN did and --rdzv-last-call seconds passed without another; it sets
//      "members" ("<k> <k> ..."). The others wait for that key. Fewer than MIN by
//      --rdzv-timeout fails every launcher of the round, naming who joined and who did not.
//   2. A node that finds the round formed without it is on standby: it adds to the round's
//      "waiting" count and polls the round's end. The round's agents see "waiting" at their
//      next --monitor-interval and, while the round has fewer than MAX nodes, publish a
//      membership change (a Failure with `membership` set): every worker is stopped (SIGTERM,
//      so it can checkpoint) and the next round forms with the newcomer. A membership change
//      does not use up a restart (--max-restarts counts failures), as in torchrun.
//   3. A lost node (its launcher dies, so its workers die too) fails the round like any
//      failure; the next round forms without it after the last call, and the workers resume
//      from their last checkpoint at the new world size (the sampler re-shards the unseen
//      samples, docs/data.md). That restart is a failure and needs --max-restarts >= 1.
//   4. A standby node whose round ended in success exits 0: the job finished without it.
// Rounds are walked in order: a launcher that starts late reads each earlier round's members
// and end and moves on, without claiming, until it reaches the round in progress.

/// This agent's side of the protocol. Single-threaded.
class Rounds {
 public:
  /// Node 0 hosts the store on --master-addr/--master-port (failing with one line when the
  /// port is taken), listening on that address only, the other nodes connect within
  /// --rdzv-timeout. Every connection proves it holds the job token (Note [Job token]).
  /// Throws CommError, TimeoutError or InvalidArgument (no shared token for several nodes).
  Rounds(const RunOptions& options, const EnvMap& env);

  /// The store's bound port (the one picked when --master-port is 0).
  int port() const;
  /// "tcp://host:port".
  std::string describe() const;

  /// Step 1 of round `round`: claims this node's slot and waits for every node (elastic: for
  /// node 0's decision; Note [Elastic membership]). `wait` waits one --monitor-interval and
  /// returns true when the agent must stop (then join returns nullopt). A layout with
  /// `member` false: the round formed without this node. Throws InvalidArgument (node rank
  /// claimed twice) or TimeoutError (naming the nodes that did not join).
  std::optional<RoundLayout> join(int round, const std::string& host,
                                  const std::function<bool()>& wait);

  /// Step 3: appends a worker event for the other nodes (does nothing with one node).
  void share(const WorkerEvent& event);
  /// Every event the other nodes shared so far in this round (records that cannot be read
  /// are skipped).
  std::vector<WorkerEvent> shared_events();

  /// Step 4: publishes `failure` unless another agent did first; returns the failure every
  /// node reports (`failure` itself when the store is gone).
  Failure publish(const Failure& failure);
  /// The published failure, if any.
  std::optional<Failure> published();

  /// Adds 1 to this node's heartbeat counter (Note [Launcher heartbeats] in heartbeat.h; does
  /// nothing with one node). Throws as the store does when it is gone.
  void beat();
  /// `node`'s heartbeat counter in this round (0 before its first beat).
  int64_t beats(int node);

  /// Step 5: this node's workers all exited 0.
  void set_done();
  /// Step 5: every node's workers all exited 0.
  bool all_done();

  /// Step 7 (never throws).
  void exit_handshake(const std::function<void()>& wait);

  /// The node ranks of the round in progress (every node unless elastic), ascending.
  const std::vector<int>& members() const { return members_; }
  int member_count() const { return static_cast<int>(members_.size()); }
  /// Elastic, standby: says this node waits to join, then polls until the round ends; returns
  /// true when it ended in success (the job is done without this node), false when it failed
  /// or changed membership (join the next), nullopt when `wait` said stop.
  std::optional<bool> stand_by(const std::function<bool()>& wait);
  /// Elastic: launchers waiting to join the next round.
  int64_t waiting();

 private:
  std::string key(const std::string& name) const;
  Failure read_failure();
  std::vector<int> decide_members(const std::function<bool()>& wait, bool* stop);
  std::vector<int> await_members(const std::function<bool()>& wait, bool* stop);
  bool round_ended(bool* success);

  RunOptions o_;
  std::string token_;  // raw bytes
  std::unique_ptr<Store> store_;
  int round_ = 0;
  std::vector<int> members_;  // node ranks of the round, ascending
  bool lost_ = false;         // a store call failed: the store's host is gone

  // Runs a store call; once one failed, fails at once (a new connection would retry for the
  // whole connect timeout, keeping a launcher whose store's host died from exiting).
  template <typename F>
  auto guarded(F&& call) -> decltype(call()) {
    if (lost_) throw CommError(detail::concat("the rendezvous store ", describe(), " was lost earlier"));
    try {
      return call();
    } catch (...) {
      lost_ = true;
      throw;
    }
  }
};

}  // namespace run
}  // namespace lockstep
