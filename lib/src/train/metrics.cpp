// Progress lines, JSON-lines metrics and the HTML/SVG report. No LibTorch headers here.
#include "lockstep/train/metrics.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "lockstep/env_vars.h"
#include "lockstep/errors.h"
#include "lockstep/launch_env.h"

namespace lockstep {
namespace train {

using detail::concat;
using nlohmann::json;

namespace {

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  auto s = static_cast<long>(seconds + 0.5);
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof(buf), "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  } else {
    std::snprintf(buf, sizeof(buf), "%ld:%02ld", s / 60, s % 60);
  }
  return buf;
}

// Replaces `path` with `text`: a temporary file next to it, then rename, so that a reader or a
// crash sees the old file or the new one, never half of one. `what` names the file in errors.
void replace_file(const std::string& path, const std::string& text, const std::string& what) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      throw Error(concat("could not write ", what, " '", tmp, "'; check that its directory is "
                         "writable and has space"));
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error(concat("could not rename '", tmp, "' to '", path, "'"));
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Progress

Progress::Progress(ProgressOptions options) : options_(std::move(options)) {
  const bool main = options_.rank() < 0 ? is_main_process() : options_.rank() == 0;
  enabled_ = main || options_.all_ranks();
  bool tty = options_.tty() == 1;
  if (options_.tty() == -1) {
    const char* told = std::getenv(env::kStdoutTty);  // the launcher's stdout, not our pipe's
    tty = (told != nullptr && *told != '\0') ? std::string(told) == "1" : ::isatty(STDOUT_FILENO);
  }
  bar_ = main && tty;
  start_ = last_print_ = std::chrono::steady_clock::now();
}

void Progress::update(int64_t step, int64_t samples, double loss) {
  if (!enabled_) return;
  if (first_step_ < 0) first_step_ = step - 1;
  samples_ += samples;
  ++steps_in_window_;
  last_step_ = step;
  last_loss_ = loss;
  dirty_ = true;
  auto now = std::chrono::steady_clock::now();
  double since = std::chrono::duration<double>(now - last_print_).count();
  double every = bar_ ? 0.2 : options_.every_seconds();
  bool last = options_.total_steps() > 0 && step >= options_.total_steps();
  if (since >= every || last) print(step, loss, last);
}

void Progress::print(int64_t step, double loss, bool final_line) {
  auto now = std::chrono::steady_clock::now();
  double elapsed = std::chrono::duration<double>(now - start_).count();
  double rate = elapsed > 0 ? samples_ / elapsed : 0.0;
  double steps_per_s = elapsed > 0 ? (step - first_step_) / elapsed : 0.0;
  const int64_t total = options_.total_steps();
  double eta = (total > 0 && steps_per_s > 0) ? (total - step) / steps_per_s : -1;
  char stats[160];
  std::snprintf(stats, sizeof(stats), "loss %.4f | %.0f samples/s | elapsed %s | ETA %s", loss,
                rate, format_duration(elapsed).c_str(),
                total > 0 ? format_duration(eta).c_str() : "?");
  if (bar_) {
    const int width = 28;
    int filled = total > 0 ? static_cast<int>(width * std::min<double>(1.0, double(step) / total)) : 0;
    std::string bar(filled, '#');
    bar += std::string(width - filled, '.');
    std::printf("\r%s [%s] %lld/%lld %s\033[K", options_.label().c_str(), bar.c_str(),
                static_cast<long long>(step), static_cast<long long>(total), stats);
    line_open_ = !final_line;
    if (final_line) std::printf("\n");
  } else {
    if (total > 0) {
      std::printf("%s step %lld/%lld (%.1f%%) %s\n", options_.label().c_str(),
                  static_cast<long long>(step), static_cast<long long>(total),
                  100.0 * step / total, stats);
    } else {
      std::printf("%s step %lld %s\n", options_.label().c_str(), static_cast<long long>(step),
                  stats);
    }
  }
  std::fflush(stdout);
  last_print_ = now;
  dirty_ = false;
}

void Progress::finish() {
  if (!enabled_) return;
  if (dirty_) print(last_step_, last_loss_, /*final_line=*/false);
  if (bar_ && line_open_) {
    std::printf("\n");
    std::fflush(stdout);
  }
  line_open_ = false;
  dirty_ = false;
}

// ---------------------------------------------------------------------------------------------
// Metrics

namespace {

// The largest "time" of the records in the JSON-lines file at `path`: where a resumed run's
// clock continues (0 for a missing file or one without times; lines that are not JSON objects,
// such as one torn by a crash, are skipped).
double last_time(const std::string& path) {
  std::ifstream in(path);
  double last = 0;
  std::string line;
  while (std::getline(in, line)) {
    json j = json::parse(line, /*cb=*/nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("time") && j["time"].is_number()) {
      last = std::max(last, j["time"].get<double>());
    }
  }
  return last;
}

}  // namespace

MetricsWriter::MetricsWriter(MetricsOptions options)
    : path_(options.path()), start_(std::chrono::steady_clock::now()) {
  if (!options.tensorboard_dir().empty()) {
    tensorboard_ = std::make_unique<TensorBoardWriter>(options.tensorboard_dir(),
                                                       options.tensorboard_purge_step());
  }
  if (path_.empty()) return;
  if (options.append()) time_offset_ = last_time(path_);
  out_ = std::make_unique<std::ofstream>(path_, options.append() ? std::ios::app : std::ios::trunc);
  if (!*out_) {
    throw Error(concat("could not open metrics file '", path_, "' for writing; check that its "
                       "directory exists and is writable"));
  }
}

MetricsWriter::~MetricsWriter() = default;

void MetricsWriter::write(const MetricRecord& record) {
  if (tensorboard_ && record.kind != "bucket") {
    // The step: the record's "step", else its "epoch", else the count of its kind so far.
    const char* step_field = nullptr;
    int64_t step = records_of_kind_[record.kind]++;
    for (const char* name : {"epoch", "step"}) {
      for (const auto& kv : record.fields) {
        if (kv.first == name && std::isfinite(kv.second)) {
          step_field = name;
          step = static_cast<int64_t>(std::llround(kv.second));
        }
      }
    }
    std::vector<std::pair<std::string, double>> scalars;
    for (const auto& kv : record.fields) {
      if (step_field == nullptr || kv.first != step_field) {
        scalars.emplace_back(record.kind + "/" + kv.first, kv.second);
      }
    }
    tensorboard_->add_scalars(step, scalars);
  }
  if (!out_) return;
  json j;
  j["kind"] = record.kind;
  j["time"] = time_offset_ +
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  for (const auto& kv : record.fields) {
    j[kv.first] = std::isfinite(kv.second) ? json(kv.second) : json(nullptr);
  }
  *out_ << j.dump() << '\n';
  out_->flush();
  if (!*out_) throw Error(concat("writing metrics file '", path_, "' failed"));
}

size_t rewind_metrics(const std::string& path, int64_t step, int64_t epochs_done) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return 0;  // no metrics yet: nothing to rewind
  if (!S_ISREG(st.st_mode)) {
    throw Error(concat("expected a metrics file at '", path, "', but it is not a regular file; "
                       "move it away or choose another --out-dir"));
  }
  std::ifstream in(path);
  if (!in) throw Error(concat("could not read metrics file '", path, "' to rewind it to step ",
                              step, "; check its permissions"));
  std::string kept, line;
  size_t dropped = 0;
  while (std::getline(in, line)) {
    json j = json::parse(line, /*cb=*/nullptr, /*allow_exceptions=*/false);
    bool keep = j.is_object();
    if (keep && j.contains("step") && j["step"].is_number()) {
      keep = j["step"].get<double>() <= static_cast<double>(step);
    } else if (keep && j.contains("epoch") && j["epoch"].is_number()) {
      keep = j["epoch"].get<double>() <= static_cast<double>(epochs_done);
    }
    if (keep) {
      kept += line + "\n";
    } else {
      ++dropped;
    }
  }
  if (in.bad()) throw Error(concat("reading metrics file '", path, "' failed"));
  if (dropped > 0) replace_file(path, kept, "metrics file");
  return dropped;
}

// ---------------------------------------------------------------------------------------------
// Report

namespace {

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string num(double v) {
  char buf[32];
  if (v != 0 && (std::fabs(v) >= 1e5 || std::fabs(v) < 1e-3)) {
    std::snprintf(buf, sizeof(buf), "%.3g", v);
  } else {
    std::snprintf(buf, sizeof(buf), "%.4g", v);
  }
  return buf;
}

struct Series {
  std::vector<double> x, y;
};

// One line chart, 640x260, with axes, 5 ticks each and the last value in the title.
std::string line_chart(const std::string& title, const std::string& xlabel,
                       const std::vector<std::pair<std::string, Series>>& lines) {
  const double W = 640, H = 260, L = 64, R = 16, T = 28, B = 40;
  double xmin = std::numeric_limits<double>::infinity(), xmax = -xmin, ymin = xmin, ymax = -xmin;
  for (const auto& l : lines) {
    for (size_t i = 0; i < l.second.x.size(); ++i) {
      xmin = std::min(xmin, l.second.x[i]);
      xmax = std::max(xmax, l.second.x[i]);
      ymin = std::min(ymin, l.second.y[i]);
      ymax = std::max(ymax, l.second.y[i]);
    }
  }
  if (!std::isfinite(xmin)) return "";
  if (xmax == xmin) xmax = xmin + 1;
  if (ymax == ymin) {
    ymax += 0.5 * (std::fabs(ymax) + 1e-9);
    ymin -= 0.5 * (std::fabs(ymin) + 1e-9);
  }
  auto px = [&](double x) { return L + (x - xmin) / (xmax - xmin) * (W - L - R); };
  auto py = [&](double y) { return T + (ymax - y) / (ymax - ymin) * (H - T - B); };
  static const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                 "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  std::ostringstream os;
  os << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H
     << "' viewBox='0 0 " << W << " " << H << "'>";
  os << "<rect width='100%' height='100%' fill='white' stroke='#ccc'/>";
  os << "<text x='" << L << "' y='18' font-size='14' font-weight='bold'>" << html_escape(title)
     << "</text>";
  for (int i = 0; i <= 4; ++i) {
    double yv = ymin + (ymax - ymin) * i / 4, xv = xmin + (xmax - xmin) * i / 4;
    os << "<line x1='" << L << "' x2='" << W - R << "' y1='" << py(yv) << "' y2='" << py(yv)
       << "' stroke='#eee'/>";
    os << "<text x='" << L - 4 << "' y='" << py(yv) + 4
       << "' font-size='10' text-anchor='end'>" << num(yv) << "</text>";
    os << "<text x='" << px(xv) << "' y='" << H - B + 14
       << "' font-size='10' text-anchor='middle'>" << num(xv) << "</text>";
  }
  os << "<text x='" << (L + W - R) / 2 << "' y='" << H - 8
     << "' font-size='11' text-anchor='middle'>" << html_escape(xlabel) << "</text>";
  os << "<rect x='" << L << "' y='" << T << "' width='" << W - L - R << "' height='"
     << H - T - B << "' fill='none' stroke='#888'/>";
  int c = 0;
  double legend_x = W - R - 8;
  for (const auto& l : lines) {
    const char* color = colors[c++ % 10];
    if (l.second.x.empty()) {  // keeps its colour slot (overlays: a run without this field)
      os << "<text x='" << legend_x << "' y='" << T + 14 * c << "' font-size='11' fill='" << color
         << "' text-anchor='end'>" << html_escape(l.first) << " (no data)</text>";
      continue;
    }
    os << "<polyline fill='none' stroke='" << color << "' stroke-width='1.5' points='";
    for (size_t i = 0; i < l.second.x.size(); ++i) {
      os << px(l.second.x[i]) << "," << py(l.second.y[i]) << " ";
    }
    os << "'/>";
    if (l.second.x.size() <= 60) {
      for (size_t i = 0; i < l.second.x.size(); ++i) {
        os << "<circle cx='" << px(l.second.x[i]) << "' cy='" << py(l.second.y[i])
           << "' r='2.5' fill='" << color << "'/>";
      }
    }
    os << "<text x='" << legend_x << "' y='" << T + 14 * c << "' font-size='11' fill='" << color
       << "' text-anchor='end'>" << html_escape(l.first) << " (last "
       << num(l.second.y.empty() ? 0 : l.second.y.back()) << ")</text>";
  }
  os << "</svg>";
  return os.str();
}

Series series_of(const std::vector<json>& records, const std::string& xkey, const std::string& field);

// Note [Bucket lanes]
// The DDP timeline draws, for each of the last few steps with "bucket" records, a group of
// lanes on one time axis that starts at the step's first gradient hook: "backward" (compute
// from 0 to backward_compute_ms of the step's "ddp" record, then the wait for communication,
// exposed_comm_ms, in red), and one lane per bucket with its reduction from start_ms to end_ms
// (a tick at ready_ms). A reduction's part before backward compute ended is hidden behind it
// (green); its part after is exposed (orange). A step without a "ddp" record shows its buckets
// only. Every group shares the axis, so steps compare directly.
std::string bucket_timeline(const std::vector<json>& buckets, const std::vector<json>* ddp) {
  std::set<double> steps;
  for (const auto& r : buckets) steps.insert(r.value("step", 0.0));
  std::vector<double> shown;
  for (auto it = steps.rbegin(); it != steps.rend() && shown.size() < 3; ++it) shown.insert(shown.begin(), *it);
  struct Phase {
    double compute = -1, exposed = 0;
  };
  std::map<double, Phase> phases;
  if (ddp != nullptr) {
    for (const auto& r : *ddp) {
      if (!r.contains("backward_compute_ms") || !r["backward_compute_ms"].is_number()) continue;
      phases[r.value("step", 0.0)] = {r["backward_compute_ms"].get<double>(),
                                      r.value("exposed_comm_ms", 0.0)};
    }
  }
  std::map<double, std::vector<const json*>> of_step;  // in bucket order
  double t1 = 0;
  for (const auto& r : buckets) {
    double step = r.value("step", 0.0);
    if (std::find(shown.begin(), shown.end(), step) == shown.end()) continue;
    of_step[step].push_back(&r);
    t1 = std::max(t1, r.value("end_ms", 0.0));
  }
  for (double step : shown) {
    auto p = phases.find(step);
    if (p != phases.end()) t1 = std::max(t1, p->second.compute + std::max(0.0, p->second.exposed));
  }
  if (shown.empty()) return "";
  if (t1 <= 0) t1 = 1;
  for (auto& kv : of_step) {
    std::stable_sort(kv.second.begin(), kv.second.end(), [](const json* a, const json* b) {
      return a->value("bucket", 0.0) < b->value("bucket", 0.0);
    });
  }
  const double W = 640, L = 88, R = 16, T = 28, row = 14, gap = 16;
  double lanes = 0;
  for (double step : shown) lanes += 1 + of_step[step].size();
  const double H = T + row * lanes + gap * shown.size() + 42;
  auto px = [&](double ms) { return L + std::max(0.0, ms) / t1 * (W - L - R); };
  auto bar = [&](std::ostream& os, const char* cls, const char* color, double y, double from,
                 double to, const std::string& tip) {
    const double w = std::max(1.0, px(to) - px(from));
    os << "<rect class='" << cls << "' x='" << px(from) << "' y='" << y + 2 << "' width='" << w
       << "' height='" << row - 4 << "' fill='" << color << "'><title>" << html_escape(tip)
       << "</title></rect>";
  };
  std::ostringstream os;
  os << "<svg class='bucket-timeline' xmlns='http://www.w3.org/2000/svg' width='" << W
     << "' height='" << H << "' viewBox='0 0 " << W << " " << H << "'>";
  os << "<rect width='100%' height='100%' fill='white' stroke='#ccc'/>";
  os << "<text x='8' y='18' font-size='14' font-weight='bold'>DDP bucket all-reduce "
        "timeline against backward compute (last "
     << shown.size() << " steps)</text>";
  for (int i = 0; i <= 4; ++i) {
    const double x = px(t1 * i / 4);
    os << "<line x1='" << x << "' x2='" << x << "' y1='" << T << "' y2='" << H - 38
       << "' stroke='#eee'/><text x='" << x << "' y='" << H - 24 << "' font-size='10' text-anchor='"
       << (i == 4 ? "end" : "middle") << "'>" << num(t1 * i / 4) << " ms</text>";
  }
  double y = T;
  for (double step : shown) {
    os << "<g class='lane' data-step='" << num(step) << "'>";
    os << "<text x='4' y='" << y + 11 << "' font-size='10' font-weight='bold'>step " << num(step)
       << "</text>";
    y += gap;
    auto p = phases.find(step);
    const double compute = p == phases.end() ? -1 : p->second.compute;
    os << "<text x='" << L - 4 << "' y='" << y + 10
       << "' font-size='10' text-anchor='end'>backward</text>";
    if (compute >= 0) {
      bar(os, "compute", "#1f77b4", y, 0, compute, concat("step ", num(step), ": backward compute ", num(compute), " ms"));
      if (p->second.exposed > 0) {
        bar(os, "exposed", "#d62728", y, compute, compute + p->second.exposed,
            concat("step ", num(step), ": waited ", num(p->second.exposed), " ms for communication (exposed)"));
      }
    }
    y += row;
    for (const json* r : of_step[step]) {
      const double s = r->value("start_ms", 0.0), e = r->value("end_ms", 0.0);
      const int b = static_cast<int>(r->value("bucket", 0.0));
      os << "<text x='" << L - 4 << "' y='" << y + 10 << "' font-size='10' text-anchor='end'>bucket "
         << b << "</text>";
      const std::string what = concat("step ", num(step), " bucket ", b, ": ", num(s), " to ", num(e), " ms");
      if (compute < 0 || e <= compute) {
        bar(os, "bucket hidden", "#2ca02c", y, s, e, what);
      } else if (s >= compute) {
        bar(os, "bucket exposed", "#ff7f0e", y, s, e, concat(what, ", after backward compute"));
      } else {
        bar(os, "bucket hidden", "#2ca02c", y, s, compute, concat(what, ", overlapped until ", num(compute), " ms"));
        bar(os, "bucket exposed", "#ff7f0e", y, compute, e, concat(what, ", exposed after ", num(compute), " ms"));
      }
      if (r->contains("ready_ms") && (*r)["ready_ms"].is_number()) {
        const double x = px((*r)["ready_ms"].get<double>());
        os << "<line class='ready' x1='" << x << "' x2='" << x << "' y1='" << y << "' y2='" << y + row
           << "' stroke='#555'/>";
      }
      y += row;
    }
    if (compute >= 0) {
      os << "<line x1='" << px(compute) << "' x2='" << px(compute) << "' y1='" << y - row * (1 + of_step[step].size())
         << "' y2='" << y << "' stroke='#1f77b4' stroke-dasharray='3,2'/>";
    }
    os << "</g>";
  }
  os << "<text x='" << L << "' y='" << H - 8 << "' font-size='10'>"
        "<tspan fill='#1f77b4'>backward compute</tspan> | <tspan fill='#d62728'>waiting for "
        "communication</tspan> | <tspan fill='#2ca02c'>reduction hidden behind compute</tspan> | "
        "<tspan fill='#ff7f0e'>reduction exposed</tspan></text>";
  os << "</svg>";
  return os.str();
}

// The chart of "rank_throughput" records: one line per field "rank<r>", in rank order.
std::string rank_throughput_chart(const std::vector<json>& records) {
  std::map<long, std::string> fields;
  for (const auto& r : records) {
    for (const auto& kv : r.items()) {
      const std::string& k = kv.key();
      if (k.size() > 4 && k.compare(0, 4, "rank") == 0 && kv.value().is_number() &&
          k.find_first_not_of("0123456789", 4) == std::string::npos) {
        fields.emplace(std::stol(k.substr(4)), k);
      }
    }
  }
  std::vector<std::pair<std::string, Series>> lines;
  for (const auto& f : fields) {
    lines.emplace_back(concat("rank ", f.first), series_of(records, "step", f.second));
  }
  if (lines.empty()) return "";
  return line_chart("throughput per rank (samples/s)", "step", lines);
}

// The records of a metrics.jsonl file by kind.
std::map<std::string, std::vector<json>> read_metrics(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error(concat("cannot read metrics file '", path, "'"));
  std::map<std::string, std::vector<json>> by_kind;
  std::string line;
  size_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.empty()) continue;
    try {
      json j = json::parse(line);
      by_kind[j.value("kind", std::string("?"))].push_back(std::move(j));
    } catch (const std::exception& e) {
      throw Error(concat("metrics file '", path, "' line ", lineno, " is not JSON: ", e.what()));
    }
  }
  return by_kind;
}

// field -> (x of `xkey`, y) of the numeric values of `field` in `records`.
Series series_of(const std::vector<json>& records, const std::string& xkey, const std::string& field) {
  Series s;
  for (const auto& r : records) {
    if (r.contains(field) && r[field].is_number() && r.contains(xkey) && r[xkey].is_number()) {
      s.x.push_back(r[xkey].get<double>());
      s.y.push_back(r[field].get<double>());
    }
  }
  return s;
}

const char* const kPageStyle =
    "<style>body{font-family:sans-serif;margin:24px;max-width:1340px}"
    "svg{margin:6px}table{border-collapse:collapse}td{border:1px solid #ccc;padding:3px "
    "8px}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}</style>";

}  // namespace

void write_overlay_report(const OverlayOptions& options) {
  LOCKSTEP_CHECK(!options.runs().empty() && !options.output_path().empty(),
                 "write_overlay_report needs at least one run and an output_path");
  std::vector<std::map<std::string, std::vector<json>>> runs;
  for (const auto& run : options.runs()) runs.push_back(read_metrics(run.metrics_path));
  std::ostringstream html;
  html << "<!DOCTYPE html><html><head><meta charset='utf-8'><title>" << html_escape(options.title())
       << "</title>" << kPageStyle << "</head><body><h1>" << html_escape(options.title()) << "</h1>";
  html << "<table class='runs'>";
  for (const auto& run : options.runs()) {
    html << "<tr><td>" << html_escape(run.label) << "</td><td>" << html_escape(run.metrics_path)
         << "</td></tr>";
  }
  html << "</table>";
  size_t charts = 0;
  for (const char* kind : {"epoch", "step"}) {
    // The loss fields any run has, in first-seen order.
    std::vector<std::string> fields;
    for (const auto& by_kind : runs) {
      auto it = by_kind.find(kind);
      if (it == by_kind.end()) continue;
      for (const auto& r : it->second) {
        for (const auto& kv : r.items()) {
          if (kv.key().find("loss") == std::string::npos || !kv.value().is_number()) continue;
          if (std::find(fields.begin(), fields.end(), kv.key()) == fields.end()) fields.push_back(kv.key());
        }
      }
    }
    if (fields.empty()) continue;
    html << "<h2>per " << kind << "</h2><div>";
    for (const auto& f : fields) {
      std::vector<std::pair<std::string, Series>> lines;
      for (size_t i = 0; i < runs.size(); ++i) {
        auto it = runs[i].find(kind);
        Series s = it == runs[i].end() ? Series() : series_of(it->second, kind, f);
        // Every run keeps its slot, so its colour is the same in every chart.
        lines.emplace_back(options.runs()[i].label, std::move(s));
      }
      html << line_chart(concat(f, " by run"), kind, lines);
      ++charts;
    }
    html << "</div>";
  }
  if (charts == 0) html << "<p><i>None of these runs recorded a loss.</i></p>";
  html << "</body></html>\n";
  replace_file(options.output_path(), html.str(), "overlay report");
}

void write_report(const ReportOptions& options) {
  LOCKSTEP_CHECK(!options.metrics_path().empty() && !options.output_path().empty(),
                 "write_report needs metrics_path and output_path");
  auto by_kind = read_metrics(options.metrics_path());
  std::ostringstream html;
  html << "<!DOCTYPE html><html><head><meta charset='utf-8'>";
  if (options.live()) html << "<meta http-equiv=\"refresh\" content=\"10\">";
  html << "<title>"
       << html_escape(options.title())
       << "</title>" << kPageStyle << "</head><body>";
  html << "<h1>" << html_escape(options.title()) << "</h1>";
  if (options.live()) {
    html << "<p class='live'><b>Run in progress</b>: this page reloads every 10 s.</p>";
  }
  // A two-column table of (name, value) rows after `open` (the summary, the settings).
  auto key_value_table = [&html](const std::string& open, const auto& rows) {
    html << open;
    for (const auto& kv : rows) {
      html << "<tr><td>" << html_escape(kv.first) << "</td><td>" << html_escape(kv.second)
           << "</td></tr>";
    }
    html << "</table>";
  };
  if (!options.summary().empty()) key_value_table("<table>", options.summary());
  if (!options.command().empty()) {
    html << "<h2>Command</h2><pre class='command'>" << html_escape(options.command()) << "</pre>";
  }
  if (!options.settings().empty()) {
    key_value_table("<h2>Settings</h2><table class='settings'>", options.settings());
  }
  if (!options.preformatted().empty()) {
    html << "<pre>" << html_escape(options.preformatted()) << "</pre>";
  }
  for (const char* kind : {"epoch", "step"}) {
    auto it = by_kind.find(kind);
    if (it == by_kind.end()) continue;
    const std::string xkey = kind;
    std::vector<std::string> fields;
    for (const auto& r : it->second) {
      for (const auto& kv : r.items()) {
        if (kv.key() == "kind" || kv.key() == "time" || kv.key() == xkey) continue;
        if (kv.key() == "epoch" && xkey == "step") continue;
        if (!kv.value().is_number()) continue;
        if (std::find(fields.begin(), fields.end(), kv.key()) == fields.end()) fields.push_back(kv.key());
      }
    }
    html << "<h2>per " << kind << "</h2><div>";
    // Losses share one chart; everything else gets its own.
    std::vector<std::pair<std::string, Series>> losses;
    for (const auto& f : fields) {
      Series s = series_of(it->second, xkey, f);
      if (f.find("loss") != std::string::npos) {
        losses.emplace_back(f, std::move(s));
      } else if (f.size() > 6 && f.compare(f.size() - 6, 6, "_per_s") == 0) {
        html << line_chart(concat("throughput (", f, ")"), kind, {{f, std::move(s)}});
      } else {
        html << line_chart(f, kind, {{f, std::move(s)}});
      }
    }
    if (!losses.empty()) html << line_chart("loss", kind, losses);
    html << "</div>";
  }
  auto ranks = by_kind.find("rank_throughput");
  if (ranks != by_kind.end()) {
    const std::string chart = rank_throughput_chart(ranks->second);
    if (!chart.empty()) html << "<h2>Throughput per rank</h2><div>" << chart << "</div>";
  }
  auto ddp = by_kind.find("ddp");
  if (ddp != by_kind.end()) {
    // One line per logged phase of the step, so exposed communication reads against the rest.
    std::vector<std::pair<std::string, Series>> times;
    for (const char* f : {"forward_ms", "backward_compute_ms", "comm_ms", "exposed_comm_ms"}) {
      Series s = series_of(ddp->second, "step", f);
      if (!s.x.empty()) times.emplace_back(f, std::move(s));
    }
    if (!times.empty()) {
      html << "<h2>DDP time per step</h2><div>"
           << line_chart("DDP time per step (ms)", "step", times) << "</div>";
    }
  }
  auto buckets = by_kind.find("bucket");
  if (buckets != by_kind.end()) {
    html << "<h2>DDP communication</h2>"
         << bucket_timeline(buckets->second, ddp == by_kind.end() ? nullptr : &ddp->second);
  } else {
    html << "<p><i>No DDP bucket statistics were recorded (single rank, or the run did not "
            "log them).</i></p>";
  }
  html << "<p style='color:#888'>metrics: " << html_escape(options.metrics_path())
       << "</p></body></html>\n";

  replace_file(options.output_path(), html.str(), "report");
}

}  // namespace train
}  // namespace lockstep
