// TensorBoard event files: the hand-written protobuf encoding and TFRecord framing of
// Note [TensorBoard event files] (event_file.h), and TensorBoardWriter. No LibTorch headers.
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "core/crc32c.h"
#include "lockstep/errors.h"
#include "lockstep/train/metrics.h"
#include "train/event_file.h"

namespace lockstep {
namespace train {

using ::lockstep::detail::concat;

namespace detail {

namespace {

// Protobuf wire types.
constexpr uint32_t kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5;

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out += static_cast<char>((v & 0x7F) | 0x80);
    v >>= 7;
  }
  out += static_cast<char>(v);
}

void put_key(std::string& out, uint32_t field, uint32_t wire_type) {
  put_varint(out, (static_cast<uint64_t>(field) << 3) | wire_type);
}

void put_little_endian(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out += static_cast<char>((v >> (8 * i)) & 0xFF);
}

void put_double(std::string& out, uint32_t field, double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  put_key(out, field, kFixed64);
  put_little_endian(out, bits, 8);
}

void put_float(std::string& out, uint32_t field, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  put_key(out, field, kFixed32);
  put_little_endian(out, bits, 4);
}

void put_bytes(std::string& out, uint32_t field, const std::string& bytes) {
  put_key(out, field, kLengthDelimited);
  put_varint(out, bytes.size());
  out += bytes;
}

void put_step(std::string& event, int64_t step) {
  put_key(event, /*step=*/2, kVarint);
  put_varint(event, static_cast<uint64_t>(step));  // int64: negative steps take 10 bytes
}

}  // namespace

std::string encode_file_version_event(double wall_time, int64_t step) {
  std::string event;
  put_double(event, /*wall_time=*/1, wall_time);
  if (step >= 0) put_step(event, step);
  put_bytes(event, /*file_version=*/3, "brain.Event:2");
  return event;
}

std::string encode_session_start_event(double wall_time, int64_t step) {
  std::string session_log;
  put_key(session_log, /*status=*/1, kVarint);
  put_varint(session_log, /*SessionLog::START=*/1);
  std::string event;
  put_double(event, /*wall_time=*/1, wall_time);
  put_step(event, step);
  put_bytes(event, /*session_log=*/7, session_log);
  return event;
}

std::string encode_scalars_event(double wall_time, int64_t step,
                                 const std::vector<std::pair<std::string, float>>& values) {
  std::string summary;
  for (const auto& tv : values) {
    std::string value;
    put_bytes(value, /*tag=*/1, tv.first);
    put_float(value, /*simple_value=*/2, tv.second);
    put_bytes(summary, /*value=*/1, value);
  }
  std::string event;
  put_double(event, /*wall_time=*/1, wall_time);
  put_step(event, step);
  put_bytes(event, /*summary=*/5, summary);
  return event;
}

std::string frame_record(const std::string& data) {
  std::string header;
  put_little_endian(header, data.size(), 8);
  std::string record = header;
  put_little_endian(record, core::mask_crc32c(core::crc32c(header)), 4);
  record += data;
  put_little_endian(record, core::mask_crc32c(core::crc32c(data)), 4);
  return record;
}

}  // namespace detail

namespace {

double unix_time() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// mkdir -p: creates `dir` and its missing parents; an existing directory is fine.
void make_directories(const std::string& dir) {
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos != dir.size() && dir[pos] != '/') continue;
    std::string prefix = dir.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0777) != 0 && errno != EEXIST) {
      throw Error(concat("could not create the TensorBoard directory '", prefix, "': ",
                         std::strerror(errno), "; check that its parent is writable"));
    }
  }
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    throw Error(concat("expected a directory for TensorBoard event files at '", dir,
                       "', but it is not one; choose another directory"));
  }
}

}  // namespace

TensorBoardWriter::TensorBoardWriter(const std::string& dir, int64_t purge_step) {
  LOCKSTEP_CHECK(purge_step >= -1, "TensorBoardWriter: expected purge_step >= 0 (the first step "
                 "a resumed run writes again) or -1 (purge nothing), but got ", purge_step,
                 " for '", dir, "'");
  if (dir.empty()) return;
  make_directories(dir);
  static std::atomic<int> files_made{0};
  char host[256] = "localhost";
  if (::gethostname(host, sizeof(host) - 1) != 0) std::strcpy(host, "localhost");
  host[sizeof(host) - 1] = '\0';
  const double now = unix_time();
  path_ = concat(dir, dir.back() == '/' ? "" : "/", "events.out.tfevents.",
                 static_cast<long long>(now), ".", host, ".", ::getpid(), ".", files_made++);
  file_ = std::fopen(path_.c_str(), "wbx");  // x: never overwrite another writer's file
  if (file_ == nullptr) {
    std::string reason = std::strerror(errno);
    std::string path = path_;
    path_.clear();
    throw Error(concat("could not create the TensorBoard event file '", path, "': ", reason,
                       "; check that the directory is writable"));
  }
  // Note [TensorBoard purge step]
  write_record(detail::encode_file_version_event(now, purge_step));
  if (purge_step >= 0) write_record(detail::encode_session_start_event(now, purge_step));
}

TensorBoardWriter::~TensorBoardWriter() {
  if (file_ != nullptr) std::fclose(file_);
}

void TensorBoardWriter::add_scalars(int64_t step,
                                    const std::vector<std::pair<std::string, double>>& values) {
  if (file_ == nullptr || values.empty()) return;
  std::vector<std::pair<std::string, float>> scalars;
  scalars.reserve(values.size());
  for (const auto& tv : values) scalars.emplace_back(tv.first, static_cast<float>(tv.second));
  write_record(detail::encode_scalars_event(unix_time(), step, scalars));
}

void TensorBoardWriter::write_record(const std::string& data) {
  const std::string record = detail::frame_record(data);
  if (std::fwrite(record.data(), 1, record.size(), file_) != record.size() ||
      std::fflush(file_) != 0) {
    throw Error(concat("writing the TensorBoard event file '", path_, "' failed: ",
                       std::strerror(errno), "; check the disk space"));
  }
}

}  // namespace train
}  // namespace lockstep
