// lockstep-p2p-bench: bandwidth of send / recv between two ranks, threads of one process, on
// the shared-memory channel (shm, one host), through the store (hier with two emulated
// hosts: ranks on different hosts exchange messages through the rendezvous store, here
// lockstep's TCP store on loopback) and over Gloo (loopback).
//
//   lockstep-p2p-bench [mib=64] [repeats=5]
//
// Each repeat: a barrier, then rank 0 sends `mib` MiB of float32 to rank 1 and rank 1 receives
// them; the time is from the barrier to the end of the recv, on rank 1. Reported: the median
// over the repeats (after one warm-up) and the bandwidth it gives. A quick measurement, not a
// benchmark harness: positional arguments, one run.
#include <lockstep/lockstep.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Median seconds of one `mib` MiB message from rank 0 to rank 1 over `transport`.
double run(const std::string& transport, int64_t mib, int repeats) {
  const auto timeout = std::chrono::seconds(120);
  auto server = std::make_shared<lockstep::Store>(
      lockstep::Store::tcp("127.0.0.1", 0, /*is_server=*/true, timeout));
  auto client = std::make_shared<lockstep::Store>(
      lockstep::Store::tcp("127.0.0.1", server->port(), /*is_server=*/false, timeout));
  std::vector<double> seconds;
  std::vector<std::exception_ptr> errors(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto store = r == 0 ? server : client;
        auto options = lockstep::ProcessGroupOptions().timeout(timeout).job_id(
            "p2p-bench-" + std::to_string(getpid()));
        lockstep::ProcessGroupPtr pg;
        if (transport == "gloo") {
          pg = lockstep::new_gloo_group(r, 2, store, options);
        } else {
          options.host_id(transport == "shm" ? "A" : (r == 0 ? "A" : "B"));
          pg = lockstep::new_shm_group(r, 2, store, options);
        }
        auto t = r == 0 ? torch::rand({mib << 18}) : torch::zeros({mib << 18});
        for (int i = 0; i <= repeats; ++i) {
          pg->barrier()->wait();
          const auto t0 = std::chrono::steady_clock::now();
          if (r == 0) {
            pg->send(t, 1, i)->wait();
          } else {
            pg->recv(t, 0, i)->wait();
            const std::chrono::duration<double> d = std::chrono::steady_clock::now() - t0;
            if (i > 0) seconds.push_back(d.count());
          }
        }
        pg->barrier()->wait();
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
  return median(seconds);
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t mib = argc > 1 ? std::atoll(argv[1]) : 64;
  const int repeats = argc > 2 ? std::atoi(argv[2]) : 5;
  try {
    std::printf("%lld MiB from rank 0 to rank 1, median of %d\n", static_cast<long long>(mib),
                repeats);
    for (const char* transport : {"shm", "store", "gloo"}) {
      const double s = run(transport, mib, repeats);
      std::printf("%-6s %9.1f ms %9.1f MiB/s\n", transport, s * 1e3, mib / s);
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lockstep-p2p-bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
