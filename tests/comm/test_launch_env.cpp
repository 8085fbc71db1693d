// The launch-environment resolver, table-driven: every launcher, every bad value, every partial
// set of launch variables (each message checked) and the explicit single-process opt-in.
#include <gtest/gtest.h>

#include "lockstep/errors.h"
#include "lockstep/launch_env.h"

#include <torch/cuda.h>

using lockstep::EnvMap;
using lockstep::LaunchEnv;
using lockstep::resolve_launch_env;

namespace {

struct Good {
  const char* name;
  EnvMap env;
  int rank, world, local_rank, local_world, node_rank;
  const char* master;
  int port;
  const char* launcher;
};

class ResolveGood : public ::testing::TestWithParam<Good> {};

TEST_P(ResolveGood, Resolves) {
  const Good& c = GetParam();
  LaunchEnv e = resolve_launch_env(c.env);
  EXPECT_EQ(e.rank, c.rank);
  EXPECT_EQ(e.world_size, c.world);
  EXPECT_EQ(e.local_rank, c.local_rank);
  EXPECT_EQ(e.local_world_size, c.local_world);
  EXPECT_EQ(e.node_rank, c.node_rank);
  EXPECT_EQ(e.master_addr, c.master);
  EXPECT_EQ(e.master_port, c.port);
  EXPECT_EQ(e.launcher, c.launcher);
  EXPECT_FALSE(e.describe().empty());
}

INSTANTIATE_TEST_SUITE_P(
    Launchers, ResolveGood,
    ::testing::Values(
        Good{"standalone", {{"LOCKSTEP_STANDALONE", "1"}}, 0, 1, 0, 1, 0, "127.0.0.1", 29500,
             "none"},
        Good{"world_of_one_needs_no_master", {{"RANK", "0"}, {"WORLD_SIZE", "1"}}, 0, 1, 0, 1, 0,
             "127.0.0.1", 29500, "torchrun-style"},
        Good{"torchrun",
             {{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"},
              {"GROUP_RANK", "1"}, {"MASTER_ADDR", "10.1.2.3"}, {"MASTER_PORT", "1234"},
              {"TORCHELASTIC_RUN_ID", "abc"}},
             3, 4, 1, 2, 1, "10.1.2.3", 1234, "torchrun"},
        Good{"kubeflow_plain",
             {{"RANK", "1"}, {"WORLD_SIZE", "3"}, {"MASTER_ADDR", "job-master-0"},
              {"MASTER_PORT", "23456"}, {"KUBERNETES_SERVICE_HOST", "10.0.0.1"}},
             1, 3, 0, 1, 1, "job-master-0", 23456, "kubeflow"},
        Good{"pet",
             {{"PET_NODE_RANK", "2"}, {"PET_NNODES", "3"}, {"PET_NPROC_PER_NODE", "1"},
              {"PET_MASTER_ADDR", "m0"}, {"PET_MASTER_PORT", "29400"}},
             2, 3, 0, 1, 2, "m0", 29400, "kubeflow-pet"},
        Good{"slurm",
             {{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"},
              {"SLURM_NODEID", "2"}, {"SLURM_TASKS_PER_NODE", "2(x4)"},
              {"SLURM_JOB_NODELIST", "gpu[003-006,009],cpu1"}, {"SLURM_JOB_ID", "123456"}},
             5, 8, 1, 2, 2, "gpu003", 20000 + 123456 % 20000, "slurm"},
        Good{"slurm_explicit_master",
             {{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "0"},
              {"SLURM_NODEID", "0"}, {"SLURM_NTASKS_PER_NODE", "2"}, {"MASTER_ADDR", "head"},
              {"MASTER_PORT", "4000"}, {"SLURM_JOB_NODELIST", "n1"}},
             0, 2, 0, 2, 0, "head", 4000, "slurm"},
        Good{"openmpi",
             {{"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_COMM_WORLD_SIZE", "4"},
              {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
              {"MASTER_ADDR", "h0"}, {"MASTER_PORT", "29400"}},
             3, 4, 1, 2, 1, "h0", 29400, "openmpi"},
        Good{"pmi",
             {{"PMI_RANK", "1"}, {"PMI_SIZE", "2"}, {"MPI_LOCALRANKID", "1"},
              {"MPI_LOCALNRANKS", "2"}, {"MASTER_ADDR", "h0"}, {"MASTER_PORT", "7000"}},
             1, 2, 1, 2, 0, "h0", 7000, "pmi"},
        Good{"torchrun_beats_slurm",
             {{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "a"}, {"MASTER_PORT", "29500"},
              {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "9"}},
             1, 2, 0, 1, 1, "a", 29500, "torchrun-style"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(LaunchEnv, AgentStoreAndScope) {
  auto e = resolve_launch_env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "x"},
                               {"MASTER_PORT", "29500"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                               {"TORCHELASTIC_RUN_ID", "run7"},
                               {"TORCHELASTIC_RESTART_COUNT", "2"}});
  EXPECT_TRUE(e.launcher_hosts_store);
  EXPECT_EQ(e.job_id, "run7");
  EXPECT_EQ(e.restart_count, 2);
  EXPECT_EQ(e.sources.at("rank"), "RANK");
  auto l = resolve_launch_env({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"LOCKSTEP_JOB_ID", "j"},
                               {"TORCHELASTIC_RUN_ID", "r"}});
  EXPECT_EQ(l.job_id, "j");
  EXPECT_FALSE(l.launcher_hosts_store);
}

TEST(LaunchEnv, OverridesWin) {
  lockstep::LaunchOverrides o;
  o.rank = 1;
  o.world_size = 2;
  o.master_addr = "override";
  o.master_port = 999;
  auto e = resolve_launch_env({{"RANK", "0"}, {"WORLD_SIZE", "5"}, {"MASTER_ADDR", "env"}}, o);
  EXPECT_EQ(e.rank, 1);
  EXPECT_EQ(e.world_size, 2);
  EXPECT_EQ(e.master_addr, "override");
  EXPECT_EQ(e.master_port, 999);
  EXPECT_EQ(e.sources.at("rank"), "argument");
}

// Who rendezvouses in-process: a job of one with no master given, and no launcher's store.
TEST(LaunchEnv, SingleProcess) {
  EXPECT_TRUE(resolve_launch_env({{"LOCKSTEP_STANDALONE", "1"}}).single_process);
  EXPECT_TRUE(resolve_launch_env({{"LOCKSTEP_STANDALONE", "true"}}).single_process);
  EXPECT_TRUE(resolve_launch_env({{"RANK", "0"}, {"WORLD_SIZE", "1"}}).single_process);
  EXPECT_FALSE(resolve_launch_env({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"MASTER_PORT", "5"}})
                   .single_process);
  EXPECT_FALSE(resolve_launch_env({{"RANK", "0"}, {"WORLD_SIZE", "1"},
                                   {"TORCHELASTIC_USE_AGENT_STORE", "True"}})
                   .single_process);
  EXPECT_FALSE(resolve_launch_env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "a"},
                                   {"MASTER_PORT", "5"}})
                   .single_process);
  EXPECT_EQ(resolve_launch_env({{"LOCKSTEP_STANDALONE", "1"}}).sources.at("world_size"),
            "LOCKSTEP_STANDALONE");
}

// Explicit rank and world size say the topology without any launcher.
TEST(LaunchEnv, ArgumentsWithoutALauncher) {
  lockstep::LaunchOverrides one;
  one.rank = 0;
  one.world_size = 1;
  auto e = resolve_launch_env({}, one);
  EXPECT_EQ(e.world_size, 1);
  EXPECT_TRUE(e.single_process);
  lockstep::LaunchOverrides two;
  two.rank = 1;
  two.world_size = 2;
  auto t = resolve_launch_env({}, two);
  EXPECT_EQ(t.rank, 1);
  EXPECT_FALSE(t.single_process);
  lockstep::LaunchOverrides tcp = one;
  tcp.master_addr = "127.0.0.1";
  tcp.master_port = 4000;
  EXPECT_FALSE(resolve_launch_env({}, tcp).single_process) << "tcp:// asks for a TCP store";
  for (bool give_rank : {true, false}) {
    lockstep::LaunchOverrides half;
    if (give_rank) half.rank = 0;
    else half.world_size = 1;
    try {
      resolve_launch_env({}, half);
      ADD_FAILURE() << "expected InvalidArgument";
    } catch (const lockstep::InvalidArgument& ex) {
      std::string what = ex.what();
      EXPECT_NE(what.find(give_rank ? "only the rank was given" : "only the world size was given"),
                std::string::npos)
          << what;
      EXPECT_NE(what.find("ProcessGroupOptions().rank(0).world_size(1)"), std::string::npos);
    }
  }
}

struct Bad {
  const char* name;
  EnvMap env;
  std::vector<std::string> needles;  // each must appear in the message
};

class ResolveBad : public ::testing::TestWithParam<Bad> {};

TEST_P(ResolveBad, RaisesNamingTheVariable) {
  const Bad& c = GetParam();
  try {
    resolve_launch_env(c.env);
    FAIL() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    std::string what = e.what();
    for (const auto& needle : c.needles) {
      EXPECT_NE(what.find(needle), std::string::npos) << "'" << needle << "' not in: " << what;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    BadValues, ResolveBad,
    ::testing::Values(
        Bad{"non_numeric_rank", {{"RANK", "one"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "a"}},
            {"RANK", "'one'", "[0,"}},
        Bad{"negative_rank", {{"RANK", "-1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "a"}},
            {"RANK", "'-1'"}},
        Bad{"rank_too_big", {{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "a"}},
            {"rank in [0, 1]", "got 2", "RANK", "WORLD_SIZE"}},
        Bad{"zero_world", {{"RANK", "0"}, {"WORLD_SIZE", "0"}}, {"WORLD_SIZE", "'0'"}},
        Bad{"missing_world", {{"RANK", "0"}},
            {"Expected WORLD_SIZE to be set because RANK is set", "missing", "lockstep-run"}},
        Bad{"missing_master", {{"RANK", "0"}, {"WORLD_SIZE", "2"}},
            {"world size 2", "MASTER_ADDR and MASTER_PORT are not set", "rank from RANK"}},
        Bad{"missing_master_port", {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "a"}},
            {"MASTER_PORT is not set", "`MASTER_ADDR=host0 MASTER_PORT=29500`", "lockstep-run"}},
        Bad{"missing_master_addr", {{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "7"}},
            {"MASTER_ADDR is not set"}},
        Bad{"no_launch_variables", {},
            {"Expected a launch environment", "none is set",
             "`lockstep-run --standalone --nproc-per-node N -- <program> [args]`", "torchrun",
             "LOCKSTEP_STANDALONE=1"}},
        Bad{"standalone_off", {{"LOCKSTEP_STANDALONE", "0"}}, {"none is set"}},
        Bad{"standalone_bad_value", {{"LOCKSTEP_STANDALONE", "maybe"}},
            {"Expected LOCKSTEP_STANDALONE to be 1 or 0", "'maybe'"}},
        Bad{"standalone_beside_a_launcher",
            {{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"LOCKSTEP_STANDALONE", "1"}},
            {"LOCKSTEP_STANDALONE=1 asks for a single process", "torchrun-style",
             "rank from RANK", "Unset LOCKSTEP_STANDALONE"}},
        Bad{"world_size_without_rank", {{"WORLD_SIZE", "2"}},
            {"Expected RANK to be set because WORLD_SIZE is set", "RANK is missing",
             "unset WORLD_SIZE", "LOCKSTEP_STANDALONE=1"}},
        Bad{"world_size_without_rank_even_when_standalone",
            {{"WORLD_SIZE", "2"}, {"LOCKSTEP_STANDALONE", "1"}},
            {"because WORLD_SIZE is set", "RANK is missing"}},
        Bad{"local_rank_without_rank", {{"LOCAL_RANK", "0"}, {"MASTER_ADDR", "a"}},
            {"because LOCAL_RANK is set", "RANK is missing", "unset LOCAL_RANK"}},
        Bad{"local_world_size_without_rank", {{"LOCAL_WORLD_SIZE", "2"}},
            {"because LOCAL_WORLD_SIZE is set", "RANK is missing"}},
        Bad{"group_rank_without_rank", {{"GROUP_RANK", "1"}},
            {"because GROUP_RANK is set", "RANK is missing"}},
        Bad{"port_too_big",
            {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "a"}, {"MASTER_PORT", "70000"}},
            {"MASTER_PORT", "'70000'", "65535"}},
        Bad{"port_zero",
            {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "a"}, {"MASTER_PORT", "0"}},
            {"MASTER_PORT", "'0'"}},
        Bad{"port_text",
            {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "a"}, {"MASTER_PORT", "http"}},
            {"MASTER_PORT", "'http'"}},
        Bad{"local_rank_too_big",
            {{"RANK", "0"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "2"}, {"LOCAL_WORLD_SIZE", "2"},
             {"MASTER_ADDR", "a"}},
            {"local rank in [0, 1]", "LOCAL_RANK"}},
        Bad{"slurm_bad_ntasks", {{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "x"}},
            {"SLURM_NTASKS", "'x'"}},
        Bad{"slurm_rank_too_big",
            {{"SLURM_PROCID", "4"}, {"SLURM_NTASKS", "4"}, {"SLURM_JOB_NODELIST", "n1"}},
            {"SLURM_PROCID", "SLURM_NTASKS"}},
        Bad{"ompi_no_master", {{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "2"}},
            {"MASTER_ADDR and MASTER_PORT are not set", "openmpi", "rank from OMPI_COMM_WORLD_RANK",
             "`mpirun -x MASTER_ADDR=host0 -x MASTER_PORT=29500 ...`"}},
        Bad{"ompi_no_port",
            {{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}},
            {"MASTER_PORT is not set", "openmpi"}},
        Bad{"pmi_bad_size", {{"PMI_RANK", "0"}, {"PMI_SIZE", "-3"}}, {"PMI_SIZE", "'-3'"}},
        Bad{"pet_many_procs",
            {{"PET_NODE_RANK", "0"}, {"PET_NNODES", "2"}, {"PET_NPROC_PER_NODE", "4"}},
            {"PET_NPROC_PER_NODE", "4", "torchrun"}}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace

// The process that prints and writes files: global rank 0 under any launcher, or a process
// that no launcher started.
TEST(LaunchEnv, IsMainProcess) {
  const EnvMap torchrun = {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"},
                           {"MASTER_PORT", "5"}};
  EnvMap torchrun1 = torchrun;
  torchrun1["RANK"] = "1";
  EXPECT_TRUE(lockstep::is_main_process(torchrun));
  EXPECT_FALSE(lockstep::is_main_process(torchrun1));
  // Local rank 0 of node 1 is not the main process: the global rank decides.
  EnvMap node1 = torchrun1;
  node1["LOCAL_RANK"] = "0";
  node1["GROUP_RANK"] = "1";
  EXPECT_FALSE(lockstep::is_main_process(node1));
  EXPECT_FALSE(lockstep::is_main_process({{"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "4"},
                                          {"MASTER_ADDR", "h"}, {"MASTER_PORT", "5"}}));
  EXPECT_TRUE(lockstep::is_main_process({{"OMPI_COMM_WORLD_RANK", "0"},
                                         {"OMPI_COMM_WORLD_SIZE", "4"},
                                         {"MASTER_ADDR", "h"}, {"MASTER_PORT", "5"}}));
  // Not launched: the only process, with or without LOCKSTEP_STANDALONE.
  EXPECT_TRUE(lockstep::is_main_process(EnvMap{}));
  EXPECT_TRUE(lockstep::is_main_process({{"LOCKSTEP_STANDALONE", "1"}}));
  EXPECT_TRUE(lockstep::is_main_process({{"HOME", "/root"}, {"MASTER_PORT", "5"}}));
  // A launcher's variables that do not add up are the resolver's error, not "main".
  try {
    lockstep::is_main_process({{"RANK", "5"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"},
                               {"MASTER_PORT", "5"}});
    FAIL() << "expected InvalidArgument for rank >= world size";
  } catch (const lockstep::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("RANK"), std::string::npos) << e.what();
  }
  EXPECT_THROW(lockstep::is_main_process({{"WORLD_SIZE", "2"}}), lockstep::InvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// The local device (Note [Local device]): decided from the GPU count alone, so every CUDA case
// is checked here without a GPU.

namespace {

using lockstep::resolve_local_device;

// torchrun's variables for local rank `local` of `local_world` workers on one node.
EnvMap torchrun_env(int local, int local_world) {
  return {{"RANK", std::to_string(local)},         {"WORLD_SIZE", std::to_string(local_world)},
          {"LOCAL_RANK", std::to_string(local)},   {"LOCAL_WORLD_SIZE", std::to_string(local_world)},
          {"MASTER_ADDR", "127.0.0.1"},            {"MASTER_PORT", "29500"}};
}

std::string device_error(const std::string& device, const EnvMap& env, int gpus) {
  try {
    auto d = resolve_local_device(device, env, gpus);
    ADD_FAILURE() << "'" << device << "' with " << gpus << " GPU(s) resolved to " << d;
  } catch (const lockstep::InvalidArgument& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(LocalDevice, Resolves) {
  const c10::Device cpu(c10::DeviceType::CPU);
  auto cuda = [](int i) { return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(i)); };
  struct Row {
    std::string device;
    EnvMap env;
    int gpus;
    c10::Device expected;
  };
  const Row table[] = {
      {"cpu", {}, 0, cpu},
      {"cpu", torchrun_env(1, 2), 2, cpu},
      {"auto", {}, 0, cpu},                       // a CPU-only LibTorch or no GPU
      {"auto", torchrun_env(3, 4), 0, cpu},
      {"auto", {}, 1, cuda(0)},                   // started by hand: local rank 0
      {"auto", torchrun_env(1, 2), 2, cuda(1)},
      {"cuda", torchrun_env(3, 4), 4, cuda(3)},
      {"cuda", {{"LOCKSTEP_STANDALONE", "1"}}, 2, cuda(0)},
      {"cuda", {{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"},
                {"SLURM_NTASKS_PER_NODE", "4"}, {"MASTER_ADDR", "n0"}, {"MASTER_PORT", "1"}},
       2, cuda(1)},
      {"cuda:1", torchrun_env(0, 2), 2, cuda(1)},  // named: whatever the local rank
      {"cuda:0", torchrun_env(3, 4), 1, cuda(0)},
  };
  for (const auto& row : table) {
    SCOPED_TRACE(row.device + " with " + std::to_string(row.gpus) + " GPU(s)");
    EXPECT_EQ(resolve_local_device(row.device, row.env, row.gpus), row.expected);
  }
}

TEST(LocalDevice, CudaWithoutAVisibleDeviceSaysWhyAndWhatToDo) {
  EXPECT_EQ(device_error("cuda", torchrun_env(0, 1), 0),
            "Expected a CUDA device for device 'cuda', but no CUDA device is visible: this "
            "LibTorch is CPU-only, or there is no GPU, or CUDA_VISIBLE_DEVICES hides them. Use "
            "device 'cpu', or 'auto' (CUDA when a device is visible, else the CPU).");
  // The variable's value is named when it is set.
  EXPECT_NE(device_error("cuda:0", {{"CUDA_VISIBLE_DEVICES", ""}}, 0)
                .find("or CUDA_VISIBLE_DEVICES='' hides them"),
            std::string::npos);
}

TEST(LocalDevice, LocalRankWithoutAGpuNamesBothNumbers) {
  for (const char* device : {"cuda", "auto"}) {
    SCOPED_TRACE(device);
    EXPECT_EQ(device_error(device, torchrun_env(2, 4), 2),
              std::string("Expected one CUDA device per local rank for device '") + device +
                  "', but local rank 2 (from LOCAL_RANK, 4 worker(s) on this node) has none: 2 "
                  "CUDA device(s) are visible. Start one worker per GPU (`lockstep-run "
                  "--nproc-per-node gpu`), make more devices visible (CUDA_VISIBLE_DEVICES), or "
                  "name a shared device ('cuda:0').");
  }
  EXPECT_EQ(device_error("cuda:2", {}, 2),
            "Expected a CUDA device index below the 2 visible CUDA device(s), but got 'cuda:2'. "
            "Name a visible device, or use 'cuda' for cuda:LOCAL_RANK.");
}

TEST(LocalDevice, RejectsOtherStrings) {
  for (const char* device : {"", "gpu", "CUDA", "Cpu", " cpu", "cpu:0", "cuda:", "cuda:x",
                             "cuda:-1", "cuda:1x", "cuda:99999", "cuda:0:1", "mps", "xla"}) {
    SCOPED_TRACE(device);
    EXPECT_EQ(device_error(device, {}, 2),
              std::string("Expected a device 'auto', 'cpu', 'cuda' or 'cuda:N' (N a device "
                          "index), but got '") + device + "'.");
  }
}

TEST(LocalDevice, PartialLaunchVariablesAreTheResolversError) {
  const std::string what = device_error("cuda", {{"WORLD_SIZE", "2"}}, 2);
  EXPECT_NE(what.find("Expected RANK to be set because WORLD_SIZE is set"), std::string::npos)
      << what;
}

TEST(LocalDevice, BindOnThisMachine) {
  // bind_local_device counts the real devices. "cpu" never touches CUDA; "auto" is the CPU
  // exactly when no CUDA device is visible (always so with the CPU-only LibTorch of CI).
  EXPECT_EQ(lockstep::bind_local_device("cpu", {}), c10::Device(c10::DeviceType::CPU));
  const bool has_gpu = torch::cuda::is_available();
  EXPECT_EQ(lockstep::bind_local_device("auto", {}),
            has_gpu ? c10::Device(c10::DeviceType::CUDA, 0) : c10::Device(c10::DeviceType::CPU));
  if (has_gpu) return;  // unverified on a GPU: there "cuda" binds cuda:0
  try {
    lockstep::bind_local_device("cuda", {});
    FAIL() << "'cuda' resolved without a visible CUDA device";
  } catch (const lockstep::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("no CUDA device is visible: this LibTorch is CPU-only"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(lockstep::bind_local_device("tpu", {}), lockstep::InvalidArgument);
}
