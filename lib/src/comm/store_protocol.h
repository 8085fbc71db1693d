#pragma once
// The wire format of lockstep's TCP store, as pure functions: frames are encoded to and decoded
// from byte strings, with every size checked against StoreLimits before anything is allocated
// for it. No sockets, no LibTorch, no logging: the server (tcp_store_server.h), the client
// (tcp_store_client.h) and the fuzz target (tests/fuzz/fuzz_store_frames.cpp) share it.
//
// Note [Store protocol]
// Every message is a frame: a 4-byte little-endian body length, then the body, whose first
// byte is the message type. Strings are a 4-byte little-endian length then the bytes;
// integers are 8-byte little-endian two's complement. A decoder rejects a frame whose header
// claims more than the limit in force before it buffers a byte of the body, and grows its
// buffer only as bytes actually arrive, so a 9-byte frame claiming 256 MiB costs nothing.
//
//  1. The client connects. The server sends Hello: protocol version, a fresh random 32-byte
//     nonce N_s, and its limits (key, value, keys per request, frame size).
//  2. The client answers Auth: HMAC-SHA256(token, N_s || "lockstep-store-v1") and a random
//     32-byte nonce N_c of its own. Until the server has checked this, the only frame it
//     accepts is one Auth of at most StoreLimits::max_handshake_frame_bytes; anything else
//     (another type, a bigger frame, nothing within the handshake deadline, 2 s by default)
//     drops the connection. The token itself never crosses the wire.
//  3. The server compares the MAC with its own in constant time. Wrong: it sends
//     Error(kAuthRefused) and closes; the client reports "wrong or missing job token".
//     Right: it sends AuthOk with HMAC-SHA256(token, N_c || N_s || "lockstep-store-v1-server"),
//     which the client checks in turn, so a rank never trusts a program that merely squats
//     on the port. With an empty token (authentication explicitly off) both sides compute
//     the same MACs under the empty key, so the exchange is identical.
//  4. Requests and replies, strictly one reply per request, in order:
//       Set(key, value)                        -> Ok
//       Get(key, timeout_ms)                   -> Value(value) | Timeout([key])
//           waits up to timeout_ms for the key to be set (0: does not wait)
//       Add(key, delta)                        -> Int(new value)
//           the value is stored as decimal text (absent = 0); a non-integer value or an
//           overflow -> Error(kBadValue)
//       Check(keys)                            -> Bool(all keys exist), never waits
//       Wait(keys, timeout_ms)                 -> Ok | Timeout(keys still missing)
//       Delete(key)                            -> Bool(existed)
//       CompareSet(key, expected, desired)     -> Value(value now stored), c10d's semantics:
//           absent and expected empty: set desired; present and equal to expected: set
//           desired; otherwise unchanged. Absent with a non-empty expected returns expected.
//       NumKeys()                              -> Int(number of keys)
//     A request that breaks a limit or the format gets Error(kProtocol or kFrameTooLarge)
//     and the connection is closed; other connections are not affected.
//  5. The server waits for keys without a thread per client: a pending Get or Wait parks the
//     connection until a Set, Add or CompareSet completes it or its deadline passes.
//  6. A server at its connection cap answers a new connection with Error(kBusy) instead of
//     Hello and closes it; the client retries until its connect deadline.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "lockstep/errors.h"

namespace lockstep {
namespace comm {

/// Protocol version sent in Hello; a client refuses any other.
constexpr uint32_t kStoreProtocolVersion = 1;
/// Size of the handshake nonces and MACs.
constexpr size_t kStoreNonceBytes = 32;
/// Label appended to the server's nonce in the client's MAC (Note [Store protocol], step 2).
constexpr const char* kStoreClientLabel = "lockstep-store-v1";
/// Label appended to the nonces in the server's MAC (step 3).
constexpr const char* kStoreServerLabel = "lockstep-store-v1-server";

/// Hard limits on what one frame may carry, checked before any allocation.
struct StoreLimits {
  /// Longest key in bytes. Default 4 KiB.
  uint32_t max_key_bytes = 4096;
  /// Longest value in bytes. Default 64 MiB.
  uint32_t max_value_bytes = 64u << 20;
  /// Most keys in one Check or Wait, or in one Timeout reply. Default 16384.
  uint32_t max_keys_per_request = 16384;
  /// Largest frame body once authenticated. Default 128 MiB + 64 KiB, so that a CompareSet with
  /// two values of the largest size fits.
  uint32_t max_frame_bytes = (128u << 20) + (64u << 10);
  /// Largest frame body before the handshake completed (Hello, Auth, AuthOk, Error). Default 256.
  uint32_t max_handshake_frame_bytes = 256;
};

/// A frame broke the protocol or a limit. The connection that sent it must be closed.
class ProtocolError : public CommError {
 public:
  enum class Kind { kMalformed, kTooLarge };
  ProtocolError(Kind kind, const std::string& what) : CommError(what), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

enum class MessageType : uint8_t {
  // Handshake.
  kHello = 0x01,
  kAuth = 0x02,
  kAuthOk = 0x03,
  // Requests.
  kSet = 0x10,
  kGet = 0x11,
  kAdd = 0x12,
  kCheck = 0x13,
  kWait = 0x14,
  kDelete = 0x15,
  kCompareSet = 0x16,
  kNumKeys = 0x17,
  // Replies.
  kOk = 0x20,
  kValue = 0x21,
  kInt = 0x22,
  kBool = 0x23,
  kTimeout = 0x24,
  kError = 0x25,
};

/// Name of a message type ("set", "get", ...), "unknown" for others.
const char* message_name(MessageType type);

/// Codes of Error replies.
enum class ErrorCode : uint32_t {
  kAuthRefused = 1,   ///< wrong or missing token; the server closes the connection
  kProtocol = 2,      ///< malformed frame; the server closes the connection
  kFrameTooLarge = 3, ///< a frame or field over the limits; the server closes the connection
  kBadValue = 4,      ///< Add on a value that is not an integer, or an overflow
  kBusy = 5,          ///< the server is at its connection cap; retry later
};

/// Step 1. `nonce` has kStoreNonceBytes bytes.
struct Hello {
  uint32_t version = kStoreProtocolVersion;
  std::string nonce;
  StoreLimits limits;
};

/// Step 2.
struct Auth {
  std::string mac;           ///< HMAC-SHA256(token, server nonce || kStoreClientLabel)
  std::string client_nonce;  ///< kStoreNonceBytes random bytes
};

/// A request (step 4). Fields unused by a type are left at their defaults.
struct Request {
  MessageType type = MessageType::kNumKeys;
  std::vector<std::string> keys;   ///< one key, or Check/Wait's list
  std::string value;               ///< Set's value, CompareSet's expected value
  std::string desired;             ///< CompareSet's desired value
  int64_t delta = 0;               ///< Add
  uint64_t timeout_ms = 0;         ///< Get, Wait
};

/// A reply (steps 3 and 4).
struct Reply {
  MessageType type = MessageType::kOk;
  std::string value;               ///< Value; AuthOk's MAC
  int64_t number = 0;              ///< Int
  bool flag = false;               ///< Bool
  std::vector<std::string> keys;   ///< Timeout: the keys still missing
  ErrorCode code = ErrorCode::kProtocol;  ///< Error
  std::string message;             ///< Error
};

/// MAC the client sends (step 2) and the one the server answers with (step 3).
std::string client_mac(const std::string& token, const std::string& server_nonce);
std::string server_mac(const std::string& token, const std::string& client_nonce,
                       const std::string& server_nonce);

// Encoding: each returns a whole frame, header included. Encoding checks nothing; the
// client checks sizes against the server's limits before it encodes (check_request).
std::string encode_hello(const Hello& hello);
std::string encode_auth(const Auth& auth);
std::string encode_request(const Request& request);
std::string encode_reply(const Reply& reply);

/// Throws InvalidArgument when `request` breaks `limits` (naming the key and the limit), so
/// that a client reports its own mistake instead of having the server close the connection.
void check_request(const Request& request, const StoreLimits& limits);

// Decoding: each takes a frame body (without its header), checks every field against `limits`
// before allocating it, requires the body to be consumed exactly, and throws ProtocolError
// otherwise.
Hello decode_hello(const std::string& body);
Auth decode_auth(const std::string& body);
Request decode_request(const std::string& body, const StoreLimits& limits);
Reply decode_reply(const std::string& body, const StoreLimits& limits);

/// Type byte of a body; throws ProtocolError when empty.
MessageType body_type(const std::string& body);

/// Incremental frame decoder for a byte stream.
///
/// `feed` consumes bytes up to the end of at most one frame, so the caller can change the
/// limit between frames (the server raises it after the handshake). The header is checked
/// against the limit before a byte of the body is stored, and the body buffer grows only as
/// bytes arrive. Not thread-safe.
class FrameReader {
 public:
  explicit FrameReader(uint32_t max_body_bytes) : max_body_bytes_(max_body_bytes) {}

  /// Limit for the frames whose header has not been read yet.
  void set_max_body_bytes(uint32_t max_body_bytes) { max_body_bytes_ = max_body_bytes; }
  uint32_t max_body_bytes() const { return max_body_bytes_; }

  /// Consumes bytes of `data` up to the end of the current frame; returns how many. Throws
  /// ProtocolError(kTooLarge) when a header claims more than the limit.
  size_t feed(const char* data, size_t size);

  /// True when a complete frame is waiting in `body()`.
  bool has_frame() const { return complete_; }
  /// The complete frame's body (valid while has_frame()).
  const std::string& body() const { return body_; }
  /// Moves the complete frame's body out and starts the next frame.
  std::string take();

  /// True while part of a frame has been read.
  bool in_frame() const { return header_used_ > 0 || complete_; }

 private:
  uint32_t max_body_bytes_;
  char header_[4] = {};
  size_t header_used_ = 0;
  uint32_t body_size_ = 0;
  std::string body_;
  bool complete_ = false;
};

}  // namespace comm
}  // namespace lockstep
