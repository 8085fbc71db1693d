// The shared-memory channel for send / recv (see shm_channel.h).
#include "comm/shm_channel.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>

#include "core/spin_wait.h"
#include "lockstep/errors.h"

namespace lockstep {
namespace shm {

using detail::concat;

// Note [Shared-memory channel]
// send / recv among the ranks of one host travel through a second shared-memory object that
// every rank maps when the group is built (rank 0 creates it, the last to map unlinks it, as
// for the segment: Note [Shared-memory faults]). It holds one ring per ordered pair (s, d),
// s != d:
//   control page: `head` (chunks written, only s stores it), `tail` (chunks read, only d
//     stores it), a waiter count for each | kChannelChunks chunks of channel_chunk_bytes(W)
//     bytes, each a 64-byte header (message number, offset, length, total bytes, tag, dtype,
//     element count) and payload.
// A message of any size is cut into chunks; an empty one is one chunk of length 0. s writes a
// chunk when head - tail < kChannelChunks, then publishes it by storing head + 1; d reads the
// chunk at tail once head != tail and frees it by storing tail + 1. Either side waits like a
// collective's phase (spin while cores are spare, then a futex on the other side's word,
// woken by the other side when its waiter count says so, at least every 20 ms to check the
// peer). Each pair is one single-producer single-consumer queue, served on s by one sender
// thread per destination and on d by one receiver thread per source: messages from s to d
// arrive in the order s issued them (so per (s, d, tag) too), sends to several ranks and recvs
// from several ranks proceed independently, and a send completes as soon as its last chunk
// is in the ring (at once for messages up to the ring's capacity, even before the recv).
//
// Why a bounded ring rather than a segment per message: the memory is fixed and reserved up
// front (posix_fallocate, so a full /dev/shm fails at construction, not with SIGBUS in the
// middle of training), nothing is left to clean up when a rank dies mid-message, and there is
// no shm_open / mmap / munmap per message. The cost is a handoff per chunk, which is small
// next to the copies once chunks are a few hundred KiB: the rings share 8 MiB, each between 64 KiB
// and 1 MiB (2 MiB in all at W = 2, 8 MiB from 4 to 12 ranks, 16 MiB at 16).
//
// The tag, dtype and element count are checked, not used to select a message (docs/
// collectives.md, "Point-to-point: order, tags"): a recv that does not match the next message
// drains it without writing a byte and fails with InvalidArgument naming what was sent; the
// next recv gets the next message. Faults, each bounded by the group's timeout:
//   - the peer never sends (recv) or never reads (send, once the ring is full): TimeoutError
//     naming it, or saying that it is stopped (SIGSTOP, a debugger);
//   - the peer's process died, or it destroyed its group: CommError naming it (and its pid);
//   - a recv that gave up mid-message leaves the rest in the ring: the next recv skips chunks
//     that do not start a message; a send that gave up mid-message is noticed by its recv
//     (the next chunk starts another message), which fails with CommError;
//   - this rank destroys its group: waiting sends and recvs fail with StateError.
// Unlike a collective's fault, none of these makes the group unusable.

namespace {

constexpr size_t kChunkHeader = 64;
constexpr auto kMaxSleep = std::chrono::milliseconds(20);

struct ChunkHeader {
  uint64_t seq;     // the message's number on its pair, from 1
  uint64_t offset;  // of this chunk's payload in the message, in bytes
  uint64_t len;     // of this chunk's payload
  uint64_t total;   // bytes of the message
  int64_t numel;
  int32_t tag;
  int32_t dtype;
};
static_assert(sizeof(ChunkHeader) <= kChunkHeader, "chunk header too large");

struct Control {
  alignas(64) std::atomic<uint32_t> head;
  std::atomic<uint32_t> head_waiters;
  alignas(64) std::atomic<uint32_t> tail;
  std::atomic<uint32_t> tail_waiters;
};
static_assert(sizeof(Control) <= kPage, "ring control larger than a page");

size_t pair_bytes(int size) { return kPage + kChannelChunks * channel_chunk_bytes(size); }

size_t channel_bytes(int size) {
  const size_t pairs = static_cast<size_t>(size) * (size - 1);
  return pairs == 0 ? kPage : pairs * pair_bytes(size);  // one rank: nothing to send
}

}  // namespace

size_t channel_chunk_bytes(int size) {
  constexpr size_t kKiB = 1024, kMiB = kKiB * kKiB;
  const size_t pairs = std::max<size_t>(1, static_cast<size_t>(size) * (size - 1));
  const size_t ring = std::clamp<size_t>(8 * kMiB / pairs, 64 * kKiB, kMiB);
  return ring / kChannelChunks / kPage * kPage;
}

struct Channel::Ring {
  Control* control;
  char* chunks;
  size_t chunk_bytes;
  char* chunk(uint32_t n) const { return chunks + (n % kChannelChunks) * chunk_bytes; }
};

Channel::Channel(int rank, int size, Store& store, const std::string& job_id,
                 std::chrono::milliseconds rendezvous_timeout, std::chrono::milliseconds timeout,
                 std::chrono::microseconds spin, Segment& segment,
                 const std::vector<std::unique_ptr<PeerProcess>>& peers)
    : rank_(rank), size_(size), timeout_(timeout), segment_(segment), peers_(peers),
      mapping_(rank, size, store, "channel", job_id, channel_bytes(size), rendezvous_timeout,
               nullptr),
      chunk_bytes_(channel_chunk_bytes(size)), spin_(spin), sent_(size, 0) {}

Channel::~Channel() {
  stopping_.store(true);
  std::lock_guard<std::mutex> lock(executors_mutex_);
  senders_.clear();  // each waiting task notices stopping_ within kMaxSleep
  receivers_.clear();
}

Channel::Ring Channel::ring(int src, int dst) {
  const int index = src * (size_ - 1) + (dst < src ? dst : dst - 1);
  char* base = mapping_.base() + index * pair_bytes(size_);
  return {reinterpret_cast<Control*>(base), base + kPage, chunk_bytes_};
}

comm::SerialExecutor& Channel::executor(
    std::map<int, std::unique_ptr<comm::SerialExecutor>>& of, int peer) {
  std::lock_guard<std::mutex> lock(executors_mutex_);
  auto& e = of[peer];
  if (!e) e = std::make_unique<comm::SerialExecutor>();
  return *e;
}

WorkPtr Channel::send(const at::Tensor& tensor, int dst, int tag, ChannelMessage message) {
  // Note [Device tensors over shared memory] (shm_group.cpp): staged through the host.
  at::Tensor host = tensor.device().is_cpu() ? tensor : tensor.to(at::kCPU);
  return executor(senders_, dst).post(
      [this, host, dst, tag, message] { transmit(host, dst, tag, message); });
}

WorkPtr Channel::recv(at::Tensor& tensor, int src, int tag, ChannelMessage message) {
  const bool on_device = !tensor.device().is_cpu();
  at::Tensor out = tensor;
  at::Tensor host = on_device ? at::empty(tensor.sizes(), tensor.options().device(at::kCPU))
                              : tensor;
  return executor(receivers_, src).post([this, out, host, src, tag, message, on_device]() mutable {
    receive(host, src, tag, message);
    if (on_device) out.copy_(host);
  });
}

template <typename Ready>
void Channel::wait(std::atomic<uint32_t>& word, std::atomic<uint32_t>& waiters, Ready&& ready,
                   int peer, std::chrono::steady_clock::time_point deadline,
                   const ChannelMessage& message, const std::function<std::string()>& why_timeout) {
  if (detail::spin_until(ready, spin_)) return;
  const auto& line = segment_.line(peer);
  const auto& process = peers_[peer];
  while (true) {
    if (ready()) return;
    if (stopping_.load()) {
      throw StateError(concat(message.what, ": this rank destroyed its process group before "
                              "the message was through."));
    }
    if (line.departed.load()) {
      throw CommError(concat(message.what, ": rank ", message.peer, " destroyed its process "
                             "group (or exited) first. Every send needs a recv on its peer "
                             "before the peer leaves."));
    }
    if (process && process->dead()) {
      throw CommError(concat(message.what, ": rank ", message.peer, " (pid ", line.pid,
                             ") died while this rank waited for it. Check rank ", message.peer,
                             "'s log (killed, out of memory?)."));
    }
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) {
      if (process && process->stopped()) {
        throw TimeoutError(concat(message.what, " timed out after ", timeout_.count() / 1000.0,
                                  " s: rank ", message.peer, " (pid ", line.pid, ") is stopped "
                                  "(SIGSTOP, Ctrl-Z or a debugger). Resume it with SIGCONT or "
                                  "kill it."));
      }
      throw TimeoutError(concat(message.what, " timed out after ", timeout_.count() / 1000.0,
                                " s: ", why_timeout()));
    }
    const auto nap = std::min<std::chrono::nanoseconds>(kMaxSleep, deadline - now);
    waiters.fetch_add(1, std::memory_order_seq_cst);
    const uint32_t seen = word.load(std::memory_order_seq_cst);
    if (!ready()) futex_wait(&word, seen, nap);
    waiters.fetch_sub(1, std::memory_order_seq_cst);
  }
}

void Channel::transmit(const at::Tensor& host, int dst, int tag, const ChannelMessage& message) {
  const Ring r = ring(rank_, dst);
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  const uint64_t seq = ++sent_[dst];
  const uint64_t total = static_cast<uint64_t>(host.numel()) * host.element_size();
  const char* data = total > 0 ? static_cast<const char*>(host.data_ptr()) : nullptr;
  const uint64_t room = r.chunk_bytes - kChunkHeader;
  uint64_t offset = 0;
  auto has_room = [&] {
    return r.control->head.load(std::memory_order_relaxed) -
               r.control->tail.load(std::memory_order_acquire) <
           kChannelChunks;
  };
  auto why = [&] {
    return concat("rank ", message.peer, " did not receive it (", offset, " of its ", total,
                  " bytes are in the channel, which buffers ", kChannelChunks * room,
                  " bytes). Check that it calls recv for this send (and its log).");
  };
  do {
    wait(r.control->tail, r.control->tail_waiters, has_room, dst, deadline, message, why);
    const uint32_t head = r.control->head.load(std::memory_order_relaxed);
    char* chunk = r.chunk(head);
    const uint64_t len = std::min(room, total - offset);
    const ChunkHeader h{seq, offset, len, total, host.numel(), tag,
                        static_cast<int32_t>(host.scalar_type())};
    std::memcpy(chunk, &h, sizeof(h));
    if (len > 0) std::memcpy(chunk + kChunkHeader, data + offset, len);
    r.control->head.store(head + 1, std::memory_order_seq_cst);
    if (r.control->head_waiters.load(std::memory_order_seq_cst) != 0) {
      futex_wake_all(&r.control->head);
    }
    offset += len;
  } while (offset < total);
}

void Channel::receive(const at::Tensor& host, int src, int tag, const ChannelMessage& message) {
  (void)tag;  // checked by message.mismatch
  const Ring r = ring(src, rank_);
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  uint64_t got = 0, total = 0;
  bool started = false;
  auto has_chunk = [&] {
    return r.control->head.load(std::memory_order_acquire) !=
           r.control->tail.load(std::memory_order_relaxed);
  };
  auto why = [&] {
    return started ? concat("rank ", message.peer, " sent ", got, " of the message's ", total,
                            " bytes, then nothing. Check rank ", message.peer, "'s log.")
                   : concat("rank ", message.peer, " sent nothing. Check that it calls send "
                            "for this recv (and its log).");
  };
  auto next = [&] {
    wait(r.control->head, r.control->head_waiters, has_chunk, src, deadline, message, why);
    ChunkHeader h;
    std::memcpy(&h, r.chunk(r.control->tail.load(std::memory_order_relaxed)), sizeof(h));
    // The header comes from another process: bound every size before it is used.
    const uint64_t room = r.chunk_bytes - kChunkHeader;
    if (h.len > room || h.offset > h.total || h.len > h.total - h.offset) {
      throw CommError(concat(message.what, ": rank ", message.peer, " wrote a corrupt chunk "
                             "header (payload ", h.len, " bytes at offset ", h.offset, " of a ",
                             h.total, "-byte message; a chunk holds ", room, "). Do all ranks "
                             "run the same lockstep build? The channel from rank ",
                             message.peer, " cannot be used any more."));
    }
    return h;
  };
  auto release = [&] {
    r.control->tail.store(r.control->tail.load(std::memory_order_relaxed) + 1,
                          std::memory_order_seq_cst);
    if (r.control->tail_waiters.load(std::memory_order_seq_cst) != 0) {
      futex_wake_all(&r.control->tail);
    }
  };
  ChunkHeader h = next();
  while (h.offset != 0) {  // the rest of a message an earlier recv gave up on
    release();
    h = next();
  }
  const std::string wrong = message.mismatch ? message.mismatch(h.tag, h.dtype, h.numel) : "";
  const uint64_t bytes = static_cast<uint64_t>(host.numel()) * host.element_size();
  if (wrong.empty() && h.total != bytes) {
    throw CommError(concat(message.what, ": rank ", message.peer, " sent a message of ",
                           h.total, " bytes whose header describes the ", bytes, " bytes "
                           "expected: a corrupt header. Do all ranks run the same lockstep "
                           "build? The channel from rank ", message.peer,
                           " cannot be used any more."));
  }
  char* out = wrong.empty() && bytes > 0 ? static_cast<char*>(host.data_ptr()) : nullptr;
  const uint64_t seq = h.seq;
  total = h.total;
  started = true;
  while (true) {
    if (out != nullptr && h.len > 0) {
      std::memcpy(out + h.offset, r.chunk(r.control->tail.load()) + kChunkHeader, h.len);
    }
    got += h.len;
    release();
    if (got >= total) break;
    h = next();
    if (h.seq != seq || h.offset != got) {
      throw CommError(concat(message.what, ": rank ", message.peer, " abandoned the message "
                             "after ", got, " of its ", total, " bytes (its send failed or timed "
                             "out) and sent another; the tensor holds part of it. Check rank ",
                             message.peer, "'s log."));
    }
  }
  if (!wrong.empty()) throw InvalidArgument(wrong);
}

}  // namespace shm
}  // namespace lockstep
