// init_process_group and the new_*_group factories: the launch environment, the store, the
// rendezvous checks (Note [Rendezvous checks]) and the choice of transport.
#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <thread>

#include "adapter/torch_adapter.h"
#include "comm/gloo_group.h"
#include "comm/nccl_group.h"
#include "comm/shm_group.h"
#include "lockstep/env_vars.h"
#include "lockstep/errors.h"
#include "lockstep/log.h"
#include "lockstep/process_group.h"

namespace lockstep {

using detail::concat;

// ---------------------------------------------------------------------------------------------
// init_process_group

namespace {

std::chrono::milliseconds duration_from_env(const EnvMap& env, const char* name,
                                            std::chrono::milliseconds fallback) {
  auto it = env.find(name);
  if (it == env.end() || it->second.empty()) return fallback;
  char* end = nullptr;
  double seconds = std::strtod(it->second.c_str(), &end);
  LOCKSTEP_CHECK(end != it->second.c_str() && *end == '\0' && seconds > 0,
                 "Expected ", name, " to be a positive number of seconds, but got '",
                 it->second, "'.");
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

std::string env_or(const EnvMap& env, const char* name, const std::string& fallback) {
  auto it = env.find(name);
  return it == env.end() || it->second.empty() ? fallback : it->second;
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
}

std::string host_identity() {
  char name[256] = {0};
  gethostname(name, sizeof(name) - 1);
  return concat(name, ":", getpid());
}

// Note [Rendezvous checks]
// Before Gloo connects, every rank announces itself under the group's scoped store:
//   1. add("claims/<r>", 1): a result above 1 means rank r was claimed twice; the second
//      claimant publishes the failure under "abort" (fail_rendezvous), and everyone polling
//      sees "abort" and fails with that reason; so do the world-size checks below.
//   2. set("world_size/<r>", W) and add("joined", 1).
//   3. poll until every rank 0..W-1 has announced, comparing each peer's world size with
//      ours as soon as it appears (fail fast on a mismatch), and "joined" with W (more ranks
//      than W means some rank believes in a larger world). Deadline: the rendezvous timeout,
//      after which the error lists the ranks that never joined.
// Polling backs off from 1 ms to 50 ms; the store has no multi-key "wait for any".
//   The host identity (for the shared-memory transport) is set before "joined", so once
//   every rank has joined, every "hostid/<r>" can be read without waiting.
// A rendezvous failure every rank must report: publish it under "abort" so that peers fail
// with the same reason instead of a later timeout, then linger (at most 2 s) until every rank
// that joined has seen it, because the rank hosting the store must not exit (taking the store
// with it) before its peers have read the reason. `joined_self`: this rank is one of "joined".
[[noreturn]] void fail_rendezvous(Store& store, const std::string& message, bool joined_self) {
  try {
    if (!store.check({"abort"})) store.set("abort", message);
    if (joined_self) {
      int64_t seen = store.add("abort_seen", 1);
      auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
      while (seen < store.add("joined", 0) && std::chrono::steady_clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        seen = store.add("abort_seen", 0);
      }
    }
  } catch (const Error&) {
    // The store is gone: nobody is left to tell.
  }
  throw InvalidArgument(message);
}

void rendezvous_checks(Store& store, int rank, int size, std::chrono::milliseconds timeout,
                       const std::string& host_id) {
  auto where = concat("[rank ", rank, "/", size, "]");
  if (store.add(concat("claims/", rank), 1) > 1) {
    fail_rendezvous(store,
                    concat(where, " rendezvous at ", store.describe(), ": rank ", rank,
                           " was already claimed by another process (the second claimant is ",
                           host_identity(), "). Each process needs a distinct RANK; check the "
                           "launcher's configuration."),
                    /*joined_self=*/false);
  }
  store.set(concat("world_size/", rank), concat(size));
  store.set(concat("host/", rank), host_identity());
  store.set(concat("hostid/", rank), host_id);
  store.add("joined", 1);

  std::vector<bool> seen(size, false);
  int missing = size;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  auto backoff = std::chrono::milliseconds(1);
  while (true) {
    if (store.check({"abort"})) {
      fail_rendezvous(store, concat(where, " rendezvous failed because a peer found: ",
                                    store.get("abort")),
                      /*joined_self=*/true);
    }
    for (int peer = 0; peer < size; ++peer) {
      if (seen[peer]) continue;
      auto key = concat("world_size/", peer);
      if (!store.check({key})) continue;
      auto theirs = store.get(key);
      if (theirs != concat(size)) {
        fail_rendezvous(store,
                        concat(where, " rendezvous at ", store.describe(),
                               ": world sizes disagree: rank ", peer, " says ", theirs,
                               ", rank ", rank, " says ", size,
                               ". Every rank must be started with the same WORLD_SIZE."),
                        /*joined_self=*/true);
      }
      seen[peer] = true;
      --missing;
    }
    int64_t joined = store.add("joined", 0);
    if (joined > size) {
      fail_rendezvous(store,
                      concat(where, " rendezvous at ", store.describe(), ": ", joined,
                             " ranks joined a group of world size ", size,
                             ": some rank was started with a larger WORLD_SIZE."),
                      /*joined_self=*/true);
    }
    if (missing == 0) return;
    if (std::chrono::steady_clock::now() >= deadline) {
      std::string absent;
      for (int peer = 0; peer < size; ++peer) {
        if (!seen[peer]) absent += (absent.empty() ? "" : ", ") + std::to_string(peer);
      }
      throw TimeoutError(concat(where, " rendezvous at ", store.describe(), " timed out after ",
                             timeout.count() / 1000.0, " s: rank(s) ", absent, " of ", size,
                             " never joined. Check that every rank started and reaches the "
                             "store, or raise LOCKSTEP_RENDEZVOUS_TIMEOUT."));
    }
    std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, std::chrono::milliseconds(50));
  }
}

bool truthy(const EnvMap& env, const char* name) {
  auto v = env_or(env, name, "");
  return v == "1" || v == "true" || v == "True" || v == "TRUE";
}

// Note [Which store protocol]
// lockstep's own store (authenticated by the job token, listening on MASTER_ADDR itself, so a
// loopback master is reachable from this machine only) whenever lockstep hosts the store: rank
// 0, or lockstep-run (LOCKSTEP_AGENT_STORE). torchrun's agent store
// (TORCHELASTIC_USE_AGENT_STORE without LOCKSTEP_AGENT_STORE) is c10d's TCPStore, which
// cannot authenticate: workers join it with c10d's protocol, and its exposure is torchrun's.
TcpStoreOptions store_options(const EnvMap& env, const LaunchEnv& launch) {
  TcpStoreOptions o;
  if (launch.launcher_hosts_store && !truthy(env, env::kAgentStore)) return o.c10d(true);
  o.token(store_token_from_environment(env));
  o.listen_address(launch.master_addr);
  return o;
}

struct Timeouts {
  std::chrono::milliseconds collective;
  std::chrono::milliseconds rendezvous;
};

Timeouts resolve_timeouts(const ProcessGroupOptions& options, const EnvMap& env) {
  Timeouts t;
  t.collective = options.timeout().count() > 0
                     ? options.timeout()
                     : duration_from_env(env, env::kTimeout, std::chrono::seconds(300));
  t.rendezvous = options.rendezvous_timeout().count() > 0
                     ? options.rendezvous_timeout()
                     : duration_from_env(env, env::kRendezvousTimeout, std::chrono::seconds(120));
  return t;
}

// The interface Gloo binds to: the option, LOCKSTEP_SOCKET_IFNAME, GLOO_SOCKET_IFNAME; else
// loopback when the master is local, else the address this host's name resolves to.
adapter::GlooDeviceSpec resolve_device(const ProcessGroupOptions& options, const EnvMap& env,
                                       const std::string& master_addr) {
  adapter::GlooDeviceSpec device;
  device.ifname = options.socket_ifname();
  if (device.ifname.empty()) device.ifname = env_or(env, env::kSocketIfname, "");
  if (device.ifname.empty()) device.ifname = env_or(env, "GLOO_SOCKET_IFNAME", "");
  if (device.ifname.empty()) {
    if (is_loopback(master_addr)) {
      device.hostname = "127.0.0.1";
    } else {
      char name[256] = {0};
      gethostname(name, sizeof(name) - 1);
      device.hostname = name;
    }
  }
  return device;
}

std::string resolve_transport(const ProcessGroupOptions& options, const EnvMap& env) {
  std::string t = options.transport();
  const char* source = "ProcessGroupOptions::transport";
  if (t.empty()) {
    t = env_or(env, env::kTransport, "auto");
    source = env::kTransport;
  }
  LOCKSTEP_CHECK(t == "gloo" || t == "shm" || t == "nccl" || t == "auto", "Expected ", source,
                 " to be gloo, shm, nccl or auto, but got '", t, "'.");
  return t;
}

// Rendezvous, then the transport (Note [Rendezvous checks]): "gloo"; "shm" (shared memory on
// one host, hierarchical over several); "auto" = "shm" unless no two ranks share a host, and,
// when lockstep has its NCCL adapter, CUDA tensors over NCCL where every rank has its own GPU;
// "nccl" = "auto" for CPU tensors and NCCL for CUDA ones (Note [CUDA routing]).
ProcessGroupPtr connect(int rank, int size, const std::shared_ptr<Store>& store,
                        const ProcessGroupOptions& options, const Timeouts& timeouts,
                        const adapter::GlooDeviceSpec& device, const std::string& transport,
                        const std::string& job_id) {
  const std::string where = concat("[rank ", rank, "/", size, "]");
  if (transport == "nccl") comm::plan_cuda_route("nccl", adapter::nccl_compiled(), {}, where);
  store->set_timeout(timeouts.rendezvous);
  std::string host_id = options.host_id().empty() ? shm::host_identity() : options.host_id();
  rendezvous_checks(*store, rank, size, timeouts.rendezvous, host_id);
  // By value: the hierarchical group keeps it to build the leader groups of its subgroups.
  auto gloo = [collective = timeouts.collective, threads = options.threads(), device](
                  int r, int n, const std::shared_ptr<Store>& s) {
    return comm::make_gloo_group(r, n, std::make_shared<Store>(s->prefixed("gloo")), collective,
                                 threads, device);
  };
  std::vector<std::string> hosts;
  for (int r = 0; r < size; ++r) {
    hosts.push_back(r == rank ? host_id : store->get(concat("hostid/", r)));
  }
  const std::string host_transport = transport == "nccl" ? "auto" : transport;
  // The group for CPU tensors of ranks on these hosts; also builds the subgroups' own.
  comm::HostGroupFactory make_host = [=](const std::vector<std::string>& host_of_rank,
                                         int sub_rank,
                                         const std::shared_ptr<Store>& s) -> ProcessGroupPtr {
    const int n = static_cast<int>(host_of_rank.size());
    if (host_transport == "gloo") return gloo(sub_rank, n, s);
    shm::GroupSpec spec;
    spec.rank = sub_rank;
    spec.size = n;
    spec.store = s;
    spec.timeout = timeouts.collective;
    spec.rendezvous_timeout = timeouts.rendezvous;
    spec.job_id = job_id.empty() ? "default" : job_id;
    spec.make_leader_group = gloo;
    spec.host_of_rank = host_of_rank;
    if (host_transport == "auto" && n > 1) {
      auto sorted = spec.host_of_rank;
      std::sort(sorted.begin(), sorted.end());
      if (std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end()) {
        return gloo(sub_rank, n, s);  // every rank alone on its host
      }
    }
    return shm::make_group(spec);
  };
  const bool route_cuda = transport == "nccl" || (transport == "auto" && adapter::nccl_compiled());
  if (route_cuda) adapter::prepare_nccl_environment();  // Note [NCCL adapter]: before threads
  auto host = make_host(hosts, rank, store);
  if (!route_cuda) return host;
  return comm::make_cuda_routing_group(std::move(host), transport, std::move(hosts),
                                       timeouts.rendezvous, std::move(make_host));
}

}  // namespace

namespace {

// new_gloo_group and new_shm_group: a group of `transport` over a store the caller provides.
ProcessGroupPtr new_group_over_store(const char* caller, const char* transport, int rank,
                                     int size, const std::shared_ptr<Store>& store,
                                     const ProcessGroupOptions& options) {
  LOCKSTEP_CHECK(store != nullptr, caller, ": expected a store, but got null.");
  LOCKSTEP_CHECK(size >= 1 && rank >= 0 && rank < size, caller,
                 ": expected 0 <= rank < size, but got rank ", rank, " size ", size, ".");
  EnvMap env = options.environment().empty() ? process_environment() : options.environment();
  return connect(rank, size, store, options, resolve_timeouts(options, env),
                 resolve_device(options, env, "127.0.0.1"), transport, options.job_id());
}

}  // namespace

ProcessGroupPtr new_gloo_group(int rank, int size, std::shared_ptr<Store> store,
                               const ProcessGroupOptions& options) {
  return new_group_over_store("new_gloo_group", "gloo", rank, size, store, options);
}

ProcessGroupPtr new_shm_group(int rank, int size, std::shared_ptr<Store> store,
                              const ProcessGroupOptions& options) {
  return new_group_over_store("new_shm_group", "shm", rank, size, store, options);
}

ProcessGroupPtr init_process_group(const ProcessGroupOptions& options) {
  EnvMap env = options.environment().empty() ? process_environment() : options.environment();
  LaunchOverrides overrides;
  if (options.rank() >= 0) overrides.rank = options.rank();
  if (options.world_size() >= 0) overrides.world_size = options.world_size();

  const std::string& method = options.init_method();
  std::string file_path;
  if (options.store() == nullptr) {
    if (method.rfind("tcp://", 0) == 0) {
      auto hostport = method.substr(6);
      auto colon = hostport.rfind(':');
      LOCKSTEP_CHECK(colon != std::string::npos && colon > 0,
                     "Expected init_method 'tcp://host:port', but got '", method, "'.");
      overrides.master_addr = hostport.substr(0, colon);
      char* end = nullptr;
      long port = std::strtol(hostport.c_str() + colon + 1, &end, 10);
      LOCKSTEP_CHECK(*end == '\0' && port >= 1 && port <= 65535,
                     "Expected a port in [1, 65535] in init_method '", method, "'.");
      overrides.master_port = static_cast<int>(port);
    } else if (method.rfind("file://", 0) == 0) {
      file_path = method.substr(7);
      LOCKSTEP_CHECK(!file_path.empty(), "Expected init_method 'file:///path', but got '", method,
                     "'.");
    } else {
      LOCKSTEP_CHECK(method == "env://", "Expected init_method 'env://', 'tcp://host:port' or "
                     "'file:///path', but got '", method, "'.");
    }
  }
  LaunchEnv launch = resolve_launch_env(env, overrides);
  set_log_rank(launch.rank, launch.world_size);
  Timeouts timeouts = resolve_timeouts(options, env);

  std::shared_ptr<Store> base = options.store();
  if (!base) {
    if (!file_path.empty()) {
      base = std::make_shared<Store>(Store::file(file_path, launch.world_size, timeouts.rendezvous));
    } else if (launch.single_process) {  // nobody else joins: no listening socket
      base = std::make_shared<Store>(Store::hash(timeouts.rendezvous));
    } else {
      bool host = launch.rank == 0 && !launch.launcher_hosts_store;
      base = std::make_shared<Store>(Store::tcp(launch.master_addr, launch.master_port, host,
                                                timeouts.rendezvous,
                                                store_options(env, launch)));
    }
  }
  std::string job = options.job_id().empty() ? launch.job_id : options.job_id();
  auto scoped = std::make_shared<Store>(
      base->prefixed(concat("lockstep/", job, "/", launch.restart_count)));
  auto device = resolve_device(options, env, launch.master_addr);
  auto transport = resolve_transport(options, env);
  auto pg = connect(launch.rank, launch.world_size, scoped, options, timeouts, device, transport,
                    job);
  // One short line per job (rank 0); every rank's details at debug level.
  log_debug(concat("process group ready: ", launch.describe(), "; store ", base->describe(),
                   "; transport ", pg->backend(), " (", transport, "); gloo on ",
                   device.ifname.empty() ? device.hostname : device.ifname,
                   "; LibTorch ", adapter::torch_version()));
  if (launch.rank == 0) {
    log_info(concat("process group ready: ", launch.world_size,
                    launch.world_size == 1 ? " rank, " : " ranks, ", pg->backend(), ", via ",
                    launch.launcher,
                    launch.restart_count > 0 ? concat(", restart ", launch.restart_count) : ""));
  }
  return pg;
}

}  // namespace lockstep
