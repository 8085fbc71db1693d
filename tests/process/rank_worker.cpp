// A rank for the forked-process tests. Joins the job from the launch environment, then:
//   rank_worker loop N     all-reduce N times (prints "ready" after the first), exit 0
//   rank_worker until F    all-reduce until rank 0 sees file F (a flag every rank reduces),
//                          then print "done <iterations>", exit 0
//   rank_worker slow N MS  all-reduce N times, rank 1 pausing MS ms before each (a loaded
//                          machine's slow rank), then print "done N", exit 0
// Every all-reduce's result is checked: a wrong sum prints "ERROR WrongSum" with exit code 4.
// Any lockstep error is printed as "ERROR <type>: <message>" on stderr with exit code 3.
#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <limits>
#include <iostream>
#include <string>
#include <thread>

#include "lockstep/lockstep.h"

namespace {

const char* type_of(const lockstep::Error& e) {
  if (dynamic_cast<const lockstep::TimeoutError*>(&e)) return "TimeoutError";
  if (dynamic_cast<const lockstep::CommError*>(&e)) return "CommError";
  if (dynamic_cast<const lockstep::InvalidArgument*>(&e)) return "InvalidArgument";
  if (dynamic_cast<const lockstep::StateError*>(&e)) return "StateError";
  return "Error";
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "loop";
  long iterations = argc > 2 ? std::atol(argv[2]) : 10;
  try {
    auto pg = lockstep::init_process_group();
    const bool until = mode == "until";
    const long pause_ms = mode == "slow" && argc > 3 ? std::atol(argv[3]) : 0;
    const std::string stop_file = argc > 2 ? argv[2] : "";
    if (until) iterations = std::numeric_limits<long>::max();
    auto t = torch::ones({1 << 16});
    auto flag = torch::zeros({1});
    const double world = pg->size();
    long i = 0;
    for (; i < iterations; ++i) {
      if (pause_ms > 0 && pg->rank() == 1) {
        std::this_thread::sleep_for(std::chrono::milliseconds(pause_ms));  // load, not sync
      }
      pg->allreduce(t)->wait();
      if (!t.eq(world).all().item<bool>()) {
        std::cerr << "ERROR WrongSum: iteration " << i << " summed to " << t.min().item<double>()
                  << ".." << t.max().item<double>() << ", expected " << world << std::endl;
        return 4;
      }
      t.fill_(1.0);
      if (i == 0) std::cout << "ready" << std::endl;
      if (until) {
        flag.fill_(pg->rank() == 0 && std::ifstream(stop_file).good() ? 1.0 : 0.0);
        pg->allreduce(flag)->wait();
        if (flag.item<double>() > 0) break;
      }
    }
    std::cout << "done " << i << std::endl;
    return 0;
  } catch (const lockstep::Error& e) {
    std::cerr << "ERROR " << type_of(e) << ": " << e.what() << std::endl;
    return 3;
  }
}
