#pragma once
/// \file
/// What lockstep-bench runs: the models it knows, the scenario families a user selects with
/// --scenario, the scenarios each family adds for a model, and the targets the report checks
/// the results against. Pure (no LibTorch, no processes).

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "options.h"

namespace lockstep {
namespace bench {

/// The models `--model all` runs, in that order (models.h builds them).
std::vector<std::string> model_names();
/// Every model models.h builds: model_names(), small_mlp (784-128-128-10, the DataParallel
/// comparison's small model), and issue 18's GPU models wide and deep (the default of
/// --device cuda), which run only when named.
std::vector<std::string> all_model_names();
/// Default per-rank batch of a model: 64, transformer 16, wide 512, deep 256 (the Python peer
/// gets it passed).
int64_t default_batch(const std::string& model);

/// The families `--scenario all` selects, in the order they run:
/// plain, floor, ddp, perparam, torch_ddp, overhead, dp, bucket_sweep, allreduce.
std::vector<std::string> scenario_families();
/// What one worker process can run (`--worker KIND`): plain, floor, ddp, perparam, overhead,
/// dp, allreduce. PyTorch's DDP runs in python3 instead (torch_ddp_bench.py).
std::vector<std::string> worker_kinds();

/// Note [lockstep-bench on CUDA]
/// `--device cuda` runs issue 18's comparison: every rank's model and batch on
/// cuda:<LOCAL_RANK % visible GPUs> (so the two ranks of world 2 share GPU 0 on a one-GPU
/// machine, the measured setup), every timed step bounded by torch::cuda::synchronize()
/// on both sides (lockstep's worker and torch_ddp_bench.py), and these scenarios of each model
/// (cuda_scenarios_for): plain; lockstep DDP world 1 over the default transport and over
/// LOCKSTEP_TRANSPORT=nccl; PyTorch DDP world 1 over Gloo and NCCL; lockstep DDP world 2 over
/// the default transport, Gloo and NCCL; PyTorch DDP world 2 over Gloo and NCCL. NCCL refuses
/// two ranks on one GPU ("Duplicate GPU detected"), so the NCCL world-2 rows are skipped, with
/// that reason, when fewer than 2 GPUs are visible. A row whose workers fail (LOCKSTEP_TRANSPORT=nccl
/// where lockstep was built without NCCL, a python3 torch without CUDA) is a failed or skipped
/// row with the error in its note; the other rows still run. The CPU-only families (floor, perparam,
/// overhead, dp, bucket_sweep, allreduce) are not offered. main() refuses --device cuda, with
/// exit code 2 and before starting any worker, where torch::cuda::is_available() is false.

/// The families `--scenario all` selects with --device cuda: plain, ddp, torch_ddp.
std::vector<std::string> cuda_scenario_families();
/// The worker kinds that can run with --device cuda: plain, floor, ddp, perparam.
std::vector<std::string> cuda_worker_kinds();

/// One scenario of one model: what every rank runs, and what its ratio is against.
struct Scenario {
  std::string id;            ///< unique in one model: "ddp_w2", "floor_w2", "ddp_w2_cap4", ...
  std::string kind;          ///< a worker kind, or torch_ddp
  std::string label;         ///< human-readable
  std::string model;         ///< "-" for the all-reduce sweep
  int world = 1;             ///< ranks (processes)
  int threads = 1;           ///< intra-op threads per rank (dp: per replica)
  int replicas = 1;          ///< DataParallel replicas
  int64_t batch = 0;         ///< per rank (dp and plain: the whole batch); 0: the model's default
  double bucket_cap_mb = 0;  ///< 0: --bucket-cap-mb
  std::string transport;     ///< LOCKSTEP_TRANSPORT; empty: the default (auto)
  std::string reference;     ///< id of the scenario its ratio is against (same model)
  bool grad_view = false;    ///< torch_ddp: gradient_as_bucket_view=True
  int omp_threads = 0;       ///< OMP_NUM_THREADS; 0: `threads`
  bool scope_blas = true;    ///< dp: DataParallelOptions::scope_blas_threads
  int nodes = 0;             ///< emulated-cluster nodes (world = nodes x ranks); 0: loopback
  std::string comm_hook;     ///< ddp: the DDP communication hook; empty: the default
  std::string torch_backend = "gloo";  ///< torch_ddp: the process-group backend, gloo or nccl
  /// Not run, and why (reported as a skipped row): a row this machine cannot run, such as
  /// NCCL with two ranks on one GPU. Empty: it runs.
  std::string skip;
};

/// The scenarios of `model` selected by `options.families`, with references to scenarios that
/// do not run cleared. `plain` and the synchronized floor (`floor_w2`: two ranks training side
/// by side, no gradient communication, one 1-element all-reduce per step) come with any of
/// ddp, perparam and torch_ddp, since their ratios are read against them.
std::vector<Scenario> scenarios_for(const BenchOptions& options, const std::string& model);

/// The --device cuda scenarios of `model` selected by `options.families` with
/// `options.gpus` GPUs visible (Note [lockstep-bench on CUDA]), in the order they run, with
/// references to scenarios that do not run cleared. scenarios_for returns these when
/// options.device is "cuda". Pure.
std::vector<Scenario> cuda_scenarios_for(const BenchOptions& options, const std::string& model);

/// The scenarios of an emulated-cluster run (--cluster-scenarios), in order: gloo (lockstep
/// DDP, flat Gloo), hier (lockstep DDP, shared memory within a node and Gloo between nodes),
/// torch_ddp (PyTorch's DDP over Gloo), fp16 (lockstep DDP, flat Gloo, fp16_compress_hook),
/// powersgd (the same with powersgd_hook, rank 4).
std::vector<std::string> cluster_scenario_names();
/// The emulated-cluster scenarios of `model` selected by `options.cluster_scenarios`, on
/// options.cluster_nodes x options.cluster_ranks_per_node ranks, their ratios against gloo.
std::vector<Scenario> cluster_scenarios_for(const BenchOptions& options, const std::string& model);
/// The goals of one link's cluster results (the "models" array of one link): hierarchical
/// at most 0.7x flat Gloo, PowerSGD at most 0.3x; fp16 and PyTorch against flat Gloo reported. Same fields as
/// compute_targets'.
nlohmann::json compute_cluster_targets(const nlohmann::json& models, const std::string& link);

/// The all-reduce sweep's scenarios: one per transport in `options.transports` (empty when
/// the allreduce family is not selected).
std::vector<Scenario> sweep_scenarios(const BenchOptions& options);

/// Issue 18's goals for a --device cuda run, from its per-model results (same fields as
/// compute_targets'): lockstep DDP world 2 at most 0.9x PyTorch's DDP over Gloo, over the
/// default transport and over Gloo; the default transport no slower than lockstep's Gloo
/// path; world 1 at most 3% over plain training. All reported (requirement "(reported)"),
/// their goals checked.
nlohmann::json compute_cuda_targets(const nlohmann::json& models);

/// The targets the report checks, from the per-model results of a run (the "models" array
/// of the JSON document): one object per target with model, target, value, requirement, met,
/// goal and goal_met. Reads only the JSON, so an old result file gets them too.
nlohmann::json compute_targets(const nlohmann::json& models);

}  // namespace bench
}  // namespace lockstep
