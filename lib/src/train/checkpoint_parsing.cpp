// The checkpoint format's torch-free parsing. See train/checkpoint_parsing.h and
// Note [Bounded checkpoint parsing].
#include "train/checkpoint_parsing.h"

#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <set>

#include <nlohmann/json.hpp>

#include "lockstep/errors.h"

namespace lockstep {
namespace train {
namespace format {

using lockstep::detail::concat;
using nlohmann::json;

uint32_t crc32_of(const void* data, size_t n) {
  uLong crc = crc32(0L, Z_NULL, 0);
  const auto* p = static_cast<const Bytef*>(data);
  while (n > 0) {  // zlib takes uInt lengths
    uInt chunk = static_cast<uInt>(std::min<size_t>(n, 1u << 30));
    crc = crc32(crc, p, chunk);
    p += chunk;
    n -= chunk;
  }
  return static_cast<uint32_t>(crc);
}

void check_json_bounds(const std::string& text, const std::string& what, size_t max_depth) {
  if (text.size() > kMaxHeaderBytes) {
    throw InvalidArgument(concat(what, ": JSON of ", text.size(), " bytes, but at most ",
                                 kMaxHeaderBytes, " are accepted"));
  }
  size_t depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // the escaped character cannot end the string
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) {
        throw InvalidArgument(concat(what, ": JSON nested deeper than ", max_depth,
                                     " arrays and objects (at byte offset ", i,
                                     " of the JSON); the file is corrupt or hostile"));
      }
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
}

int64_t dtype_size(const std::string& name) {
  static const std::pair<const char*, int64_t> kSizes[] = {
      {"Float", 4}, {"Double", 8}, {"Half", 2},  {"BFloat16", 2}, {"Byte", 1},         {"Char", 1},
      {"Short", 2}, {"Int", 4},    {"Long", 8},  {"Bool", 1},     {"ComplexFloat", 8}, {"ComplexDouble", 16}};
  for (const auto& kv : kSizes) {
    if (name == kv.first) return kv.second;
  }
  return 0;
}

namespace {

template <typename T>
T get_at(const std::string& in, size_t offset) {
  T value;
  std::memcpy(&value, in.data() + offset, sizeof(T));
  return value;
}

// A non-negative integer field of a tensor entry, at most `max`.
uint64_t unsigned_field(const json& entry, const char* key, uint64_t max, const std::string& tensor,
                        const std::function<InvalidArgument(const std::string&)>& fail) {
  const auto it = entry.find(key);
  if (it == entry.end()) throw fail(concat("tensor '", tensor, "' has no \"", key, "\""));
  if (!it->is_number_unsigned() || it->get<uint64_t>() > max) {
    throw fail(concat("tensor '", tensor, "': \"", key, "\" is ", it->dump(),
                      ", but it must be an integer in [0, ", max, "]"));
  }
  return it->get<uint64_t>();
}

}  // namespace

ParsedCheckpoint parse_checkpoint_bytes(const std::string& bytes, const std::string& path,
                                        uint32_t expected_version) {
  auto fail = [&](const std::string& reason) -> InvalidArgument {
    return InvalidArgument(concat("cannot load checkpoint '", path, "': ", reason));
  };
  if (bytes.size() < kPreludeBytes || std::memcmp(bytes.data(), kMagic, 8) != 0) {
    throw fail(concat("not a lockstep checkpoint (expected magic 'LSTPCKPT' at offset 0, file "
                      "is ", bytes.size(), " bytes)"));
  }
  const auto version = get_at<uint32_t>(bytes, 8);
  if (version != expected_version) {
    throw fail(concat("format version ", version, ", but this build reads version ",
                      expected_version, " only"));
  }
  if (bytes.size() < kPreludeBytes + kTrailerBytes + 4 ||
      std::memcmp(bytes.data() + bytes.size() - kTrailerBytes, kEndMagic, 8) != 0) {
    throw fail(concat("truncated: the end marker is missing (file is ", bytes.size(),
                      " bytes); the write was interrupted or the file was cut"));
  }
  const auto recorded = get_at<uint64_t>(bytes, bytes.size() - 8);
  if (recorded != bytes.size()) {
    throw fail(concat("length mismatch: the trailer records ", recorded, " bytes but the file "
                      "has ", bytes.size()));
  }
  const auto header_len = get_at<uint64_t>(bytes, 12);
  if (header_len > bytes.size() - kPreludeBytes - kTrailerBytes - 4) {
    throw fail(concat("corrupt header length ", header_len, " at offset 12"));
  }
  const std::string header_text = bytes.substr(kPreludeBytes, header_len);
  const auto header_crc = get_at<uint32_t>(bytes, kPreludeBytes + header_len);
  if (crc32_of(header_text.data(), header_text.size()) != header_crc) {
    throw fail(concat("header checksum mismatch (bytes ", kPreludeBytes, "..",
                      kPreludeBytes + header_len, "): the file is corrupt"));
  }
  // Note [Bounded checkpoint parsing]: bounds first, then nlohmann.
  check_json_bounds(header_text, concat("cannot load checkpoint '", path, "': header"),
                    kMaxJsonDepth + 1);  // +1: the header wraps the metadata
  json header;
  try {
    header = json::parse(header_text);
  } catch (const std::exception& e) {
    throw fail(concat("header is not valid JSON: ", e.what()));
  }
  ParsedCheckpoint out;
  out.data_start = kPreludeBytes + header_len + 4;
  const uint64_t data_len = bytes.size() - kTrailerBytes - out.data_start;
  if (!header.is_object() || !header.contains("metadata") || !header["metadata"].is_object() ||
      !header.contains("tensors") || !header["tensors"].is_array()) {
    throw fail("malformed header: expected {\"metadata\": {...}, \"tensors\": [...]}");
  }
  out.metadata = header["metadata"].dump();
  std::set<std::string> names;
  const std::function<InvalidArgument(const std::string&)> fail_fn = fail;
  for (const auto& e : header["tensors"]) {
    if (!e.is_object() || !e.contains("name") || !e["name"].is_string()) {
      throw fail("malformed header: a tensor entry without a \"name\" string");
    }
    TensorEntry t;
    t.name = e["name"].get<std::string>();
    if (!e.contains("dtype") || !e["dtype"].is_string()) {
      throw fail(concat("tensor '", t.name, "' has no \"dtype\" string"));
    }
    t.dtype = e["dtype"].get<std::string>();
    const int64_t element_size = dtype_size(t.dtype);
    if (element_size == 0) {
      throw fail(concat("tensor '", t.name, "' has unknown dtype '", t.dtype,
                        "'; the file is corrupt or from a newer lockstep"));
    }
    if (!e.contains("shape") || !e["shape"].is_array()) {
      throw fail(concat("tensor '", t.name, "' has no \"shape\" array"));
    }
    if (e["shape"].size() > kMaxTensorDims) {
      throw fail(concat("tensor '", t.name, "' has ", e["shape"].size(),
                        " dimensions, but at most ", kMaxTensorDims, " are accepted"));
    }
    // numel * element size, bounded by the data section at every step (no overflow).
    uint64_t max_numel = data_len / static_cast<uint64_t>(element_size);
    uint64_t numel = 1;
    bool zero = false;
    for (const auto& s : e["shape"]) {
      if (!s.is_number_integer()) {
        throw fail(concat("tensor '", t.name, "': shape ", e["shape"].dump(),
                          " holds a non-integer"));
      }
      if (s.is_number_integer() && !s.is_number_unsigned()) {
        throw fail(concat("tensor '", t.name, "' has a negative dimension"));
      }
      const uint64_t d = s.get<uint64_t>();
      if (d == 0) zero = true;
      if (!zero && d > max_numel / numel) {
        throw fail(concat("tensor '", t.name, "': shape ", e["shape"].dump(), " of ", t.dtype,
                          " needs more bytes than the data section holds (", data_len,
                          "); the file is corrupt"));
      }
      if (!zero) numel *= d;
      t.shape.push_back(static_cast<int64_t>(d));
    }
    if (zero) numel = 0;
    t.offset = unsigned_field(e, "offset", data_len, t.name, fail_fn);
    t.nbytes = unsigned_field(e, "nbytes", data_len, t.name, fail_fn);
    const auto crc = static_cast<uint32_t>(unsigned_field(e, "crc32", 0xFFFFFFFFu, t.name, fail_fn));
    if (numel * static_cast<uint64_t>(element_size) != t.nbytes) {
      throw fail(concat("tensor '", t.name, "': ", t.nbytes, " bytes do not match its shape"));
    }
    if (t.nbytes > data_len - t.offset) {
      throw fail(concat("tensor '", t.name, "' lies past the end of the data (offset ", t.offset,
                        ", ", t.nbytes, " bytes, data section ", data_len, " bytes)"));
    }
    const char* src = bytes.data() + out.data_start + t.offset;
    if (crc32_of(src, t.nbytes) != crc) {
      throw fail(concat("checksum mismatch in tensor '", t.name, "' (file offset ",
                        out.data_start + t.offset, ", ", t.nbytes,
                        " bytes): the file is corrupt"));
    }
    if (!names.insert(t.name).second) throw fail(concat("tensor '", t.name, "' appears twice"));
    out.tensors.push_back(std::move(t));
  }
  return out;
}

int64_t metadata_int(const std::string& metadata, const std::string& key, int64_t min,
                     int64_t max, const std::string& path) {
  check_json_bounds(metadata, concat("checkpoint '", path, "': metadata"));
  json meta;
  try {
    meta = json::parse(metadata);
  } catch (const std::exception& e) {
    throw InvalidArgument(concat("checkpoint '", path, "': metadata is not valid JSON: ",
                                 e.what()));
  }
  const auto it = meta.is_object() ? meta.find(key) : meta.end();
  if (it == meta.end()) {
    throw InvalidArgument(concat("checkpoint '", path, "': metadata field \"", key,
                                 "\" is missing; the file was not written by this program or is "
                                 "corrupt"));
  }
  const bool integer = it->is_number_integer();
  const bool in_range =
      integer && (it->is_number_unsigned()
                      ? it->get<uint64_t>() <= static_cast<uint64_t>(std::max<int64_t>(max, 0)) &&
                            static_cast<int64_t>(it->get<uint64_t>()) >= min
                      : it->get<int64_t>() >= min && it->get<int64_t>() <= max);
  if (!in_range) {
    throw InvalidArgument(concat("checkpoint '", path, "': metadata field \"", key, "\" is ",
                                 it->dump(), ", but it must be an integer in [", min, ", ", max,
                                 "]; the file is corrupt or was edited"));
  }
  return it->get<int64_t>();
}

}  // namespace format
}  // namespace train
}  // namespace lockstep
