// The store server's logic: Note [Store protocol] in store_protocol.h.
#include "comm/store_service.h"

#include <algorithm>
#include <charconv>

#include "core/sha256.h"

namespace lockstep {
namespace comm {

using detail::concat;

namespace {

// Longest wait honoured, so that deadline arithmetic cannot overflow.
constexpr std::chrono::milliseconds kMaxWait = std::chrono::hours(24 * 365);

Reply make_reply(MessageType type) {
  Reply r;
  r.type = type;
  return r;
}

Reply error_reply(ErrorCode code, const std::string& message) {
  Reply r = make_reply(MessageType::kError);
  r.code = code;
  r.message = message.substr(0, 4000);
  return r;
}

StoreService::Clock::time_point deadline_after(StoreService::Clock::time_point now,
                                               uint64_t timeout_ms) {
  const uint64_t capped = std::min<uint64_t>(timeout_ms, uint64_t(kMaxWait.count()));
  return now + std::chrono::milliseconds(static_cast<int64_t>(capped));
}

// The store's integers are decimal text, as in c10d's stores.
bool parse_int(const std::string& text, int64_t* value) {
  if (text.empty()) return false;
  const char* end = text.data() + text.size();
  auto result = std::from_chars(text.data(), end, *value);
  return result.ec == std::errc() && result.ptr == end;
}

}  // namespace

StoreService::StoreService(Options options, RandomSource random)
    : options_(std::move(options)), random_(std::move(random)) {}

StoreService::Connection* StoreService::find(ConnectionId id) {
  auto it = connections_.find(id);
  return it == connections_.end() ? nullptr : &it->second;
}

const StoreService::Connection* StoreService::find(ConnectionId id) const {
  auto it = connections_.find(id);
  return it == connections_.end() ? nullptr : &it->second;
}

void StoreService::open(ConnectionId id, Clock::time_point now) {
  Connection& c = connections_[id];
  c = Connection();
  c.handshake_deadline = now + options_.handshake_timeout;
  c.reader.set_max_body_bytes(options_.limits.max_handshake_frame_bytes);
  c.server_nonce.assign(kStoreNonceBytes, '\0');
  random_(reinterpret_cast<uint8_t*>(&c.server_nonce[0]), kStoreNonceBytes);
  Hello hello;
  hello.nonce = c.server_nonce;
  hello.limits = options_.limits;
  c.out = encode_hello(hello);
}

void StoreService::receive(ConnectionId id, const char* data, size_t size,
                           Clock::time_point now) {
  Connection* c = find(id);
  if (c == nullptr || c->closing) return;
  c->held.append(data, size);
  pump(id, *c, now);
  drain_runnable(now);
}

const char* StoreService::output(ConnectionId id, size_t* size) const {
  const Connection* c = find(id);
  if (c == nullptr) {
    *size = 0;
    return nullptr;
  }
  *size = c->out.size() - c->out_offset;
  return c->out.data() + c->out_offset;
}

void StoreService::consume_output(ConnectionId id, size_t size, Clock::time_point now) {
  Connection* c = find(id);
  if (c == nullptr) return;
  c->out_offset = std::min(c->out.size(), c->out_offset + size);
  if (c->out_offset == c->out.size()) {
    c->out.clear();
    c->out_offset = 0;
  }
  pump(id, *c, now);
  drain_runnable(now);
}

void StoreService::expire(Clock::time_point now) {
  for (auto& entry : connections_) {
    const ConnectionId id = entry.first;
    Connection& c = entry.second;
    if (c.closing) continue;
    if (!c.authenticated && c.handshake_deadline <= now) {
      drop(id, c, ErrorCode::kProtocol,
           concat("no valid handshake within ", options_.handshake_timeout.count() / 1000.0,
                  " s"));
    } else if (c.pending && c.pending->deadline <= now) {
      answer_pending(id, c, /*timed_out=*/true);
      runnable_.push_back(id);
    }
  }
  drain_runnable(now);
}

void StoreService::close(ConnectionId id) {
  Connection* c = find(id);
  if (c == nullptr) return;
  unpark(id, *c);
  connections_.erase(id);
}

bool StoreService::wants_input(ConnectionId id) const {
  const Connection* c = find(id);
  return c != nullptr && !c->closing && !c->pending && c->out.empty() &&
         c->held_offset == c->held.size();
}

bool StoreService::closing(ConnectionId id) const {
  const Connection* c = find(id);
  return c != nullptr && c->closing;
}

StoreService::Clock::time_point StoreService::next_deadline() const {
  auto next = Clock::time_point::max();
  for (const auto& entry : connections_) {
    const Connection& c = entry.second;
    if (c.closing) continue;
    if (!c.authenticated) next = std::min(next, c.handshake_deadline);
    if (c.pending) next = std::min(next, c.pending->deadline);
  }
  return next;
}

std::vector<StoreService::Drop> StoreService::take_drops() {
  std::vector<Drop> drops;
  drops.swap(drops_);
  return drops;
}

size_t StoreService::num_waiting() const {
  size_t n = 0;
  for (const auto& entry : connections_) n += entry.second.pending ? 1 : 0;
  return n;
}

bool StoreService::busy(const Connection& c) const {
  return c.closing || c.pending != nullptr ||
         c.out.size() - c.out_offset >= options_.output_high_water;
}

// Feeds held-back bytes to the frame reader one frame at a time, handling each frame, until
// the connection is busy or the bytes are used up.
void StoreService::pump(ConnectionId id, Connection& c, Clock::time_point now) {
  while (!busy(c) && c.held_offset < c.held.size()) {
    size_t used = 0;
    try {
      used = c.reader.feed(c.held.data() + c.held_offset, c.held.size() - c.held_offset);
    } catch (const ProtocolError& e) {
      drop(id, c, e.kind() == ProtocolError::Kind::kTooLarge ? ErrorCode::kFrameTooLarge
                                                             : ErrorCode::kProtocol,
           c.authenticated ? std::string(e.what())
                           : concat(e.what(), " (before authenticating)"));
      return;
    }
    c.held_offset += used;
    if (c.reader.has_frame()) handle_frame(id, c, c.reader.take(), now);
  }
  if (c.held_offset == c.held.size()) {
    c.held.clear();
    c.held_offset = 0;
  }
}

void StoreService::handle_frame(ConnectionId id, Connection& c, std::string body,
                                Clock::time_point now) {
  if (!c.authenticated) {
    if (body.empty() || body_type(body) != MessageType::kAuth) {
      drop(id, c, ErrorCode::kProtocol,
           concat("a ", body.empty() ? "empty" : message_name(body_type(body)),
                  " frame before authenticating"));
      return;
    }
    handle_auth(id, c, body);
    return;
  }
  Request q;
  try {
    q = decode_request(body, options_.limits);
  } catch (const ProtocolError& e) {
    drop(id, c, e.kind() == ProtocolError::Kind::kTooLarge ? ErrorCode::kFrameTooLarge
                                                           : ErrorCode::kProtocol,
         concat("a bad request: ", e.what()));
    return;
  }
  handle_request(id, c, q, now);
}

void StoreService::handle_auth(ConnectionId id, Connection& c, const std::string& body) {
  Auth auth;
  try {
    auth = decode_auth(body);
  } catch (const ProtocolError& e) {
    drop(id, c, ErrorCode::kProtocol, concat("a bad handshake: ", e.what()));
    return;
  }
  const std::string expected = client_mac(options_.token, c.server_nonce);
  if (!core::constant_time_equal(expected.data(), expected.size(), auth.mac.data(),
                                 auth.mac.size())) {
    drop(id, c, ErrorCode::kAuthRefused, "wrong or missing job token", /*wrong_token=*/true);
    return;
  }
  c.authenticated = true;
  ++num_authenticated_;
  c.reader.set_max_body_bytes(options_.limits.max_frame_bytes);
  Reply ok = make_reply(MessageType::kAuthOk);
  ok.value = server_mac(options_.token, auth.client_nonce, c.server_nonce);
  reply(c, ok);
}

void StoreService::handle_request(ConnectionId id, Connection& c, const Request& q,
                                  Clock::time_point now) {
  switch (q.type) {
    case MessageType::kSet:
      data_[q.keys[0]] = q.value;
      reply(c, make_reply(MessageType::kOk));
      key_changed(q.keys[0]);
      return;
    case MessageType::kGet: {
      auto it = data_.find(q.keys[0]);
      if (it != data_.end()) {
        Reply r = make_reply(MessageType::kValue);
        r.value = it->second;
        reply(c, r);
      } else {
        park(id, c, Pending{q.type, q.keys, deadline_after(now, q.timeout_ms)});
        if (q.timeout_ms == 0) answer_pending(id, c, /*timed_out=*/true);
      }
      return;
    }
    case MessageType::kAdd: {
      int64_t current = 0;
      auto it = data_.find(q.keys[0]);
      if (it != data_.end() && !parse_int(it->second, &current)) {
        reply(c, error_reply(ErrorCode::kBadValue,
                             concat("the value of the key is not a decimal integer (",
                                    it->second.size(), " bytes)")));
        return;
      }
      int64_t next = 0;
      if (__builtin_add_overflow(current, q.delta, &next)) {
        reply(c, error_reply(ErrorCode::kBadValue,
                             concat("adding ", q.delta, " to ", current, " overflows")));
        return;
      }
      data_[q.keys[0]] = std::to_string(next);
      Reply r = make_reply(MessageType::kInt);
      r.number = next;
      reply(c, r);
      key_changed(q.keys[0]);
      return;
    }
    case MessageType::kCheck: {
      Reply r = make_reply(MessageType::kBool);
      r.flag = all_present(q.keys);
      reply(c, r);
      return;
    }
    case MessageType::kWait:
      if (all_present(q.keys)) {
        reply(c, make_reply(MessageType::kOk));
      } else {
        park(id, c, Pending{q.type, q.keys, deadline_after(now, q.timeout_ms)});
        if (q.timeout_ms == 0) answer_pending(id, c, /*timed_out=*/true);
      }
      return;
    case MessageType::kDelete: {
      Reply r = make_reply(MessageType::kBool);
      r.flag = data_.erase(q.keys[0]) > 0;
      reply(c, r);
      return;
    }
    case MessageType::kCompareSet: {
      const std::string& key = q.keys[0];
      Reply r = make_reply(MessageType::kValue);
      auto it = data_.find(key);
      bool changed = false;
      if (it == data_.end()) {
        if (q.value.empty()) {
          data_[key] = q.desired;
          r.value = q.desired;
          changed = true;
        } else {
          r.value = q.value;
        }
      } else if (it->second == q.value) {
        it->second = q.desired;
        r.value = q.desired;
        changed = true;
      } else {
        r.value = it->second;
      }
      reply(c, r);
      if (changed) key_changed(key);
      return;
    }
    case MessageType::kNumKeys: {
      Reply r = make_reply(MessageType::kInt);
      r.number = static_cast<int64_t>(data_.size());
      reply(c, r);
      return;
    }
    default:
      drop(id, c, ErrorCode::kProtocol, concat("an unknown request ", int(q.type)));
      return;
  }
}

void StoreService::reply(Connection& c, const Reply& r) { c.out += encode_reply(r); }

void StoreService::drop(ConnectionId id, Connection& c, ErrorCode code,
                        const std::string& reason, bool wrong_token) {
  if (c.closing) return;
  unpark(id, c);
  // Before the handshake the client accepts only small frames: keep the message short.
  reply(c, error_reply(code, c.authenticated ? reason : reason.substr(0, 160)));
  c.closing = true;
  c.held.clear();
  c.held_offset = 0;
  Drop d;
  d.id = id;
  d.authenticated = c.authenticated;
  d.wrong_token = wrong_token;
  d.reason = reason;
  drops_.push_back(std::move(d));
}

void StoreService::park(ConnectionId id, Connection& c, Pending pending) {
  c.pending = std::make_unique<Pending>(std::move(pending));
  for (const auto& key : c.pending->keys) {
    auto& ids = watchers_[key];
    if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
  }
}

void StoreService::unpark(ConnectionId id, Connection& c) {
  if (!c.pending) return;
  for (const auto& key : c.pending->keys) {
    auto it = watchers_.find(key);
    if (it == watchers_.end()) continue;
    auto& ids = it->second;
    ids.erase(std::remove(ids.begin(), ids.end(), id), ids.end());
    if (ids.empty()) watchers_.erase(it);
  }
  c.pending.reset();
}

bool StoreService::all_present(const std::vector<std::string>& keys) const {
  for (const auto& k : keys) {
    if (data_.find(k) == data_.end()) return false;
  }
  return true;
}

void StoreService::answer_pending(ConnectionId id, Connection& c, bool timed_out) {
  if (!c.pending) return;
  const Pending& p = *c.pending;
  if (timed_out) {
    Reply r = make_reply(MessageType::kTimeout);
    for (const auto& k : p.keys) {
      if (data_.find(k) == data_.end()) r.keys.push_back(k);
    }
    reply(c, r);
  } else if (p.type == MessageType::kGet) {
    Reply r = make_reply(MessageType::kValue);
    r.value = data_.at(p.keys[0]);
    reply(c, r);
  } else {
    reply(c, make_reply(MessageType::kOk));
  }
  unpark(id, c);
}

void StoreService::key_changed(const std::string& key) {
  auto it = watchers_.find(key);
  if (it == watchers_.end()) return;
  const std::vector<ConnectionId> ids = it->second;  // answer_pending edits the index
  for (ConnectionId id : ids) {
    Connection* c = find(id);
    if (c == nullptr || !c->pending || !all_present(c->pending->keys)) continue;
    answer_pending(id, *c, /*timed_out=*/false);
    runnable_.push_back(id);
  }
}

void StoreService::drain_runnable(Clock::time_point now) {
  while (!runnable_.empty()) {
    const ConnectionId id = runnable_.front();
    runnable_.pop_front();
    if (Connection* c = find(id)) pump(id, *c, now);
  }
}

}  // namespace comm
}  // namespace lockstep
