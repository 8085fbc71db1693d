// Quick DDP benchmark (not a test): median step time of lockstep's DistributedDataParallel on
// the README's models, for comparison with bench_torch_ddp.py (PyTorch's DDP, same models,
// sizes and threads). The full benchmark program is lockstep-bench (apps/).
//
//   ddp_bench --model mlp|deep|cnn [--world 2] [--steps 60] [--warmup 10] [--bucket-cap 25]
//             [--plain] [--view]
// --world W forks W ranks (file:// rendezvous in /tmp); --plain trains without DDP (world 1),
// for the wrapper's overhead; --overhead alternates plain and wrapped steps in one process at
// world size 1 (robust on a loaded machine). Prints one line per run: model, mode, median and mean step ms.
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "lockstep/lockstep.h"

namespace {

namespace nn = torch::nn;
using torch::Tensor;

struct Mlp : nn::Module {  // 1.86M parameters
  nn::Sequential seq;
  Mlp() {
    seq = register_module("seq", nn::Sequential(nn::Linear(784, 1024), nn::ReLU(),
                                                nn::Linear(1024, 1024), nn::ReLU(),
                                                nn::Linear(1024, 10)));
  }
  Tensor forward(Tensor x) { return seq->forward(x); }
};

struct DeepMlp : nn::Module {  // 48 x (256x256)
  nn::Sequential seq;
  DeepMlp() {
    seq = register_module("seq", nn::Sequential());
    for (int i = 0; i < 48; ++i) {
      seq->push_back(nn::Linear(256, 256));
      seq->push_back(nn::ReLU());
    }
  }
  Tensor forward(Tensor x) { return seq->forward(x); }
};

struct Cnn : nn::Module {  // the PyTorch MNIST example's CNN, on 28x28 Fashion-MNIST
  nn::Conv2d c1{nullptr}, c2{nullptr};
  nn::Linear f1{nullptr}, f2{nullptr};
  Cnn() {
    c1 = register_module("c1", nn::Conv2d(nn::Conv2dOptions(1, 32, 3)));
    c2 = register_module("c2", nn::Conv2d(nn::Conv2dOptions(32, 64, 3)));
    f1 = register_module("f1", nn::Linear(9216, 128));
    f2 = register_module("f2", nn::Linear(128, 10));
  }
  Tensor forward(Tensor x) {
    x = torch::relu(c2(torch::relu(c1(x))));
    x = torch::max_pool2d(x, 2).flatten(1);
    return f2(torch::relu(f1(x)));
  }
};

struct Args {
  std::string model = "mlp";
  int world = 2;
  int steps = 60;
  int warmup = 10;
  double bucket_cap = 25;
  bool plain = false;
  bool view = false;
  bool overhead = false;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// World size 1: a plain model and a DDP-wrapped copy take steps alternately, so load changes on
// a shared machine hit both alike. Prints both medians and the wrapper's overhead.
template <typename M>
void overhead(const Args& a, const lockstep::ProcessGroupPtr& pg, Tensor x, Tensor y) {
  torch::manual_seed(0);
  auto plain = std::make_shared<M>();
  auto wrapped = std::make_shared<M>();
  lockstep::DistributedDataParallel<M> ddp(
      wrapped, pg, lockstep::DDPOptions().bucket_cap_mb(a.bucket_cap).gradient_as_bucket_view(a.view));
  torch::optim::SGD opt_plain(plain->parameters(), 0.01), opt_ddp(wrapped->parameters(), 0.01);
  std::vector<double> tp, td;
  for (int s = 0; s < a.warmup + a.steps; ++s) {
    for (int which = 0; which < 2; ++which) {
      auto t0 = std::chrono::steady_clock::now();
      auto& opt = which ? opt_ddp : opt_plain;
      opt.zero_grad();
      auto out = which ? ddp->forward(x) : plain->forward(x);
      torch::cross_entropy_loss(out, y).backward();
      opt.step();
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (s >= a.warmup) (which ? td : tp).push_back(ms);
    }
  }
  std::printf("lockstep model=%s overhead world=1 plain_median_ms=%.3f ddp_median_ms=%.3f "
              "overhead=%.2f%%\n", a.model.c_str(), median(tp), median(td),
              100.0 * (median(td) / median(tp) - 1.0));
  std::fflush(stdout);
}

template <typename M>
std::vector<double> train(const Args& a, const lockstep::ProcessGroupPtr& pg, Tensor x,
                          Tensor y) {
  torch::manual_seed(0);
  auto model = std::make_shared<M>();
  std::shared_ptr<lockstep::DistributedDataParallelImpl<M>> ddp;
  if (!a.plain) {
    ddp = lockstep::DistributedDataParallel<M>(
              model, pg, lockstep::DDPOptions().bucket_cap_mb(a.bucket_cap)
                             .gradient_as_bucket_view(a.view))
              .ptr();
  }
  torch::optim::SGD opt(model->parameters(), 0.01);
  std::vector<double> times;
  if (pg) pg->barrier()->wait();
  for (int s = 0; s < a.warmup + a.steps; ++s) {
    auto t0 = std::chrono::steady_clock::now();
    opt.zero_grad();
    auto out = ddp ? ddp->forward(x) : model->forward(x);
    torch::cross_entropy_loss(out, y).backward();
    opt.step();
    auto t1 = std::chrono::steady_clock::now();
    if (s >= a.warmup) times.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return times;
}

int run_rank(const Args& a, int rank, const std::string& store) {
  at::set_num_threads(1);
  lockstep::ProcessGroupPtr pg;
  if (!a.plain) {
    pg = lockstep::init_process_group(lockstep::ProcessGroupOptions()
                                          .init_method("file://" + store)
                                          .rank(rank)
                                          .world_size(a.world)
                                          .transport("gloo"));
  }
  const int64_t batch = 64;
  torch::manual_seed(rank + 1);
  std::vector<double> t;
  auto y = torch::randint(0, 10, {batch});
  if (a.overhead) {
    if (a.model == "mlp") overhead<Mlp>(a, pg, torch::randn({batch, 784}), y);
    else if (a.model == "deep") overhead<DeepMlp>(a, pg, torch::randn({batch, 256}), y);
    else overhead<Cnn>(a, pg, torch::randn({batch, 1, 28, 28}), y);
    return 0;
  }
  if (a.model == "mlp") {
    t = train<Mlp>(a, pg, torch::randn({batch, 784}), y);
  } else if (a.model == "deep") {
    t = train<DeepMlp>(a, pg, torch::randn({batch, 256}), y);
  } else {
    t = train<Cnn>(a, pg, torch::randn({batch, 1, 28, 28}), y);
  }
  if (rank == 0) {
    std::sort(t.begin(), t.end());
    double mean = 0;
    for (double v : t) mean += v;
    mean /= t.size();
    std::printf("lockstep model=%s mode=%s world=%d median_ms=%.3f mean_ms=%.3f\n",
                a.model.c_str(), a.plain ? "plain" : (a.view ? "ddp-view" : "ddp"),
                a.plain ? 1 : a.world, t[t.size() / 2], mean);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&] { return std::string(i + 1 < argc ? argv[++i] : ""); };
    if (k == "--model") a.model = next();
    else if (k == "--world") a.world = std::stoi(next());
    else if (k == "--steps") a.steps = std::stoi(next());
    else if (k == "--warmup") a.warmup = std::stoi(next());
    else if (k == "--bucket-cap") a.bucket_cap = std::stod(next());
    else if (k == "--plain") a.plain = true;
    else if (k == "--view") a.view = true;
    else if (k == "--overhead") a.overhead = true, a.world = 1;
    else {
      std::fprintf(stderr, "unknown argument %s\n", k.c_str());
      return 2;
    }
  }
  std::string store = "/tmp/lockstep_ddp_bench_" + std::to_string(::getpid());
  std::remove(store.c_str());
  const int world = a.plain ? 1 : a.world;
  std::vector<pid_t> children;
  for (int r = 0; r < world; ++r) {
    pid_t pid = ::fork();
    if (pid == 0) {
      try {
        ::_exit(run_rank(a, r, store));
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", r, e.what());
        ::_exit(1);
      }
    }
    children.push_back(pid);
  }
  int rc = 0;
  for (pid_t c : children) {
    int status = 0;
    ::waitpid(c, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) rc = 1;
  }
  std::remove(store.c_str());
  return rc;
}
