// lockstep's TCP store server: sockets and poll() around StoreService (Note [Store server
// hardening] in tcp_store_server.h).
#include "comm/tcp_store_server.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <vector>

#include "comm/store_service.h"
#include "comm/store_token.h"
#include "lockstep/errors.h"
#include "lockstep/log.h"

namespace lockstep {
namespace comm {

using detail::concat;
using Clock = std::chrono::steady_clock;

namespace {

std::string address_string(const sockaddr* sa, socklen_t len, bool with_port) {
  char host[NI_MAXHOST] = {}, port[NI_MAXSERV] = {};
  if (getnameinfo(sa, len, host, sizeof(host), port, sizeof(port),
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    return "an unknown address";
  }
  std::string h = host;
  if (!with_port) return h;
  if (sa->sa_family == AF_INET6) return concat("[", h, "]:", port);
  return concat(h, ":", port);
}

bool is_wildcard(const std::string& host) {
  return host == "0.0.0.0" || host == "::" || host == "[::]" || host == "*";
}

}  // namespace

// State owned by the server thread.
struct TcpStoreServer::Loop {
  struct Peer {
    int fd = -1;
    std::string address;
  };

  explicit Loop(StoreService::Options options)
      : service(std::move(options), [](uint8_t* out, size_t size) {
          secure_random_bytes(out, size);
        }) {}

  StoreService service;
  std::map<ConnectionId, Peer> peers;
  ConnectionId next_id = 1;
  // Rate limit of the refusal warnings.
  bool warned = false;
  Clock::time_point last_warning;
  size_t suppressed = 0;
};

TcpStoreServer::TcpStoreServer(TcpStoreServerOptions options) : options_(std::move(options)) {
  LOCKSTEP_CHECK(options_.port() >= 0 && options_.port() <= 65535,
                 "Expected a store port in [0, 65535], but got ", options_.port(), ".");
  LOCKSTEP_CHECK(options_.max_connections() >= 1,
                 "Expected max_connections >= 1 for the store server, but got 0.");
  LOCKSTEP_CHECK(!options_.host().empty(),
                 "Expected an address for the store server to listen on (\"127.0.0.1\" for "
                 "a single-node job), but got an empty one.");
  if (options_.no_authentication()) {
    LOCKSTEP_CHECK(options_.token().empty(),
                   "Expected either a store token or no_authentication, but got both. Drop "
                   "no_authentication to require the token.");
  } else if (options_.token().empty()) {
    options_.token(generate_store_token());
  } else {
    LOCKSTEP_CHECK(options_.token().size() >= kMinStoreTokenBytes,
                   "Expected a store token of at least ", kMinStoreTokenBytes,
                   " bytes, but got ", options_.token().size(),
                   " bytes. Leave it empty to have one generated.");
  }
  const StoreLimits& limits = options_.limits();
  LOCKSTEP_CHECK(limits.max_handshake_frame_bytes >= 128 && limits.max_key_bytes >= 1 &&
                     limits.max_keys_per_request >= 1 &&
                     limits.max_frame_bytes >= limits.max_handshake_frame_bytes,
                 "Expected store limits with max_handshake_frame_bytes >= 128, max_key_bytes "
                 ">= 1, max_keys_per_request >= 1 and max_frame_bytes >= "
                 "max_handshake_frame_bytes, but got ",
                 limits.max_handshake_frame_bytes, ", ", limits.max_key_bytes, ", ",
                 limits.max_keys_per_request, " and ", limits.max_frame_bytes, ".");

  const std::string where = concat(options_.host(), ":", options_.port());
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string host = options_.host() == "[::]" ? "::" : options_.host();
  int rc = getaddrinfo(host == "*" ? "0.0.0.0" : host.c_str(),
                       std::to_string(options_.port()).c_str(), &hints, &found);
  if (rc != 0) {
    throw CommError(concat("Could not host the store on ", where, ": cannot resolve '",
                           options_.host(), "' (", gai_strerror(rc),
                           "). Pass an address of this machine (MASTER_ADDR)."));
  }
  std::string last_error = "no address";
  for (addrinfo* ai = found; ai != nullptr && listen_fd_ < 0; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                      ai->ai_protocol);
    if (fd < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(fd, 1024) != 0) {
      last_error = std::strerror(errno);
      ::close(fd);
      continue;
    }
    listen_fd_ = fd;
  }
  freeaddrinfo(found);
  if (listen_fd_ < 0) {
    throw CommError(concat("Could not host the store on ", where, ": ", last_error,
                           ". The port is probably in use by another job, or the address is "
                           "not one of this machine's; pick a free MASTER_PORT (or use "
                           "lockstep-run --standalone)."));
  }
  sockaddr_storage bound{};
  socklen_t bound_len = sizeof(bound);
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&bound), &bound_len);
  bound_address_ = address_string(reinterpret_cast<sockaddr*>(&bound), bound_len, false);
  port_ = bound.ss_family == AF_INET6
              ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
              : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);

  wake_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) {
    ::close(listen_fd_);
    throw CommError(concat("Could not host the store on ", where, ": eventfd failed: ",
                           std::strerror(errno), "."));
  }

  StoreService::Options service_options;
  service_options.token = options_.token();
  service_options.limits = limits;
  service_options.handshake_timeout = options_.handshake_timeout();
  loop_ = std::make_unique<Loop>(std::move(service_options));

  log_info(concat("lockstep store listening on ", describe(),
                  is_wildcard(options_.host()) ? " (every interface, as asked)" : "",
                  options_.no_authentication() ? " without authentication"
                                               : ", job token required"));
  thread_ = std::thread([this] { run(); });
}

TcpStoreServer::~TcpStoreServer() {
  uint64_t one = 1;
  ssize_t ignored = ::write(wake_fd_, &one, sizeof(one));
  (void)ignored;
  if (thread_.joinable()) thread_.join();
  ::close(wake_fd_);
  ::close(listen_fd_);
}

std::string TcpStoreServer::describe() const {
  return bound_address_.find(':') != std::string::npos
             ? concat("tcp://[", bound_address_, "]:", port_)
             : concat("tcp://", bound_address_, ":", port_);
}

TcpStoreServerStats TcpStoreServer::stats() const {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  return stats_;
}

bool TcpStoreServer::wait_for_stats(
    const std::function<bool(const TcpStoreServerStats&)>& predicate,
    std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(stats_mutex_);
  return stats_changed_.wait_for(lock, timeout, [&] { return predicate(stats_); });
}

void TcpStoreServer::run() {
  Loop& loop = *loop_;
  StoreService& service = loop.service;
  const std::string where = describe().substr(6);  // host:port
  std::vector<pollfd> fds;
  std::vector<ConnectionId> ids;
  std::vector<char> buffer(64 * 1024);
  bool accept_paused = false;
  Clock::time_point accept_resume;

  auto warn = [&](Clock::time_point now, const std::string& message) {
    if (loop.warned && now - loop.last_warning < options_.warning_interval()) {
      ++loop.suppressed;
      return;
    }
    std::string suffix;
    if (loop.suppressed > 0) {
      suffix = concat(" (", loop.suppressed, " more refused or closed connection(s) since the "
                      "last warning)");
    }
    log_warn(message + suffix);
    loop.warned = true;
    loop.last_warning = now;
    loop.suppressed = 0;
    std::lock_guard<std::mutex> lock(stats_mutex_);
    ++stats_.warnings;
  };

  auto close_peer = [&](ConnectionId id) {
    auto it = loop.peers.find(id);
    if (it == loop.peers.end()) return;
    ::close(it->second.fd);
    loop.peers.erase(it);
    service.close(id);
  };

  // Writes what the service has for `id`; false when the socket failed.
  auto flush = [&](ConnectionId id, int fd) {
    for (;;) {
      size_t size = 0;
      const char* data = service.output(id, &size);
      if (size == 0) return true;
      ssize_t n = ::send(fd, data, size, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        service.consume_output(id, static_cast<size_t>(n), Clock::now());
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
    }
  };

  for (;;) {
    fds.clear();
    ids.clear();
    fds.push_back({wake_fd_, POLLIN, 0});
    ids.push_back(0);
    const auto now_before = Clock::now();
    if (accept_paused && now_before >= accept_resume) accept_paused = false;
    fds.push_back({listen_fd_, static_cast<short>(accept_paused ? 0 : POLLIN), 0});
    ids.push_back(0);
    for (const auto& entry : loop.peers) {
      short events = service.wants_input(entry.first) ? POLLIN : POLLRDHUP;
      size_t pending = 0;
      service.output(entry.first, &pending);
      if (pending > 0) events |= POLLOUT;
      fds.push_back({entry.second.fd, events, 0});
      ids.push_back(entry.first);
    }
    int timeout_ms = -1;
    auto deadline = service.next_deadline();
    if (accept_paused) deadline = std::min(deadline, accept_resume);
    if (deadline != Clock::time_point::max()) {
      auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - now_before).count();
      timeout_ms = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(left, 60000)));
    }
    int ready = ::poll(fds.data(), fds.size(), timeout_ms);
    if (ready < 0 && errno != EINTR) {
      log_error(concat("lockstep store on ", where, ": poll failed: ", std::strerror(errno),
                       "; the store stops serving"));
      break;
    }
    if (fds[0].revents != 0) break;  // the destructor asked us to stop
    const auto now = Clock::now();

    // Existing connections first (their fds are only valid until a close).
    for (size_t i = 2; i < fds.size(); ++i) {
      const short revents = fds[i].revents;
      if (revents == 0) continue;
      const ConnectionId id = ids[i];
      const int fd = fds[i].fd;
      if (revents & POLLIN) {
        ssize_t n = ::recv(fd, buffer.data(), buffer.size(), MSG_DONTWAIT);
        if (n > 0) {
          service.receive(id, buffer.data(), static_cast<size_t>(n), now);
        } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
          close_peer(id);
          continue;
        }
      } else if (revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) {
        close_peer(id);  // the client went away (while it waited, or while we wrote)
        continue;
      }
    }

    // New connections.
    if (fds[1].revents & POLLIN) {
      for (;;) {
        sockaddr_storage ss{};
        socklen_t len = sizeof(ss);
        int fd = ::accept4(listen_fd_, reinterpret_cast<sockaddr*>(&ss), &len,
                           SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
          if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
            warn(now, concat("lockstep store on ", where, ": cannot accept more connections (",
                             std::strerror(errno), "); raise the open-file limit (ulimit -n)"));
            accept_paused = true;
            accept_resume = now + std::chrono::milliseconds(100);
          }
          break;  // EAGAIN: no more waiting
        }
        int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        const std::string peer =
            address_string(reinterpret_cast<sockaddr*>(&ss), len, /*with_port=*/true);
        {
          std::lock_guard<std::mutex> lock(stats_mutex_);
          ++stats_.accepted;
        }
        if (loop.peers.size() >= options_.max_connections()) {
          Reply busy;
          busy.type = MessageType::kError;
          busy.code = ErrorCode::kBusy;
          busy.message = concat("the store already serves ", loop.peers.size(),
                                " connections (its max_connections)");
          const std::string frame = encode_reply(busy);
          ssize_t ignored = ::send(fd, frame.data(), frame.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
          (void)ignored;
          ::close(fd);
          {
            std::lock_guard<std::mutex> lock(stats_mutex_);
            ++stats_.busy;
          }
          warn(now, concat("lockstep store on ", where, " turned away a connection from ", peer,
                           ": it already serves ", loop.peers.size(),
                           " connections (max_connections)"));
          continue;
        }
        const ConnectionId id = loop.next_id++;
        loop.peers[id] = Loop::Peer{fd, peer};
        service.open(id, now);
      }
    }

    service.expire(now);

    for (const auto& drop : service.take_drops()) {
      auto it = loop.peers.find(drop.id);
      const std::string peer = it == loop.peers.end() ? "a client" : it->second.address;
      {
        std::lock_guard<std::mutex> lock(stats_mutex_);
        ++(drop.authenticated ? stats_.protocol_errors : stats_.refused);
      }
      if (drop.authenticated) {
        warn(now, concat("lockstep store on ", where, " closed the connection of ", peer, ": ",
                         drop.reason, ". Other connections are not affected."));
      } else {
        warn(now, concat("lockstep store on ", where, " refused a connection from ", peer, ": ",
                         drop.reason, ". A program that is not part of this job (or a rank "
                         "given another job's LOCKSTEP_STORE_TOKEN) tried to use the store; it "
                         "was dropped and the job goes on."));
      }
    }
    // Send what is waiting (after the warnings, so that a refused client that reads its
    // refusal finds the warning logged), then close what the service gave up on.
    std::vector<ConnectionId> to_close;
    for (const auto& entry : loop.peers) {
      if (!flush(entry.first, entry.second.fd) || service.closing(entry.first)) {
        to_close.push_back(entry.first);
      }
    }
    for (ConnectionId id : to_close) close_peer(id);

    {
      std::lock_guard<std::mutex> lock(stats_mutex_);
      stats_.connections = loop.peers.size();
      stats_.waiting = service.num_waiting();
      stats_.keys = service.num_keys();
      stats_.authenticated = service.num_authenticated();
    }
    stats_changed_.notify_all();
  }

  for (const auto& entry : loop.peers) ::close(entry.second.fd);
  loop.peers.clear();
  {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    stats_.connections = 0;
  }
  stats_changed_.notify_all();
}

}  // namespace comm
}  // namespace lockstep
