#pragma once
// Spin-then-block waiting: the one polling loop that the shared-memory group, the thread group
// and DataParallel's replica threads use before they block. Internal.
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
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace lockstep {
namespace detail {

/// Tells the CPU this thread is spinning (x86 pause, ARM yield).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

/// Polls `ready()` for at most `budget`, pausing the CPU between polls, and calls `every()`
/// once per 64 polls (to check for an abort: it may throw). True as soon as `ready()` is;
/// false when the budget ran out (at once for a zero budget), so the caller blocks.
template <typename Ready, typename Every>
bool spin_until(Ready&& ready, std::chrono::microseconds budget, Every&& every) {
  if (ready()) return true;
  if (budget.count() <= 0) return false;
  const auto until = std::chrono::steady_clock::now() + budget;
  for (int i = 1;; ++i) {
    cpu_relax();
    if (ready()) return true;
    if ((i & 63) == 0) {
      every();
      if (std::chrono::steady_clock::now() > until) return false;
    }
  }
}

/// spin_until with nothing to check between polls.
template <typename Ready>
bool spin_until(Ready&& ready, std::chrono::microseconds budget) {
  return spin_until(std::forward<Ready>(ready), budget, [] {});
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
    if (spin_until(ready, spin_)) return;
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

}  // namespace detail
}  // namespace lockstep
