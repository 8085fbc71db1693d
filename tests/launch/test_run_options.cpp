// lockstep-run's option parsing and per-worker environment: table-driven, no processes.
#include <gtest/gtest.h>

#include "lockstep/errors.h"
#include "options.h"

using lockstep::EnvMap;
using lockstep::run::needs_log_files;
using lockstep::run::parse_run_options;
using lockstep::run::parse_std_spec;
using lockstep::run::RoundLayout;
using lockstep::run::RunOptions;
using lockstep::run::stream_plan;
using lockstep::run::worker_env;

namespace {

std::vector<std::string> split(const std::string& line) {
  std::vector<std::string> out = {"lockstep-run"};
  std::string word;
  for (char c : line + " ") {
    if (c == ' ') {
      if (!word.empty()) out.push_back(word);
      word.clear();
    } else {
      word.push_back(c);
    }
  }
  return out;
}

struct Good {
  std::string args;
  EnvMap env;
  int nproc, nnodes, node_rank;
  std::string master_addr;
  int master_port, max_restarts;
  std::string program;
  size_t nargs;
};

TEST(RunOptions, ParsesTorchrunStyleCommandLines) {
  const Good table[] = {
      {"-- ./train", {}, 1, 1, 0, "127.0.0.1", 29500, 0, "./train", 0},
      {"--nproc-per-node 4 -- ./train --lr 0.1", {}, 4, 1, 0, "127.0.0.1", 29500, 0, "./train", 2},
      {"--nproc_per_node=2 --nnodes=2 --node_rank=1 --master_addr=10.0.0.1 --master_port=1234 "
       "./train x",
       {}, 2, 2, 1, "10.0.0.1", 1234, 0, "./train", 1},
      {"--nnodes 3:3 --node-rank 2 --master-addr h0 -- prog", {}, 1, 3, 2, "h0", 29500, 0, "prog", 0},
      {"--nproc-per-node auto -- prog", {}, 8, 1, 0, "127.0.0.1", 29500, 0, "prog", 0},
      {"--nproc-per-node cpu -- prog", {}, 8, 1, 0, "127.0.0.1", 29500, 0, "prog", 0},
      {"--standalone --nproc-per-node 2 -- prog", {}, 2, 1, 0, "127.0.0.1", 0, 0, "prog", 0},
      {"--master-port 0 --max-restarts 3 -- prog", {}, 1, 1, 0, "127.0.0.1", 0, 3, "prog", 0},
      // Kubeflow's training operator passes torchrun's flags as PET_* variables.
      {"-- prog",
       {{"PET_NPROC_PER_NODE", "4"}, {"PET_NNODES", "2"}, {"PET_NODE_RANK", "1"},
        {"PET_MASTER_ADDR", "job-master-0"}, {"PET_MASTER_PORT", "23456"}},
       4, 2, 1, "job-master-0", 23456, 0, "prog", 0},
      // torchrun's rendezvous flags: the endpoint is the master address and port.
      {"--rdzv-backend c10d --rdzv-endpoint node0:29400 --nnodes 2 --node-rank 1 -- prog", {},
       1, 2, 1, "node0", 29400, 0, "prog", 0},
      {"--rdzv_backend=static --rdzv_endpoint=10.1.2.3:1234 --master-addr ignored -- prog", {},
       1, 1, 0, "10.1.2.3", 1234, 0, "prog", 0},
      {"--rdzv-backend c10d --rdzv-endpoint h -- prog", {}, 1, 1, 0, "h", 29400, 0, "prog", 0},
      {"--rdzv-endpoint [fe80::1]:4000 -- prog", {}, 1, 1, 0, "fe80::1", 4000, 0, "prog", 0},
      {"--nproc_per_node 2 --no-python --no_python --role trainer -- prog", {}, 2, 1, 0,
       "127.0.0.1", 29500, 0, "prog", 0},
      // Kubeflow's elastic PyTorchJob sets the rendezvous as PET_* variables.
      {"-- prog",
       {{"PET_RDZV_BACKEND", "c10d"}, {"PET_RDZV_ENDPOINT", "job-worker-0:29400"},
        {"PET_NNODES", "2:2"}, {"PET_NODE_RANK", "1"}},
       1, 2, 1, "job-worker-0", 29400, 0, "prog", 0},
      // A flag beats its PET_* variable.
      {"--nproc-per-node 1 -- prog", {{"PET_NPROC_PER_NODE", "4"}}, 1, 1, 0, "127.0.0.1", 29500,
       0, "prog", 0},
  };
  for (const auto& row : table) {
    SCOPED_TRACE(row.args);
    auto r = parse_run_options(split(row.args), row.env, /*cpu_count=*/8);
    ASSERT_FALSE(r.help);
    const RunOptions& o = r.options;
    EXPECT_EQ(o.nproc_per_node, row.nproc);
    EXPECT_EQ(o.nnodes, row.nnodes);
    EXPECT_EQ(o.node_rank, row.node_rank);
    EXPECT_EQ(o.master_addr, row.master_addr);
    EXPECT_EQ(o.master_port, row.master_port);
    EXPECT_EQ(o.max_restarts, row.max_restarts);
    EXPECT_EQ(o.program, row.program);
    EXPECT_EQ(o.args.size(), row.nargs);
  }
}

TEST(RunOptions, ElasticNodeRanges) {
  auto o = parse_run_options(split("--nnodes 2:4 --node-rank 3 --rdzv-last-call 7 -- p"), {}, 8)
               .options;
  EXPECT_TRUE(o.elastic());
  EXPECT_EQ(o.nnodes_min, 2);
  EXPECT_EQ(o.nnodes, 4);
  EXPECT_EQ(o.rdzv_last_call, 7.0);
  auto fixed = parse_run_options(split("--nnodes 3:3 -- p"), {}, 8).options;
  EXPECT_FALSE(fixed.elastic());
  EXPECT_EQ(fixed.nnodes_min, 3);
  auto pet = parse_run_options(split("-- p"), {{"PET_NNODES", "1:2"}}, 8).options;
  EXPECT_TRUE(pet.elastic());
  EXPECT_EQ(pet.nnodes, 2);
}

TEST(RunOptions, GpuStartsOneWorkerPerVisibleGpu) {
  int counted = 0;
  const auto three = [&] { return ++counted, 3; };
  auto o = parse_run_options(split("--nproc-per-node gpu -- p"), {}, 8, three).options;
  EXPECT_EQ(o.nproc_per_node, 3);
  EXPECT_EQ(counted, 1);
  // PET_NPROC_PER_NODE=gpu (Kubeflow's nprocPerNode) reads the same.
  o = parse_run_options(split("-- p"), {{"PET_NPROC_PER_NODE", "gpu"}}, 8, three).options;
  EXPECT_EQ(o.nproc_per_node, 3);
  // The GPUs are counted only when asked for: counting starts the CUDA driver.
  counted = 0;
  for (const char* args : {"--nproc-per-node 2 -- p", "--nproc-per-node auto -- p", "-- p"}) {
    parse_run_options(split(args), {}, 8, three);
  }
  EXPECT_EQ(counted, 0);
}

TEST(RunOptions, GpuWithoutVisibleGpusIsAUsageError) {
  const std::string expected =
      "--nproc-per-node gpu: expected one worker per visible CUDA device, but no CUDA device is "
      "visible (this LibTorch is CPU-only, there is no GPU, or CUDA_VISIBLE_DEVICES is empty); "
      "give a number (--nproc-per-node 4), or auto/cpu for one worker per core";
  const std::function<int()> counts[] = {[] { return 0; }, {} /* not counted: none */};
  for (const auto& gpus : counts) {
    try {
      parse_run_options(split("--nproc-per-node gpu -- p"), {}, 8, gpus);
      ADD_FAILURE() << "accepted";
    } catch (const lockstep::InvalidArgument& e) {
      EXPECT_EQ(std::string(e.what()), expected);
    }
  }
}

TEST(RunOptions, ProgramArgumentsAreNotLauncherFlags) {
  auto r = parse_run_options(split("--nproc-per-node 2 ./train --nproc-per-node 7 --help"), {}, 8);
  EXPECT_EQ(r.options.nproc_per_node, 2);
  EXPECT_FALSE(r.help);
  EXPECT_EQ(r.options.args, (std::vector<std::string>{"--nproc-per-node", "7", "--help"}));
}

TEST(RunOptions, TimesAndFlags) {
  auto r = parse_run_options(split("--grace-period 0.5 --monitor-interval 0.05 --rdzv-timeout 3 "
                                   "--run-id job7 --log-dir /tmp/l --dry-run --quiet -- p"),
                             {}, 8);
  EXPECT_DOUBLE_EQ(r.options.grace_period, 0.5);
  EXPECT_DOUBLE_EQ(r.options.monitor_interval, 0.05);
  EXPECT_DOUBLE_EQ(r.options.rdzv_timeout, 3);
  EXPECT_EQ(r.options.run_id, "job7");
  EXPECT_EQ(r.options.log_dir, "/tmp/l");
  EXPECT_TRUE(r.options.dry_run);
  EXPECT_TRUE(r.options.quiet);
}

TEST(RunOptions, HelpExplainsEveryFlagWithItsDefault) {
  auto r = parse_run_options(split("--help"), {}, 8);
  ASSERT_TRUE(r.help);
  for (const char* flag : {"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr",
                           "--master-port", "--standalone", "--max-restarts", "--run-id",
                           "--log-dir", "--monitor-interval", "--grace-period", "--dry-run",
                           "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--redirects",
                           "--tee", "--role", "--no-python"}) {
    EXPECT_NE(r.help_text.find(flag), std::string::npos) << flag;
  }
  EXPECT_NE(r.help_text.find("(default: 29500)"), std::string::npos) << r.help_text;
}

TEST(RunOptions, HeartbeatTimeout) {
  EXPECT_EQ(parse_run_options(split("-- p"), {}, 8).options.heartbeat_timeout, 60.0);
  EXPECT_EQ(parse_run_options(split("--heartbeat-timeout 5 -- p"), {}, 8).options.heartbeat_timeout,
            5.0);
  EXPECT_EQ(parse_run_options(split("--heartbeat-timeout 0 -- p"), {}, 8).options.heartbeat_timeout,
            0.0);
  // The program's own flags are not the launcher's.
  auto r = parse_run_options(split("--heartbeat-timeout 9 p --heartbeat-timeout 1"), {}, 8);
  EXPECT_EQ(r.options.heartbeat_timeout, 9.0);
  EXPECT_EQ(r.options.args, (std::vector<std::string>{"--heartbeat-timeout", "1"}));
}

TEST(RunOptions, RendezvousIdRoleAndNoPython) {
  auto r = parse_run_options(split("--rdzv-id job42 --role trainer --no-python -- p"), {}, 8);
  EXPECT_EQ(r.options.run_id, "job42");
  EXPECT_EQ(r.options.role, "trainer");
  EXPECT_EQ(r.options.rdzv_backend, "static");
  EXPECT_EQ(parse_run_options(split("--rdzv_id=a --run-id a -- p"), {}, 8).options.run_id, "a");
  EXPECT_EQ(parse_run_options(split("-- p"), {{"PET_RDZV_ID", "k"}}, 8).options.run_id, "k");
  EXPECT_EQ(parse_run_options(split("-- p"), {}, 8).options.role, "default");
  EXPECT_EQ(parse_run_options(split("--rdzv-backend c10d -- p"), {}, 8).options.rdzv_backend,
            "c10d");
}

TEST(RunOptions, RedirectsAndTeeFollowTorchrun) {
  auto spec = parse_std_spec("redirects", "3");
  EXPECT_EQ(spec.of(0), 3);
  EXPECT_EQ(spec.of(7), 3);
  spec = parse_std_spec("redirects", "0:1,2:2");
  EXPECT_EQ(spec.of(0), 1);
  EXPECT_EQ(spec.of(1), 0);  // not named: none
  EXPECT_EQ(spec.of(2), 2);

  // Neither flag: the console, plus files when there is a log directory (lockstep's habit).
  auto o = parse_run_options(split("--nproc-per-node 2 -- p"), {}, 8).options;
  EXPECT_FALSE(needs_log_files(o));
  auto plan = stream_plan(o, 0);
  EXPECT_TRUE(plan.console[0] && plan.console[1] && !plan.file[0] && !plan.file[1]);
  o = parse_run_options(split("--log-dir /l -- p"), {}, 8).options;
  plan = stream_plan(o, 0);
  EXPECT_TRUE(plan.console[0] && plan.console[1] && plan.file[0] && plan.file[1]);

  // --redirects 3: both streams to files only, for every local rank.
  o = parse_run_options(split("--nproc-per-node 2 --redirects 3 -- p"), {}, 8).options;
  EXPECT_TRUE(needs_log_files(o));
  for (int i = 0; i < 2; ++i) {
    plan = stream_plan(o, i);
    EXPECT_TRUE(!plan.console[0] && !plan.console[1] && plan.file[0] && plan.file[1]) << i;
  }
  // -r 0:1,1:2 -t 1:1: rank 0's stdout to its file only; rank 1's stderr to its file only and
  // its stdout to both; the rest to the console only.
  o = parse_run_options(split("--nproc-per-node 2 -r 0:1,1:2 -t1:1 -- p"), {}, 8).options;
  plan = stream_plan(o, 0);
  EXPECT_TRUE(!plan.console[0] && plan.file[0] && plan.console[1] && !plan.file[1]);
  plan = stream_plan(o, 1);
  EXPECT_TRUE(plan.console[0] && plan.file[0] && !plan.console[1] && plan.file[1]);
  // --tee 2 with a log dir: stderr to both, stdout to the console only (torchrun's meaning
  // once either flag is given).
  o = parse_run_options(split("--log-dir /l --tee 2 -- p"), {}, 8).options;
  plan = stream_plan(o, 0);
  EXPECT_TRUE(plan.console[0] && !plan.file[0] && plan.console[1] && plan.file[1]);
  // PET_REDIRECTS counts as given.
  o = parse_run_options(split("-- p"), {{"PET_REDIRECTS", "1"}}, 8).options;
  plan = stream_plan(o, 0);
  EXPECT_TRUE(!plan.console[0] && plan.file[0] && plan.console[1] && !plan.file[1]);
  // Named local ranks past --nproc-per-node are ignored, as torchrun does.
  o = parse_run_options(split("--redirects 5:3 -- p"), {}, 8).options;
  EXPECT_FALSE(needs_log_files(o));
}

// LOCKSTEP_STDOUT_TTY: 1 only where a worker's stdout reaches the launcher's terminal.
TEST(RunOptions, StdoutTtyOnlyWhenTheConsoleIsATerminal) {
  auto o = parse_run_options(split("--nproc-per-node 2 -r 0:1 -- p"), {}, 8).options;
  const auto rank0 = stream_plan(o, 0), rank1 = stream_plan(o, 1);
  ASSERT_FALSE(rank0.console[0]);  // -r 0:1: rank 0's stdout goes to its file only
  ASSERT_TRUE(rank1.console[0]);
  EXPECT_EQ(lockstep::run::stdout_tty_env(rank1, /*launcher_stdout_is_tty=*/true), "1");
  EXPECT_EQ(lockstep::run::stdout_tty_env(rank1, /*launcher_stdout_is_tty=*/false), "0");
  EXPECT_EQ(lockstep::run::stdout_tty_env(rank0, /*launcher_stdout_is_tty=*/true), "0");
  EXPECT_EQ(lockstep::run::stdout_tty_env(rank0, /*launcher_stdout_is_tty=*/false), "0");
}

struct Bad {
  std::string args;
  std::string says;
};

TEST(RunOptions, RejectsBadInvocationsWithOneLine) {
  const Bad table[] = {
      {"", "no program"},
      {"--nproc-per-node 2", "no program"},
      {"--nproc-per-node 0 -- p", "--nproc-per-node: expected an integer in [1, 4096], but got '0'"},
      {"--nproc-per-node two -- p", "--nproc-per-node"},
      {"--nnodes 0 -- p", "--nnodes"},
      {"--standalone --nnodes 1:4 -- p", "--standalone runs a single node, but --nnodes is 1:4"},
      {"--nnodes 1:4 --rdzv-last-call x -- p", "--rdzv-last-call"},
      {"--heartbeat-timeout 0.1 -- p",
       "--heartbeat-timeout 0.1: expected 0 (off) or at least twice --monitor-interval (0.1 s)"},
      {"--heartbeat-timeout -1 -- p", "--heartbeat-timeout"},
      {"--nnodes 4:2 -- p", "--nnodes 4:2: expected MIN:MAX with MIN <= MAX"},
      {"--rdzv-backend etcd -- p", "--rdzv-backend: expected static or c10d"},
      {"--rdzv-endpoint h0 -- p", "the static backend needs a port (host:port)"},
      {"--rdzv-endpoint :29400 -- p", "(no host)"},
      {"--rdzv-endpoint h0:x -- p", "--rdzv-endpoint: expected an integer in [0, 65535]"},
      {"--rdzv-endpoint [::1 -- p", "--rdzv-endpoint: expected host:port or [address]:port"},
      {"--rdzv-endpoint [::1]x -- p", "expected ':' after ']'"},
      {"--nnodes 2 --node-rank 1 --rdzv-endpoint h:0 -- p", "only node 0 may pick a free port"},
      {"--rdzv-backend c10d --nnodes 2 --rdzv-endpoint h:1 -- p",
       "give every node its --node-rank"},
      {"--rdzv-id a --run-id b -- p", "name the same job id differently"},
      {"--redirects 4 -- p", "--redirects: expected 0 (none), 1 (stdout), 2 (stderr), 3 (both)"},
      {"--tee 0:1,x -- p", "--tee: expected 0 (none)"},
      {"--tee 0:1,0:2 -- p", "local rank 0 is given twice"},
      {"-r 1:9 -- p", "--redirects: expected 0 (none)"},
      {"--role= -- p", "--role: expected a non-empty role name"},
      {"--nnodes 2 --node-rank 2 -- p", "expected a node rank in [0, 1]"},
      {"--node-rank 1 -- p", "expected a node rank in [0, 0]"},
      {"--master-port 70000 -- p", "--master-port: expected an integer in [0, 65535], but got '70000'"},
      {"--master-port -1 -- p", "--master-port"},
      {"--master-port http -- p", "--master-port"},
      {"--nnodes 2 --node-rank 1 --master-port 0 -- p", "only node 0"},
      {"--standalone --nnodes 2 -- p", "--standalone"},
      {"--max-restarts -2 -- p", "--max-restarts"},
      {"--run-id a/b -- p", "--run-id"},
      {"--grace-period x -- p", "--grace-period"},
      {"--no-such-flag -- p", "no-such-flag"},
  };
  for (const auto& row : table) {
    SCOPED_TRACE(row.args);
    try {
      parse_run_options(split(row.args), {}, 8);
      ADD_FAILURE() << "accepted";
    } catch (const lockstep::InvalidArgument& e) {
      std::string what = e.what();
      EXPECT_NE(what.find(row.says), std::string::npos) << what;
      EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    }
  }
}

TEST(WorkerEnv, SetsTorchrunVariablesPerLocalRank) {
  auto o = parse_run_options(split("--nproc-per-node 3 --nnodes 2 --node-rank 1 --master-addr h0 "
                                   "--max-restarts 2 --run-id j -- p"),
                             {}, 12)
               .options;
  RoundLayout layout;
  layout.world_size = 5;  // node 0 runs 2 workers
  layout.rank_offset = 2;
  layout.master_addr = "h0";
  layout.master_port = 4242;
  layout.restart_count = 1;
  layout.group_rank = 1;
  layout.group_world_size = 2;
  auto env = worker_env(o, layout, /*local_rank=*/2, "/e/err.json", {}, /*cpu_count=*/12);
  const EnvMap expected = {
      {"RANK", "4"}, {"LOCAL_RANK", "2"}, {"WORLD_SIZE", "5"}, {"LOCAL_WORLD_SIZE", "3"},
      {"GROUP_RANK", "1"}, {"GROUP_WORLD_SIZE", "2"}, {"ROLE_NAME", "default"},
      {"ROLE_RANK", "4"},
      {"ROLE_WORLD_SIZE", "5"}, {"MASTER_ADDR", "h0"}, {"MASTER_PORT", "4242"},
      {"LOCKSTEP_AGENT_STORE", "1"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"},
      {"LOCKSTEP_RESTART_COUNT", "1"}, {"TORCHELASTIC_RESTART_COUNT", "1"},
      {"TORCHELASTIC_MAX_RESTARTS", "2"}, {"LOCKSTEP_JOB_ID", "j"},
      {"TORCHELASTIC_RUN_ID", "j"}, {"LOCKSTEP_ERROR_FILE", "/e/err.json"},
      {"OMP_NUM_THREADS", "4"}};
  EXPECT_EQ(env, expected);

  // The resolver every worker runs agrees with what the launcher meant.
  EnvMap full = env;
  auto launch = lockstep::resolve_launch_env(full);
  EXPECT_EQ(launch.rank, 4);
  EXPECT_EQ(launch.world_size, 5);
  EXPECT_EQ(launch.local_rank, 2);
  EXPECT_EQ(launch.node_rank, 1);
  EXPECT_TRUE(launch.launcher_hosts_store);
  EXPECT_EQ(launch.restart_count, 1);
  EXPECT_EQ(launch.job_id, "j");
  EXPECT_EQ(launch.launcher, "lockstep-run");
}

TEST(WorkerEnv, KeepsOmpNumThreadsWhenSetAndNeverGoesBelowOne) {
  auto o = parse_run_options(split("--nproc-per-node 4 -- p"), {}, 2).options;
  RoundLayout layout;
  layout.world_size = 4;
  layout.master_addr = "127.0.0.1";
  layout.master_port = 1;
  EXPECT_EQ(worker_env(o, layout, 0, "e", {}, 2).at("OMP_NUM_THREADS"), "1");
  EXPECT_EQ(worker_env(o, layout, 0, "e", {{"OMP_NUM_THREADS", "3"}}, 2).count("OMP_NUM_THREADS"),
            0u);
}

}  // namespace
