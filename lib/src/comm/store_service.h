#pragma once
// The store server's logic without sockets: the key-value map, the handshake of every
// connection, the requests and the parked waits (Note [Store protocol] in store_protocol.h).
// tcp_store_server.cpp moves bytes between sockets and this class; the fuzz target drives it
// directly. Not thread-safe: one thread (the server's) owns it.

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "comm/store_protocol.h"

namespace lockstep {
namespace comm {

using ConnectionId = uint64_t;

class StoreService {
 public:
  using Clock = std::chrono::steady_clock;
  /// Fills `size` bytes with unpredictable ones (the server passes secure_random_bytes).
  using RandomSource = std::function<void(uint8_t* out, size_t size)>;

  struct Options {
    /// The job token. Empty: clients prove the empty token, i.e. no authentication (the
    /// server allows it only when asked explicitly).
    std::string token;
    StoreLimits limits;
    /// A connection that has not authenticated within this time is dropped.
    std::chrono::milliseconds handshake_timeout{2000};
    /// Requests of a connection are not processed while this many reply bytes wait to be
    /// sent, so a client that never reads cannot make the server buffer without bound.
    size_t output_high_water = 1 << 20;
  };

  /// Why the service dropped a connection (for the server's warning).
  struct Drop {
    ConnectionId id = 0;
    bool authenticated = false;
    bool wrong_token = false;
    std::string reason;
  };

  StoreService(Options options, RandomSource random);

  /// A new connection: queues its Hello.
  void open(ConnectionId id, Clock::time_point now);
  /// Bytes received from `id` (the server reads only while wants_input(id)).
  void receive(ConnectionId id, const char* data, size_t size, Clock::time_point now);
  /// Bytes waiting to be sent to `id`.
  const char* output(ConnectionId id, size_t* size) const;
  /// The server wrote `size` bytes of output(id); may process requests held back.
  void consume_output(ConnectionId id, size_t size, Clock::time_point now);
  /// Answers the waits and drops the handshakes whose deadline is <= now.
  void expire(Clock::time_point now);
  /// Forgets `id` (peer closed, or the server closed it after closing(id)).
  void close(ConnectionId id);

  /// True when the server should read from `id`: not waiting for a key, no output queued,
  /// nothing held back.
  bool wants_input(ConnectionId id) const;
  /// True when the server should close `id` once its output is flushed (best effort).
  bool closing(ConnectionId id) const;
  /// Earliest handshake or wait deadline, Clock::time_point::max() when none.
  Clock::time_point next_deadline() const;
  /// Connections dropped since the last call, with the reason.
  std::vector<Drop> take_drops();

  size_t num_connections() const { return connections_.size(); }
  /// Connections parked in a Get or Wait.
  size_t num_waiting() const;
  size_t num_keys() const { return data_.size(); }
  /// Handshakes that succeeded so far.
  size_t num_authenticated() const { return num_authenticated_; }

 private:
  struct Pending {
    MessageType type = MessageType::kWait;  // kGet or kWait
    std::vector<std::string> keys;
    Clock::time_point deadline;
  };
  struct Connection {
    bool authenticated = false;
    bool closing = false;
    std::string server_nonce;
    Clock::time_point handshake_deadline;
    FrameReader reader{0};
    std::string held;        // received bytes not yet fed (while busy)
    size_t held_offset = 0;
    std::string out;
    size_t out_offset = 0;
    std::unique_ptr<Pending> pending;
  };

  Connection* find(ConnectionId id);
  const Connection* find(ConnectionId id) const;
  bool busy(const Connection& c) const;
  void pump(ConnectionId id, Connection& c, Clock::time_point now);
  void handle_frame(ConnectionId id, Connection& c, std::string body, Clock::time_point now);
  void handle_auth(ConnectionId id, Connection& c, const std::string& body);
  void handle_request(ConnectionId id, Connection& c, const Request& q, Clock::time_point now);
  void reply(Connection& c, const Reply& r);
  void drop(ConnectionId id, Connection& c, ErrorCode code, const std::string& reason,
            bool wrong_token = false);
  void park(ConnectionId id, Connection& c, Pending pending);
  void unpark(ConnectionId id, Connection& c);
  bool all_present(const std::vector<std::string>& keys) const;
  void answer_pending(ConnectionId id, Connection& c, bool timed_out);
  void key_changed(const std::string& key);
  void drain_runnable(Clock::time_point now);

  Options options_;
  RandomSource random_;
  std::map<std::string, std::string> data_;
  std::unordered_map<ConnectionId, Connection> connections_;
  std::unordered_map<std::string, std::vector<ConnectionId>> watchers_;
  std::deque<ConnectionId> runnable_;
  std::vector<Drop> drops_;
  size_t num_authenticated_ = 0;
};

}  // namespace comm
}  // namespace lockstep
