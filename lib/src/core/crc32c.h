#pragma once
// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of TFRecord files, and
// TFRecord's "masked" form of it. Written from RFC 3720 (B.4) and TensorFlow's
// core/lib/hash/crc32c.h; tested against crc32c("123456789") = 0xE3069283 and RFC 3720's
// vectors (tests/train/test_tensorboard.cpp). Free of LibTorch and of any other dependency.

#include <cstddef>
#include <cstdint>
#include <string>

namespace lockstep {
namespace core {

/// CRC-32C of `size` bytes at `data`, continuing from `crc` (0 for a new message).
uint32_t crc32c(const void* data, size_t size, uint32_t crc = 0);
inline uint32_t crc32c(const std::string& data) { return crc32c(data.data(), data.size()); }

/// TFRecord's masked CRC: ((crc >> 15) | (crc << 17)) + 0xa282ead8. Masking keeps a CRC stored
/// inside data that is itself checksummed from being mistaken for the data's own CRC.
inline uint32_t mask_crc32c(uint32_t crc) {
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

}  // namespace core
}  // namespace lockstep
