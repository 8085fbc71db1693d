#pragma once
/// \file
/// What lockstep-bench reads from /proc about this process and the machine. Linux only.

#include <string>
#include <utility>

namespace lockstep {
namespace bench {

/// The whole file at `path` ("" when it cannot be read).
std::string read_text_file(const std::string& path);

/// Peak resident set size of this process (VmHWM), kB.
long vm_hwm_kb();

/// Resident (Rss) and proportional (Pss: shared pages divided among the processes mapping
/// them, so a shared-memory bucket counts once across ranks) set sizes in kB, now, after
/// handing freed heap memory back (malloc_trim), so that they are live memory rather than
/// what the allocator keeps cached. Outside timed code only. {-1, -1} when unreadable.
std::pair<long, long> rss_pss_kb();

/// The 1, 5 and 15 minute load averages, "0.52 0.40 0.31".
std::string load_average();

/// CPU time (user + system) this process used so far, every thread, seconds.
double process_cpu_seconds();

/// CPU time every process on the machine used so far (user + nice + system + steal from
/// /proc/stat; interrupts left out, since loopback traffic is accounted there), seconds.
double machine_busy_seconds();

/// Path of this executable.
std::string self_exe();

}  // namespace bench
}  // namespace lockstep
