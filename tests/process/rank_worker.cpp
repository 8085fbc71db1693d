// A rank for the forked-process tests. Joins the job from the launch environment, then:
//   rank_worker loop N     all-reduce N times (prints "ready" after the first), exit 0
// Any lockstep error is printed as "ERROR <type>: <message>" on stderr with exit code 3.
#include <torch/torch.h>

#include <cstdlib>
#include <iostream>
#include <string>

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
    auto t = torch::ones({1 << 16});
    for (long i = 0; i < iterations; ++i) {
      pg->allreduce(t)->wait();
      t.fill_(1.0);
      if (i == 0) std::cout << "ready" << std::endl;
    }
    std::cout << "done" << std::endl;
    return 0;
  } catch (const lockstep::Error& e) {
    std::cerr << "ERROR " << type_of(e) << ": " << e.what() << std::endl;
    return 3;
  }
}
