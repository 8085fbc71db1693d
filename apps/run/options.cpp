// lockstep-run's option parsing and per-worker environment (see options.h).
#include "options.h"

#include <climits>
#include <cstdlib>
#include <cxxopts.hpp>
#include <set>

#include "lockstep/env_vars.h"
#include "lockstep/errors.h"
#include "lockstep/store.h"

namespace lockstep {
namespace run {
namespace {

using detail::concat;

// Flags that take a value: the splitter needs them to find where the program starts.
const std::set<std::string> kValueFlags = {
    "nproc-per-node", "nnodes",       "node-rank",    "master-addr",      "master-port",
    "max-restarts",   "run-id",       "log-dir",      "monitor-interval", "grace-period",
    "rdzv-timeout"};

[[noreturn]] void bad(const std::string& message) { throw InvalidArgument(message); }

int to_int(const std::string& flag, const std::string& text, long lo, long hi) {
  char* end = nullptr;
  long v = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || v < lo || v > hi) {
    bad(concat("--", flag, ": expected an integer in [", lo, ", ", hi, "], but got '", text,
               "'"));
  }
  return static_cast<int>(v);
}

double to_seconds(const std::string& flag, const std::string& text, double lo) {
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !(v >= lo) || v > 1e7) {
    bad(concat("--", flag, ": expected a number of seconds >= ", lo, ", but got '", text, "'"));
  }
  return v;
}

// torchrun spells flags both ways: --nproc_per_node and --nproc-per-node.
std::string normalise_flag(const std::string& token) {
  if (token.rfind("--", 0) != 0) return token;
  auto eq = token.find('=');
  std::string name = token.substr(0, eq);
  for (auto& c : name) c = c == '_' ? '-' : c;
  return eq == std::string::npos ? name : name + token.substr(eq);
}

}  // namespace

ParseResult parse_run_options(const std::vector<std::string>& argv, const EnvMap& env,
                              int cpu_count) {
  // Split: launcher flags, then the program (after "--" or at the first non-flag token).
  std::vector<std::string> flags = {argv.empty() ? "lockstep-run" : argv[0]};
  ParseResult result;
  RunOptions& o = result.options;
  size_t i = 1;
  for (; i < argv.size(); ++i) {
    const std::string& token = argv[i];
    if (token == "--") {
      ++i;
      break;
    }
    if (token.size() < 2 || token[0] != '-') break;
    std::string flag = normalise_flag(token);
    flags.push_back(flag);
    std::string name = flag.substr(2, flag.find('=') == std::string::npos
                                          ? std::string::npos
                                          : flag.find('=') - 2);
    if (flag.find('=') == std::string::npos && kValueFlags.count(name) && i + 1 < argv.size()) {
      flags.push_back(argv[++i]);
    }
  }
  if (i < argv.size()) {
    o.program = argv[i];
    o.args.assign(argv.begin() + static_cast<long>(i) + 1, argv.end());
  }

  auto pet = [&](const char* name, const std::string& fallback) {
    auto it = env.find(name);
    return it == env.end() || it->second.empty() ? fallback : it->second;
  };
  cxxopts::Options spec("lockstep-run",
                        "Starts one worker process per slot with torchrun's environment, hosts "
                        "the rendezvous store on node 0, fails fast, restarts, and never leaves "
                        "orphans.\n\n  lockstep-run [options] -- program [args...]\n");
  spec.add_options()
      ("nproc-per-node", "workers on this node: a number, or auto/cpu (one per core)",
       cxxopts::value<std::string>()->default_value(pet("PET_NPROC_PER_NODE", "1")))
      ("nnodes", "nodes in the job (N or N:N; elastic ranges are not supported)",
       cxxopts::value<std::string>()->default_value(pet("PET_NNODES", "1")))
      ("node-rank", "index of this node in [0, nnodes)",
       cxxopts::value<std::string>()->default_value(pet("PET_NODE_RANK", "0")))
      ("master-addr", "address of node 0, which hosts the rendezvous store",
       cxxopts::value<std::string>()->default_value(pet("PET_MASTER_ADDR", "127.0.0.1")))
      ("master-port", "port of the store; 0 on node 0: a free port, printed at start",
       cxxopts::value<std::string>()->default_value(pet("PET_MASTER_PORT", "29500")))
      ("standalone", "single node on loopback with a free port (overrides master address/port)")
      ("max-restarts", "restarts of the whole group after a failure before giving up",
       cxxopts::value<std::string>()->default_value(pet("PET_MAX_RESTARTS", "0")))
      ("run-id", "job id: scopes store keys, set as LOCKSTEP_JOB_ID and TORCHELASTIC_RUN_ID",
       cxxopts::value<std::string>()->default_value(pet("PET_RUN_ID", "none")))
      ("log-dir", "also write each rank's stdout/stderr to <dir>/<run-id>/attempt_<n>/rank_<r>/",
       cxxopts::value<std::string>()->default_value(pet("PET_LOG_DIR", "")))
      ("monitor-interval", "seconds between checks of the other nodes' state",
       cxxopts::value<std::string>()->default_value(pet("PET_MONITOR_INTERVAL", "0.1")))
      ("grace-period", "seconds from SIGTERM to SIGKILL when stopping workers",
       cxxopts::value<std::string>()->default_value(pet("PET_GRACE_PERIOD", "30")))
      ("rdzv-timeout", "seconds for every node's launcher to join a round",
       cxxopts::value<std::string>()->default_value(pet("PET_RDZV_TIMEOUT", "120")))
      ("dry-run", "print the topology and every worker's environment, start nothing")
      ("quiet", "no progress lines from the launcher (the failure summary is still printed)")
      ("h,help", "print this help");
  std::vector<const char*> cargv;
  for (const auto& f : flags) cargv.push_back(f.c_str());
  cxxopts::ParseResult parsed;
  try {
    parsed = spec.parse(static_cast<int>(cargv.size()), cargv.data());
  } catch (const std::exception& e) {
    bad(concat(e.what(), " (see lockstep-run --help)"));
  }
  if (parsed.count("help")) {
    result.help = true;
    result.help_text = spec.help();
    return result;
  }
  if (!parsed.unmatched().empty()) {
    bad(concat("unexpected argument '", parsed.unmatched().front(),
               "' before the program; write `lockstep-run [options] -- program [args...]`"));
  }

  std::string nproc = parsed["nproc-per-node"].as<std::string>();
  if (nproc == "auto" || nproc == "cpu") {
    o.nproc_per_node = cpu_count > 0 ? cpu_count : 1;
  } else if (nproc == "gpu") {
    bad("--nproc-per-node gpu: lockstep-run starts CPU (Gloo) workers; use a number or auto");
  } else {
    o.nproc_per_node = to_int("nproc-per-node", nproc, 1, 4096);
  }
  std::string nnodes = parsed["nnodes"].as<std::string>();
  if (auto colon = nnodes.find(':'); colon != std::string::npos) {
    int lo = to_int("nnodes", nnodes.substr(0, colon), 1, 65536);
    int hi = to_int("nnodes", nnodes.substr(colon + 1), 1, 65536);
    if (lo != hi) {
      bad(concat("--nnodes ", nnodes, ": elastic node ranges are not supported; give a fixed "
                 "number of nodes"));
    }
    o.nnodes = lo;
  } else {
    o.nnodes = to_int("nnodes", nnodes, 1, 65536);
  }
  o.node_rank = to_int("node-rank", parsed["node-rank"].as<std::string>(), 0, 65535);
  if (o.node_rank >= o.nnodes) {
    bad(concat("--node-rank ", o.node_rank, ": expected a node rank in [0, ", o.nnodes - 1,
               "] for --nnodes ", o.nnodes));
  }
  o.master_addr = parsed["master-addr"].as<std::string>();
  if (o.master_addr.empty()) bad("--master-addr: expected a host name or address, got ''");
  o.master_port = to_int("master-port", parsed["master-port"].as<std::string>(), 0, 65535);
  if (o.master_port == 0 && o.node_rank != 0) {
    bad(concat("--master-port 0: only node 0 may pick a free port; node ", o.node_rank,
               " needs the port node 0 printed"));
  }
  o.standalone = parsed.count("standalone") > 0;
  if (o.standalone) {
    if (o.nnodes != 1) {
      bad(concat("--standalone runs a single node, but --nnodes is ", o.nnodes));
    }
    o.master_addr = "127.0.0.1";
    o.master_port = 0;
  }
  o.max_restarts = to_int("max-restarts", parsed["max-restarts"].as<std::string>(), 0, 1000000);
  o.run_id = parsed["run-id"].as<std::string>();
  if (o.run_id.empty() || o.run_id.find('/') != std::string::npos) {
    bad(concat("--run-id: expected a non-empty id without '/', but got '", o.run_id, "'"));
  }
  o.log_dir = parsed["log-dir"].as<std::string>();
  o.monitor_interval =
      to_seconds("monitor-interval", parsed["monitor-interval"].as<std::string>(), 0.001);
  o.grace_period = to_seconds("grace-period", parsed["grace-period"].as<std::string>(), 0);
  o.rdzv_timeout = to_seconds("rdzv-timeout", parsed["rdzv-timeout"].as<std::string>(), 0.1);
  o.dry_run = parsed.count("dry-run") > 0;
  o.quiet = parsed.count("quiet") > 0;
  if (o.program.empty()) {
    bad("no program to run: expected `lockstep-run [options] -- program [args...]`");
  }
  return result;
}

EnvMap worker_env(const RunOptions& options, const RoundLayout& layout, int local_rank,
                  const std::string& error_file, const EnvMap& env, int cpu_count) {
  EnvMap add;
  auto str = [](auto v) { return std::to_string(v); };
  add["RANK"] = str(layout.rank_offset + local_rank);
  add["LOCAL_RANK"] = str(local_rank);
  add["WORLD_SIZE"] = str(layout.world_size);
  add["LOCAL_WORLD_SIZE"] = str(options.nproc_per_node);
  add["GROUP_RANK"] = str(options.node_rank);
  add["GROUP_WORLD_SIZE"] = str(options.nnodes);
  add["ROLE_RANK"] = add["RANK"];
  add["ROLE_WORLD_SIZE"] = add["WORLD_SIZE"];
  add["MASTER_ADDR"] = layout.master_addr;
  add["MASTER_PORT"] = str(layout.master_port);
  add[env::kAgentStore] = "1";
  add["TORCHELASTIC_USE_AGENT_STORE"] = "True";
  add[env::kRestartCount] = str(layout.restart_count);
  add["TORCHELASTIC_RESTART_COUNT"] = str(layout.restart_count);
  add["TORCHELASTIC_MAX_RESTARTS"] = str(options.max_restarts);
  add[env::kJobId] = options.run_id;
  add["TORCHELASTIC_RUN_ID"] = options.run_id;
  add[env::kErrorFile] = error_file;
  if (!layout.store_token.empty()) {
    add[env::kStoreToken] = store_token_to_hex(layout.store_token);
    add[env::kStoreTokenFile] = "";
  }
  if (env.count("OMP_NUM_THREADS") == 0) {
    add["OMP_NUM_THREADS"] = str(std::max(1, cpu_count / options.nproc_per_node));
  }
  return add;
}

}  // namespace run
}  // namespace lockstep
