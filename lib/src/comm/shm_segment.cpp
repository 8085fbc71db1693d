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
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

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

bool PeerProcess::stopped() const {
  if (pid_ < 0 || dead()) return false;
  // /proc/<pid>/stat is "pid (comm) S ...": the state follows the last ')' (comm may hold
  // one). The read is bounded by the buffer.
  char buf[512];
  std::string path = "/proc/" + std::to_string(pid_) + "/stat";
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  ssize_t n = ::read(fd, buf, sizeof(buf) - 1);
  ::close(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  const char* paren = std::strrchr(buf, ')');
  if (!paren || paren[1] != ' ') return false;
  return paren[2] == 'T' || paren[2] == 't';
}

// Note [Shared-memory setup faults]
// Every wait of the setup polls the store in slices of kSetupPoll and, between slices, checks
// the processes of the ranks it waits for (PeerProcess: a pidfd, else kill(pid, 0)), so a rank
// that dies during setup makes every survivor fail within about a second, naming it, instead
// of at the rendezvous timeout. For that every rank publishes "pid/<rank>" ("pid
// pid-namespace") before it waits for anything, in the group's store, so that a shared
// buffer's setup knows the pid of a rank that died before it got there. Rank 0 publishes the object's name before it
// creates the object, so whichever rank fails (or finds a peer dead) can shm_unlink it: on
// every failure path each rank unlinks the name it knows, and nothing is left in /dev/shm
// (unlinking a name twice is harmless). No wait blocks in the store: a blocking get would also
// keep the rank in a system call for the whole timeout.
namespace {

constexpr auto kSetupPoll = std::chrono::milliseconds(50);

class SetupWatch {
 public:
  SetupWatch(int rank, int size, Store& store, const std::string& key, std::string where)
      : rank_(rank), size_(size), store_(store), key_(key), where_(std::move(where)),
        peers_(size) {}

  // Waits until `k` exists, polling; fails when a peer in `watch` (all when empty) died.
  void wait(const std::string& k, std::chrono::steady_clock::time_point deadline,
            const std::string& before, int only = -1) {
    while (!store_.check({k})) {
      check_peers(before, only);
      if (std::chrono::steady_clock::now() >= deadline) {
        throw TimeoutError(concat(where_, ": timed out waiting for ", k, " (", before,
                                  "). A rank may not have started, or may be stalled; check "
                                  "every rank's log; raise LOCKSTEP_RENDEZVOUS_TIMEOUT if the "
                                  "ranks start slowly."));
      }
      std::this_thread::sleep_for(kSetupPoll);  // a poll of the store, not a synchronisation
    }
  }

 private:
  void check_peers(const std::string& before, int only) {
    for (int r = 0; r < size_; ++r) {
      if (r == rank_ || (only >= 0 && r != only)) continue;
      if (!peers_[r]) {
        const std::string pk = concat("pid/", r);
        if (!store_.check({pk})) continue;  // not published yet: the deadline bounds it
        long long pid = 0;
        unsigned long long ns = 0;
        std::string v = store_.get(pk);
        if (sscanf(v.c_str(), "%lld %llu", &pid, &ns) != 2) continue;
        peers_[r] = std::make_unique<PeerProcess>(static_cast<int>(pid), ns);
      }
      if (peers_[r]->dead()) {
        throw CommError(concat(where_, ": rank ", r, " (pid ", peers_[r]->pid(), ") died ",
                               before, "; check its log (killed, out of memory, a file-size "
                               "limit?). The job cannot continue; restart it."));
      }
    }
  }

  int rank_, size_;
  Store& store_;
  std::string key_, where_;
  std::vector<std::unique_ptr<PeerProcess>> peers_;
};

}  // namespace

Mapping::Mapping(int rank, int size, Store& store, const std::string& key, const std::string& job_id,
        size_t bytes, std::chrono::milliseconds timeout,
        const std::function<void(char* base, bool created)>& on_mapped)
    : bytes_(bytes) {
  auto where = concat("[rank ", rank, "/", size, "] shared-memory setup (", key, ")");
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  SetupWatch watch(rank, size, store, key, where);
  // Note [Shared-memory setup faults]
  store.set(concat("pid/", rank), concat(getpid(), " ", pid_namespace()));
  try {
    if (rank == 0) {
      name_ = concat("/lockstep-", sanitize(job_id), "-", random_token());
      store.set(key + "/name", name_);  // before creating: survivors can unlink it
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
        throw CommError(concat(where, ": could not reserve ", (bytes_ + (1 << 20) - 1) >> 20,
                            " MiB in /dev/shm (", std::strerror(rc),
                            "). Enlarge /dev/shm (docker run --shm-size), "
                            "or set LOCKSTEP_TRANSPORT=gloo."));
      }
      map(fd, where);
      if (on_mapped) on_mapped(base(), true);
      store.set(key + "/created", "1");
    } else {
      watch.wait(key + "/name", deadline, "before it named the shared-memory object", 0);
      name_ = store.get(key + "/name");
      watch.wait(key + "/created", deadline, "before it created the shared-memory object", 0);
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
    watch.wait(key + "/unlinked", deadline, "before it mapped the shared-memory object");
  } catch (...) {
    if (base_ != nullptr) munmap(base_, bytes_);
    base_ = nullptr;
    try {
      if (name_.empty() && store.check({key + "/name"})) name_ = store.get(key + "/name");
    } catch (...) {  // the store itself failed: report the first error
    }
    if (!name_.empty()) shm_unlink(name_.c_str());  // whoever fails removes the name
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
