#pragma once
/// \file
/// The benchmark models, defined layer for layer like `apps/bench/torch_ddp_bench.py` so that
/// lockstep and PyTorch's DDP run the same parameter shapes in the same registration order
/// (which decides the gradient buckets). Initialisation is whatever the frontend does: it does
/// not matter for timing. Header-only so that recipes and tests can reuse the models. The
/// one list of their names is in scenarios.h (`all_model_names()`); the benchmark's smoke test
/// builds every one of them.
///
/// | name        | layers                                                    | parameters |
/// |-------------|-----------------------------------------------------------|-----------:|
/// | mlp         | Linear(784,1024) ReLU Linear(1024,1024) ReLU Linear(1024,10) | 1,863,690 |
/// | small_mlp   | Linear(784,128) ReLU Linear(128,128) ReLU Linear(128,10)  |   118,282 |
/// | deep_mlp    | 48 x [Linear(256,256) ReLU] (no activation after the last)  | 3,158,016 |
/// | cnn         | Conv(1,32,3) ReLU MaxPool2 Conv(32,64,3) ReLU MaxPool2      |   225,034 |
/// |             | Linear(1600,128) ReLU Linear(128,10)  (Fashion-MNIST 28x28) |           |
/// | transformer | 2 x TransformerEncoderLayer(d=128, heads=4, ff=512, no dropout), |  ~400,000 |
/// |             | mean over the sequence, Linear(128,10); input (batch, seq=32, 128) |     |
/// | wide        | Linear(1024,4096) 3 x Linear(4096,4096) Linear(4096,1000), ReLU between | 58,639,336 |
/// | deep        | 48 x Linear(1024,1024) Linear(1024,1000), ReLU between (98 tensors) | 51,405,800 |
///
/// wide and deep are issue 18's GPU models (batch 512 and 256 by default); they run only when
/// named, and by default with --device cuda.
#include <torch/torch.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace lockstep {
namespace bench {

/// Linear(784,h) ReLU Linear(h,h) ReLU Linear(h,10). h = 1024 (mlp): about 1.86M
/// parameters, 7.5 MB of float32 gradients; h = 128 (small_mlp): 118K. Input (batch, 784).
struct MlpImpl : torch::nn::Module {
  explicit MlpImpl(int64_t hidden = 1024)
      : fc1(register_module("fc1", torch::nn::Linear(784, hidden))),
        fc2(register_module("fc2", torch::nn::Linear(hidden, hidden))),
        fc3(register_module("fc3", torch::nn::Linear(hidden, 10))) {}
  torch::Tensor forward(torch::Tensor x) {
    return fc3(torch::relu(fc2(torch::relu(fc1(x)))));
  }
  torch::nn::Linear fc1, fc2, fc3;
};
TORCH_MODULE(Mlp);

/// Linear layers of widths sizes[0] -> sizes[1] -> ... with ReLU between (none after the
/// last), registered fc0, fc1, ...: the deep MLP (48 x Linear(256,256): many small tensors,
/// the case where one all-reduce per parameter hurts most) and issue 18's wide and deep GPU
/// models. Input (batch, sizes[0]).
struct LinearStackImpl : torch::nn::Module {
  explicit LinearStackImpl(const std::vector<int64_t>& sizes) {
    for (size_t i = 0; i + 1 < sizes.size(); ++i) {
      layers.push_back(register_module("fc" + std::to_string(i),
                                       torch::nn::Linear(sizes[i], sizes[i + 1])));
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    for (size_t i = 0; i < layers.size(); ++i) {
      x = layers[i](x);
      if (i + 1 < layers.size()) x = torch::relu(x);
    }
    return x;
  }
  std::vector<torch::nn::Linear> layers;
};
TORCH_MODULE(LinearStack);

/// The layer widths of the wide and deep GPU models.
inline std::vector<int64_t> linear_stack_sizes(const std::string& name) {
  if (name == "wide") return {1024, 4096, 4096, 4096, 4096, 1000};
  std::vector<int64_t> v(49, 1024);  // deep: 48 x Linear(1024,1024), then the head
  v.push_back(1000);
  return v;
}

/// The two-convolution Fashion-MNIST CNN. Input (batch, 1, 28, 28).
struct FashionCnnImpl : torch::nn::Module {
  FashionCnnImpl()
      : conv1(register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 32, 3)))),
        conv2(register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 3)))),
        fc1(register_module("fc1", torch::nn::Linear(64 * 5 * 5, 128))),
        fc2(register_module("fc2", torch::nn::Linear(128, 10))) {}
  torch::Tensor forward(torch::Tensor x) {
    x = torch::max_pool2d(torch::relu(conv1(x)), 2);
    x = torch::max_pool2d(torch::relu(conv2(x)), 2);
    x = torch::relu(fc1(x.flatten(1)));
    return fc2(x);
  }
  torch::nn::Conv2d conv1, conv2;
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(FashionCnn);

/// A small Transformer encoder stack. Input (batch, seq, d_model), batch first so that
/// DataParallel can split it along dimension 0; the layers run on (seq, batch, d_model)
/// (LibTorch 1.13 has no batch_first). Output (batch, 10) from the mean over the sequence.
struct TransformerStackImpl : torch::nn::Module {
  explicit TransformerStackImpl(int64_t layers = 2, int64_t d_model = 128, int64_t heads = 4,
                                int64_t ff = 512) {
    for (int64_t i = 0; i < layers; ++i) {
      blocks.push_back(register_module(
          "layer" + std::to_string(i),
          torch::nn::TransformerEncoderLayer(
              torch::nn::TransformerEncoderLayerOptions(d_model, heads)
                  .dim_feedforward(ff)
                  .dropout(0.0))));
    }
    head = register_module("head", torch::nn::Linear(d_model, 10));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = x.transpose(0, 1);
    for (auto& b : blocks) x = b(x);
    return head(x.mean(0));
  }
  std::vector<torch::nn::TransformerEncoderLayer> blocks;
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(TransformerStack);

/// One benchmark model behind one concrete type, so that every scenario (and DDP's template,
/// whatever its spelling) is instantiated once. The wrapped model is registered as "net".
struct BenchNetImpl : torch::nn::Module {
  explicit BenchNetImpl(const std::string& name) : name_(name) {
    if (name == "mlp") {
      net_ = torch::nn::AnyModule(Mlp());
      register_module("net", net_.ptr());
    } else if (name == "small_mlp") {
      net_ = torch::nn::AnyModule(Mlp(128));
      register_module("net", net_.ptr());
    } else if (name == "deep_mlp") {
      net_ = torch::nn::AnyModule(LinearStack(std::vector<int64_t>(49, 256)));
      register_module("net", net_.ptr());
    } else if (name == "cnn") {
      net_ = torch::nn::AnyModule(FashionCnn());
      register_module("net", net_.ptr());
    } else if (name == "transformer") {
      net_ = torch::nn::AnyModule(TransformerStack());
      register_module("net", net_.ptr());
    } else if (name == "wide" || name == "deep") {
      net_ = torch::nn::AnyModule(LinearStack(linear_stack_sizes(name)));
      register_module("net", net_.ptr());
    } else {
      throw std::invalid_argument(
          "unknown model '" + name +
          "': expected mlp, deep_mlp, cnn, transformer, small_mlp, wide or deep");
    }
  }
  torch::Tensor forward(torch::Tensor x) { return net_.forward(x); }
  const std::string& model_name() const { return name_; }

 private:
  std::string name_;
  torch::nn::AnyModule net_;
};
TORCH_MODULE(BenchNet);

/// A synthetic batch for `name`: inputs of the model's shape and integer class targets.
struct Batch {
  torch::Tensor input;
  torch::Tensor target;
};
inline Batch make_batch(const std::string& name, int64_t batch, uint64_t seed = 0) {
  auto gen = at::detail::createCPUGenerator(seed);
  Batch b;
  int64_t classes = 10;
  if (name == "mlp" || name == "small_mlp") {
    b.input = at::randn({batch, 784}, gen);
  } else if (name == "deep_mlp") {
    b.input = at::randn({batch, 256}, gen);
    classes = 256;
  } else if (name == "cnn") {
    b.input = at::randn({batch, 1, 28, 28}, gen);
  } else if (name == "transformer") {
    b.input = at::randn({batch, 32, 128}, gen);
  } else if (name == "wide" || name == "deep") {
    b.input = at::randn({batch, 1024}, gen);
    classes = 1000;
  } else {
    throw std::invalid_argument("unknown model '" + name + "'");
  }
  b.target = at::randint(classes, {batch}, gen, at::kLong);
  return b;
}

/// Number of parameters (elements) of a module.
inline int64_t parameter_count(torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

}  // namespace bench
}  // namespace lockstep
