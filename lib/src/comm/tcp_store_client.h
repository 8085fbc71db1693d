#pragma once
// The client of lockstep's TCP store (tcp_store_server.h): blocking, thread-safe, proves it
// holds the job token before anything else and checks that the server holds it too (Note
// [Store protocol] in store_protocol.h). Free of LibTorch.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "comm/store_protocol.h"
#include "lockstep/options.h"

namespace lockstep {
namespace comm {

/// Options of TcpStoreClient: `TcpStoreClientOptions().token(t).connect_timeout(30s)`.
class TcpStoreClientOptions {
  /// The job token (raw bytes). Empty: only a server without authentication accepts the
  /// client. Default empty.
  LOCKSTEP_ARG(std::string, token) = "";
  /// How long to keep trying to reach the server (refused connections, a busy server and
  /// unreachable hosts are retried until then). Default 30 s.
  LOCKSTEP_ARG(std::chrono::milliseconds, connect_timeout) = std::chrono::seconds(30);
  /// Default wait of get(key), and the longest wait for any reply. Default 300 s.
  LOCKSTEP_ARG(std::chrono::milliseconds, timeout) = std::chrono::seconds(300);
  /// Connections kept open for reuse when several threads used the client at once. Default 4.
  LOCKSTEP_ARG(size_t, max_idle_connections) = 4;
};

/// A connection (or, when threads call it at the same time, a few) to a TcpStoreServer.
///
/// Every method is thread-safe; a call blocks only its own thread (concurrent calls use
/// separate connections). Errors name the store's host:port and the key:
///   - TimeoutError: the key did not appear within the timeout, or the server did not answer;
///   - CommError: the server closed the connection (it exited) or broke the protocol;
///   - InvalidArgument: the server refused the token, could not prove it holds the token, a
///     key or value exceeds the server's limits, or add() met a value that is not an integer.
class TcpStoreClient {
 public:
  /// Connects and authenticates, retrying until options.connect_timeout(). Throws
  /// TimeoutError naming host:port when the server cannot be reached in time, and
  /// InvalidArgument at once when the server refuses the token.
  TcpStoreClient(std::string host, int port,
                 TcpStoreClientOptions options = TcpStoreClientOptions());
  ~TcpStoreClient();
  TcpStoreClient(const TcpStoreClient&) = delete;
  TcpStoreClient& operator=(const TcpStoreClient&) = delete;

  /// Sets `key` to `value`.
  void set(const std::string& key, const std::string& value);
  /// The value of `key`, waiting up to timeout() for it to be set. Throws TimeoutError.
  std::string get(const std::string& key);
  /// The value of `key`, waiting up to `timeout` (0: does not wait). Throws TimeoutError.
  std::string get(const std::string& key, std::chrono::milliseconds timeout);
  /// Adds `delta` to the decimal integer at `key` (absent: 0); returns the new value.
  int64_t add(const std::string& key, int64_t delta);
  /// True when every key exists. Does not wait.
  bool check(const std::vector<std::string>& keys);
  /// Waits until every key exists. Throws TimeoutError listing the missing keys.
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout);
  /// Deletes `key`; true when it existed.
  bool remove(const std::string& key);
  /// c10d's compareSet: sets `desired` when the key holds `expected` (or is absent and
  /// `expected` is empty); returns the value stored afterwards (`expected` when the key is
  /// absent and `expected` is not empty).
  std::string compare_set(const std::string& key, const std::string& expected,
                          const std::string& desired);
  /// Number of keys in the store.
  int64_t num_keys();

  /// Default wait of get(key).
  std::chrono::milliseconds timeout() const { return std::chrono::milliseconds(timeout_ms_); }
  void set_timeout(std::chrono::milliseconds timeout) { timeout_ms_ = timeout.count(); }
  /// "tcp://host:port".
  std::string describe() const;
  /// The server's limits, as its Hello announced them.
  StoreLimits server_limits() const;

 private:
  struct Connection;
  std::unique_ptr<Connection> connect();
  std::unique_ptr<Connection> acquire();
  void release(std::unique_ptr<Connection> connection);
  Reply call(const Request& request, std::chrono::milliseconds reply_timeout);

  std::string host_;
  int port_;
  TcpStoreClientOptions options_;
  std::atomic<int64_t> timeout_ms_;
  mutable std::mutex mutex_;
  std::vector<std::unique_ptr<Connection>> idle_;
  StoreLimits server_limits_;
};

}  // namespace comm
}  // namespace lockstep
