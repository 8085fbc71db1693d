// lockstep-dp-bench: is DataParallel over CPU replicas faster than intra-op threads?
//
//   lockstep-dp-bench [--models small_mlp,mlp,deep_mlp,cnn] [--batch 64] [--replicas 2]
//                     [--steps 10] [--rounds 7] [--warmup 3] [--bucket-cap-mb 1]
//
// For each model: A = DataParallel with `replicas` CPU replicas of one intra-op thread each;
// B = the same module trained directly with `replicas` intra-op threads (at::set_num_threads
// and OpenBLAS's pool). Same initial weights, same batches, same SGD step. Rounds alternate
// A B A B ... (`steps` timed steps each, after `warmup`), so machine noise hits both; the table
// shows median step times over all timed steps and the speedup B/A. One JSON line per model
// follows for machines (`lockstep-bench` can run this binary as its DataParallel scenario).
#include <dlfcn.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "lockstep/data_parallel.h"

namespace nn = torch::nn;

namespace {

// The benchmark models (the deep MLP and the CNN as in apps/bench/models.h).
struct NetImpl : nn::Cloneable<NetImpl> {
  explicit NetImpl(std::string model) : model_(std::move(model)) { reset(); }
  void reset() override {
    std::vector<int64_t> widths;
    if (model_ == "small_mlp") {
      widths = {784, 128, 128, 10};
    } else if (model_ == "mlp") {
      widths = {784, 1024, 1024, 10};
    } else if (model_ == "deep_mlp") {
      widths.assign(49, 256);
    } else if (model_ == "cnn") {
      conv1 = register_module("conv1", nn::Conv2d(nn::Conv2dOptions(1, 32, 3)));
      conv2 = register_module("conv2", nn::Conv2d(nn::Conv2dOptions(32, 64, 3)));
      widths = {64 * 5 * 5, 128, 10};
    } else {
      throw std::invalid_argument("unknown model '" + model_ +
                                  "': expected small_mlp, mlp, deep_mlp or cnn");
    }
    layers.clear();
    for (size_t i = 0; i + 1 < widths.size(); ++i) {
      layers.push_back(register_module("fc" + std::to_string(i), nn::Linear(widths[i], widths[i + 1])));
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    if (conv1) {
      x = torch::max_pool2d(torch::relu(conv1(x)), 2);
      x = torch::max_pool2d(torch::relu(conv2(x)), 2).flatten(1);
    }
    for (size_t i = 0; i < layers.size(); ++i) {
      x = layers[i](x);
      if (i + 1 < layers.size()) x = torch::relu(x);
    }
    return x;
  }
  torch::Tensor input(int64_t batch) const {
    if (conv1) return torch::randn({batch, 1, 28, 28});
    return torch::randn({batch, layers.front()->options.in_features()});
  }
  std::string model_;
  nn::Conv2d conv1{nullptr}, conv2{nullptr};
  std::vector<nn::Linear> layers;
};

void set_blas_threads(int n) {
  using SetFn = void (*)(int);
  static auto set = reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  if (set) set(n);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string models = "small_mlp,mlp,deep_mlp,cnn";
  int64_t batch = 64;
  int replicas = 2, steps = 10, rounds = 7, warmup = 3;
  double bucket_cap_mb = lockstep::DataParallelOptions().bucket_cap_mb();
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--models") models = v;
    else if (k == "--batch") batch = std::stoll(v);
    else if (k == "--replicas") replicas = std::stoi(v);
    else if (k == "--steps") steps = std::stoi(v);
    else if (k == "--rounds") rounds = std::stoi(v);
    else if (k == "--warmup") warmup = std::stoi(v);
    else if (k == "--bucket-cap-mb") bucket_cap_mb = std::stod(v);
    else {
      std::cerr << "unknown option " << k << "\n";
      return 2;
    }
  }
  torch::manual_seed(0);
  std::printf("%-10s %6s %9s %14s %14s %8s\n", "model", "batch", "replicas", "dp ms (1 thr)",
              "intra-op ms", "speedup");
  std::vector<std::string> json;
  for (const auto& name : split(models)) {
    auto primary = std::make_shared<NetImpl>(name);
    auto single = std::dynamic_pointer_cast<NetImpl>(primary->clone());
    lockstep::DataParallel<NetImpl> dp(
        primary, lockstep::DataParallelOptions().cpu_replicas(replicas).threads_per_replica(1).bucket_cap_mb(
                     bucket_cap_mb));
    torch::optim::SGD dp_opt(primary->parameters(), 0.01);
    torch::optim::SGD single_opt(single->parameters(), 0.01);
    auto x = primary->input(batch);
    auto y = torch::randint(0, 10, {batch}, torch::kLong);
    auto loss_fn = [](const torch::Tensor& out, const torch::Tensor& t) {
      return torch::nn::functional::cross_entropy(out, t);
    };
    auto dp_step = [&] {
      dp_opt.zero_grad();
      dp.train_step(x, y, loss_fn);
      dp_opt.step();
    };
    auto single_step = [&] {
      single_opt.zero_grad();
      loss_fn(single->forward(x), y).backward();
      single_opt.step();
    };
    at::set_num_threads(replicas);
    set_blas_threads(replicas);
    std::vector<double> a_ms, b_ms;
    auto timed = [&](const std::function<void()>& step, std::vector<double>& out, int n) {
      for (int i = 0; i < n; ++i) {
        auto t0 = std::chrono::steady_clock::now();
        step();
        out.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
    };
    std::vector<double> sink;
    timed(dp_step, sink, warmup);
    timed(single_step, sink, warmup);
    for (int r = 0; r < rounds; ++r) {
      timed(dp_step, a_ms, steps);
      timed(single_step, b_ms, steps);
    }
    double a = median(a_ms), b = median(b_ms);
    std::printf("%-10s %6lld %9d %14.2f %14.2f %7.2fx\n", name.c_str(),
                static_cast<long long>(batch), replicas, a, b, b / a);
    std::ostringstream js;
    js << "{\"model\":\"" << name << "\",\"batch\":" << batch << ",\"replicas\":" << replicas
       << ",\"dp_median_ms\":" << a << ",\"intraop_median_ms\":" << b << ",\"speedup\":" << b / a
       << ",\"dp_min_ms\":" << *std::min_element(a_ms.begin(), a_ms.end())
       << ",\"intraop_min_ms\":" << *std::min_element(b_ms.begin(), b_ms.end()) << "}";
    json.push_back(js.str());
  }
  for (const auto& j : json) std::printf("%s\n", j.c_str());
  return 0;
}
