#pragma once
// Spin-then-block waiting for DataParallel's replica threads. Internal.
//
// Note [Spin before blocking]
// A DataParallel step hands work between its threads several times (start, the barrier after
// forward, gradient pieces becoming ready, the end of the step). Blocking on a condition
// variable costs a futex sleep and a wake-up (tens of microseconds on a busy VM, the
// scheduler's latency besides), which is a visible share of a small model's step. When every
// replica thread has a core of its own (replicas <= hardware threads), the waiter's core
// would idle anyway, so `SpinWait::wait` first polls the condition for a short time (pausing
// the CPU between polls) and only then blocks. With more replicas than cores it blocks at
// once: a spinning waiter would take the core from the thread it waits for. Whoever makes the
// condition true calls `notify()` after publishing it (atomics with release order); notify
// costs a futex call only when a waiter is blocked.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace lockstep {
namespace dp {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

/// One condition, many waiters: see Note [Spin before blocking].
class SpinWait {
 public:
  /// `spin`: how long wait() polls before blocking (zero: block at once).
  explicit SpinWait(std::chrono::microseconds spin = std::chrono::microseconds(0)) : spin_(spin) {}

  void set_spin(std::chrono::microseconds spin) { spin_ = spin; }

  /// Returns once `ready()` is true. `ready` must only read atomics (it runs unlocked while
  /// spinning, and under the internal mutex while blocking).
  template <typename Ready>
  void wait(Ready&& ready) {
    if (ready()) return;
    if (spin_.count() > 0) {
      const auto until = std::chrono::steady_clock::now() + spin_;
      for (int i = 1;; ++i) {
        cpu_relax();
        if (ready()) return;
        if ((i & 63) == 0 && std::chrono::steady_clock::now() > until) break;
      }
    }
    std::unique_lock<std::mutex> lock(mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    cv_.wait(lock, [&] { return ready(); });
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }

  /// Wakes blocked waiters after the condition changed (call after publishing the change).
  void notify() {
    // Pairs with the seq_cst increment in wait(): either the waiter sees the change, or this
    // sees the waiter (Dekker), even if the change was published with a weaker order.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) == 0) return;
    { std::lock_guard<std::mutex> lock(mutex_); }
    cv_.notify_all();
  }

 private:
  std::chrono::microseconds spin_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::atomic<int> sleepers_{0};
};

}  // namespace dp
}  // namespace lockstep
