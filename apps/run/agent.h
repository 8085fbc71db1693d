#pragma once
// The launcher agent: hosts (node 0) or joins the rendezvous store, runs rounds of workers,
// pumps their output, fails fast, restarts, forwards signals, and reports the root cause of a
// failure. The units under it: rounds.h (the protocol over the store, Note [lockstep-run
// rounds]), processes.h (spawning, signals, reaping), verdict.h (who is to blame, Note [Root
// cause]).

#include "options.h"

namespace lockstep {
namespace run {

/// Runs the job; returns the launcher's exit code: 0 when every worker of every node exited 0;
/// otherwise, after the last attempt, the root cause's code (Note [Root cause]): its exit code,
/// or 128 + the signal that killed or stopped it (147 for a worker stopped by SIGSTOP whose
/// peers then timed out); 128 + signal when the launcher was told to stop by
/// SIGINT/SIGTERM/SIGHUP; kExitLauncherError when the store could not be hosted or reached.
/// Any worker that failed fails the job, whatever the order of the exits: a worker that exited
/// 0 while its peers still ran is flagged in the summary, not counted as a success.
int run_agent(const RunOptions& options, const EnvMap& env, int cpu_count);

/// Prints what run_agent would start (topology and every local worker's added variables).
void print_plan(const RunOptions& options, const EnvMap& env, int cpu_count);

}  // namespace run
}  // namespace lockstep
