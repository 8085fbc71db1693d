// libFuzzer target over the dataset readers' parsing (lib/src/data/reader_parsing.cpp),
// without LibTorch (tests/fuzz/CMakeLists.txt builds it with clang, ASan and UBSan).
//
// The first byte picks the reader, the rest is the file's content:
//  0: an IDX header (bounded by the input's size as a plain file, and as a gzip stream),
//     then its labels checked against 10 classes;
//  1: CSV with a header, ',' separated, finite values required; 2: the same, ';' separated,
//     no header, NaN allowed;
//  3: UTF-8 text split into characters.
// Every failure must be lockstep::InvalidArgument; anything else escaping, a crash or a
// sanitizer report is a finding. Invariants that must hold on success trap when broken.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "data/reader_parsing.h"
#include "lockstep/errors.h"

using namespace lockstep::detail;

namespace {

void check(bool condition) {
  if (!condition) __builtin_trap();
}

void fuzz_idx(const std::string& bytes, int64_t bound) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const IdxHeader h = parse_idx_header(p, bytes.size(), "fuzz.idx", 0, bound);
  check(h.data_offset == 4 + 4 * static_cast<int64_t>(h.sizes.size()));
  check(h.count >= 0 && h.data_bytes() <= bound - h.data_offset);
  // What a reader would read next: at most the bytes present, never what the header claims.
  if (h.element_size != 1) return;
  const auto available = static_cast<int64_t>(bytes.size()) - h.data_offset;
  std::vector<int64_t> labels;
  for (int64_t i = 0; i < std::min(h.count, available); ++i) {
    labels.push_back(p[h.data_offset + i]);
  }
  bool all_small = true;
  for (int64_t v : labels) all_small = all_small && v < 10;
  try {
    check_labels(labels.data(), static_cast<int64_t>(labels.size()), h, 10, "fuzz.idx");
    check(all_small);
  } catch (const lockstep::InvalidArgument&) {
    check(!all_small);
  }
}

void fuzz_csv(const std::string& text, char delimiter, bool header, bool finite) {
  const CsvParsed t = parse_csv_text(text, "fuzz.csv", delimiter, header, finite);
  check(static_cast<int64_t>(t.values.size()) == t.rows * t.width);
  check(static_cast<int64_t>(t.columns.size()) == t.width);
  if (finite) {
    for (double v : t.values) check(std::isfinite(v));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    switch (data[0] % 4) {
      case 0:
        fuzz_idx(rest, static_cast<int64_t>(rest.size()));
        fuzz_idx(rest, static_cast<int64_t>(rest.size()) * kGzipMaxRatio);
        break;
      case 1: fuzz_csv(rest, ',', /*header=*/true, /*finite=*/true); break;
      case 2: fuzz_csv(rest, ';', /*header=*/false, /*finite=*/false); break;
      default: {
        const auto chars = utf8_chars(rest, "fuzz.txt");
        size_t total = 0;
        for (const auto& c : chars) total += c.second.size();
        check(total == rest.size());
      }
    }
  } catch (const lockstep::InvalidArgument&) {
    // A rejected input: the expected outcome for most of them.
  }
  return 0;
}
