#pragma once
// The checkpoint file format's parsing (Note [Checkpoint format] in lockstep/train/checkpoint.h),
// free of LibTorch so that unit tests and the fuzz target (tests/fuzz/fuzz_checkpoint.cpp)
// drive it directly; checkpoint_file.cpp turns the entries into tensors.
//
// Note [Bounded checkpoint parsing]
// A checkpoint may come from anywhere, so everything it declares is bounded before use:
//  - JSON (the header, and metadata given to `write_checkpoint_file`) is at most
//    kMaxHeaderBytes and nests at most kMaxJsonDepth arrays and objects, checked by a scan
//    before nlohmann parses it (its parser is iterative, but dump() and the recipes' readers
//    recurse, and 70,000 nested arrays overflow the stack);
//  - every number in a tensor entry is a non-negative integer of its type's range; shapes have
//    at most kMaxTensorDims dimensions, and the element count times the element size must
//    equal `nbytes`, computed without overflow and bounded by the data section (so by the
//    file's size) before any tensor is allocated;
//  - metadata positions (step, epoch, batch) are read through `metadata_int`, which checks
//    type and range and names the field and the file.
// With that, the README's promise holds: a hostile file can at worst be rejected.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace lockstep {
namespace train {
namespace format {

constexpr size_t kMaxJsonDepth = 64;
constexpr uint64_t kMaxHeaderBytes = uint64_t{256} << 20;
constexpr size_t kMaxTensorDims = 64;

constexpr char kMagic[8] = {'L', 'S', 'T', 'P', 'C', 'K', 'P', 'T'};
constexpr char kEndMagic[8] = {'L', 'S', 'T', 'P', 'E', 'N', 'D', '!'};
constexpr size_t kPreludeBytes = 8 + 4 + 8;
constexpr size_t kTrailerBytes = 8 + 8;

/// CRC-32 (zlib's polynomial) of n bytes.
uint32_t crc32_of(const void* data, size_t n);

/// Throws InvalidArgument "<what>: JSON nested deeper than <max_depth> ... at byte offset N"
/// when `text` opens more than `max_depth` arrays or objects at once (strings are skipped),
/// or "<what>: JSON of N bytes ..." when it is longer than kMaxHeaderBytes.
void check_json_bounds(const std::string& text, const std::string& what,
                       size_t max_depth = kMaxJsonDepth);

/// Element size of a dtype as `c10::toString` names it ("Float", "Long", ...); 0 if unknown.
int64_t dtype_size(const std::string& name);

/// One tensor entry of the header, checked against the data section.
struct TensorEntry {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // in the data section
  uint64_t nbytes = 0;
};

/// A checkpoint file's content, verified: magic, version, trailer and length, header length,
/// CRC, JSON bounds and structure, every tensor entry's numbers, bounds and CRC.
struct ParsedCheckpoint {
  std::string metadata;  // the metadata object, as JSON text
  std::vector<TensorEntry> tensors;
  uint64_t data_start = 0;  // file offset of the data section
};

/// Parses a whole checkpoint file held in `bytes`; throws InvalidArgument
/// "cannot load checkpoint '<path>': <reason>" on anything wrong.
ParsedCheckpoint parse_checkpoint_bytes(const std::string& bytes, const std::string& path,
                                        uint32_t version);

/// The integer field `key` of a metadata JSON object, checked to lie in [min, max];
/// InvalidArgument naming the field, the value found and `path` otherwise.
int64_t metadata_int(const std::string& metadata, const std::string& key, int64_t min,
                     int64_t max, const std::string& path);

}  // namespace format
}  // namespace train
}  // namespace lockstep
