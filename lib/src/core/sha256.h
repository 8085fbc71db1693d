#pragma once
// SHA-256 (FIPS 180-4), HMAC-SHA256 (RFC 2104) and a constant-time comparison: what the store's
// challenge-response handshake needs (see Note [Store protocol] in comm/store_protocol.h).
// Written from the standards; tested against the FIPS 180-2 examples and RFC 4231's HMAC
// cases (tests/comm/test_tcp_store.cpp). Free of LibTorch and of any other dependency, so the
// fuzz targets can compile it alone.

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace lockstep {
namespace core {

/// A SHA-256 digest: 32 bytes.
using Sha256Digest = std::array<uint8_t, 32>;

/// Incremental SHA-256. Not thread-safe; one object per message.
class Sha256 {
 public:
  Sha256();
  /// Appends `size` bytes of the message.
  void update(const void* data, size_t size);
  void update(const std::string& data) { update(data.data(), data.size()); }
  /// Finishes the message and returns its digest. The object must not be updated afterwards.
  Sha256Digest finish();

 private:
  void compress(const uint8_t* block);

  std::array<uint32_t, 8> state_;
  std::array<uint8_t, 64> block_;
  size_t block_used_ = 0;
  uint64_t total_bytes_ = 0;
};

/// SHA-256 of `data`.
Sha256Digest sha256(const std::string& data);

/// HMAC-SHA256 of `message` under `key` (any length; keys longer than 64 bytes are hashed
/// first, as RFC 2104 says).
Sha256Digest hmac_sha256(const std::string& key, const std::string& message);

/// True when the two byte strings are equal. The time taken depends only on the lengths, not
/// on where the contents differ, so a MAC check does not leak how many leading bytes matched.
bool constant_time_equal(const void* a, size_t a_size, const void* b, size_t b_size);

/// Lower-case hexadecimal of `size` bytes.
std::string to_hex(const void* data, size_t size);
inline std::string to_hex(const Sha256Digest& d) { return to_hex(d.data(), d.size()); }

}  // namespace core
}  // namespace lockstep
