#pragma once
/// \file
/// lockstep-bench's command line: what the coordinator runs, and what one worker process runs.
/// Pure (no processes, no sockets, no LibTorch), so tests/bench/test_bench_options.cpp covers
/// it table-driven.

#include <cstdint>
#include <string>
#include <vector>

namespace lockstep {
namespace bench {

/// Exit code for a bad invocation (one line on stderr and the help, nothing started).
constexpr int kExitUsage = 2;
/// Exit code when the benchmark itself fails (a worker that cannot write its result, ...).
constexpr int kExitFailure = 1;
/// Exit code after SIGINT/SIGTERM/SIGHUP ended an emulated-cluster run (cleaned up).
constexpr int kExitInterrupted = 130;

/// One emulated link of --link (cluster.h): a rate and a one-way delay.
struct LinkSpec {
  std::string text;      ///< as given, "1gbit:0.2ms"
  double rate_bits = 0;  ///< bits per second
  double delay_ms = 0;   ///< one way; 0: none
};

/// What the user asked the coordinator for. Every field is a flag of the same name (see
/// `lockstep-bench --help`); lists are comma-separated on the command line.
struct BenchOptions {
  std::vector<std::string> models;    ///< --model, "all" expanded (model_names())
  std::vector<std::string> families;  ///< --scenario, "all" expanded (scenario_families())
  int steps = 30;                     ///< timed steps per scenario run
  int warmup = 5;                     ///< untimed steps before them
  int repeats = 3;                    ///< interleaved rounds over all scenarios
  int64_t batch = 0;                  ///< per-rank batch; 0: the model's default_batch()
  double bucket_cap_mb = 25;          ///< DDP bucket cap, lockstep and PyTorch
  std::vector<double> bucket_caps = {1, 4, 25, 100};      ///< caps of the bucket_sweep family
  std::string bucket_sweep_model = "deep_mlp";            ///< model of the bucket_sweep family
  int64_t sweep_min_bytes = 1024;                         ///< smallest all-reduce of the sweep
  int64_t sweep_max_bytes = int64_t{64} << 20;            ///< largest all-reduce of the sweep
  int sweep_world = 2;                                    ///< ranks of the all-reduce sweep
  std::vector<std::string> transports = {"gloo", "shm"};  ///< LOCKSTEP_TRANSPORT of the sweep
  int dp_replicas = 2;            ///< DataParallel replicas (and intra-op threads of the reference)
  int dp_omp_threads = 1;         ///< OMP_NUM_THREADS of the DataParallel workers
  bool dp_scope_blas = true;      ///< DataParallelOptions::scope_blas_threads
  int retries = 2;                ///< reruns of a disturbed run (Note [Disturbed runs])
  double disturbance_cpus = 0.1;  ///< other processes' CPU use (cores) that marks a run disturbed
  bool keep_disturbed = false;    ///< count disturbed runs anyway (still reported as such)
  /// glibc malloc settings of every worker, both sides alike (Note [Allocator settings] in
  /// coordinator.cpp): "default" (glibc's adaptive thresholds, what a user has) or "fixed".
  std::string malloc_mode = "default";
  int worker_timeout_s = 300;     ///< seconds before a scenario's workers are killed
  std::string python = "/usr/bin/python3";  ///< interpreter with torch for PyTorch's DDP
  std::string script;         ///< torch_ddp_bench.py; empty: next to the sources or the binary
  std::string json_path;      ///< --json: write the results here
  std::string markdown_path;  ///< --markdown: write the markdown report here
  std::string from_json;      ///< --from-json: render this earlier result instead of running
  std::string command;        ///< the invocation, "lockstep-bench ...", for the report
  /// --cluster NODESxRANKS: run the emulated-cluster scenarios (cluster.h) instead of the
  /// loopback families; 0 nodes: no cluster.
  int cluster_nodes = 0;
  int cluster_ranks_per_node = 0;  ///< ranks (processes) per node of --cluster
  std::vector<LinkSpec> links;     ///< --link, one cluster run per link
  std::vector<std::string> cluster_scenarios;  ///< --cluster-scenarios (cluster_scenario_names())
  /// --device: "cpu" (default) or "cuda" (Note [lockstep-bench on CUDA] in scenarios.h).
  std::string device = "cpu";
  /// CUDA devices visible to the coordinator (torch::cuda::device_count()); set by main()
  /// before planning a --device cuda run, 0 otherwise.
  int gpus = 0;
};

/// One worker process: one rank of one scenario run (internal flags, set by the coordinator).
struct WorkerConfig {
  std::string kind;  ///< one of worker_kinds()
  std::string model = "mlp";
  int64_t batch = 64;  ///< per rank (dp: the whole batch); 0: the model's default
  int steps = 30;
  int warmup = 5;
  int threads = 1;   ///< intra-op threads (dp: per replica)
  int replicas = 1;  ///< DataParallel replicas
  bool scope_blas = true;
  double bucket_cap_mb = 25;
  int64_t sweep_min_bytes = 1024;
  int64_t sweep_max_bytes = int64_t{64} << 20;
  std::string comm_hook = "allreduce";  ///< ddp: the DDP communication hook (worker.cpp's table)
  /// "cpu" or "cuda": on cuda, the model and batch go to cuda:<LOCAL_RANK % device_count>.
  std::string device = "cpu";
  std::string result;  ///< JSON result file
};

/// What parsing produced.
struct ParseResult {
  enum class Mode {
    kRun,     ///< coordinate a benchmark run (`options`)
    kRender,  ///< re-render `options.from_json`
    kWorker,  ///< run one worker (`worker`)
    kHelp,    ///< print `help_text`, exit 0, run nothing
  };
  Mode mode = Mode::kRun;
  BenchOptions options;
  WorkerConfig worker;
  std::string help_text;
};

/// Parses `argv` (argv[0] included). Throws lockstep::InvalidArgument with one line naming
/// the flag, its value and what is allowed; nothing is started either way.
ParseResult parse_bench_options(const std::vector<std::string>& argv);

/// The command-line flags that make a worker process parse back into `config` (the
/// coordinator appends them to its own executable's path).
std::vector<std::string> worker_arguments(const WorkerConfig& config);

/// What lockstep-bench says, and exits kExitUsage with before starting any worker, when
/// --device cuda is asked for where torch::cuda::is_available() is false. `visible_devices`
/// is CUDA_VISIBLE_DEVICES (null: not set), named in the message when set.
std::string cuda_unavailable_message(const char* visible_devices);

/// The help text (what `--help` prints).
std::string bench_help();

/// `v` without trailing zeros ("25", "0.5"), as a flag value.
std::string format_number(double v);

}  // namespace bench
}  // namespace lockstep
