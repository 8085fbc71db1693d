#pragma once
// The shared-memory segment of a ShmGroup and the shared reduction buffers: layout (Note
// [Shared-memory protocol]), creation, mapping and the early unlink (Note [Shared-memory
// faults]), futex words and peer liveness. Internal to comm/.

#include <ATen/core/Tensor.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "lockstep/store.h"

namespace lockstep {
namespace shm {

constexpr uint64_t kMagic = 0x6c6f636b73746570ULL;  // "lockstep"
constexpr size_t kPage = 4096;

struct Signature {
  uint32_t kind = 0;
  int32_t dtype = -1;
  int64_t numel = 0;
  int32_t arg = 0;  // ReduceOp or root
  uint32_t seq = 0;
  uint64_t buffer = 0;  // the shared buffer's creation number (Note [Shared reduction buffers])
  bool operator==(const Signature& o) const {
    return kind == o.kind && dtype == o.dtype && numel == o.numel && arg == o.arg &&
           seq == o.seq && buffer == o.buffer;
  }
};

struct alignas(64) RankLine {
  std::atomic<uint32_t> arrive;
  std::atomic<uint32_t> waiters;
  std::atomic<uint32_t> departed;
  std::atomic<uint32_t> mapped;
  int32_t pid;
  uint64_t pid_ns;
  Signature sig;
};

struct alignas(64) Header {
  uint64_t magic;
  uint32_t size;
  uint32_t reserved;
  uint64_t slot_bytes;
  uint64_t total_bytes;
  // kind (8 bits) | culprit (16) | finder (16) | sequence (24)
  alignas(64) std::atomic<uint64_t> abort_word;
};

static_assert(std::atomic<uint32_t>::is_always_lock_free, "futex words must be lock-free");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "abort word must be lock-free");

inline size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

/// Bytes of each slot (and of the result area) for a group of `size` ranks.
size_t slot_bytes(int size);
inline size_t lines_offset() { return round_up(sizeof(Header), 64); }
inline size_t data_offset(int size) {
  return round_up(lines_offset() + size * sizeof(RankLine), kPage);
}
inline size_t segment_bytes(int size) { return data_offset(size) + (size + 1) * slot_bytes(size); }

/// Wakes every thread sleeping on `word` (any process).
void futex_wake_all(std::atomic<uint32_t>* word);
/// Sleeps while `*word == expected`, at most `d`; spurious wake-ups are the caller's to check.
void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, std::chrono::nanoseconds d);

/// Phase counters wrap: `value` has reached `target` when it is at most 2^31 past it.
inline bool reached(uint32_t value, uint32_t target) {
  return static_cast<int32_t>(value - target) >= 0;
}

/// This process's pid namespace (inode of /proc/self/ns/pid), 0 when unknown.
uint64_t pid_namespace();
/// 16 random hex digits for segment names.
std::string random_token();
/// `s` reduced to [A-Za-z0-9._-], at most 48 characters, for segment names.
std::string sanitize(const std::string& s);

// A peer process whose death we can detect: a pidfd when the kernel has them (immune to pid
// reuse), else kill(pid, 0). Peers in another pid namespace (or threads of this process)
// are not checked; the collective timeout still bounds every wait on them.
class PeerProcess {
 public:
  PeerProcess() = default;
  PeerProcess(int pid, uint64_t ns);
  PeerProcess(const PeerProcess&) = delete;
  PeerProcess& operator=(const PeerProcess&) = delete;
  ~PeerProcess() {
    if (fd_ >= 0) close(fd_);
  }
  int pid() const { return pid_; }
  /// True once the process exited (a zombie counts); false when it cannot be checked.
  bool dead() const;
  /// True while the process is stopped (SIGSTOP, SIGTSTP, or held by a debugger), from
  /// /proc/<pid>/stat; false when it runs, exited or cannot be checked.
  bool stopped() const;

 private:
  int pid_ = -1;
  int fd_ = -1;
  bool dead_at_start_ = false;
};

// A POSIX shared-memory object every rank of the group maps. Rank 0 creates it (mode 0600,
// named /lockstep-<job>-<random token>), announcing the name under `key` in the store before
// it creates it (Note [Shared-memory setup faults] in shm_segment.cpp); the
// last rank to map it unlinks it, and no rank returns before that, so a crash at any later
// point leaves nothing in /dev/shm (Note [Shared-memory faults]). `on_mapped` runs on every
// rank right after mapping, before the rank is counted as mapped (the creator's runs before
// the name is announced).
class Mapping {
 public:
  Mapping(int rank, int size, Store& store, const std::string& key, const std::string& job_id,
          size_t bytes, std::chrono::milliseconds timeout,
          const std::function<void(char* base, bool created)>& on_mapped);
  ~Mapping();
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  char* base() const { return static_cast<char*>(base_); }
  size_t bytes() const { return bytes_; }
  const std::string& name() const { return name_; }

 private:
  void map(int fd, const std::string& where);

  std::string name_;
  size_t bytes_ = 0;
  void* base_ = nullptr;
};

// The group's control segment (Note [Shared-memory protocol]).
class Segment {
 public:
  Segment(int rank, int size, Store& store, const std::string& job_id,
          std::chrono::milliseconds timeout)
      : mapping_(rank, size, store, "segment", job_id, segment_bytes(size), timeout,
                 [rank, size](char* base, bool created) { prepare(base, rank, size, created); }) {}

  Header* header() { return header_of(mapping_.base()); }
  RankLine& line(int r) { return line_of(mapping_.base(), r); }
  char* slot(int r) {
    return mapping_.base() + data_offset(header()->size) + r * header()->slot_bytes;
  }
  char* result() { return slot(static_cast<int>(header()->size)); }
  size_t slot_size() { return header()->slot_bytes; }
  const std::string& name() const { return mapping_.name(); }

 private:
  static Header* header_of(char* base) { return reinterpret_cast<Header*>(base); }
  static RankLine& line_of(char* base, int r) {
    return reinterpret_cast<RankLine*>(base + lines_offset())[r];
  }
  // Runs before this rank counts as mapped: the creator fills the header; every rank checks
  // it and publishes its pid for the liveness checks of its peers.
  static void prepare(char* base, int rank, int size, bool created);

  Mapping mapping_;
};

// Note [Shared reduction buffers]
// ShmGroup::new_buffer(numel) maps one more shared object holding one region per rank (each
// rounded up to whole pages) and returns a tensor over this rank's region. An all-reduce of
// exactly that tensor copies nothing in or out: after phase A every rank sums its slice of the
// element range over regions 0..W-1 (in that order) and writes the result into that slice of
// every region, in one pass (Note [One pass per element] in shm_kernels.cpp); phase B then
// tells every rank that its whole region is reduced and that nobody reads or writes it any
// more, so it may write the next backward's gradients there. A slice is read and written only
// by its owner between A and B, and every rank has stopped writing its region at A, so no
// element is read while another rank writes it. Since a rank writes into its peers' regions,
// the ranks must be reducing the same buffer: its creation number (new_buffer is collective,
// so the numbers agree) is part of the signature checked after A, and a rank that names
// another buffer fails the collective on every rank before anything is written. After a
// failed in-place all-reduce (a timeout, a dead peer) the buffer's contents are undefined and
// may still change (a slow peer may still be writing its slice); the group is unusable then
// anyway. Memory traffic per rank for N bytes: read N and write N (its slice of every region),
// against read N and write N/W, then a gather after phase B reading and writing N (W-1)/W and a
// third phase after it (lockstep before 2026-11-29), and about 3N read and 3N written through
// the slots.
struct SharedBuffer {
  std::unique_ptr<Mapping> mapping;
  uint64_t number = 0;  // 1 for the group's first new_buffer, ...: the same on every rank
  size_t region_bytes = 0;
  int64_t numel = 0;
  at::ScalarType dtype = at::kFloat;
  char* region(int r) const { return mapping->base() + r * region_bytes; }
};

}  // namespace shm
}  // namespace lockstep
