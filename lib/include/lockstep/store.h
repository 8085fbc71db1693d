#pragma once
/// \file
/// `lockstep::Store`: the key-value store ranks rendezvous through (c10d's TCPStore, FileStore,
/// HashStore and PrefixStore behind a pimpl, so no c10d header leaks into user code).
/// A Store is a cheap, shared handle: copies refer to the same store. Thread-safe.

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace lockstep {

class Store {
 public:
  struct Impl;

  /// Connects to (or, with `is_server`, hosts and connects to) a TCP store at host:port.
  /// `port` 0 with `is_server` binds an ephemeral port; read it back with `port()`.
  /// Throws TimeoutError naming host:port when the server cannot be reached within `timeout`,
  /// CommError when `is_server` and the port is in use.
  static Store tcp(const std::string& host, int port, bool is_server,
                   std::chrono::milliseconds timeout);

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
