#pragma once
/// \file
/// One rank of one lockstep-bench scenario, in a process of its own (Note [How lockstep-bench
/// runs scenarios] in coordinator.h).

#include "options.h"

namespace lockstep {
namespace bench {

/// Runs `config`: joins the process group from the launch environment (RANK, WORLD_SIZE,
/// MASTER_ADDR, MASTER_PORT, set by the coordinator) unless the kind trains alone, warms up,
/// times the steps and writes a JSON result to `config.result`: per-step milliseconds,
/// VmHWM, the CPU time it used and the machine's busy time during the timed steps, and what
/// the kind adds (DDP's statistics, the sweep, the interleaved plain steps). Collective for
/// kinds with a process group. Returns the exit code.
int run_worker(const WorkerConfig& config);

}  // namespace bench
}  // namespace lockstep
