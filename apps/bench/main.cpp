// lockstep-bench: lockstep's DDP measured side by side with plain LibTorch, the synchronized
// floor, the hand-written per-parameter all-reduce, PyTorch's own DDP (python3-torch) and
// DataParallel, on the same models, data, threads and world size, every scenario in its own
// processes, interleaved (Note [How lockstep-bench runs scenarios] in coordinator.h); plus
// the all-reduce sweep of every transport.
//
// Units: options (the command line), scenarios (what runs, and the targets), coordinator
// (runs the workers, gathers their results), worker (one rank of one scenario), report (the
// tables, from the JSON alone), models.h (the benchmark models), proc (/proc readers).
#include <signal.h>
#include <torch/cuda.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "cluster.h"
#include "coordinator.h"
#include "lockstep/errors.h"
#include "options.h"
#include "proc.h"
#include "report.h"
#include "worker.h"

#ifndef LOCKSTEP_BENCH_PY_SCRIPT
#define LOCKSTEP_BENCH_PY_SCRIPT ""
#endif

namespace {

using lockstep::bench::ParseResult;

// torch_ddp_bench.py: next to the sources in a build tree, under share/ once installed.
std::string default_script() {
  const std::string built = LOCKSTEP_BENCH_PY_SCRIPT;
  if (!built.empty() && access(built.c_str(), R_OK) == 0) return built;
  const std::string exe = lockstep::bench::self_exe();
  const std::string dir = exe.substr(0, exe.find_last_of('/'));
  for (const std::string& cand :
       {dir + "/torch_ddp_bench.py", dir + "/../share/lockstep/torch_ddp_bench.py"}) {
    if (access(cand.c_str(), R_OK) == 0) return cand;
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  namespace bench = lockstep::bench;
  ParseResult parsed;
  try {
    parsed = bench::parse_bench_options(std::vector<std::string>(argv, argv + argc));
  } catch (const lockstep::InvalidArgument& e) {
    std::cerr << "lockstep-bench: " << e.what() << std::endl;
    return bench::kExitUsage;
  }
  try {
    switch (parsed.mode) {
      case ParseResult::Mode::kHelp:
        std::cout << parsed.help_text << std::endl;
        return 0;
      case ParseResult::Mode::kWorker:
        return bench::run_worker(parsed.worker);
      case ParseResult::Mode::kRun:
      case ParseResult::Mode::kRender:
        break;
    }
    bench::BenchOptions& o = parsed.options;
    nlohmann::json doc;
    if (parsed.mode == ParseResult::Mode::kRender) {
      const std::string text = bench::read_text_file(o.from_json);
      if (text.empty()) {
        std::cerr << "lockstep-bench: --from-json " << o.from_json
                  << ": cannot read it (or it is empty); expected a file written by --json"
                  << std::endl;
        return bench::kExitUsage;
      }
      doc = nlohmann::json::parse(text);
    } else {
      // Note [lockstep-bench on CUDA] (scenarios.h): no GPU, nothing started.
      if (o.device == "cuda") {
        if (!torch::cuda::is_available()) {
          std::cerr << "lockstep-bench: "
                    << bench::cuda_unavailable_message(std::getenv("CUDA_VISIBLE_DEVICES"))
                    << std::endl;
          return bench::kExitUsage;
        }
        o.gpus = static_cast<int>(torch::cuda::device_count());
      }
      if (o.script.empty()) o.script = default_script();
      signal(SIGPIPE, SIG_IGN);
      doc = bench::run_benchmark(o);
    }
    std::cout << bench::render_report(doc, /*markdown=*/false) << std::flush;
    if (!o.json_path.empty()) {
      std::ofstream(o.json_path) << doc.dump(2) << "\n";
      std::cerr << "wrote " << o.json_path << std::endl;
    }
    if (!o.markdown_path.empty()) {
      std::ofstream(o.markdown_path) << bench::render_report(doc, /*markdown=*/true);
      std::cerr << "wrote " << o.markdown_path << std::endl;
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "lockstep-bench: " << e.what() << std::endl;
    return bench::cluster_interrupted() ? bench::kExitInterrupted : bench::kExitFailure;
  }
}
