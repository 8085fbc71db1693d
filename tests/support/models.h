#pragma once
// Small modules shared by the DDP tests.
#include <torch/torch.h>

namespace lockstep_test {

/// Linear(in, hidden), ReLU, Linear(hidden, out): the DDP tests' small model.
struct Mlp : torch::nn::Module {
  torch::nn::Linear l1{nullptr}, l2{nullptr};
  explicit Mlp(int64_t in = 6, int64_t hidden = 16, int64_t out = 3) {
    l1 = register_module("l1", torch::nn::Linear(in, hidden));
    l2 = register_module("l2", torch::nn::Linear(hidden, out));
  }
  torch::Tensor forward(torch::Tensor x) { return l2(torch::relu(l1(x))); }
};

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
