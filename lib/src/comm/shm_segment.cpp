// The shared-memory segment (see shm_segment.h).
#include "comm/shm_segment.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <random>

#include "lockstep/errors.h"

namespace lockstep {
namespace shm {

using detail::concat;

size_t slot_bytes(int size) {
  constexpr size_t kMiB = size_t{1} << 20;
  return std::clamp<size_t>((32 * kMiB) / (size + 1) / kMiB * kMiB, kMiB, 8 * kMiB);
}

namespace {
long futex(std::atomic<uint32_t>* word, int op, uint32_t val, const timespec* ts) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, val, ts, nullptr, 0);
}
}  // namespace

void futex_wake_all(std::atomic<uint32_t>* word) { futex(word, FUTEX_WAKE, INT_MAX, nullptr); }

void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, std::chrono::nanoseconds d) {
  timespec ts;
  ts.tv_sec = static_cast<time_t>(d.count() / 1000000000);
  ts.tv_nsec = static_cast<long>(d.count() % 1000000000);
  futex(word, FUTEX_WAIT, expected, &ts);  // EAGAIN / ETIMEDOUT / EINTR: the caller re-checks
}

uint64_t pid_namespace() {
  struct stat st;
  return stat("/proc/self/ns/pid", &st) == 0 ? static_cast<uint64_t>(st.st_ino) : 0;
}

std::string random_token() {
  std::random_device rd;
  uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  char buf[17];
  snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string sanitize(const std::string& s) {
  std::string out;
  for (char c : s) {
    bool ok = std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
    out += ok ? c : '_';
    if (out.size() >= 48) break;
  }
  return out.empty() ? "job" : out;
}

PeerProcess::PeerProcess(int pid, uint64_t ns) : pid_(pid) {
  if (pid <= 0 || ns != pid_namespace() || pid == getpid()) {
    pid_ = -1;
    return;
  }
#ifdef SYS_pidfd_open
  fd_ = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (fd_ < 0 && errno == ESRCH) dead_at_start_ = true;
#endif
}

bool PeerProcess::dead() const {
  if (pid_ < 0) return false;
  if (dead_at_start_) return true;
  if (fd_ >= 0) {
    pollfd p{fd_, POLLIN, 0};
    return poll(&p, 1, 0) > 0;  // readable once the process exited (zombie included)
  }
  return kill(pid_, 0) == -1 && errno == ESRCH;
}

Mapping::Mapping(int rank, int size, Store& store, const std::string& key, const std::string& job_id,
        size_t bytes, std::chrono::milliseconds timeout,
        const std::function<void(char* base, bool created)>& on_mapped)
    : bytes_(bytes) {
  auto where = concat("[rank ", rank, "/", size, "] shared-memory rendezvous (", key, ")");
  if (rank == 0) {
    name_ = concat("/lockstep-", sanitize(job_id), "-", random_token());
    int fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) {
      throw CommError(concat(where, ": could not create ", name_, " in /dev/shm: ",
                          std::strerror(errno),
                          ". Check that /dev/shm is mounted and writable, or set "
                          "LOCKSTEP_TRANSPORT=gloo."));
    }
    int rc = posix_fallocate(fd, 0, static_cast<off_t>(bytes_));
    if (rc != 0) {
      close(fd);
      shm_unlink(name_.c_str());
      throw CommError(concat(where, ": could not reserve ", (bytes_ + (1 << 20) - 1) >> 20,
                          " MiB in /dev/shm (", std::strerror(rc),
                          "). Enlarge /dev/shm (docker run --shm-size), "
                          "or set LOCKSTEP_TRANSPORT=gloo."));
    }
    map(fd, where);
    if (on_mapped) on_mapped(base(), true);
    store.set(key + "/name", name_);
  } else {
    name_ = store.get(key + "/name");
    int fd = shm_open(name_.c_str(), O_RDWR, 0600);
    if (fd < 0) {
      throw CommError(concat(where, ": could not open ", name_, " created by rank 0: ",
                          std::strerror(errno),
                          ". Ranks that share a host identity must share /dev/shm (containers: "
                          "set ProcessGroupOptions::host_id, or LOCKSTEP_TRANSPORT=gloo)."));
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) < bytes_) {
      close(fd);
      throw CommError(concat(where, ": ", name_, " holds ", st.st_size, " bytes, expected ",
                          bytes_, ". Were the ranks started with different lockstep builds, "
                          "or did they ask for different sizes?"));
    }
    map(fd, where);
    if (on_mapped) on_mapped(base(), false);
  }
  // The last rank to map removes the name; everyone waits for that.
  if (store.add(key + "/mapped", 1) == size) {
    shm_unlink(name_.c_str());
    store.set(key + "/unlinked", "1");
  }
  try {
    store.wait({key + "/unlinked"}, timeout);
  } catch (...) {
    shm_unlink(name_.c_str());  // a rank died before mapping: remove it ourselves
    throw;
  }
}

Mapping::~Mapping() {
  if (base_ != nullptr) munmap(base_, bytes_);
}

void Mapping::map(int fd, const std::string& where) {
  void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int err = errno;
  close(fd);
  if (p == MAP_FAILED) {
    throw CommError(concat(where, ": mmap of ", name_, " (", bytes_, " bytes) failed: ",
                        std::strerror(err), "."));
  }
  base_ = p;
}

void Segment::prepare(char* base, int rank, int size, bool created) {
  Header* h = header_of(base);
  if (created) {
    h->size = static_cast<uint32_t>(size);
    h->slot_bytes = slot_bytes(size);
    h->total_bytes = segment_bytes(size);
    h->abort_word.store(0);
    std::atomic_thread_fence(std::memory_order_release);
    h->magic = kMagic;
  } else if (h->magic != kMagic || h->size != static_cast<uint32_t>(size)) {
    throw CommError(concat("[rank ", rank, "/", size, "] shared-memory rendezvous: the "
                           "segment was created for ", h->size, " ranks, expected ", size,
                           ". Were the ranks started with different world sizes?"));
  }
  RankLine& me = line_of(base, rank);
  me.pid = getpid();
  me.pid_ns = pid_namespace();
  me.mapped.store(1);
}

}  // namespace shm
}  // namespace lockstep
