// The checkpoint file format: writing atomically, reading with every check. See Note
// [Checkpoint format] and Note [Atomic checkpoint writes] in lockstep/train/checkpoint.h.
#include <ATen/ATen.h>
#include <zlib.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "lockstep/errors.h"
#include "lockstep/train/checkpoint.h"

namespace lockstep {
namespace train {

using detail::concat;
using nlohmann::json;

namespace {

constexpr char kMagic[8] = {'L', 'S', 'T', 'P', 'C', 'K', 'P', 'T'};
constexpr char kEndMagic[8] = {'L', 'S', 'T', 'P', 'E', 'N', 'D', '!'};
constexpr size_t kPreludeBytes = 8 + 4 + 8;
constexpr size_t kTrailerBytes = 8 + 8;

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

template <typename T>
void put(std::string& out, T value) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));  // little-endian hosts only (x86-64, aarch64)
  out.append(bytes, sizeof(T));
}

template <typename T>
T get_at(const std::string& in, size_t offset) {
  T value;
  std::memcpy(&value, in.data() + offset, sizeof(T));
  return value;
}

const std::vector<at::ScalarType>& known_dtypes() {
  static const std::vector<at::ScalarType> types = {
      at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kByte, at::kChar,
      at::kShort, at::kInt,    at::kLong, at::kBool,     at::kComplexFloat, at::kComplexDouble};
  return types;
}

at::ScalarType parse_dtype(const std::string& name, const std::string& path,
                           const std::string& tensor) {
  for (auto t : known_dtypes()) {
    if (name == c10::toString(t)) return t;
  }
  throw InvalidArgument(concat("checkpoint '", path, "': tensor '", tensor,
                               "' has unknown dtype '", name, "'; the file is corrupt or from "
                               "a newer lockstep"));
}

std::string errno_text() { return std::strerror(errno); }

void write_all(int fd, const char* data, size_t n, const std::string& tmp) {
  while (n > 0) {
    ssize_t w = ::write(fd, data, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw Error(concat("could not write checkpoint temporary file '", tmp, "': ",
                         errno_text(), ". Check free space and permissions."));
    }
    data += w;
    n -= static_cast<size_t>(w);
  }
}

std::string dir_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Files

void write_checkpoint_file(const std::string& path, const Checkpoint& checkpoint) {
  json meta;
  try {
    meta = json::parse(checkpoint.metadata);
  } catch (const std::exception& e) {
    throw InvalidArgument(concat("checkpoint metadata for '", path,
                                 "' must be a JSON object, but it does not parse: ", e.what()));
  }
  LOCKSTEP_CHECK(meta.is_object(), "checkpoint metadata for '", path,
                 "' must be a JSON object, but got: ", checkpoint.metadata);

  std::vector<at::Tensor> datas;
  json entries = json::array();
  uint64_t offset = 0;
  for (const auto& kv : checkpoint.tensors) {
    const at::Tensor& t = kv.second;
    LOCKSTEP_CHECK(t.defined(), "checkpoint '", path, "': tensor '", kv.first, "' is undefined");
    LOCKSTEP_CHECK(t.layout() == at::kStrided, "checkpoint '", path, "': tensor '", kv.first,
                   "' must be dense (strided), but got layout ", t.layout());
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    uint64_t nbytes = static_cast<uint64_t>(c.numel()) * c.element_size();
    entries.push_back({{"name", kv.first},
                       {"dtype", c10::toString(c.scalar_type())},
                       {"shape", c.sizes().vec()},
                       {"offset", offset},
                       {"nbytes", nbytes},
                       {"crc32", crc32_of(c.data_ptr(), nbytes)}});
    offset += nbytes;
    datas.push_back(c);
  }
  json header = {{"metadata", meta}, {"tensors", entries}};
  std::string header_text = header.dump();

  std::string head;
  head.append(kMagic, 8);
  put<uint32_t>(head, kCheckpointFormatVersion);
  put<uint64_t>(head, header_text.size());
  head += header_text;
  put<uint32_t>(head, crc32_of(header_text.data(), header_text.size()));
  const uint64_t total = head.size() + offset + kTrailerBytes;
  std::string tail(kEndMagic, 8);
  put<uint64_t>(tail, total);

  const std::string tmp = concat(path, ".tmp.", ::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    throw Error(concat("could not create checkpoint temporary file '", tmp, "': ", errno_text(),
                       ". Check that the directory exists and is writable."));
  }
  try {
    write_all(fd, head.data(), head.size(), tmp);
    for (const auto& c : datas) {
      write_all(fd, static_cast<const char*>(c.data_ptr()),
                static_cast<size_t>(c.numel()) * c.element_size(), tmp);
    }
    write_all(fd, tail.data(), tail.size(), tmp);
    if (::fsync(fd) != 0) {
      throw Error(concat("fsync of checkpoint temporary file '", tmp, "' failed: ", errno_text()));
    }
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0) {
    ::unlink(tmp.c_str());
    throw Error(concat("close of checkpoint temporary file '", tmp, "' failed: ", errno_text()));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    std::string err = errno_text();
    ::unlink(tmp.c_str());
    throw Error(concat("could not rename '", tmp, "' to '", path, "': ", err));
  }
  int dfd = ::open(dir_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {  // make the rename itself durable
    ::fsync(dfd);
    ::close(dfd);
  }
}

Checkpoint read_checkpoint_file(const std::string& path) {
  auto fail = [&](const std::string& reason) -> InvalidArgument {
    return InvalidArgument(concat("cannot load checkpoint '", path, "': ", reason));
  };
  std::ifstream in(path, std::ios::binary);
  if (!in) throw fail(concat("cannot open it (", errno_text(), ")"));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw fail("read error");

  if (bytes.size() < kPreludeBytes || std::memcmp(bytes.data(), kMagic, 8) != 0) {
    throw fail(concat("not a lockstep checkpoint (expected magic 'LSTPCKPT' at offset 0, file "
                      "is ", bytes.size(), " bytes)"));
  }
  uint32_t version = get_at<uint32_t>(bytes, 8);
  if (version != kCheckpointFormatVersion) {
    throw fail(concat("format version ", version, ", but this build reads version ",
                      kCheckpointFormatVersion, " only"));
  }
  if (bytes.size() < kPreludeBytes + kTrailerBytes ||
      std::memcmp(bytes.data() + bytes.size() - kTrailerBytes, kEndMagic, 8) != 0) {
    throw fail(concat("truncated: the end marker is missing (file is ", bytes.size(),
                      " bytes); the write was interrupted or the file was cut"));
  }
  uint64_t recorded = get_at<uint64_t>(bytes, bytes.size() - 8);
  if (recorded != bytes.size()) {
    throw fail(concat("length mismatch: the trailer records ", recorded, " bytes but the file "
                      "has ", bytes.size()));
  }
  uint64_t header_len = get_at<uint64_t>(bytes, 12);
  if (header_len > bytes.size() - kPreludeBytes - kTrailerBytes - 4) {
    throw fail(concat("corrupt header length ", header_len, " at offset 12"));
  }
  std::string header_text = bytes.substr(kPreludeBytes, header_len);
  uint32_t header_crc = get_at<uint32_t>(bytes, kPreludeBytes + header_len);
  if (crc32_of(header_text.data(), header_text.size()) != header_crc) {
    throw fail(concat("header checksum mismatch (bytes ", kPreludeBytes, "..",
                      kPreludeBytes + header_len, "): the file is corrupt"));
  }
  json header;
  try {
    header = json::parse(header_text);
  } catch (const std::exception& e) {
    throw fail(concat("header is not valid JSON: ", e.what()));
  }
  const uint64_t data_start = kPreludeBytes + header_len + 4;
  const uint64_t data_len = bytes.size() - kTrailerBytes - data_start;
  Checkpoint out;
  try {
    out.metadata = header.at("metadata").dump();
    for (const auto& e : header.at("tensors")) {
      std::string name = e.at("name").get<std::string>();
      auto dtype = parse_dtype(e.at("dtype").get<std::string>(), path, name);
      auto shape = e.at("shape").get<std::vector<int64_t>>();
      uint64_t off = e.at("offset").get<uint64_t>();
      uint64_t nbytes = e.at("nbytes").get<uint64_t>();
      uint32_t crc = e.at("crc32").get<uint32_t>();
      int64_t numel = 1;
      for (auto s : shape) {
        if (s < 0) throw fail(concat("tensor '", name, "' has a negative dimension"));
        numel *= s;
      }
      if (static_cast<uint64_t>(numel) * c10::elementSize(dtype) != nbytes) {
        throw fail(concat("tensor '", name, "': ", nbytes, " bytes do not match its shape"));
      }
      if (off > data_len || nbytes > data_len - off) {
        throw fail(concat("tensor '", name, "' lies past the end of the data (offset ", off,
                          ", ", nbytes, " bytes, data section ", data_len, " bytes)"));
      }
      const char* src = bytes.data() + data_start + off;
      if (crc32_of(src, nbytes) != crc) {
        throw fail(concat("checksum mismatch in tensor '", name, "' (file offset ",
                          data_start + off, ", ", nbytes, " bytes): the file is corrupt"));
      }
      at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
      if (nbytes > 0) std::memcpy(t.data_ptr(), src, nbytes);
      if (!out.tensors.emplace(name, t).second) {
        throw fail(concat("tensor '", name, "' appears twice"));
      }
    }
  } catch (const InvalidArgument&) {
    throw;
  } catch (const std::exception& e) {
    throw fail(concat("malformed header: ", e.what()));
  }
  return out;
}

bool checkpoint_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
}  // namespace train
}  // namespace lockstep
