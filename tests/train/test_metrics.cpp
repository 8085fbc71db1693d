// Metrics JSON lines and the HTML report.
#include <gtest/gtest.h>

#include <fstream>
#include <iterator>

#include "lockstep/errors.h"
#include "lockstep/train/metrics.h"

using namespace lockstep::train;

namespace {
std::string slurp(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}
}  // namespace

TEST(Metrics, JsonLinesAndReportWithCurvesAndBucketTimeline) {
  std::string dir = ::testing::TempDir();
  std::string metrics = dir + "lockstep_metrics_" + std::to_string(::getpid()) + ".jsonl";
  std::string report = dir + "lockstep_report_" + std::to_string(::getpid()) + ".html";
  {
    MetricsWriter w(metrics);
    for (int s = 1; s <= 20; ++s) {
      w.write({"step", {{"step", s}, {"epoch", 1}, {"loss", 2.0 / s}, {"samples_per_s", 1000 + s}}});
      w.write({"bucket", {{"step", s}, {"bucket", s % 3}, {"start_ms", s * 10.0}, {"end_ms", s * 10.0 + 3}}});
    }
    w.write({"epoch", {{"epoch", 1}, {"train_loss", 0.5}, {"val_loss", 0.6}, {"accuracy", 0.9}}});
    w.write({"epoch", {{"epoch", 2}, {"train_loss", 0.4}, {"val_loss", 0.55}, {"accuracy", 0.92}}});
  }
  std::string lines = slurp(metrics);
  EXPECT_NE(lines.find(R"("kind":"step")"), std::string::npos);
  EXPECT_NE(lines.find(R"("loss":0.1)"), std::string::npos) << lines.substr(0, 400);
  EXPECT_EQ(std::count(lines.begin(), lines.end(), '\n'), 42);

  write_report(ReportOptions().metrics_path(metrics).output_path(report).title("T <1>")
                   .summary({{"test accuracy", "91.2%"}}).preformatted("sample & text"));
  std::string html = slurp(report);
  EXPECT_NE(html.find("<title>T &lt;1&gt;</title>"), std::string::npos);
  EXPECT_NE(html.find("91.2%"), std::string::npos);
  EXPECT_NE(html.find("sample &amp; text"), std::string::npos);
  EXPECT_NE(html.find("train_loss (last 0.4)"), std::string::npos);
  EXPECT_NE(html.find("val_loss (last 0.55)"), std::string::npos);
  EXPECT_NE(html.find("accuracy (last 0.92)"), std::string::npos);
  EXPECT_NE(html.find("samples_per_s"), std::string::npos);
  EXPECT_NE(html.find("DDP bucket all-reduce timeline"), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos) << "the report must be self-contained";
  EXPECT_EQ(html.find("http://"), html.find("http://www.w3.org/2000/svg"))
      << "no external resources";
}

TEST(Metrics, DisabledWriterWritesNothingAndBadFilesAreNamed) {
  MetricsWriter off("");
  off.write({"step", {{"loss", 1}}});
  EXPECT_THROW(MetricsWriter("/nonexistent_dir_lockstep/m.jsonl"), lockstep::Error);
  try {
    write_report(ReportOptions().metrics_path("/nonexistent_dir_lockstep/m.jsonl").output_path("x"));
    FAIL() << "expected an error";
  } catch (const lockstep::Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent_dir_lockstep/m.jsonl"), std::string::npos);
  }
}

TEST(Progress, PlainLinesOnRankZeroOnly) {
  testing::internal::CaptureStdout();
  Progress p0(ProgressOptions().total_steps(4).rank(0).tty(0).every_seconds(0));
  Progress p1(ProgressOptions().total_steps(4).rank(1).tty(0).every_seconds(0));
  for (int s = 1; s <= 4; ++s) {
    p0.update(s, 32, 0.5);
    p1.update(s, 32, 0.5);
  }
  p0.finish();
  p1.finish();
  std::string out = testing::internal::GetCapturedStdout();
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 4) << out;
  EXPECT_NE(out.find("train step 4/4 (100.0%) loss 0.5000"), std::string::npos) << out;
  EXPECT_EQ(out.find('\r'), std::string::npos);
}

TEST(Progress, BarRedrawsOneLine) {
  testing::internal::CaptureStdout();
  Progress p(ProgressOptions().total_steps(2).tty(1));
  p.update(1, 10, 1.0);
  p.update(2, 10, 0.9);
  p.finish();
  std::string out = testing::internal::GetCapturedStdout();
  EXPECT_NE(out.find("\rtrain [############################] 2/2"), std::string::npos) << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
}
