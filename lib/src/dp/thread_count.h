#pragma once
// Thread-count control for DataParallel's replica threads: the caller's intra-op threads and
// OpenBLAS's process-wide count, set for a step and restored after it. Internal.
//
// Note [Caller's intra-op threads]
// at::set_num_threads is not cheap to toggle: besides the calling thread's OpenMP count it
// resizes LibTorch's process-wide pthreadpool (QNNPACK/XNNPACK) by destroying and re-creating
// it, which measured ~8 ms for a 1 -> 2 round trip on this 2-core machine: more than a whole
// small-MLP step. So the per-step scope on the caller's thread (caller_threads) sets only the
// thread's own OpenMP count (omp_set_num_threads, what at::get_num_threads and at::parallel_for
// read under OpenMP builds); other ATen parallel back-ends fall back to at::set_num_threads.
// OpenBLAS's own thread count is process-wide and not touched by at::set_num_threads: see
// Note [OpenBLAS and replica threads].
//
// Note [OpenBLAS and replica threads]
// LibTorch's CPU matmuls call sgemm/dgemm from the system BLAS, on Debian usually OpenBLAS
// (libopenblas0-pthread). Its thread count (blas_cpu_number) is one per process, read from
// OPENBLAS_NUM_THREADS / GOTO_NUM_THREADS / OMP_NUM_THREADS when the library loads, changed
// only by openblas_set_num_threads. When it is above 1, every GEMM large enough to thread
// (m*n*k above 262144) goes through the threaded level-3 driver, which in the pthread build
// holds one process-wide mutex (level3_lock in driver/level3/level3_thread.c, 0.3.x) for the
// whole call and hands parts to one shared pool of helper threads. Replica threads calling
// GEMMs concurrently would then run them one at a time, each spread over the same helpers:
// no parallelism between replicas at all. With the count at 1 the interface calls the
// single-threaded driver directly on the calling thread, without that lock (perf on the
// MLP shows only sgemm_nn/sgemm_tn, no thread server, in each replica thread). So with
// `scope_blas_threads` (the default) a step on CPU replicas sets the count to
// threads_per_replica through openblas_set_num_threads and restores it afterwards
// (blas_for_step; both functions resolved with dlsym, so lockstep neither links nor needs
// OpenBLAS). Two
// limits remain: with threads_per_replica > 1 the replicas' threaded GEMMs still serialise on
// that lock (give each replica one thread, or use more replicas); and OpenBLAS's helper
// threads keep polling (sched_yield) for about 2^28 cycles (~0.1 s) after the last threaded
// GEMM before they sleep, so a program that runs multi-threaded BLAS work (evaluation with
// intra-op threads) just before DataParallel steps loses part of a core for that long; set
// OPENBLAS_THREAD_TIMEOUT=4 (before the program starts) to make them sleep almost at once,
// or OMP_NUM_THREADS=1 when all the BLAS work happens inside DataParallel.

namespace lockstep {
namespace dp {

// A process-wide thread-count setter and getter resolved through dlsym, so that lockstep
// depends on neither OpenBLAS nor OpenMP: both found, or both null.
struct ThreadCountFns {
  using SetFn = void (*)(int);
  using GetFn = int (*)();
  SetFn set = nullptr;
  GetFn get = nullptr;
  /// Resolves `set_name` and `get_name` with dlsym.
  ThreadCountFns(const char* set_name, const char* get_name);
  ThreadCountFns(SetFn set_fn, GetFn get_fn) : set(set_fn), get(get_fn) {}
};

// Sets a thread count through `fns` (nullptr, or functions not found: nothing) for the
// scope's lifetime, then restores it.
class ThreadCountScope {
 public:
  ThreadCountScope(const ThreadCountFns* fns, int threads);
  ~ThreadCountScope();
  ThreadCountScope(const ThreadCountScope&) = delete;
  ThreadCountScope& operator=(const ThreadCountScope&) = delete;

 private:
  ThreadCountFns::SetFn restore_ = nullptr;
  int saved_ = 0;
};

/// OpenBLAS's process-wide thread count (absent: both null).
ThreadCountFns& blas_threads();

/// The calling thread's intra-op thread count (Note [Caller's intra-op threads]): its own
/// OpenMP count under OpenMP builds, else ATen's.
const ThreadCountFns& caller_threads();

}  // namespace dp
}  // namespace lockstep
