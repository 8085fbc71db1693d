#pragma once
// The DDP Chrome trace (LOCKSTEP_TRACE / DDPOptions::trace_path). Internal.

#include <chrono>
#include <string>
#include <vector>

namespace lockstep {
namespace ddp {

// Collects events in memory (bounded) and writes the Trace Event Format: one process per rank,
// track 0 for forward/backward, track 1 + b for bucket b.
class Trace {
 public:
  using Clock = std::chrono::steady_clock;
  Trace(std::string path, int rank) : path_(std::move(path)), rank_(rank), origin_(Clock::now()) {}

  /// A complete event on `track` from `begin` to `end`; `args_json` may be empty.
  void span(int track, const std::string& name, Clock::time_point begin, Clock::time_point end,
            const std::string& args_json);
  /// An instant event on `track`.
  void instant(int track, const std::string& name, Clock::time_point at);
  /// Writes the Trace Event Format file (logs a warning when it cannot).
  void write();

 private:
  static constexpr size_t kMaxEvents = 1000000;
  double us(Clock::time_point t) const {
    return std::chrono::duration<double, std::micro>(t - origin_).count();
  }
  std::string path_;
  int rank_;
  Clock::time_point origin_;
  int max_track_ = 0;
  std::vector<std::string> events_;
};

}  // namespace ddp
}  // namespace lockstep
