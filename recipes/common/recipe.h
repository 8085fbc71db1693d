#pragma once
// Shared plumbing of lockstep's training recipes: command line + JSON config, process group
// start-up, preemption signals, data order, non-finite loss checks, checkpoint/resume and the
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

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/ddp.h"
#include "lockstep/lockstep.h"
#include "lockstep/sampler.h"
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

/// Adds the flags every recipe shares (config, epochs, batch size, lr, seed, threads, device,
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
  std::string device = "cpu";  ///< --device: cpu, cuda (cuda:LOCAL_RANK), cuda:N or auto
  std::string out_dir;
  std::string checkpoint;   ///< path of the resumable checkpoint
  bool resume = true;
  int64_t checkpoint_every = 0;  ///< steps; 0: at the end of each epoch only
  int64_t stop_after = 0;        ///< test hook: behave as if preempted after this many steps
  int64_t max_steps = 0;         ///< stop (finished) after this many steps; 0: run all epochs
  int64_t limit_train = 0;       ///< use only the first N training examples; 0: all
  int64_t limit_eval = 0;
  int progress = -1;             ///< -1 auto, 0 lines, 1 bar
  std::string tensorboard;       ///< directory for TensorBoard event files; "" none
  std::string comm_hook = "allreduce";  ///< --comm-hook: how DDP reduces gradients
  int64_t report_every = 200;    ///< steps between live reports; 0: at epoch ends only
  std::map<std::string, std::string> as_config() const;
};
Common read_common(const cxxopts::ParseResult& result);
/// The recipes' DDP options: NaN/Inf gradients abort on every rank; --comm-hook's hook.
lockstep::DDPOptions ddp_options(const Common& common);

// Note [Recipe device]
// --device picks where a rank trains (lockstep::bind_local_device: "cuda" is cuda:LOCAL_RANK,
// made the current device; "auto" is CUDA when a GPU is visible). A recipe moves its model
// there before building the optimizer and each batch there before the forward pass; its data,
// metrics and evaluation sums stay on the CPU, and checkpoints and exported weights hold CPU
// copies (train::save_checkpoint and export_weights copy to the CPU; load copies into the
// model's device), so a checkpoint written on a GPU resumes on the CPU and back. The CUDA
// random generator is not checkpointed: dropout streams on a GPU start afresh on resume. The
// device is not part of the run's config (like --threads): a run may resume on another
// device. The CUDA path is unverified on a GPU in this tree.

/// --device resolved and bound (Note [Recipe device]). Call before start(), so that a bad
/// --device fails before the rendezvous; UsageError (exit 2) naming --device when the value
/// is not cpu/cuda/cuda:N/auto, when CUDA is asked for and no device is visible, or when the
/// local rank has no GPU of its own.
torch::Device bind_device(const Common& common);

/// Installs the SIGTERM/SIGINT flag-setting handler (see Note [Preemption]).
void install_stop_handlers();
/// True once SIGTERM or SIGINT arrived in this process.
bool stop_signalled();

/// What end_step learned from every rank; the same on every rank.
struct StepEnd {
  /// Every rank stops after this step: a rank was signalled or `--stop-after` steps were
  /// reached (see Note [Preemption]).
  bool stop = false;
  /// Each rank's `step_seconds`, by rank (for the report's per-rank throughput).
  std::vector<double> step_seconds;
};

/// Collective, once after every training step, with this rank's loss of the step and the
/// seconds its step took. Raises lockstep::Error on every rank when the loss is not finite on
/// any rank, naming the step and the ranks (before any checkpoint of that step is written, so
/// the last one stays usable). One all-reduce carries the stop flags, the loss checks and the
/// step times, so the per-rank timings cost no collective of their own.
StepEnd end_step(ProcessGroup& group, const Common& common, int64_t step, double loss,
                 double step_seconds);

/// The process group of this run (from the launch environment; one rank without one) and
/// torch's intra-op threads set to `threads`; then installs the stop handlers (Note
/// [Preemption]).
ProcessGroupPtr start(int threads);

/// Collective: rank 0 creates `dir` (one level), then every rank waits until it exists.
void make_out_dir(ProcessGroup& group, const std::string& dir);

/// This rank's share of the global batch: --batch-size / world size; UsageError when the
/// ranks do not divide it.
int64_t local_batch_size(const Common& common, const ProcessGroup& group);

/// Steps of the whole run: `per_epoch` * --epochs, capped by --max-steps.
int64_t total_steps(const Common& common, int64_t per_epoch);

// Note [Recipe data order]
// Every recipe draws its training examples from lockstep::ShardedSampler (PyTorch's
// DistributedSampler order: a permutation seeded with --seed + epoch, strided over the ranks,
// drop_last so that every rank gets the same share) and reads its local batches from it in
// order. Rank r's local batch b holds positions b*G + r, b*G + r + W, ... of the epoch's
// permutation (G the global batch, W ranks), so global batch b is the same set of examples on
// one rank and on W ranks. The sampler's SamplerState travels in the checkpoint (Checkpointer)
// and resumes the epoch exactly where it stopped.

/// The training sampler of a recipe over `n` examples; see Note [Recipe data order].
ShardedSampler train_sampler(const ProcessGroup& group, int64_t n, uint64_t seed);

/// This rank's next local batch of up to `size` example indices from `sampler`; empty when the
/// epoch is exhausted.
std::vector<int64_t> next_batch(ShardedSampler& sampler, int64_t size);

/// Where a run is: saved in the checkpoint metadata.
struct Position {
  int64_t epoch = 0;      ///< current epoch (0-based)
  int64_t batch = 0;      ///< next global batch within the epoch
  int64_t step = 0;       ///< global steps taken
};

/// A recipe's resumable checkpoint: model, optimizer, Position, the training sampler's
/// SamplerState, every rank's RNG state and the config (with its hash), in one file.
/// Holds references to the group, model and optimizer, which must outlive it; the sampler is
/// a handle (Note [Shared handle]), so it acts on the recipe's own sampler.
class Checkpointer {
 public:
  Checkpointer(ProcessGroup& group, std::string path, std::string recipe, torch::nn::Module& model,
               torch::optim::Optimizer& optimizer, ShardedSampler sampler,
               std::map<std::string, std::string> config);

  /// Collective: saves everything, with the sampler's state after the batches it handed out.
  void save(const Position& position) const;

  /// Collective: the end of a run stopped early (preemption, --stop-after): saves, tells the
  /// user (rank 0) how to resume, and returns kExitPreempted.
  int exit_preempted(const Position& position) const;

  /// Collective: loads what `save` wrote if the file exists (returns false otherwise),
  /// restoring `position` and the sampler. Rejects a checkpoint of another recipe or
  /// configuration, naming the differing keys.
  bool load(Position& position);

 private:
  ProcessGroup& group_;
  std::string path_;
  std::string recipe_;
  torch::nn::Module& model_;
  torch::optim::Optimizer& optimizer_;
  ShardedSampler sampler_;
  std::map<std::string, std::string> config_;
};

/// The run's metrics writer: JSON lines at `path` and, with --tensorboard, TensorBoard scalars,
/// on rank 0 (other ranks get a writer that writes nothing). When `resumed` (from a checkpoint
/// at `step`), it appends, and its event file makes TensorBoard drop the crashed run's scalars
/// past `step` (MetricsOptions::tensorboard_purge_step), so each step shows once.
train::MetricsWriter metrics_writer(const Common& common, int rank, const std::string& path,
                                    bool resumed, int64_t step);

/// Writes a "rank_throughput" record at `step`: field "rank<r>" is `samples_per_rank` /
/// `step_seconds[r]` (the report draws one line per rank).
void write_rank_throughput(train::MetricsWriter& metrics, int64_t step,
                           const std::vector<double>& step_seconds, int64_t samples_per_rank);

/// True when a live report is due after `step`: every --report-every steps (never when 0).
bool report_due(const Common& common, int64_t step);

/// Rank 0: writes `options` as a live report (it reloads itself in a browser until the final,
/// non-live write) with the run's position as its summary.
void write_live_report(train::ReportOptions options, const Position& position);

/// The end of a training step, as every recipe ends it: end_step's all-reduce, each rank's
/// throughput on logged steps (write_rank_throughput, `samples_per_rank` per step), and rank
/// 0's live report when report_due (`report` builds its options, only then). Collective.
/// Returns whether every rank stops now (StepEnd::stop).
bool finish_step(ProcessGroup& group, const Common& common, const Position& position,
                 double loss, double step_seconds, bool logged, int64_t samples_per_rank,
                 train::MetricsWriter& metrics,
                 const std::function<train::ReportOptions()>& report);

/// Writes DDP's statistics of the last iteration as "ddp" and "bucket" records (the report
/// draws the bucket timeline from them).
void write_ddp_stats(train::MetricsWriter& metrics, int64_t step, const DDPStats& stats);

/// Runs `body` with errors mapped to exit codes: usage errors print and return kExitUsage,
/// everything else goes through lockstep::run_main (logged with the rank, written to the
/// launcher's error file, kExitError).
int run_main(const std::function<int()>& body);

/// "1:23" for logs.
std::string seconds_text(double s);

/// The report options every recipe shares: metrics_path, `out_dir`/report.html, the title,
/// the run's config as settings and argv as the command.
train::ReportOptions report_options(const Common& common, const std::string& metrics_path,
                                    const std::string& title,
                                    const std::map<std::string, std::string>& config, int argc,
                                    char** argv);

/// argv as one shell line (arguments with spaces or shell characters single-quoted), for the
/// report's "Command" block.
std::string command_line(int argc, char** argv);

}  // namespace recipe
}  // namespace lockstep
