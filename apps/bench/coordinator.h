#pragma once
/// \file
/// lockstep-bench's coordinator: runs every scenario of every model in worker processes,
/// interleaved, and gathers what they report into one JSON document.
///
/// Note [How lockstep-bench runs scenarios]
/// The invocation a user types is the *coordinator*. For every (model, repeat, scenario) it
/// forks and execs itself (`--worker`) once per rank with RANK / WORLD_SIZE / MASTER_ADDR /
/// MASTER_PORT set for loopback and a port the kernel just handed out, or /usr/bin/python3
/// with apps/bench/torch_ddp_bench.py for PyTorch's DDP. So every scenario runs in processes
/// of its own: nothing one leaves behind (OpenBLAS's helper threads polling after a
/// multi-threaded GEMM, OpenMP's spinning workers, the allocator's state) slows the next.
/// Each worker gets the thread environment a user would give it (OMP_NUM_THREADS, see
/// scenarios.cpp), warms up, synchronises, times every step, measures one all-reduce of all
/// its gradients, and writes a JSON result (per-step milliseconds, VmHWM, CPU times) into a
/// private temp folder. The scenarios of one model run round-robin, in reverse order every
/// other repeat (A B C, C B A, A B C ...), so that a burst of noise and any drift of the
/// machine hit every scenario alike; the step times of all repeats are pooled for the median
/// and the spread (p10/p90). A worker that fails or hangs is killed (by its pid) after
/// --worker-timeout, and its run is reported as failed with its log tail; the others still
/// run.
///
/// Note [Disturbed runs]
/// On a machine with few cores, another process that takes a core for a while changes a
/// scenario's step time by far more than anything measured here, and not alike for every
/// scenario: the intra-op reference of the DataParallel comparison, whose threads meet at
/// every operator and spin while they wait, slowed down 5-20x when another process held one
/// of two cores, DataParallel about 2x. So every worker reports the CPU time it used during
/// its timed steps and the CPU time the whole machine used meanwhile (/proc/stat, without
/// interrupt time, which loopback traffic lands in). What the machine used beyond all ranks
/// of the run, per second of rank 0's timed steps, is "others" (in cores). A run with others
/// above --disturbance-cpus (0.1) is rerun up to --retries times (2); one that stays disturbed
/// is left out of the medians (and counted), unless --keep-disturbed. A scenario whose every
/// run was left out has status "disturbed". /proc/stat counts in ticks of 10 ms per CPU, so
/// the timed steps of a run shorter than kMinJudgedSeconds say nothing about others at the
/// 0.1-core level: such a run is not judged (it counts, and has no "others" entry).

#include <nlohmann/json.hpp>
#include <string>

#include "options.h"

namespace lockstep {
namespace bench {

/// Timed steps shorter than this (seconds) are not judged (Note [Disturbed runs]).
constexpr double kMinJudgedSeconds = 0.5;

/// What to do with one run after measuring its disturbance (Note [Disturbed runs]).
enum class RunVerdict {
  kAccept,         ///< undisturbed: its steps count
  kRerun,          ///< disturbed, and attempts are left: run it again
  kLeaveOut,       ///< disturbed on the last attempt: its steps do not count
  kKeepDisturbed,  ///< disturbed on the last attempt, counted anyway (--keep-disturbed)
};

/// The verdict on attempt `attempt` (0-based) of a run during which other processes used
/// `others_cpus` cores, given --disturbance-cpus `limit`, --retries `retries` and
/// --keep-disturbed `keep`. Pure.
RunVerdict judge_run(double others_cpus, double limit, int attempt, int retries, bool keep);

/// Other processes' CPU use (cores) during a run: the machine's busy seconds during rank 0's
/// timed steps less what all ranks used, per second of them, at least 0; NaN (not judged)
/// when the steps took less than kMinJudgedSeconds.
double others_cpus(double machine_busy_s, double ranks_cpu_s, double wall_s);

/// Runs the benchmark `options` describes (Note [How lockstep-bench runs scenarios]) and
/// returns the JSON document that report.h renders and --json writes. Progress goes to
/// stderr. Throws lockstep::Error when it cannot create its temp folder.
nlohmann::json run_benchmark(const BenchOptions& options);

}  // namespace bench
}  // namespace lockstep
