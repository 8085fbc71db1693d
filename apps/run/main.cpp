// lockstep-run: a torchrun-compatible launcher. See README "Launching", Note [lockstep-run
// rounds] (rounds.h) and Note [Root cause] (verdict.h).
#include <torch/cuda.h>

#include <iostream>
#include <string>
#include <vector>

#include "agent.h"
#include "lockstep/errors.h"
#include "options.h"
#include "processes.h"

int main(int argc, char** argv) {
  using namespace lockstep::run;
  const auto env = lockstep::process_environment();
  const int cpus = available_cpus();
  ParseResult parsed;
  try {
    // Counted only for --nproc-per-node gpu (it starts the CUDA driver); honours
    // CUDA_VISIBLE_DEVICES, and is 0 on a CPU-only LibTorch.
    const auto gpus = [] { return static_cast<int>(torch::cuda::device_count()); };
    parsed = parse_run_options(std::vector<std::string>(argv, argv + argc), env, cpus, gpus);
  } catch (const lockstep::Error& e) {
    std::cerr << "lockstep-run: error: " << e.what() << std::endl;
    return kExitUsage;
  }
  if (parsed.help) {
    std::cout << parsed.help_text << std::endl;
    return 0;
  }
  if (parsed.options.dry_run) {
    print_plan(parsed.options, env, cpus);
    return 0;
  }
  try {
    return run_agent(parsed.options, env, cpus);
  } catch (const lockstep::InvalidArgument& e) {
    std::cerr << "lockstep-run: error: " << e.what() << std::endl;
    return kExitUsage;
  } catch (const std::exception& e) {
    std::cerr << "lockstep-run: error: " << e.what() << std::endl;
    return kExitLauncherError;
  }
}
