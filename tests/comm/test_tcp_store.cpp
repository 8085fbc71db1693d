// lockstep's own TCP store: SHA-256/HMAC vectors, the wire format's limits, the server and
// client over loopback (every operation, bounded waits, concurrency), and the closed door:
// clients without the job token refused within the handshake deadline while the job's clients
// go on, oversized frames rejected without allocating, the connection cap, the listening
// address. Ranks are threads; ports are ephemeral.
#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "comm/store_protocol.h"
#include "comm/store_token.h"
#include "comm/tcp_store_client.h"
#include "comm/tcp_store_server.h"
#include "core/sha256.h"
#include "lockstep/env_vars.h"
#include "lockstep/errors.h"

using namespace lockstep;
using namespace lockstep::comm;
using std::chrono::milliseconds;
using std::chrono::seconds;
using Clock = std::chrono::steady_clock;

namespace {

// ---- helpers ------------------------------------------------------------------------------

double elapsed_s(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

std::string unhex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  return out;
}

std::string hex_of(const core::Sha256Digest& d) { return core::to_hex(d); }

template <typename E, typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an exception";
  return "";
}

// Resident set size of this process in bytes.
size_t rss_bytes() {
  std::ifstream statm("/proc/self/statm");
  size_t pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * static_cast<size_t>(sysconf(_SC_PAGESIZE));
}

// A plain TCP connection for playing a foreign or misbehaving client.
class RawSocket {
 public:
  explicit RawSocket(int port, const char* ip = "127.0.0.1") {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    ::inet_pton(AF_INET, ip, &addr.sin_addr);
    connect_errno_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 ? 0 : errno;
  }
  ~RawSocket() {
    if (fd_ >= 0) ::close(fd_);
  }
  int fd() const { return fd_; }
  int connect_errno() const { return connect_errno_; }
  void send(const std::string& bytes) {
    ASSERT_EQ(::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL), ssize_t(bytes.size()));
  }
  // Reads exactly n bytes within `timeout`; fewer when the peer closed or time ran out.
  std::string read(size_t n, milliseconds timeout) {
    std::string out;
    const auto deadline = Clock::now() + timeout;
    char buffer[4096];
    while (out.size() < n) {
      auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
      pollfd p{fd_, POLLIN, 0};
      if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0) break;
      ssize_t got = ::recv(fd_, buffer, std::min(sizeof(buffer), n - out.size()), 0);
      if (got <= 0) break;
      out.append(buffer, static_cast<size_t>(got));
    }
    return out;
  }
  // One frame's body, or "" when none came.
  std::string read_frame(milliseconds timeout = seconds(5)) {
    std::string header = read(4, timeout);
    if (header.size() < 4) return "";
    uint32_t size = 0;
    for (int i = 0; i < 4; ++i) size |= uint32_t(static_cast<uint8_t>(header[i])) << (8 * i);
    return read(size, timeout);
  }
  // True when the peer closes the connection within `timeout` (data before the close is read
  // and dropped).
  bool closed_within(milliseconds timeout) {
    const auto deadline = Clock::now() + timeout;
    char buffer[4096];
    for (;;) {
      auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
      pollfd p{fd_, POLLIN, 0};
      if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0) return false;
      ssize_t got = ::recv(fd_, buffer, sizeof(buffer), 0);
      if (got <= 0) return true;
    }
  }
  // Runs the handshake with `token` (as the real client does); returns the Hello.
  Hello authenticate(const std::string& token) {
    Hello hello = decode_hello(read_frame());
    Auth auth;
    auth.mac = client_mac(token, hello.nonce);
    auth.client_nonce = std::string(kStoreNonceBytes, 'n');
    send(encode_auth(auth));
    Reply ok = decode_reply(read_frame(), StoreLimits());
    EXPECT_EQ(ok.type, MessageType::kAuthOk);
    EXPECT_EQ(ok.value, server_mac(token, auth.client_nonce, hello.nonce));
    return hello;
  }

 private:
  int fd_ = -1;
  int connect_errno_ = 0;
};

std::string frame_header(uint32_t size) {
  std::string h(4, '\0');
  for (int i = 0; i < 4; ++i) h[i] = static_cast<char>((size >> (8 * i)) & 0xff);
  return h;
}

// A port nobody listens on, held (bound, not listening) while the object lives.
class ReservedPort {
 public:
  ReservedPort() {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = 0;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    socklen_t len = sizeof(addr);
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
  }
  ~ReservedPort() { release(); }
  void release() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  int port() const { return port_; }

 private:
  int fd_ = -1;
  int port_ = 0;
};

TcpStoreClientOptions client_options(const std::string& token) {
  return TcpStoreClientOptions().token(token).connect_timeout(seconds(10)).timeout(seconds(20));
}

// ---- SHA-256 and HMAC ---------------------------------------------------------------------

TEST(Sha256, Fips180Examples) {
  EXPECT_EQ(hex_of(core::sha256("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(hex_of(core::sha256("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(hex_of(core::sha256(std::string(1000000, 'a'))),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  EXPECT_EQ(hex_of(core::sha256("")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST(Sha256, IncrementalEqualsOneShotAcrossBlockBoundaries) {
  std::string message;
  for (int i = 0; i < 300; ++i) message.push_back(static_cast<char>(i * 7 + 3));
  for (size_t size : {0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 300}) {
    for (size_t chunk : {1, 3, 64, 100}) {
      core::Sha256 h;
      for (size_t at = 0; at < size; at += chunk) h.update(message.data() + at, std::min(chunk, size - at));
      EXPECT_EQ(hex_of(h.finish()), hex_of(core::sha256(message.substr(0, size))))
          << "size " << size << ", chunk " << chunk;
    }
  }
}

TEST(HmacSha256, Rfc4231TestCases) {
  struct Case {
    std::string key, data, mac;
  };
  const std::string big_key(131, '\xaa');
  const Case cases[] = {
      {std::string(20, '\x0b'), "Hi There",
       "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"},
      {"Jefe", "what do ya want for nothing?",
       "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"},
      {std::string(20, '\xaa'), std::string(50, '\xdd'),
       "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"},
      {unhex("0102030405060708090a0b0c0d0e0f10111213141516171819"), std::string(50, '\xcd'),
       "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"},
      {big_key, "Test Using Larger Than Block-Size Key - Hash Key First",
       "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"},
      {big_key,
       "This is a test using a larger than block-size key and a larger than block-size data. "
       "The key needs to be hashed before being used by the HMAC algorithm.",
       "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"},
  };
  for (const auto& c : cases) EXPECT_EQ(hex_of(core::hmac_sha256(c.key, c.data)), c.mac);
  // Test case 5: output truncated to 128 bits.
  EXPECT_EQ(hex_of(core::hmac_sha256(std::string(20, '\x0c'), "Test With Truncation")).substr(0, 32),
            "a3b6167473100ee06e0c796c2955552b");
}

TEST(HmacSha256, ConstantTimeEqual) {
  EXPECT_TRUE(core::constant_time_equal("abc", 3, "abc", 3));
  EXPECT_FALSE(core::constant_time_equal("abc", 3, "abd", 3));
  EXPECT_FALSE(core::constant_time_equal("abc", 3, "ab", 2));
  EXPECT_TRUE(core::constant_time_equal("", 0, "", 0));
}

// ---- the wire format ----------------------------------------------------------------------

Request request(MessageType type, std::vector<std::string> keys) {
  Request q;
  q.type = type;
  q.keys = std::move(keys);
  return q;
}

std::string body_of(const std::string& frame) { return frame.substr(4); }

TEST(StoreProtocol, RequestsAndRepliesRoundTripByteByByte) {
  std::vector<Request> requests;
  requests.push_back(request(MessageType::kSet, {"k"}));
  requests.back().value = std::string("v\0w", 3);
  requests.push_back(request(MessageType::kGet, {"key"}));
  requests.back().timeout_ms = 1234;
  requests.push_back(request(MessageType::kAdd, {"n"}));
  requests.back().delta = -7;
  requests.push_back(request(MessageType::kCheck, {"a", "", "c"}));
  requests.push_back(request(MessageType::kWait, {"a", "b"}));
  requests.back().timeout_ms = 99;
  requests.push_back(request(MessageType::kDelete, {"d"}));
  requests.push_back(request(MessageType::kCompareSet, {"c"}));
  requests.back().value = "old";
  requests.back().desired = "new";
  requests.push_back(request(MessageType::kNumKeys, {}));
  for (const auto& q : requests) {
    const std::string frame = encode_request(q);
    FrameReader reader(1024);
    size_t at = 0;
    while (!reader.has_frame()) at += reader.feed(frame.data() + at, 1);
    EXPECT_EQ(at, frame.size());
    Request back = decode_request(reader.take(), StoreLimits());
    EXPECT_EQ(back.type, q.type);
    EXPECT_EQ(back.keys, q.keys);
    EXPECT_EQ(back.value, q.value);
    EXPECT_EQ(back.desired, q.desired);
    EXPECT_EQ(back.delta, q.delta);
    EXPECT_EQ(back.timeout_ms, q.timeout_ms);
  }
  Reply r;
  r.type = MessageType::kTimeout;
  r.keys = {"x", "y"};
  EXPECT_EQ(decode_reply(body_of(encode_reply(r)), StoreLimits()).keys, r.keys);
  r = Reply();
  r.type = MessageType::kError;
  r.code = ErrorCode::kBadValue;
  r.message = "m";
  Reply back = decode_reply(body_of(encode_reply(r)), StoreLimits());
  EXPECT_EQ(back.code, ErrorCode::kBadValue);
  EXPECT_EQ(back.message, "m");
  r = Reply();
  r.type = MessageType::kInt;
  r.number = INT64_MIN;
  EXPECT_EQ(decode_reply(body_of(encode_reply(r)), StoreLimits()).number, INT64_MIN);
}

TEST(StoreProtocol, FrameReaderChecksTheClaimBeforeBuffering) {
  FrameReader reader(1024);
  const std::string huge = frame_header(256u << 20) + "\x10xxxx";
  try {
    reader.feed(huge.data(), huge.size());
    ADD_FAILURE() << "a 256 MiB claim was accepted";
  } catch (const ProtocolError& e) {
    EXPECT_EQ(e.kind(), ProtocolError::Kind::kTooLarge);
    EXPECT_NE(std::string(e.what()).find("a frame of 268435456 bytes exceeds the limit of 1024"),
              std::string::npos)
        << e.what();
  }
  // A claim within the limit: the buffer grows with the bytes received, not with the claim.
  FrameReader lazy(100u << 20);
  const std::string start = frame_header(100u << 20) + "\x10xxxxxxxx";
  EXPECT_EQ(lazy.feed(start.data(), start.size()), start.size());
  EXPECT_FALSE(lazy.has_frame());
  EXPECT_LT(lazy.body().capacity(), 4096u);
  // feed stops at the end of a frame, so the limit can change between frames.
  const std::string two = encode_request(request(MessageType::kNumKeys, {})) +
                          encode_request(request(MessageType::kNumKeys, {}));
  FrameReader one_at_a_time(16);
  EXPECT_EQ(one_at_a_time.feed(two.data(), two.size()), two.size() / 2);
  EXPECT_TRUE(one_at_a_time.has_frame());
}

TEST(StoreProtocol, DecoderRejectsBrokenFrames) {
  StoreLimits limits;
  limits.max_key_bytes = 8;
  limits.max_keys_per_request = 2;
  limits.max_value_bytes = 16;
  auto reject = [&](const std::string& body, ProtocolError::Kind kind, const std::string& text) {
    try {
      decode_request(body, limits);
      ADD_FAILURE() << "accepted: " << text;
    } catch (const ProtocolError& e) {
      EXPECT_EQ(e.kind(), kind) << e.what();
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  reject(body_of(encode_request(request(MessageType::kDelete, {"123456789"}))),
         ProtocolError::Kind::kTooLarge, "a key of 9 bytes exceeds the limit of 8 bytes");
  reject(body_of(encode_request(request(MessageType::kCheck, {"a", "b", "c"}))),
         ProtocolError::Kind::kTooLarge, "3 keys exceed the limit of 2");
  Request set = request(MessageType::kSet, {"k"});
  set.value = std::string(17, 'v');
  reject(body_of(encode_request(set)), ProtocolError::Kind::kTooLarge,
         "a value of 17 bytes exceeds the limit of 16 bytes");
  std::string lying = body_of(encode_request(request(MessageType::kCheck, {"abcdefgh"})));
  lying[1] = 2;  // claims two keys, holds one
  reject(lying, ProtocolError::Kind::kMalformed, "the frame ends inside");
  std::string lying_count = std::string("\x13") + frame_header(2) ;
  reject(lying_count, ProtocolError::Kind::kMalformed, "that the frame cannot hold");
  std::string truncated = body_of(encode_request(request(MessageType::kDelete, {"abc"})));
  reject(truncated.substr(0, truncated.size() - 1), ProtocolError::Kind::kMalformed,
         "the frame ends inside a key");
  reject(truncated + "x", ProtocolError::Kind::kMalformed, "1 unexpected trailing bytes");
  reject("\x7f", ProtocolError::Kind::kMalformed, "unknown request type 127");
  reject("", ProtocolError::Kind::kMalformed, "an empty frame");
  EXPECT_THROW(decode_hello("\x01short"), ProtocolError);
  EXPECT_THROW(decode_auth(std::string("\x02") + std::string(63, 'x')), ProtocolError);
  EXPECT_THROW(decode_reply(std::string("\x23\x02"), StoreLimits()), ProtocolError);
}

TEST(StoreProtocol, ClientSideChecksNameTheKeyAndTheLimit) {
  StoreLimits limits;
  Request q = request(MessageType::kSet, {std::string(5000, 'k')});
  EXPECT_NE(error_of<InvalidArgument>([&] { check_request(q, limits); })
                .find("Expected store keys of at most 4096 bytes, but a key of set has 5000 bytes"),
            std::string::npos);
  limits.max_value_bytes = 10;
  q = request(MessageType::kSet, {"big"});
  q.value = std::string(11, 'v');
  EXPECT_NE(error_of<InvalidArgument>([&] { check_request(q, limits); })
                .find("Expected store values of at most 10 bytes, but set('big') has 11 bytes"),
            std::string::npos);
}

// ---- server and client: operations --------------------------------------------------------

TEST(TcpStore, EveryOperation) {
  TcpStoreServer server;
  TcpStoreClient c("127.0.0.1", server.port(), client_options(server.token()));
  EXPECT_EQ(c.describe(), "tcp://127.0.0.1:" + std::to_string(server.port()));
  c.set("a", "1");
  EXPECT_EQ(c.get("a"), "1");
  c.set("empty", "");
  EXPECT_EQ(c.get("empty"), "");
  const std::string binary("\0\x01\xff\n", 4);
  c.set(binary, binary);
  EXPECT_EQ(c.get(binary), binary);
  std::string big(8u << 20, 'x');
  for (size_t i = 0; i < big.size(); i += 4097) big[i] = static_cast<char>(i);
  c.set("big", big);
  EXPECT_EQ(c.get("big"), big);
  EXPECT_EQ(c.add("n", 5), 5);
  EXPECT_EQ(c.add("n", -7), -2);
  EXPECT_EQ(c.get("n"), "-2");
  EXPECT_TRUE(c.check({"a", "n"}));
  EXPECT_FALSE(c.check({"a", "missing"}));
  EXPECT_TRUE(c.check({}));
  c.wait({"a", "n"}, seconds(1));
  EXPECT_EQ(c.num_keys(), 5);
  EXPECT_TRUE(c.remove("a"));
  EXPECT_FALSE(c.remove("a"));
  EXPECT_EQ(c.num_keys(), 4);
  // compare_set, c10d's semantics.
  EXPECT_EQ(c.compare_set("cs", "", "first"), "first");
  EXPECT_EQ(c.compare_set("cs", "wrong", "second"), "first");
  EXPECT_EQ(c.compare_set("cs", "first", "second"), "second");
  EXPECT_EQ(c.compare_set("absent", "expected", "x"), "expected");
  EXPECT_FALSE(c.check({"absent"}));
  // add on a value that is not an integer: a clear error, and the connection stays usable.
  c.set("text", "abc");
  const std::string e = error_of<InvalidArgument>([&] { c.add("text", 1); });
  EXPECT_NE(e.find("store add('text') on tcp://127.0.0.1:"), std::string::npos) << e;
  EXPECT_NE(e.find("not a decimal integer"), std::string::npos) << e;
  c.set("max", std::to_string(INT64_MAX));
  EXPECT_NE(error_of<InvalidArgument>([&] { c.add("max", 1); }).find("overflows"),
            std::string::npos);
  EXPECT_EQ(c.get("text"), "abc");
}

TEST(TcpStore, GetWaitsUntilAnotherClientSets) {
  TcpStoreServer server;
  TcpStoreClient waiter("127.0.0.1", server.port(), client_options(server.token()));
  TcpStoreClient setter("127.0.0.1", server.port(), client_options(server.token()));
  auto got = std::async(std::launch::async, [&] { return waiter.get("late", seconds(20)); });
  auto wait_done = std::async(std::launch::async, [&] { waiter.wait({"late", "later"}, seconds(20)); });
  ASSERT_TRUE(server.wait_for_stats([](const TcpStoreServerStats& s) { return s.waiting == 2; },
                                    seconds(10)));
  EXPECT_EQ(got.wait_for(milliseconds(0)), std::future_status::timeout);
  const auto start = Clock::now();
  setter.set("late", "here");
  EXPECT_EQ(got.get(), "here");
  EXPECT_LT(elapsed_s(start), 2.0);
  EXPECT_EQ(wait_done.wait_for(milliseconds(0)), std::future_status::timeout);
  setter.add("later", 1);
  wait_done.get();
  EXPECT_LT(elapsed_s(start), 2.0);
}

TEST(TcpStore, GetAndWaitTimeOutWithinTheirBound) {
  TcpStoreServer server;
  TcpStoreClient c("127.0.0.1", server.port(), client_options(server.token()));
  const std::string where = "tcp://127.0.0.1:" + std::to_string(server.port());
  auto start = Clock::now();
  std::string e = error_of<TimeoutError>([&] { c.get("never", milliseconds(300)); });
  double took = elapsed_s(start);
  EXPECT_GE(took, 0.29);
  EXPECT_LT(took, 2.0);
  EXPECT_NE(e.find("store get('never') on " + where + " timed out after 0.3 s: the key was not set"),
            std::string::npos)
      << e;
  c.set("a", "1");
  start = Clock::now();
  e = error_of<TimeoutError>([&] { c.wait({"a", "b", "c"}, milliseconds(300)); });
  took = elapsed_s(start);
  EXPECT_GE(took, 0.29);
  EXPECT_LT(took, 2.0);
  EXPECT_NE(e.find("store wait(['a', 'b', 'c']) on " + where +
                   " timed out after 0.3 s: still missing 'b', 'c'"),
            std::string::npos)
      << e;
  // Timeout 0 answers at once; the store's default timeout bounds get(key).
  start = Clock::now();
  EXPECT_THROW(c.get("never", milliseconds(0)), TimeoutError);
  c.set_timeout(milliseconds(200));
  EXPECT_THROW(c.get("never"), TimeoutError);
  EXPECT_LT(elapsed_s(start), 1.5);
  // The connection is still good after timeouts.
  EXPECT_EQ(c.get("a"), "1");
  EXPECT_EQ(server.stats().waiting, 0u);
}

TEST(TcpStore, ManyConcurrentClients) {
  TcpStoreServer server;
  constexpr int kClients = 16, kAdds = 50;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int r = 0; r < kClients; ++r) {
    threads.emplace_back([&, r] {
      try {
        TcpStoreClient c("127.0.0.1", server.port(), client_options(server.token()));
        for (int i = 0; i < kAdds; ++i) c.add("counter", 1);
        c.set("rank/" + std::to_string(r), std::to_string(r));
        std::vector<std::string> all;
        for (int k = 0; k < kClients; ++k) all.push_back("rank/" + std::to_string(k));
        c.wait(all, seconds(20));  // a barrier over the store
      } catch (const std::exception& e) {
        ADD_FAILURE() << "rank " << r << ": " << e.what();
        ++failures;
      }
    });
  }
  for (auto& t : threads) t.join();
  ASSERT_EQ(failures, 0);
  TcpStoreClient c("127.0.0.1", server.port(), client_options(server.token()));
  EXPECT_EQ(c.get("counter"), std::to_string(kClients * kAdds));
  EXPECT_EQ(c.num_keys(), kClients + 1);
}

TEST(TcpStore, OneClientSharedByThreadsDoesNotBlockBehindAWait) {
  TcpStoreServer server;
  TcpStoreClient c("127.0.0.1", server.port(), client_options(server.token()));
  auto waiting = std::async(std::launch::async, [&] { return c.get("go", seconds(20)); });
  ASSERT_TRUE(server.wait_for_stats([](const TcpStoreServerStats& s) { return s.waiting == 1; },
                                    seconds(10)));
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 20; ++i) c.add("shared", 1);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(c.add("shared", 0), 160);
  c.set("go", "now");
  EXPECT_EQ(waiting.get(), "now");
}

TEST(TcpStore, ServerShutdownWakesWaitingClients) {
  auto server = std::make_unique<TcpStoreServer>();
  TcpStoreClient c("127.0.0.1", server->port(), client_options(server->token()));
  auto waiting = std::async(std::launch::async, [&] {
    return error_of<CommError>([&] { c.get("never", seconds(30)); });
  });
  ASSERT_TRUE(server->wait_for_stats([](const TcpStoreServerStats& s) { return s.waiting == 1; },
                                     seconds(10)));
  const auto start = Clock::now();
  server.reset();
  const std::string e = waiting.get();
  EXPECT_LT(elapsed_s(start), 2.0);
  EXPECT_NE(e.find("store get('never') on tcp://127.0.0.1:"), std::string::npos) << e;
  EXPECT_NE(e.find("the store server closed the connection"), std::string::npos) << e;
}

// ---- connecting ---------------------------------------------------------------------------

TEST(TcpStore, ConnectTimesOutNamingTheAddress) {
  ReservedPort nobody;
  const auto start = Clock::now();
  const std::string e = error_of<TimeoutError>([&] {
    TcpStoreClient c("127.0.0.1", nobody.port(),
                     TcpStoreClientOptions().connect_timeout(milliseconds(300)));
  });
  EXPECT_GE(elapsed_s(start), 0.25);
  EXPECT_LT(elapsed_s(start), 2.0);
  EXPECT_NE(e.find("Could not reach the store at tcp://127.0.0.1:" + std::to_string(nobody.port()) +
                   " within 0.3 s"),
            std::string::npos)
      << e;
}

TEST(TcpStore, ConnectRetriesUntilTheServerListens) {
  ReservedPort reserved;
  const int port = reserved.port();
  auto connected = std::async(std::launch::async, [&] {
    TcpStoreClient c("127.0.0.1", port,
                     TcpStoreClientOptions().connect_timeout(seconds(20)));
    c.set("k", "v");
    return c.get("k");
  });
  reserved.release();
  TcpStoreServer server(TcpStoreServerOptions().port(port).no_authentication(true));
  EXPECT_EQ(connected.get(), "v");
}

TEST(TcpStore, ServerOptionsAreChecked) {
  EXPECT_NE(error_of<InvalidArgument>([] {
              TcpStoreServer s(TcpStoreServerOptions().token("short"));
            }).find("Expected a store token of at least 32 bytes, but got 5 bytes"),
            std::string::npos);
  EXPECT_NE(error_of<InvalidArgument>([] {
              TcpStoreServer s(
                  TcpStoreServerOptions().token(std::string(32, 't')).no_authentication(true));
            }).find("Expected either a store token or no_authentication, but got both"),
            std::string::npos);
  TcpStoreServer first;
  const std::string e = error_of<CommError>([&] {
    TcpStoreServer second(TcpStoreServerOptions().port(first.port()));
  });
  EXPECT_NE(e.find("Could not host the store on 127.0.0.1:" + std::to_string(first.port())),
            std::string::npos)
      << e;
  // A generated token has 32 random bytes.
  EXPECT_EQ(first.token().size(), 32u);
  TcpStoreServer other;
  EXPECT_NE(first.token(), other.token());
}

// ---- the closed door ----------------------------------------------------------------------

TEST(TcpStoreAuth, ForeignClientsAreRefusedAndTheJobGoesOn) {
  TcpStoreServer server;
  TcpStoreClient job("127.0.0.1", server.port(), client_options(server.token()));
  job.set("job/key", "original");
  const std::string refused_text = "refused this client: wrong or missing job token (" +
                                   std::string(env::kStoreToken) + " or " +
                                   env::kStoreTokenFile + ")";
  testing::internal::CaptureStderr();

  // A lockstep client without the token, and one with another job's token.
  for (const std::string& token : {std::string(), generate_store_token()}) {
    const auto start = Clock::now();
    const std::string e = error_of<InvalidArgument>([&] {
      TcpStoreClient stranger("127.0.0.1", server.port(), client_options(token));
      stranger.set("job/key", "evil");
    });
    EXPECT_LT(elapsed_s(start), 2.0);
    EXPECT_NE(e.find("The store at tcp://127.0.0.1:" + std::to_string(server.port()) + " " +
                     refused_text),
              std::string::npos)
        << e;
    EXPECT_EQ(job.get("job/key"), "original");
  }
  // A raw client that writes before authenticating: dropped at once, nothing written.
  {
    RawSocket raw(server.port());
    EXPECT_EQ(body_type(raw.read_frame()), MessageType::kHello);
    Request set = request(MessageType::kSet, {"job/key"});
    set.value = "evil";
    raw.send(encode_request(set));
    Reply r = decode_reply(raw.read_frame(), StoreLimits());
    EXPECT_EQ(r.type, MessageType::kError);
    EXPECT_EQ(r.code, ErrorCode::kProtocol);
    EXPECT_TRUE(raw.closed_within(seconds(2)));
  }
  // A raw client that says nothing: dropped within the 2 s handshake deadline.
  {
    RawSocket silent(server.port());
    const auto start = Clock::now();
    EXPECT_TRUE(silent.closed_within(seconds(4)));
    const double took = elapsed_s(start);
    EXPECT_GE(took, 1.5);
    EXPECT_LE(took, 2.5);
  }
  const std::string log = testing::internal::GetCapturedStderr();

  EXPECT_EQ(job.get("job/key"), "original");
  job.set("job/after", "still works");
  EXPECT_EQ(job.get("job/after"), "still works");
  const auto stats = server.stats();
  EXPECT_EQ(stats.refused, 4u);
  EXPECT_EQ(stats.warnings, 1u);
  // One warning, naming the first stranger's address; the others are counted for the next.
  size_t count = 0;
  for (size_t at = log.find("refused a connection from"); at != std::string::npos;
       at = log.find("refused a connection from", at + 1)) {
    ++count;
  }
  EXPECT_EQ(count, 1u) << log;
  EXPECT_NE(log.find("lockstep store on 127.0.0.1:" + std::to_string(server.port()) +
                     " refused a connection from 127.0.0.1:"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("wrong or missing job token"), std::string::npos) << log;
  EXPECT_EQ(log.find(store_token_to_hex(server.token())), std::string::npos);
}

TEST(TcpStoreAuth, WarningsAreRateLimitedWithASummary) {
  // Refusals 1 and 2 come within the 2 s interval: one warning. The silent client is dropped
  // 3 s after it connected, past the interval: a second warning, counting refusal 2.
  TcpStoreServer server(TcpStoreServerOptions()
                            .warning_interval(seconds(2))
                            .handshake_timeout(seconds(3)));
  testing::internal::CaptureStderr();
  RawSocket silent(server.port());
  for (int i = 0; i < 2; ++i) {
    EXPECT_THROW(TcpStoreClient("127.0.0.1", server.port(), client_options("")), InvalidArgument);
  }
  EXPECT_EQ(server.stats().warnings, 1u);
  EXPECT_TRUE(silent.closed_within(seconds(5)));
  const std::string log = testing::internal::GetCapturedStderr();
  EXPECT_EQ(server.stats().warnings, 2u);
  EXPECT_EQ(server.stats().refused, 3u);
  EXPECT_NE(log.find(": no valid handshake within 3 s. A program that is not part of this job"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("(1 more refused or closed connection(s) since the last warning)"),
            std::string::npos)
      << log;
}

TEST(TcpStoreAuth, ClientChecksThatTheServerHoldsTheToken) {
  // A program squatting on the port: it sends a Hello but cannot compute the server's MAC.
  int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(listener, 4), 0);
  socklen_t len = sizeof(addr);
  ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
  const int port = ntohs(addr.sin_port);
  std::thread squatter([listener] {
    int fd = ::accept(listener, nullptr, nullptr);
    Hello hello;
    hello.nonce = std::string(kStoreNonceBytes, 'z');
    std::string frame = encode_hello(hello);
    ::send(fd, frame.data(), frame.size(), MSG_NOSIGNAL);
    char buffer[128];
    ::recv(fd, buffer, sizeof(buffer), 0);  // the client's Auth
    Reply ok;
    ok.type = MessageType::kAuthOk;
    ok.value = std::string(kStoreNonceBytes, 'm');
    frame = encode_reply(ok);
    ::send(fd, frame.data(), frame.size(), MSG_NOSIGNAL);
    ::recv(fd, buffer, sizeof(buffer), 0);  // returns when the client hangs up
    ::close(fd);
  });
  const std::string e = error_of<InvalidArgument>([&] {
    TcpStoreClient c("127.0.0.1", port, client_options(generate_store_token()));
  });
  squatter.join();
  ::close(listener);
  EXPECT_NE(e.find("could not prove that it holds this job's token"), std::string::npos) << e;
}

TEST(TcpStoreAuth, NoAuthenticationOnlyWhenAsked) {
  TcpStoreServer open_server(TcpStoreServerOptions().no_authentication(true));
  EXPECT_TRUE(open_server.token().empty());
  TcpStoreClient c("127.0.0.1", open_server.port(), client_options(""));
  c.set("k", "v");
  EXPECT_EQ(c.get("k"), "v");
  // A server that was not told otherwise requires a token.
  TcpStoreServer closed_server;
  EXPECT_FALSE(closed_server.token().empty());
  EXPECT_THROW(TcpStoreClient("127.0.0.1", closed_server.port(), client_options("")),
               InvalidArgument);
}

// ---- bounded parsing ----------------------------------------------------------------------

TEST(TcpStoreLimits, HugeFrameClaimsAreRejectedWithoutAllocating) {
  TcpStoreServer server;
  TcpStoreClient job("127.0.0.1", server.port(), client_options(server.token()));
  job.set("k", "v");
  const size_t before = rss_bytes();
  // Before authenticating: the 9-byte frame of the fault campaign.
  {
    RawSocket raw(server.port());
    EXPECT_EQ(body_type(raw.read_frame()), MessageType::kHello);
    raw.send(frame_header(256u << 20) + "\x02xxxx");
    EXPECT_TRUE(raw.closed_within(seconds(2)));
  }
  // Authenticated: a claim over the frame limit closes the connection...
  {
    RawSocket raw(server.port());
    raw.authenticate(server.token());
    raw.send(frame_header(256u << 20) + "\x10xxxx");
    Reply r = decode_reply(raw.read_frame(), StoreLimits());
    EXPECT_EQ(r.type, MessageType::kError);
    EXPECT_EQ(r.code, ErrorCode::kFrameTooLarge);
    EXPECT_NE(r.message.find("exceeds the limit"), std::string::npos) << r.message;
    EXPECT_TRUE(raw.closed_within(seconds(2)));
  }
  // ... and a claim under it costs only the bytes that actually arrived.
  RawSocket slow(server.port());
  slow.authenticate(server.token());
  slow.send(frame_header(120u << 20) + "\x10xxxx");
  EXPECT_EQ(job.get("k"), "v");  // the server has read the partial frame by now
  const size_t after = rss_bytes();
  EXPECT_LT(after, before + (32u << 20)) << "RSS grew from " << before << " to " << after;
  EXPECT_EQ(server.stats().protocol_errors, 1u);
  EXPECT_EQ(server.stats().refused, 1u);
}

TEST(TcpStoreLimits, BadFramesCloseOnlyTheirConnection) {
  StoreLimits limits;
  limits.max_key_bytes = 64;
  TcpStoreServer server(TcpStoreServerOptions().limits(limits));
  TcpStoreClient job("127.0.0.1", server.port(), client_options(server.token()));
  job.set("k", "v");
  struct Bad {
    std::string frame;
    ErrorCode code;
  };
  const Bad bad[] = {
      {frame_header(1) + "\x7f", ErrorCode::kProtocol},
      {frame_header(0), ErrorCode::kProtocol},
      {encode_request(request(MessageType::kDelete, {std::string(65, 'k')})),
       ErrorCode::kFrameTooLarge},
      {frame_header(3) + std::string("\x15\x01\x00", 3), ErrorCode::kProtocol},
  };
  for (const auto& b : bad) {
    SCOPED_TRACE(testing::Message() << "frame of " << b.frame.size() << " bytes");
    RawSocket raw(server.port());
    raw.authenticate(server.token());
    raw.send(b.frame);
    Reply r = decode_reply(raw.read_frame(), StoreLimits());
    EXPECT_EQ(r.type, MessageType::kError);
    EXPECT_EQ(r.code, b.code) << r.message;
    EXPECT_TRUE(raw.closed_within(seconds(2)));
    EXPECT_EQ(job.get("k"), "v");
  }
  EXPECT_EQ(server.stats().protocol_errors, 4u);
  // The client checks the server's limits itself, with a message naming the key.
  const std::string e = error_of<InvalidArgument>([&] { job.set(std::string(65, 'k'), "v"); });
  EXPECT_NE(e.find("Expected store keys of at most 64 bytes"), std::string::npos) << e;
  EXPECT_EQ(job.server_limits().max_key_bytes, 64u);
}

TEST(TcpStoreLimits, ConnectionCap) {
  TcpStoreServer server(TcpStoreServerOptions().max_connections(3).handshake_timeout(seconds(30)));
  TcpStoreClient job("127.0.0.1", server.port(), client_options(server.token()));
  auto idle1 = std::make_unique<RawSocket>(server.port());
  RawSocket idle2(server.port());
  ASSERT_TRUE(server.wait_for_stats([](const TcpStoreServerStats& s) { return s.connections == 3; },
                                    seconds(10)));
  RawSocket fourth(server.port());
  Reply r = decode_reply(fourth.read_frame(), StoreLimits());
  EXPECT_EQ(r.type, MessageType::kError);
  EXPECT_EQ(r.code, ErrorCode::kBusy);
  EXPECT_TRUE(fourth.closed_within(seconds(2)));
  const std::string e = error_of<TimeoutError>([&] {
    TcpStoreClient late("127.0.0.1", server.port(),
                        client_options(server.token()).connect_timeout(milliseconds(300)));
  });
  EXPECT_NE(e.find("the server turned the connection away: the store already serves 3 connections"),
            std::string::npos)
      << e;
  EXPECT_GE(server.stats().busy, 2u);
  job.set("still", "works");
  idle1.reset();
  ASSERT_TRUE(server.wait_for_stats([](const TcpStoreServerStats& s) { return s.connections == 2; },
                                    seconds(10)));
  TcpStoreClient now_fits("127.0.0.1", server.port(), client_options(server.token()));
  EXPECT_EQ(now_fits.get("still"), "works");
}

// ---- the listening address ----------------------------------------------------------------

TEST(TcpStoreAddress, LoopbackByDefault) {
  TcpStoreServer server;
  EXPECT_EQ(server.bound_address(), "127.0.0.1");
  RawSocket local(server.port());
  ASSERT_EQ(local.connect_errno(), 0);
  sockaddr_in peer{};
  socklen_t len = sizeof(peer);
  ASSERT_EQ(::getpeername(local.fd(), reinterpret_cast<sockaddr*>(&peer), &len), 0);
  char text[INET_ADDRSTRLEN];
  EXPECT_STREQ(::inet_ntop(AF_INET, &peer.sin_addr, text, sizeof(text)), "127.0.0.1");
  // Another address of this machine (127.0.0.2 is always one on Linux) finds nobody.
  RawSocket other(server.port(), "127.0.0.2");
  EXPECT_EQ(other.connect_errno(), ECONNREFUSED);
}

TEST(TcpStoreAddress, NotReachableThroughANonLoopbackInterface) {
  ifaddrs* list = nullptr;
  ASSERT_EQ(::getifaddrs(&list), 0);
  std::string address;
  for (ifaddrs* i = list; i != nullptr && address.empty(); i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET) continue;
    auto* in = reinterpret_cast<sockaddr_in*>(i->ifa_addr);
    if ((ntohl(in->sin_addr.s_addr) >> 24) == 127) continue;
    char text[INET_ADDRSTRLEN];
    address = ::inet_ntop(AF_INET, &in->sin_addr, text, sizeof(text));
  }
  ::freeifaddrs(list);
  if (address.empty()) GTEST_SKIP() << "this machine has no non-loopback IPv4 address";
  TcpStoreServer server;
  RawSocket outsider(server.port(), address.c_str());
  EXPECT_EQ(outsider.connect_errno(), ECONNREFUSED) << "connected through " << address;
  TcpStoreServer everywhere(TcpStoreServerOptions().host("0.0.0.0"));
  EXPECT_EQ(everywhere.bound_address(), "0.0.0.0");
  RawSocket asked(everywhere.port(), address.c_str());
  EXPECT_EQ(asked.connect_errno(), 0);
}

TEST(TcpStoreAddress, WildcardOnlyWhenAsked) {
  TcpStoreServer server(TcpStoreServerOptions().host("0.0.0.0"));
  EXPECT_EQ(server.bound_address(), "0.0.0.0");
  RawSocket other(server.port(), "127.0.0.2");
  EXPECT_EQ(other.connect_errno(), 0);
}

// ---- the token ----------------------------------------------------------------------------

class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (value) ::setenv(name, value, 1); else ::unsetenv(name);
  }
  ~ScopedEnv() { ::unsetenv(name_); }

 private:
  const char* name_;
};

std::string temp_file(const std::string& contents, mode_t mode) {
  std::string pattern = testing::TempDir() + "lockstep-token-XXXXXX";
  std::vector<char> path(pattern.begin(), pattern.end());
  path.push_back('\0');
  int fd = ::mkstemp(path.data());
  EXPECT_GE(fd, 0);
  EXPECT_EQ(::write(fd, contents.data(), contents.size()), ssize_t(contents.size()));
  ::close(fd);
  ::chmod(path.data(), mode);
  return path.data();
}

TEST(StoreToken, HexRoundTripAndErrorsNeverRepeatTheSecret) {
  const std::string token = generate_store_token();
  EXPECT_EQ(token.size(), 32u);
  EXPECT_NE(token, generate_store_token());
  const std::string hex = store_token_to_hex(token);
  EXPECT_EQ(hex.size(), 64u);
  EXPECT_EQ(store_token_from_hex(" " + hex + "\n", "X"), token);
  const std::string odd = hex.substr(1);
  std::string e = error_of<InvalidArgument>([&] { store_token_from_hex(odd, "LOCKSTEP_STORE_TOKEN"); });
  EXPECT_NE(e.find("Expected the store token in LOCKSTEP_STORE_TOKEN to be an even number of hex "
                   "digits, but got 63 characters"),
            std::string::npos)
      << e;
  EXPECT_EQ(e.find(odd), std::string::npos);
  const std::string secret = "s3cr3t-not-hex-s3cr3t-not-hex-s3cr3t-not-hex-s3cr3t-not-hex-s3cr3t";
  e = error_of<InvalidArgument>([&] { store_token_from_hex(secret, "LOCKSTEP_STORE_TOKEN"); });
  EXPECT_EQ(e.find("s3cr3t"), std::string::npos) << e;
  e = error_of<InvalidArgument>([&] { store_token_from_hex(hex.substr(0, 40), "LOCKSTEP_STORE_TOKEN"); });
  EXPECT_NE(e.find("Expected a store token of at least 32 bytes (64 hex digits) in "
                   "LOCKSTEP_STORE_TOKEN, but got 20 bytes"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("openssl rand -hex 32"), std::string::npos);
}

TEST(StoreToken, FromEnvironmentAndFile) {
  const std::string token = generate_store_token();
  const std::string hex = store_token_to_hex(token);
  {
    ScopedEnv a(env::kStoreToken, nullptr), b(env::kStoreTokenFile, nullptr);
    EXPECT_FALSE(store_token_from_env().has_value());
  }
  {
    ScopedEnv a(env::kStoreToken, hex.c_str()), b(env::kStoreTokenFile, nullptr);
    EXPECT_EQ(store_token_from_env().value(), token);
  }
  const std::string good = temp_file(hex + "\n", 0600);
  const std::string strict = temp_file(hex, 0400);
  const std::string open = temp_file(hex, 0644);
  {
    ScopedEnv a(env::kStoreToken, nullptr), b(env::kStoreTokenFile, good.c_str());
    EXPECT_EQ(store_token_from_env().value(), token);
  }
  EXPECT_EQ(read_store_token_file(strict), token);
  std::string e = error_of<InvalidArgument>([&] { read_store_token_file(open); });
  EXPECT_NE(e.find("Expected the store token file " + open +
                   " (LOCKSTEP_STORE_TOKEN_FILE) to have mode 0600 or stricter, but it has "
                   "mode 0644"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("chmod 600 " + open), std::string::npos) << e;
  EXPECT_EQ(e.find(hex), std::string::npos);
  {
    ScopedEnv a(env::kStoreToken, hex.c_str()), b(env::kStoreTokenFile, good.c_str());
    e = error_of<InvalidArgument>([&] { store_token_from_env(); });
    EXPECT_NE(e.find("Expected one of LOCKSTEP_STORE_TOKEN and LOCKSTEP_STORE_TOKEN_FILE, but "
                     "both are set"),
              std::string::npos)
        << e;
  }
  e = error_of<InvalidArgument>([&] { read_store_token_file(good + ".missing"); });
  EXPECT_NE(e.find("Could not open the store token file " + good + ".missing"), std::string::npos)
      << e;
  for (const auto& p : {good, strict, open}) ::unlink(p.c_str());
}

}  // namespace
