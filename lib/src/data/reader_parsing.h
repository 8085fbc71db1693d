#pragma once
// The readers' parsing and record checks, free of LibTorch so that unit tests and the fuzz
// target (tests/fuzz/fuzz_readers.cpp) drive them directly. lockstep/readers.h wraps them in
// tensors. Every function throws lockstep::InvalidArgument naming the file and where.
//
// Note [Bounded reads]
// Nothing a file declares is allocated before it is bounded by what the file can hold: an IDX
// header's element count times the element size must fit in the bytes after the header
// (plain files: the file's size; gzip: the size times 1032, deflate's largest ratio), so a
// header claiming 2^31 images of a 1 KiB file fails before any allocation. Labels are checked
// against the class count the caller declares, record by record, at read time.

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lockstep {
namespace detail {

/// The message for a file that `open(2)` refused with `err`: ENOENT says the file is missing,
/// EACCES/EPERM that it exists but this user may not read it, anything else names strerror.
std::string open_failure_message(const std::string& path, const char* what, int err);

/// "[d0, d1, ...]", for messages about IDX shapes.
std::string shape_string(const std::vector<int64_t>& dims);

/// Opens `path` read-only (O_CLOEXEC) and checks that it is a regular file; returns the
/// descriptor and stores the file's size. Throws with `open_failure_message` on failure.
int open_regular_file(const std::string& path, const char* what, int64_t* size);

/// Deflate never expands more than this: a gzip stream of n bytes inflates to at most
/// n * kGzipMaxRatio bytes.
constexpr int64_t kGzipMaxRatio = 1032;

/// An IDX header (Note [IDX format] in readers.cpp).
struct IdxHeader {
  uint8_t type_code = 0;
  int64_t element_size = 0;
  const char* type_name = "";
  std::vector<int64_t> sizes;
  int64_t count = 0;        // product of sizes
  int64_t data_offset = 0;  // 4 + 4 * dims
  int64_t data_bytes() const { return count * element_size; }
};

/// Element size and name of an IDX type code; false for an unknown code.
bool idx_type_code(uint8_t code, int64_t* size, const char** name);

/// Parses an IDX header from the first `n` bytes of the (uncompressed) stream. `stream_bound`
/// is the most bytes the stream can hold (see Note [Bounded reads]); the declared data must
/// fit in it. `expected_dims` > 0 also checks the dimension count.
IdxHeader parse_idx_header(const unsigned char* p, size_t n, const std::string& path,
                           int64_t expected_dims, int64_t stream_bound);

/// Checks that every label (already read, in file order) lies in [0, num_classes); the first
/// that does not is named by record index and byte offset
/// (`header.data_offset + i * header.element_size`).
void check_labels(const int64_t* labels, int64_t count, const IdxHeader& header,
                  int64_t num_classes, const std::string& path);

/// A CSV text parsed into row-major doubles.
struct CsvParsed {
  std::vector<std::string> columns;
  std::vector<double> values;
  int64_t rows = 0;
  int64_t width = 0;
};

/// Parses CSV text (see read_csv in lockstep/readers.h). `finite` rejects NaN and infinite
/// values, naming file:line:column.
CsvParsed parse_csv_text(const std::string& text, const std::string& path, char delimiter,
                         bool header, bool finite);

/// Splits UTF-8 text into (code point, bytes) characters; `where` names the source for errors.
std::vector<std::pair<uint32_t, std::string>> utf8_chars(const std::string& text,
                                                         const std::string& where);

}  // namespace detail
}  // namespace lockstep
