// lockstep::Store: a handle over a KeyValueStore (c10d's through the adapter, or lockstep's
// own), with key prefixes and errors that name the store and the key.
#include "lockstep/store.h"

#include "adapter/torch_adapter.h"
#include "comm/foreign_error.h"
#include "comm/store_impl.h"
#include "comm/store_token.h"
#include "comm/tcp_store_client.h"
#include "comm/tcp_store_server.h"
#include "lockstep/env_vars.h"
#include "lockstep/errors.h"
#include "lockstep/log.h"

namespace lockstep {

using detail::concat;

namespace {

// Store::prefixed: every key gets `prefix + "/"` in front.
class PrefixedKeyValueStore : public detail::KeyValueStore {
 public:
  PrefixedKeyValueStore(std::string prefix, std::shared_ptr<detail::KeyValueStore> base)
      : prefix_(std::move(prefix) + "/"), base_(std::move(base)) {}

  void set(const std::string& key, const std::string& value) override {
    base_->set(prefix_ + key, value);
  }
  std::string get(const std::string& key) override { return base_->get(prefix_ + key); }
  int64_t add(const std::string& key, int64_t delta) override {
    return base_->add(prefix_ + key, delta);
  }
  std::string compare_set(const std::string& key, const std::string& expected,
                          const std::string& desired) override {
    return base_->compare_set(prefix_ + key, expected, desired);
  }
  bool check(const std::vector<std::string>& keys) override { return base_->check(scoped(keys)); }
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override {
    base_->wait(scoped(keys), timeout);
  }
  bool remove(const std::string& key) override { return base_->remove(prefix_ + key); }
  int64_t num_keys() override { return base_->num_keys(); }
  std::chrono::milliseconds timeout() const override { return base_->timeout(); }
  void set_timeout(std::chrono::milliseconds timeout) override { base_->set_timeout(timeout); }

 private:
  std::vector<std::string> scoped(const std::vector<std::string>& keys) const {
    std::vector<std::string> out;
    out.reserve(keys.size());
    for (const auto& k : keys) out.push_back(prefix_ + k);
    return out;
  }
  std::string prefix_;
  std::shared_ptr<detail::KeyValueStore> base_;
};

// lockstep's own TCP store: a client, and the server when this process hosts it.
class LockstepTcpStore : public detail::KeyValueStore {
 public:
  LockstepTcpStore(std::shared_ptr<comm::TcpStoreServer> server,
                   std::unique_ptr<comm::TcpStoreClient> client)
      : server_(std::move(server)), client_(std::move(client)) {}

  void set(const std::string& key, const std::string& value) override { client_->set(key, value); }
  std::string get(const std::string& key) override { return client_->get(key); }
  int64_t add(const std::string& key, int64_t delta) override { return client_->add(key, delta); }
  std::string compare_set(const std::string& key, const std::string& expected,
                          const std::string& desired) override {
    return client_->compare_set(key, expected, desired);
  }
  bool check(const std::vector<std::string>& keys) override { return client_->check(keys); }
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override {
    client_->wait(keys, forever_if_zero(timeout));
  }
  bool remove(const std::string& key) override { return client_->remove(key); }
  int64_t num_keys() override { return client_->num_keys(); }
  std::chrono::milliseconds timeout() const override { return client_->timeout(); }
  void set_timeout(std::chrono::milliseconds timeout) override {
    client_->set_timeout(forever_if_zero(timeout));
  }

 private:
  // c10d's kNoTimeout (0) means "wait forever"; lockstep's client reads 0 as "do not wait".
  static std::chrono::milliseconds forever_if_zero(std::chrono::milliseconds t) {
    return t.count() == 0 ? std::chrono::hours(24 * 365) : t;
  }
  std::shared_ptr<comm::TcpStoreServer> server_;  // first: outlives the client's connection
  std::unique_ptr<comm::TcpStoreClient> client_;
};

// Runs a store operation, turning foreign exceptions into lockstep's with the store's address.
template <typename F>
auto store_call(const Store::Impl& impl, const char* op, const std::string& key, F&& f) {
  try {
    return f();
  } catch (const lockstep::Error&) {
    throw;
  } catch (const std::exception& e) {
    std::string msg = concat("store ", op, "('", key, "') on ", impl.description, " failed: ",
                             e.what());
    if (comm::looks_like_timeout(e.what())) {
      throw TimeoutError(msg + ". A rank may not have started or may have died; check every "
                               "rank's log, or raise LOCKSTEP_RENDEZVOUS_TIMEOUT.");
    }
    throw CommError(msg + ". The store server (rank 0 or the launcher) may have exited.");
  }
}

}  // namespace

std::string generate_store_token() { return comm::generate_store_token(); }

std::string store_token_to_hex(const std::string& token) { return comm::store_token_to_hex(token); }

std::string store_token_from_environment(const EnvMap& env) {
  auto value = [&](const char* name) {
    auto it = env.find(name);
    return it == env.end() ? std::string() : it->second;
  };
  const std::string hex = value(env::kStoreToken);
  const std::string file = value(env::kStoreTokenFile);
  LOCKSTEP_CHECK(hex.empty() || file.empty(), "Expected at most one of ", env::kStoreToken,
                 " and ", env::kStoreTokenFile, ", but both are set. Unset one of them.");
  if (!hex.empty()) return comm::store_token_from_hex(hex, env::kStoreToken);
  if (!file.empty()) return comm::read_store_token_file(file);
  return "";
}

namespace {

Store::Impl c10d_tcp(const std::string& host, int port, bool is_server,
                     std::chrono::milliseconds timeout) {
  Store::Impl impl;
  try {
    impl.kv = adapter::make_c10d_tcp_store(host, port, is_server, timeout, &impl.port);
  } catch (const std::exception& e) {
    auto first_line = comm::brief(e);
    if (is_server) {
      throw CommError(concat("Could not host the rendezvous store on ", host, ":", port, ": ",
                             first_line, ". The port is probably in use by another job; pick a "
                             "free MASTER_PORT (or use lockstep-run --standalone)."));
    }
    throw TimeoutError(concat("Could not reach the rendezvous store at ", host, ":", port,
                              " within ", timeout.count() / 1000.0, " s: ", first_line,
                              ". Check MASTER_ADDR/MASTER_PORT, that rank 0 (or the launcher) "
                              "is running, and that no firewall blocks the port."));
  }
  return impl;
}

Store::Impl lockstep_tcp(const std::string& host, int port, bool is_server,
                         std::chrono::milliseconds timeout, const TcpStoreOptions& options) {
  Store::Impl impl;
  std::shared_ptr<comm::TcpStoreServer> server;
  std::string connect_host = host;
  if (is_server) {
    const std::string listen =
        options.listen_address().empty() ? host : options.listen_address();
    auto server_options = comm::TcpStoreServerOptions().host(listen).port(port);
    if (options.token().empty()) {
      server_options.no_authentication(true);
    } else {
      server_options.token(options.token());
    }
    server = std::make_shared<comm::TcpStoreServer>(server_options);  // errors name host:port
    if (options.token().empty()) {
      log_warn(concat("the rendezvous store on ", server->describe(), " has no job token: any "
                      "process that reaches ", server->bound_address(), " can read and write "
                      "this job's keys. Launch with lockstep-run (it sets one), or give every "
                      "rank the same ", env::kStoreTokenFile, " (docs/reliability.md)."));
    }
    port = server->port();
    if (listen == "0.0.0.0" || listen == "::") connect_host = "127.0.0.1";
  }
  auto client = std::make_unique<comm::TcpStoreClient>(
      connect_host, port,
      comm::TcpStoreClientOptions().token(options.token()).connect_timeout(timeout).timeout(
          timeout));
  impl.port = port;
  impl.kv = std::make_shared<LockstepTcpStore>(std::move(server), std::move(client));
  return impl;
}

}  // namespace

Store Store::tcp(const std::string& host, int port, bool is_server,
                 std::chrono::milliseconds timeout, const TcpStoreOptions& options) {
  LOCKSTEP_CHECK(port >= 0 && port <= 65535, "Expected a TCP store port in [0, 65535], but got ",
                 port, ".");
  LOCKSTEP_CHECK(is_server || port > 0, "Expected a port > 0 to connect to the store at ", host,
                 ", but got 0.");
  LOCKSTEP_CHECK(!options.c10d() || options.token().empty(), "A c10d TCPStore cannot check a "
                 "job token; pass either TcpStoreOptions::c10d or a token, not both.");
  auto impl = std::make_shared<Impl>(options.c10d()
                                         ? c10d_tcp(host, port, is_server, timeout)
                                         : lockstep_tcp(host, port, is_server, timeout, options));
  impl->description = concat("tcp://", host, ":", impl->port);
  return Store(impl);
}

Store Store::file(const std::string& path, int world_size, std::chrono::milliseconds timeout) {
  LOCKSTEP_CHECK(!path.empty(), "Expected a file store path, but got an empty one.");
  LOCKSTEP_CHECK(world_size >= 1, "Expected world size >= 1 for the file store ", path,
                 ", but got ", world_size, ".");
  auto impl = std::make_shared<Impl>();
  try {
    impl->kv = adapter::make_c10d_file_store(path, world_size, timeout);
  } catch (const std::exception& e) {
    throw CommError(concat("Could not open the file store ", path, ": ", e.what(),
                           ". Check that its directory exists and is writable by every rank."));
  }
  impl->description = "file://" + path;
  return Store(impl);
}

Store Store::hash(std::chrono::milliseconds timeout) {
  auto impl = std::make_shared<Impl>();
  impl->kv = adapter::make_c10d_hash_store(timeout);
  impl->description = "hash://in-process";
  return Store(impl);
}

Store Store::prefixed(const std::string& prefix) const {
  auto impl = std::make_shared<Impl>();
  impl->kv = std::make_shared<PrefixedKeyValueStore>(prefix, impl_->kv);
  impl->description = impl_->description + "/" + prefix;
  impl->port = impl_->port;
  return Store(impl);
}

void Store::set(const std::string& key, const std::string& value) {
  store_call(*impl_, "set", key, [&] {
    impl_->kv->set(key, value);
    return 0;
  });
}

std::string Store::get(const std::string& key) {
  return store_call(*impl_, "get", key, [&] { return impl_->kv->get(key); });
}

int64_t Store::add(const std::string& key, int64_t delta) {
  return store_call(*impl_, "add", key, [&] { return impl_->kv->add(key, delta); });
}

bool Store::check(const std::vector<std::string>& keys) {
  return store_call(*impl_, "check", keys.empty() ? "" : keys.front(),
                    [&] { return impl_->kv->check(keys); });
}

void Store::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  store_call(*impl_, "wait", keys.empty() ? "" : keys.front(), [&] {
    impl_->kv->wait(keys, timeout);
    return 0;
  });
}

bool Store::remove(const std::string& key) {
  return store_call(*impl_, "delete", key, [&] { return impl_->kv->remove(key); });
}

std::chrono::milliseconds Store::timeout() const { return impl_->kv->timeout(); }

void Store::set_timeout(std::chrono::milliseconds timeout) { impl_->kv->set_timeout(timeout); }

int Store::port() const { return impl_->port; }

std::string Store::describe() const { return impl_->description; }

}  // namespace lockstep
