// The store's wire format: see Note [Store protocol] in store_protocol.h.
#include "comm/store_protocol.h"

#include <algorithm>
#include <cstring>

#include "core/sha256.h"

namespace lockstep {
namespace comm {

using detail::concat;

namespace {

// ---- Writing ------------------------------------------------------------------------------

class Writer {
 public:
  explicit Writer(MessageType type) {
    out_.assign(4, '\0');  // header, filled by frame()
    out_.push_back(static_cast<char>(type));
  }
  void u8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void u32(uint32_t v) {
    for (int i = 0; i < 4; ++i) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
  void u64(uint64_t v) {
    for (int i = 0; i < 8; ++i) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
  void bytes(const std::string& s) {
    u32(static_cast<uint32_t>(s.size()));
    out_.append(s);
  }
  void raw(const std::string& s) { out_.append(s); }
  std::string frame() {
    const uint32_t body = static_cast<uint32_t>(out_.size() - 4);
    for (int i = 0; i < 4; ++i) out_[i] = static_cast<char>((body >> (8 * i)) & 0xff);
    return std::move(out_);
  }

 private:
  std::string out_;
};

// ---- Reading ------------------------------------------------------------------------------

class Reader {
 public:
  Reader(const std::string& body, const char* what) : body_(body), what_(what) {
    if (body_.empty()) malformed("an empty frame");
    pos_ = 1;  // the type byte, read by body_type()
  }

  uint8_t u8() {
    need(1, "a byte");
    return static_cast<uint8_t>(body_[pos_++]);
  }
  uint32_t u32() {
    need(4, "a 4-byte integer");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= uint32_t(static_cast<uint8_t>(body_[pos_ + i])) << (8 * i);
    pos_ += 4;
    return v;
  }
  uint64_t u64() {
    need(8, "an 8-byte integer");
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= uint64_t(static_cast<uint8_t>(body_[pos_ + i])) << (8 * i);
    pos_ += 8;
    return v;
  }
  // A length-prefixed string of at most `limit` bytes: both checks precede the allocation.
  std::string bytes(uint32_t limit, const char* field) {
    const uint32_t size = u32();
    if (size > limit) {
      throw ProtocolError(ProtocolError::Kind::kTooLarge,
                          concat(what_, ": ", field, " of ", size, " bytes exceeds the limit of ",
                                 limit, " bytes"));
    }
    need(size, field);
    std::string s = body_.substr(pos_, size);
    pos_ += size;
    return s;
  }
  std::string fixed(size_t size, const char* field) {
    need(size, field);
    std::string s = body_.substr(pos_, size);
    pos_ += size;
    return s;
  }
  uint32_t count(uint32_t limit, const char* field) {
    const uint32_t n = u32();
    if (n > limit) {
      throw ProtocolError(ProtocolError::Kind::kTooLarge,
                          concat(what_, ": ", n, " ", field, " exceed the limit of ", limit));
    }
    // Every entry takes at least its 4-byte length: a count the body cannot hold is a lie,
    // rejected before reserving anything for it.
    if (uint64_t(n) * 4 > body_.size() - pos_) {
      malformed(concat("a count of ", n, " ", field, " that the frame cannot hold"));
    }
    return n;
  }
  void end() {
    if (pos_ != body_.size()) {
      malformed(concat(body_.size() - pos_, " unexpected trailing bytes"));
    }
  }
  [[noreturn]] void malformed(const std::string& what) {
    throw ProtocolError(ProtocolError::Kind::kMalformed, concat(what_, ": ", what));
  }

 private:
  void need(size_t n, const char* field) {
    if (body_.size() - pos_ < n) {
      malformed(concat("the frame ends inside ", field, " (", body_.size() - pos_,
                       " bytes left, ", n, " needed)"));
    }
  }

  const std::string& body_;
  const char* what_;
  size_t pos_ = 0;
};

StoreLimits read_limits(Reader& r) {
  StoreLimits l;
  l.max_key_bytes = r.u32();
  l.max_value_bytes = r.u32();
  l.max_keys_per_request = r.u32();
  l.max_frame_bytes = r.u32();
  return l;
}

}  // namespace

const char* message_name(MessageType type) {
  switch (type) {
    case MessageType::kHello: return "hello";
    case MessageType::kAuth: return "auth";
    case MessageType::kAuthOk: return "auth-ok";
    case MessageType::kSet: return "set";
    case MessageType::kGet: return "get";
    case MessageType::kAdd: return "add";
    case MessageType::kCheck: return "check";
    case MessageType::kWait: return "wait";
    case MessageType::kDelete: return "delete";
    case MessageType::kCompareSet: return "compare_set";
    case MessageType::kNumKeys: return "num_keys";
    case MessageType::kOk: return "ok";
    case MessageType::kValue: return "value";
    case MessageType::kInt: return "int";
    case MessageType::kBool: return "bool";
    case MessageType::kTimeout: return "timeout";
    case MessageType::kError: return "error";
  }
  return "unknown";
}

std::string client_mac(const std::string& token, const std::string& server_nonce) {
  auto mac = core::hmac_sha256(token, server_nonce + kStoreClientLabel);
  return std::string(mac.begin(), mac.end());
}

std::string server_mac(const std::string& token, const std::string& client_nonce,
                       const std::string& server_nonce) {
  auto mac = core::hmac_sha256(token, client_nonce + server_nonce + kStoreServerLabel);
  return std::string(mac.begin(), mac.end());
}

std::string encode_hello(const Hello& hello) {
  Writer w(MessageType::kHello);
  w.u32(hello.version);
  w.raw(hello.nonce);
  w.u32(hello.limits.max_key_bytes);
  w.u32(hello.limits.max_value_bytes);
  w.u32(hello.limits.max_keys_per_request);
  w.u32(hello.limits.max_frame_bytes);
  return w.frame();
}

std::string encode_auth(const Auth& auth) {
  Writer w(MessageType::kAuth);
  w.raw(auth.mac);
  w.raw(auth.client_nonce);
  return w.frame();
}

std::string encode_request(const Request& q) {
  Writer w(q.type);
  switch (q.type) {
    case MessageType::kSet:
      w.bytes(q.keys.at(0));
      w.bytes(q.value);
      break;
    case MessageType::kGet:
      w.bytes(q.keys.at(0));
      w.u64(q.timeout_ms);
      break;
    case MessageType::kAdd:
      w.bytes(q.keys.at(0));
      w.u64(static_cast<uint64_t>(q.delta));
      break;
    case MessageType::kCheck:
    case MessageType::kWait:
      w.u32(static_cast<uint32_t>(q.keys.size()));
      for (const auto& k : q.keys) w.bytes(k);
      if (q.type == MessageType::kWait) w.u64(q.timeout_ms);
      break;
    case MessageType::kDelete:
      w.bytes(q.keys.at(0));
      break;
    case MessageType::kCompareSet:
      w.bytes(q.keys.at(0));
      w.bytes(q.value);
      w.bytes(q.desired);
      break;
    default:  // NumKeys, and any other type: the type byte alone
      break;
  }
  return w.frame();
}

std::string encode_reply(const Reply& r) {
  Writer w(r.type);
  switch (r.type) {
    case MessageType::kAuthOk: w.raw(r.value); break;
    case MessageType::kValue: w.bytes(r.value); break;
    case MessageType::kInt: w.u64(static_cast<uint64_t>(r.number)); break;
    case MessageType::kBool: w.u8(r.flag ? 1 : 0); break;
    case MessageType::kTimeout:
      w.u32(static_cast<uint32_t>(r.keys.size()));
      for (const auto& k : r.keys) w.bytes(k);
      break;
    case MessageType::kError:
      w.u32(static_cast<uint32_t>(r.code));
      w.bytes(r.message);
      break;
    default:  // Ok
      break;
  }
  return w.frame();
}

void check_request(const Request& q, const StoreLimits& limits) {
  auto check_key = [&](const std::string& key) {
    LOCKSTEP_CHECK(key.size() <= limits.max_key_bytes, "Expected store keys of at most ",
                   limits.max_key_bytes, " bytes, but a key of ", message_name(q.type),
                   " has ", key.size(), " bytes (it starts with '", key.substr(0, 64),
                   "'). Use shorter keys.");
  };
  for (const auto& k : q.keys) check_key(k);
  LOCKSTEP_CHECK(q.keys.size() <= limits.max_keys_per_request, "Expected at most ",
                 limits.max_keys_per_request, " keys in one store ", message_name(q.type),
                 ", but got ", q.keys.size(), ". Split the request.");
  for (const std::string* v : {&q.value, &q.desired}) {
    LOCKSTEP_CHECK(v->size() <= limits.max_value_bytes, "Expected store values of at most ",
                   limits.max_value_bytes, " bytes, but ", message_name(q.type), "('",
                   q.keys.empty() ? std::string() : q.keys.front().substr(0, 64), "') has ",
                   v->size(), " bytes. Store large data elsewhere (a file) and its path here.");
  }
  uint64_t frame = 1 + 8 + 4 + q.value.size() + 4 + q.desired.size();
  for (const auto& k : q.keys) frame += 4 + k.size();
  LOCKSTEP_CHECK(frame <= limits.max_frame_bytes, "Expected a store ", message_name(q.type),
                 " request of at most ", limits.max_frame_bytes, " bytes, but it takes ", frame,
                 " bytes. Split the request.");
}

MessageType body_type(const std::string& body) {
  if (body.empty()) {
    throw ProtocolError(ProtocolError::Kind::kMalformed, "an empty frame");
  }
  return static_cast<MessageType>(static_cast<uint8_t>(body[0]));
}

Hello decode_hello(const std::string& body) {
  Reader r(body, "hello");
  if (body_type(body) != MessageType::kHello) r.malformed("not a hello frame");
  Hello h;
  h.version = r.u32();
  h.nonce = r.fixed(kStoreNonceBytes, "the nonce");
  h.limits = read_limits(r);
  r.end();
  return h;
}

Auth decode_auth(const std::string& body) {
  Reader r(body, "auth");
  if (body_type(body) != MessageType::kAuth) r.malformed("not an auth frame");
  Auth a;
  a.mac = r.fixed(kStoreNonceBytes, "the MAC");
  a.client_nonce = r.fixed(kStoreNonceBytes, "the client nonce");
  r.end();
  return a;
}

Request decode_request(const std::string& body, const StoreLimits& limits) {
  const MessageType type = body_type(body);
  Reader r(body, message_name(type));
  Request q;
  q.type = type;
  auto key = [&] { q.keys.push_back(r.bytes(limits.max_key_bytes, "a key")); };
  switch (type) {
    case MessageType::kSet:
      key();
      q.value = r.bytes(limits.max_value_bytes, "a value");
      break;
    case MessageType::kGet:
      key();
      q.timeout_ms = r.u64();
      break;
    case MessageType::kAdd:
      key();
      q.delta = static_cast<int64_t>(r.u64());
      break;
    case MessageType::kCheck:
    case MessageType::kWait: {
      const uint32_t n = r.count(limits.max_keys_per_request, "keys");
      q.keys.reserve(n);
      for (uint32_t i = 0; i < n; ++i) key();
      if (type == MessageType::kWait) q.timeout_ms = r.u64();
      break;
    }
    case MessageType::kDelete:
      key();
      break;
    case MessageType::kCompareSet:
      key();
      q.value = r.bytes(limits.max_value_bytes, "an expected value");
      q.desired = r.bytes(limits.max_value_bytes, "a desired value");
      break;
    case MessageType::kNumKeys:
      break;
    default:
      throw ProtocolError(ProtocolError::Kind::kMalformed,
                          concat("unknown request type ", int(static_cast<uint8_t>(type))));
  }
  r.end();
  return q;
}

Reply decode_reply(const std::string& body, const StoreLimits& limits) {
  const MessageType type = body_type(body);
  Reader r(body, message_name(type));
  Reply p;
  p.type = type;
  switch (type) {
    case MessageType::kAuthOk:
      p.value = r.fixed(kStoreNonceBytes, "the MAC");
      break;
    case MessageType::kOk:
      break;
    case MessageType::kValue:
      p.value = r.bytes(limits.max_value_bytes, "a value");
      break;
    case MessageType::kInt:
      p.number = static_cast<int64_t>(r.u64());
      break;
    case MessageType::kBool: {
      const uint8_t b = r.u8();
      if (b > 1) r.malformed(concat("a boolean of ", int(b)));
      p.flag = b == 1;
      break;
    }
    case MessageType::kTimeout: {
      const uint32_t n = r.count(limits.max_keys_per_request, "keys");
      p.keys.reserve(n);
      for (uint32_t i = 0; i < n; ++i) p.keys.push_back(r.bytes(limits.max_key_bytes, "a key"));
      break;
    }
    case MessageType::kError:
      p.code = static_cast<ErrorCode>(r.u32());
      p.message = r.bytes(4096, "an error message");
      break;
    default:
      throw ProtocolError(ProtocolError::Kind::kMalformed,
                          concat("unknown reply type ", int(static_cast<uint8_t>(type))));
  }
  r.end();
  return p;
}

size_t FrameReader::feed(const char* data, size_t size) {
  if (complete_) return 0;  // the caller has not taken the previous frame
  size_t used = 0;
  if (header_used_ < 4) {
    const size_t take = std::min(size, 4 - header_used_);
    std::memcpy(header_ + header_used_, data, take);
    header_used_ += take;
    used += take;
    if (header_used_ < 4) return used;
    body_size_ = 0;
    for (int i = 0; i < 4; ++i) body_size_ |= uint32_t(static_cast<uint8_t>(header_[i])) << (8 * i);
    if (body_size_ > max_body_bytes_) {
      throw ProtocolError(ProtocolError::Kind::kTooLarge,
                          concat("a frame of ", body_size_, " bytes exceeds the limit of ",
                                 max_body_bytes_, " bytes"));
    }
    body_.clear();
  }
  const size_t take = std::min(size - used, size_t(body_size_) - body_.size());
  body_.append(data + used, take);  // grows with the bytes received, never with the claim
  used += take;
  if (body_.size() == body_size_) complete_ = true;
  return used;
}

std::string FrameReader::take() {
  std::string body = std::move(body_);
  body_ = std::string();
  complete_ = false;
  header_used_ = 0;
  body_size_ = 0;
  return body;
}

}  // namespace comm
}  // namespace lockstep
