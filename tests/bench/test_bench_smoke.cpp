// lockstep-bench end to end on a tiny configuration: it must spawn its workers, write JSON
// whose numbers are sane (positive, ordered percentiles, peak RSS, a ratio where a reference
// ran, a sweep covering the requested sizes) and a markdown table. Nothing here is timed.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

using json = nlohmann::json;

namespace {

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

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
}

TEST(BenchSmoke, TinyRunWritesSaneJsonAndMarkdown) {
  auto r = run_bench(
      "--model mlp --scenario plain,ddp,perparam,torch_ddp,dp,allreduce --steps 3 --warmup 1 "
      "--repeats 1 --batch 8 --sweep-min-bytes 1024 --sweep-max-bytes 65536 --transports gloo "
      "--worker-timeout 60");
  ASSERT_EQ(r.rc, 0) << slurp(r.dir + "/stderr.txt");
  ASSERT_TRUE(r.doc.is_object()) << "no JSON written";

  ASSERT_EQ(r.doc["models"].size(), 1u);
  const json& m = r.doc["models"][0];
  EXPECT_EQ(m["model"], "mlp");
  EXPECT_EQ(m["batch"].get<int>(), 8);
  std::set<std::string> ids;
  for (const auto& s : m["scenarios"]) {
    ids.insert(s["id"].get<std::string>());
    expect_sane_scenario(s, "mlp");
  }
  for (const char* id : {"plain", "ddp_w1", "ddp_w2", "ddp_w2_gloo", "perparam_w2", "torch_ddp_w2",
                         "plain_2t",
                         "dp_r1", "dp_r2"}) {
    EXPECT_TRUE(ids.count(id)) << "scenario " << id << " missing";
  }
  // Everything but PyTorch's DDP needs nothing optional: it must have run, and lockstep's
  // DDP must have reported its own statistics.
  for (const auto& s : m["scenarios"]) {
    if (s["kind"] != "torch_ddp") EXPECT_EQ(s["status"], "ok") << s.dump();
    if (s["kind"] == "ddp") {
      EXPECT_GE(s["ddp_stats"]["buckets"].get<int>(), 1) << s.dump();
      EXPECT_GE(s["ddp_stats"]["exposed_comm_ms"].get<double>(), 0.0) << s.dump();
    }
  }

  ASSERT_EQ(r.doc["allreduce"].size(), 1u);
  const json& a = r.doc["allreduce"][0];
  ASSERT_EQ(a["status"], "ok") << a.dump();
  ASSERT_EQ(a["sweep"].size(), 4u);  // 1, 4, 16, 64 KiB
  int64_t bytes = 1024;
  for (const auto& row : a["sweep"]) {
    EXPECT_EQ(row["bytes"].get<int64_t>(), bytes);
    EXPECT_GT(row["ms"].get<double>(), 0.0);
    EXPECT_GT(row["busbw_gbps"].get<double>(), 0.0);
    bytes *= 4;
  }

  for (const auto& t : r.doc["targets"]) {
    EXPECT_TRUE(t["value"].is_number()) << t.dump();
    EXPECT_FALSE(t["target"].get<std::string>().empty());
  }
  EXPECT_NE(r.markdown.find("| plain LibTorch, 1 process"), std::string::npos) << r.markdown;
  EXPECT_NE(r.markdown.find("lockstep-bench --model mlp"), std::string::npos)
      << "the markdown must carry the reproducing command";
  EXPECT_NE(r.terminal.find("per-parameter all-reduce, world 2"), std::string::npos);

  // --from-json re-renders the same report without running anything.
  const std::string cmd = std::string(LOCKSTEP_BENCH_EXE) + " --from-json " + r.dir +
                          "/out.json --markdown " + r.dir + "/again.md > /dev/null 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  EXPECT_EQ(slurp(r.dir + "/again.md"), r.markdown);
}

TEST(BenchSmoke, RejectsUnknownModel) {
  const std::string cmd =
      std::string(LOCKSTEP_BENCH_EXE) + " --model resnet --steps 1 > /dev/null 2>&1";
  const int rc = std::system(cmd.c_str());
  EXPECT_TRUE(WIFEXITED(rc));
  EXPECT_EQ(WEXITSTATUS(rc), 2);
}

}  // namespace
