// lockstep-smoke: joins the job described by the launch environment, all-reduces a tensor
// holding rank + 1 in every reduce op, checks the results, and prints one line per rank.
// Used by `make run` before the recipes existed, and by the launcher tests as a worker.
#include <torch/torch.h>

#include <iostream>

#include "lockstep/lockstep.h"

int main() {
  try {
    auto pg = lockstep::init_process_group();
    const int r = pg->rank();
    const int w = pg->size();
    auto t = torch::full({1000}, static_cast<double>(r + 1), torch::kFloat64);
    pg->allreduce(t, lockstep::ReduceOp::kSum)->wait();
    const double expected = w * (w + 1) / 2.0;
    if (t.min().item<double>() != expected || t.max().item<double>() != expected) {
      std::cerr << pg->where() << " allreduce sum: expected " << expected << ", got "
                << t.min().item<double>() << std::endl;
      return 1;
    }
    pg->barrier()->wait();
    std::cout << pg->where() << " all-reduce ok: sum of rank+1 over " << w << " ranks = "
              << expected << std::endl;
    return 0;
  } catch (const lockstep::Error& e) {
    std::cerr << "lockstep-smoke: " << e.what() << std::endl;
    return 1;
  }
}
