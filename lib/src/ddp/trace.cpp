// The DDP Chrome trace (see trace.h).
#include "ddp/trace.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "lockstep/errors.h"
#include "lockstep/log.h"

namespace lockstep {
namespace ddp {

using detail::concat;

void Trace::span(int track, const std::string& name, Clock::time_point begin,
                 Clock::time_point end, const std::string& args_json) {
  if (events_.size() >= kMaxEvents) return;
  max_track_ = std::max(max_track_, track);
  std::ostringstream os;
  os << "{\"name\":\"" << name << "\",\"ph\":\"X\",\"pid\":" << rank_ << ",\"tid\":" << track
     << ",\"ts\":" << us(begin) << ",\"dur\":" << std::max(0.0, us(end) - us(begin));
  if (!args_json.empty()) os << ",\"args\":" << args_json;
  os << "}";
  events_.push_back(os.str());
}

void Trace::instant(int track, const std::string& name, Clock::time_point at) {
  if (events_.size() >= kMaxEvents) return;
  max_track_ = std::max(max_track_, track);
  std::ostringstream os;
  os << "{\"name\":\"" << name << "\",\"ph\":\"i\",\"s\":\"t\",\"pid\":" << rank_
     << ",\"tid\":" << track << ",\"ts\":" << us(at) << "}";
  events_.push_back(os.str());
}

void Trace::write() {
  std::ofstream out(path_, std::ios::trunc);
  if (!out) {
    log_warn(concat("could not write the DDP trace to ", path_));
    return;
  }
  out << "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n";
  out << "{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":" << rank_
      << ",\"args\":{\"name\":\"rank " << rank_ << "\"}}";
  for (int t = 0; t <= max_track_; ++t) {
    out << ",\n{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":" << rank_ << ",\"tid\":" << t
        << ",\"args\":{\"name\":\"" << (t == 0 ? std::string("step") : concat("bucket ", t - 1))
        << "\"}}";
  }
  for (const auto& e : events_) out << ",\n" << e;
  out << "\n]}\n";
}

}  // namespace ddp
}  // namespace lockstep
