// lockstep-bench's report (see report.h).
#include "report.h"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <iomanip>
#include <sstream>
#include <vector>

#include "options.h"
#include "stats.h"

namespace lockstep {
namespace bench {
namespace {

using json = nlohmann::json;
using Table = std::vector<std::vector<std::string>>;

// A note on one line (a log tail may hold a stack trace), at most 300 characters.
std::string one_line(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\n' || c == '\r') c = ' ';
    if (c == ' ' && !out.empty() && out.back() == ' ') continue;
    out += c;
  }
  return out.size() > 300 ? out.substr(0, 300) + " [...]" : out;
}

std::string pct(double v) { return fixed(100.0 * v, 1) + "%"; }

std::string human_bytes(int64_t b) {
  if (b >= (1 << 20)) return std::to_string(b >> 20) + " MiB";
  if (b >= 1024) return std::to_string(b >> 10) + " KiB";
  return std::to_string(b) + " B";
}

// A column is right-aligned when every body cell is a number (or empty).
std::string render(const Table& t, bool markdown) {
  if (t.empty()) return "";
  const size_t cols = t[0].size();
  std::vector<size_t> w(cols, 3);
  std::vector<bool> right(cols, true);
  for (size_t r = 0; r < t.size(); ++r) {
    for (size_t i = 0; i < cols && i < t[r].size(); ++i) {
      const std::string& c = t[r][i];
      w[i] = std::max(w[i], c.size());
      if (r > 0 && !c.empty() && !std::isdigit(static_cast<unsigned char>(c[0])) &&
          !(c[0] == '-' && c.size() > 1 && std::isdigit(static_cast<unsigned char>(c[1])))) {
        right[i] = false;
      }
    }
  }
  std::ostringstream os;
  for (size_t r = 0; r < t.size(); ++r) {
    if (markdown) os << "|";
    for (size_t i = 0; i < cols; ++i) {
      const std::string cell = i < t[r].size() ? t[r][i] : "";
      os << (markdown ? " " : (i ? "  " : ""));
      os << std::setw(static_cast<int>(w[i])) << (right[i] ? std::right : std::left) << cell;
      if (markdown) os << " |";
    }
    os << "\n";
    if (r == 0) {
      if (markdown) {
        os << "|";
        for (size_t i = 0; i < cols; ++i) {
          os << " " << std::string(w[i] - 1, '-') << (right[i] ? ":" : "-") << " |";
        }
      } else {
        size_t total = 0;
        for (size_t i = 0; i < cols; ++i) total += w[i] + (i ? 2 : 0);
        os << std::string(total, '-');
      }
      os << "\n";
    }
  }
  return os.str();
}

const json* find_ok(const json& model, const std::string& id) {
  for (const auto& s : model["scenarios"]) {
    if (s["id"] == id && s["status"] == "ok") return &s;
  }
  return nullptr;
}

// "1.08x (1.02-1.12x)": a ddp_w2_alt scenario's DDP median over its floor median, and the
// lowest and highest of the same ratio per repeat; empty without one.
std::string alternating_ratio(const json* s) {
  if (!s || !s->contains("plain_median_ms")) return "";
  std::string out =
      fixed((*s)["median_ms"].get<double>() / (*s)["plain_median_ms"].get<double>()) + "x";
  if (!s->contains("plain_repeat_medians_ms")) return out;
  const auto ddp = (*s)["repeat_medians_ms"].get<std::vector<double>>();
  const auto floor = (*s)["plain_repeat_medians_ms"].get<std::vector<double>>();
  std::vector<double> r;
  for (size_t i = 0; i < std::min(ddp.size(), floor.size()); ++i) r.push_back(ddp[i] / floor[i]);
  if (r.size() < 2) return out;
  const auto mm = std::minmax_element(r.begin(), r.end());
  return out + " (" + fixed(*mm.first) + "-" + fixed(*mm.second) + "x)";
}

// Issue 20's headline: lockstep DDP against the synchronized floor, with PyTorch's DDP as the
// peer column. Where `ddp_w2_alt` ran (Note [Alternating steps] in worker.cpp), a column with
// its ratio and the range of its repeats' own ratios. Empty when no model ran DDP beside
// either.
std::string render_headline(const json& doc, bool md) {
  bool alternating = false;
  for (const auto& m : doc["models"]) alternating = alternating || find_ok(m, "ddp_w2_alt");
  Table t = {{"model", "synchronized floor ms", "lockstep DDP ms", "DDP / floor", "PyTorch DDP ms",
              "DDP / PyTorch DDP"}};
  if (alternating) t[0].push_back("DDP / floor, alternating steps (repeats)");
  for (const auto& m : doc["models"]) {
    const json* floor = find_ok(m, "floor_w2");
    const json* d2 = find_ok(m, "ddp_w2");
    const json* td = find_ok(m, "torch_ddp_w2");
    const json* alt = find_ok(m, "ddp_w2_alt");
    if ((!d2 || (!floor && !td)) && !alt) continue;
    auto ms = [](const json* s) { return s ? fixed((*s)["median_ms"].get<double>()) : ""; };
    auto ratio = [&](const json* s) {
      return s && d2
                 ? fixed((*d2)["median_ms"].get<double>() / (*s)["median_ms"].get<double>()) + "x"
                 : "";
    };
    t.push_back(
        {m["model"].get<std::string>(), ms(floor), ms(d2), ratio(floor), ms(td), ratio(td)});
    if (alternating) t.back().push_back(alternating_ratio(alt));
  }
  if (t.size() == 1) return "";
  std::ostringstream os;
  os << (md ? "**Headline**: step time of 2 ranks, median; the synchronized floor is the same "
              "two ranks training side by side with no gradient communication, kept in step by "
              "a 1-element all-reduce per step"
            : "== headline (2 ranks; floor: no gradient communication, 1-element all-reduce "
              "per step");
  if (alternating) {
    os << (md ? "; alternating steps: each of the two processes alternates a DDP step with a "
                "floor step, and the ratio is of their medians, with the lowest and highest of "
                "the repeats' own ratios"
              : "; alternating: DDP and floor steps alternate in the same processes");
  }
  os << (md ? "\n\n" : ")\n\n");
  os << render(t, md) << "\n";
  return os.str();
}

// Note [lockstep-bench on CUDA] (scenarios.h): issue 18's table, one row per model and one
// column per scenario, side by side: the median step time, or why there is none.
std::string render_side_by_side(const json& doc, bool md) {
  std::vector<std::string> ids, labels;
  for (const auto& m : doc["models"]) {
    for (const auto& s : m["scenarios"]) {
      const std::string id = s["id"];
      if (std::find(ids.begin(), ids.end(), id) != ids.end()) continue;
      ids.push_back(id);
      labels.push_back(s["label"]);
    }
  }
  if (ids.empty()) return "";
  Table t = {{"model"}};
  for (const auto& l : labels) t[0].push_back(l + " ms");
  for (const auto& m : doc["models"]) {
    std::vector<std::string> row = {m["model"].get<std::string>() + " (" +
                                    fixed(m["params"].get<int64_t>() / 1e6, 1) + "M params, batch " +
                                    std::to_string(m["batch"].get<int64_t>()) + ")"};
    for (const auto& id : ids) {
      std::string cell;
      for (const auto& s : m["scenarios"]) {
        if (s["id"] != id) continue;
        cell = s["status"] == "ok" ? fixed(s["median_ms"].get<double>())
                                   : s["status"].get<std::string>();
      }
      row.push_back(cell);
    }
    t.push_back(row);
  }
  std::ostringstream os;
  os << (md ? "**Side by side on CUDA**: median step time per model; a failed or skipped "
              "scenario says why under its model's table\n\n"
            : "== side by side on CUDA (median step ms)\n\n");
  os << render(t, md) << "\n";
  return os.str();
}

// Runs rerun or left out (Note [Disturbed runs] in coordinator.h), one line per scenario.
std::string disturbance_lines(const json& m, bool md) {
  std::ostringstream os;
  for (const auto& s : m["scenarios"]) {
    const int reruns = s.value("reruns", 0), disturbed = s.value("disturbed_runs", 0);
    if (s["status"] != "ok" || (reruns == 0 && disturbed == 0)) continue;  // note says why
    double worst = 0;
    for (const auto& o : s.value("others_cpus", json::array()))
      worst = std::max(worst, o.get<double>());
    os << (md ? "- " : "  ") << s["label"].get<std::string>() << ": " << reruns
       << (reruns == 1 ? " rerun" : " reruns") << ", " << disturbed << " disturbed run"
       << (disturbed == 1 ? "" : "s")
       << (s.value("disturbed_runs_kept", false) ? " kept" : " left out")
       << " (other processes used up to " << fixed(worst) << " cores)\n";
  }
  return os.str();
}

// Where a lockstep DDP step's communication went: backward compute and, per bucket, when its
// last gradient arrived, when its reduction started and when it was seen done (ms since the
// first gradient hook, medians), from DDP's own statistics.
std::string bucket_lines(const json& m, bool md) {
  std::ostringstream os;
  for (const auto& s : m["scenarios"]) {
    // World 1 communicates nothing: its buckets have no timeline.
    if (s["status"] != "ok" || s.value("world", 2) < 2 || !s.contains("ddp_stats") ||
        !s["ddp_stats"].contains("bucket_ms") || s["ddp_stats"]["bucket_ms"].empty()) {
      continue;
    }
    const auto& d = s["ddp_stats"];
    os << (md ? "- " : "  ") << s["label"].get<std::string>() << ": backward compute "
       << fixed(d["backward_compute_ms"]) << " ms, exposed " << fixed(d["exposed_comm_ms"])
       << " ms;";
    for (size_t b = 0; b < d["bucket_ms"].size(); ++b) {
      const auto& p = d["bucket_ms"][b];
      const double mb = b < d["bucket_bytes"].size() ? d["bucket_bytes"][b].get<double>() / 1e6 : 0;
      os << " bucket " << b << " (" << fixed(mb) << " MB) ready " << fixed(p[0]) << ", launched "
         << fixed(p[1]) << ", done " << fixed(p[2]) << (b + 1 < d["bucket_ms"].size() ? ";" : "");
    }
    os << "\n";
  }
  return os.str();
}

// One model's table: its scenarios, with the notes of those that did not run.
std::string render_model(const json& m, bool md) {
  std::ostringstream os;
  os << (md ? "**" : "== ") << m["model"].get<std::string>() << " (" << m["params"].get<int64_t>()
     << " parameters, batch " << m["batch"].get<int64_t>() << " per rank)" << (md ? "**" : "")
     << "\n\n";
  // The "vs floor" column only where a floor ran, so that older results render as before.
  bool floor = false;
  for (const auto& s : m["scenarios"]) floor = floor || s.contains("vs_floor");
  Table t = {{"scenario", "transport", "median ms", "p10-p90 ms", "samples/s", "ratio", "vs"}};
  if (floor) t[0].push_back("vs floor");
  bool cpu = false;
  for (const auto& s : m["scenarios"]) cpu = cpu || s.contains("cpu_ms_per_step");
  if (cpu) t[0].push_back("CPU ms/step");
  t[0].push_back("peak RSS MiB");
  for (const auto& s : m["scenarios"]) {
    std::vector<std::string> row;
    if (s["status"] != "ok") {
      row = {s["label"].get<std::string>(), "", s["status"].get<std::string>(), "", "", "", ""};
      if (floor) row.push_back("");
      if (cpu) row.push_back("");
      row.push_back("");
      t.push_back(row);
      continue;
    }
    const std::string backend = s.value("backend", std::string());
    row = {s["label"].get<std::string>(),
           backend == "none" ? "" : backend,
           fixed(s["median_ms"].get<double>()),
           fixed(s["p10_ms"].get<double>(), 1) + "-" + fixed(s["p90_ms"].get<double>(), 1),
           fixed(s["samples_per_s"].get<double>(), 0),
           s.contains("ratio") ? fixed(s["ratio"].get<double>()) + "x" : "",
           s["reference"].is_null() ? "" : s["reference"].get<std::string>()};
    if (floor)
      row.push_back(s.contains("vs_floor") ? fixed(s["vs_floor"].get<double>()) + "x" : "");
    if (cpu) row.push_back(s.contains("cpu_ms_per_step") ? fixed(s["cpu_ms_per_step"]) : "");
    row.push_back(fixed(s["peak_rss_mib"].get<double>(), 0));
    t.push_back(row);
  }
  os << render(t, md) << "\n";
  for (const auto& s : m["scenarios"]) {
    if (s["status"] != "ok" && s.contains("note")) {
      os << (md ? "- " : "  ") << s["label"].get<std::string>() << ": "
         << s["status"].get<std::string>() << ": " << one_line(s["note"].get<std::string>())
         << "\n";
    }
  }
  os << disturbance_lines(m, md);
  os << bucket_lines(m, md);
  os << "\n";
  return os.str();
}

}  // namespace

std::string render_report(const json& doc, bool md) {
  std::ostringstream os;
  const auto& env = doc["environment"];
  const auto& cfg = doc["config"];
  const bool cuda = cfg.value("device", std::string("cpu")) == "cuda";
  if (md) {
    os << "Measured with `" << doc["command"].get<std::string>() << "` on "
       << env["nproc"].get<int>() << " cores (" << env["uname"].get<std::string>() << "), "
       << "LibTorch " << env["libtorch"].get<std::string>() << ", "
       << env["date"].get<std::string>() << "; load average "
       << env["loadavg_start"].get<std::string>() << " at the start, "
       << env["loadavg_end"].get<std::string>()
       << " at the end. Every scenario: " << cfg["repeats"].get<int>() << " interleaved repeats x "
       << cfg["steps"].get<int>() << " timed steps after " << cfg["warmup"].get<int>()
       << " warm-up steps, 1 intra-op thread per rank unless stated, "
       << (doc.contains("cluster") ? "ranks in network namespaces over the emulated links below"
                                   : "loopback")
       << (cuda ? ", every rank on CUDA (cuda:LOCAL_RANK % " +
                      std::to_string(env.value("gpus", 0)) + " visible GPUs), each step timed "
                      "between device synchronisations"
                : "")
       << ", bucket cap "
       << cfg["bucket_cap_mb"].get<double>() << " MB. Step time: median over all timed "
       << "steps of rank 0 (p10-p90 beside it); ratio: against the scenario named in `vs`; peak "
          "RSS: "
          "the largest VmHWM of any rank.";
    if (cfg.value("malloc", std::string("default")) == "fixed") {
      os << " Every worker ran with glibc's malloc thresholds fixed (`--malloc fixed`: "
            "GLIBC_TUNABLES trim 256 MiB, mmap 32 MiB).";
    }
    if (cfg.contains("disturbance_cpus")) {
      os << " A run during which other processes used more than "
         << format_number(cfg["disturbance_cpus"].get<double>()) << " cores was rerun up to "
         << cfg["retries"].get<int>() << " times and "
         << (cfg["keep_disturbed"].get<bool>() ? "kept" : "left out") << " if still disturbed.";
    }
    os << "\n\n";
  }
  // On CUDA the side-by-side table is the headline (no floor runs there).
  os << (cuda ? render_side_by_side(doc, md) : render_headline(doc, md));
  if (doc.contains("cluster")) {
    const auto& c = doc["cluster"];
    for (const auto& l : c["links"]) {
      const std::string shape = std::to_string(c["nodes"].get<int>()) + " nodes x " +
                                std::to_string(c["ranks_per_node"].get<int>()) + " ranks";
      os << (md ? "**Emulated cluster**, " : "== emulated cluster, ") << shape << ", link "
         << l["link"].get<std::string>() << " ("
         << (l["delay_applied"].get<bool>() ? "rate and delay applied"
                                            : "rate applied, delay NOT applied")
         << ")" << (md ? "\n\n" : "\n");
      if (l.contains("note")) os << (md ? "- " : "  ") << one_line(l["note"]) << "\n";
      if (!md) os << "\n";
      for (const auto& m : l["models"]) os << render_model(m, md);
    }
  }
  for (const auto& m : doc["models"]) os << render_model(m, md);
  if (!doc["targets"].empty()) {
    os << (md ? (doc.contains("cluster") ? "**Goals** (emulated cluster)\n\n"
                 : cuda                  ? "**Goals** (issue 18, CUDA)\n\n"
                                         : "**Targets** (2 ranks, 1 thread each, loopback)\n\n")
              : "== targets\n\n");
    Table t = {{"model", "measure", "value", "requirement", "met", "goal", "goal met"}};
    for (const auto& g : doc["targets"]) {
      const std::string what = g["target"];
      const double v = g["value"];
      const bool as_pct =
          what.find("overhead") != std::string::npos || what.find("exposed") != std::string::npos;
      const bool as_mib = what.find("MiB") != std::string::npos;
      t.push_back({g["model"].get<std::string>(), what,
                   as_pct   ? pct(v)
                   : as_mib ? fixed(v, 1)
                            : fixed(v) + "x",
                   g["requirement"].get<std::string>(),
                   g["requirement"] == "(reported)" ? "" : (g["met"].get<bool>() ? "yes" : "NO"),
                   g["goal"].get<std::string>(),
                   g["goal"] == "" ? "" : (g["goal_met"].get<bool>() ? "yes" : "no")});
    }
    os << render(t, md) << "\n";
  }
  if (doc.contains("allreduce") && !doc["allreduce"].empty()) {
    int world = 2;
    for (const auto& a : doc["allreduce"]) world = a.value("world", world);
    os << (md ? "**All-reduce sweep** (" + std::to_string(world) +
                    " ranks, float32 sum, median of 3 runs of back-to-back "
                    "iterations; bus bandwidth = 2(n-1)/n x size / time; shm in place: a shared "
                    "reduction buffer, as DDP's buckets; copy, add: memcpy and dst += src of "
                    "the same bytes on every rank at once)\n\n"
              : "== all-reduce sweep (" + std::to_string(world) + " ranks)\n\n");
    Table t = {{"size"}};
    std::vector<const json*> cols;
    const json* gloo = nullptr;
    const json* shm = nullptr;
    for (const auto& a : doc["allreduce"]) {
      if (a["status"] != "ok") continue;
      t[0].push_back(a["transport"].get<std::string>() + " (" + a["backend"].get<std::string>() +
                     ") us");
      t[0].push_back("GB/s");
      cols.push_back(&a);
      if (a["transport"] == "gloo") gloo = &a;
      if (a["transport"] == "shm") shm = &a;
    }
    // How much faster shared memory is than Gloo, size by size.
    const bool speedup = gloo && shm && (*gloo)["sweep"].size() == (*shm)["sweep"].size();
    if (speedup) t[0].push_back("gloo / shm");
    // Note [The memory floor of a reduction] (worker.cpp): the shared-buffer all-reduce DDP's
    // buckets take, and a copy and an add of the same bytes with every rank at it at once.
    const bool memory = shm && !(*shm)["sweep"].empty() && (*shm)["sweep"][0].contains("add_ms") &&
                        (*shm)["sweep"].size() == (*cols[0])["sweep"].size();
    if (memory) {
      t[0].push_back("shm in place us");
      t[0].push_back("copy us");
      t[0].push_back("add us");
    }
    if (!cols.empty()) {
      const auto& rows0 = (*cols[0])["sweep"];
      for (size_t i = 0; i < rows0.size(); ++i) {
        std::vector<std::string> row = {human_bytes(rows0[i]["bytes"].get<int64_t>())};
        for (const json* c : cols) {
          const auto& r = (*c)["sweep"][i];
          row.push_back(fixed(r["ms"].get<double>() * 1e3, 1));
          row.push_back(fixed(r["busbw_gbps"].get<double>(), 3));
        }
        if (speedup) {
          row.push_back(fixed((*gloo)["sweep"][i]["ms"].get<double>() /
                                  (*shm)["sweep"][i]["ms"].get<double>(),
                              1) +
                        "x");
        }
        if (memory) {
          const auto& r = (*shm)["sweep"][i];
          for (const char* key : {"inplace_ms", "copy_ms", "add_ms"}) {
            row.push_back(r[key].is_number() ? fixed(r[key].get<double>() * 1e3, 1) : "");
          }
        }
        t.push_back(row);
      }
      os << render(t, md) << "\n";
    }
    for (const auto& a : doc["allreduce"]) {
      if (a["status"] == "ok") continue;
      os << (md ? "- " : "  ") << a["transport"].get<std::string>() << ": "
         << a["status"].get<std::string>() << ": " << one_line(a.value("note", std::string()))
         << "\n";
    }
  }
  return os.str();
}

}  // namespace bench
}  // namespace lockstep
