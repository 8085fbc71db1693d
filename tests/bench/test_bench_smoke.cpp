// lockstep-bench: its units without processes (the models, the scenario catalogue, the
// targets, the report rendered from JSON alone, the verdict on disturbed runs), then the
// program end to end on a tiny configuration: it must spawn its workers, write JSON whose
// numbers are sane (positive, ordered percentiles, peak RSS, a ratio where a reference ran, the
// synchronized floor and DDP's ratio to it, a sweep covering the requested sizes) and a
// markdown report. Nothing here is timed.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <regex>
#include <thread>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>

#include <torch/cuda.h>

#include "cluster.h"
#include "coordinator.h"
#include "lockstep/errors.h"
#include "models.h"
#include "options.h"
#include "report.h"
#include "scenarios.h"

using json = nlohmann::json;
namespace bench = lockstep::bench;

namespace {

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// ---------------------------------------------------------------------------------------------
// Units, no processes

TEST(BenchModels, EveryNamedModelBuildsAndRunsItsBatch) {
  const std::map<std::string, int64_t> params = {
      {"mlp", 1863690}, {"small_mlp", 118282}, {"wide", 58639336}, {"deep", 51405800}};
  for (const auto& name : bench::all_model_names()) {
    SCOPED_TRACE(name);
    bench::BenchNet net(name);
    auto batch = bench::make_batch(name, 3);
    auto out = net->forward(batch.input);
    ASSERT_EQ(out.dim(), 2);
    EXPECT_EQ(out.size(0), 3);
    EXPECT_GT(out.size(1), batch.target.max().item<int64_t>());
    if (params.count(name)) {
      EXPECT_EQ(bench::parameter_count(*net), params.at(name));
    }
  }
  try {
    bench::BenchNet net("resnet");
    ADD_FAILURE() << "no error for an unknown model";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(
                  "unknown model 'resnet': expected mlp, deep_mlp, cnn, transformer, small_mlp, "
                  "wide or deep"),
              std::string::npos)
        << e.what();
  }
}

bench::BenchOptions options_with(std::vector<std::string> families) {
  bench::BenchOptions o;
  o.families = std::move(families);
  return o;
}

const bench::Scenario* find(const std::vector<bench::Scenario>& v, const std::string& id) {
  for (const auto& s : v) {
    if (s.id == id) return &s;
  }
  return nullptr;
}

TEST(BenchScenarios, EveryModelGetsTheSynchronizedFloorBesideDdp) {
  for (const auto& model : bench::all_model_names()) {
    SCOPED_TRACE(model);
    for (const auto& family : {"floor", "ddp", "torch_ddp", "perparam"}) {
      const auto v = bench::scenarios_for(options_with({family}), model);
      const auto* f = find(v, "floor_w2");
      ASSERT_NE(f, nullptr) << family;
      EXPECT_EQ(f->kind, "floor");
      EXPECT_EQ(f->world, 2);
      EXPECT_EQ(f->model, model);
      EXPECT_EQ(f->batch, bench::default_batch(model));
      EXPECT_TRUE(f->transport.empty()) << "the floor synchronises over the default transport";
    }
  }
  // Alone, the floor brings nothing else; DDP brings plain and the floor with it, and its
  // reference to PyTorch's DDP is cleared when that does not run.
  const auto floor_only = bench::scenarios_for(options_with({"floor"}), "mlp");
  ASSERT_EQ(floor_only.size(), 1u);
  const auto ddp = bench::scenarios_for(options_with({"ddp"}), "mlp");
  std::vector<std::string> ids;
  for (const auto& s : ddp) ids.push_back(s.id);
  EXPECT_EQ(ids,
            (std::vector<std::string>{"plain", "floor_w2", "ddp_w1", "ddp_w2", "ddp_w2_gloo"}));
  EXPECT_EQ(find(ddp, "ddp_w1")->reference, "plain");
  EXPECT_EQ(find(ddp, "ddp_w2")->reference, "");
  const auto with_torch = bench::scenarios_for(options_with({"ddp", "torch_ddp"}), "mlp");
  EXPECT_EQ(find(with_torch, "ddp_w2")->reference, "torch_ddp_w2");
  EXPECT_TRUE(find(with_torch, "torch_ddp_view_w2")->grad_view);
}

TEST(BenchScenarios, DataParallelGetsTheThreadsAUserWouldGiveIt) {
  auto o = options_with({"dp"});
  const auto v = bench::scenarios_for(o, "cnn");
  ASSERT_EQ(v.size(), 3u);
  const auto* ref = find(v, "plain_2t");
  const auto* one = find(v, "dp_r1");
  const auto* two = find(v, "dp_r2");
  ASSERT_TRUE(ref && one && two);
  EXPECT_EQ(ref->threads, 2);
  EXPECT_EQ(ref->omp_threads, 0);  // OMP_NUM_THREADS = its 2 threads
  EXPECT_EQ(ref->batch, 128);
  EXPECT_EQ(two->replicas, 2);
  EXPECT_EQ(two->threads, 1);
  EXPECT_EQ(two->omp_threads, 1);
  EXPECT_EQ(two->batch, 128);
  EXPECT_EQ(two->reference, "plain_2t");
  EXPECT_EQ(one->threads, 2);
  EXPECT_EQ(one->reference, "plain_2t");
  o.dp_replicas = 3;
  o.dp_omp_threads = 2;
  o.dp_scope_blas = false;
  o.batch = 10;
  const auto three = bench::scenarios_for(o, "cnn");
  ASSERT_NE(find(three, "plain_3t"), nullptr);
  const auto* r3 = find(three, "dp_r3");
  ASSERT_NE(r3, nullptr);
  EXPECT_EQ(r3->omp_threads, 2);
  EXPECT_FALSE(r3->scope_blas);
  EXPECT_EQ(r3->batch, 30);
}

TEST(BenchScenarios, SweepsAndBucketCapsFollowTheirOptions) {
  auto o = options_with({"allreduce", "bucket_sweep"});
  o.transports = {"gloo", "shm"};
  o.sweep_world = 3;
  const auto sweeps = bench::sweep_scenarios(o);
  ASSERT_EQ(sweeps.size(), 2u);
  EXPECT_EQ(sweeps[1].transport, "shm");
  EXPECT_EQ(sweeps[1].world, 3);
  EXPECT_TRUE(bench::scenarios_for(o, "mlp").empty());
  const auto caps = bench::scenarios_for(o, "deep_mlp");
  ASSERT_EQ(caps.size(), 4u);
  EXPECT_EQ(caps[0].id, "ddp_w2_cap1");
  EXPECT_EQ(caps[0].bucket_cap_mb, 1);
  EXPECT_TRUE(bench::sweep_scenarios(options_with({"ddp"})).empty());
}

json scenario(const std::string& id, const std::string& kind, double median_ms, int world = 2) {
  return {{"id", id},
          {"kind", kind},
          {"label", id + " label"},
          {"status", "ok"},
          {"world", world},
          {"median_ms", median_ms},
          {"p10_ms", median_ms},
          {"p90_ms", median_ms},
          {"samples_per_s", 1000.0},
          {"peak_rss_mib", 100.0},
          {"reference", nullptr},
          {"backend", "shm"}};
}

json synthetic_doc(bool with_floor, bool with_alternating = false) {
  json m = {{"model", "mlp"}, {"params", 1863690}, {"batch", 64}, {"scenarios", json::array()}};
  m["scenarios"].push_back(scenario("plain", "plain", 10.0, 1));
  if (with_floor) m["scenarios"].push_back(scenario("floor_w2", "floor", 12.5));
  json d2 = scenario("ddp_w2", "ddp", 15.0);
  d2["reference"] = "torch_ddp_w2";
  d2["ratio"] = 0.75;
  if (with_floor) d2["vs_floor"] = 1.2;
  m["scenarios"].push_back(d2);
  json td = scenario("torch_ddp_w2", "torch_ddp", 20.0);
  if (with_floor) td["vs_floor"] = 1.6;
  m["scenarios"].push_back(td);
  json alt = scenario("ddp_w1_alt", "overhead", 10.2, 1);
  alt["plain_median_ms"] = 10.0;
  m["scenarios"].push_back(alt);
  if (with_alternating) {
    json alt2 = scenario("ddp_w2_alt", "overhead", 13.0);
    alt2["plain_median_ms"] = 12.5;
    alt2["repeat_medians_ms"] = {13.0, 14.0, 12.0};
    alt2["plain_repeat_medians_ms"] = {12.5, 12.5, 12.5};
    alt2["vs_floor"] = 1.04;
    m["scenarios"].push_back(alt2);
  }
  json doc = {{"command", "lockstep-bench --model mlp"},
              {"environment",
               {{"nproc", 2},
                {"uname", "Linux"},
                {"libtorch", "1.13.0"},
                {"date", "today"},
                {"loadavg_start", "0 0 0"},
                {"loadavg_end", "0 0 0"}}},
              {"config", {{"repeats", 1}, {"steps", 3}, {"warmup", 1}, {"bucket_cap_mb", 25.0}}},
              {"models", json::array({m})},
              {"allreduce", json::array()}};
  doc["targets"] = bench::compute_targets(doc["models"]);
  return doc;
}

const json* find_target(const json& targets, const std::string& what) {
  for (const auto& t : targets) {
    if (t["target"] == what) return &t;
  }
  return nullptr;
}

TEST(BenchTargets, DdpAgainstTheFloorAndWorldOneInOneProcess) {
  const json doc = synthetic_doc(/*with_floor=*/true);
  const json* floor =
      find_target(doc["targets"], "lockstep DDP / synchronized floor step time (2 ranks)");
  ASSERT_NE(floor, nullptr) << doc["targets"].dump(2);
  EXPECT_DOUBLE_EQ((*floor)["value"].get<double>(), 1.2);
  EXPECT_EQ((*floor)["goal"], "<= 1.10");
  EXPECT_FALSE((*floor)["goal_met"].get<bool>());
  const json* peer =
      find_target(doc["targets"], "PyTorch DDP / synchronized floor step time (2 ranks)");
  ASSERT_NE(peer, nullptr);
  EXPECT_DOUBLE_EQ((*peer)["value"].get<double>(), 1.6);
  const json* alt = find_target(
      doc["targets"], "lockstep DDP world 1 overhead over plain, alternating steps in one process");
  ASSERT_NE(alt, nullptr);
  EXPECT_NEAR((*alt)["value"].get<double>(), 0.02, 1e-12);
  EXPECT_TRUE((*alt)["met"].get<bool>());
  EXPECT_EQ(find_target(synthetic_doc(false)["targets"],
                        "lockstep DDP / synchronized floor step time (2 ranks)"),
            nullptr);
  // Note [Alternating steps] at world 2: DDP against the floor steps it alternated with.
  const std::string alternating =
      "lockstep DDP / synchronized floor, alternating steps in the same processes (2 ranks)";
  EXPECT_EQ(find_target(doc["targets"], alternating), nullptr);
  const json with_alt = synthetic_doc(true, true);
  const json* alt2 = find_target(with_alt["targets"], alternating);
  ASSERT_NE(alt2, nullptr);
  EXPECT_DOUBLE_EQ((*alt2)["value"].get<double>(), 13.0 / 12.5);
  EXPECT_EQ((*alt2)["goal"], "<= 1.10");
  EXPECT_TRUE((*alt2)["goal_met"].get<bool>());
}

// The model's row of the markdown headline, spaces removed ("" when there is none).
std::string headline_row(const std::string& md, const std::string& model) {
  const size_t row = md.find("| " + model + " ", md.find("**Headline**"));
  if (row == std::string::npos) return "";
  std::string line = md.substr(row, md.find('\n', row) - row);
  line.erase(std::remove(line.begin(), line.end(), ' '), line.end());
  return line;
}

TEST(BenchReport, HeadlineShowsDdpOverTheFloorBesidePyTorchDdp) {
  const std::string md = bench::render_report(synthetic_doc(/*with_floor=*/true), true);
  EXPECT_NE(md.find("**Headline**"), std::string::npos) << md;
  EXPECT_NE(md.find("| model | synchronized floor ms | lockstep DDP ms | DDP / floor | "
                    "PyTorch DDP ms | DDP / PyTorch DDP |"),
            std::string::npos)
      << md;
  // The headline's row: floor, DDP, DDP / floor, PyTorch DDP, DDP / PyTorch DDP.
  EXPECT_EQ(headline_row(md, "mlp"), "|mlp|12.50|15.00|1.20x|20.00|0.75x|") << md;
  EXPECT_NE(md.find("| vs floor |"), std::string::npos) << md;
  EXPECT_NE(md.find("1.60x"), std::string::npos) << md;
  // A result without the floor (an older run) renders as it did: no headline column for the
  // floor, no "vs floor" column.
  const std::string old = bench::render_report(synthetic_doc(/*with_floor=*/false), true);
  EXPECT_EQ(old.find("vs floor"), std::string::npos) << old;
  EXPECT_NE(old.find("| model | synchronized floor ms |"), std::string::npos)
      << "the headline still shows DDP beside PyTorch's\n"
      << old;
  const std::string terminal = bench::render_report(synthetic_doc(true), false);
  EXPECT_NE(terminal.find("== headline"), std::string::npos) << terminal;
  // With the alternating scenario: one more column, its ratio and its repeats' range
  // (13/12.5, 14/12.5, 12/12.5).
  const std::string alt = bench::render_report(synthetic_doc(true, true), true);
  EXPECT_EQ(headline_row(alt, "mlp"), "|mlp|12.50|15.00|1.20x|20.00|0.75x|1.04x(0.96-1.12x)|")
      << alt;
  EXPECT_NE(alt.find("DDP / floor, alternating steps (repeats)"), std::string::npos) << alt;
  EXPECT_EQ(md.find("alternating steps (repeats)"), std::string::npos)
      << "no column where the scenario did not run\n" << md;
  // `--scenario overhead` alone: no ddp_w2, but the alternating ratio still heads the report.
  json only_alt = synthetic_doc(true, true);
  auto& scenarios = only_alt["models"][0]["scenarios"];
  for (auto it = scenarios.begin(); it != scenarios.end();) {
    it = (*it)["id"] == "ddp_w2" ? scenarios.erase(it) : std::next(it);
  }
  const std::string alone = bench::render_report(only_alt, true);
  EXPECT_EQ(headline_row(alone, "mlp"), "|mlp|12.50|||20.00||1.04x(0.96-1.12x)|") << alone;
}

TEST(BenchReport, DisturbedScenariosSayWhy) {
  json doc = synthetic_doc(true);
  json& s = doc["models"][0]["scenarios"][1];
  s["reruns"] = 2;
  s["disturbed_runs"] = 1;
  s["disturbed_runs_kept"] = false;
  s["others_cpus"] = {0.5, 0.25, 0.75};
  const std::string md = bench::render_report(doc, true);
  EXPECT_NE(md.find("- floor_w2 label: 2 reruns, 1 disturbed run left out (other processes used "
                    "up to 0.75 cores)"),
            std::string::npos)
      << md;
}

TEST(BenchCoordinator, RerunsDisturbedRunsThenLeavesThemOut) {
  using V = bench::RunVerdict;
  struct Case {
    double others;
    int attempt, retries;
    bool keep;
    V expected;
  };
  const std::vector<Case> cases = {
      {0.0, 0, 2, false, V::kAccept},    {0.1, 0, 2, false, V::kAccept},
      {0.11, 0, 2, false, V::kRerun},    {0.11, 1, 2, false, V::kRerun},
      {0.11, 2, 2, false, V::kLeaveOut}, {0.11, 2, 2, true, V::kKeepDisturbed},
      {0.5, 0, 0, false, V::kLeaveOut},  {0.5, 0, 0, true, V::kKeepDisturbed},
      {0.05, 2, 2, false, V::kAccept},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(bench::judge_run(c.others, 0.1, c.attempt, c.retries, c.keep), c.expected)
        << "others " << c.others << " attempt " << c.attempt << " retries " << c.retries;
  }
  EXPECT_DOUBLE_EQ(bench::others_cpus(/*busy=*/3.0, /*ranks=*/2.0, /*wall=*/2.0), 0.5);
  EXPECT_DOUBLE_EQ(bench::others_cpus(1.0, 2.0, 2.0), 0.0);  // never negative
  // Too short to tell from /proc/stat's 10 ms ticks: not judged, so counted.
  EXPECT_TRUE(std::isnan(bench::others_cpus(1.0, 0.0, 0.0)));
  EXPECT_TRUE(std::isnan(bench::others_cpus(1.0, 0.0, bench::kMinJudgedSeconds / 2)));
  EXPECT_EQ(bench::judge_run(std::nan(""), 0.1, 0, 0, false), V::kAccept);
}

TEST(BenchScenarios, ClusterScenariosRunOnEveryNodeAgainstFlatGloo) {
  bench::BenchOptions o;
  o.cluster_nodes = 2;
  o.cluster_ranks_per_node = 2;
  o.cluster_scenarios = {"gloo", "hier", "torch_ddp", "fp16"};
  const auto sc = bench::cluster_scenarios_for(o, "deep_mlp");
  ASSERT_EQ(sc.size(), 4u);
  std::map<std::string, bench::Scenario> by_id;
  for (const auto& s : sc) {
    by_id[s.id] = s;
    EXPECT_EQ(s.nodes, 2);
    EXPECT_EQ(s.world, 4);
    EXPECT_EQ(s.model, "deep_mlp");
    EXPECT_EQ(s.batch, 64);
    EXPECT_EQ(s.reference, s.id == "gloo" ? "" : "gloo") << s.id;
  }
  EXPECT_EQ(by_id["gloo"].transport, "gloo");
  EXPECT_EQ(by_id["hier"].transport, "shm");  // hierarchical once the nodes are hosts
  EXPECT_EQ(by_id["torch_ddp"].kind, "torch_ddp");
  EXPECT_EQ(by_id["fp16"].comm_hook, "fp16");
  EXPECT_EQ(by_id["fp16"].transport, "gloo");
  // Without gloo there is nothing to compare against.
  o.cluster_scenarios = {"hier", "fp16"};
  for (const auto& s : bench::cluster_scenarios_for(o, "mlp")) EXPECT_EQ(s.reference, "");
}

TEST(BenchTargets, ClusterGoalIsHierarchicalAtMostSevenTenthsOfFlatGloo) {
  auto scenario = [](const char* id, double ms) {
    return json{{"id", id}, {"status", "ok"}, {"median_ms", ms}};
  };
  json models = json::array({json{
      {"model", "mlp"},
      {"scenarios",
       json::array({scenario("gloo", 100), scenario("hier", 60), scenario("fp16", 80)})}}});
  const json t = bench::compute_cluster_targets(models, "1gbit:0.2ms");
  ASSERT_EQ(t.size(), 2u) << t.dump();
  EXPECT_EQ(t[0]["target"], "lockstep hierarchical / flat Gloo step time, 1gbit:0.2ms");
  EXPECT_DOUBLE_EQ(t[0]["value"].get<double>(), 0.6);
  EXPECT_EQ(t[0]["goal"], "<= 0.70");
  EXPECT_TRUE(t[0]["goal_met"].get<bool>());
  EXPECT_DOUBLE_EQ(t[1]["value"].get<double>(), 0.8);
  models[0]["scenarios"][1]["median_ms"] = 75.0;
  EXPECT_FALSE(bench::compute_cluster_targets(models, "x")[0]["goal_met"].get<bool>());
}

// ---------------------------------------------------------------------------------------------
// --device cuda (Note [lockstep-bench on CUDA]): what can be checked without a GPU

// Issue 18's GPU models: the sizes of its table, and the same shapes in the Python peer.
TEST(BenchModels, GpuModelsMatchIssue18AndThePythonPeer) {
  std::map<std::string, std::pair<int64_t, size_t>> cpp;
  for (const char* name : {"wide", "deep"}) {
    bench::BenchNet net(name);
    cpp[name] = {bench::parameter_count(*net), net->parameters().size()};
    EXPECT_EQ(bench::default_batch(name), std::string(name) == "wide" ? 512 : 256);
  }
  EXPECT_EQ(cpp["deep"].second, 98u);  // 48 x Linear(1024,1024) + head, weight and bias
  EXPECT_EQ(cpp["wide"].second, 10u);  // Linear 1024-4096, 3 x 4096-4096, 4096-1000
  if (access("/usr/bin/python3", X_OK) != 0 ||
      std::system("/usr/bin/python3 -c 'import torch' > /dev/null 2>&1") != 0) {
    GTEST_SKIP() << "no /usr/bin/python3 with torch (python3-torch): the peer is not compared";
  }
  char tmpl[] = "/tmp/lockstep-bench-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string out = std::string(tmpl) + "/shapes.json";
  const std::string script = LOCKSTEP_BENCH_PY_SCRIPT;
  const std::string dir = script.substr(0, script.find_last_of('/'));
  const std::string cmd =
      "/usr/bin/python3 -c 'import sys, json; sys.path.insert(0, \"" + dir +
      "\"); import torch_ddp_bench as b; "
      "ps = {n: list(b.make_model(n).parameters()) for n in (\"wide\", \"deep\")}; "
      "print(json.dumps({n: [sum(p.numel() for p in v), len(v), "
      "list(b.make_batch(n, 2)[0].shape)] for n, v in ps.items()}))' > " +
      out;
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  const json py = json::parse(slurp(out));
  for (const char* name : {"wide", "deep"}) {
    SCOPED_TRACE(name);
    EXPECT_EQ(py[name][0].get<int64_t>(), cpp[name].first);
    EXPECT_EQ(py[name][1].get<size_t>(), cpp[name].second);
    EXPECT_EQ(py[name][2], json::array({2, 1024}));
    EXPECT_EQ(bench::make_batch(name, 2).input.sizes().vec(), (std::vector<int64_t>{2, 1024}));
  }
}

bench::BenchOptions cuda_options(int gpus, std::vector<std::string> families = {}) {
  bench::BenchOptions o;
  o.device = "cuda";
  o.gpus = gpus;
  o.families = families.empty() ? bench::cuda_scenario_families() : std::move(families);
  return o;
}

TEST(BenchScenarios, CudaPlanIsIssue18sComparisonWithNcclWorldTwoSkippedOnOneGpu) {
  const auto v = bench::scenarios_for(cuda_options(/*gpus=*/1), "wide");
  std::vector<std::string> ids;
  for (const auto& s : v) ids.push_back(s.id);
  EXPECT_EQ(ids, (std::vector<std::string>{"plain", "ddp_w1", "ddp_w1_nccl", "torch_ddp_w1",
                                           "torch_ddp_nccl_w1", "ddp_w2", "ddp_w2_gloo",
                                           "ddp_w2_nccl", "torch_ddp_w2", "torch_ddp_nccl_w2"}));
  struct Row {
    const char* id;
    const char* kind;
    int world;
    const char* transport;      // LOCKSTEP_TRANSPORT (lockstep) or "" (default)
    const char* torch_backend;  // torch_ddp only
    const char* reference;
    bool skipped;
  };
  const std::vector<Row> rows = {
      {"plain", "plain", 1, "", "", "", false},
      {"ddp_w1", "ddp", 1, "", "", "plain", false},
      {"ddp_w1_nccl", "ddp", 1, "nccl", "", "plain", false},
      {"torch_ddp_w1", "torch_ddp", 1, "", "gloo", "plain", false},
      {"torch_ddp_nccl_w1", "torch_ddp", 1, "", "nccl", "plain", false},
      {"ddp_w2", "ddp", 2, "", "", "torch_ddp_w2", false},
      {"ddp_w2_gloo", "ddp", 2, "gloo", "", "torch_ddp_w2", false},
      {"ddp_w2_nccl", "ddp", 2, "nccl", "", "", true},  // its NCCL peer is skipped too
      {"torch_ddp_w2", "torch_ddp", 2, "", "gloo", "", false},
      {"torch_ddp_nccl_w2", "torch_ddp", 2, "", "nccl", "", true},
  };
  for (const auto& r : rows) {
    SCOPED_TRACE(r.id);
    const auto* s = find(v, r.id);
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->kind, r.kind);
    EXPECT_EQ(s->world, r.world);
    EXPECT_EQ(s->transport, r.transport);
    if (s->kind == "torch_ddp") {
      EXPECT_EQ(s->torch_backend, r.torch_backend);
    }
    EXPECT_EQ(s->reference, r.reference);
    EXPECT_EQ(s->model, "wide");
    EXPECT_EQ(s->batch, 512);
    EXPECT_EQ(s->bucket_cap_mb, 25);
    if (r.skipped) {
      EXPECT_EQ(s->skip,
                "NCCL refuses two ranks on one GPU (\"Duplicate GPU detected\"); needs 2 visible "
                "GPUs, found 1");
    } else {
      EXPECT_EQ(s->skip, "");
    }
  }
  // Two GPUs: the NCCL world-2 rows run, one rank per GPU, lockstep's against PyTorch's.
  const auto two = bench::scenarios_for(cuda_options(2), "deep");
  ASSERT_EQ(two.size(), 10u);
  for (const auto& s : two) {
    EXPECT_EQ(s.skip, "") << s.id;
    EXPECT_EQ(s.batch, 256) << s.id;
  }
  EXPECT_EQ(find(two, "ddp_w2_nccl")->reference, "torch_ddp_nccl_w2");
  // Families select rows as on the CPU; plain comes with either DDP family.
  const auto ddp_only = bench::scenarios_for(cuda_options(1, {"ddp"}), "deep");
  ids.clear();
  for (const auto& s : ddp_only) ids.push_back(s.id);
  EXPECT_EQ(ids, (std::vector<std::string>{"plain", "ddp_w1", "ddp_w1_nccl", "ddp_w2",
                                           "ddp_w2_gloo", "ddp_w2_nccl"}));
  EXPECT_EQ(find(ddp_only, "ddp_w2")->reference, "") << "PyTorch's DDP does not run";
  EXPECT_EQ(bench::scenarios_for(cuda_options(1, {"plain"}), "wide").size(), 1u);
  auto batch = cuda_options(0);
  batch.batch = 8;
  batch.bucket_cap_mb = 4;
  for (const auto& s : bench::scenarios_for(batch, "wide")) {
    EXPECT_EQ(s.batch, 8) << s.id;
    EXPECT_EQ(s.bucket_cap_mb, 4) << s.id;
  }
  // The CPU plan of the same families is unchanged by the GPU models.
  EXPECT_EQ(bench::scenarios_for(options_with({"ddp"}), "wide").size(), 5u);
}

// A --device cuda document as run_benchmark writes it, made up (nothing measured).
json synthetic_cuda_doc() {
  json m = {{"model", "deep"}, {"params", 51405800}, {"batch", 256}, {"scenarios", json::array()}};
  m["scenarios"].push_back(scenario("plain", "plain", 8.0, 1));
  m["scenarios"].push_back(scenario("ddp_w1", "ddp", 8.4, 1));
  json nccl = {{"id", "ddp_w1_nccl"},
               {"kind", "ddp"},
               {"label", "lockstep DDP, world 1, LOCKSTEP_TRANSPORT=nccl"},
               {"status", "failed"},
               {"world", 1},
               {"reference", "plain"},
               {"note", "1 of 1 runs failed: rank 0 exited with code 1: lockstep-bench: [rank 0/1] "
                        "LOCKSTEP_TRANSPORT=nccl: this lockstep has no NCCL backend"}};
  m["scenarios"].push_back(nccl);
  m["scenarios"].push_back(scenario("torch_ddp_nccl_w1", "torch_ddp", 10.0, 1));
  m["scenarios"].push_back(scenario("ddp_w2", "ddp", 90.0));
  m["scenarios"].push_back(scenario("ddp_w2_gloo", "ddp", 100.0));
  m["scenarios"].push_back(scenario("torch_ddp_w2", "torch_ddp", 110.0));
  json skipped = {{"id", "torch_ddp_nccl_w2"},
                  {"kind", "torch_ddp"},
                  {"label", "PyTorch DDP, world 2, NCCL"},
                  {"status", "skipped"},
                  {"world", 2},
                  {"reference", nullptr},
                  {"note", "NCCL refuses two ranks on one GPU"}};
  m["scenarios"].push_back(skipped);
  json doc = synthetic_doc(false);
  doc["config"]["device"] = "cuda";
  doc["environment"]["gpus"] = 1;
  doc["models"] = json::array({m});
  doc["targets"] = bench::compute_cuda_targets(doc["models"]);
  return doc;
}

TEST(BenchTargets, CudaGoalsAreIssue18s) {
  const json t = synthetic_cuda_doc()["targets"];
  struct Want {
    const char* target;
    double value;
    const char* goal;
    bool met;
  };
  const std::vector<Want> wants = {
      {"lockstep DDP (default transport) / PyTorch DDP (Gloo) step time, 2 ranks, CUDA",
       90.0 / 110.0, "<= 0.90", true},
      {"lockstep DDP (Gloo) / PyTorch DDP (Gloo) step time, 2 ranks, CUDA", 100.0 / 110.0,
       "<= 0.90", false},
      {"lockstep DDP default transport / lockstep DDP Gloo step time, 2 ranks, CUDA", 0.9,
       "<= 1.00", true},
      {"lockstep DDP world 1 overhead over plain, CUDA", 0.05, "<= 3%", false},
      {"lockstep DDP world 1 / PyTorch DDP world 1 (NCCL) step time, CUDA", 0.84, "", true},
  };
  ASSERT_EQ(t.size(), wants.size()) << t.dump(2);
  for (const auto& w : wants) {
    SCOPED_TRACE(w.target);
    const json* g = find_target(t, w.target);
    ASSERT_NE(g, nullptr) << t.dump(2);
    EXPECT_NEAR((*g)["value"].get<double>(), w.value, 1e-9);
    EXPECT_EQ((*g)["goal"], w.goal);
    EXPECT_EQ((*g)["goal_met"].get<bool>(), w.met);
    EXPECT_EQ((*g)["requirement"], "(reported)");
  }
  // A scenario that failed or was skipped gives no target (nothing to divide).
  json models = synthetic_cuda_doc()["models"];
  for (auto& s : models[0]["scenarios"]) {
    if (s["id"] == "torch_ddp_w2") s["status"] = "failed";
  }
  EXPECT_EQ(bench::compute_cuda_targets(models).size(), 3u);
}

TEST(BenchReport, CudaRunShowsTheScenariosSideBySideWithFailuresNamed) {
  const json doc = synthetic_cuda_doc();
  const std::string md = bench::render_report(doc, true);
  EXPECT_NE(md.find("**Side by side on CUDA**"), std::string::npos) << md;
  EXPECT_EQ(md.find("**Headline**"), std::string::npos) << "no floor on CUDA\n" << md;
  EXPECT_NE(md.find("every rank on CUDA (cuda:LOCAL_RANK % 1 visible GPUs)"), std::string::npos)
      << md;
  // One row per model, one column per scenario in the plan's order (spaces aside).
  auto line_at = [&](size_t at) {
    std::string line = md.substr(at, md.find('\n', at) - at);
    line.erase(std::remove(line.begin(), line.end(), ' '), line.end());
    return line;
  };
  const size_t header = md.find("| model ", md.find("**Side by side on CUDA**"));
  ASSERT_NE(header, std::string::npos) << md;
  EXPECT_EQ(line_at(header),
            "|model|plainlabelms|ddp_w1labelms|lockstepDDP,world1,LOCKSTEP_TRANSPORT=ncclms|"
            "torch_ddp_nccl_w1labelms|ddp_w2labelms|ddp_w2_gloolabelms|torch_ddp_w2labelms|"
            "PyTorchDDP,world2,NCCLms|")
      << md;
  const size_t row = md.find("| deep (51.4M params, batch 256) ", header);
  ASSERT_NE(row, std::string::npos) << md;
  EXPECT_EQ(line_at(row),
            "|deep(51.4Mparams,batch256)|8.00|8.40|failed|10.00|90.00|100.00|110.00|skipped|")
      << md;
  // The failed and the skipped rows say why, under the model's table.
  EXPECT_NE(md.find("- lockstep DDP, world 1, LOCKSTEP_TRANSPORT=nccl: failed: 1 of 1 runs failed: "
                    "rank 0 exited with code 1: lockstep-bench: [rank 0/1] LOCKSTEP_TRANSPORT=nccl: "
                    "this lockstep has no NCCL backend"),
            std::string::npos)
      << md;
  EXPECT_NE(md.find("- PyTorch DDP, world 2, NCCL: skipped: NCCL refuses two ranks on one GPU"),
            std::string::npos)
      << md;
  EXPECT_NE(md.find("**Goals** (issue 18, CUDA)"), std::string::npos) << md;
  const std::string terminal = bench::render_report(doc, false);
  EXPECT_NE(terminal.find("== side by side on CUDA"), std::string::npos) << terminal;
  // A CPU document renders as before: no side-by-side table.
  EXPECT_EQ(bench::render_report(synthetic_doc(true), true).find("Side by side"),
            std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// The program

struct BenchRun {
  std::string dir;
  json doc;
  std::string markdown;
  std::string terminal;
  int rc = -1;
};

BenchRun run_bench(const std::string& args) {
  BenchRun r;
  char tmpl[] = "/tmp/lockstep-bench-test-XXXXXX";
  EXPECT_NE(mkdtemp(tmpl), nullptr);
  r.dir = tmpl;
  const std::string cmd = std::string(LOCKSTEP_BENCH_EXE) + " " + args + " --json " + r.dir +
                          "/out.json --markdown " + r.dir + "/out.md > " + r.dir +
                          "/terminal.txt 2> " + r.dir + "/stderr.txt";
  r.rc = std::system(cmd.c_str());
  r.terminal = slurp(r.dir + "/terminal.txt");
  r.markdown = slurp(r.dir + "/out.md");
  const std::string text = slurp(r.dir + "/out.json");
  if (!text.empty()) r.doc = json::parse(text);
  return r;
}

void expect_sane_scenario(const json& s, const std::string& model) {
  SCOPED_TRACE(model + "/" + s["id"].get<std::string>());
  const std::string status = s["status"];
  ASSERT_TRUE(status == "ok" || status == "skipped") << s.dump();
  if (status == "skipped") {
    // Only the optional peer (python3-torch) may be skipped, and always with a reason.
    EXPECT_EQ(s["kind"], "torch_ddp") << s.dump();
    EXPECT_FALSE(s.value("note", std::string()).empty());
    return;
  }
  EXPECT_EQ(s["steps"].get<int>(), 3);  // --steps 3 --repeats 1: rank 0's three steps
  const double p10 = s["p10_ms"], med = s["median_ms"], p90 = s["p90_ms"];
  EXPECT_GT(p10, 0.0);
  EXPECT_LE(p10, med);
  EXPECT_LE(med, p90);
  EXPECT_GT(s["samples_per_s"].get<double>(), 0.0);
  // A LibTorch process holds tens of MiB at least; 0 would mean VmHWM was not read.
  EXPECT_GT(s["peak_rss_mib"].get<double>(), 10.0);
  EXPECT_EQ(s["params"].get<int64_t>(), 1863690);
  if (!s["reference"].is_null()) {
    EXPECT_TRUE(s.contains("ratio")) << "reference " << s["reference"] << " ran but no ratio";
  }
  if (s["world"].get<int>() == 2) {
    EXPECT_GT(s["allreduce_all_grads_ms"].get<double>(), 0.0);
  }
  // Note [Disturbed runs]: every worker reports its CPU use (the run is judged only when its
  // steps took long enough); --retries 0 --keep-disturbed.
  EXPECT_GT(s["cpus"].get<double>(), 0.0) << s.dump();
  EXPECT_LE(s["others_cpus"].size(), 1u) << s.dump();
  EXPECT_EQ(s["reruns"].get<int>(), 0);
}

TEST(BenchSmoke, TinyRunWritesSaneJsonAndMarkdown) {
  auto r = run_bench(
      "--model mlp --scenario plain,floor,ddp,perparam,torch_ddp,overhead,dp,allreduce "
      "--steps 3 --warmup 1 --repeats 1 --batch 8 --sweep-min-bytes 1024 --sweep-max-bytes 65536 "
      "--transports gloo,shm --worker-timeout 60 --retries 0 --keep-disturbed");
  ASSERT_EQ(r.rc, 0) << slurp(r.dir + "/stderr.txt");
  ASSERT_TRUE(r.doc.is_object()) << "no JSON written";

  ASSERT_EQ(r.doc["models"].size(), 1u);
  const json& m = r.doc["models"][0];
  EXPECT_EQ(m["model"], "mlp");
  EXPECT_EQ(m["batch"].get<int>(), 8);
  EXPECT_EQ(m["params"].get<int64_t>(), 1863690);
  std::set<std::string> ids;
  std::map<std::string, const json*> by_id;
  for (const auto& s : m["scenarios"]) {
    ids.insert(s["id"].get<std::string>());
    by_id[s["id"]] = &s;
    expect_sane_scenario(s, "mlp");
  }
  for (const char* id : {"plain", "floor_w2", "ddp_w1", "ddp_w2", "ddp_w2_gloo", "perparam_w2",
                         "torch_ddp_w2", "ddp_w1_alt", "ddp_w2_alt", "plain_2t", "dp_r1",
                         "dp_r2"}) {
    EXPECT_TRUE(ids.count(id)) << "scenario " << id << " missing";
  }
  // Everything but PyTorch's DDP needs nothing optional: it must have run, and lockstep's
  // DDP must have reported its own statistics.
  for (const auto& s : m["scenarios"]) {
    if (s["kind"] != "torch_ddp") {
      EXPECT_EQ(s["status"], "ok") << s.dump();
    }
    if (s["kind"] == "ddp") {
      EXPECT_GE(s["ddp_stats"]["buckets"].get<int>(), 1) << s.dump();
      EXPECT_GE(s["ddp_stats"]["exposed_comm_ms"].get<double>(), 0.0) << s.dump();
      // Each bucket's [ready, launched, done] in that order (world 1 communicates nothing and
      // has no buckets to time).
      if (s["world"].get<int>() > 1) {
        const auto& timeline = s["ddp_stats"]["bucket_ms"];
        ASSERT_EQ(timeline.size(), s["ddp_stats"]["bucket_bytes"].size()) << s.dump();
        for (const auto& p : timeline) {
          EXPECT_LE(p[0].get<double>(), p[1].get<double>()) << s.dump();
          EXPECT_LE(p[1].get<double>(), p[2].get<double>()) << s.dump();
        }
      }
    }
    if (s["status"] == "ok" && s["kind"] != "torch_ddp" && s["kind"] != "overhead") {
      EXPECT_GT(s["cpu_ms_per_step"].get<double>(), 0.0) << s.dump();
    }
  }
  // The synchronized floor: two ranks over the default transport, and every other two-rank
  // scenario's ratio to it.
  const json& floor = *by_id.at("floor_w2");
  EXPECT_EQ(floor["kind"], "floor");
  EXPECT_EQ(floor["world"].get<int>(), 2);
  EXPECT_FALSE(floor.contains("vs_floor"));
  EXPECT_NEAR(by_id.at("ddp_w2")->at("vs_floor").get<double>(),
              by_id.at("ddp_w2")->at("median_ms").get<double>() / floor["median_ms"].get<double>(),
              1e-9);
  EXPECT_TRUE(by_id.at("perparam_w2")->contains("vs_floor"));
  EXPECT_FALSE(by_id.at("ddp_w1")->contains("vs_floor"));
  // World 1 in one process: the plain steps between the wrapped ones.
  EXPECT_GT(by_id.at("ddp_w1_alt")->at("plain_median_ms").get<double>(), 0.0);
  // World 2 in the same two processes: the floor steps between the DDP ones, and its ratio
  // to them (not to the separate floor_w2).
  const json& alt2 = *by_id.at("ddp_w2_alt");
  EXPECT_EQ(alt2["world"].get<int>(), 2);
  EXPECT_NEAR(alt2["vs_floor"].get<double>(),
              alt2["median_ms"].get<double>() / alt2["plain_median_ms"].get<double>(), 1e-9);
  EXPECT_EQ(alt2["plain_repeat_medians_ms"].size(), 1u);
  EXPECT_NE(r.markdown.find("DDP / floor, alternating steps (repeats)"), std::string::npos)
      << r.markdown;

  ASSERT_EQ(r.doc["allreduce"].size(), 2u);
  for (const json& a : r.doc["allreduce"]) {
    ASSERT_EQ(a["status"], "ok") << a.dump();
    EXPECT_EQ(a["world"].get<int>(), 2);
    ASSERT_EQ(a["sweep"].size(), 4u);  // 1, 4, 16, 64 KiB
    int64_t bytes = 1024;
    for (const auto& row : a["sweep"]) {
      EXPECT_EQ(row["bytes"].get<int64_t>(), bytes);
      EXPECT_GT(row["ms"].get<double>(), 0.0);
      EXPECT_GT(row["busbw_gbps"].get<double>(), 0.0);
      // Note [The memory floor of a reduction]: the shared-buffer all-reduce, a copy and an
      // add of the same bytes.
      for (const char* key : {"inplace_ms", "copy_ms", "add_ms"}) {
        EXPECT_GT(row[key].get<double>(), 0.0) << key << " " << row.dump();
      }
      bytes *= 4;
    }
  }

  std::set<std::string> targets;
  for (const auto& t : r.doc["targets"]) {
    EXPECT_TRUE(t["value"].is_number()) << t.dump();
    targets.insert(t["target"].get<std::string>());
  }
  EXPECT_TRUE(targets.count("lockstep DDP / synchronized floor step time (2 ranks)"));
  EXPECT_TRUE(
      targets.count("lockstep DDP world 1 overhead over plain, alternating steps in one process"));
  EXPECT_TRUE(targets.count(
      "lockstep DDP / synchronized floor, alternating steps in the same processes (2 ranks)"));
  EXPECT_TRUE(targets.count("DataParallel 2 replicas / 1 module x 2 threads throughput"));

  EXPECT_NE(r.markdown.find("| plain LibTorch, 1 process"), std::string::npos) << r.markdown;
  EXPECT_NE(r.markdown.find("| synchronized floor: 2 ranks"), std::string::npos) << r.markdown;
  EXPECT_NE(r.markdown.find("**Headline**"), std::string::npos) << r.markdown;
  EXPECT_NE(r.markdown.find("| vs floor |"), std::string::npos) << r.markdown;
  EXPECT_NE(r.markdown.find("| gloo / shm | shm in place us | copy us | add us |"),
            std::string::npos)
      << r.markdown;
  EXPECT_NE(r.markdown.find("| CPU ms/step |"), std::string::npos) << r.markdown;
  EXPECT_NE(r.markdown.find("- lockstep DDP, world 2: backward compute "), std::string::npos)
      << r.markdown;
  EXPECT_NE(r.markdown.find(" bucket 0 ("), std::string::npos) << r.markdown;
  EXPECT_EQ(r.markdown.find("- lockstep DDP, world 1: backward compute"), std::string::npos)
      << "world 1 communicates nothing: no bucket timeline\n" << r.markdown;
  EXPECT_NE(r.markdown.find("lockstep-bench --model mlp"), std::string::npos)
      << "the markdown must carry the reproducing command";
  EXPECT_NE(r.terminal.find("per-parameter all-reduce, world 2"), std::string::npos);

  // --from-json re-renders the same report without running anything.
  const std::string cmd = std::string(LOCKSTEP_BENCH_EXE) + " --from-json " + r.dir +
                          "/out.json --markdown " + r.dir + "/again.md > /dev/null 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  EXPECT_EQ(slurp(r.dir + "/again.md"), r.markdown);
}

TEST(BenchSmoke, FixedMallocReachesEveryWorker) {
  // Note [Allocator settings]: --malloc fixed pins glibc's thresholds in every worker.
  auto r = run_bench("--model small_mlp --scenario plain --steps 1 --warmup 0 --repeats 1 "
                     "--malloc fixed --retries 0 --keep-disturbed");
  ASSERT_EQ(r.rc, 0) << slurp(r.dir + "/stderr.txt");
  EXPECT_EQ(r.doc["config"]["malloc"], "fixed");
  const json& s = r.doc["models"][0]["scenarios"][0];
  ASSERT_EQ(s["status"], "ok") << s.dump();
  EXPECT_EQ(s["glibc_tunables"],
            "glibc.malloc.trim_threshold=268435456:glibc.malloc.mmap_threshold=33554432");
  EXPECT_NE(r.markdown.find("`--malloc fixed`"), std::string::npos) << r.markdown;
}

int exit_code(const std::string& args, const std::string& out) {
  const int rc =
      std::system((std::string(LOCKSTEP_BENCH_EXE) + " " + args + " > " + out + " 2>&1").c_str());
  EXPECT_TRUE(WIFEXITED(rc));
  return WEXITSTATUS(rc);
}

TEST(BenchSmoke, HelpPrintsOptionsAndRunsNothing) {
  char tmpl[] = "/tmp/lockstep-bench-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  EXPECT_EQ(exit_code("--help --json " + dir + "/out.json", dir + "/help.txt"), 0);
  const std::string help = slurp(dir + "/help.txt");
  EXPECT_NE(help.find("--scenario"), std::string::npos) << help;
  EXPECT_EQ(help.find("repeat 1/"), std::string::npos) << "--help ran the benchmark:\n" << help;
  EXPECT_TRUE(slurp(dir + "/out.json").empty());
}

TEST(BenchSmoke, BadInvocationsExitWithTwoAndSayWhy) {
  char tmpl[] = "/tmp/lockstep-bench-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  EXPECT_EQ(exit_code("--model resnet --steps 1", dir + "/a.txt"), 2);
  EXPECT_NE(slurp(dir + "/a.txt").find("--model: unknown 'resnet'"), std::string::npos);
  EXPECT_EQ(exit_code("--from-json " + dir + "/missing.json", dir + "/b.txt"), 2);
  EXPECT_NE(
      slurp(dir + "/b.txt")
          .find("missing.json: cannot read it (or it is empty); expected a file written by --json"),
      std::string::npos)
      << slurp(dir + "/b.txt");
}

TEST(BenchSmoke, UnknownCommHookIsNamedWithTheChoices) {
  char tmpl[] = "/tmp/lockstep-bench-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  EXPECT_EQ(exit_code("--worker ddp --model small_mlp --steps 1 --warmup 0 --comm-hook bogus "
                      "--result " + dir + "/r.json",
                      dir + "/out.txt"),
            bench::kExitFailure);
  EXPECT_NE(slurp(dir + "/out.txt")
                .find("--comm-hook: unknown hook 'bogus'; expected one of allreduce, bf16, fp16"),
            std::string::npos)
      << slurp(dir + "/out.txt");
}

// Runs lockstep-bench with `env` ("NAME=value ...") before it; its exit code.
int exit_code_with(const std::string& env, const std::string& args, const std::string& out) {
  const int rc = std::system(
      (env + " " + std::string(LOCKSTEP_BENCH_EXE) + " " + args + " > " + out + " 2>&1").c_str());
  EXPECT_TRUE(WIFEXITED(rc));
  return WEXITSTATUS(rc);
}

// Note [lockstep-bench on CUDA]: without a GPU, --device cuda says so and starts nothing.
TEST(BenchSmoke, DeviceCudaWithoutAGpuExitsTwoBeforeAnyWorker) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "a GPU is visible: this checks its absence";
  char tmpl[] = "/tmp/lockstep-bench-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  EXPECT_EQ(exit_code("--device cuda --steps 1 --repeats 1 --json " + dir + "/out.json",
                      dir + "/a.txt"),
            bench::kExitUsage);
  const std::string a = slurp(dir + "/a.txt");
  EXPECT_NE(a.find("lockstep-bench: --device cuda: expected a CUDA device, but "
                   "torch::cuda::is_available() is false: this LibTorch is CPU-only, or no GPU "
                   "is visible."),
            std::string::npos)
      << a;
  EXPECT_NE(a.find("drop --device cuda"), std::string::npos) << a;
  EXPECT_EQ(a.find("repeat 1/"), std::string::npos) << "a worker was started:\n" << a;
  EXPECT_EQ(std::count(a.begin(), a.end(), '\n'), 1) << "one line:\n" << a;
  EXPECT_TRUE(slurp(dir + "/out.json").empty()) << "nothing is written";
  // GPUs hidden by CUDA_VISIBLE_DEVICES are named as the reason.
  EXPECT_EQ(exit_code_with("CUDA_VISIBLE_DEVICES=", "--device cuda --model wide", dir + "/b.txt"),
            bench::kExitUsage);
  EXPECT_NE(slurp(dir + "/b.txt").find("(CUDA_VISIBLE_DEVICES='')"), std::string::npos)
      << slurp(dir + "/b.txt");
  // A bad --device is a usage error before anything else.
  EXPECT_EQ(exit_code("--device gpu", dir + "/c.txt"), bench::kExitUsage);
  EXPECT_NE(slurp(dir + "/c.txt").find("--device: expected cpu or cuda, but got 'gpu'"),
            std::string::npos)
      << slurp(dir + "/c.txt");
  // A worker started by hand with --device cuda says the same and fails.
  EXPECT_EQ(exit_code("--worker plain --model small_mlp --device cuda --result " + dir + "/r.json",
                      dir + "/d.txt"),
            bench::kExitFailure);
  EXPECT_NE(slurp(dir + "/d.txt").find("--device cuda: expected a CUDA device"), std::string::npos)
      << slurp(dir + "/d.txt");
}

// The Python peer refuses what its torch cannot run with exit code 3, which the coordinator
// reports as a skipped row with this text (Note [How lockstep-bench runs scenarios]).
TEST(BenchSmoke, PythonPeerSkipsCudaItCannotRunAndRefusesNcclOnTheCpu) {
  const int probe = access("/usr/bin/python3", X_OK) != 0
                        ? -1
                        : std::system("/usr/bin/python3 -c 'import torch, sys; "
                                      "sys.exit(5 if torch.cuda.is_available() else 0)' "
                                      "> /dev/null 2>&1");
  if (probe != 0 && WIFEXITED(probe) && WEXITSTATUS(probe) == 5) {
    GTEST_SKIP() << "this torch has CUDA and a GPU: nothing to refuse";
  }
  if (probe != 0) GTEST_SKIP() << "no /usr/bin/python3 with torch (python3-torch)";
  char tmpl[] = "/tmp/lockstep-bench-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  auto run = [&](const std::string& args, const std::string& out) {
    const int rc = std::system(("/usr/bin/python3 " + std::string(LOCKSTEP_BENCH_PY_SCRIPT) +
                                " --model wide --batch 2 --result " + dir + "/r.json " + args +
                                " > " + out + " 2>&1")
                                   .c_str());
    EXPECT_TRUE(WIFEXITED(rc));
    return WEXITSTATUS(rc);
  };
  EXPECT_EQ(run("--device cuda --backend gloo", dir + "/a.txt"), 3);
  EXPECT_NE(slurp(dir + "/a.txt").find("--device cuda: expected a CUDA device, but "
                                       "torch.cuda.is_available() is False"),
            std::string::npos)
      << slurp(dir + "/a.txt");
  EXPECT_EQ(run("--device cpu --backend nccl", dir + "/b.txt"), 2);
  EXPECT_NE(slurp(dir + "/b.txt").find("--backend nccl: expected --device cuda"),
            std::string::npos)
      << slurp(dir + "/b.txt");
  EXPECT_TRUE(slurp(dir + "/r.json").empty()) << "nothing ran";
}

// A scenario whose workers fail is a failed row with the error in its note, and the others
// still run: what the --device cuda rows that cannot run here rely on (LOCKSTEP_TRANSPORT=nccl
// where lockstep was built without NCCL). Here the environment gives every default-transport
// rank a transport no lockstep has, so the test does not depend on how lockstep was built.
TEST(BenchSmoke, FailingScenarioIsAFailedRowAndTheRunGoesOn) {
  char tmpl[] = "/tmp/lockstep-bench-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  ASSERT_EQ(exit_code_with("LOCKSTEP_TRANSPORT=bogus",
                           "--model small_mlp --scenario ddp --steps 1 --warmup 0 --repeats 1 "
                           "--retries 0 --keep-disturbed --worker-timeout 60 --json " +
                               dir + "/out.json --markdown " + dir + "/out.md",
                           dir + "/log.txt"),
            0)
      << slurp(dir + "/log.txt");
  const json doc = json::parse(slurp(dir + "/out.json"));
  std::map<std::string, json> by_id;
  for (const auto& s : doc["models"][0]["scenarios"]) by_id[s["id"]] = s;
  ASSERT_EQ(by_id.count("ddp_w1"), 1u);
  EXPECT_EQ(by_id["ddp_w1"]["status"], "failed") << by_id["ddp_w1"].dump();
  const std::string note = by_id["ddp_w1"].value("note", std::string());
  EXPECT_NE(note.find("rank 0 exited with code 1"), std::string::npos) << note;
  EXPECT_NE(note.find("LOCKSTEP_TRANSPORT to be gloo, shm"), std::string::npos) << note;
  EXPECT_NE(note.find("but got 'bogus'"), std::string::npos) << note;
  // The coordinator's own LOCKSTEP_TRANSPORT=gloo row, and plain, ran.
  EXPECT_EQ(by_id["ddp_w2_gloo"]["status"], "ok") << by_id["ddp_w2_gloo"].dump();
  EXPECT_EQ(by_id["plain"]["status"], "ok") << by_id["plain"].dump();
  const std::string md = slurp(dir + "/out.md");
  const size_t line = md.find("- lockstep DDP, world 1: failed: 1 of 1 runs failed: rank 0 exited "
                              "with code 1");
  ASSERT_NE(line, std::string::npos) << md;
  // The error itself, not a warning logged before it, is what the report's line shows.
  const std::string text = md.substr(line, md.find('\n', line) - line);
  EXPECT_NE(text.find("but got 'bogus'"), std::string::npos) << text;
  EXPECT_EQ(text.find("no job token"), std::string::npos) << text;
}

// ---------------------------------------------------------------------------------------------
// The emulated cluster (issue 17): needs root and network namespaces; nothing timed.

// Why the emulated cluster cannot run here, or "" when it can.
std::string cluster_unavailable() {
  if (geteuid() != 0) return "needs root to create network namespaces (ip netns)";
  const std::string probe = "lsbc" + std::to_string(getpid()) + "-probe";
  if (std::system(("ip netns add " + probe + " > /dev/null 2>&1").c_str()) != 0) {
    return "`ip netns add` failed: no iproute2 or no network namespaces here";
  }
  std::system(("ip netns del " + probe + " > /dev/null 2>&1").c_str());
  return "";
}

bool netns_exists(const std::string& name) {
  return access(("/var/run/netns/" + name).c_str(), F_OK) == 0;
}

// The namespaces a cluster run created, from the line its coordinator prints.
std::vector<std::string> cluster_namespaces(const std::string& stderr_text) {
  std::vector<std::string> out;
  std::smatch m;
  if (!std::regex_search(stderr_text, m, std::regex("\\] namespaces ([^\\n]+)"))) return out;
  std::istringstream is(m[1].str());
  for (std::string ns; is >> ns;) out.push_back(ns);
  return out;
}

TEST(BenchCluster, SmallestClusterRunsInNamespacesAndLeavesNoneBehind) {
  const std::string why = cluster_unavailable();
  if (!why.empty()) GTEST_SKIP() << why;
  // A namespace left by a coordinator that no longer runs: the run removes it first.
  const pid_t dead = fork();
  if (dead == 0) _exit(0);
  waitpid(dead, nullptr, 0);
  const std::string stale = "lsbc" + std::to_string(dead) + "-n0";
  ASSERT_EQ(std::system(("ip netns add " + stale).c_str()), 0);

  auto r = run_bench(
      "--cluster 2x1 --link 10gbit:0.2ms --model small_mlp --steps 3 --warmup 1 --repeats 1 "
      "--batch 8 --cluster-scenarios gloo,hier,torch_ddp,fp16 --retries 0 --keep-disturbed "
      "--worker-timeout 60");
  const std::string err = slurp(r.dir + "/stderr.txt");
  ASSERT_EQ(r.rc, 0) << err;
  EXPECT_FALSE(netns_exists(stale));
  EXPECT_NE(err.find("removed network namespace " + stale), std::string::npos) << err;

  // Its own namespaces: two nodes and the hub, named after the coordinator, all gone now, and
  // no link of theirs in this (the root) namespace.
  const auto names = cluster_namespaces(err);
  ASSERT_EQ(names.size(), 3u) << err;
  const std::string tag = names[0].substr(0, names[0].find('-'));
  for (const auto& ns : names) {
    EXPECT_EQ(ns.rfind(tag + "-", 0), 0u) << ns;
    EXPECT_FALSE(netns_exists(ns)) << ns << " was left behind";
  }
  const std::string links = r.dir + "/links.txt";
  ASSERT_EQ(std::system(("ip -o link show > " + links + " 2>&1").c_str()), 0);
  EXPECT_EQ(slurp(links).find(tag), std::string::npos) << slurp(links);

  ASSERT_TRUE(r.doc.is_object()) << "no JSON written";
  EXPECT_TRUE(r.doc["models"].empty());
  const json& c = r.doc["cluster"];
  EXPECT_EQ(c["nodes"].get<int>(), 2);
  EXPECT_EQ(c["ranks_per_node"].get<int>(), 1);
  ASSERT_EQ(c["links"].size(), 1u);
  const json& l = c["links"][0];
  EXPECT_EQ(l["link"], "10gbit:0.2ms");
  EXPECT_DOUBLE_EQ(l["rate_bits"].get<double>(), 1e10);
  EXPECT_DOUBLE_EQ(l["delay_ms"].get<double>(), 0.2);
  EXPECT_NE(l["shaping"].get<std::string>().find("10Gbit"), std::string::npos) << l.dump();
  if (!l["delay_applied"].get<bool>()) {
    EXPECT_NE(l["note"].get<std::string>().find("not applied"), std::string::npos) << l.dump();
  }
  ASSERT_EQ(l["models"].size(), 1u);
  const json& m = l["models"][0];
  EXPECT_EQ(m["model"], "small_mlp");
  std::vector<std::string> ids;
  for (const auto& s : m["scenarios"]) {
    SCOPED_TRACE(s.dump());
    ids.push_back(s["id"]);
    EXPECT_EQ(s["world"].get<int>(), 2);
    EXPECT_EQ(s["nodes"].get<int>(), 2);
    if (s["status"] == "skipped") {  // only the optional python3-torch peer, with its reason
      EXPECT_EQ(s["kind"], "torch_ddp");
      EXPECT_FALSE(s.value("note", std::string()).empty());
      continue;
    }
    ASSERT_EQ(s["status"], "ok");
    EXPECT_EQ(s["steps"].get<int>(), 3);
    EXPECT_GT(s["median_ms"].get<double>(), 0.0);
    EXPECT_LE(s["p10_ms"].get<double>(), s["p90_ms"].get<double>());
    EXPECT_GT(s["allreduce_all_grads_ms"].get<double>(), 0.0);
    if (s["id"] != "gloo") {
      EXPECT_TRUE(s.contains("ratio"));
    }
  }
  EXPECT_EQ(ids, (std::vector<std::string>{"gloo", "hier", "torch_ddp", "fp16"}));
  // Each namespace is a host of its own: the shm transport became hierarchical (one host
  // would have given a flat shared-memory group, "shm").
  EXPECT_EQ(m["scenarios"][1]["backend"], "hier");
  EXPECT_EQ(m["scenarios"][0]["backend"], "gloo");
  EXPECT_EQ(m["scenarios"][3]["comm_hook"], "fp16");
  EXPECT_EQ(m["scenarios"][3]["ddp_stats"]["buckets"].get<int>(), 1);

  bool hier_goal = false;
  for (const auto& t : r.doc["targets"]) {
    hier_goal = hier_goal ||
                t["target"] == "lockstep hierarchical / flat Gloo step time, 10gbit:0.2ms";
  }
  EXPECT_TRUE(hier_goal) << r.doc["targets"].dump();
  EXPECT_NE(r.markdown.find("**Emulated cluster**, 2 nodes x 1 ranks, link 10gbit:0.2ms"),
            std::string::npos)
      << r.markdown;
  EXPECT_NE(r.markdown.find("| lockstep DDP, hierarchical (shm within a node, Gloo between)"),
            std::string::npos)
      << r.markdown;
  EXPECT_NE(r.markdown.find("| lockstep DDP, flat Gloo, fp16_compress_hook"), std::string::npos);
  EXPECT_NE(r.markdown.find("--cluster 2x1"), std::string::npos);
}

TEST(BenchCluster, FailedSetUpNamesTheCommandAndRemovesWhatItCreated) {
  const std::string why = cluster_unavailable();
  if (!why.empty()) GTEST_SKIP() << why;
  // Node 1's name is taken (by this test), so the set-up fails after the hub and node 0.
  const std::string tag = "lsbc" + std::to_string(getpid());
  ASSERT_EQ(std::system(("ip netns add " + tag + "-n1").c_str()), 0);
  bench::LinkSpec link = bench::parse_link("1gbit");
  try {
    bench::EmulatedCluster cluster(2, link);
    ADD_FAILURE() << "set-up succeeded although " << tag << "-n1 existed";
  } catch (const lockstep::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("emulated cluster: `"), std::string::npos) << what;
    EXPECT_NE(what.find("netns add " + tag + "-n1` failed"), std::string::npos) << what;
    EXPECT_NE(what.find("It needs root (CAP_NET_ADMIN), iproute2"), std::string::npos) << what;
  }
  EXPECT_FALSE(netns_exists(tag + "-hub"));
  EXPECT_FALSE(netns_exists(tag + "-n0"));
  EXPECT_TRUE(netns_exists(tag + "-n1")) << "removed a namespace it did not create";
  std::system(("ip netns del " + tag + "-n1").c_str());
}

TEST(BenchCluster, InterruptedRunRemovesItsNamespacesAndExits130) {
  const std::string why = cluster_unavailable();
  if (!why.empty()) GTEST_SKIP() << why;
  char tmpl[] = "/tmp/lockstep-bench-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  const pid_t pid = fork();
  if (pid == 0) {
    const std::string log = dir + "/stderr.txt";
    int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    dup2(fd, 1);
    dup2(fd, 2);
    execl(LOCKSTEP_BENCH_EXE, LOCKSTEP_BENCH_EXE, "--cluster", "2x1", "--link", "10mbit",
          "--model", "small_mlp", "--steps", "100000", "--warmup", "0", "--repeats", "1",
          "--cluster-scenarios", "gloo", "--worker-timeout", "120", nullptr);
    _exit(127);
  }
  ASSERT_GT(pid, 0);
  // Polls for the hub namespace the coordinator creates (bounded).
  const std::string hub = "lsbc" + std::to_string(pid) + "-hub";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!netns_exists(hub) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const bool created = netns_exists(hub);
  kill(pid, SIGINT);
  int st = 0;
  // The coordinator kills its workers and deletes its namespaces: bounded by its own
  // polling of the workers (milliseconds) and `ip netns del`.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  pid_t got = 0;
  while ((got = waitpid(pid, &st, WNOHANG)) == 0 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (got == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    FAIL() << "the coordinator did not exit within 60 s of SIGINT";
  }
  ASSERT_TRUE(created) << slurp(dir + "/stderr.txt");
  ASSERT_TRUE(WIFEXITED(st)) << slurp(dir + "/stderr.txt");
  EXPECT_EQ(WEXITSTATUS(st), bench::kExitInterrupted) << slurp(dir + "/stderr.txt");
  for (const std::string& ns : {hub, "lsbc" + std::to_string(pid) + "-n0",
                                "lsbc" + std::to_string(pid) + "-n1"}) {
    EXPECT_FALSE(netns_exists(ns)) << ns << " was left behind";
  }
  EXPECT_NE(slurp(dir + "/stderr.txt").find("interrupted by a signal"), std::string::npos);
}

}  // namespace
