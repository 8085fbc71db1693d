// lockstep-run's option parsing and per-worker environment (see options.h).
#include "options.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cxxopts.hpp>
#include <set>
#include <sstream>
#include <utility>

#include "lockstep/env_vars.h"
#include "lockstep/errors.h"
#include "lockstep/store.h"

namespace lockstep {
namespace run {
namespace {

using detail::concat;

// Flags that take a value: the splitter needs them to find where the program starts.
const std::set<std::string> kValueFlags = {
    "nproc-per-node", "nnodes",        "node-rank",    "master-addr",      "master-port",
    "max-restarts",   "run-id",        "log-dir",      "monitor-interval", "grace-period",
    "rdzv-timeout",   "rdzv-backend",  "rdzv-endpoint", "rdzv-id",         "redirects",
    "tee",            "role",          "rdzv-last-call", "heartbeat-timeout"};

// Note [Rendezvous backends]
// torchrun's --rdzv-backend picks how nodes meet: `static` (node ranks given, node 0's
// address from --master-addr/--master-port or --rdzv-endpoint) or `c10d` (a TCPStore at
// --rdzv-endpoint; node ranks handed out in order of arrival, elastic node counts). lockstep-run
// serves both with its one rendezvous: node 0 (--node-rank 0) hosts lockstep's authenticated
// store at the endpoint and every node states its --node-rank. So --rdzv-endpoint host:port is
// --master-addr host --master-port port (the endpoint wins, as in torchrun; c10d's default
// port 29400 applies when the port is left out), --rdzv-id is --run-id, and a multi-node c10d
// job must give each node its --node-rank (or PET_NODE_RANK): arrival-order node ranks are not
// implemented, and saying so beats letting every node believe it is node 0. Elastic ranges
// (--nnodes MIN:MAX) are (Note [Elastic membership] in rounds.h); node ranks then name
// launchers, and each round numbers its nodes densely (GROUP_RANK).

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

// torchrun spells flags both ways: --nproc_per_node and --nproc-per-node; -r and -t are its
// short --redirects and --tee (-r3 or -r 3).
std::string normalise_flag(const std::string& token) {
  for (const auto& [brief, full] : {std::pair<const char*, const char*>{"-r", "--redirects"},
                                    {"-t", "--tee"}}) {
    if (token == brief) return full;
    if (token.rfind(brief, 0) == 0 && token.size() > 2 && token[2] != '-') {
      return std::string(full) + "=" + token.substr(token[2] == '=' ? 3 : 2);
    }
  }
  if (token.rfind("--", 0) != 0) return token;
  auto eq = token.find('=');
  std::string name = token.substr(0, eq);
  for (auto& c : name) c = c == '_' ? '-' : c;
  return eq == std::string::npos ? name : name + token.substr(eq);
}

// "host:port", "[v6::addr]:port", or "host" (then `default_port`, or an error when it is -1).
std::pair<std::string, int> parse_endpoint(const std::string& text, int default_port) {
  std::string host = text;
  std::string port;
  if (!text.empty() && text[0] == '[') {
    auto close = text.find(']');
    if (close == std::string::npos) {
      bad(concat("--rdzv-endpoint: expected host:port or [address]:port, but got '", text, "'"));
    }
    host = text.substr(1, close - 1);
    if (close + 1 < text.size()) {
      if (text[close + 1] != ':') {
        bad(concat("--rdzv-endpoint: expected ':' after ']' in '", text, "'"));
      }
      port = text.substr(close + 2);
    }
  } else if (auto colon = text.rfind(':'); colon != std::string::npos) {
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
  }
  if (host.empty()) {
    bad(concat("--rdzv-endpoint: expected host:port, but got '", text, "' (no host)"));
  }
  if (port.empty()) {
    if (default_port < 0) {
      bad(concat("--rdzv-endpoint ", text, ": the static backend needs a port (host:port)"));
    }
    return {host, default_port};
  }
  return {host, to_int("rdzv-endpoint", port, 0, 65535)};
}

}  // namespace

int StdSpec::of(int local_rank) const {
  if (by_rank.empty()) return all;
  auto it = by_rank.find(local_rank);
  return it == by_rank.end() ? 0 : it->second;
}

StdSpec parse_std_spec(const std::string& flag, const std::string& text) {
  StdSpec spec;
  auto value = [&](const std::string& v) {
    if (v.size() != 1 || v[0] < '0' || v[0] > '3') {
      bad(concat("--", flag, ": expected 0 (none), 1 (stdout), 2 (stderr), 3 (both) or a map "
                 "of local rank to one of them like 0:1,1:2, but got '", text, "'"));
    }
    return v[0] - '0';
  };
  if (text.find(':') == std::string::npos) {
    spec.all = value(text);
    return spec;
  }
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    auto colon = item.find(':');
    if (colon == std::string::npos) value("");  // throws: a map entry without ':'
    int rank = to_int(flag, item.substr(0, colon), 0, 65535);
    if (spec.by_rank.count(rank)) {
      bad(concat("--", flag, " ", text, ": local rank ", rank, " is given twice"));
    }
    spec.by_rank[rank] = value(item.substr(colon + 1));
  }
  if (spec.by_rank.empty()) value("");
  return spec;
}

StreamPlan stream_plan(const RunOptions& options, int local_rank) {
  StreamPlan plan;
  if (!options.redirects.given && !options.tee.given) {
    plan.file[0] = plan.file[1] = !options.log_dir.empty();
    return plan;
  }
  const int redirect = options.redirects.of(local_rank);
  const int tee = options.tee.of(local_rank);
  for (int s = 0; s < 2; ++s) {
    const int bit = s == 0 ? 1 : 2;
    plan.file[s] = ((redirect | tee) & bit) != 0;
    plan.console[s] = (tee & bit) != 0 || (redirect & bit) == 0;
  }
  return plan;
}

bool needs_log_files(const RunOptions& options) {
  for (int i = 0; i < options.nproc_per_node; ++i) {
    StreamPlan plan = stream_plan(options, i);
    if (plan.file[0] || plan.file[1]) return true;
  }
  return false;
}

ParseResult parse_run_options(const std::vector<std::string>& argv, const EnvMap& env,
                              int cpu_count, const std::function<int()>& gpu_count) {
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
      ("nproc-per-node", "workers on this node: a number, auto/cpu (one per core), or gpu "
       "(one per visible CUDA device; bind each with lockstep::bind_local_device)",
       cxxopts::value<std::string>()->default_value(pet("PET_NPROC_PER_NODE", "1")))
      ("nnodes", "nodes in the job: N, or N:N (elastic ranges MIN:MAX with MIN < MAX are "
       "not supported)",
       cxxopts::value<std::string>()->default_value(pet("PET_NNODES", "1")))
      ("node-rank", "index of this node in [0, nnodes)",
       cxxopts::value<std::string>()->default_value(pet("PET_NODE_RANK", "0")))
      ("master-addr", "address of node 0, which hosts the rendezvous store",
       cxxopts::value<std::string>()->default_value(pet("PET_MASTER_ADDR", "127.0.0.1")))
      ("master-port", "port of the store; 0 on node 0: a free port, printed at start",
       cxxopts::value<std::string>()->default_value(pet("PET_MASTER_PORT", "29500")))
      ("rdzv-backend", "static or c10d: both use lockstep's store, hosted by node 0 at the "
       "master address/port (or --rdzv-endpoint); every node gives --node-rank",
       cxxopts::value<std::string>()->default_value(pet("PET_RDZV_BACKEND", "static")))
      ("rdzv-endpoint", "host:port of the store; the same as --master-addr host --master-port "
       "port, and wins over them (c10d: port 29400 when left out)",
       cxxopts::value<std::string>()->default_value(pet("PET_RDZV_ENDPOINT", "")))
      ("rdzv-id", "torchrun's name for --run-id",
       cxxopts::value<std::string>()->default_value(pet("PET_RDZV_ID", "none")))
      ("standalone", "single node on loopback with a free port (overrides master address/port)")
      ("max-restarts", "restarts of the whole group after a failure before giving up",
       cxxopts::value<std::string>()->default_value(pet("PET_MAX_RESTARTS", "0")))
      ("run-id", "job id: scopes store keys, set as LOCKSTEP_JOB_ID and TORCHELASTIC_RUN_ID",
       cxxopts::value<std::string>()->default_value(pet("PET_RUN_ID", "none")))
      ("log-dir", "also write each rank's stdout/stderr to <dir>/<run-id>/attempt_<n>/rank_<r>/"
       "{stdout,stderr}.log (with --redirects/--tee: only the streams they name)",
       cxxopts::value<std::string>()->default_value(pet("PET_LOG_DIR", "")))
      ("r,redirects", "streams written to the log files instead of the console: 0 none, "
       "1 stdout, 2 stderr, 3 both, or per local rank (0:1,1:2); without --log-dir, a new "
       "directory under /tmp, printed at start",
       cxxopts::value<std::string>()->default_value(pet("PET_REDIRECTS", "0")))
      ("t,tee", "streams written to the log files and the console (values as --redirects)",
       cxxopts::value<std::string>()->default_value(pet("PET_TEE", "0")))
      ("role", "the workers' role, set as ROLE_NAME",
       cxxopts::value<std::string>()->default_value(pet("PET_ROLE", "default")))
      ("no-python", "accepted for torchrun's command lines; lockstep-run always runs the "
       "program itself (there is no Python interpreter to leave out)")
      ("monitor-interval", "seconds between checks of the other nodes' state",
       cxxopts::value<std::string>()->default_value(pet("PET_MONITOR_INTERVAL", "0.1")))
      ("grace-period", "seconds from SIGTERM to SIGKILL when stopping workers",
       cxxopts::value<std::string>()->default_value(pet("PET_GRACE_PERIOD", "30")))
      ("rdzv-last-call", "with --nnodes MIN:MAX: seconds node 0 waits for more nodes once MIN "
       "joined a round (torchrun's last_call_timeout)",
       cxxopts::value<std::string>()->default_value(pet("PET_RDZV_LAST_CALL", "5")))
      ("rdzv-timeout", "seconds for every node's launcher to join a round",
       cxxopts::value<std::string>()->default_value(pet("PET_RDZV_TIMEOUT", "120")))
      ("heartbeat-timeout", "with several nodes: seconds without a heartbeat from another "
       "node's launcher before the job fails naming that node as hung (0: no heartbeats)",
       cxxopts::value<std::string>()->default_value("60"))
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
    const int gpus = gpu_count ? gpu_count() : 0;
    if (gpus < 1) {
      bad("--nproc-per-node gpu: expected one worker per visible CUDA device, but no CUDA "
          "device is visible (this LibTorch is CPU-only, there is no GPU, or "
          "CUDA_VISIBLE_DEVICES is empty); give a number (--nproc-per-node 4), or auto/cpu for "
          "one worker per core");
    }
    o.nproc_per_node = std::min(gpus, 4096);
  } else {
    o.nproc_per_node = to_int("nproc-per-node", nproc, 1, 4096);
  }
  std::string nnodes = parsed["nnodes"].as<std::string>();
  if (auto colon = nnodes.find(':'); colon != std::string::npos) {
    int lo = to_int("nnodes", nnodes.substr(0, colon), 1, 65536);
    int hi = to_int("nnodes", nnodes.substr(colon + 1), 1, 65536);
    if (lo > hi) {
      bad(concat("--nnodes ", nnodes, ": expected MIN:MAX with MIN <= MAX"));
    }
    o.nnodes_min = lo;
    o.nnodes = hi;
  } else {
    o.nnodes = to_int("nnodes", nnodes, 1, 65536);
    o.nnodes_min = o.nnodes;
  }
  o.rdzv_last_call = to_seconds("rdzv-last-call", parsed["rdzv-last-call"].as<std::string>(), 0);
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
  o.rdzv_backend = parsed["rdzv-backend"].as<std::string>();
  if (o.rdzv_backend != "static" && o.rdzv_backend != "c10d") {
    bad(concat("--rdzv-backend: expected static or c10d (both use lockstep's store on node 0), "
               "but got '", o.rdzv_backend, "'"));
  }
  if (auto endpoint = parsed["rdzv-endpoint"].as<std::string>(); !endpoint.empty()) {
    auto [host, port] = parse_endpoint(endpoint, o.rdzv_backend == "c10d" ? 29400 : -1);
    o.master_addr = host;
    o.master_port = port;
    if (o.master_port == 0 && o.node_rank != 0) {
      bad(concat("--rdzv-endpoint ", endpoint, ": only node 0 may pick a free port (0); node ",
                 o.node_rank, " needs the port node 0 printed"));
    }
  }
  if (o.rdzv_backend == "c10d" && o.nnodes > 1 && parsed.count("node-rank") == 0 &&
      pet("PET_NODE_RANK", "").empty()) {
    bad(concat("--rdzv-backend c10d with --nnodes ", o.nnodes, ": lockstep-run does not hand "
               "out node ranks on arrival; give every node its --node-rank (0 hosts the store "
               "at the endpoint)"));
  }
  o.standalone = parsed.count("standalone") > 0;
  if (o.standalone) {
    if (o.nnodes != 1 || o.nnodes_min != 1) {
      bad(concat("--standalone runs a single node, but --nnodes is ", nnodes));
    }
    o.master_addr = "127.0.0.1";
    o.master_port = 0;
  }
  o.max_restarts = to_int("max-restarts", parsed["max-restarts"].as<std::string>(), 0, 1000000);
  o.run_id = parsed["run-id"].as<std::string>();
  const std::string rdzv_id = parsed["rdzv-id"].as<std::string>();
  const bool run_id_set = parsed.count("run-id") > 0 || !pet("PET_RUN_ID", "").empty();
  if (rdzv_id != "none" && rdzv_id != o.run_id) {
    if (run_id_set) {
      bad(concat("--rdzv-id ", rdzv_id, " and --run-id ", o.run_id, " name the same job id "
                 "differently; give one of them"));
    }
    o.run_id = rdzv_id;
  }
  if (o.run_id.empty() || o.run_id.find('/') != std::string::npos) {
    bad(concat("--run-id: expected a non-empty id without '/', but got '", o.run_id, "'"));
  }
  o.log_dir = parsed["log-dir"].as<std::string>();
  o.redirects = parse_std_spec("redirects", parsed["redirects"].as<std::string>());
  o.redirects.given = parsed.count("redirects") > 0 || !pet("PET_REDIRECTS", "").empty();
  o.tee = parse_std_spec("tee", parsed["tee"].as<std::string>());
  o.tee.given = parsed.count("tee") > 0 || !pet("PET_TEE", "").empty();
  o.role = parsed["role"].as<std::string>();
  if (o.role.empty()) bad("--role: expected a non-empty role name, but got ''");
  o.monitor_interval =
      to_seconds("monitor-interval", parsed["monitor-interval"].as<std::string>(), 0.001);
  o.grace_period = to_seconds("grace-period", parsed["grace-period"].as<std::string>(), 0);
  o.rdzv_timeout = to_seconds("rdzv-timeout", parsed["rdzv-timeout"].as<std::string>(), 0.1);
  o.heartbeat_timeout =
      to_seconds("heartbeat-timeout", parsed["heartbeat-timeout"].as<std::string>(), 0);
  if (o.heartbeat_timeout > 0 && o.heartbeat_timeout < 2 * o.monitor_interval) {
    bad(concat("--heartbeat-timeout ", o.heartbeat_timeout, ": expected 0 (off) or at least twice "
               "--monitor-interval (", o.monitor_interval, " s), so that a node beats between "
               "two checks"));
  }
  o.dry_run = parsed.count("dry-run") > 0;
  o.quiet = parsed.count("quiet") > 0;
  if (o.program.empty()) {
    bad("no program to run: expected `lockstep-run [options] -- program [args...]`");
  }
  return result;
}

std::string stdout_tty_env(const StreamPlan& plan, bool launcher_stdout_is_tty) {
  return plan.console[0] && launcher_stdout_is_tty ? "1" : "0";
}

EnvMap worker_env(const RunOptions& options, const RoundLayout& layout, int local_rank,
                  const std::string& error_file, const EnvMap& env, int cpu_count) {
  EnvMap add;
  auto str = [](auto v) { return std::to_string(v); };
  add["RANK"] = str(layout.rank_offset + local_rank);
  add["LOCAL_RANK"] = str(local_rank);
  add["WORLD_SIZE"] = str(layout.world_size);
  add["LOCAL_WORLD_SIZE"] = str(options.nproc_per_node);
  add["GROUP_RANK"] = str(layout.group_rank);
  add["GROUP_WORLD_SIZE"] = str(layout.group_world_size);
  add["ROLE_NAME"] = options.role;
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
