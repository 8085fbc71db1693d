// lockstep-zero-bench: per-rank optimizer state and step time of DDP + Adam against DDP +
// ZeroRedundancyOptimizer(Adam), ranks as threads of one process over Gloo (loopback).
//
//   lockstep-zero-bench [world=2] [steps=20] [width=1024] [layers=8]
//
// The model is `layers` x Linear(width, width) with ReLU; each rank trains on its own random
// batch of 32. Reported: the largest per-rank optimizer state (bytes of the state tensors, step
// counts aside, as train::add_optimizer writes them) and rank 0's median time of step() and of a
// whole iteration (zero_grad, forward, backward, step) after 3 warm-up iterations. A quick
// measurement, not a benchmark harness: positional arguments, one run, no repeats.
#include <lockstep/lockstep.h>
#include <lockstep/train/checkpoint.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Result {
  int64_t state_bytes = 0;
  double step_ms = 0;
  double iteration_ms = 0;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

int64_t state_bytes(torch::optim::Optimizer& opt) {
  lockstep::train::Checkpoint ckpt;
  lockstep::train::add_optimizer(ckpt, opt);
  int64_t n = 0;
  for (const auto& kv : ckpt.tensors) {
    const auto& k = kv.first;
    if (k.size() < 5 || k.compare(k.size() - 5, 5, ".step") != 0) n += kv.second.nbytes();
  }
  return n;
}

Result run(bool zero, int world, int steps, int64_t width, int layers) {
  auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
  std::vector<Result> results(world);
  std::vector<std::exception_ptr> errors(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto pg = lockstep::new_gloo_group(r, world, store);
        auto net = torch::nn::Sequential();
        for (int l = 0; l < layers; ++l) {
          net->push_back(torch::nn::Linear(width, width));
          net->push_back(torch::nn::ReLU());
        }
        lockstep::DistributedDataParallel ddp(net.ptr(), pg);
        const auto adam = torch::optim::AdamOptions(1e-4);
        std::unique_ptr<torch::optim::Optimizer> opt;
        if (zero) {
          opt = std::make_unique<lockstep::ZeroRedundancyOptimizer>(
              ddp->parameters(), pg, lockstep::optimizer_factory<torch::optim::Adam>(adam));
        } else {
          opt = std::make_unique<torch::optim::Adam>(ddp->parameters(), adam);
        }
        auto x = torch::randn({32, width}), y = torch::randn({32, width});
        std::vector<double> step_ms, iteration_ms;
        using clock = std::chrono::steady_clock;
        auto ms = [](clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); };
        for (int t = 0; t < steps + 3; ++t) {
          const auto start = clock::now();
          opt->zero_grad();
          torch::mse_loss(ddp->forward(x), y).backward();
          const auto before_step = clock::now();
          opt->step();
          const auto end = clock::now();
          if (t < 3) continue;
          step_ms.push_back(ms(end - before_step));
          iteration_ms.push_back(ms(end - start));
        }
        auto& local = zero ? dynamic_cast<lockstep::ZeroRedundancyOptimizer&>(*opt).local_optimizer()
                           : *opt;
        results[r] = {state_bytes(local), median(step_ms), median(iteration_ms)};
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
  Result out = results[0];
  for (const auto& r : results) out.state_bytes = std::max(out.state_bytes, r.state_bytes);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const int world = argc > 1 ? std::atoi(argv[1]) : 2;
  const int steps = argc > 2 ? std::atoi(argv[2]) : 20;
  const int64_t width = argc > 3 ? std::atoll(argv[3]) : 1024;
  const int layers = argc > 4 ? std::atoi(argv[4]) : 8;
  if (world < 1 || steps < 1 || width < 1 || layers < 1) {
    std::cerr << "usage: lockstep-zero-bench [world>=1] [steps>=1] [width>=1] [layers>=1]\n";
    return 2;
  }
  torch::set_num_threads(1);
  try {
    const double params = static_cast<double>(layers) * (width * width + width);
    std::printf("world %d, %d x Linear(%lld, %lld): %.2fM parameters (%.1f MB float32), Adam, "
                "%d timed steps, ranks as threads over Gloo\n",
                world, layers, static_cast<long long>(width), static_cast<long long>(width),
                params / 1e6, params * 4 / 1e6, steps);
    std::printf("%-20s %22s %16s %20s\n", "", "state MB/rank (max)", "step() ms (med)",
                "iteration ms (med)");
    for (bool zero : {false, true}) {
      const Result r = run(zero, world, steps, width, layers);
      std::printf("%-20s %22.2f %16.2f %20.2f\n", zero ? "DDP + ZeRO(Adam)" : "DDP + Adam",
                  r.state_bytes / 1e6, r.step_ms, r.iteration_ms);
    }
  } catch (const std::exception& e) {
    std::cerr << "lockstep-zero-bench: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
