#pragma once
/// \file
/// What a person sees of a training run: a progress bar or plain progress lines on rank 0,
/// metrics as JSON lines (and, optionally, TensorBoard event files), and a self-contained HTML report (inline SVG, no scripts, no
/// network) drawn from those lines.

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lockstep/options.h"

namespace lockstep {
namespace train {

/// Options of `Progress`.
struct ProgressOptions {
  /// Steps in the run (for the bar and the ETA); 0: unknown. Default 0.
  LOCKSTEP_ARG(int64_t, total_steps) = 0;
  /// This process's global rank: only rank 0 prints (see all_ranks). -1 (default): from the
  /// launch environment, as lockstep::is_main_process() says (rank 0, or not launched).
  LOCKSTEP_ARG(int, rank) = -1;
  /// 1: draw a bar, 0: plain lines, -1 (default): a bar when stdout reaches a terminal: as
  /// LOCKSTEP_STDOUT_TTY says when set (lockstep-run sets it to 1 when its own stdout is a
  /// terminal, since a worker's stdout is a pipe to the launcher), else isatty(stdout).
  LOCKSTEP_ARG(int, tty) = -1;
  /// Every rank prints, not only rank 0: plain lines on ranks other than 0 (a bar from each
  /// would overwrite the others' on one terminal). Default false.
  LOCKSTEP_ARG(bool, all_ranks) = false;
  /// Seconds between plain lines (and bar redraws). Default 5 (bar: 0.2).
  LOCKSTEP_ARG(double, every_seconds) = 5.0;
  /// Prefix of every line, e.g. "epoch 3". Default "train".
  LOCKSTEP_ARG(std::string, label) = "train";
};

/// Progress of a run on rank 0's stdout: a bar with samples/s, loss and ETA on a terminal,
/// else a plain line every `every_seconds`. Other ranks print nothing unless `all_ranks`.
/// Reads LOCKSTEP_STDOUT_TTY and, with rank -1, the launch environment when constructed.
/// Not thread-safe.
class Progress {
 public:
  explicit Progress(ProgressOptions options = ProgressOptions());
  /// Records that `step` (1-based, of total_steps) finished, with `samples` processed by the
  /// whole job since the previous call, and the step's loss. Prints when due.
  void update(int64_t step, int64_t samples, double loss);
  /// Changes the label (e.g. the epoch) of following lines.
  void set_label(const std::string& label) { options_.label(label); }
  /// Finishes the bar's line (prints a newline on a terminal).
  void finish();
  /// True when this instance prints a bar.
  bool is_bar() const { return bar_; }

 private:
  void print(int64_t step, double loss, bool final_line);
  ProgressOptions options_;
  bool bar_ = false;
  bool enabled_ = false;
  std::chrono::steady_clock::time_point start_, last_print_;
  int64_t samples_ = 0;
  int64_t steps_in_window_ = 0;
  int64_t first_step_ = -1;
  int64_t last_step_ = 0;
  double last_loss_ = 0;
  bool dirty_ = false;
  bool line_open_ = false;
};

/// One JSON-lines record: a kind ("step", "epoch", "eval", "bucket", ...) and numeric fields.
struct MetricRecord {
  std::string kind;
  std::vector<std::pair<std::string, double>> fields;
};

/// Scalars for TensorBoard: one event file (`events.out.tfevents.<unix time>.<host>.<pid>.<n>`,
/// the name torch.utils.tensorboard gives its files) in a directory, written without a protobuf
/// library (Note [TensorBoard event files] in lib/src/train/event_file.h). Point
/// `tensorboard --logdir` at the directory, or at its parent to compare runs. Every call of
/// `add_scalars` is flushed, so a running TensorBoard sees it. A writer constructed with an
/// empty directory (ranks other than 0) writes nothing. Not thread-safe.
class TensorBoardWriter {
 public:
  /// Creates `dir` (and its missing parents) and a new event file in it. Throws lockstep::Error
  /// naming the path when either cannot be created.
  ///
  /// `purge_step` >= 0 is torch's SummaryWriter(purge_step=N) for a run resumed at step N: the
  /// file starts with events that make TensorBoard drop what earlier files in the directory
  /// (the crashed run's) hold at steps >= N, on every tag, so the steps written again appear
  /// once (Note [TensorBoard purge step] in lib/src/train/event_file.h). -1 (default): purge
  /// nothing. Anything below -1 throws lockstep::InvalidArgument.
  explicit TensorBoardWriter(const std::string& dir, int64_t purge_step = -1);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;
  /// Writes `values` (tag, value) as scalars at `step`, in one event, and flushes. Tags group in
  /// TensorBoard by their prefix up to the first '/' ("step/loss").
  void add_scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values);
  /// Writes one scalar at `step` and flushes.
  void add_scalar(const std::string& tag, double value, int64_t step) {
    add_scalars(step, {{tag, value}});
  }
  /// Path of the event file ("" when disabled).
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& data);
  std::string path_;
  std::FILE* file_ = nullptr;
};

/// Options of `MetricsWriter`.
struct MetricsOptions {
  /// JSON-lines file to write; "" (default): none (ranks other than 0).
  LOCKSTEP_ARG(std::string, path) = "";
  /// Append to an existing file (a resumed run) instead of truncating it; "time" then continues
  /// from the largest "time" in the file rather than starting again at 0. Default false.
  LOCKSTEP_ARG(bool, append) = false;
  /// Directory for a TensorBoard event file mirroring the records (see MetricsWriter);
  /// "" (default): none. Give it on rank 0 only.
  LOCKSTEP_ARG(std::string, tensorboard_dir) = "";
  /// A resumed run's first step (the checkpoint's step + 1 when steps count from 1): the new
  /// event file makes TensorBoard drop the records of earlier files at steps >= it, as
  /// TensorBoardWriter's `purge_step` says. -1 (default): none. Purging goes by the TensorBoard
  /// step, so records drawn at their "epoch" (see MetricsWriter) keep theirs.
  LOCKSTEP_ARG(int64_t, tensorboard_purge_step) = -1;
};

/// Appends JSON-lines records to a file, one object per line with "kind" and "time" (seconds
/// since the writer was created; with `append`, plus the largest "time" already in the file,
/// so that a resumed run's clock goes on from where the records it keeps stopped) besides the
/// fields. A writer constructed with an empty path
/// (ranks other than 0) writes nothing. Flushes every line. Not thread-safe.
///
/// With `tensorboard_dir`, every record except "bucket" ones (a timeline, many per step, that
/// the HTML report draws) is also written to a TensorBoardWriter there: each field as the
/// scalar "<kind>/<field>" at the record's "step" field, else its "epoch" field, else the
/// count of earlier records of its kind; the field used as the step is not itself a scalar.
class MetricsWriter {
 public:
  explicit MetricsWriter(MetricsOptions options);
  explicit MetricsWriter(const std::string& path, bool append = false)
      : MetricsWriter(MetricsOptions().path(path).append(append)) {}
  ~MetricsWriter();
  /// Writes {"kind": kind, "time": t, field: value, ...} (and the scalars to TensorBoard).
  void write(const MetricRecord& record);
  /// Path written to ("" when disabled).
  const std::string& path() const { return path_; }
  /// Path of the TensorBoard event file ("" when none).
  std::string tensorboard_path() const { return tensorboard_ ? tensorboard_->path() : ""; }

 private:
  std::string path_;
  std::unique_ptr<std::ofstream> out_;
  std::unique_ptr<TensorBoardWriter> tensorboard_;
  std::map<std::string, int64_t> records_of_kind_;
  std::chrono::steady_clock::time_point start_;
  double time_offset_ = 0;  ///< seconds already in an appended file
};

/// Rewinds a JSON-lines metrics file to a checkpoint before a resumed run appends to it, so
/// that each step appears once: a run that crashed after its last checkpoint wrote records
/// that the resumed run writes again. Keeps, in order, every record whose "step" is <= `step`,
/// every record without a "step" whose "epoch" is <= `epochs_done` (epoch records count the
/// epochs finished), and every record with neither; drops the others and any line that is not
/// a JSON object (the last line, torn by the crash). Rewrites the file only when it drops
/// something, atomically (temp file + rename). Returns the number of lines dropped; a missing
/// file drops none. Throws lockstep::Error naming the path when it is not a regular file or
/// cannot be read or replaced. Call on the rank that writes metrics, before its MetricsWriter
/// opens the file with `append`.
size_t rewind_metrics(const std::string& path, int64_t step, int64_t epochs_done);

/// Key/value lines of a report's summary table.
using SummaryLines = std::vector<std::pair<std::string, std::string>>;

/// Name -> value settings of a run, shown as a table in a report.
using Settings = std::map<std::string, std::string>;

/// Options of `write_report`.
struct ReportOptions {
  /// The JSON-lines file written by MetricsWriter. Required.
  LOCKSTEP_ARG(std::string, metrics_path) = "";
  /// Where to write the HTML report. Required.
  LOCKSTEP_ARG(std::string, output_path) = "";
  /// Title of the page. Default "lockstep training report".
  LOCKSTEP_ARG(std::string, title) = "lockstep training report";
  /// Key/value lines shown in a summary table at the top (final accuracy, config, ...).
  LOCKSTEP_ARG(SummaryLines, summary) = {};
  /// A free-text block shown verbatim (e.g. a generated text sample). Default none.
  LOCKSTEP_ARG(std::string, preformatted) = "";
  /// The run's settings (flag name -> value, e.g. a recipe's config), shown as a table under
  /// "Settings". Default none (no table).
  LOCKSTEP_ARG(Settings, settings) = {};
  /// The command line that started the run, shown verbatim under "Command". Default none.
  LOCKSTEP_ARG(std::string, command) = "";
  /// True while the run is still going: the page carries
  /// `<meta http-equiv="refresh" content="10">` so an open browser tab follows the run, and
  /// says it is in progress. Write the final report with false (the default) to drop both.
  LOCKSTEP_ARG(bool, live) = false;
};

/// Writes a self-contained HTML page with one SVG line chart per numeric field of the "step"
/// and "epoch" records (loss, accuracy, samples/s, ...). Fields ending in "_per_s" are drawn
/// as throughput; "ddp" records (step, forward_ms, backward_compute_ms, comm_ms,
/// exposed_comm_ms) share one chart of DDP time per step; "rank_throughput" records (step and
/// one field "rank<r>" per rank: that rank's samples/s in the step) share one chart with a line
/// per rank. When "bucket" records (step, bucket, start_ms, end_ms; times since the step's
/// first gradient hook) are present, the last three steps that have them are drawn as lanes on
/// one time axis: backward compute (0 to backward_compute_ms of the step's "ddp" record), the
/// wait for communication after it (exposed_comm_ms), and one bar per bucket reduction, so what
/// overlaps backward and what is exposed read at a glance.
/// Atomic (temp file + rename). Throws lockstep::Error naming the path on I/O failure.
void write_report(const ReportOptions& options);

/// One run of an overlay report: its name in the legend and its metrics.jsonl.
struct OverlayRun {
  std::string label;
  std::string metrics_path;
};

/// Options of `write_overlay_report`.
struct OverlayOptions {
  /// The runs to draw, in legend order (colours cycle after 10). Required: at least one.
  LOCKSTEP_ARG(std::vector<OverlayRun>, runs) = {};
  /// Where to write the HTML page. Required.
  LOCKSTEP_ARG(std::string, output_path) = "";
  /// Title of the page. Default "lockstep runs compared".
  LOCKSTEP_ARG(std::string, title) = "lockstep runs compared";
};

/// Writes a self-contained HTML page that overlays several runs: for each loss field of the
/// "step" and "epoch" records (loss, train_loss, val_loss, ...) one SVG chart with one line per
/// run, each run in its own colour, with a legend of run labels. Atomic. Throws
/// lockstep::Error naming the path when a metrics file cannot be read or is not JSON lines, and
/// when no run or no output path is given. (The `lockstep-report` program wraps this.)
void write_overlay_report(const OverlayOptions& options);

}  // namespace train
}  // namespace lockstep
