#pragma once
// Runs one function per rank on its own thread and reports each rank's failure with its rank.
#include <gtest/gtest.h>

#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "lockstep/process_group.h"
#include "lockstep/store.h"

namespace lockstep_test {

/// Runs fn(rank) for rank in [0, world) on threads; rethrows nothing, but records every rank's
/// exception as a test failure naming the rank.
inline void run_ranks(int world, const std::function<void(int)>& fn) {
  std::vector<std::exception_ptr> errors(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(r);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < world; ++r) {
    if (!errors[r]) continue;
    try {
      std::rethrow_exception(errors[r]);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "rank " << r << "/" << world << " threw: " << e.what();
    }
  }
}

/// Creates `world` groups over one in-process store, one per thread, and runs fn(group) on
/// each rank's thread: Gloo groups, or shared-memory ones when options.transport() is "shm".
inline void with_groups(int world,
                        const std::function<void(const lockstep::ProcessGroupPtr&)>& fn,
                        lockstep::ProcessGroupOptions options = lockstep::ProcessGroupOptions()) {
  auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
  if (options.timeout().count() == 0) options.timeout(std::chrono::seconds(20));
  if (options.rendezvous_timeout().count() == 0) options.rendezvous_timeout(std::chrono::seconds(20));
  run_ranks(world, [&](int r) {
    auto pg = options.transport() == "shm" ? lockstep::new_shm_group(r, world, store, options)
                                           : lockstep::new_gloo_group(r, world, store, options);
    fn(pg);
  });
}

}  // namespace lockstep_test
