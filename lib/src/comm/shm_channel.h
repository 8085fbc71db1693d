#pragma once
// The shared-memory channel that carries send / recv among the ranks of one host (Note
// [Shared-memory channel] in shm_channel.cpp). Internal to comm/: the shm group owns one, the
// hierarchical group uses its host group's for ranks on the same host.

#include <ATen/core/Tensor.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "comm/serial_executor.h"
#include "comm/shm_segment.h"
#include "lockstep/process_group.h"

namespace lockstep {
namespace shm {

/// Bytes of one chunk of a pair's ring in a group of `size` ranks (header included).
size_t channel_chunk_bytes(int size);
/// Chunks in each pair's ring.
constexpr uint32_t kChannelChunks = 4;
/// The largest group that gets a channel (Note [Shared-memory channel]): its rings are
/// reserved for every ordered pair up front, W(W-1) of them, so a larger group sends through
/// the store instead of reserving hundreds of MiB of /dev/shm it may never use.
constexpr int kChannelMaxRanks = 16;

/// One send or recv as its caller names it (the hierarchical group numbers ranks globally,
/// its host group locally).
struct ChannelMessage {
  std::string what;  ///< e.g. "[rank 1/2] recv from rank 0 (tag 2, 3 x Float) via shm"
  int peer = 0;      ///< the peer's rank in the caller's numbering
  /// recv only: the mismatch message for what was sent (tag, dtype, numel), "" on a match.
  std::function<std::string(int, int64_t, int64_t)> mismatch;
};

class Channel {
 public:
  /// Collective over the group: maps the channel's segment (rank 0 creates it). `spin`: how
  /// long a wait polls before it sleeps (Note [Spinning only on spare cores]). `segment` and
  /// `peers` (indexed by rank; null for this rank) are the owning group's and outlive this.
  Channel(int rank, int size, Store& store, const std::string& job_id,
          std::chrono::milliseconds rendezvous_timeout, std::chrono::milliseconds timeout,
          std::chrono::microseconds spin, Segment& segment,
          const std::vector<std::unique_ptr<PeerProcess>>& peers);
  /// Fails what is still waiting (StateError) and joins the channel's threads.
  ~Channel();
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  /// Sends `tensor` (contiguous, CPU or CUDA) to rank `dst` of this group. Asynchronous: the
  /// Work completes once the last chunk is in the ring (the receiver may not have read it).
  WorkPtr send(const at::Tensor& tensor, int dst, int tag, ChannelMessage message);
  /// Receives the next message from rank `src` into `tensor` (contiguous, CPU or CUDA).
  WorkPtr recv(at::Tensor& tensor, int src, int tag, ChannelMessage message);

 private:
  struct Ring;
  Ring ring(int src, int dst);
  comm::SerialExecutor& executor(std::map<int, std::unique_ptr<comm::SerialExecutor>>& of,
                                 int peer);
  void transmit(const at::Tensor& host, int dst, int tag, const ChannelMessage& message);
  void receive(const at::Tensor& host, int src, int tag, const ChannelMessage& message);
  // Waits until `ready()`, bounded by `deadline`; names the peer when it cannot come.
  template <typename Ready>
  void wait(std::atomic<uint32_t>& word, std::atomic<uint32_t>& waiters, Ready&& ready, int peer,
            std::chrono::steady_clock::time_point deadline, const ChannelMessage& message,
            const std::function<std::string()>& why_timeout);

  int rank_, size_;
  std::chrono::milliseconds timeout_;
  Segment& segment_;
  const std::vector<std::unique_ptr<PeerProcess>>& peers_;
  Mapping mapping_;
  size_t chunk_bytes_;
  std::chrono::microseconds spin_;
  std::atomic<bool> stopping_{false};
  std::vector<uint64_t> sent_;  // messages per destination, each touched by its sender thread
  std::mutex executors_mutex_;
  std::map<int, std::unique_ptr<comm::SerialExecutor>> senders_, receivers_;  // last
};

}  // namespace shm
}  // namespace lockstep
