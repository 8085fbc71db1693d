#pragma once
// Shared plumbing of lockstep's training recipes: command line + JSON config, process group
// start-up, preemption signals, data sharding, gradient averaging, checkpoint/resume and the
// end-of-run report. Each recipe (recipes/<name>/main.cpp) keeps only its data and model.
//
// Note [Recipe exit codes]
//   0   finished
//   1   error (the message names the rank and the cause)
//   2   bad command line or config file (the message names the flag or key)
//   75  preempted: SIGTERM/SIGINT arrived, the current step finished, a checkpoint was
//       written; run the same command again (or let `lockstep-run --max-restarts` do it) and
//       it resumes from that checkpoint. (75 is EX_TEMPFAIL in sysexits.h: "try again".)
//
// Note [Preemption]
// The signal handler only sets a flag (async-signal-safe). After every step all ranks
// all-reduce their flags (max), so a signal that reached one rank stops every rank after the
// same step; they then write one checkpoint together and exit with kExitPreempted. lib/
// never installs handlers or exits: that is the program's business. start() installs the
// handlers only once the process group is up: during set-up there is nothing to save, and a
// SIGTERM there must end the rank at once (default action), not set a flag nobody reads yet.

#include <cxxopts.hpp>
#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/ddp.h"
#include "lockstep/lockstep.h"
#include "lockstep/train/checkpoint.h"
#include "lockstep/train/metrics.h"

namespace lockstep {
namespace recipe {

constexpr int kExitOk = 0;
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;
constexpr int kExitPreempted = 75;

/// Thrown for a bad flag or config key/value; main() maps it to kExitUsage.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Thrown when --help was given (after printing it); main() maps it to kExitOk.
struct HelpShown {};

/// Adds the flags every recipe shares (config, epochs, batch size, lr, seed, threads,
/// out-dir, checkpointing, data limits, progress).
void add_common_options(cxxopts::Options& options, int default_epochs, int default_batch,
                        double default_lr);

/// Parses argv, first applying `--config FILE` (a JSON object whose keys are long flag names;
/// flags given on the command line win). Unknown keys, non-scalar values and values that do
/// not parse are UsageErrors naming the file and key. Prints help and throws HelpShown on --help.
cxxopts::ParseResult parse(cxxopts::Options& options, int argc, char** argv);

/// The common settings, read from a ParseResult.
struct Common {
  int epochs = 1;
  int64_t batch_size = 64;  ///< global batch: split evenly over ranks
  double lr = 1e-3;
  uint64_t seed = 0;
  int threads = 1;
  std::string out_dir;
  std::string checkpoint;   ///< path of the resumable checkpoint
  bool resume = true;
  int64_t checkpoint_every = 0;  ///< steps; 0: at the end of each epoch only
  int64_t stop_after = 0;        ///< test hook: behave as if preempted after this many steps
  int64_t max_steps = 0;         ///< stop (finished) after this many steps; 0: run all epochs
  int64_t limit_train = 0;       ///< use only the first N training examples; 0: all
  int64_t limit_eval = 0;
  int progress = -1;             ///< -1 auto, 0 lines, 1 bar
  std::map<std::string, std::string> as_config() const;
};
Common read_common(const cxxopts::ParseResult& result);

/// Installs the SIGTERM/SIGINT flag-setting handler (see Note [Preemption]).
void install_stop_handlers();
/// True once SIGTERM or SIGINT arrived in this process.
bool stop_signalled();
/// Collective: true on every rank when any rank was signalled (or `force` on any rank).
bool agree_stop(ProcessGroup& group, bool force = false);

/// The process group of this run (from the launch environment; one rank without one) and
/// torch's intra-op threads set to `threads`; then installs the stop handlers (Note
/// [Preemption]).
ProcessGroupPtr start(int threads);

/// Positions of one epoch's examples: a permutation of [0, n) drawn from (seed, epoch).
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch);

/// The examples rank `rank` of `world` trains on in global step `batch` of an epoch: its
/// slice of the global batch (global batch = local batch * world), so one rank and N ranks
/// see the same global batches. Returns an empty vector past the epoch's last full batch.
std::vector<int64_t> local_batch(const std::vector<int64_t>& order, int64_t batch,
                                 int64_t global_batch, int rank, int world);

/// Number of full global batches per epoch.
inline int64_t batches_per_epoch(int64_t n, int64_t global_batch) { return n / global_batch; }


/// Where a run is: saved in the checkpoint metadata.
struct Position {
  int64_t epoch = 0;      ///< current epoch (0-based)
  int64_t batch = 0;      ///< next global batch within the epoch
  int64_t step = 0;       ///< global steps taken
};

/// Collective: saves model, optimizer, position, every rank's RNG state and the config hash.
void save(ProcessGroup& group, const std::string& path, const std::string& recipe,
          torch::nn::Module& model, torch::optim::Optimizer& optimizer, const Position& position,
          const std::map<std::string, std::string>& config, const std::string& extra_json = "{}");

/// Collective: the end of a run stopped early (preemption, --stop-after): saves like `save`,
/// tells the user (rank 0) how to resume, and returns kExitPreempted.
int exit_preempted(ProcessGroup& group, const std::string& path, const std::string& recipe,
                   torch::nn::Module& model, torch::optim::Optimizer& optimizer,
                   const Position& position, const std::map<std::string, std::string>& config,
                   const std::string& extra_json = "{}");

/// Collective: loads what `save` wrote if `path` exists (returns false otherwise). Rejects a
/// checkpoint of another recipe or configuration, naming the differing keys.
bool load(ProcessGroup& group, const std::string& path, const std::string& recipe,
          torch::nn::Module& model, torch::optim::Optimizer& optimizer, Position& position,
          const std::map<std::string, std::string>& config, std::string* extra_json = nullptr);

/// Writes DDP's statistics of the last iteration as "ddp" and "bucket" records (the report
/// draws the bucket timeline from them).
void write_ddp_stats(train::MetricsWriter& metrics, int64_t step, const DDPStats& stats);

/// Runs `body` with errors mapped to exit codes: usage errors print and return kExitUsage,
/// everything else goes through lockstep::run_main (logged with the rank, written to the
/// launcher's error file, kExitError).
int run_main(const std::function<int()>& body);

/// "1:23" for logs.
std::string seconds_text(double s);

}  // namespace recipe
}  // namespace lockstep
