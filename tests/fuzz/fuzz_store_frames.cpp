// libFuzzer target over the store's wire format and the server's request handling, without
// sockets (tests/fuzz/CMakeLists.txt builds it with clang, ASan and UBSan).
//
// Each input is read as a stream of frames and goes through:
//  1. the decoders: every frame is decoded as a request, a reply, a Hello and an Auth; what
//     decodes must encode back to the same bytes;
//  2. the server's logic (StoreService): two authenticated connections and one that never
//     authenticates receive the bytes in chunks while time advances, so waits park, complete
//     and expire; whatever the server sends must decode as valid frames.
// Limits are small so that the limit checks are reached. A crash, a sanitizer report or a
// broken invariant (__builtin_trap) is a finding.
#include <cstddef>
#include <cstdint>
#include <string>

#include "comm/store_protocol.h"
#include "comm/store_service.h"

using namespace lockstep::comm;

namespace {

StoreLimits small_limits() {
  StoreLimits l;
  l.max_key_bytes = 64;
  l.max_value_bytes = 1024;
  l.max_keys_per_request = 8;
  l.max_frame_bytes = 4096;
  l.max_handshake_frame_bytes = 256;
  return l;
}

void check(bool condition) {
  if (!condition) __builtin_trap();
}

bool body_of_frame_equals(const std::string& frame, const std::string& body) {
  return frame.size() == body.size() + 4 && frame.compare(4, std::string::npos, body) == 0;
}

void fuzz_decoders(const std::string& input) {
  const StoreLimits limits = small_limits();
  FrameReader reader(limits.max_frame_bytes);
  size_t at = 0;
  while (at < input.size()) {
    size_t used = 0;
    try {
      used = reader.feed(input.data() + at, input.size() - at);
    } catch (const ProtocolError&) {
      return;  // an oversized claim ends the stream, as it ends a connection
    }
    check(used > 0 || reader.has_frame());
    at += used;
    if (!reader.has_frame()) break;
    const std::string body = reader.take();
    try {
      Request q = decode_request(body, limits);
      check(body_of_frame_equals(encode_request(q), body));
      check_request(q, limits);  // what the server accepts, the client may send
    } catch (const ProtocolError&) {
    }
    try {
      Reply r = decode_reply(body, limits);
      check(body_of_frame_equals(encode_reply(r), body));
    } catch (const ProtocolError&) {
    }
    try {
      Hello h = decode_hello(body);
      check(body_of_frame_equals(encode_hello(h), body));
    } catch (const ProtocolError&) {
    }
    try {
      Auth a = decode_auth(body);
      check(body_of_frame_equals(encode_auth(a), body));
    } catch (const ProtocolError&) {
    }
  }
}

// Everything the service sent on `id` must be well-formed frames; drains it.
void drain(StoreService& service, ConnectionId id, StoreService::Clock::time_point now,
           bool authenticated) {
  size_t size = 0;
  const char* data = service.output(id, &size);
  if (size == 0) return;
  const std::string out(data, size);
  service.consume_output(id, size, now);
  FrameReader reader(1u << 20);
  size_t at = 0;
  while (at < out.size()) {
    at += reader.feed(out.data() + at, out.size() - at);
    check(reader.has_frame());
    const std::string body = reader.take();
    const MessageType type = body_type(body);
    if (type == MessageType::kHello) {
      decode_hello(body);
    } else {
      decode_reply(body, authenticated ? small_limits() : StoreLimits());
    }
  }
}

void fuzz_service(const std::string& input) {
  StoreService::Options options;
  options.token = std::string(32, 'T');
  options.limits = small_limits();
  options.handshake_timeout = std::chrono::seconds(2);
  options.output_high_water = 2048;
  uint8_t counter = 0;
  StoreService service(options, [&counter](uint8_t* out, size_t size) {
    for (size_t i = 0; i < size; ++i) out[i] = counter++;
  });
  auto now = StoreService::Clock::time_point() + std::chrono::hours(1);
  // Connections 1 and 2 authenticate as a real client does; 3 never does.
  for (ConnectionId id : {1, 2, 3}) {
    service.open(id, now);
    size_t size = 0;
    const char* data = service.output(id, &size);
    const std::string hello_frame(data, size);
    service.consume_output(id, size, now);
    if (id == 3) continue;
    const Hello hello = decode_hello(hello_frame.substr(4));
    Auth auth;
    auth.mac = client_mac(options.token, hello.nonce);
    auth.client_nonce = std::string(kStoreNonceBytes, 'c');
    const std::string frame = encode_auth(auth);
    service.receive(id, frame.data(), frame.size(), now);
    drain(service, id, now, true);
    check(service.wants_input(id));
  }
  const size_t chunk = input.empty() ? 1 : 1 + static_cast<uint8_t>(input[0]) % 32;
  for (size_t at = 0; at < input.size(); at += chunk) {
    const std::string piece = input.substr(at, chunk);
    for (ConnectionId id : {1, 3}) {
      if (service.wants_input(id)) service.receive(id, piece.data(), piece.size(), now);
      drain(service, id, now, id != 3);
      drain(service, 2, now, true);
    }
    now += std::chrono::milliseconds(37);
    service.expire(now);
    drain(service, 1, now, true);
    drain(service, 2, now, true);
    check(service.num_waiting() <= service.num_connections());
  }
  // The second connection replays the stream at once: its sets complete the first one's
  // waits, and its own waits expire below.
  if (service.wants_input(2)) service.receive(2, input.data(), input.size(), now);
  drain(service, 1, now, true);
  drain(service, 2, now, true);
  now += std::chrono::hours(24 * 400);
  service.expire(now);
  for (ConnectionId id : {1, 2, 3}) drain(service, id, now, id != 3);
  for (ConnectionId id : {1, 2, 3}) service.close(id);
  check(service.num_connections() == 0);
  check(service.num_waiting() == 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  fuzz_decoders(input);
  fuzz_service(input);
  return 0;
}
