#pragma once
// lockstep-run's command line and the environment each worker gets. Pure (no processes, no
// sockets), so tests/launch/test_run_options.cpp covers it table-driven.

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "lockstep/launch_env.h"

namespace lockstep {
namespace run {

/// Exit code for a bad invocation (one line on stderr, nothing started).
constexpr int kExitUsage = 2;
/// Exit code when the launcher itself fails (store unreachable, fork failed, ...).
constexpr int kExitLauncherError = 1;

/// torchrun's `--redirects` / `--tee` value: which of a worker's streams it selects (0 none,
/// 1 stdout, 2 stderr, 3 both), for every local rank ("3") or per local rank ("0:1,1:2";
/// local ranks not named get 0, and names past --nproc-per-node are ignored, as in torchrun).
struct StdSpec {
  int all = 0;                ///< the value for every local rank when `by_rank` is empty
  std::map<int, int> by_rank; ///< local rank -> value, when given as a map
  bool given = false;         ///< set by the flag or its PET_* variable
  /// The value for `local_rank`.
  int of(int local_rank) const;
};

/// Parses a `--redirects` / `--tee` value; throws InvalidArgument naming `flag`.
StdSpec parse_std_spec(const std::string& flag, const std::string& text);

/// Everything the command line says. Defaults match torchrun's where torchrun has the flag;
/// every flag also reads `PET_<FLAG>` (as torchrun does, and as Kubeflow's training operator
/// sets) when it is not given.
struct RunOptions {
  int nproc_per_node = 1;        ///< workers on this node (after resolving "auto")
  int nnodes = 1;                ///< nodes in the job; with --nnodes MIN:MAX, MAX
  int nnodes_min = 1;            ///< --nnodes MIN:MAX: MIN (equal to nnodes when not elastic)
  double rdzv_last_call = 5.0;   ///< elastic: seconds node 0 waits for more nodes once MIN joined
  int node_rank = 0;             ///< this node's index
  std::string master_addr = "127.0.0.1";  ///< host of node 0 (it hosts the store)
  int master_port = 29500;       ///< store port; 0 on node 0: pick a free one and print it
  bool standalone = false;       ///< single node, free port on loopback
  int max_restarts = 0;          ///< restarts of the whole group after a failure
  std::string run_id = "none";   ///< job id (scopes store keys; LOCKSTEP_JOB_ID); --rdzv-id too
  std::string rdzv_backend = "static";  ///< "static" or "c10d": both are lockstep's store on
                                        ///< node 0 (Note [Rendezvous backends] in options.cpp)
  std::string role = "default";  ///< the workers' role (ROLE_NAME), as torchrun's --role
  std::string log_dir;           ///< where per-rank stdout/stderr files go (stream_plan)
  StdSpec redirects;             ///< --redirects: streams written to log files only
  StdSpec tee;                   ///< --tee: streams written to log files and the console
  double monitor_interval = 0.1; ///< seconds between checks of the other nodes (store)
  double grace_period = 30.0;    ///< seconds between SIGTERM and SIGKILL
  double rdzv_timeout = 120.0;   ///< seconds for every node to join a round
  /// seconds without a heartbeat before another node's launcher counts as hung (Note
  /// [Launcher heartbeats] in heartbeat.h); 0: no heartbeats
  double heartbeat_timeout = 60.0;
  bool dry_run = false;          ///< print the plan and each worker's environment, start nothing
  bool quiet = false;            ///< no [lockstep-run] progress lines (summary still printed)
  std::string program;           ///< the worker program (searched in PATH)
  std::vector<std::string> args; ///< its arguments

  /// --nnodes MIN:MAX with MIN < MAX (Note [Elastic membership] in rounds.h).
  bool elastic() const { return nnodes_min < nnodes; }
};

/// What parsing produced: options to run, or text to print and exit 0 (--help).
struct ParseResult {
  RunOptions options;
  bool help = false;
  std::string help_text;
};

/// Parses `argv` (argv[0] included). `env` supplies PET_* defaults; `cpu_count` resolves
/// `--nproc-per-node auto` and `cpu`; `gpu_count` (the visible CUDA devices; none when empty)
/// resolves `--nproc-per-node gpu` and is called only then, because counting GPUs starts the
/// CUDA driver in the launcher. Throws lockstep::InvalidArgument with one line naming the
/// flag, its value and what is allowed.
ParseResult parse_run_options(const std::vector<std::string>& argv, const EnvMap& env,
                              int cpu_count, const std::function<int()>& gpu_count = {});

/// Where one worker's stdout (index 0) and stderr (1) go: the launcher's console (prefixed
/// "[rank r] "), a file under the log directory, or both.
struct StreamPlan {
  bool console[2] = {true, true};
  bool file[2] = {false, false};
};

/// The plan for local rank `local_rank`. Without --redirects and --tee: the console, plus files
/// when --log-dir is set (lockstep's habit). With either (torchrun's semantics): a --tee stream
/// goes to both, a --redirects stream to its file only, any other stream to the console only.
StreamPlan stream_plan(const RunOptions& options, int local_rank);

/// The value of LOCKSTEP_STDOUT_TTY for a worker whose streams follow `plan`: "1" when its
/// stdout reaches the console and the launcher's own stdout is a terminal
/// (`launcher_stdout_is_tty`), else "0" (its stdout is a pipe either way, so the worker
/// cannot tell by isatty; lockstep/env_vars.h).
std::string stdout_tty_env(const StreamPlan& plan, bool launcher_stdout_is_tty);

/// True when some local rank's plan writes a file (the agent then needs a log directory).
bool needs_log_files(const RunOptions& options);

/// Where this node's workers sit in one rendezvous round (from the launchers' rendezvous).
struct RoundLayout {
  int world_size = 1;          ///< workers over every node
  int rank_offset = 0;         ///< global rank of this node's local rank 0
  std::string master_addr;     ///< address workers connect to
  int master_port = 0;         ///< bound port of the store
  int restart_count = 0;       ///< round number (0 for the first attempt)
  int group_rank = 0;          ///< this node's index among the round's nodes (GROUP_RANK)
  int group_world_size = 1;    ///< nodes in the round (GROUP_WORLD_SIZE)
  bool member = true;          ///< false: the round was formed without this node (elastic)
  std::string store_token;     ///< the job token (raw bytes; Note [Job token] in rounds.cpp)
  std::vector<std::string> hosts;  ///< each node's host name, as its launcher announced it
};

/// The variables lockstep-run adds for local rank `local_rank` (the worker inherits the rest of
/// the launcher's
/// environment `env`): RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, ROLE_NAME,
/// ROLE_RANK, ROLE_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCKSTEP_AGENT_STORE and
/// TORCHELASTIC_USE_AGENT_STORE, LOCKSTEP_RESTART_COUNT and TORCHELASTIC_RESTART_COUNT,
/// LOCKSTEP_JOB_ID and TORCHELASTIC_RUN_ID, LOCKSTEP_ERROR_FILE (`error_file`),
/// LOCKSTEP_STORE_TOKEN (hex; LOCKSTEP_STORE_TOKEN_FILE emptied so the two never clash), and
/// OMP_NUM_THREADS = max(1, cpu_count / nproc_per_node) unless `env` sets it.
EnvMap worker_env(const RunOptions& options, const RoundLayout& layout, int local_rank,
                  const std::string& error_file, const EnvMap& env, int cpu_count);

}  // namespace run
}  // namespace lockstep
