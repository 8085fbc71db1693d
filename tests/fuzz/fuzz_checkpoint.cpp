// libFuzzer target over the checkpoint reader's parsing (lib/src/train/checkpoint_parsing.cpp),
// without LibTorch (tests/fuzz/CMakeLists.txt builds it with clang, ASan and UBSan).
//
// The first byte picks how the rest is used:
//  even: the rest is a whole checkpoint file;
//  odd:  the rest is "<header JSON>\0<data section>", wrapped into a file with a valid
//        prelude, header CRC and trailer, so that the fuzzer reaches the JSON and the tensor
//        entries instead of stopping at the checksum.
// Then, when the file parses: every entry lies inside the data section and matches its
// shape, and the metadata's "step" is read through metadata_int. Independently, any text
// that passes check_json_bounds is parsed and dumped (the recursion the depth bound guards).
// Every failure must be lockstep::InvalidArgument; anything else escaping, a crash or a
// sanitizer report is a finding; a broken invariant traps.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include <nlohmann/json.hpp>

#include "lockstep/errors.h"
#include "train/checkpoint_parsing.h"

using namespace lockstep::train::format;

namespace {

constexpr uint32_t kVersion = 1;

void check(bool condition) {
  if (!condition) __builtin_trap();
}

template <typename T>
void put(std::string& out, T value) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));
  out.append(bytes, sizeof(T));
}

std::string wrap(const std::string& header, const std::string& data) {
  std::string file(kMagic, 8);
  put<uint32_t>(file, kVersion);
  put<uint64_t>(file, header.size());
  file += header;
  put<uint32_t>(file, crc32_of(header.data(), header.size()));
  file += data;
  file.append(kEndMagic, 8);
  put<uint64_t>(file, file.size() + 8);
  return file;
}

void parse_file(const std::string& file) {
  try {
    const ParsedCheckpoint p = parse_checkpoint_bytes(file, "fuzz.lsck", kVersion);
    const uint64_t data_len = file.size() - kTrailerBytes - p.data_start;
    for (const auto& t : p.tensors) {
      check(t.offset <= data_len && t.nbytes <= data_len - t.offset);
      check(t.shape.size() <= kMaxTensorDims);
      uint64_t numel = 1;
      for (int64_t d : t.shape) {
        check(d >= 0);
        numel *= static_cast<uint64_t>(d);  // bounded by the parser: cannot overflow
      }
      check(numel * static_cast<uint64_t>(dtype_size(t.dtype)) == t.nbytes);
    }
    try {
      const int64_t step = metadata_int(p.metadata, "step", 0, int64_t{1} << 53, "fuzz.lsck");
      check(step >= 0 && step <= (int64_t{1} << 53));
    } catch (const lockstep::InvalidArgument&) {
    }
  } catch (const lockstep::InvalidArgument&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] % 2 == 0) {
    parse_file(rest);
  } else {
    const size_t split = rest.find('\0');
    parse_file(split == std::string::npos ? wrap(rest, "")
                                          : wrap(rest.substr(0, split), rest.substr(split + 1)));
  }
  try {
    check_json_bounds(rest, "fuzz");
    const auto j = nlohmann::json::parse(rest, nullptr, /*allow_exceptions=*/false);
    if (!j.is_discarded()) check(!j.dump().empty());
  } catch (const lockstep::InvalidArgument&) {
  }
  return 0;
}
