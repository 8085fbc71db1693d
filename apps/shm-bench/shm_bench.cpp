// lockstep-shm-bench: all-reduce latency and bandwidth of the shared-memory transport against
// Gloo over loopback, ranks as forked processes on this machine. One command:
//   lockstep-shm-bench [--world 2] [--min-kib 1] [--max-mib 64] [--reps 20] [--bytes N]
// Prints, per size, the median time of one float32 sum all-reduce (each preceded by a barrier)
// for each transport, the algorithm bandwidth (bytes / median time) and shm's speedup.
#include <ATen/ATen.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "lockstep/errors.h"
#include "lockstep/process_group.h"

namespace {

struct Args {
  int world = 2;
  int64_t min_bytes = 1024;
  int64_t max_bytes = int64_t{64} << 20;
  int reps = 20;
  int64_t bytes = 0;  // one size only, when set
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> long {
      if (i + 1 >= argc) throw lockstep::InvalidArgument("missing value after " + k);
      return std::atol(argv[++i]);
    };
    if (k == "--world") a.world = static_cast<int>(next());
    else if (k == "--min-kib") a.min_bytes = next() * 1024;
    else if (k == "--max-mib") a.max_bytes = next() << 20;
    else if (k == "--reps") a.reps = static_cast<int>(next());
    else if (k == "--bytes") a.bytes = next() / 4 * 4;
    else {
      throw lockstep::InvalidArgument(
          "usage: lockstep-shm-bench [--world 2] [--min-kib 1] [--max-mib 64] [--reps 20] "
          "[--bytes N]; "
          "unknown argument '" + k + "'");
    }
  }
  LOCKSTEP_CHECK(a.world >= 2 && a.reps >= 1 && a.min_bytes >= 4 && a.max_bytes >= a.min_bytes,
                 "Expected --world >= 2, --reps >= 1 and 4 <= min <= max bytes.");
  return a;
}

std::vector<int64_t> sizes(const Args& a) {
  std::vector<int64_t> out;
  if (a.bytes > 0) return {a.bytes};
  for (int64_t b = a.min_bytes; b <= a.max_bytes; b *= 4) out.push_back(b);
  return out;
}

// One rank: medians in microseconds per size, written by rank 0 to `result`.
int rank_main(const Args& a, const std::string& dir, const std::string& transport, int rank) {
  auto pg = lockstep::init_process_group(lockstep::ProcessGroupOptions()
                                             .init_method("file://" + dir + "/store-" + transport)
                                             .rank(rank)
                                             .world_size(a.world)
                                             .job_id("shm-bench-" + std::to_string(getppid()))
                                             .transport(transport)
                                             .timeout(std::chrono::seconds(120)));
  std::ofstream out;
  if (rank == 0) out.open(dir + "/" + transport + ".txt");
  for (int64_t bytes : sizes(a)) {
    auto t = at::rand({bytes / 4});
    int reps = static_cast<int>(std::clamp<int64_t>((int64_t{512} << 20) / bytes, 3, a.reps));
    std::vector<double> us;
    for (int i = -2; i < reps; ++i) {
      pg->barrier()->wait();
      auto start = std::chrono::steady_clock::now();
      pg->allreduce(t)->wait();
      double d = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
      if (i >= 0) us.push_back(d);
    }
    std::sort(us.begin(), us.end());
    if (rank == 0) out << bytes << " " << us[us.size() / 2] << " " << pg->backend() << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Args a = parse(argc, argv);
    char tmpl[] = "/tmp/lockstep-shm-bench-XXXXXX";
    std::string dir = mkdtemp(tmpl);
    const std::vector<std::string> transports = {"shm", "gloo"};
    for (const auto& transport : transports) {
      std::vector<pid_t> pids;
      for (int r = 0; r < a.world; ++r) {
        pid_t pid = fork();
        if (pid == 0) {
          int code = 1;
          try {
            code = rank_main(a, dir, transport, r);
          } catch (const std::exception& e) {
            fprintf(stderr, "rank %d (%s): %s\n", r, transport.c_str(), e.what());
          }
          _exit(code);
        }
        pids.push_back(pid);
      }
      bool ok = true;
      for (pid_t p : pids) {
        int st = 0;
        waitpid(p, &st, 0);
        ok = ok && WIFEXITED(st) && WEXITSTATUS(st) == 0;
      }
      if (!ok) {
        fprintf(stderr, "the %s run failed\n", transport.c_str());
        std::filesystem::remove_all(dir);
        return 1;
      }
    }
    std::map<std::string, std::map<int64_t, double>> median;
    std::map<std::string, std::string> backend;
    for (const auto& transport : transports) {
      std::ifstream in(dir + "/" + transport + ".txt");
      int64_t bytes;
      double us;
      std::string be;
      while (in >> bytes >> us >> be) {
        median[transport][bytes] = us;
        backend[transport] = be;
      }
    }
    std::filesystem::remove_all(dir);
    printf("all-reduce, float32 sum, %d processes on one host; median of up to %d runs\n",
           a.world, a.reps);
    printf("%10s | %12s %10s | %12s %10s | %7s\n", "bytes", (backend["shm"] + " us").c_str(),
           "GB/s", (backend["gloo"] + " us").c_str(), "GB/s", "speedup");
    for (int64_t bytes : sizes(a)) {
      double s = median["shm"][bytes], g = median["gloo"][bytes];
      printf("%10lld | %12.1f %10.2f | %12.1f %10.2f | %6.1fx\n", static_cast<long long>(bytes),
             s, bytes / s / 1e3, g, bytes / g / 1e3, g / s);
    }
    return 0;
  } catch (const std::exception& e) {
    fprintf(stderr, "lockstep-shm-bench: %s\n", e.what());
    return 2;
  }
}
