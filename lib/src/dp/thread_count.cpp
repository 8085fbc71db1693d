// Thread-count control (see thread_count.h).
#include "dp/thread_count.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>

namespace lockstep {
namespace dp {

ThreadCountFns::ThreadCountFns(const char* set_name, const char* get_name) {
  set = reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, set_name));
  get = reinterpret_cast<GetFn>(dlsym(RTLD_DEFAULT, get_name));
  if (!set || !get) set = nullptr, get = nullptr;
}

ThreadCountScope::ThreadCountScope(const ThreadCountFns* fns, int threads) {
  if (!fns || !fns->set) return;
  const int current = fns->get();
  if (current == threads) return;
  fns->set(threads);
  restore_ = fns->set;
  saved_ = current;
}

ThreadCountScope::~ThreadCountScope() {
  if (restore_) restore_(saved_);
}

// OpenBLAS's process-wide thread count (absent: both null).
ThreadCountFns& blas_threads() {
  static ThreadCountFns blas("openblas_set_num_threads", "openblas_get_num_threads");
  return blas;
}

// The calling thread's intra-op thread count (Note [Caller's intra-op threads]): its own
// OpenMP count under OpenMP builds, else ATen's.
const ThreadCountFns& caller_threads() {
#if AT_PARALLEL_OPENMP
  static const ThreadCountFns omp("omp_set_num_threads", "omp_get_max_threads");
  if (omp.set) return omp;
#endif
  static const ThreadCountFns aten(&at::set_num_threads, &at::get_num_threads);
  return aten;
}

}  // namespace dp
}  // namespace lockstep
