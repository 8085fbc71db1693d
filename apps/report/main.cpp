// lockstep-report: one HTML page overlaying the loss curves of several runs.
//
//   lockstep-report RUN_DIR_OR_METRICS [more...] -o out.html [--title TEXT]
//
// A directory stands for its metrics.jsonl (what the recipes write into --out-dir). Each run
// is labelled by the argument as given. Exit codes: 0 written, 2 usage error, 1 a run's
// metrics could not be read.
#include <sys/stat.h>

#include <cstdio>
#include <cxxopts.hpp>
#include <string>
#include <vector>

#include "lockstep/errors.h"
#include "lockstep/train/metrics.h"

namespace {

bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

int run(int argc, char** argv) {
  cxxopts::Options options("lockstep-report",
                           "Overlays the loss curves of several lockstep runs in one HTML page.");
  options.add_options()("o,output", "HTML file to write (required)", cxxopts::value<std::string>())(
      "title", "page title", cxxopts::value<std::string>()->default_value("lockstep runs compared"))(
      "h,help", "show this help")("runs", "run directories or metrics.jsonl files",
                                  cxxopts::value<std::vector<std::string>>());
  options.parse_positional({"runs"});
  options.positional_help("RUN_DIR_OR_METRICS [more...]");
  cxxopts::ParseResult args;
  try {
    args = options.parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lockstep-report: %s\n%s", e.what(), options.help().c_str());
    return 2;
  }
  if (args.count("help")) {
    std::printf("%s", options.help().c_str());
    return 0;
  }
  if (!args.count("runs") || !args.count("output")) {
    std::fprintf(stderr,
                 "lockstep-report: expected at least one run directory or metrics.jsonl and "
                 "-o OUT.html, but got %s%s\n%s",
                 args.count("runs") ? "runs" : "no runs", args.count("output") ? "" : " and no -o",
                 options.help().c_str());
    return 2;
  }
  std::vector<lockstep::train::OverlayRun> runs;
  for (const auto& arg : args["runs"].as<std::vector<std::string>>()) {
    runs.push_back({arg, is_directory(arg) ? arg + "/metrics.jsonl" : arg});
  }
  const std::string out = args["output"].as<std::string>();
  try {
    lockstep::train::write_overlay_report(lockstep::train::OverlayOptions()
                                              .runs(runs)
                                              .output_path(out)
                                              .title(args["title"].as<std::string>()));
  } catch (const lockstep::Error& e) {
    std::fprintf(stderr, "lockstep-report: %s\n", e.what());
    return 1;
  }
  std::printf("%s: %zu run(s)\n", out.c_str(), runs.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return run(argc, argv); }
