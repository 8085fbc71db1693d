// lockstep-bench's command line, table-driven: no processes, no sockets, nothing timed.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "lockstep/errors.h"
#include "options.h"
#include "scenarios.h"

namespace {

using lockstep::bench::BenchOptions;
using lockstep::bench::parse_bench_options;
using lockstep::bench::ParseResult;
using lockstep::bench::WorkerConfig;
using Mode = ParseResult::Mode;

std::vector<std::string> argv_of(const std::vector<std::string>& args) {
  std::vector<std::string> v = {"lockstep-bench"};
  v.insert(v.end(), args.begin(), args.end());
  return v;
}

ParseResult parse(const std::vector<std::string>& args) {
  return parse_bench_options(argv_of(args));
}

TEST(BenchOptions, DefaultsRunEveryModelButSmallMlpAndEveryFamily) {
  const auto r = parse({});
  ASSERT_EQ(r.mode, Mode::kRun);
  const BenchOptions& o = r.options;
  EXPECT_EQ(o.models, (std::vector<std::string>{"mlp", "deep_mlp", "cnn", "transformer"}));
  EXPECT_EQ(o.families, lockstep::bench::scenario_families());
  EXPECT_EQ(o.steps, 30);
  EXPECT_EQ(o.warmup, 5);
  EXPECT_EQ(o.repeats, 3);
  EXPECT_EQ(o.batch, 0);
  EXPECT_EQ(o.bucket_cap_mb, 25);
  EXPECT_EQ(o.bucket_caps, (std::vector<double>{1, 4, 25, 100}));
  EXPECT_EQ(o.bucket_sweep_model, "deep_mlp");
  EXPECT_EQ(o.sweep_min_bytes, 1024);
  EXPECT_EQ(o.sweep_max_bytes, 64 << 20);
  EXPECT_EQ(o.sweep_world, 2);
  EXPECT_EQ(o.transports, (std::vector<std::string>{"gloo", "shm"}));
  EXPECT_EQ(o.dp_replicas, 2);
  EXPECT_EQ(o.dp_omp_threads, 1);
  EXPECT_TRUE(o.dp_scope_blas);
  EXPECT_EQ(o.retries, 2);
  EXPECT_EQ(o.disturbance_cpus, 0.1);
  EXPECT_FALSE(o.keep_disturbed);
  EXPECT_EQ(o.worker_timeout_s, 300);
  EXPECT_EQ(o.python, "/usr/bin/python3");
  EXPECT_EQ(o.command, "lockstep-bench");
  EXPECT_EQ(o.device, "cpu");
  for (const char* f : {"floor", "overhead", "ddp", "dp", "allreduce", "torch_ddp"}) {
    EXPECT_NE(std::find(o.families.begin(), o.families.end(), f), o.families.end()) << f;
  }
}

TEST(BenchOptions, EveryFlagIsRead) {
  const auto r = parse({"--model",
                        "mlp,small_mlp",
                        "--scenario",
                        "floor,ddp",
                        "--steps",
                        "7",
                        "--warmup",
                        "0",
                        "--repeats",
                        "4",
                        "--batch",
                        "8",
                        "--bucket-cap-mb",
                        "2.5",
                        "--bucket-caps",
                        "1,0.5",
                        "--bucket-sweep-model",
                        "cnn",
                        "--sweep-min-bytes",
                        "4",
                        "--sweep-max-bytes",
                        "4096",
                        "--sweep-world",
                        "3",
                        "--transports",
                        "shm",
                        "--dp-replicas",
                        "4",
                        "--dp-omp-threads",
                        "2",
                        "--dp-scope-blas",
                        "0",
                        "--retries",
                        "0",
                        "--disturbance-cpus",
                        "0.25",
                        "--keep-disturbed",
                        "--malloc",
                        "fixed",
                        "--python",
                        "/opt/py",
                        "--script",
                        "s.py",
                        "--worker-timeout",
                        "9",
                        "--json",
                        "o.json",
                        "--markdown",
                        "o.md"});
  ASSERT_EQ(r.mode, Mode::kRun);
  const BenchOptions& o = r.options;
  EXPECT_EQ(o.models, (std::vector<std::string>{"mlp", "small_mlp"}));
  EXPECT_EQ(o.families, (std::vector<std::string>{"floor", "ddp"}));
  EXPECT_EQ(o.steps, 7);
  EXPECT_EQ(o.warmup, 0);
  EXPECT_EQ(o.repeats, 4);
  EXPECT_EQ(o.batch, 8);
  EXPECT_EQ(o.bucket_cap_mb, 2.5);
  EXPECT_EQ(o.bucket_caps, (std::vector<double>{1, 0.5}));
  EXPECT_EQ(o.bucket_sweep_model, "cnn");
  EXPECT_EQ(o.sweep_min_bytes, 4);
  EXPECT_EQ(o.sweep_max_bytes, 4096);
  EXPECT_EQ(o.sweep_world, 3);
  EXPECT_EQ(o.transports, (std::vector<std::string>{"shm"}));
  EXPECT_EQ(o.dp_replicas, 4);
  EXPECT_EQ(o.dp_omp_threads, 2);
  EXPECT_FALSE(o.dp_scope_blas);
  EXPECT_EQ(o.retries, 0);
  EXPECT_EQ(o.disturbance_cpus, 0.25);
  EXPECT_TRUE(o.keep_disturbed);
  EXPECT_EQ(o.malloc_mode, "fixed");
  EXPECT_EQ(o.python, "/opt/py");
  EXPECT_EQ(o.script, "s.py");
  EXPECT_EQ(o.worker_timeout_s, 9);
  EXPECT_EQ(o.json_path, "o.json");
  EXPECT_EQ(o.markdown_path, "o.md");
  EXPECT_EQ(o.command.rfind("lockstep-bench --model mlp,small_mlp --scenario floor,ddp", 0), 0u)
      << o.command;
}

TEST(BenchOptions, HelpPrintsTheOptionsAndRunsNothing) {
  for (const char* flag : {"--help", "-h"}) {
    // Even beside flags that would start a run.
    const auto r = parse({"--model", "mlp", flag});
    EXPECT_EQ(r.mode, Mode::kHelp) << flag;
    for (const char* text :
         {"--scenario", "--model", "--steps", "--disturbance-cpus", "--keep-disturbed",
          "--from-json", "--dp-replicas", "floor", "small_mlp", "--worker"}) {
      EXPECT_NE(r.help_text.find(text), std::string::npos) << text << " missing in\n"
                                                           << r.help_text;
    }
  }
}

TEST(BenchOptions, FromJsonRendersInsteadOfRunning) {
  const auto r = parse({"--from-json", "old.json", "--markdown", "old.md"});
  EXPECT_EQ(r.mode, Mode::kRender);
  EXPECT_EQ(r.options.from_json, "old.json");
  EXPECT_EQ(r.options.markdown_path, "old.md");
}

TEST(BenchOptions, WorkerArgumentsParseBackIntoTheSameConfig) {
  WorkerConfig c;
  c.kind = "dp";
  c.model = "small_mlp";
  c.batch = 12;
  c.steps = 3;
  c.warmup = 2;
  c.threads = 2;
  c.replicas = 3;
  c.scope_blas = false;
  c.bucket_cap_mb = 0.25;
  c.sweep_min_bytes = 8;
  c.sweep_max_bytes = 4096;
  c.comm_hook = "fp16";
  c.result = "r.json";
  c.device = "cpu";
  const auto r = parse(lockstep::bench::worker_arguments(c));
  ASSERT_EQ(r.mode, Mode::kWorker);
  const WorkerConfig& w = r.worker;
  EXPECT_EQ(w.kind, c.kind);
  EXPECT_EQ(w.model, c.model);
  EXPECT_EQ(w.batch, c.batch);
  EXPECT_EQ(w.steps, c.steps);
  EXPECT_EQ(w.warmup, c.warmup);
  EXPECT_EQ(w.threads, c.threads);
  EXPECT_EQ(w.replicas, c.replicas);
  EXPECT_EQ(w.scope_blas, c.scope_blas);
  EXPECT_EQ(w.bucket_cap_mb, c.bucket_cap_mb);
  EXPECT_EQ(w.sweep_min_bytes, c.sweep_min_bytes);
  EXPECT_EQ(w.sweep_max_bytes, c.sweep_max_bytes);
  EXPECT_EQ(w.comm_hook, "fp16");
  EXPECT_EQ(w.device, "cpu");
  EXPECT_EQ(w.result, c.result);
  // A CUDA worker's device travels too (the kinds that run there).
  c.kind = "ddp";
  c.device = "cuda";
  EXPECT_EQ(parse(lockstep::bench::worker_arguments(c)).worker.device, "cuda");
}

// Note [lockstep-bench on CUDA]: --device picks the device, the GPU models and the families
// that run there; parsing needs no GPU.
TEST(BenchOptions, DeviceCudaDefaultsToTheGpuModelsAndFamilies) {
  EXPECT_EQ(parse({"--device", "cpu"}).options.device, "cpu");
  EXPECT_EQ(parse({"--device", "cpu"}).options.models,
            (std::vector<std::string>{"mlp", "deep_mlp", "cnn", "transformer"}));
  {
    const auto r = parse({"--device", "cuda"});
    ASSERT_EQ(r.mode, Mode::kRun);
    EXPECT_EQ(r.options.device, "cuda");
    EXPECT_EQ(r.options.models, (std::vector<std::string>{"wide", "deep"}));
    EXPECT_EQ(r.options.families, (std::vector<std::string>{"plain", "ddp", "torch_ddp"}));
    EXPECT_EQ(r.options.families, lockstep::bench::cuda_scenario_families());
    EXPECT_EQ(r.options.gpus, 0) << "main() counts the GPUs, not the parser";
  }
  {
    const auto r = parse({"--device", "cuda", "--model", "mlp,wide", "--scenario", "ddp"});
    EXPECT_EQ(r.options.models, (std::vector<std::string>{"mlp", "wide"}));
    EXPECT_EQ(r.options.families, (std::vector<std::string>{"ddp"}));
  }
  EXPECT_EQ(parse({"--device", "cuda", "--scenario", "all"}).options.families,
            lockstep::bench::cuda_scenario_families());
  // wide and deep run on the CPU too when named, with their own batches.
  EXPECT_EQ(parse({"--model", "wide,deep"}).options.models,
            (std::vector<std::string>{"wide", "deep"}));
  const auto w = parse({"--worker", "ddp", "--model", "deep", "--device", "cuda", "--result", "r"});
  ASSERT_EQ(w.mode, Mode::kWorker);
  EXPECT_EQ(w.worker.device, "cuda");
  EXPECT_EQ(w.worker.batch, 256);
  EXPECT_EQ(parse({"--worker", "plain", "--model", "wide", "--result", "r"}).worker.batch, 512);
  EXPECT_EQ(parse({"--worker", "plain", "--model", "wide", "--result", "r"}).worker.device, "cpu");
}

TEST(BenchOptions, CudaUnavailableMessageSaysWhatToDo) {
  const std::string m = lockstep::bench::cuda_unavailable_message(nullptr);
  for (const char* part : {"--device cuda: expected a CUDA device",
                           "torch::cuda::is_available() is false",
                           "this LibTorch is CPU-only, or no GPU is visible",
                           "Run on a GPU machine", "drop --device cuda", "Nothing was started"}) {
    EXPECT_NE(m.find(part), std::string::npos) << part << "\n" << m;
  }
  EXPECT_EQ(m.find("CUDA_VISIBLE_DEVICES"), std::string::npos) << m;
  const std::string hidden = lockstep::bench::cuda_unavailable_message("");
  EXPECT_NE(hidden.find("(CUDA_VISIBLE_DEVICES='')"), std::string::npos) << hidden;
}

TEST(BenchOptions, ClusterShapeLinksAndTheirDefaults) {
  {
    const auto r = parse({"--cluster", "2x2"});
    ASSERT_EQ(r.mode, Mode::kRun);
    const auto& o = r.options;
    EXPECT_EQ(o.cluster_nodes, 2);
    EXPECT_EQ(o.cluster_ranks_per_node, 2);
    ASSERT_EQ(o.links.size(), 2u);
    EXPECT_EQ(o.links[0].text, "1gbit:0.2ms");
    EXPECT_DOUBLE_EQ(o.links[0].rate_bits, 1e9);
    EXPECT_DOUBLE_EQ(o.links[0].delay_ms, 0.2);
    EXPECT_DOUBLE_EQ(o.links[1].rate_bits, 1e10);
    // A cluster run trains the MLP and the deep MLP unless --model says otherwise.
    EXPECT_EQ(o.models, (std::vector<std::string>{"mlp", "deep_mlp"}));
    EXPECT_EQ(o.cluster_scenarios, lockstep::bench::cluster_scenario_names());
    const auto& v = o.cluster_scenarios;
    ASSERT_GE(v.size(), 4u);
    EXPECT_EQ(std::vector<std::string>(v.begin(), v.begin() + 4),
              (std::vector<std::string>{"gloo", "hier", "torch_ddp", "fp16"}));
  }
  {
    const auto r = parse({"--cluster", "4x1", "--link", "500mbit:50us,100kbit", "--model",
                          "small_mlp", "--cluster-scenarios", "hier,gloo"});
    const auto& o = r.options;
    EXPECT_EQ(o.cluster_nodes, 4);
    EXPECT_EQ(o.cluster_ranks_per_node, 1);
    ASSERT_EQ(o.links.size(), 2u);
    EXPECT_DOUBLE_EQ(o.links[0].rate_bits, 5e8);
    EXPECT_DOUBLE_EQ(o.links[0].delay_ms, 0.05);
    EXPECT_DOUBLE_EQ(o.links[1].rate_bits, 1e5);
    EXPECT_DOUBLE_EQ(o.links[1].delay_ms, 0.0);
    EXPECT_EQ(o.models, (std::vector<std::string>{"small_mlp"}));
    EXPECT_EQ(o.cluster_scenarios, (std::vector<std::string>{"hier", "gloo"}));
  }
  // Without --cluster, --link is parsed by nobody and nothing emulated runs.
  EXPECT_EQ(parse({"--link", "1gbit"}).options.cluster_nodes, 0);
}

TEST(BenchOptions, WorkerBatchZeroIsTheModelsDefault) {
  const auto r = parse({"--worker", "floor", "--model", "transformer", "--result", "r.json"});
  ASSERT_EQ(r.mode, Mode::kWorker);
  EXPECT_EQ(r.worker.batch, 16);
  EXPECT_EQ(r.worker.kind, "floor");
}

struct BadCase {
  std::vector<std::string> args;
  std::string message;  // a substring of the error
};

TEST(BenchOptions, RejectsBadValuesNamingFlagValueAndWhatIsAllowed) {
  const std::vector<BadCase> cases = {
      {{"--steps", "0"}, "--steps: expected an integer in [1, 1000000], but got '0'"},
      {{"--steps", "3x"}, "--steps: expected an integer in [1, 1000000], but got '3x'"},
      {{"--warmup", "-1"}, "--warmup: expected an integer in [0, 1000000], but got '-1'"},
      {{"--repeats", "0"}, "--repeats: expected an integer in [1, 10000], but got '0'"},
      {{"--batch", "-2"}, "--batch: expected an integer >= 0, but got '-2'"},
      {{"--model", "resnet"},
       "--model: unknown 'resnet'; expected a comma list of mlp, deep_mlp, cnn, transformer, "
       "small_mlp, wide, deep or all"},
      {{"--device", "tpu"}, "--device: expected cpu or cuda, but got 'tpu'"},
      {{"--device", "CUDA"}, "--device: expected cpu or cuda, but got 'CUDA'"},
      {{"--device", ""}, "--device: expected cpu or cuda, but got ''"},
      {{"--device", "cuda", "--scenario", "plain,dp"},
       "--scenario: 'dp' does not run with --device cuda; expected a comma list of plain, ddp, "
       "torch_ddp or all"},
      {{"--device", "cuda", "--scenario", "allreduce"}, "'allreduce' does not run with --device"},
      {{"--device", "cuda", "--cluster", "2x2"},
       "--cluster: the emulated cluster runs CPU ranks only, but got --device cuda"},
      {{"--worker", "dp", "--model", "mlp", "--device", "cuda", "--result", "r"},
       "--device cuda: worker kind 'dp' runs on the CPU only; expected one of plain, floor, ddp, "
       "perparam"},
      {{"--worker", "ddp", "--model", "mlp", "--device", "gpu", "--result", "r"},
       "--device: expected cpu or cuda, but got 'gpu'"},
      {{"--model", ","}, "--model: expected a comma list of mlp, deep_mlp"},
      {{"--scenario", "plain,nope"}, "--scenario: unknown 'nope'; expected a comma list of plain"},
      {{"--bucket-cap-mb", "0"}, "--bucket-cap-mb: expected a number > 0, but got '0'"},
      {{"--bucket-caps", "1,x"}, "--bucket-caps: expected a number > 0, but got 'x'"},
      {{"--bucket-caps", ","}, "--bucket-caps: expected a comma list of caps in MB"},
      {{"--bucket-sweep-model", "vgg"}, "--bucket-sweep-model: unknown 'vgg'; expected one of mlp"},
      {{"--sweep-min-bytes", "2"}, "--sweep-min-bytes: expected an integer >= 4, but got '2'"},
      {{"--sweep-min-bytes", "4096", "--sweep-max-bytes", "1024"},
       "--sweep-max-bytes: expected at least --sweep-min-bytes (4096), but got 1024"},
      {{"--sweep-world", "1"}, "--sweep-world: expected an integer in [2, 64], but got '1'"},
      {{"--transports", ","}, "--transports: expected a comma list such as gloo,shm"},
      {{"--dp-replicas", "0"}, "--dp-replicas: expected an integer in [1, 256], but got '0'"},
      {{"--dp-omp-threads", "0"}, "--dp-omp-threads: expected an integer in [1, 1024]"},
      {{"--dp-scope-blas", "maybe"},
       "--dp-scope-blas: expected 1 or 0 (true or false), but got 'maybe'"},
      {{"--retries", "-1"}, "--retries: expected an integer in [0, 100], but got '-1'"},
      {{"--malloc", "tcmalloc"}, "--malloc: expected default or fixed, but got 'tcmalloc'"},
      {{"--disturbance-cpus", "0"}, "--disturbance-cpus: expected a number > 0, but got '0'"},
      {{"--worker-timeout", "0"}, "--worker-timeout: expected an integer in [1, 86400]"},
      {{"--no-such-flag"}, "(see lockstep-bench --help)"},
      {{"stray"}, "unexpected argument 'stray': every option is a --flag"},
      {{"--worker", "bogus", "--result", "r"},
       "--worker: unknown kind 'bogus'; expected one of plain, floor, ddp, perparam, overhead, "
       "dp, allreduce"},
      {{"--worker", "ddp", "--model", "mlp"}, "--worker needs --result FILE"},
      {{"--worker", "ddp", "--model", "all", "--result", "r"},
       "--model: a worker runs one model, one of mlp, deep_mlp, cnn, transformer, small_mlp, wide, "
       "deep, but got 'all'"},
      {{"--cluster", "1x2"}, "--cluster: expected NODESxRANKS with 2 to 4 nodes and 1 to 16 "
                             "ranks per node (such as 2x2), but got '1x2'"},
      {{"--cluster", "5x1"}, "but got '5x1'"},
      {{"--cluster", "2x0"}, "but got '2x0'"},
      {{"--cluster", "2x2x"}, "but got '2x2x'"},
      {{"--cluster", "2x2", "--link", "1gbps"},
       "--link: expected RATE[:DELAY] such as 1gbit:0.2ms or 10gbit (RATE in kbit, mbit or gbit; "
       "DELAY in ms or us), but got '1gbps': unknown rate unit 'gbps'"},
      {{"--cluster", "2x2", "--link", "1gbit:2"}, "but got '1gbit:2': unknown delay unit ''"},
      {{"--cluster", "2x2", "--link", "gbit"}, "but got 'gbit': no rate"},
      {{"--cluster", "2x2", "--link", "1gbit:"}, "but got '1gbit:': no delay"},
      {{"--cluster", "2x2", "--link", "1kbit"}, "the rate must be within 100kbit..100gbit"},
      {{"--cluster", "2x2", "--link", "1gbit:2000ms"}, "the delay must be at most 1000ms"},
      {{"--cluster", "2x2", "--link", ","}, "--link: expected a comma list such as 1gbit:0.2ms"},
      {{"--cluster", "2x2", "--cluster-scenarios", "gloo,nccl"},
       "--cluster-scenarios: unknown 'nccl'; expected a comma list of gloo, hier, torch_ddp, fp16"},
      {{"--worker", "dp", "--model", "mlp", "--result", "r", "--scope-blas", "2"},
       "--scope-blas: expected 1 or 0 (true or false), but got '2'"},
  };
  for (const auto& c : cases) {
    std::string joined;
    for (const auto& a : c.args) joined += a + " ";
    try {
      parse(c.args);
      ADD_FAILURE() << joined << ": no error";
    } catch (const lockstep::InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(c.message), std::string::npos)
          << joined << "\n  got:      " << e.what() << "\n  expected: " << c.message;
    }
  }
}

}  // namespace
