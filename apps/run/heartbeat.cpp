// Heartbeats between launchers (see heartbeat.h, Note [Launcher heartbeats]).
#include "heartbeat.h"

#include <algorithm>

namespace lockstep {
namespace run {

HeartbeatWatch::HeartbeatWatch(int nnodes, int self, double timeout, double start)
    : self_(self), timeout_(timeout), seen_(static_cast<size_t>(std::max(0, nnodes))) {
  for (auto& s : seen_) s.changed = start;
}

void HeartbeatWatch::leave_out(int node) {
  if (node >= 0 && node < static_cast<int>(seen_.size())) seen_[static_cast<size_t>(node)].watched = false;
}

void HeartbeatWatch::observe(int node, int64_t beats, double now) {
  if (node < 0 || node >= static_cast<int>(seen_.size()) || node == self_) return;
  Seen& s = seen_[static_cast<size_t>(node)];
  if (beats != s.beats) {
    s.beats = beats;
    s.changed = now;
  }
}

std::optional<Silence> HeartbeatWatch::hung(double now) const {
  std::optional<Silence> worst;
  for (int k = 0; k < static_cast<int>(seen_.size()); ++k) {
    if (k == self_ || !seen_[static_cast<size_t>(k)].watched) continue;
    const double silent = now - seen_[static_cast<size_t>(k)].changed;
    if (silent > timeout_ && (!worst || silent > worst->seconds)) worst = Silence{k, silent};
  }
  return worst;
}

double heartbeat_interval(double timeout, double monitor_interval) {
  return std::max(timeout / 5, monitor_interval);
}

}  // namespace run
}  // namespace lockstep
