#pragma once
// lockstep's own TCP store server: one thread, poll(), no thread per client, a job token that
// every connection must prove it holds before it may read or write a key (Note [Store
// protocol] in store_protocol.h). Replaces c10d's TCPStore server, which listens on every
// interface and cannot authenticate. Free of LibTorch.
//
// Note [Store server hardening]
// - It listens on the address it is given, 127.0.0.1 by default; a wildcard address ("0.0.0.0",
//   "::") only when the caller passes one. The listening socket is logged once.
// - A connection that has not authenticated within the handshake deadline (2 s), sends a wrong
//   MAC, or sends anything but its handshake first, is dropped; one warning naming its address
//   is logged, then at most one per warning_interval summarising the refusals in between.
// - Every frame is checked against StoreLimits before anything is allocated for it (a 256 MiB
//   claim costs nothing); a bad frame closes only the connection that sent it.
// - At most max_connections connections; one more is answered Error(kBusy) and closed.
// - The destructor stops the thread and closes every socket; waiting clients see the
//   connection close (CommError on their side).

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "comm/store_protocol.h"
#include "lockstep/options.h"

namespace lockstep {
namespace comm {

/// Options of TcpStoreServer: `TcpStoreServerOptions().host("10.0.0.1").port(29500)`.
class TcpStoreServerOptions {
  /// Address (or host name) to listen on. "0.0.0.0" or "::" listen on every interface, and
  /// only when given explicitly. Default "127.0.0.1".
  LOCKSTEP_ARG(std::string, host) = "127.0.0.1";
  /// Port; 0 binds an ephemeral one (read it back with TcpStoreServer::port()). Default 0.
  LOCKSTEP_ARG(int, port) = 0;
  /// The job token (raw bytes, at least 32). Empty: the server generates one (read it back
  /// with TcpStoreServer::token()), unless no_authentication is set. Default empty.
  LOCKSTEP_ARG(std::string, token) = "";
  /// Accept clients without a token. Only for tests and ranks-as-threads; with it the token
  /// must be empty. Default false.
  LOCKSTEP_ARG(bool, no_authentication) = false;
  /// Most simultaneous connections (authenticated or not). Default 1024.
  LOCKSTEP_ARG(size_t, max_connections) = 1024;
  /// Time a new connection has to authenticate. Default 2 s.
  LOCKSTEP_ARG(std::chrono::milliseconds, handshake_timeout) = std::chrono::seconds(2);
  /// Least time between two warnings about refused connections. Default 10 s.
  LOCKSTEP_ARG(std::chrono::milliseconds, warning_interval) = std::chrono::seconds(10);
  /// Frame limits. Default: StoreLimits' defaults.
  LOCKSTEP_ARG(StoreLimits, limits) = StoreLimits();
};

/// Counters of a running server, for tests and diagnostics.
struct TcpStoreServerStats {
  size_t connections = 0;      ///< open now
  size_t accepted = 0;         ///< accepted so far (including those refused later)
  size_t authenticated = 0;    ///< handshakes that succeeded
  size_t refused = 0;          ///< dropped before authenticating (wrong token, no handshake, ...)
  size_t protocol_errors = 0;  ///< authenticated connections closed for a bad frame
  size_t busy = 0;             ///< turned away at max_connections
  size_t warnings = 0;         ///< warnings logged about refusals
  size_t waiting = 0;          ///< connections parked in a get or wait
  size_t keys = 0;             ///< keys in the store
};

/// A running store server. Construction binds, listens and starts the thread; destruction
/// stops it and closes every connection. The public methods are thread-safe.
class TcpStoreServer {
 public:
  /// Throws CommError naming host:port when the address cannot be bound (port in use,
  /// address not on this machine), InvalidArgument for bad options (token shorter than 32
  /// bytes, a token together with no_authentication, ...).
  explicit TcpStoreServer(TcpStoreServerOptions options = TcpStoreServerOptions());
  ~TcpStoreServer();
  TcpStoreServer(const TcpStoreServer&) = delete;
  TcpStoreServer& operator=(const TcpStoreServer&) = delete;

  /// The bound port (the ephemeral one when the options said 0).
  int port() const { return port_; }
  /// The address the socket is bound to, as getsockname reports it ("127.0.0.1").
  const std::string& bound_address() const { return bound_address_; }
  /// The job token clients must hold (raw bytes; empty with no_authentication). Never log it.
  const std::string& token() const { return options_.token(); }
  /// "tcp://host:port".
  std::string describe() const;

  TcpStoreServerStats stats() const;
  /// Waits until `predicate(stats())` holds or `timeout` passes; returns whether it holds.
  /// For tests, which must not sleep to synchronise.
  bool wait_for_stats(const std::function<bool(const TcpStoreServerStats&)>& predicate,
                      std::chrono::milliseconds timeout) const;

 private:
  struct Loop;
  void run();

  TcpStoreServerOptions options_;
  int port_ = 0;
  std::string bound_address_;
  int listen_fd_ = -1;
  int wake_fd_ = -1;  // eventfd: the destructor wakes the loop
  std::unique_ptr<Loop> loop_;
  std::thread thread_;

  mutable std::mutex stats_mutex_;
  mutable std::condition_variable stats_changed_;
  TcpStoreServerStats stats_;
};

}  // namespace comm
}  // namespace lockstep
