// The launchers' round protocol (see rounds.h, Note [lockstep-run rounds]).
#include "rounds.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <sstream>
#include <nlohmann/json.hpp>

#include "lockstep/env_vars.h"
#include "lockstep/errors.h"
#include "lockstep/store.h"

namespace lockstep {
namespace run {
namespace {

using Clock = std::chrono::steady_clock;
using detail::concat;
using nlohmann::json;

// Fails with one line when `port` is taken, before c10d's TCPStore logs its own bind
// warnings; binds like TCPStore does (SO_REUSEADDR), so a port in TIME_WAIT still counts free.
void check_port_free(int port) {
  if (port == 0) return;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  int rc = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  int err = errno;
  close(fd);
  if (rc != 0 && err == EADDRINUSE) {
    throw CommError(concat("cannot host the rendezvous store: --master-port ", port,
                           " is already in use on this host; pick another port, or use "
                           "--standalone (or --master-port 0) for a free one"));
  }
}

std::chrono::milliseconds seconds(double s) {
  return std::chrono::milliseconds(static_cast<long>(s * 1000));
}

}  // namespace

// Note [Job token]
// Every connection to the launcher's store proves it holds the job token (lockstep::Store,
// Note [Store protocol]), and the store listens on --master-addr only (loopback for a
// single-node job). A single-node job makes its own token; the launchers of a multi-node job
// must share one, which only the user can hand out safely: the same LOCKSTEP_STORE_TOKEN_FILE
// (or LOCKSTEP_STORE_TOKEN) on every node. Workers get it as LOCKSTEP_STORE_TOKEN in their
// environment (never on a command line, never in a log).
Rounds::Rounds(const RunOptions& options, const EnvMap& env) : o_(options) {
  token_ = store_token_from_environment(env);
  if (token_.empty()) {
    if (o_.nnodes > 1) {
      throw InvalidArgument(concat(
          "a job of ", o_.nnodes, " nodes needs a job token that every node's launcher shares, "
          "so that nobody else can join its store: write one to a file only you can read on "
          "every node (head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > ~/.lockstep-token; "
          "chmod 600 ~/.lockstep-token) and set ", env::kStoreTokenFile,
          "=~/.lockstep-token (or ", env::kStoreToken, ") for every lockstep-run"));
    }
    token_ = generate_store_token();
  }
  bool host = o_.node_rank == 0;
  if (host) check_port_free(o_.master_port);
  store_ = std::make_unique<Store>(Store::tcp(o_.master_addr, o_.master_port, host,
                                              seconds(o_.rdzv_timeout),
                                              TcpStoreOptions().token(token_)));
}

int Rounds::port() const { return store_->port(); }

std::string Rounds::describe() const { return store_->describe(); }

std::string Rounds::key(const std::string& name) const {
  return concat("lockstep-run/", o_.run_id, "/", round_, "/", name);
}

std::optional<RoundLayout> Rounds::join(int round, const std::string& host,
                                        const std::function<bool()>& wait) {
  round_ = round;
  members_.clear();
  RoundLayout layout;
  layout.restart_count = round_;
  layout.store_token = token_;
  if (o_.elastic() && store_->check({key("members")})) {
    layout.member = false;  // formed already (Note [Elastic membership], last paragraph)
    return layout;
  }
  if (store_->add(key(concat("claim/", o_.node_rank)), 1) > 1) {
    throw InvalidArgument(concat("node rank ", o_.node_rank, " joined round ", round_,
                                 " twice: every launcher needs a distinct --node-rank"));
  }
  store_->set(key(concat("node/", o_.node_rank)), concat(o_.nproc_per_node, " ", host));
  bool stop = false;
  if (!o_.elastic()) {
    // Everyone, or a timeout naming who is missing.
    auto deadline = Clock::now() + seconds(o_.rdzv_timeout);
    std::vector<std::string> keys;
    for (int k = 0; k < o_.nnodes; ++k) keys.push_back(key(concat("node/", k)));
    while (!store_->check(keys)) {
      if (Clock::now() >= deadline) {
        std::string absent;
        for (int k = 0; k < o_.nnodes; ++k) {
          if (!store_->check({keys[k]})) absent += (absent.empty() ? "" : ", ") + std::to_string(k);
        }
        throw TimeoutError(concat("round ", round_, ": node(s) ", absent, " of ", o_.nnodes,
                                  " did not join within ", o_.rdzv_timeout, " s at ",
                                  store_->describe(), ". Start a launcher with each "
                                  "--node-rank and the same --master-addr/--master-port/"
                                  "--run-id, or raise --rdzv-timeout."));
      }
      if (wait()) return std::nullopt;
    }
    for (int k = 0; k < o_.nnodes; ++k) members_.push_back(k);
  } else {
    members_ = o_.node_rank == 0 ? decide_members(wait, &stop) : await_members(wait, &stop);
    if (stop) return std::nullopt;
    if (std::find(members_.begin(), members_.end(), o_.node_rank) == members_.end()) {
      layout.member = false;
      return layout;
    }
  }
  layout.world_size = 0;
  layout.rank_offset = 0;
  layout.group_world_size = static_cast<int>(members_.size());
  layout.hosts.assign(static_cast<size_t>(o_.nnodes), "");
  for (size_t i = 0; i < members_.size(); ++i) {
    const int k = members_[i];
    const std::string value = store_->get(key(concat("node/", k)));  // "<nproc> <host>"
    const int n = std::stoi(value);
    if (const size_t space = value.find(' '); space != std::string::npos) {
      layout.hosts[static_cast<size_t>(k)] = value.substr(space + 1);
    }
    if (k < o_.node_rank) layout.rank_offset += n;
    if (k == o_.node_rank) layout.group_rank = static_cast<int>(i);
    layout.world_size += n;
  }
  return layout;
}

// Node 0 (Note [Elastic membership], step 1): every node that joined, once MAX did, or once
// MIN did and the last call passed without another.
std::vector<int> Rounds::decide_members(const std::function<bool()>& wait, bool* stop) {
  const auto deadline = Clock::now() + seconds(o_.rdzv_timeout);
  std::vector<int> joined;
  size_t seen = 0;
  auto last_change = Clock::now();
  while (true) {
    joined.clear();
    for (int k = 0; k < o_.nnodes; ++k) {
      if (store_->check({key(concat("node/", k))})) joined.push_back(k);
    }
    if (joined.size() != seen) {
      seen = joined.size();
      last_change = Clock::now();
    }
    const int n = static_cast<int>(joined.size());
    const bool enough = n >= o_.nnodes_min;
    if (n == o_.nnodes || (enough && Clock::now() - last_change >= seconds(o_.rdzv_last_call)) ||
        (enough && Clock::now() >= deadline)) {
      break;
    }
    if (Clock::now() >= deadline) {
      std::string who, absent;
      for (int k = 0; k < o_.nnodes; ++k) {
        bool in = std::find(joined.begin(), joined.end(), k) != joined.end();
        (in ? who : absent) += concat((in ? who : absent).empty() ? "" : ", ", k);
      }
      const std::string text = concat(
          "round ", round_, ": only ", n, " node(s) joined (", who, ") within ", o_.rdzv_timeout,
          " s, fewer than the ", o_.nnodes_min, " that --nnodes ", o_.nnodes_min, ":", o_.nnodes,
          " needs; not joined: node(s) ", absent, ". Start more launchers with the same "
          "--master-addr/--master-port/--run-id, or lower MIN.");
      try {
        store_->set(key("members"), "below-min " + text);
      } catch (const std::exception&) {
      }
      throw TimeoutError(text);
    }
    if (wait()) {
      *stop = true;
      return {};
    }
  }
  std::string list;
  for (int k : joined) list += concat(list.empty() ? "" : " ", k);
  store_->set(key("members"), list);
  return joined;
}

std::vector<int> Rounds::await_members(const std::function<bool()>& wait, bool* stop) {
  const auto deadline = Clock::now() + seconds(o_.rdzv_timeout + o_.rdzv_last_call + 10);
  while (!store_->check({key("members")})) {
    if (Clock::now() >= deadline) {
      throw TimeoutError(concat("round ", round_, ": node 0 did not form the round within ",
                                o_.rdzv_timeout + o_.rdzv_last_call, " s at ",
                                store_->describe(), ". Check node 0's launcher."));
    }
    if (wait()) {
      *stop = true;
      return {};
    }
  }
  const std::string text = store_->get(key("members"));
  if (text.rfind("below-min ", 0) == 0) throw TimeoutError(text.substr(10));
  std::vector<int> members;
  std::istringstream in(text);
  for (int k; in >> k;) members.push_back(k);
  return members;
}

bool Rounds::round_ended(bool* success) {
  if (store_->check({key("failed")})) {
    *success = false;
    return true;
  }
  if (!store_->check({key("members")})) return false;
  std::istringstream in(store_->get(key("members")));
  std::vector<std::string> keys;
  for (int k; in >> k;) keys.push_back(key(concat("done/", k)));
  if (!keys.empty() && store_->check(keys)) {
    *success = true;
    return true;
  }
  return false;
}

std::optional<bool> Rounds::stand_by(const std::function<bool()>& wait) {
  bool success = false;
  if (round_ended(&success)) return success;  // an earlier round: move on without a word
  store_->add(key("waiting"), 1);
  while (!round_ended(&success)) {
    if (wait()) return std::nullopt;
  }
  return success;
}

int64_t Rounds::waiting() {
  if (!o_.elastic()) return 0;
  return guarded([&] { return store_->add(key("waiting"), 0); });
}

void Rounds::beat() {
  if (o_.nnodes > 1) guarded([&] { return store_->add(key(concat("beat/", o_.node_rank)), 1); });
}

int64_t Rounds::beats(int node) {
  return guarded([&] { return store_->add(key(concat("beat/", node)), 0); });
}

void Rounds::share(const WorkerEvent& event) {
  if (o_.nnodes == 1) return;
  try {
    int64_t n = store_->add(key("events"), 1);
    store_->set(key(concat("event/", n)), to_json(event).dump());
  } catch (const std::exception&) {
    lost_ = true;  // the store is gone: the next check of "failed" reports it
  }
}

std::vector<WorkerEvent> Rounds::shared_events() {
  std::vector<WorkerEvent> events;
  if (o_.nnodes == 1) return events;
  try {
    int64_t n = store_->add(key("events"), 0);
    for (int64_t i = 1; i <= n; ++i) {
      auto k = key(concat("event/", i));
      if (!store_->check({k})) continue;  // counted, not yet written
      std::string text = store_->get(k);
      try {
        WorkerEvent e = event_from_json(json::parse(text));
        if (e.node != o_.node_rank) events.push_back(std::move(e));
      } catch (const std::exception&) {
        // A malformed record is no evidence: skip it.
      }
    }
  } catch (const std::exception&) {
    lost_ = true;  // the store is gone: judge from what was read; "failed" reports it
  }
  return events;
}

Failure Rounds::read_failure() {
  std::string text = store_->get(key("failure"));
  try {
    return failure_from_json(json::parse(text));
  } catch (const std::exception& e) {
    Failure f;
    f.root.exit_code = 1;
    f.what = concat("another launcher published a failure record that cannot be read (",
                    e.what(), ")");
    return f;
  }
}

Failure Rounds::publish(const Failure& failure) {
  try {
    if (store_->add(key("failed"), 1) == 1) {
      store_->set(key("failure"), to_json(failure).dump());
      return failure;
    }
    return read_failure();
  } catch (const std::exception&) {
    lost_ = true;
    return failure;  // the store is gone: report what we saw
  }
}

std::optional<Failure> Rounds::published() {
  if (!guarded([&] { return store_->check({key("failed")}); })) return std::nullopt;
  return guarded([&] { return read_failure(); });
}

void Rounds::set_done() {
  guarded([&] {
    store_->set(key(concat("done/", o_.node_rank)), "1");
    return 0;
  });
}

bool Rounds::all_done() {
  std::vector<std::string> keys;
  for (int k : members_) keys.push_back(key(concat("done/", k)));
  return guarded([&] { return store_->check(keys); });
}

void Rounds::exit_handshake(const std::function<void()>& wait) {
  // Once lost, the store is not called again: a new connection would retry for the whole
  // connect timeout before giving up.
  if (o_.nnodes == 1 || lost_) return;
  try {
    store_->set(key(concat("exit/", o_.node_rank)), "1");
    if (o_.node_rank != 0) return;
    std::vector<std::string> keys;
    for (int k : members_) keys.push_back(key(concat("exit/", k)));
    auto deadline = Clock::now() + std::chrono::seconds(10);
    while (!store_->check(keys) && Clock::now() < deadline) wait();
  } catch (const std::exception&) {
  }
}

}  // namespace run
}  // namespace lockstep
