#pragma once
/// \file
/// `lockstep::Store`: the key-value store ranks rendezvous through: lockstep's own TCP store
/// (authenticated by a per-job token, Note [Store protocol] in lib/src/comm/store_protocol.h),
/// c10d's TCPStore as a client of torchrun's agent store, c10d's FileStore and HashStore,
/// all behind a pimpl, so no c10d header leaks into user code. A Store is a cheap, shared
/// handle: copies refer to the same store. Thread-safe.

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/launch_env.h"
#include "lockstep/options.h"

namespace lockstep {

/// Options of `Store::tcp`: `TcpStoreOptions().token(t).listen_address("10.0.0.5")`.
struct TcpStoreOptions {
  /// The job token (raw bytes, at least 32): the server admits only clients that prove they
  /// hold it, and a client talks only to a server that proves it too (HMAC challenge-response;
  /// the token never crosses the wire). "" (default): no authentication; a server then logs
  /// once that anyone who reaches its address can read and write the job's keys.
  LOCKSTEP_ARG(std::string, token) = "";
  /// The address a server listens on; "" (default): `host` itself, so a store hosted on a
  /// loopback address is reachable from this machine only. "0.0.0.0" listens on every
  /// interface, only when asked for.
  LOCKSTEP_ARG(std::string, listen_address) = "";
  /// Speak c10d's TCPStore protocol (no authentication, c10d's exposure) instead of
  /// lockstep's: to join torchrun's agent store. Default false.
  LOCKSTEP_ARG(bool, c10d) = false;
};

/// A new random job token: 32 bytes from the kernel's random source.
std::string generate_store_token();
/// `token` as lower-case hex, the form LOCKSTEP_STORE_TOKEN and token files hold.
std::string store_token_to_hex(const std::string& token);
/// The job token `env` gives (LOCKSTEP_STORE_TOKEN in hex, or LOCKSTEP_STORE_TOKEN_FILE
/// naming a file of mode 0600 or stricter; empty values count as unset), or "" when it gives
/// none. Throws InvalidArgument when both are set, the text is not hex of at least 32 bytes,
/// or the file is missing or readable by others; no message repeats the token.
std::string store_token_from_environment(const EnvMap& env);

class Store {
 public:
  struct Impl;

  /// Connects to (or, with `is_server`, hosts and connects to) a TCP store at host:port.
  /// `port` 0 with `is_server` binds an ephemeral port; read it back with `port()`.
  /// Throws TimeoutError naming host:port when the server cannot be reached within `timeout`,
  /// CommError when `is_server` and the port is in use, InvalidArgument when the server
  /// refuses this client's token (or cannot prove it holds the token itself).
  static Store tcp(const std::string& host, int port, bool is_server,
                   std::chrono::milliseconds timeout,
                   const TcpStoreOptions& options = TcpStoreOptions());

  /// A store in a file on a shared file system, for `world_size` processes.
  static Store file(const std::string& path, int world_size, std::chrono::milliseconds timeout);

  /// An in-process store: ranks that are threads of one process share it.
  static Store hash(std::chrono::milliseconds timeout = std::chrono::seconds(30));

  /// A view of this store whose keys are all prefixed with `prefix + "/"`.
  Store prefixed(const std::string& prefix) const;

  /// Sets `key` to `value`.
  void set(const std::string& key, const std::string& value);
  /// Gets `key`, waiting up to the store's timeout for it to appear. Throws TimeoutError.
  std::string get(const std::string& key);
  /// Atomically adds `delta` to the integer at `key` (0 when absent); returns the new value.
  int64_t add(const std::string& key, int64_t delta);
  /// True when every key exists (does not wait).
  bool check(const std::vector<std::string>& keys);
  /// Waits until every key exists. Throws TimeoutError listing the keys after `timeout`.
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout);
  /// Deletes `key`; true if it existed.
  bool remove(const std::string& key);

  /// Default timeout of `get` and of the process groups built on this store.
  std::chrono::milliseconds timeout() const;
  void set_timeout(std::chrono::milliseconds timeout);

  /// Port of a TCP store (the bound one for an ephemeral server), -1 for other kinds.
  int port() const;
  /// "tcp://host:port", "file:///path", "hash", with any prefix.
  std::string describe() const;

  /// Internal: the implementation (used by lockstep's process groups).
  const std::shared_ptr<Impl>& impl() const { return impl_; }

 private:
  explicit Store(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<Impl> impl_;
};

}  // namespace lockstep
