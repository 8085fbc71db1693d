#pragma once
// Small modules shared by the DDP tests.
#include <torch/torch.h>

namespace lockstep_test {

/// Linear(3, 3) then BatchNorm1d(3): parameters and buffers (running statistics).
struct BnNet : torch::nn::Module {
  torch::nn::Linear fc{nullptr};
  torch::nn::BatchNorm1d bn{nullptr};
  BnNet() {
    fc = register_module("fc", torch::nn::Linear(3, 3));
    bn = register_module("bn", torch::nn::BatchNorm1d(3));
  }
  torch::Tensor forward(torch::Tensor x) { return bn(fc(x)); }
};

}  // namespace lockstep_test
