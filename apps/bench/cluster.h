#pragma once
/// \file
/// lockstep-bench's emulated cluster (issue 17): N "nodes", each a network namespace of its
/// own with its own hostname, joined by veth pairs to a bridge in a hub namespace, every
/// link shaped by `tc` to a rate and, where the kernel has sch_netem, a one-way delay.
///
/// Note [The emulated cluster]
/// Topology, for a run with coordinator pid P and nodes 0..N-1 (names are unique per run):
///
///     netns lsbcP-hub:  bridge br0 <- veth lsbcPh<i>  (egress: tbf rate R, toward node i)
///                                         |
///     netns lsbcP-n<i>: veth lsbcPn<i>, 10.77.0.<i+1>/24  (egress: netem rate R delay D,
///                                                          or tbf rate R without netem)
///
/// Nothing is created in the root namespace: every link lives in the hub or in a node, so
/// deleting the N+1 namespaces removes every link. Each node's traffic is shaped in both
/// directions at rate R (a full-duplex NIC); the delay D is added once, on the node's egress,
/// so a message between two nodes takes D one way. Traffic between ranks of one node stays
/// inside its namespace (loopback routing of its own address) and is not shaped, as on a real
/// host. A rank is started (fork, setns(CLONE_NEWNET) into its node's namespace, then
/// unshare(CLONE_NEWUTS) and sethostname("lsbcP-n<i>")) so that lockstep's host identity
/// (hostname/boot id, lib/src/comm/shm_group.cpp host_identity()) differs per node: the
/// hierarchical transport then groups the ranks of one namespace as one host, and /dev/shm
/// is still shared (no mount namespace), as it would be within one real host.
/// Clean-up: the destructor deletes every namespace; SIGINT/SIGTERM/SIGHUP set a flag that
/// the coordinator polls (cluster_interrupted()), so it kills its workers and unwinds through
/// the destructor; the workers die with the coordinator (PR_SET_PDEATHSIG). A coordinator
/// killed with SIGKILL leaves its namespaces behind: the next cluster run deletes every
/// lsbc<pid>-* namespace whose pid no longer runs (remove_stale_cluster_namespaces()).
/// The machine without sch_netem (this kernel, for one) gets the rate only: the link records
/// delay_applied=false and why, and the report says so.

#include <string>
#include <vector>

#include "options.h"

namespace lockstep {
namespace bench {

/// The prefix of every namespace an emulated cluster creates ("lsbc<pid>-...").
constexpr const char* kClusterPrefix = "lsbc";

/// Parses "NODESxRANKS" (nodes 2..4, ranks per node 1..16). Throws InvalidArgument naming
/// --cluster. Pure.
void parse_cluster_shape(const std::string& text, int& nodes, int& ranks_per_node);

/// Parses one link, "RATE[:DELAY]" with RATE in tc's units (kbit, mbit, gbit; 1gbit = 1e9
/// bit/s) and DELAY in ms or us ("1gbit:0.2ms", "10gbit", "500mbit:50us"). Throws
/// InvalidArgument naming --link. Pure.
LinkSpec parse_link(const std::string& text);

/// True once SIGINT, SIGTERM or SIGHUP arrived while an EmulatedCluster was alive.
bool cluster_interrupted();

/// Deletes every network namespace named kClusterPrefix<pid>-* whose pid is not a running
/// process (a coordinator killed before it could clean up). Returns their names.
std::vector<std::string> remove_stale_cluster_namespaces();

/// The namespaces, links and shaping of one emulated cluster, created by the constructor and
/// removed by the destructor (Note [The emulated cluster]). Needs root and iproute2.
class EmulatedCluster {
 public:
  /// Creates `nodes` namespaces joined through a hub, every link shaped as `link`. Throws
  /// lockstep::Error with the failing command and its stderr (everything created so far is
  /// removed first).
  EmulatedCluster(int nodes, const LinkSpec& link);
  ~EmulatedCluster();
  EmulatedCluster(const EmulatedCluster&) = delete;
  EmulatedCluster& operator=(const EmulatedCluster&) = delete;

  int nodes() const { return static_cast<int>(node_ns_.size()); }
  /// The namespace of node `i` ("lsbc<pid>-n<i>"), its interface and its address.
  const std::string& netns(int i) const { return node_ns_[i]; }
  std::string ifname(int i) const;
  std::string address(int i) const;
  /// The path ranks setns() into: /var/run/netns/<netns(i)>.
  std::string netns_path(int i) const;
  /// Every namespace of this cluster (nodes and hub).
  std::vector<std::string> namespaces() const;
  /// Whether the delay is applied (sch_netem present), and otherwise why not.
  bool delay_applied() const { return delay_applied_; }
  const std::string& note() const { return note_; }
  /// The tc qdiscs of every link, as `tc qdisc show` prints them (for the report).
  const std::string& shaping() const { return shaping_; }

 private:
  void remove() noexcept;
  std::string tag_;  // "lsbc<pid>"
  std::string hub_;
  std::vector<std::string> node_ns_;
  std::vector<std::string> created_;  // what remove() deletes: only what this object made
  bool delay_applied_ = false;
  std::string note_;
  std::string shaping_;
};

/// Forks and execs `argv` with `env` added, stdout and stderr to `log_path`; inside node
/// `node`'s namespace of `cluster` with its hostname when `cluster` is not null (and the child
/// dies with this process). Returns the pid. Throws lockstep::Error when fork fails.
int spawn_process(const std::vector<std::string>& argv,
                  const std::vector<std::pair<std::string, std::string>>& env,
                  const std::string& log_path, const EmulatedCluster* cluster, int node);

}  // namespace bench
}  // namespace lockstep
