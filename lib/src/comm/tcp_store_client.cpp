// The client of lockstep's TCP store: Note [Store protocol] in store_protocol.h.
#include "comm/tcp_store_client.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "comm/store_token.h"
#include "core/sha256.h"
#include "lockstep/env_vars.h"
#include "lockstep/errors.h"

namespace lockstep {
namespace comm {

using detail::concat;
using Clock = std::chrono::steady_clock;

namespace {

// Internal signals, turned into lockstep's errors with the operation's context by call().
struct Closed {
  std::string why;
};
struct Expired {};
// The server turned the connection away before the handshake: worth retrying.
struct Retry {
  std::string why;
};

// Extra time granted to the server beyond a wait's own timeout before the client gives up.
constexpr std::chrono::seconds kReplyGrace(5);

std::string printable(const std::string& key) {
  std::string out;
  for (char ch : key.substr(0, 120)) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7f) {
      out.push_back(ch);
    } else {
      out += concat("\\x", core::to_hex(&c, 1));
    }
  }
  if (key.size() > 120) out += concat("... (", key.size(), " bytes)");
  return out;
}

std::string key_list(const std::vector<std::string>& keys) {
  std::string out;
  for (size_t i = 0; i < keys.size() && i < 8; ++i) {
    out += concat(i ? ", '" : "'", printable(keys[i]), "'");
  }
  if (keys.size() > 8) out += concat(" and ", keys.size() - 8, " more");
  return out;
}

std::string seconds(std::chrono::milliseconds ms) { return concat(ms.count() / 1000.0, " s"); }

int remaining_ms(Clock::time_point deadline) {
  auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(left, 1 << 30)));
}

}  // namespace

struct TcpStoreClient::Connection {
  int fd = -1;
  FrameReader reader{0};
  std::string leftover;  // received bytes after the end of a frame
  StoreLimits limits;

  ~Connection() {
    if (fd >= 0) ::close(fd);
  }

  void send_all(const std::string& data, Clock::time_point deadline) {
    size_t sent = 0;
    while (sent < data.size()) {
      ssize_t n = ::send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        sent += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        pollfd p{fd, POLLOUT, 0};
        int rc = ::poll(&p, 1, remaining_ms(deadline));
        if (rc == 0) throw Expired{};
        continue;
      }
      throw Closed{std::strerror(errno)};
    }
  }

  // Reads one frame's body.
  std::string read_frame(Clock::time_point deadline) {
    char buffer[64 * 1024];
    for (;;) {
      try {
        while (!reader.has_frame() && !leftover.empty()) {
          size_t used = reader.feed(leftover.data(), leftover.size());
          leftover.erase(0, used);
        }
      } catch (const ProtocolError& e) {
        throw Closed{concat("the server sent ", e.what())};
      }
      if (reader.has_frame()) return reader.take();
      pollfd p{fd, POLLIN, 0};
      int rc = ::poll(&p, 1, remaining_ms(deadline));
      if (rc < 0 && errno == EINTR) continue;
      if (rc == 0) throw Expired{};
      ssize_t n = ::recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT);
      if (n == 0) throw Closed{"the store server closed the connection"};
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) continue;
        throw Closed{concat("the connection failed (", std::strerror(errno), ")")};
      }
      leftover.append(buffer, static_cast<size_t>(n));
    }
  }
};

TcpStoreClient::TcpStoreClient(std::string host, int port, TcpStoreClientOptions options)
    : host_(std::move(host)),
      port_(port),
      options_(std::move(options)),
      timeout_ms_(options_.timeout().count()) {
  LOCKSTEP_CHECK(port_ > 0 && port_ <= 65535, "Expected a store port in [1, 65535] to connect "
                 "to the store at ", host_, ", but got ", port_, ".");
  release(connect());
}

TcpStoreClient::~TcpStoreClient() = default;

std::string TcpStoreClient::describe() const {
  return host_.find(':') != std::string::npos ? concat("tcp://[", host_, "]:", port_)
                                              : concat("tcp://", host_, ":", port_);
}

StoreLimits TcpStoreClient::server_limits() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return server_limits_;
}

// Connects and runs the handshake (steps 1-3), retrying until the connect deadline.
std::unique_ptr<TcpStoreClient::Connection> TcpStoreClient::connect() {
  const auto deadline = Clock::now() + options_.connect_timeout();
  const std::string where = describe();
  std::string last_error;
  auto backoff = std::chrono::milliseconds(10);
  for (;;) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    addrinfo* found = nullptr;
    int rc = getaddrinfo(host_.c_str(), std::to_string(port_).c_str(), &hints, &found);
    std::unique_ptr<addrinfo, void (*)(addrinfo*)> found_guard(found, [](addrinfo* a) {
      if (a != nullptr) freeaddrinfo(a);
    });
    if (rc != 0) {
      last_error = concat("cannot resolve '", host_, "' (", gai_strerror(rc), ")");
    }
    for (addrinfo* ai = rc == 0 ? found : nullptr; ai != nullptr; ai = ai->ai_next) {
      auto conn = std::make_unique<Connection>();
      conn->fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                          ai->ai_protocol);
      if (conn->fd < 0) {
        last_error = std::strerror(errno);
        continue;
      }
      if (::connect(conn->fd, ai->ai_addr, ai->ai_addrlen) != 0) {
        if (errno != EINPROGRESS) {
          last_error = std::strerror(errno);
          continue;
        }
        pollfd p{conn->fd, POLLOUT, 0};
        if (::poll(&p, 1, remaining_ms(deadline)) <= 0) {
          if (last_error.empty()) last_error = "the connection attempt timed out";
          continue;
        }
        int error = 0;
        socklen_t len = sizeof(error);
        ::getsockopt(conn->fd, SOL_SOCKET, SO_ERROR, &error, &len);
        if (error != 0) {
          last_error = std::strerror(error);
          continue;
        }
      }
      int one = 1;
      ::setsockopt(conn->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      try {
        StoreLimits handshake_limits;
        conn->reader.set_max_body_bytes(handshake_limits.max_handshake_frame_bytes);
        std::string body = conn->read_frame(deadline);
        if (body_type(body) == MessageType::kError) {
          Reply r = decode_reply(body, handshake_limits);
          throw Retry{concat("the server turned the connection away: ", r.message)};
        }
        Hello hello = decode_hello(body);
        if (hello.version != kStoreProtocolVersion) {
          throw CommError(concat("The store at ", where, " speaks protocol version ",
                                 hello.version, ", this client version ", kStoreProtocolVersion,
                                 ". Use the same lockstep build on every rank and the launcher."));
        }
        Auth auth;
        auth.mac = client_mac(options_.token(), hello.nonce);
        auth.client_nonce.assign(kStoreNonceBytes, '\0');
        secure_random_bytes(reinterpret_cast<uint8_t*>(&auth.client_nonce[0]), kStoreNonceBytes);
        conn->send_all(encode_auth(auth), deadline);
        body = conn->read_frame(deadline);
        Reply r = decode_reply(body, handshake_limits);
        if (r.type == MessageType::kError && r.code == ErrorCode::kAuthRefused) {
          throw InvalidArgument(concat(
              "The store at ", where, " refused this client: wrong or missing job token (",
              env::kStoreToken, " or ", env::kStoreTokenFile, "). Give every rank this job's "
              "token: lockstep-run does so for its workers; with another launcher set one of "
              "these variables to the same token on every rank."));
        }
        if (r.type == MessageType::kError) throw Retry{r.message};
        const std::string expected = server_mac(options_.token(), auth.client_nonce, hello.nonce);
        if (r.type != MessageType::kAuthOk ||
            !core::constant_time_equal(expected.data(), expected.size(), r.value.data(),
                                       r.value.size())) {
          throw InvalidArgument(concat(
              "The store at ", where, " could not prove that it holds this job's token: "
              "another program may be listening on that port, or the store was started for "
              "another job. Check MASTER_ADDR/MASTER_PORT and ", env::kStoreToken, "."));
        }
        conn->limits = hello.limits;
        conn->reader.set_max_body_bytes(hello.limits.max_frame_bytes);
        {
          std::lock_guard<std::mutex> lock(mutex_);
          server_limits_ = hello.limits;
        }
        return conn;
      } catch (const Retry& e) {
        last_error = e.why;
      } catch (const Closed& e) {
        last_error = concat(e.why, " during the handshake");
      } catch (const Expired&) {
        // Keep an earlier, more telling error (say, a busy server) over the deadline's.
        if (last_error.empty()) last_error = "the server did not complete the handshake";
      } catch (const ProtocolError& e) {
        last_error = concat("the server sent ", e.what(), " during the handshake");
      }
    }
    const auto now = Clock::now();
    if (now >= deadline) break;
    // A retry delay (not synchronisation), ending at the deadline for one last attempt.
    std::this_thread::sleep_for(std::min<Clock::duration>(backoff, deadline - now));
    backoff = std::min(backoff * 2, std::chrono::milliseconds(250));
  }
  throw TimeoutError(concat("Could not reach the store at ", where, " within ",
                            seconds(options_.connect_timeout()), ": ", last_error,
                            ". Check MASTER_ADDR/MASTER_PORT, that rank 0 (or the launcher) is "
                            "running, and that no firewall blocks the port."));
}

std::unique_ptr<TcpStoreClient::Connection> TcpStoreClient::acquire() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!idle_.empty()) {
      auto conn = std::move(idle_.back());
      idle_.pop_back();
      return conn;
    }
  }
  return connect();
}

void TcpStoreClient::release(std::unique_ptr<Connection> connection) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (idle_.size() < std::max<size_t>(1, options_.max_idle_connections())) {
    idle_.push_back(std::move(connection));
  }
}

Reply TcpStoreClient::call(const Request& q, std::chrono::milliseconds reply_timeout) {
  const std::string op = concat("store ", message_name(q.type), "(",
                                q.keys.size() == 1 ? concat("'", printable(q.keys[0]), "'")
                                : q.keys.empty()   ? std::string()
                                                   : concat("[", key_list(q.keys), "]"),
                                ") on ", describe());
  check_request(q, server_limits());
  // Deadline arithmetic must not overflow for "wait forever" sized timeouts.
  reply_timeout = std::min<std::chrono::milliseconds>(reply_timeout, std::chrono::hours(24 * 3650));
  auto conn = acquire();
  Reply r;
  try {
    const auto deadline = Clock::now() + reply_timeout;
    conn->send_all(encode_request(q), deadline);
    r = decode_reply(conn->read_frame(deadline), conn->limits);
  } catch (const Closed& e) {
    throw CommError(concat(op, " failed: ", e.why, ". The store server (rank 0 or the "
                           "launcher) may have exited; check its log."));
  } catch (const Expired&) {
    throw TimeoutError(concat(op, " got no reply within ", seconds(reply_timeout),
                              ". The store server (rank 0 or the launcher) may be stopped or "
                              "overloaded."));
  } catch (const ProtocolError& e) {
    throw CommError(concat(op, " failed: the server sent ", e.what(), "."));
  }
  if (r.type == MessageType::kError) {
    if (r.code == ErrorCode::kBadValue) {
      release(std::move(conn));
      throw InvalidArgument(concat(op, " failed: ", r.message, "."));
    }
    throw CommError(concat(op, " failed: the server closed the connection: ", r.message, "."));
  }
  release(std::move(conn));
  return r;
}

namespace {

Request make_request(MessageType type, std::vector<std::string> keys) {
  Request q;
  q.type = type;
  q.keys = std::move(keys);
  return q;
}

[[noreturn]] void unexpected(const Reply& r, const char* op) {
  throw CommError(concat("The store answered ", op, " with an unexpected '",
                         message_name(r.type), "' reply. Use the same lockstep build on every "
                         "rank and the launcher."));
}

constexpr const char* kTimeoutAdvice =
    "A rank may not have started or may have died; check every rank's log, or raise "
    "LOCKSTEP_RENDEZVOUS_TIMEOUT.";

}  // namespace

void TcpStoreClient::set(const std::string& key, const std::string& value) {
  Request q = make_request(MessageType::kSet, {key});
  q.value = value;
  Reply r = call(q, timeout());
  if (r.type != MessageType::kOk) unexpected(r, "set");
}

std::string TcpStoreClient::get(const std::string& key) { return get(key, timeout()); }

std::string TcpStoreClient::get(const std::string& key, std::chrono::milliseconds timeout) {
  LOCKSTEP_CHECK(timeout.count() >= 0, "Expected a store get timeout >= 0, but got ",
                 timeout.count(), " ms.");
  Request q = make_request(MessageType::kGet, {key});
  q.timeout_ms = static_cast<uint64_t>(timeout.count());
  Reply r = call(q, timeout + kReplyGrace);
  if (r.type == MessageType::kTimeout) {
    throw TimeoutError(concat("store get('", printable(key), "') on ", describe(),
                              " timed out after ", seconds(timeout), ": the key was not set. ",
                              kTimeoutAdvice));
  }
  if (r.type != MessageType::kValue) unexpected(r, "get");
  return r.value;
}

int64_t TcpStoreClient::add(const std::string& key, int64_t delta) {
  Request q = make_request(MessageType::kAdd, {key});
  q.delta = delta;
  Reply r = call(q, timeout());
  if (r.type != MessageType::kInt) unexpected(r, "add");
  return r.number;
}

bool TcpStoreClient::check(const std::vector<std::string>& keys) {
  Reply r = call(make_request(MessageType::kCheck, keys), timeout());
  if (r.type != MessageType::kBool) unexpected(r, "check");
  return r.flag;
}

void TcpStoreClient::wait(const std::vector<std::string>& keys,
                          std::chrono::milliseconds timeout) {
  LOCKSTEP_CHECK(timeout.count() >= 0, "Expected a store wait timeout >= 0, but got ",
                 timeout.count(), " ms.");
  Request q = make_request(MessageType::kWait, keys);
  q.timeout_ms = static_cast<uint64_t>(timeout.count());
  Reply r = call(q, timeout + kReplyGrace);
  if (r.type == MessageType::kTimeout) {
    throw TimeoutError(concat("store wait([", key_list(keys), "]) on ", describe(),
                              " timed out after ", seconds(timeout), ": still missing ",
                              key_list(r.keys), ". ", kTimeoutAdvice));
  }
  if (r.type != MessageType::kOk) unexpected(r, "wait");
}

bool TcpStoreClient::remove(const std::string& key) {
  Reply r = call(make_request(MessageType::kDelete, {key}), timeout());
  if (r.type != MessageType::kBool) unexpected(r, "delete");
  return r.flag;
}

std::string TcpStoreClient::compare_set(const std::string& key, const std::string& expected,
                                        const std::string& desired) {
  Request q = make_request(MessageType::kCompareSet, {key});
  q.value = expected;
  q.desired = desired;
  Reply r = call(q, timeout());
  if (r.type != MessageType::kValue) unexpected(r, "compare_set");
  return r.value;
}

int64_t TcpStoreClient::num_keys() {
  Reply r = call(make_request(MessageType::kNumKeys, {}), timeout());
  if (r.type != MessageType::kInt) unexpected(r, "num_keys");
  return r.number;
}

}  // namespace comm
}  // namespace lockstep
