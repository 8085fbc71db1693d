#pragma once
/// \file
/// The launch-environment resolver: turns the environment a launcher left behind into one
/// topology. Pure (takes the environment as a map), so it is tested without processes.
///
/// Precedence, highest first (the first launcher whose rank variable is present wins, and all
/// of its fields come from that launcher; explicit overrides then replace single fields):
///   1. explicit arguments (`LaunchOverrides`, e.g. from command-line flags)
///   2. torchrun / lockstep-run / Kubeflow PyTorchJob: RANK, WORLD_SIZE, LOCAL_RANK,
///      LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT. TORCHELASTIC_USE_AGENT_STORE
///      (or LOCKSTEP_AGENT_STORE) = 1/True means the launcher hosts the store on MASTER_PORT,
///      so every rank, rank 0 too, connects as a client.
///   3. PET_* (torchrun's own arguments as set by Kubeflow's training operator for a pod that
///      runs one process): PET_NODE_RANK, PET_NNODES, PET_NPROC_PER_NODE (must be 1),
///      PET_MASTER_ADDR, PET_MASTER_PORT.
///   4. Slurm (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID,
///      SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE; master = MASTER_ADDR or the first host of
///      SLURM_JOB_NODELIST; port = MASTER_PORT or 20000 + SLURM_JOB_ID % 20000.
///   5. Open MPI (mpirun): OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE; master from
///      MASTER_ADDR / MASTER_PORT (pass them with `mpirun -x`).
///   6. MPICH / Intel MPI (PMI): PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS.
///   7. nothing: an InvalidArgument that says how to launch the program, unless it says it
///      runs alone: LOCKSTEP_STANDALONE=1, or both rank and world size given as overrides.
/// MASTER_ADDR and MASTER_PORT fill in for launchers that do not set a master themselves; a job
/// of more than one process needs both (Slurm derives the port from SLURM_JOB_ID).
///
/// A partial set is an InvalidArgument naming what is missing and what to do: WORLD_SIZE,
/// LOCAL_RANK, LOCAL_WORLD_SIZE or GROUP_RANK without RANK; RANK without WORLD_SIZE; a world
/// size above 1 without MASTER_ADDR or MASTER_PORT; LOCKSTEP_STANDALONE=1 beside a launcher's
/// variables.
///
/// resolve_local_device / bind_local_device turn the local rank into the device a worker trains
/// on (Note [Local device] in launch_env.cpp), as PyTorch users write
/// `torch.cuda.set_device(local_rank)` and `torch.device(f"cuda:{local_rank}")`.

#include <c10/core/Device.h>

#include <map>
#include <optional>
#include <string>

namespace lockstep {

/// A process environment as name -> value.
using EnvMap = std::map<std::string, std::string>;

/// Values that override what the environment says (typically command-line flags).
struct LaunchOverrides {
  std::optional<int> rank;
  std::optional<int> world_size;
  std::optional<int> local_rank;
  std::optional<int> local_world_size;
  std::optional<int> node_rank;
  std::optional<std::string> master_addr;
  std::optional<int> master_port;
};

/// The resolved topology of this process.
struct LaunchEnv {
  int rank = 0;              ///< global rank, 0 <= rank < world_size
  int world_size = 1;        ///< number of processes in the job
  int local_rank = 0;        ///< rank among the processes on this node
  int local_world_size = 1;  ///< processes on this node
  int node_rank = 0;         ///< index of this node
  std::string master_addr = "127.0.0.1";  ///< host of the rendezvous store
  int master_port = 29500;                ///< port of the rendezvous store
  /// True when the launcher already hosts the store (torchrun's agent store, lockstep-run):
  /// every rank connects as a client.
  bool launcher_hosts_store = false;
  std::string job_id = "default";  ///< scopes store keys (LOCKSTEP_JOB_ID, run id, Slurm job)
  int restart_count = 0;           ///< restart round (LOCKSTEP_RESTART_COUNT, torchelastic)
  std::string launcher = "none";   ///< which launcher's variables were used
  /// True for a job of this process alone with no master given (LOCKSTEP_STANDALONE=1,
  /// RANK=0 WORLD_SIZE=1, or rank 0 / world size 1 as overrides): init_process_group then
  /// rendezvouses in-process and opens no listening socket.
  bool single_process = false;
  /// For every field above: where its value came from ("RANK", "default", "argument", ...).
  std::map<std::string, std::string> sources;

  /// One line: "rank 1/4 (local 1/2, node 0) master 10.0.0.1:29500 via torchrun [rank<-RANK ...]".
  std::string describe() const;
};

/// Resolves the topology from `env` and `overrides` (see the file comment for precedence).
/// Throws InvalidArgument naming the variable, its value and the allowed range for a
/// non-numeric or negative value, rank >= world size, local rank >= local world size, or a
/// port outside 1..65535; and naming what is missing and how to launch for a partial set of
/// variables or none at all (see the file comment).
LaunchEnv resolve_launch_env(const EnvMap& env, const LaunchOverrides& overrides = {});

/// This process's environment (environ) as an EnvMap.
EnvMap process_environment();

/// True when `env` makes this process global rank 0, or names no launcher at all (a program
/// started by hand: the only process): the one that prints progress, writes metrics and files
/// that every rank would write alike. Needs no process group, so it also works before
/// init_process_group. Throws InvalidArgument, as resolve_launch_env does, for a launcher's
/// variables that are partial or out of range.
bool is_main_process(const EnvMap& env);
/// `is_main_process(process_environment())`.
bool is_main_process();

/// The device this worker trains on, from `device` and the launch environment `env`, given
/// `cuda_device_count` visible CUDA devices (torch::cuda::device_count()). Pure: it sets
/// nothing, so it is tested without a GPU. `device` is one of
///   "cpu"     the CPU;
///   "cuda"    cuda:LOCAL_RANK: one GPU per local rank (`lockstep-run --nproc-per-node gpu`);
///   "cuda:N"  device N, whatever the local rank;
///   "auto"    "cuda" when a CUDA device is visible, else the CPU.
/// The local rank is resolve_launch_env(env).local_rank (LOCAL_RANK, SLURM_LOCALID,
/// OMPI_COMM_WORLD_LOCAL_RANK, ...), and 0 for a process that no launcher started.
/// Throws InvalidArgument for any other string; for "cuda" or "cuda:N" when no CUDA device is
/// visible (a CPU-only LibTorch, no GPU, or CUDA_VISIBLE_DEVICES hiding them); for a local
/// rank (or N) not below the number of visible devices, naming both numbers; and, as
/// resolve_launch_env does, for a launcher's variables that are partial or out of range.
c10::Device resolve_local_device(const std::string& device, const EnvMap& env,
                                 int cuda_device_count);

/// resolve_local_device(device, env, visible CUDA devices), and, for a CUDA device, makes it
/// the calling thread's current CUDA device (torch.cuda.set_device), so that tensors created
/// with `torch::kCUDA` and the CUDA streams of this thread use it. Call it once at the start
/// of a worker, on the thread that trains, before creating CUDA tensors or the process group;
/// then move the model and every batch to the device it returns:
///
///     auto device = lockstep::bind_local_device("cuda");  // cuda:LOCAL_RANK
///     model->to(device);
///
/// Other threads keep their own current device (CUDA's is per thread). Throws as
/// resolve_local_device does. The CUDA path is unverified on a GPU in this tree (it is
/// built and tested against a CPU-only LibTorch).
c10::Device bind_local_device(const std::string& device, const EnvMap& env);
/// `bind_local_device(device, process_environment())`.
c10::Device bind_local_device(const std::string& device = "auto");

}  // namespace lockstep
