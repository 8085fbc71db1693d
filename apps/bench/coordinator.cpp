// lockstep-bench's coordinator (see coordinator.h).
#include "coordinator.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <iostream>
#include <map>
#include <numeric>
#include <thread>
#include <vector>

#include "cluster.h"
#include "lockstep/errors.h"
#include "proc.h"
#include "scenarios.h"
#include "stats.h"

namespace lockstep {
namespace bench {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

RunVerdict judge_run(double others, double limit, int attempt, int retries, bool keep) {
  if (!(others > limit)) return RunVerdict::kAccept;
  if (attempt < retries) return RunVerdict::kRerun;
  return keep ? RunVerdict::kKeepDisturbed : RunVerdict::kLeaveOut;
}

double others_cpus(double busy_s, double ranks_cpu_s, double wall_s) {
  if (!(wall_s >= kMinJudgedSeconds)) return std::nan("");
  return std::max(0.0, busy_s - ranks_cpu_s) / wall_s;
}

namespace {

// Note [Allocator settings]: what --malloc fixed sets for every worker.
constexpr const char* kFixedMallocTunables =
    "glibc.malloc.trim_threshold=268435456:glibc.malloc.mmap_threshold=33554432";

// A port the kernel considers free right now (torchrun's standalone mode does the same; the
// window until rank 0 binds it is tiny and a clash fails loudly at rendezvous).
int free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw Error("socket() failed while looking for a free port");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    throw Error("bind(127.0.0.1:0) failed: is loopback up?");
  }
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

// Waits for every pid; on the first failure or at the deadline kills the rest (by pid).
// Returns the exit codes (-signal for a signal, 124 for our timeout).
std::vector<int> wait_all(const std::vector<pid_t>& pids, int timeout_s) {
  std::vector<int> codes(pids.size(), -1000);
  std::vector<bool> done(pids.size(), false);
  const auto deadline = Clock::now() + std::chrono::seconds(timeout_s);
  size_t left = pids.size();
  bool killing = false;
  while (left > 0) {
    bool progressed = false;
    for (size_t i = 0; i < pids.size(); ++i) {
      if (done[i]) continue;
      int st = 0;
      pid_t r = waitpid(pids[i], &st, WNOHANG);
      if (r == pids[i]) {
        done[i] = true;
        --left;
        progressed = true;
        if (codes[i] == -1000) codes[i] = WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
        if (codes[i] != 0) killing = true;
      }
    }
    if (left == 0) break;
    if (!killing && cluster_interrupted()) {
      killing = true;  // Ctrl-C during an emulated-cluster run: the caller unwinds
      for (size_t i = 0; i < pids.size(); ++i) {
        if (!done[i]) codes[i] = 130;
      }
    }
    if (!killing && Clock::now() > deadline) {
      killing = true;
      for (size_t i = 0; i < pids.size(); ++i) {
        if (!done[i]) codes[i] = 124;
      }
    }
    if (killing) {
      for (size_t i = 0; i < pids.size(); ++i) {
        if (!done[i]) kill(pids[i], SIGKILL);
      }
    }
    // Polling a child's exit: nothing here synchronises with a peer.
    if (!progressed) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return codes;
}

std::string tail(const std::string& s, size_t n) {
  return s.size() <= n ? s : "..." + s.substr(s.size() - n);
}

// The start of a log (a C++ error's message) and its end (a Python traceback's last line).
std::string head_and_tail(const std::string& s, size_t n) {
  return s.size() <= 2 * n ? s : s.substr(0, n) + " [...] " + s.substr(s.size() - n);
}

std::string trim(const std::string& s) {
  auto b = s.find_first_not_of(" \n\r\t");
  auto e = s.find_last_not_of(" \n\r\t");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

// `bytes` random bytes in hex (a store token).
std::string random_hex(int bytes) {
  std::ifstream in("/dev/urandom", std::ios::binary);
  std::string out;
  static const char* kHex = "0123456789abcdef";
  for (int i = 0; i < bytes; ++i) {
    const int c = in.get();
    if (c < 0) throw Error("cannot read /dev/urandom for a store token");
    out += kHex[(c >> 4) & 15];
    out += kHex[c & 15];
  }
  return out;
}

// What the runs of one scenario reported, merged over the repeats.
struct Outcome {
  std::string status = "ok";  // ok | skipped (see note)
  std::string note;
  int failed_runs = 0;
  int runs = 0;
  int reruns = 0;          // disturbed attempts that were run again
  int disturbed_runs = 0;  // runs left out (or kept, see kept_disturbed)
  bool kept_disturbed = false;
  std::vector<double> step_ms;         // rank 0, every counted repeat pooled
  std::vector<double> repeat_medians;  // one per counted repeat
  std::vector<double> allreduce_ms;    // one per counted repeat
  std::vector<double> plain_step_ms;   // overhead: the interleaved plain (or floor) steps
  std::vector<double> plain_repeat_medians;
  std::vector<double> cpu_ms_per_step;  // rank 0, one per counted repeat
  std::vector<double> cpus;            // every attempt: CPU time of all ranks per second
  std::vector<double> others;          // every attempt: Note [Disturbed runs]
  long peak_rss_kb = 0;                // max over ranks and repeats
  std::string backend;
  std::string glibc_tunables;  // rank 0's GLIBC_TUNABLES (Note [Allocator settings])
  int64_t params = 0;
  json sweep;
  json ddp_stats = json::array();  // rank 0's, one object per repeat
};

class Runner {
 public:
  Runner(BenchOptions o, std::string tmp) : o_(std::move(o)), tmp_(std::move(tmp)) {}

  /// The emulated cluster the next cluster scenarios run on (null: none).
  void set_cluster(const EmulatedCluster* cluster) { cluster_ = cluster; }

  // Runs one repeat of `s` (with its reruns when disturbed), merging into `out`.
  void run(const Scenario& s, Outcome& out) {
    if (out.status == "skipped") return;
    ++out.runs;
    for (int attempt = 0;; ++attempt) {
      std::vector<json> ranks;
      if (!launch(s, out, ranks)) return;
      // What the model is does not depend on whether its steps count.
      out.params = ranks[0].value("params", out.params);
      double cpu = 0;
      for (const auto& j : ranks) cpu += j.value("cpu_s", 0.0);
      const double wall = ranks[0].value("wall_s", 0.0);
      const double others = others_cpus(ranks[0].value("busy_s", 0.0), cpu, wall);
      if (wall > 0) out.cpus.push_back(cpu / wall);
      if (!std::isnan(others)) out.others.push_back(others);
      const RunVerdict v =
          judge_run(others, o_.disturbance_cpus, attempt, o_.retries, o_.keep_disturbed);
      if (v == RunVerdict::kRerun) {
        ++out.reruns;
        std::cerr << "(disturbed: " << fixed(others) << " cores, rerun)" << std::flush;
        continue;
      }
      if (v == RunVerdict::kLeaveOut || v == RunVerdict::kKeepDisturbed) ++out.disturbed_runs;
      if (v == RunVerdict::kKeepDisturbed) out.kept_disturbed = true;
      if (v != RunVerdict::kLeaveOut) merge(ranks, out);
      return;
    }
  }

 private:
  // Starts every rank of `s` once and waits for them. True with every rank's result in
  // `ranks`; false when the run failed or was skipped (recorded in `out`).
  bool launch(const Scenario& s, Outcome& out, std::vector<json>& ranks) {
    const int port = free_port();
    const std::string job = "bench" + std::to_string(getpid()) + "_" + std::to_string(seq_++);
    std::vector<pid_t> pids;
    std::vector<std::string> results, logs;
    if (s.nodes > 0 && (!cluster_ || cluster_->nodes() != s.nodes)) {
      throw Error("lockstep-bench: a cluster scenario without its emulated cluster (a bug)");
    }
    const int per_node = s.nodes > 0 ? s.world / s.nodes : s.world;
    // Every job's store gets a token, as lockstep-run gives one: an emulated cluster's store
    // listens on a namespace's address, not loopback, and without one every lockstep worker
    // logs the no-token warning first, which then fills the head of a failed run's note
    // instead of its error.
    const std::string token = random_hex(32);
    for (int r = 0; r < s.world; ++r) {
      const std::string base = tmp_ + "/" + job + "_r" + std::to_string(r);
      results.push_back(base + ".json");
      logs.push_back(base + ".log");
      const std::string omp = std::to_string(s.omp_threads > 0 ? s.omp_threads : s.threads);
      std::map<std::string, std::string> env = {
          {"RANK", std::to_string(r)},
          {"LOCAL_RANK", std::to_string(r)},
          {"WORLD_SIZE", std::to_string(s.world)},
          {"LOCAL_WORLD_SIZE", std::to_string(s.world)},
          {"GROUP_RANK", "0"},
          {"MASTER_ADDR", "127.0.0.1"},
          {"MASTER_PORT", std::to_string(port)},
          {"LOCKSTEP_JOB_ID", job},
          {"OMP_NUM_THREADS", omp},
          {"MKL_NUM_THREADS", omp},
          {"GLOO_SOCKET_IFNAME", "lo"},
      };
      const int node = r / per_node;
      if (s.nodes > 0) {
        // Note [The emulated cluster]: rank r runs on node r / per_node, in its namespace.
        env["LOCAL_RANK"] = std::to_string(r % per_node);
        env["LOCAL_WORLD_SIZE"] = std::to_string(per_node);
        env["GROUP_RANK"] = std::to_string(node);
        env["MASTER_ADDR"] = cluster_->address(0);
        env["GLOO_SOCKET_IFNAME"] = cluster_->ifname(node);
        env["LOCKSTEP_SOCKET_IFNAME"] = cluster_->ifname(node);
      }
      env["LOCKSTEP_STORE_TOKEN"] = token;
      if (!getenv("LOCKSTEP_LOG_LEVEL")) env["LOCKSTEP_LOG_LEVEL"] = "warn";
      // Note [Allocator settings]
      // glibc's malloc raises its trim and mmap thresholds as a process frees large blocks,
      // so whether a step's activations are faulted in anew depends on the allocator's
      // history (and differs between the main arena and replica threads' arenas). --malloc
      // fixed pins both thresholds for every worker, both sides of every comparison alike,
      // after the user's own tunables (glibc takes the last setting of a name, so theirs
      // stay for everything else); the default leaves glibc as a user has it.
      if (o_.malloc_mode == "fixed") {
        const char* user = getenv("GLIBC_TUNABLES");
        env["GLIBC_TUNABLES"] = user != nullptr && *user != '\0'
                                    ? std::string(user) + ":" + kFixedMallocTunables
                                    : std::string(kFixedMallocTunables);
      }
      if (!s.transport.empty()) env["LOCKSTEP_TRANSPORT"] = s.transport;
      std::vector<std::string> argv;
      if (s.kind == "torch_ddp") {
        argv = {o_.python,         o_.script,
                "--model",         s.model,
                "--batch",         std::to_string(s.batch),
                "--steps",         std::to_string(o_.steps),
                "--warmup",        std::to_string(o_.warmup),
                "--bucket-cap-mb", format_number(s.bucket_cap_mb),
                "--threads",       std::to_string(s.threads),
                "--device",        o_.device,
                "--backend",       s.torch_backend,
                "--result",        results.back()};
        if (s.grad_view) argv.push_back("--gradient-as-bucket-view");
      } else {
        WorkerConfig c;
        c.kind = s.kind;
        c.model = s.model;
        c.batch = s.batch;
        c.steps = o_.steps;
        c.warmup = o_.warmup;
        c.threads = s.threads;
        c.replicas = s.replicas;
        c.scope_blas = s.scope_blas;
        c.bucket_cap_mb = s.bucket_cap_mb > 0 ? s.bucket_cap_mb : o_.bucket_cap_mb;
        c.sweep_min_bytes = o_.sweep_min_bytes;
        c.sweep_max_bytes = o_.sweep_max_bytes;
        if (!s.comm_hook.empty()) c.comm_hook = s.comm_hook;
        c.device = o_.device;
        c.result = results.back();
        argv = worker_arguments(c);
        argv.insert(argv.begin(), self_exe());
      }
      pids.push_back(spawn_process(argv, {env.begin(), env.end()}, logs.back(),
                                   s.nodes > 0 ? cluster_ : nullptr, node));
    }
    auto codes = wait_all(pids, o_.worker_timeout_s);
    if (cluster_interrupted()) {
      for (const auto& p : results) std::remove(p.c_str());
      for (const auto& p : logs) std::remove(p.c_str());
      throw Error("interrupted by a signal; the emulated cluster's namespaces are removed");
    }
    bool ok = true;
    for (int r = 0; r < s.world && ok; ++r) {
      if (codes[r] == 0) continue;
      ok = false;
      const std::string log = read_text_file(logs[r]);
      if (codes[r] == 3 && s.kind == "torch_ddp") {  // python3 has no torch
        out.status = "skipped";
        out.note = tail(trim(log), 200);
        break;
      }
      // One failed run does not discard the others: the scenario is reported from the runs
      // that finished, with the failure in its note; it is "failed" only if none did.
      ++out.failed_runs;
      if (!out.note.empty()) out.note += "; ";
      out.note += "rank " + std::to_string(r) + " exited with " +
                  (codes[r] == 124 ? std::string("a timeout after ") +
                                         std::to_string(o_.worker_timeout_s) + " s"
                                   : "code " + std::to_string(codes[r])) +
                  ": " + head_and_tail(trim(log), 300);
      std::cerr << "  " << s.model << "/" << s.id << " FAILED: " << out.note << std::endl;
    }
    if (ok) {
      for (int r = 0; r < s.world; ++r) ranks.push_back(json::parse(read_text_file(results[r])));
    }
    for (const auto& p : results) std::remove(p.c_str());
    for (const auto& p : logs) std::remove(p.c_str());
    return ok;
  }

  static void merge(const std::vector<json>& ranks, Outcome& out) {
    for (size_t r = 0; r < ranks.size(); ++r) {
      const json& j = ranks[r];
      out.peak_rss_kb = std::max<long>(out.peak_rss_kb, j.value("vmhwm_kb", 0L));
      if (r != 0) continue;
      std::vector<double> st = j["step_ms"].get<std::vector<double>>();
      out.step_ms.insert(out.step_ms.end(), st.begin(), st.end());
      if (!st.empty()) out.repeat_medians.push_back(median(st));
      if (j.contains("allreduce_all_grads_ms") && !j["allreduce_all_grads_ms"].is_null()) {
        out.allreduce_ms.push_back(j["allreduce_all_grads_ms"].get<double>());
      }
      if (j.contains("plain_step_ms")) {
        auto p = j["plain_step_ms"].get<std::vector<double>>();
        out.plain_step_ms.insert(out.plain_step_ms.end(), p.begin(), p.end());
        if (!p.empty()) out.plain_repeat_medians.push_back(median(p));
      }
      if (j.contains("cpu_ms_per_step")) out.cpu_ms_per_step.push_back(j["cpu_ms_per_step"]);
      out.backend = j.value("backend", "");
      out.glibc_tunables = j.value("glibc_tunables", "");
      out.params = j.value("params", int64_t{0});
      if (j.contains("ddp_stats")) out.ddp_stats.push_back(j["ddp_stats"]);
      if (j.contains("sweep")) {
        // Keep the per-size median over repeats: collect every repeat, reduce at the end.
        if (out.sweep.is_null()) out.sweep = json::array();
        out.sweep.push_back(j["sweep"]);
      }
    }
  }

  BenchOptions o_;
  std::string tmp_;
  int seq_ = 0;
  const EmulatedCluster* cluster_ = nullptr;
};



json scenario_json(const Scenario& s, const Outcome& r, const json& ref_median,
                   const json& floor_median, double disturbance_cpus) {
  json j;
  j["id"] = s.id;
  j["kind"] = s.kind;
  j["label"] = s.label;
  j["world"] = s.world;
  j["threads"] = s.threads;
  j["replicas"] = s.replicas;
  j["batch"] = s.batch;
  j["bucket_cap_mb"] = s.bucket_cap_mb;
  if (s.nodes > 0) j["nodes"] = s.nodes;
  if (!s.comm_hook.empty()) j["comm_hook"] = s.comm_hook;
  std::string status = r.status;
  if (status == "ok" && r.failed_runs == r.runs) status = "failed";
  if (status == "ok" && r.step_ms.empty() && r.disturbed_runs > 0) status = "disturbed";
  j["status"] = status;
  std::string note = r.failed_runs ? std::to_string(r.failed_runs) + " of " +
                                         std::to_string(r.runs) + " runs failed: " + r.note
                                   : r.note;
  if (status == "disturbed") {
    note = "every run was disturbed by other processes (up to " +
           fixed(*std::max_element(r.others.begin(), r.others.end())) +
           " cores; limit --disturbance-cpus " + format_number(disturbance_cpus) +
           "): run on a quieter machine, raise --retries, or pass --keep-disturbed" +
           (r.failed_runs ? "; " + std::to_string(r.failed_runs) + " of " + std::to_string(r.runs) +
                                " runs failed: " + r.note
                          : std::string());
  }
  if (!note.empty()) j["note"] = note;
  j["reference"] = s.reference.empty() ? json(nullptr) : json(s.reference);
  // Note [Disturbed runs]: every attempt's CPU use, and what was rerun or left out.
  if (!r.cpus.empty()) {
    j["cpus"] = median(r.cpus);
    j["others_cpus"] = r.others;
    j["reruns"] = r.reruns;
    j["disturbed_runs"] = r.disturbed_runs;
    j["disturbed_runs_kept"] = r.kept_disturbed;
  }
  if (status != "ok") return j;
  const double med = median(r.step_ms);
  // samples per second over the whole job: every rank processes `batch` samples per step.
  const int64_t global_batch = s.kind == "dp" || s.kind == "plain" ? s.batch : s.batch * s.world;
  j["backend"] = r.backend;
  j["params"] = r.params;
  j["steps"] = r.step_ms.size();
  j["median_ms"] = med;
  j["mean_ms"] = std::accumulate(r.step_ms.begin(), r.step_ms.end(), 0.0) / r.step_ms.size();
  j["p10_ms"] = percentile(r.step_ms, 0.1);
  j["p25_ms"] = percentile(r.step_ms, 0.25);
  j["p75_ms"] = percentile(r.step_ms, 0.75);
  j["p90_ms"] = percentile(r.step_ms, 0.9);
  j["repeat_medians_ms"] = r.repeat_medians;
  j["samples_per_s"] = global_batch / (med * 1e-3);
  j["peak_rss_mib"] = r.peak_rss_kb / 1024.0;
  if (!r.allreduce_ms.empty()) j["allreduce_all_grads_ms"] = median(r.allreduce_ms);
  if (ref_median.is_number()) j["ratio"] = med / ref_median.get<double>();
  if (!r.plain_step_ms.empty()) {
    j["plain_median_ms"] = median(r.plain_step_ms);
    j["plain_repeat_medians_ms"] = r.plain_repeat_medians;
  }
  if (s.kind == "overhead" && s.world >= 2 && !r.plain_step_ms.empty()) {
    // Note [Alternating steps]: its floor is the one it alternated with.
    j["vs_floor"] = med / j["plain_median_ms"].get<double>();
  } else if (floor_median.is_number() && s.world >= 2 && s.kind != "floor") {
    j["vs_floor"] = med / floor_median.get<double>();
  }
  if (!r.cpu_ms_per_step.empty()) j["cpu_ms_per_step"] = median(r.cpu_ms_per_step);
  if (!r.glibc_tunables.empty()) j["glibc_tunables"] = r.glibc_tunables;
  if (!r.ddp_stats.empty()) {
    // lockstep DDP's own statistics, each field the median over the repeats' medians.
    json d;
    for (const char* k : {"forward_ms", "backward_compute_ms", "comm_ms", "exposed_comm_ms"}) {
      std::vector<double> v;
      for (const auto& x : r.ddp_stats) v.push_back(x[k].get<double>());
      d[k] = median(v);
    }
    d["buckets"] = r.ddp_stats.back()["buckets"];
    d["bucket_bytes"] = r.ddp_stats.back()["bucket_bytes"];
    // Each bucket's [ready, launched, done], the median over the repeats that had the same
    // number of buckets as the last one.
    const json& last = r.ddp_stats.back();
    if (last.contains("bucket_ms")) {
      json timeline = json::array();
      for (size_t b = 0; b < last["bucket_ms"].size(); ++b) {
        json point = json::array();
        for (size_t f = 0; f < 3; ++f) {
          std::vector<double> v;
          for (const auto& x : r.ddp_stats) {
            if (x.contains("bucket_ms") && x["bucket_ms"].size() == last["bucket_ms"].size()) {
              v.push_back(x["bucket_ms"][b][f].get<double>());
            }
          }
          point.push_back(median(v));
        }
        timeline.push_back(point);
      }
      d["bucket_ms"] = timeline;
    }
    for (const char* k : {"extra_rss_mib", "extra_pss_mib", "gradient_mib"}) {
      double worst = -1e30;
      for (const auto& x : r.ddp_stats) {
        if (x.contains(k)) worst = std::max(worst, x[k].get<double>());
      }
      if (worst > -1e30) d[k] = worst;  // the largest over the repeats
    }
    j["ddp_stats"] = d;
  }
  return j;
}

// Runs `sc` for every repeat, interleaved, in reverse order every other repeat.
std::vector<Outcome> run_interleaved(Runner& runner, const BenchOptions& o,
                                     const std::vector<Scenario>& sc, const std::string& what,
                                     std::vector<Outcome> res) {
  for (int rep = 0; rep < o.repeats; ++rep) {
    std::cerr << "[" << what << "] repeat " << rep + 1 << "/" << o.repeats << ":";
    for (size_t k = 0; k < sc.size(); ++k) {
      const size_t i = rep % 2 == 0 ? k : sc.size() - 1 - k;
      std::cerr << " " << sc[i].id << std::flush;
      runner.run(sc[i], res[i]);
    }
    std::cerr << std::endl;
  }
  return res;
}

json median_of_ok(const std::vector<Scenario>& sc, const std::vector<Outcome>& res,
                  const std::string& id) {
  for (size_t k = 0; k < sc.size(); ++k) {
    if (sc[k].id == id && res[k].status == "ok" && !res[k].step_ms.empty()) {
      return median(res[k].step_ms);
    }
  }
  return json();
}

// Note [The emulated cluster] (cluster.h): one cluster per link, created, measured on every
// model, and removed (also when a run throws or a signal arrives) before the next.
template <typename RunModel>
json run_cluster(Runner& runner, const BenchOptions& o, RunModel&& run_model) {
  json c = {{"nodes", o.cluster_nodes},
            {"ranks_per_node", o.cluster_ranks_per_node},
            {"world", o.cluster_nodes * o.cluster_ranks_per_node},
            {"links", json::array()}};
  for (const auto& stale : remove_stale_cluster_namespaces()) {
    std::cerr << "lockstep-bench: removed network namespace " << stale
              << ", left behind by a run that no longer exists" << std::endl;
  }
  for (const auto& link : o.links) {
    EmulatedCluster cluster(o.cluster_nodes, link);
    runner.set_cluster(&cluster);
    std::cerr << "[cluster " << o.cluster_nodes << "x" << o.cluster_ranks_per_node << ", link "
              << link.text << "] namespaces";
    for (const auto& ns : cluster.namespaces()) std::cerr << " " << ns;
    std::cerr << std::endl;
    json l = {{"link", link.text},
              {"rate_bits", link.rate_bits},
              {"delay_ms", link.delay_ms},
              {"delay_applied", cluster.delay_applied()},
              {"shaping", cluster.shaping()},
              {"models", json::array()}};
    if (!cluster.note().empty()) l["note"] = cluster.note();
    try {
      for (const auto& model : o.models) {
        auto sc = cluster_scenarios_for(o, model);
        if (sc.empty()) continue;
        l["models"].push_back(run_model(model + " @ " + link.text, sc));
        l["models"].back()["model"] = model;
      }
    } catch (...) {
      runner.set_cluster(nullptr);
      throw;
    }
    runner.set_cluster(nullptr);
    c["links"].push_back(l);
  }
  return c;
}

}  // namespace

json run_benchmark(const BenchOptions& o) {
  char tmpl[] = "/tmp/lockstep-bench-XXXXXX";
  if (!mkdtemp(tmpl)) throw Error("mkdtemp(/tmp/lockstep-bench-XXXXXX) failed: is /tmp writable?");
  const std::string tmp = tmpl;
  // The folder goes also when a run throws (an interrupted cluster run): its files are gone.
  struct RemoveDir {
    std::string path;
    ~RemoveDir() { rmdir(path.c_str()); }
  } remove_tmp{tmp};
  Runner runner(o, tmp);
  json doc;
  struct utsname u {};
  uname(&u);
  std::time_t now = std::time(nullptr);
  char date[64];
  std::strftime(date, sizeof(date), "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  doc["command"] = o.command;
  doc["environment"] = {{"nproc", static_cast<int>(std::thread::hardware_concurrency())},
                        {"uname", std::string(u.sysname) + " " + u.release + " " + u.machine},
                        {"libtorch", TORCH_VERSION},
                        {"date", date},
                        {"loadavg_start", load_average()}};
  doc["config"] = {{"steps", o.steps},
                   {"warmup", o.warmup},
                   {"repeats", o.repeats},
                   {"bucket_cap_mb", o.bucket_cap_mb},
                   {"models", o.models},
                   {"scenarios", o.families},
                   {"retries", o.retries},
                   {"disturbance_cpus", o.disturbance_cpus},
                   {"keep_disturbed", o.keep_disturbed},
                   {"malloc", o.malloc_mode},
                   {"dp_replicas", o.dp_replicas},
                   {"dp_omp_threads", o.dp_omp_threads},
                   {"dp_scope_blas", o.dp_scope_blas},
                   {"device", o.device}};
  if (o.device == "cuda") doc["environment"]["gpus"] = o.gpus;
  if (o.cluster_nodes > 0) {
    doc["config"]["cluster"] = std::to_string(o.cluster_nodes) + "x" +
                               std::to_string(o.cluster_ranks_per_node);
    doc["config"]["cluster_scenarios"] = o.cluster_scenarios;
  }
  const bool have_py = access(o.python.c_str(), X_OK) == 0 && !o.script.empty() &&
                       access(o.script.c_str(), R_OK) == 0;
  // Every scenario of `sc` (one model), interleaved over the repeats, as the model's JSON.
  auto run_model = [&](const std::string& model, const std::vector<Scenario>& sc) {
    std::vector<Outcome> res(sc.size());
    for (size_t i = 0; i < sc.size(); ++i) {
      if (!sc[i].skip.empty()) {  // planned: this machine cannot run it (scenarios.h)
        res[i].status = "skipped";
        res[i].note = sc[i].skip;
      } else if (sc[i].kind == "torch_ddp" && !have_py) {
        res[i].status = "skipped";
        res[i].note = "PyTorch's DDP needs " + o.python + " with torch (python3-torch) and " +
                      (o.script.empty() ? std::string("torch_ddp_bench.py") : o.script);
      }
    }
    res = run_interleaved(runner, o, sc, model, std::move(res));
    json m;
    m["model"] = model;
    m["batch"] = o.batch > 0 ? o.batch : default_batch(model);
    int64_t params = 0;
    for (const auto& r : res) params = params ? params : r.params;
    m["params"] = params;
    m["scenarios"] = json::array();
    const json floor = median_of_ok(sc, res, "floor_w2");
    for (size_t i = 0; i < sc.size(); ++i) {
      m["scenarios"].push_back(scenario_json(sc[i], res[i], median_of_ok(sc, res, sc[i].reference),
                                             floor, o.disturbance_cpus));
    }
    return m;
  };
  doc["models"] = json::array();
  if (o.cluster_nodes > 0) {
    doc["cluster"] = run_cluster(runner, o, run_model);
    doc["targets"] = json::array();
    for (const auto& l : doc["cluster"]["links"]) {
      for (const auto& t : compute_cluster_targets(l["models"], l["link"].get<std::string>())) {
        doc["targets"].push_back(t);
      }
    }
    doc["allreduce"] = json::array();
    doc["environment"]["loadavg_end"] = load_average();
    rmdir(tmp.c_str());
    return doc;
  }
  for (const auto& model : o.models) {
    auto sc = scenarios_for(o, model);
    if (sc.empty()) continue;
    doc["models"].push_back(run_model(model, sc));
  }
  doc["targets"] = o.device == "cuda" ? compute_cuda_targets(doc["models"])
                                      : compute_targets(doc["models"]);

  doc["allreduce"] = json::array();
  const auto sweeps = sweep_scenarios(o);
  if (!sweeps.empty()) {
    auto res = run_interleaved(runner, o, sweeps, "allreduce", std::vector<Outcome>(sweeps.size()));
    for (size_t i = 0; i < sweeps.size(); ++i) {
      const bool ok =
          res[i].status == "ok" && res[i].failed_runs < res[i].runs && !res[i].sweep.is_null();
      json a = {{"transport", sweeps[i].transport},
                {"world", sweeps[i].world},
                {"status", ok ? "ok" : "failed"}};
      if (!res[i].note.empty()) a["note"] = res[i].note;
      if (ok) {
        a["backend"] = res[i].backend;
        // A transport that silently fell back is not the transport we asked for.
        if (res[i].backend != sweeps[i].transport) {
          a["status"] = "skipped";
          a["note"] = "asked for LOCKSTEP_TRANSPORT=" + sweeps[i].transport + ", got backend '" +
                      res[i].backend + "' (not available in this build)";
        }
        // Median per size over the repeats.
        json rows = json::array();
        const auto& reps = res[i].sweep;
        for (size_t k = 0; k < reps[0].size(); ++k) {
          std::vector<double> ms, bus, alg, inplace, copy, add;
          for (const auto& r : reps) {
            ms.push_back(r[k]["ms"]);
            bus.push_back(r[k]["busbw_gbps"]);
            alg.push_back(r[k]["algbw_gbps"]);
            if (r[k].contains("inplace_ms") && r[k]["inplace_ms"].is_number()) {
              inplace.push_back(r[k]["inplace_ms"].get<double>());
            }
            copy.push_back(r[k].value("copy_ms", 0.0));
            add.push_back(r[k].value("add_ms", 0.0));
          }
          rows.push_back({{"bytes", reps[0][k]["bytes"]},
                          {"ms", median(ms)},
                          {"inplace_ms", inplace.empty() ? json(nullptr) : json(median(inplace))},
                          {"copy_ms", median(copy)},
                          {"add_ms", median(add)},
                          {"busbw_gbps", median(bus)},
                          {"algbw_gbps", median(alg)}});
        }
        a["sweep"] = rows;
        a["peak_rss_mib"] = res[i].peak_rss_kb / 1024.0;
      }
      doc["allreduce"].push_back(a);
    }
  }
  doc["environment"]["loadavg_end"] = load_average();
  rmdir(tmp.c_str());
  return doc;
}

}  // namespace bench
}  // namespace lockstep
