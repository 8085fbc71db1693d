// The checkpoint file format: writing atomically, reading with every check. See Note
// [Checkpoint format] and Note [Atomic checkpoint writes] in lockstep/train/checkpoint.h.
#include <ATen/ATen.h>

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "lockstep/errors.h"
#include "lockstep/train/checkpoint.h"
#include "train/checkpoint_parsing.h"

namespace lockstep {
namespace train {

using detail::concat;
using nlohmann::json;

namespace {

using format::crc32_of;
using format::kEndMagic;
using format::kMagic;
using format::kTrailerBytes;

template <typename T>
void put(std::string& out, T value) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));  // little-endian hosts only (x86-64, aarch64)
  out.append(bytes, sizeof(T));
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

// Note [Atomic checkpoint writes], failure paths: a write past RLIMIT_FSIZE (`ulimit -f`)
// raises SIGXFSZ, whose default action kills the process before it can remove the temporary
// file. While the file is written, the calling thread blocks SIGXFSZ, so that write(2) fails
// with EFBIG like any other error and the file is removed; the pending signal is then consumed
// (it was answered by the error) and the old mask restored. Only this thread's mask changes.
class BlockFileSizeSignal {
 public:
  BlockFileSizeSignal() {
    sigemptyset(&set_);
    sigaddset(&set_, SIGXFSZ);
    blocked_ = ::pthread_sigmask(SIG_BLOCK, &set_, &old_) == 0;
  }
  ~BlockFileSizeSignal() {
    if (!blocked_) return;
    const timespec zero{0, 0};
    while (::sigtimedwait(&set_, nullptr, &zero) == SIGXFSZ) {
    }
    ::pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  BlockFileSizeSignal(const BlockFileSizeSignal&) = delete;
  BlockFileSizeSignal& operator=(const BlockFileSizeSignal&) = delete;

 private:
  sigset_t set_{};
  sigset_t old_{};
  bool blocked_ = false;
};

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
  // Note [Bounded checkpoint parsing]: what the reader would reject is not written.
  format::check_json_bounds(checkpoint.metadata,
                            concat("checkpoint metadata for '", path, "'"));
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
  BlockFileSizeSignal no_sigxfsz;
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
  // Note [Bounded checkpoint parsing]: everything is verified before any tensor is allocated.
  const format::ParsedCheckpoint parsed =
      format::parse_checkpoint_bytes(bytes, path, kCheckpointFormatVersion);
  Checkpoint out;
  out.metadata = parsed.metadata;
  for (const auto& e : parsed.tensors) {
    const at::ScalarType dtype = parse_dtype(e.dtype, path, e.name);
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(c10::elementSize(dtype)) ==
                          format::dtype_size(e.dtype));
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(dtype));
    if (e.nbytes > 0) {
      std::memcpy(t.data_ptr(), bytes.data() + parsed.data_start + e.offset, e.nbytes);
    }
    out.tensors.emplace(e.name, t);
  }
  return out;
}

int64_t metadata_int(const Checkpoint& checkpoint, const std::string& key, int64_t min,
                     int64_t max, const std::string& path) {
  return format::metadata_int(checkpoint.metadata, key, min, max, path);
}

bool checkpoint_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
}  // namespace train
}  // namespace lockstep
