// Metrics JSON lines and the HTML report.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <regex>
#include <string>
#include <vector>

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
      w.write({"ddp", {{"step", s}, {"forward_ms", 5.0}, {"backward_compute_ms", 9.0},
                       {"comm_ms", 4.0}, {"exposed_comm_ms", 1.5}}});
    }
    w.write({"epoch", {{"epoch", 1}, {"train_loss", 0.5}, {"val_loss", 0.6}, {"accuracy", 0.9}}});
    w.write({"epoch", {{"epoch", 2}, {"train_loss", 0.4}, {"val_loss", 0.55}, {"accuracy", 0.92}}});
  }
  std::string lines = slurp(metrics);
  EXPECT_NE(lines.find(R"("kind":"step")"), std::string::npos);
  EXPECT_NE(lines.find(R"("loss":0.1)"), std::string::npos) << lines.substr(0, 400);
  EXPECT_EQ(std::count(lines.begin(), lines.end(), '\n'), 62);

  write_report(ReportOptions().metrics_path(metrics).output_path(report).title("T <1>")
                   .summary({{"test accuracy", "91.2%"}}).preformatted("sample & text")
                   .settings({{"lr", "0.001"}, {"comm-hook", "<fp16>"}})
                   .command("lockstep-fashion-mnist --lr 0.001 --out-dir 'a b'"));
  std::string html = slurp(report);
  EXPECT_NE(html.find("<title>T &lt;1&gt;</title>"), std::string::npos);
  EXPECT_NE(html.find("91.2%"), std::string::npos);
  EXPECT_NE(html.find("sample &amp; text"), std::string::npos);
  // Settings: a table of name/value rows, escaped; the command verbatim (escaped).
  size_t settings = html.find("<table class='settings'>");
  ASSERT_NE(settings, std::string::npos);
  EXPECT_NE(html.find("<tr><td>comm-hook</td><td>&lt;fp16&gt;</td></tr>", settings), std::string::npos);
  EXPECT_NE(html.find("<tr><td>lr</td><td>0.001</td></tr>", settings), std::string::npos);
  EXPECT_NE(html.find("<pre class='command'>lockstep-fashion-mnist --lr 0.001 --out-dir &#39;a b&#39;</pre>"),
            std::string::npos)
      << html.substr(0, 1200);
  EXPECT_NE(html.find("train_loss (last 0.4)"), std::string::npos);
  EXPECT_NE(html.find("val_loss (last 0.55)"), std::string::npos);
  EXPECT_NE(html.find("accuracy (last 0.92)"), std::string::npos);
  EXPECT_NE(html.find("samples_per_s"), std::string::npos);
  EXPECT_NE(html.find("DDP bucket all-reduce timeline"), std::string::npos);
  // The DDP phases per step share one chart, one polyline each, with their last values.
  size_t ddp_chart = html.find("DDP time per step (ms)");
  ASSERT_NE(ddp_chart, std::string::npos);
  std::string ddp_svg = html.substr(ddp_chart, html.find("</svg>", ddp_chart) - ddp_chart);
  for (const char* label : {"forward_ms (last 5)", "backward_compute_ms (last 9)", "comm_ms (last 4)",
                            "exposed_comm_ms (last 1.5)"}) {
    EXPECT_NE(ddp_svg.find(label), std::string::npos) << label;
  }
  size_t polylines = 0;
  for (size_t p = ddp_svg.find("<polyline"); p != std::string::npos; p = ddp_svg.find("<polyline", p + 1)) ++polylines;
  EXPECT_EQ(polylines, 4u);
  EXPECT_NE(html.find("throughput (samples_per_s)"), std::string::npos);
  EXPECT_EQ(html.find("http-equiv"), std::string::npos) << "a final report does not refresh";
  EXPECT_EQ(html.find("Run in progress"), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos) << "the report must be self-contained";
  EXPECT_EQ(html.find("http://"), html.find("http://www.w3.org/2000/svg"))
      << "no external resources";
}

namespace {
size_t count_of(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t p = text.find(what); p != std::string::npos; p = text.find(what, p + 1)) ++n;
  return n;
}

// The text of the <svg> element holding `marker` ("" when none).
std::string svg_around(const std::string& html, const std::string& marker) {
  size_t at = html.find(marker);
  if (at == std::string::npos) return "";
  size_t begin = html.rfind("<svg", at);
  return html.substr(begin, html.find("</svg>", at) - begin);
}
}  // namespace

// Per-rank throughput: one line per rank of the "rank_throughput" records. The bucket
// timeline: one group of lanes per step (the last three), backward compute against each
// bucket's reduction, with the reductions split where backward compute ended (Note [Bucket
// lanes] in lib/src/train/metrics.cpp).
TEST(Metrics, ReportDrawsPerRankThroughputAndBucketLanesAgainstBackward) {
  std::string dir = ::testing::TempDir();
  std::string pid = std::to_string(::getpid());
  std::string metrics = dir + "lockstep_lanes_metrics_" + pid + ".jsonl";
  std::string report = dir + "lockstep_lanes_report_" + pid + ".html";
  const int world = 3;
  {
    MetricsWriter w(metrics);
    for (int s = 1; s <= 4; ++s) {
      w.write({"step", {{"step", s}, {"loss", 1.0 / s}}});
      MetricRecord ranks{"rank_throughput", {{"step", s}}};
      for (int r = world - 1; r >= 0; --r) ranks.fields.emplace_back("rank" + std::to_string(r), 100.0 * (r + 1) + s);
      w.write(ranks);
      w.write({"ddp", {{"step", s}, {"forward_ms", 1.0}, {"backward_compute_ms", 10.0},
                       {"comm_ms", 10.0}, {"exposed_comm_ms", 2.0}}});
      // Bucket 0 overlaps backward, bucket 1 straddles its end, bucket 2 starts after it.
      w.write({"bucket", {{"step", s}, {"bucket", 0}, {"ready_ms", 1.0}, {"start_ms", 2.0}, {"end_ms", 5.0}}});
      w.write({"bucket", {{"step", s}, {"bucket", 1}, {"ready_ms", 7.0}, {"start_ms", 8.0}, {"end_ms", 11.0}}});
      w.write({"bucket", {{"step", s}, {"bucket", 2}, {"ready_ms", 9.5}, {"start_ms", 10.5}, {"end_ms", 12.0}}});
    }
  }
  write_report(ReportOptions().metrics_path(metrics).output_path(report));
  std::string html = slurp(report);
  std::string ranks = svg_around(html, "throughput per rank (samples/s)");
  ASSERT_FALSE(ranks.empty()) << html.substr(0, 600);
  EXPECT_EQ(count_of(ranks, "<polyline"), size_t(world));
  // Legend in rank order with each rank's last value.
  size_t r0 = ranks.find("rank 0 (last 104)"), r1 = ranks.find("rank 1 (last 204)"), r2 = ranks.find("rank 2 (last 304)");
  ASSERT_NE(r0, std::string::npos) << ranks;
  ASSERT_NE(r1, std::string::npos) << ranks;
  ASSERT_NE(r2, std::string::npos) << ranks;
  EXPECT_LT(r0, r1);
  EXPECT_LT(r1, r2);

  std::string lanes = svg_around(html, "timeline against backward compute");
  ASSERT_FALSE(lanes.empty()) << html;
  EXPECT_NE(lanes.find("(last 3 steps)"), std::string::npos);
  EXPECT_EQ(count_of(lanes, "<g class='lane'"), 3u);
  EXPECT_EQ(lanes.find("data-step='1'"), std::string::npos) << "only the last three steps";
  for (const char* step : {"data-step='2'", "data-step='3'", "data-step='4'"}) {
    size_t at = lanes.find(step);
    ASSERT_NE(at, std::string::npos) << step;
    std::string lane = lanes.substr(at, lanes.find("</g>", at) - at);
    EXPECT_EQ(count_of(lane, "class='compute'"), 1u) << step;
    EXPECT_EQ(count_of(lane, "class='exposed'"), 1u) << step;
    EXPECT_EQ(count_of(lane, "class='bucket hidden'"), 2u) << "bucket 0, and bucket 1 until 10 ms: " << step;
    EXPECT_EQ(count_of(lane, "class='bucket exposed'"), 2u) << "bucket 1 from 10 ms, and bucket 2: " << step;
    EXPECT_EQ(count_of(lane, "class='ready'"), 3u) << step;
    EXPECT_EQ(count_of(lane, ">bucket "), 3u) << step;
  }
  // One time axis for all steps, 0 .. 12 ms (the latest end: backward 10 + wait 2, bucket 2 at
  // 12) over the 536 px between the margins from x = 88: backward compute spans 10/12 of it,
  // the wait the rest; bucket 1 splits at the same x.
  EXPECT_NE(lanes.find("class='compute' x='88' y='"), std::string::npos) << lanes;
  EXPECT_NE(lanes.find("width='446.667' height='10' fill='#1f77b4'"), std::string::npos) << lanes;
  EXPECT_NE(lanes.find("class='exposed' x='534.667'"), std::string::npos) << lanes;
  EXPECT_NE(lanes.find("width='89.3333' height='10' fill='#d62728'"), std::string::npos) << lanes;
  EXPECT_NE(lanes.find("class='bucket exposed' x='534.667'"), std::string::npos) << lanes;
  EXPECT_NE(lanes.find(">12 ms</text>"), std::string::npos);
  std::remove(metrics.c_str());
  std::remove(report.c_str());
}

TEST(Metrics, LiveReportRefreshesUntilTheFinalWrite) {
  std::string dir = ::testing::TempDir();
  std::string metrics = dir + "lockstep_live_metrics_" + std::to_string(::getpid()) + ".jsonl";
  std::string report = dir + "lockstep_live_report_" + std::to_string(::getpid()) + ".html";
  MetricsWriter w(metrics);
  w.write({"step", {{"step", 1}, {"loss", 2.0}}});
  write_report(ReportOptions().metrics_path(metrics).output_path(report).live(true));
  std::string html = slurp(report);
  size_t head_end = html.find("</head>");
  size_t refresh = html.find(R"(<meta http-equiv="refresh" content="10">)");
  ASSERT_NE(refresh, std::string::npos);
  EXPECT_LT(refresh, head_end) << "the refresh must be in <head>";
  EXPECT_NE(html.find("Run in progress"), std::string::npos);
  // Records written after the live report show up in the next write; the final one stops refreshing.
  w.write({"step", {{"step", 2}, {"loss", 1.25}}});
  write_report(ReportOptions().metrics_path(metrics).output_path(report));
  html = slurp(report);
  EXPECT_EQ(html.find("http-equiv"), std::string::npos);
  EXPECT_EQ(html.find("Run in progress"), std::string::npos);
  EXPECT_NE(html.find("loss (last 1.25)"), std::string::npos);
  std::remove(metrics.c_str());
  std::remove(report.c_str());
}

TEST(Metrics, OverlayReportDrawsEachRunInItsOwnColourWithALegend) {
  std::string dir = ::testing::TempDir();
  std::string pid = std::to_string(::getpid());
  std::string a = dir + "lockstep_overlay_a_" + pid + ".jsonl", b = dir + "lockstep_overlay_b_" + pid + ".jsonl";
  std::string report = dir + "lockstep_overlay_" + pid + ".html";
  {
    MetricsWriter wa(a), wb(b);
    for (int s = 1; s <= 4; ++s) {
      wa.write({"step", {{"step", s}, {"loss", 4.0 / s}}});
      wb.write({"step", {{"step", s}, {"loss", 3.0 / s}}});
    }
    wa.write({"epoch", {{"epoch", 1}, {"val_loss", 0.5}}});  // run b has no epoch records
  }
  write_overlay_report(OverlayOptions().runs({{"run A", a}, {"run <B>", b}}).output_path(report));
  std::string html = slurp(report);
  size_t chart = html.find(">loss by run<");  // not val_loss
  ASSERT_NE(chart, std::string::npos) << html.substr(0, 800);
  std::string svg = html.substr(chart, html.find("</svg>", chart) - chart);
  EXPECT_NE(svg.find("<polyline fill='none' stroke='#1f77b4'"), std::string::npos);
  EXPECT_NE(svg.find("<polyline fill='none' stroke='#d62728'"), std::string::npos);
  EXPECT_NE(svg.find("fill='#1f77b4' text-anchor='end'>run A (last 1)"), std::string::npos) << svg;
  EXPECT_NE(svg.find("fill='#d62728' text-anchor='end'>run &lt;B&gt; (last 0.75)"), std::string::npos) << svg;
  // A run without the field keeps its colour and says so in the legend.
  size_t val = html.find("val_loss by run");
  ASSERT_NE(val, std::string::npos);
  std::string val_svg = html.substr(val, html.find("</svg>", val) - val);
  EXPECT_NE(val_svg.find("run A (last 0.5)"), std::string::npos);
  EXPECT_NE(val_svg.find("fill='#d62728' text-anchor='end'>run &lt;B&gt; (no data)"), std::string::npos) << val_svg;
  EXPECT_EQ(val_svg.find("stroke='#d62728'"), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos);

  EXPECT_THROW(write_overlay_report(OverlayOptions().output_path(report)), lockstep::Error);
  try {
    write_overlay_report(OverlayOptions().runs({{"gone", "/nonexistent_dir_lockstep/m.jsonl"}}).output_path(report));
    FAIL() << "expected an error";
  } catch (const lockstep::Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent_dir_lockstep/m.jsonl"), std::string::npos);
  }
  std::remove(a.c_str());
  std::remove(b.c_str());
  std::remove(report.c_str());
}

// Renders a report in headless Chromium and checks the parsed DOM: the page is well-formed
// enough that every chart becomes an SVG element, the settings table and command block are
// where they belong, and a live page keeps its refresh in <head>. Skipped without chromium
// (Debian's `chromium` package; scripts/install-deps.sh installs it).
TEST(Metrics, ReportRendersInChromium) {
  if (std::system("command -v chromium >/dev/null 2>&1") != 0) GTEST_SKIP() << "chromium not installed";
  std::string dir = ::testing::TempDir();
  std::string pid = std::to_string(::getpid());
  std::string metrics = dir + "lockstep_dom_metrics_" + pid + ".jsonl";
  std::string report = dir + "lockstep_dom_report_" + pid + ".html";
  std::string profile = dir + "lockstep_dom_profile_" + pid;
  const int kWorld = 4;
  {
    MetricsWriter w(metrics);
    for (int s = 1; s <= 5; ++s) {
      w.write({"step", {{"step", s}, {"loss", 1.0 / s}, {"samples_per_s", 100 * s}}});
      MetricRecord ranks{"rank_throughput", {{"step", s}}};
      for (int r = 0; r < kWorld; ++r) ranks.fields.emplace_back("rank" + std::to_string(r), 50.0 * s + r);
      w.write(ranks);
      w.write({"ddp", {{"step", s}, {"forward_ms", 1.0}, {"backward_compute_ms", 2.0},
                       {"comm_ms", 3.0}, {"exposed_comm_ms", 0.5}}});
      w.write({"bucket", {{"step", s}, {"bucket", 0}, {"start_ms", s * 10.0}, {"end_ms", s * 10.0 + 2}}});
      w.write({"bucket", {{"step", s}, {"bucket", 1}, {"start_ms", 1.0}, {"end_ms", 1.5}}});
    }
  }
  auto dump_dom = [&]() {
    std::string out = report + ".dom";
    std::string cmd = "timeout 60 chromium --headless --no-sandbox --disable-gpu --user-data-dir='" + profile +
                      "' --dump-dom 'file://" + report + "' > '" + out + "' 2>/dev/null";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
    std::string dom = slurp(out);
    std::remove(out.c_str());
    return dom;
  };
  write_report(ReportOptions().metrics_path(metrics).output_path(report).title("DOM check")
                   .settings({{"lr", "0.001"}, {"batch-size", "64"}})
                   .command("lockstep-fashion-mnist --lr 0.001"));
  std::string html = slurp(report);
  std::string dom = dump_dom();
  ASSERT_NE(dom.find("<h1>DOM check</h1>"), std::string::npos) << dom.substr(0, 400);
  // Every <svg> of the file is an element of the DOM (none swallowed by a parse error).
  EXPECT_EQ(count_of(dom, "<svg "), count_of(html, "<svg "));
  EXPECT_GE(count_of(dom, "<svg "), 5u);  // loss, throughput, per rank, DDP times, bucket timeline
  size_t ddp = dom.find("DDP time per step (ms)</text>");
  ASSERT_NE(ddp, std::string::npos);
  EXPECT_EQ(count_of(dom.substr(ddp, dom.find("</svg>", ddp) - ddp), "<polyline "), 4u);
  // Per-rank throughput: as many series as ranks, each a polyline with points.
  std::string ranks = svg_around(dom, "throughput per rank (samples/s)</text>");
  ASSERT_FALSE(ranks.empty());
  EXPECT_EQ(count_of(ranks, "<polyline "), size_t(kWorld));
  EXPECT_EQ(count_of(ranks, "<polyline fill=\"none\" stroke=\"#"), size_t(kWorld));
  EXPECT_EQ(count_of(ranks, "<circle "), size_t(kWorld) * 5);
  // The bucket timeline: a group of lanes for each of the last three steps, each with a
  // backward-compute bar and both buckets drawn with a width.
  std::string lanes = svg_around(dom, "timeline against backward compute");
  ASSERT_FALSE(lanes.empty());
  EXPECT_EQ(count_of(lanes, "<g class=\"lane\""), 3u);
  EXPECT_EQ(count_of(lanes, "<rect class=\"compute\""), 3u);
  EXPECT_EQ(count_of(lanes, "<rect class=\"exposed\""), 3u);
  EXPECT_EQ(count_of(lanes, "<rect class=\"bucket "), 6u);
  std::regex width("<rect class=\"(compute|exposed|bucket [a-z]+)\" x=\"[0-9.]+\" y=\"[0-9.]+\" width=\"([0-9.]+)\"");
  size_t bars = 0;
  for (std::sregex_iterator it(lanes.begin(), lanes.end(), width), end; it != end; ++it, ++bars) {
    EXPECT_GE(std::stod((*it)[2]), 1.0) << (*it)[0];
  }
  EXPECT_EQ(bars, 12u) << "every bar of the lanes parsed with x, y and width";
  EXPECT_NE(dom.find("<table class=\"settings\"><tbody><tr><td>batch-size</td><td>64</td></tr>"
                     "<tr><td>lr</td><td>0.001</td></tr></tbody></table>"),
            std::string::npos);
  EXPECT_NE(dom.find("<pre class=\"command\">lockstep-fashion-mnist --lr 0.001</pre>"), std::string::npos);
  EXPECT_EQ(dom.find("http-equiv"), std::string::npos);

  write_report(ReportOptions().metrics_path(metrics).output_path(report).live(true));
  dom = dump_dom();
  size_t refresh = dom.find("<meta http-equiv=\"refresh\" content=\"10\">");
  ASSERT_NE(refresh, std::string::npos) << dom.substr(0, 400);
  EXPECT_LT(refresh, dom.find("</head>"));
  std::remove(metrics.c_str());
  std::remove(report.c_str());
  EXPECT_EQ(std::system(("rm -rf '" + profile + "'").c_str()), 0);
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

// After a crash and resume, each step appears once: the records past the checkpoint (which
// the resumed run writes again) and a line torn by the crash are dropped, in place.
TEST(Metrics, RewindKeepsWhatTheCheckpointCoversAndDropsTheRest) {
  std::string path = ::testing::TempDir() + "lockstep_rewind_" + std::to_string(::getpid()) +
                     ".jsonl";
  const std::string kept =
      R"({"kind":"run","time":0.0})" "\n"
      R"({"kind":"step","step":20,"epoch":0,"loss":1.0})" "\n"
      R"({"kind":"bucket","step":20,"bucket":0})" "\n"
      R"({"kind":"step","step":40,"epoch":0,"loss":0.9})" "\n"
      R"({"kind":"epoch","epoch":1,"train_loss":0.9})" "\n"
      R"({"kind":"step","step":60,"epoch":1,"loss":0.8})" "\n";
  const std::string past =  // written after the checkpoint at step 60 (1 epoch done)
      R"({"kind":"step","step":80,"epoch":1,"loss":0.7})" "\n"
      R"({"kind":"bucket","step":80,"bucket":0})" "\n"
      R"({"kind":"epoch","epoch":2,"train_loss":0.7})" "\n"
      R"({"kind":"step","step":100,"ep)";  // torn by the crash
  {
    std::ofstream out(path, std::ios::trunc);
    out << kept << past;
  }
  EXPECT_EQ(rewind_metrics(path, /*step=*/60, /*epochs_done=*/1), 4u);
  EXPECT_EQ(slurp(path), kept);
  EXPECT_EQ(::access((path + ".tmp").c_str(), F_OK), -1) << "the temporary file is renamed";
  // Nothing past the checkpoint: the file is left as it is.
  EXPECT_EQ(rewind_metrics(path, 60, 1), 0u);
  EXPECT_EQ(slurp(path), kept);
  // The resumed writer appends after what was kept: steps 80.. appear once.
  {
    MetricsWriter w(path, /*append=*/true);
    w.write({"step", {{"step", 80}, {"epoch", 1}, {"loss", 0.7}}});
  }
  std::string after = slurp(path);
  EXPECT_EQ(after.rfind(kept, 0), 0u);
  size_t n80 = 0;
  for (size_t at = after.find(R"("step":80)"); at != std::string::npos;
       at = after.find(R"("step":80)", at + 1)) {
    ++n80;
  }
  EXPECT_EQ(n80, 1u) << after;
  std::remove(path.c_str());
  // A run that never wrote metrics has nothing to rewind.
  EXPECT_EQ(rewind_metrics(path, 60, 1), 0u);
  EXPECT_EQ(::access(path.c_str(), F_OK), -1);
}

TEST(Metrics, RewindNamesAPathThatIsNotAFileAndAFileItCannotReplace) {
  // The temporary file cannot be created (a directory sits at its name): the file is kept
  // whole and the error names the temporary path.
  std::string path = ::testing::TempDir() + "lockstep_rewind_blocked_" +
                     std::to_string(::getpid()) + ".jsonl";
  const std::string text = R"({"kind":"step","step":1})" "\n" R"({"kind":"step","step":2})" "\n";
  {
    std::ofstream out(path, std::ios::trunc);
    out << text;
  }
  ASSERT_EQ(::mkdir((path + ".tmp").c_str(), 0755), 0);
  try {
    rewind_metrics(path, 1, 0);
    ADD_FAILURE() << "expected an error";
  } catch (const lockstep::Error& e) {
    EXPECT_NE(std::string(e.what()).find("could not write metrics file '" + path + ".tmp'"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(slurp(path), text);
  ::rmdir((path + ".tmp").c_str());
  std::remove(path.c_str());

  try {
    rewind_metrics(::testing::TempDir(), 1, 0);  // a directory
    FAIL() << "expected an error";
  } catch (const lockstep::Error& e) {
    std::string what = e.what();
    EXPECT_NE(what.find("expected a metrics file at '" + ::testing::TempDir() +
                        "', but it is not a regular file"),
              std::string::npos)
        << what;
  }
}

// Issue "metrics `time` field after resume": a resumed run's records go on from the largest
// time the kept records hold instead of starting again at 0, so time-based plots of the whole
// file do not fold back.
TEST(Metrics, TimeContinuesAfterResume) {
  std::string path = ::testing::TempDir() + "lockstep_time_" + std::to_string(::getpid()) +
                     ".jsonl";
  {
    std::ofstream out(path, std::ios::trunc);
    out << R"({"kind":"step","time":100.5,"step":20})" "\n"
        << R"({"kind":"epoch","time":120.25,"epoch":1})" "\n"
        << R"({"kind":"step","time":110.0,"step":40})" "\n"  // out of order: the largest counts
        << R"({"kind":"step","time":999,"st)";               // torn by the crash: ignored
  }
  EXPECT_EQ(rewind_metrics(path, 40, 1), 1u);  // drops the torn line
  auto times = [&] {
    std::vector<double> t;
    std::ifstream in(path);
    for (std::string line; std::getline(in, line);) {
      auto at = line.find(R"("time":)");
      EXPECT_NE(at, std::string::npos) << line;
      if (at != std::string::npos) t.push_back(std::stod(line.substr(at + 7)));
    }
    return t;
  };
  {
    MetricsWriter w(MetricsOptions().path(path).append(true));
    w.write({"step", {{"step", 60}}});
    w.write({"step", {{"step", 80}}});
  }
  auto t = times();
  ASSERT_EQ(t.size(), 5u);
  EXPECT_GE(t[3], 120.25) << "the resumed run's clock starts from the largest kept time";
  EXPECT_LT(t[3], 120.25 + 60) << "and runs at wall-clock speed from there";
  EXPECT_GE(t[4], t[3]);
  // A second resume continues from the first resumed run's last record.
  {
    MetricsWriter w(path, /*append=*/true);
    w.write({"step", {{"step", 100}}});
  }
  t = times();
  ASSERT_EQ(t.size(), 6u);
  EXPECT_GE(t[5], t[4]);
  // Without append (a fresh run) the clock starts at 0 again.
  {
    MetricsWriter w(path);
    w.write({"step", {{"step", 1}}});
  }
  t = times();
  ASSERT_EQ(t.size(), 1u);
  EXPECT_LT(t[0], 60.0);
  // Appending to a missing file, or one without times, starts at 0.
  std::remove(path.c_str());
  {
    MetricsWriter w(path, /*append=*/true);
    w.write({"step", {{"step", 1}}});
  }
  t = times();
  ASSERT_EQ(t.size(), 1u);
  EXPECT_LT(t[0], 60.0);
  std::remove(path.c_str());
}
