// The root-cause judgement and the failure summary (see verdict.h, Note [Root cause]).
#include "verdict.h"

#include <string.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <utility>

#include "lockstep/errors.h"

namespace lockstep {
namespace run {
namespace {

using detail::concat;
using nlohmann::json;
using Kind = WorkerEvent::Kind;

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::kExited: return "exited";
    case Kind::kKilled: return "killed";
    case Kind::kStopped: return "stopped";
    case Kind::kContinued: return "continued";
  }
  return "exited";
}

Kind kind_from_name(const std::string& name) {
  for (Kind k : {Kind::kExited, Kind::kKilled, Kind::kStopped, Kind::kContinued}) {
    if (name == kind_name(k)) return k;
  }
  throw InvalidArgument(concat("unknown worker event kind '", name, "'"));
}

std::string clip(std::string text, size_t limit = 240) {
  if (text.size() > limit) text = text.substr(0, limit - 3) + "...";
  return text;
}

// "rank 1" or "ranks 1, 2, 5".
std::string ranks_text(const std::vector<WorkerEvent>& events) {
  std::string ranks;
  for (const auto& e : events) ranks += (ranks.empty() ? "" : ", ") + std::to_string(e.rank);
  return concat(events.size() == 1 ? "rank " : "ranks ", ranks);
}

// What a failure was, for "rank 0 then failed: ...": its error, else its exit.
std::string failed_text(const WorkerEvent& e) {
  std::string error = e.error_text();
  return clip(error.empty() ? e.exit_text() : error);
}

}  // namespace

bool WorkerEvent::failed() const {
  return (kind == Kind::kExited && exit_code != 0) || kind == Kind::kKilled;
}

bool WorkerEvent::secondary() const {
  return kind == Kind::kExited && (type == "lockstep::CommError" || type == "lockstep::TimeoutError");
}

int WorkerEvent::code() const {
  return kind == Kind::kKilled || kind == Kind::kStopped ? 128 + signal : exit_code;
}

std::string WorkerEvent::exit_text() const {
  switch (kind) {
    case Kind::kKilled:
      return concat("killed by ", signal_name(signal), " (exit code ", code(), ")");
    case Kind::kStopped:
      return concat("stopped by ", signal_name(signal), " (exit code ", code(), ")");
    case Kind::kContinued:
      return "continued";
    case Kind::kExited:
      break;
  }
  return concat("exit code ", exit_code);
}

std::string WorkerEvent::error_text() const {
  if (!message.empty()) return type.empty() ? message : type + ": " + message;
  return last_stderr;
}

std::optional<Verdict> judge(const std::vector<WorkerEvent>& events, double settle) {
  std::vector<const WorkerEvent*> order;
  for (const auto& e : events) {
    if (!e.requested) order.push_back(&e);  // step 1
  }
  // Equal times: reaped in the same pass, order unknown; an exit 0 goes first (step 5).
  auto key = [](const WorkerEvent* e) {
    return std::make_pair(e->time, e->kind == Kind::kExited && e->exit_code == 0 ? 0 : 1);
  };
  std::stable_sort(order.begin(), order.end(),
                   [&](const WorkerEvent* a, const WorkerEvent* b) { return key(a) < key(b); });
  auto first_it = std::find_if(order.begin(), order.end(),
                               [](const WorkerEvent* e) { return e->failed(); });
  if (first_it == order.end()) return std::nullopt;  // step 2
  const WorkerEvent& first = **first_it;

  Verdict verdict;
  Failure& f = verdict.failure;
  // Step 3: stops still in force at the first failure.
  std::map<std::pair<int, int>, const WorkerEvent*> stopped;  // (node, rank) -> its stop
  for (auto it = order.begin(); it != first_it; ++it) {
    const WorkerEvent& e = **it;
    if (e.kind == Kind::kStopped) stopped[{e.node, e.rank}] = &e;
    if (e.kind == Kind::kContinued) stopped.erase({e.node, e.rank});
  }
  // Step 5: every exit 0 the launcher did not cause.
  for (const WorkerEvent* e : order) {
    if (e->kind == Kind::kExited && e->exit_code == 0) f.early_exits.push_back(*e);
  }
  // Step 4: the earliest primary candidate within the settle window, else the first failure.
  const WorkerEvent* root = nullptr;
  for (const auto& [who, stop] : stopped) {
    if (!root || stop->time < root->time) root = stop;
  }
  for (auto it = first_it; it != order.end() && (*it)->time <= first.time + settle; ++it) {
    const WorkerEvent& e = **it;
    if (e.failed() && !e.secondary() && (!root || e.time < root->time)) root = &e;
  }
  verdict.ready_at = root ? first.time : first.time + settle;
  if (!root) root = &first;
  f.root = *root;
  if (root != &first) f.then = first;
  return verdict;
}

void add_early_exits(Failure& f, const std::vector<WorkerEvent>& events, double settle) {
  if (f.root.rank < 0) return;
  const double first_time = f.then ? f.then->time : f.root.time;
  for (const auto& e : events) {
    if (e.kind != Kind::kExited || e.exit_code != 0 || e.requested ||
        e.time > first_time + settle) {
      continue;
    }
    bool listed = std::any_of(f.early_exits.begin(), f.early_exits.end(), [&](const WorkerEvent& x) {
      return x.node == e.node && x.rank == e.rank;
    });
    if (!listed) f.early_exits.push_back(e);
  }
}

std::vector<std::string> summary_lines(const Failure& f, const std::vector<WorkerEvent>& local_ends,
                                       int node) {
  std::vector<std::string> lines;
  const WorkerEvent& r = f.root;
  if (r.rank < 0) {
    lines.push_back(concat("first failure: ", f.what));
  } else {
    lines.push_back(concat("first failure: rank ", r.rank, " (local rank ", r.local_rank,
                           ", node ", r.node, ") on host ", r.host, ", pid ", r.pid));
    if (r.kind == Kind::kStopped) {
      lines.push_back(concat("  exit:  ", r.exit_text(),
                             ": it stopped running while its peers waited for it"));
    } else {
      lines.push_back(concat("  exit:  ", r.exit_text()));
      if (!r.message.empty()) {
        lines.push_back(concat("  error: ", r.type.empty() ? "" : r.type + ": ", r.message));
      } else {
        lines.push_back("  error: (none reported: the worker wrote no LOCKSTEP_ERROR_FILE; "
                        "wrap its main in lockstep::run_main)");
        if (!r.last_stderr.empty()) lines.push_back(concat("  last stderr line: ", r.last_stderr));
      }
    }
  }
  const WorkerEvent* first = f.then ? &*f.then : (r.rank >= 0 ? &r : nullptr);
  if (f.then) {
    lines.push_back(concat("  then:  rank ", f.then->rank, " (node ", f.then->node, ", pid ",
                           f.then->pid, ") failed: ", failed_text(*f.then)));
  }
  if (!f.early_exits.empty()) {
    bool one = f.early_exits.size() == 1;
    lines.push_back(concat("  suspicious: ", ranks_text(f.early_exits), " exited 0 while ",
                           one ? "its" : "their", " peers were still running",
                           first ? concat("; rank ", first->rank, " then failed: ",
                                          failed_text(*first))
                                 : std::string()));
    lines.push_back("  hint:  every rank must run the same collectives in the same order; a rank "
                    "that finishes early (one step fewer, an evaluation on one rank only) makes "
                    "its peers fail");
  }
  for (const auto& e : local_ends) {
    if (r.rank >= 0 && e.rank == r.rank && r.node == node) continue;
    std::string error = e.failed() ? e.error_text() : std::string();
    lines.push_back(clip(concat("  rank ", e.rank, " (pid ", e.pid, "): ", e.exit_text(),
                                e.requested ? " (stopped by the launcher)" : "",
                                error.empty() ? "" : ": " + error)));
  }
  return lines;
}

std::string signal_name(int sig) {
  const char* abbrev = sigabbrev_np(sig);
  return abbrev ? concat("SIG", abbrev) : concat("signal ", sig);
}

json to_json(const WorkerEvent& e) {
  return {{"kind", kind_name(e.kind)}, {"rank", e.rank},         {"local_rank", e.local_rank},
          {"node", e.node},            {"host", e.host},         {"pid", e.pid},
          {"exit_code", e.exit_code},  {"signal", e.signal},     {"time", e.time},
          {"requested", e.requested},  {"type", e.type},         {"message", e.message},
          {"last_stderr", e.last_stderr}};
}

WorkerEvent event_from_json(const json& j) {
  WorkerEvent e;
  e.kind = kind_from_name(j.value("kind", std::string("exited")));
  e.rank = j.value("rank", -1);
  e.local_rank = j.value("local_rank", -1);
  e.node = j.value("node", 0);
  e.host = j.value("host", std::string());
  e.pid = j.value("pid", 0L);
  e.exit_code = j.value("exit_code", 0);
  e.signal = j.value("signal", 0);
  e.time = j.value("time", 0.0);
  e.requested = j.value("requested", false);
  e.type = j.value("type", std::string());
  e.message = j.value("message", std::string());
  e.last_stderr = j.value("last_stderr", std::string());
  return e;
}

json to_json(const Failure& f) {
  json early = json::array();
  for (const auto& e : f.early_exits) early.push_back(to_json(e));
  return {{"root", to_json(f.root)},
          {"what", f.what},
          {"then", f.then ? to_json(*f.then) : json(nullptr)},
          {"early_exits", early},
          {"membership", f.membership}};
}

Failure failure_from_json(const json& j) {
  Failure f;
  f.root = event_from_json(j.at("root"));
  f.what = j.value("what", std::string());
  f.membership = j.value("membership", false);
  if (j.contains("then") && !j.at("then").is_null()) f.then = event_from_json(j.at("then"));
  if (j.contains("early_exits")) {
    for (const auto& e : j.at("early_exits")) f.early_exits.push_back(event_from_json(e));
  }
  return f;
}

}  // namespace run
}  // namespace lockstep
