// An existing LibTorch application that embeds lockstep: a single-rank job all-reduces a
// tensor and trains a Linear layer one step. Built by ctest through find_package(lockstep)
// and through add_subdirectory().
#include <lockstep/lockstep.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  try {
    auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
    auto pg = lockstep::new_gloo_group(0, 1, store);
    auto t = torch::arange(8, torch::kFloat32);
    pg->allreduce(t, lockstep::ReduceOp::kAvg)->wait();
    if (!torch::equal(t, torch::arange(8, torch::kFloat32))) {
      std::cerr << "consumer: unexpected all-reduce result" << std::endl;
      return 1;
    }
    torch::nn::Linear net(4, 2);
    torch::optim::SGD opt(net->parameters(), 0.1);
    auto loss = net->forward(torch::ones({3, 4})).sum();
    loss.backward();
    opt.step();
    std::cout << "consumer ok: " << pg->where() << " loss " << loss.item<float>() << std::endl;
    return 0;
  } catch (const lockstep::Error& e) {
    std::cerr << "consumer: " << e.what() << std::endl;
    return 1;
  }
}
