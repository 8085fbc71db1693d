#pragma once
// The launcher agent: hosts (node 0) or joins the rendezvous store, runs rounds of workers,
// pumps their output, fails fast, restarts, forwards signals. See Note [lockstep-run rounds].

#include "options.h"

namespace lockstep {
namespace run {

/// Runs the job; returns the launcher's exit code: 0 when every worker of every node exited 0;
/// the first failing worker's code (128 + signal when it was killed) after the last attempt;
/// 128 + signal when the launcher was told to stop by SIGINT/SIGTERM/SIGHUP;
/// kExitLauncherError when the store could not be hosted or reached.
int run_agent(const RunOptions& options, const EnvMap& env, int cpu_count);

/// Prints what run_agent would start (topology and every local worker's added variables).
void print_plan(const RunOptions& options, const EnvMap& env, int cpu_count);

/// Cores this process may run on (sched_getaffinity), at least 1.
int available_cpus();

}  // namespace run
}  // namespace lockstep
