// The launch-environment resolver (see lockstep/launch_env.h for the precedence).
#include "lockstep/launch_env.h"

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <exception>
#include <sstream>
#include <vector>

#include "adapter/torch_adapter.h"
#include "lockstep/env_vars.h"
#include "lockstep/errors.h"

extern char** environ;

namespace lockstep {
namespace {

using detail::concat;

std::optional<std::string> lookup(const EnvMap& env, const std::string& name) {
  auto it = env.find(name);
  if (it == env.end()) return std::nullopt;
  return it->second;
}

bool has(const EnvMap& env, const std::string& name) { return env.count(name) > 0; }

// Parses a decimal integer in [lo, hi]; the error names the variable, its value and the range.
int parse_int(const std::string& name, const std::string& text, long lo, long hi) {
  const char* begin = text.c_str();
  char* end = nullptr;
  errno = 0;
  long value = std::strtol(begin, &end, 10);
  bool ok = !text.empty() && end != begin && *end == '\0' && errno == 0;
  if (!ok || value < lo || value > hi) {
    throw InvalidArgument(concat("Expected ", name, " to be an integer in [", lo, ", ", hi,
                              "], but got '", text, "'. Fix the launcher or the variable."));
  }
  return static_cast<int>(value);
}

bool truthy(const std::string& text) {
  return text == "1" || text == "true" || text == "True" || text == "TRUE" || text == "yes";
}

bool falsy(const std::string& text) {
  return text.empty() || text == "0" || text == "false" || text == "False" || text == "FALSE" ||
         text == "no";
}

// How to start a program so that it gets a launch environment; ends every "not launched" error.
const char* const kHowToLaunch =
    "Start it with `lockstep-run --standalone --nproc-per-node N -- <program> [args]` (or "
    "`torchrun --no-python ...`, srun, mpirun), or set LOCKSTEP_STANDALONE=1 to run it as a "
    "single process (rank 0 of 1).";

// RANK's companions: set by torchrun-style launchers together with RANK, never alone.
const char* const kRankCompanions[] = {"WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                       "GROUP_RANK"};

// First host of a Slurm node list: "node[001-004,007],gpu01" -> "node001".
std::string first_slurm_host(const std::string& list) {
  std::string first;
  int depth = 0;
  for (char c : list) {
    if (c == '[') ++depth;
    if (c == ']') --depth;
    if (c == ',' && depth == 0) break;
    first.push_back(c);
  }
  auto open = first.find('[');
  if (open == std::string::npos) return first;
  std::string prefix = first.substr(0, open);
  std::string inside = first.substr(open + 1);
  std::string range;
  for (char c : inside) {
    if (c == ',' || c == '-' || c == ']') break;
    range.push_back(c);
  }
  return prefix + range;
}

// Tasks on node `node` from SLURM_TASKS_PER_NODE, e.g. "2(x3),1" -> {2,2,2,1}.
std::optional<int> slurm_tasks_on_node(const std::string& spec, int node) {
  std::vector<int> counts;
  std::stringstream ss(spec);
  std::string item;
  while (std::getline(ss, item, ',')) {
    auto paren = item.find("(x");
    int count = parse_int("SLURM_TASKS_PER_NODE", item.substr(0, paren), 0, INT_MAX);
    int repeat = 1;
    if (paren != std::string::npos) {
      auto close = item.find(')', paren);
      repeat = parse_int("SLURM_TASKS_PER_NODE", item.substr(paren + 2, close - paren - 2), 1,
                         INT_MAX);
    }
    for (int i = 0; i < repeat; ++i) counts.push_back(count);
  }
  if (node < 0 || node >= static_cast<int>(counts.size())) return std::nullopt;
  return counts[node];
}

struct Resolver {
  const EnvMap& env;
  LaunchEnv out;

  // Sets an int field from variable `name` when present.
  bool take(int& field, const char* key, const std::string& name, long lo, long hi = INT_MAX) {
    auto value = lookup(env, name);
    if (!value) return false;
    field = parse_int(name, *value, lo, hi);
    out.sources[key] = name;
    return true;
  }
  bool take_str(std::string& field, const char* key, const std::string& name) {
    auto value = lookup(env, name);
    if (!value || value->empty()) return false;
    field = *value;
    out.sources[key] = name;
    return true;
  }
  void require(const std::string& present, const std::string& missing) {
    if (!has(env, missing)) {
      throw InvalidArgument(concat("Expected ", missing, " to be set because ", present,
                                " is set (", out.launcher, " launch), but it is missing. A "
                                "launcher sets both: set ", missing, " on every process, or "
                                "unset ", present, " and start the program with a launcher. ",
                                kHowToLaunch));
    }
  }
};

}  // namespace

std::string LaunchEnv::describe() const {
  std::ostringstream os;
  os << "rank " << rank << "/" << world_size << " (local " << local_rank << "/"
     << local_world_size << ", node " << node_rank << ") master " << master_addr << ":"
     << master_port << (launcher_hosts_store ? " (launcher's store)" : "") << " job '" << job_id
     << "' restart " << restart_count << " via " << launcher << " [";
  bool first = true;
  for (const auto& [field, source] : sources) {
    os << (first ? "" : ", ") << field << "<-" << source;
    first = false;
  }
  os << "]";
  return os.str();
}

LaunchEnv resolve_launch_env(const EnvMap& env, const LaunchOverrides& overrides) {
  Resolver r{env, {}};
  LaunchEnv& out = r.out;
  for (const char* field : {"rank", "world_size", "local_rank", "local_world_size", "node_rank",
                            "master_addr", "master_port", "job_id", "restart_count"}) {
    out.sources[field] = "default";
  }
  bool node_rank_set = false;
  bool local_world_set = false;

  if (has(env, "RANK")) {
    out.launcher = has(env, env::kAgentStore)               ? "lockstep-run"
                   : has(env, "TORCHELASTIC_RUN_ID")          ? "torchrun"
                   : has(env, env::kRestartCount)            ? "lockstep-run"
                   : has(env, "KUBERNETES_SERVICE_HOST")     ? "kubeflow"
                                                             : "torchrun-style";
    r.require("RANK", "WORLD_SIZE");
    r.take(out.world_size, "world_size", "WORLD_SIZE", 1);
    r.take(out.rank, "rank", "RANK", 0);
    r.take(out.local_rank, "local_rank", "LOCAL_RANK", 0);
    local_world_set = r.take(out.local_world_size, "local_world_size", "LOCAL_WORLD_SIZE", 1);
    node_rank_set = r.take(out.node_rank, "node_rank", "GROUP_RANK", 0);
    r.take_str(out.master_addr, "master_addr", "MASTER_ADDR");
  } else if (has(env, "PET_NODE_RANK")) {
    out.launcher = "kubeflow-pet";
    int nproc = 1;
    r.take(nproc, "local_world_size", "PET_NPROC_PER_NODE", 1);
    if (nproc != 1) {
      throw InvalidArgument(concat("Expected PET_NPROC_PER_NODE to be 1 for a process started "
                                "directly in a PyTorchJob pod, but got ", nproc,
                                ". Start the program under `torchrun --no-python` or "
                                "`lockstep-run`, which read PET_* and start one process per "
                                "slot."));
    }
    r.require("PET_NODE_RANK", "PET_NNODES");
    r.take(out.world_size, "world_size", "PET_NNODES", 1);
    r.take(out.rank, "rank", "PET_NODE_RANK", 0);
    out.node_rank = out.rank;
    out.sources["node_rank"] = "PET_NODE_RANK";
    node_rank_set = true;
    if (!r.take_str(out.master_addr, "master_addr", "PET_MASTER_ADDR")) {
      r.take_str(out.master_addr, "master_addr", "MASTER_ADDR");
    }
    if (!r.take(out.master_port, "master_port", "PET_MASTER_PORT", 1, 65535)) {
      r.take(out.master_port, "master_port", "MASTER_PORT", 1, 65535);
    }
  } else if (has(env, "SLURM_PROCID")) {
    out.launcher = "slurm";
    r.require("SLURM_PROCID", "SLURM_NTASKS");
    r.take(out.world_size, "world_size", "SLURM_NTASKS", 1);
    r.take(out.rank, "rank", "SLURM_PROCID", 0);
    r.take(out.local_rank, "local_rank", "SLURM_LOCALID", 0);
    node_rank_set = r.take(out.node_rank, "node_rank", "SLURM_NODEID", 0);
    local_world_set = r.take(out.local_world_size, "local_world_size", "SLURM_NTASKS_PER_NODE", 1);
    if (!local_world_set) {
      if (auto spec = lookup(env, "SLURM_TASKS_PER_NODE")) {
        if (auto n = slurm_tasks_on_node(*spec, out.node_rank)) {
          out.local_world_size = *n;
          out.sources["local_world_size"] = "SLURM_TASKS_PER_NODE";
          local_world_set = true;
        }
      }
    }
    if (!r.take_str(out.master_addr, "master_addr", "MASTER_ADDR")) {
      for (const char* list : {"SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_NODELIST"}) {
        if (auto nodes = lookup(env, list); nodes && !nodes->empty()) {
          out.master_addr = first_slurm_host(*nodes);
          out.sources["master_addr"] = list;
          break;
        }
      }
    }
    if (!has(env, "MASTER_PORT")) {
      if (auto job = lookup(env, "SLURM_JOB_ID")) {
        int id = parse_int("SLURM_JOB_ID", *job, 0, INT_MAX);
        out.master_port = 20000 + id % 20000;
        out.sources["master_port"] = "SLURM_JOB_ID";
      }
    }
  } else if (has(env, "OMPI_COMM_WORLD_RANK")) {
    out.launcher = "openmpi";
    r.require("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE");
    r.take(out.world_size, "world_size", "OMPI_COMM_WORLD_SIZE", 1);
    r.take(out.rank, "rank", "OMPI_COMM_WORLD_RANK", 0);
    r.take(out.local_rank, "local_rank", "OMPI_COMM_WORLD_LOCAL_RANK", 0);
    local_world_set =
        r.take(out.local_world_size, "local_world_size", "OMPI_COMM_WORLD_LOCAL_SIZE", 1);
    r.take_str(out.master_addr, "master_addr", "MASTER_ADDR");
  } else if (has(env, "PMI_RANK")) {
    out.launcher = "pmi";
    r.require("PMI_RANK", "PMI_SIZE");
    r.take(out.world_size, "world_size", "PMI_SIZE", 1);
    r.take(out.rank, "rank", "PMI_RANK", 0);
    r.take(out.local_rank, "local_rank", "MPI_LOCALRANKID", 0);
    local_world_set = r.take(out.local_world_size, "local_world_size", "MPI_LOCALNRANKS", 1);
    r.take_str(out.master_addr, "master_addr", "MASTER_ADDR");
  }
  if (out.sources["master_port"] == "default") {
    r.take(out.master_port, "master_port", "MASTER_PORT", 1, 65535);
  }

  // No launcher: a partial set, an explicit single process, explicit arguments, or an error.
  bool standalone = false;
  if (auto v = lookup(env, env::kStandalone)) {
    standalone = truthy(*v);
    LOCKSTEP_CHECK(standalone || falsy(*v), "Expected ", env::kStandalone,
                   " to be 1 or 0, but got '", *v, "'.");
  }
  if (out.launcher == "none") {
    for (const char* name : kRankCompanions) {
      if (has(env, name)) {
        throw InvalidArgument(concat("Expected RANK to be set because ", name, " is set, but "
                                     "RANK is missing: the launch environment is partial, so "
                                     "this process cannot know its rank. A launcher sets RANK, "
                                     "WORLD_SIZE, MASTER_ADDR and MASTER_PORT together: set "
                                     "RANK on every process, or unset ", name, ". ",
                                     kHowToLaunch));
      }
    }
    if (overrides.rank.has_value() != overrides.world_size.has_value()) {
      throw InvalidArgument(concat("Expected both a rank and a world size as arguments, but only "
                                   "the ", overrides.rank ? "rank" : "world size", " was given "
                                   "and no launcher's variables are set. Give both (e.g. "
                                   "ProcessGroupOptions().rank(0).world_size(1)), or launch the "
                                   "program. ", kHowToLaunch));
    }
    if (!standalone && !overrides.rank) {
      throw InvalidArgument(concat("Expected a launch environment (RANK, WORLD_SIZE, "
                                   "MASTER_ADDR, MASTER_PORT from lockstep-run or torchrun; "
                                   "SLURM_PROCID from srun; OMPI_COMM_WORLD_RANK from mpirun), "
                                   "but none is set, and the program did not say it runs "
                                   "alone. ", kHowToLaunch));
    }
    if (standalone) out.sources["world_size"] = env::kStandalone;
  } else if (standalone) {
    throw InvalidArgument(concat(env::kStandalone, "=1 asks for a single process, but this "
                                 "process was started by ", out.launcher, " (rank from ",
                                 out.sources["rank"], "). Unset ", env::kStandalone,
                                 " when a launcher starts the program."));
  }

  // Explicit arguments override single fields.
  auto apply = [&](const std::optional<int>& v, int& field, const char* key) {
    if (v) {
      field = *v;
      out.sources[key] = "argument";
    }
  };
  apply(overrides.rank, out.rank, "rank");
  apply(overrides.world_size, out.world_size, "world_size");
  apply(overrides.local_rank, out.local_rank, "local_rank");
  if (overrides.local_world_size) local_world_set = true;
  apply(overrides.local_world_size, out.local_world_size, "local_world_size");
  if (overrides.node_rank) node_rank_set = true;
  apply(overrides.node_rank, out.node_rank, "node_rank");
  apply(overrides.master_port, out.master_port, "master_port");
  if (overrides.master_addr) {
    out.master_addr = *overrides.master_addr;
    out.sources["master_addr"] = "argument";
  }

  // Launchers that do not say it: every process on one node, or one per node.
  if (!local_world_set && out.launcher == "none") out.local_world_size = out.world_size;
  if (!node_rank_set && out.local_world_size > 0) out.node_rank = out.rank / out.local_world_size;

  // Job scope and restart round.
  for (const char* name : {env::kJobId, "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"}) {
    if (r.take_str(out.job_id, "job_id", name)) break;
  }
  for (const char* name : {env::kRestartCount, "TORCHELASTIC_RESTART_COUNT"}) {
    if (r.take(out.restart_count, "restart_count", name, 0)) break;
  }
  for (const char* name : {"TORCHELASTIC_USE_AGENT_STORE", env::kAgentStore}) {
    if (auto v = lookup(env, name); v && truthy(*v)) out.launcher_hosts_store = true;
  }

  // Validation, naming the variable each value came from.
  auto src = [&](const char* key) { return out.sources[key]; };
  LOCKSTEP_CHECK(out.world_size >= 1, "Expected world size >= 1, but got ", out.world_size,
                 " (from ", src("world_size"), ").");
  LOCKSTEP_CHECK(out.rank >= 0 && out.rank < out.world_size, "Expected rank in [0, ",
                 out.world_size - 1, "], but got ", out.rank, " (rank from ", src("rank"),
                 ", world size ", out.world_size, " from ", src("world_size"),
                 "). Every rank must be below the world size.");
  LOCKSTEP_CHECK(out.local_world_size >= 1 && out.local_world_size <= out.world_size,
                 "Expected local world size in [1, ", out.world_size, "], but got ",
                 out.local_world_size, " (from ", src("local_world_size"), ").");
  LOCKSTEP_CHECK(out.local_rank >= 0 && out.local_rank < out.local_world_size,
                 "Expected local rank in [0, ", out.local_world_size - 1, "], but got ",
                 out.local_rank, " (from ", src("local_rank"), ", local world size from ",
                 src("local_world_size"), ").");
  LOCKSTEP_CHECK(out.node_rank >= 0, "Expected node rank >= 0, but got ", out.node_rank,
                 " (from ", src("node_rank"), ").");
  LOCKSTEP_CHECK(out.master_port >= 1 && out.master_port <= 65535,
                 "Expected master port in [1, 65535], but got ", out.master_port, " (from ",
                 src("master_port"), ").");
  bool no_addr = out.sources["master_addr"] == "default";
  bool no_port = out.sources["master_port"] == "default";
  if (out.world_size > 1 && (no_addr || no_port) && out.launcher != "none") {
    std::string missing = no_addr && no_port ? "MASTER_ADDR and MASTER_PORT"
                          : no_addr          ? "MASTER_ADDR"
                                             : "MASTER_PORT";
    std::string example = out.launcher == "openmpi"
                              ? "`mpirun -x MASTER_ADDR=host0 -x MASTER_PORT=29500 ...`"
                              : "`MASTER_ADDR=host0 MASTER_PORT=29500`";
    throw InvalidArgument(concat("Expected MASTER_ADDR and MASTER_PORT for a job of world size ",
                              out.world_size, " launched by ", out.launcher, " (rank from ",
                              out.sources["rank"], "), but ", missing,
                              no_addr && no_port ? " are" : " is", " not set: every rank must "
                              "find rank 0's store. Set both on every process to the host of "
                              "rank 0 and a free port, e.g. ", example,
                              ", or start the program with lockstep-run or torchrun, which set "
                              "them."));
  }
  out.single_process = out.world_size == 1 && no_addr && no_port && !out.launcher_hosts_store;
  LOCKSTEP_CHECK(!out.master_addr.empty(), "Expected a non-empty master address (from ",
                 src("master_addr"), ").");
  return out;
}

EnvMap process_environment() {
  EnvMap env;
  for (char** e = environ; e && *e; ++e) {
    std::string entry(*e);
    auto eq = entry.find('=');
    if (eq == std::string::npos) continue;
    env.emplace(entry.substr(0, eq), entry.substr(eq + 1));
  }
  return env;
}

namespace {

// The launch environment `env` describes, or nothing when no launcher's variables are set (a
// program started by hand: the only process). A launcher's partial or out-of-range variables
// still throw, as resolve_launch_env does.
std::optional<LaunchEnv> launched(const EnvMap& env) {
  std::exception_ptr launcher_error;
  try {
    return resolve_launch_env(env);
  } catch (const InvalidArgument&) {
    launcher_error = std::current_exception();
  }
  // No launcher's variables is an error for a process group but not here. Standalone
  // resolution succeeds exactly when there are none.
  EnvMap alone = env;
  alone[env::kStandalone] = "1";
  try {
    resolve_launch_env(alone);
  } catch (const InvalidArgument&) {
    std::rethrow_exception(launcher_error);  // the launcher's variables are partial or bad
  }
  return std::nullopt;
}

}  // namespace

bool is_main_process(const EnvMap& env) {
  auto launch = launched(env);
  return !launch || launch->rank == 0;
}

bool is_main_process() { return is_main_process(process_environment()); }

// Note [Local device]
// One worker per GPU is the layout of torchrun and of every GPU launcher: local rank r trains
// on cuda:r (`torch.cuda.set_device(local_rank)`). "auto" lets one program run unchanged on a
// laptop and on a GPU node; an explicit "cuda" that finds no GPU is an error rather than a
// silent CPU run. A local rank with no GPU of its own is an error too, even under "auto":
// falling back to the CPU for some ranks would make the job as slow as its CPU ranks, and
// sharing a GPU between ranks is not what "cuda" says (name it: "cuda:0"). resolve_local_device
// decides from the count alone, so every case is tested without a GPU; bind_local_device adds
// the one side effect (the current device), which lives in the adapter. The CUDA path is
// unverified on a GPU in this tree.

c10::Device resolve_local_device(const std::string& device, const EnvMap& env,
                                 int cuda_device_count) {
  static const char* const kExpected = "'auto', 'cpu', 'cuda' or 'cuda:N' (N a device index)";
  if (device == "cpu") return c10::Device(c10::DeviceType::CPU);
  std::optional<int> index;
  if (device.rfind("cuda:", 0) == 0) {
    const std::string digits = device.substr(5);
    const bool numeric = !digits.empty() && digits.size() <= 4 &&
                         digits.find_first_not_of("0123456789") == std::string::npos;
    LOCKSTEP_CHECK(numeric, "Expected a device ", kExpected, ", but got '", device, "'.");
    index = std::stoi(digits);
  } else {
    LOCKSTEP_CHECK(device == "cuda" || device == "auto", "Expected a device ", kExpected,
                   ", but got '", device, "'.");
  }
  if (device == "auto" && cuda_device_count <= 0) return c10::Device(c10::DeviceType::CPU);
  if (cuda_device_count <= 0) {
    auto hidden = env.find("CUDA_VISIBLE_DEVICES");
    throw InvalidArgument(concat(
        "Expected a CUDA device for device '", device, "', but no CUDA device is visible: this "
        "LibTorch is CPU-only, or there is no GPU",
        hidden == env.end() ? std::string(", or CUDA_VISIBLE_DEVICES hides them")
                            : concat(", or CUDA_VISIBLE_DEVICES='", hidden->second,
                                     "' hides them"),
        ". Use device 'cpu', or 'auto' (CUDA when a device is visible, else the CPU)."));
  }
  if (index) {
    LOCKSTEP_CHECK(*index < cuda_device_count, "Expected a CUDA device index below the ",
                   cuda_device_count, " visible CUDA device(s), but got '", device,
                   "'. Name a visible device, or use 'cuda' for cuda:LOCAL_RANK.");
    return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(*index));
  }
  auto launch = launched(env);
  const int local_rank = launch ? launch->local_rank : 0;
  if (local_rank >= cuda_device_count) {
    throw InvalidArgument(concat(
        "Expected one CUDA device per local rank for device '", device, "', but local rank ",
        local_rank, " (from ", launch->sources.at("local_rank"), ", ",
        launch->local_world_size, " worker(s) on this node) has none: ", cuda_device_count,
        " CUDA device(s) are visible. Start one worker per GPU (`lockstep-run "
        "--nproc-per-node gpu`), make more devices visible (CUDA_VISIBLE_DEVICES), or name a "
        "shared device ('cuda:0')."));
  }
  return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(local_rank));
}

c10::Device bind_local_device(const std::string& device, const EnvMap& env) {
  c10::Device resolved = resolve_local_device(device, env, adapter::cuda_device_count());
  if (resolved.is_cuda()) adapter::set_current_cuda_device(resolved.index());
  return resolved;
}

c10::Device bind_local_device(const std::string& device) {
  return bind_local_device(device, process_environment());
}

}  // namespace lockstep
