// lockstep-bench's option parsing (see options.h).
#include "options.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cxxopts.hpp>
#include <sstream>

#include "lockstep/errors.h"
#include "cluster.h"
#include "scenarios.h"

namespace lockstep {
namespace bench {
namespace {

using detail::concat;

[[noreturn]] void bad(const std::string& message) { throw InvalidArgument(message); }

std::string join(const std::vector<std::string>& v, const std::string& sep = ", ") {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? sep : "") + v[i];
  return out;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

int64_t to_int(const std::string& flag, const std::string& text, int64_t lo,
               int64_t hi = INT64_MAX) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0 || v < lo || v > hi) {
    if (hi == INT64_MAX)
      bad(concat("--", flag, ": expected an integer >= ", lo, ", but got '", text, "'"));
    bad(concat("--", flag, ": expected an integer in [", lo, ", ", hi, "], but got '", text, "'"));
  }
  return v;
}

// A number above `lo` (exclusive when `open`).
double to_number(const std::string& flag, const std::string& text, double lo, bool open) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  const bool ok = !text.empty() && *end == '\0' && std::isfinite(v) && (open ? v > lo : v >= lo);
  if (!ok) {
    bad(concat("--", flag, ": expected a number ", open ? "> " : ">= ", lo, ", but got '", text,
               "'"));
  }
  return v;
}

bool to_bool(const std::string& flag, const std::string& text) {
  if (text == "1" || text == "true") return true;
  if (text == "0" || text == "false") return false;
  bad(concat("--", flag, ": expected 1 or 0 (true or false), but got '", text, "'"));
}

// A comma list of names from `allowed`, or "all" (`all` then).
std::vector<std::string> to_names(const std::string& flag, const std::string& text,
                                  const std::vector<std::string>& allowed,
                                  const std::vector<std::string>& all) {
  auto v = split(text);
  if (v == std::vector<std::string>{"all"}) return all;
  if (v.empty())
    bad(concat("--", flag, ": expected a comma list of ", join(allowed), " or all, but got '", text,
               "'"));
  for (const auto& x : v) {
    if (std::find(allowed.begin(), allowed.end(), x) == allowed.end()) {
      bad(concat("--", flag, ": unknown '", x, "'; expected a comma list of ", join(allowed),
                 " or all"));
    }
  }
  return v;
}

cxxopts::Options make_cli() {
  cxxopts::Options cli("lockstep-bench",
                       "lockstep DDP against plain LibTorch, the synchronized floor, the "
                       "per-parameter all-reduce, PyTorch's DDP and DataParallel, every scenario "
                       "in its own processes, interleaved; plus the all-reduce sweep.\n"
                       "  lockstep-bench [--model M,..] [--scenario S,..] [--json F] "
                       "[--markdown F]\n  lockstep-bench --from-json F [--markdown F]\n");
  cli.set_width(100);
  auto str = [](const char* d) { return cxxopts::value<std::string>()->default_value(d); };
  // clang-format off
  cli.add_options()
    ("scenario", "comma list of: " + join(scenario_families()) + ", or all; with --device cuda: " +
                 join(cuda_scenario_families()) + ", or all", str("all"))
    ("model", "comma list of: " + join(all_model_names()) + ", or all (mlp, deep_mlp, cnn, transformer); "
              "default: all, with --device cuda wide,deep", str("all"))
    ("device", "cpu, or cuda: every rank on cuda:LOCAL_RANK % (visible GPUs), the GPU scenarios "
               "(docs/performance.md, GPU)", str("cpu"))
    ("steps", "timed steps per scenario run", str("30"))
    ("warmup", "untimed steps before them", str("5"))
    ("repeats", "interleaved rounds over all scenarios (odd rounds run in reverse order)", str("3"))
    ("batch", "per-rank batch; 0: the model's default (64, transformer 16, wide 512, deep 256)", str("0"))
    ("bucket-cap-mb", "DDP bucket cap for lockstep and PyTorch", str("25"))
    ("bucket-caps", "bucket-size sweep caps (MB)", str("1,4,25,100"))
    ("bucket-sweep-model", "model of the bucket-size sweep", str("deep_mlp"))
    ("sweep-min-bytes", "smallest all-reduce of the sweep", str("1024"))
    ("sweep-max-bytes", "largest all-reduce of the sweep", str("67108864"))
    ("sweep-world", "ranks of the all-reduce sweep", str("2"))
    ("transports", "all-reduce sweep transports (LOCKSTEP_TRANSPORT)", str("gloo,shm"))
    ("dp-replicas", "DataParallel replicas R (the reference: 1 module x R threads)", str("2"))
    ("dp-omp-threads", "OMP_NUM_THREADS of the DataParallel workers", str("1"))
    ("dp-scope-blas", "1: DataParallel scopes OpenBLAS's threads to 1 per replica; 0: leaves them", str("1"))
    ("retries", "reruns of a run that other processes disturbed", str("2"))
    ("disturbance-cpus", "other processes' CPU use (cores) during a run that marks it disturbed", str("0.1"))
    ("keep-disturbed", "count runs that stayed disturbed instead of leaving them out")
    ("malloc", "glibc malloc of every worker: default (adaptive thresholds) or fixed (trim 256 MiB, "
               "mmap 32 MiB, through GLIBC_TUNABLES; docs/performance.md)", str("default"))
    ("python", "interpreter with torch for PyTorch's DDP", str("/usr/bin/python3"))
    ("script", "torch_ddp_bench.py; default: next to the sources or the binary", str(""))
    ("worker-timeout", "seconds before a scenario's workers are killed", str("300"))
    ("cluster", "NODESxRANKS (2x2): run ranks in NODES network namespaces joined by shaped veth links "
                "(needs root; docs/performance.md, Emulated cluster) instead of the loopback scenarios", str(""))
    ("link", "emulated links, one cluster run each: RATE[:DELAY] in tc units", str("1gbit:0.2ms,10gbit:0.2ms"))
    ("cluster-scenarios", "comma list of: " + join(cluster_scenario_names()) + ", or all", str("all"))
    ("json", "write the results as JSON here", str(""))
    ("markdown", "write the report as markdown here", str(""))
    ("from-json", "render an earlier --json file (terminal, and --markdown) instead of running", str(""))
    ("h,help", "print this help and exit");
  cli.add_options("internal (worker)")
    ("worker", "run one rank of a scenario of this kind: " + join(worker_kinds()), str(""))
    ("threads", "intra-op threads (DataParallel: per replica)", str("1"))
    ("replicas", "DataParallel replicas", str("1"))
    ("comm-hook", "DDP communication hook of a ddp worker (allreduce, fp16, bf16, ...)", str("allreduce"))
    ("scope-blas", "DataParallelOptions::scope_blas_threads, 1 or 0", str("1"))
    ("result", "result file", str(""));
  // clang-format on
  return cli;
}

std::string to_device(const std::string& text) {
  if (text != "cpu" && text != "cuda") {
    bad(concat("--device: expected cpu or cuda, but got '", text, "'"));
  }
  return text;
}

}  // namespace

std::string cuda_unavailable_message(const char* visible_devices) {
  std::string where = "this LibTorch is CPU-only, or no GPU is visible";
  if (visible_devices) where += concat(" (CUDA_VISIBLE_DEVICES='", visible_devices, "')");
  return concat("--device cuda: expected a CUDA device, but torch::cuda::is_available() is false: ",
                where, ". Run on a GPU machine with a CUDA build of LibTorch, or drop --device cuda. "
                "Nothing was started.");
}

std::string format_number(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

std::string bench_help() { return make_cli().help({"", "internal (worker)"}); }

ParseResult parse_bench_options(const std::vector<std::string>& argv) {
  auto cli = make_cli();
  std::vector<const char*> args;
  for (const auto& a : argv) args.push_back(a.c_str());
  if (args.empty()) args.push_back("lockstep-bench");
  cxxopts::ParseResult a;
  try {
    a = cli.parse(static_cast<int>(args.size()), args.data());
  } catch (const cxxopts::exceptions::exception& e) {
    bad(concat(e.what(), " (see lockstep-bench --help)"));
  }
  if (!a.unmatched().empty()) {
    bad(concat("unexpected argument '", a.unmatched()[0],
               "': every option is a --flag (see lockstep-bench --help)"));
  }
  auto s = [&](const char* k) { return a[k].as<std::string>(); };

  ParseResult out;
  if (a.count("help")) {
    out.mode = ParseResult::Mode::kHelp;
    out.help_text = bench_help();
    return out;
  }
  if (!s("worker").empty()) {
    out.mode = ParseResult::Mode::kWorker;
    WorkerConfig& c = out.worker;
    c.kind = s("worker");
    const auto kinds = worker_kinds();
    if (std::find(kinds.begin(), kinds.end(), c.kind) == kinds.end()) {
      bad(concat("--worker: unknown kind '", c.kind, "'; expected one of ", join(kinds)));
    }
    c.model = s("model");
    const auto models = all_model_names();
    if (c.kind != "allreduce" && std::find(models.begin(), models.end(), c.model) == models.end()) {
      bad(concat("--model: a worker runs one model, one of ", join(models), ", but got '", c.model,
                 "'"));
    }
    c.batch = to_int("batch", s("batch"), 0);
    if (c.batch == 0 && c.kind != "allreduce") c.batch = default_batch(c.model);
    c.steps = static_cast<int>(to_int("steps", s("steps"), 1, 1000000));
    c.warmup = static_cast<int>(to_int("warmup", s("warmup"), 0, 1000000));
    c.threads = static_cast<int>(to_int("threads", s("threads"), 1, 1024));
    c.replicas = static_cast<int>(to_int("replicas", s("replicas"), 1, 1024));
    c.scope_blas = to_bool("scope-blas", s("scope-blas"));
    c.bucket_cap_mb = to_number("bucket-cap-mb", s("bucket-cap-mb"), 0, /*open=*/true);
    c.sweep_min_bytes = to_int("sweep-min-bytes", s("sweep-min-bytes"), 4);
    c.sweep_max_bytes = to_int("sweep-max-bytes", s("sweep-max-bytes"), c.sweep_min_bytes);
    c.comm_hook = s("comm-hook");
    c.device = to_device(s("device"));
    const auto on_cuda = cuda_worker_kinds();
    if (c.device == "cuda" &&
        std::find(on_cuda.begin(), on_cuda.end(), c.kind) == on_cuda.end()) {
      bad(concat("--device cuda: worker kind '", c.kind, "' runs on the CPU only; expected one of ",
                 join(on_cuda)));
    }
    c.result = s("result");
    if (c.result.empty()) bad("--worker needs --result FILE (the coordinator sets both)");
    return out;
  }

  BenchOptions& o = out.options;
  o.command = "lockstep-bench";
  for (size_t i = 1; i < argv.size(); ++i) o.command += " " + argv[i];
  o.json_path = s("json");
  o.markdown_path = s("markdown");
  o.from_json = s("from-json");
  if (!o.from_json.empty()) {
    out.mode = ParseResult::Mode::kRender;
    return out;
  }
  out.mode = ParseResult::Mode::kRun;
  o.device = to_device(s("device"));
  const bool cuda = o.device == "cuda";
  if (cuda && !s("cluster").empty()) {
    bad(concat("--cluster: the emulated cluster runs CPU ranks only, but got --device cuda; drop "
               "one of them"));
  }
  if (!s("cluster").empty()) {
    parse_cluster_shape(s("cluster"), o.cluster_nodes, o.cluster_ranks_per_node);
    for (const auto& l : split(s("link"))) o.links.push_back(parse_link(l));
    if (o.links.empty()) bad("--link: expected a comma list such as 1gbit:0.2ms,10gbit:0.2ms");
    o.cluster_scenarios = to_names("cluster-scenarios", s("cluster-scenarios"),
                                   cluster_scenario_names(), cluster_scenario_names());
  }
  // A cluster run trains the MLP and the deep MLP unless --model says otherwise.
  // A --device cuda run trains issue 18's GPU models unless --model says otherwise.
  if (o.cluster_nodes > 0 && a.count("model") == 0) {
    o.models = {"mlp", "deep_mlp"};
  } else if (cuda && a.count("model") == 0) {
    o.models = {"wide", "deep"};
  } else {
    o.models = to_names("model", s("model"), all_model_names(), model_names());
  }
  if (cuda) {
    // Note [lockstep-bench on CUDA] (scenarios.h): "all" is every family that runs there.
    const auto families = cuda_scenario_families();
    const auto v = split(s("scenario"));
    if (v != std::vector<std::string>{"all"}) {
      for (const auto& f : v) {
        if (std::find(families.begin(), families.end(), f) == families.end()) {
          bad(concat("--scenario: '", f, "' does not run with --device cuda; expected a comma ",
                     "list of ", join(families), " or all"));
        }
      }
    }
    o.families = to_names("scenario", s("scenario"), families, families);
  } else {
    o.families = to_names("scenario", s("scenario"), scenario_families(), scenario_families());
  }
  o.steps = static_cast<int>(to_int("steps", s("steps"), 1, 1000000));
  o.warmup = static_cast<int>(to_int("warmup", s("warmup"), 0, 1000000));
  o.repeats = static_cast<int>(to_int("repeats", s("repeats"), 1, 10000));
  o.batch = to_int("batch", s("batch"), 0);
  o.bucket_cap_mb = to_number("bucket-cap-mb", s("bucket-cap-mb"), 0, /*open=*/true);
  o.bucket_caps.clear();
  for (const auto& c : split(s("bucket-caps"))) {
    o.bucket_caps.push_back(to_number("bucket-caps", c, 0, /*open=*/true));
  }
  if (o.bucket_caps.empty())
    bad("--bucket-caps: expected a comma list of caps in MB, such as 1,4,25");
  o.bucket_sweep_model = s("bucket-sweep-model");
  const auto models = all_model_names();
  if (std::find(models.begin(), models.end(), o.bucket_sweep_model) == models.end()) {
    bad(concat("--bucket-sweep-model: unknown '", o.bucket_sweep_model, "'; expected one of ",
               join(models)));
  }
  o.sweep_min_bytes = to_int("sweep-min-bytes", s("sweep-min-bytes"), 4);
  o.sweep_max_bytes = to_int("sweep-max-bytes", s("sweep-max-bytes"), 4);
  if (o.sweep_max_bytes < o.sweep_min_bytes) {
    bad(concat("--sweep-max-bytes: expected at least --sweep-min-bytes (", o.sweep_min_bytes,
               "), but got ", o.sweep_max_bytes));
  }
  o.sweep_world = static_cast<int>(to_int("sweep-world", s("sweep-world"), 2, 64));
  o.transports = split(s("transports"));
  if (o.transports.empty()) bad("--transports: expected a comma list such as gloo,shm");
  o.dp_replicas = static_cast<int>(to_int("dp-replicas", s("dp-replicas"), 1, 256));
  o.dp_omp_threads = static_cast<int>(to_int("dp-omp-threads", s("dp-omp-threads"), 1, 1024));
  o.dp_scope_blas = to_bool("dp-scope-blas", s("dp-scope-blas"));
  o.retries = static_cast<int>(to_int("retries", s("retries"), 0, 100));
  o.disturbance_cpus = to_number("disturbance-cpus", s("disturbance-cpus"), 0, /*open=*/true);
  o.keep_disturbed = a.count("keep-disturbed") > 0;
  o.malloc_mode = s("malloc");
  if (o.malloc_mode != "default" && o.malloc_mode != "fixed") {
    bad(concat("--malloc: expected default or fixed, but got '", o.malloc_mode, "'"));
  }
  o.python = s("python");
  o.script = s("script");
  o.worker_timeout_s = static_cast<int>(to_int("worker-timeout", s("worker-timeout"), 1, 86400));
  return out;
}

std::vector<std::string> worker_arguments(const WorkerConfig& c) {
  return {"--worker",          c.kind,
          "--model",           c.model,
          "--batch",           std::to_string(c.batch),
          "--steps",           std::to_string(c.steps),
          "--warmup",          std::to_string(c.warmup),
          "--threads",         std::to_string(c.threads),
          "--replicas",        std::to_string(c.replicas),
          "--scope-blas",      c.scope_blas ? "1" : "0",
          "--bucket-cap-mb",   format_number(c.bucket_cap_mb),
          "--comm-hook",       c.comm_hook,
          "--device",          c.device,
          "--sweep-min-bytes", std::to_string(c.sweep_min_bytes),
          "--sweep-max-bytes", std::to_string(c.sweep_max_bytes),
          "--result",          c.result};
}

}  // namespace bench
}  // namespace lockstep
