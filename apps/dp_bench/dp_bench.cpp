// lockstep-dp-bench: is DataParallel over CPU replicas faster than intra-op threads?
//
//   lockstep-dp-bench [--models small_mlp,mlp,deep_mlp,cnn] [--batch 64] [--replicas 2]
//                     [--steps 20] [--rounds 5] [--warmup 5] [--bucket-cap-mb 1]
//                     [--retries 2] [--json FILE] [--dp-omp-threads 1] [--scope-blas 1]
//
// For each model: A = DataParallel with `replicas` CPU replicas of one intra-op thread each;
// B = the same module trained directly with `replicas` intra-op threads. Same initial weights,
// same batch, same SGD step.
//
// Note [How lockstep-dp-bench compares]
// Every (model, round, scenario) runs in a fresh process (this binary re-executed with
// --worker), so that nothing one scenario leaves behind (OpenBLAS's helper threads polling
// for ~0.1 s after a multi-threaded GEMM, OpenMP's spinning workers, the allocator's state)
// slows the other: the first version timed A and B in one process and A paid for B's
// polling BLAS helper. Each worker gets the thread environment a user would give it:
// OMP_NUM_THREADS=1 for A (so OpenBLAS loads with one thread and LibTorch's intra-op pool is
// 1), OMP_NUM_THREADS=replicas for B (OpenBLAS and LibTorch both use that many). Rounds
// alternate the order (A B, B A, ...) so that drift in machine load hits both alike. A worker
// warms up, times `steps` steps, and reports its step times, the CPU time it used per
// wall-clock second ("cpus"), and the CPU time every *other* process used meanwhile per
// wall-clock second, from /proc/stat ("others"). A worker with others above 0.1 shared the
// cores with something else and says little: it counts as "disturbed", is rerun (up to
// --retries times), and is left out of the medians if it stays disturbed. Disturbance does
// not hit both alike: the intra-op reference, whose threads meet at every operator and spin
// while they wait, slowed down 5-20x when another process held one of the two cores,
// DataParallel about 2x. The table shows the median step time over all timed steps of the
// undisturbed workers and the speedup B/A (throughput ratio, same batch); the JSON lines add
// the per-round medians, p10/p90, cpus, others and the number of disturbed workers.
// --dp-omp-threads N with --scope-blas 0 shows what Note [OpenBLAS and replica threads] is
// about: the DataParallel workers then load OpenBLAS with N threads and DataParallel leaves
// that count alone.
#include <sys/resource.h>
#include <unistd.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
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


double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5)];
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}

// CPU time (seconds) all processes used so far, from /proc/stat's first line.
double system_busy_seconds() {
  std::ifstream f("/proc/stat");
  std::string cpu;
  f >> cpu;
  double user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
  f >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal;
  const double hz = static_cast<double>(sysconf(_SC_CLK_TCK));
  return (user + nice + system + irq + softirq + steal) / hz;
}

double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

struct Config {
  std::string models = "small_mlp,mlp,deep_mlp,cnn";
  int64_t batch = 64;
  int replicas = 2, steps = 20, rounds = 5, warmup = 5, retries = 2;
  double bucket_cap_mb = lockstep::DataParallelOptions().bucket_cap_mb();
  std::string json_path;
  bool scope_blas = true;   // DataParallelOptions::scope_blas_threads (to show what it does)
  int dp_omp_threads = 1;   // OMP_NUM_THREADS of the DataParallel workers
  std::string worker;  // "dp" or "intraop": run one scenario and print its result line
};

// One scenario in this process; prints "result <cpus> <others> <ms> <ms> ..." on stdout.
int run_worker(const Config& c, const std::string& model) {
  torch::manual_seed(0);
  auto net = std::make_shared<NetImpl>(model);
  auto x = net->input(c.batch);
  auto y = torch::randint(0, 10, {c.batch}, torch::kLong);
  auto loss_fn = [](const torch::Tensor& out, const torch::Tensor& t) {
    return torch::nn::functional::cross_entropy(out, t);
  };
  torch::optim::SGD opt(net->parameters(), 0.01);
  std::function<void()> step;
  std::unique_ptr<lockstep::DataParallel<NetImpl>> dp;
  if (c.worker == "dp") {
    dp = std::make_unique<lockstep::DataParallel<NetImpl>>(
        net, lockstep::DataParallelOptions().cpu_replicas(c.replicas).threads_per_replica(1).bucket_cap_mb(
                 c.bucket_cap_mb).scope_blas_threads(c.scope_blas));
    step = [&] {
      opt.zero_grad();
      dp->train_step(x, y, loss_fn);
      opt.step();
    };
  } else {
    at::set_num_threads(c.replicas);
    step = [&] {
      opt.zero_grad();
      loss_fn(net->forward(x), y).backward();
      opt.step();
    };
  }
  for (int i = 0; i < c.warmup; ++i) step();
  std::vector<double> ms;
  const double cpu0 = cpu_seconds();
  const double busy0 = system_busy_seconds();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < c.steps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    step();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double own = cpu_seconds() - cpu0;
  const double others = std::max(0.0, system_busy_seconds() - busy0 - own) / wall;
  std::printf("result %.3f %.3f", own / wall, others);
  for (double v : ms) std::printf(" %.4f", v);
  std::printf("\n");
  return 0;
}

// Other processes' CPU use (cores) above which a worker's numbers are left out.
constexpr double kDisturbed = 0.1;

struct Run {
  std::vector<double> ms;
  double cpus = 0;
  double others = 0;
};

// Re-executes this binary as a worker (Note [How lockstep-dp-bench compares]).
Run spawn_worker(const std::string& self, const Config& c, const std::string& model,
                 const std::string& kind) {
  const int threads = kind == "dp" ? c.dp_omp_threads : c.replicas;
  std::ostringstream cmd;
  cmd << "OMP_NUM_THREADS=" << threads << " '" << self << "' --worker " << kind << " --models "
      << model << " --batch " << c.batch << " --replicas " << c.replicas << " --steps "
      << c.steps << " --warmup " << c.warmup << " --bucket-cap-mb " << c.bucket_cap_mb
      << " --scope-blas " << (c.scope_blas ? 1 : 0);
  FILE* pipe = popen(cmd.str().c_str(), "r");
  if (!pipe) throw std::runtime_error("could not start " + cmd.str());
  Run run;
  char line[1 << 16];
  bool got = false;
  while (std::fgets(line, sizeof(line), pipe)) {
    std::istringstream is(line);
    std::string tag;
    is >> tag;
    if (tag != "result") continue;
    is >> run.cpus >> run.others;
    for (double v; is >> v;) run.ms.push_back(v);
    got = true;
  }
  const int status = pclose(pipe);
  if (!got || status != 0) {
    throw std::runtime_error("worker failed (exit status " + std::to_string(status) + "): " + cmd.str());
  }
  return run;
}

std::string self_path() {
  std::vector<char> buf(4096);
  const ssize_t n = readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  if (n <= 0) throw std::runtime_error("cannot read /proc/self/exe");
  return std::string(buf.data(), static_cast<size_t>(n));
}

std::string load_average() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

}  // namespace

int main(int argc, char** argv) {
  Config c;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--models") c.models = v;
    else if (k == "--batch") c.batch = std::stoll(v);
    else if (k == "--replicas") c.replicas = std::stoi(v);
    else if (k == "--steps") c.steps = std::stoi(v);
    else if (k == "--rounds") c.rounds = std::stoi(v);
    else if (k == "--retries") c.retries = std::stoi(v);
    else if (k == "--warmup") c.warmup = std::stoi(v);
    else if (k == "--bucket-cap-mb") c.bucket_cap_mb = std::stod(v);
    else if (k == "--json") c.json_path = v;
    else if (k == "--scope-blas") c.scope_blas = v != "0";
    else if (k == "--dp-omp-threads") c.dp_omp_threads = std::stoi(v);
    else if (k == "--worker") c.worker = v;
    else {
      std::cerr << "lockstep-dp-bench: unknown option " << k << "\n";
      return 2;
    }
  }
  try {
    if (!c.worker.empty()) return run_worker(c, c.models);
    const std::string self = self_path();
    std::printf("load average at start: %s\n", load_average().c_str());
    std::printf("%-10s %6s %9s %14s %14s %8s %11s %9s\n", "model", "batch", "replicas",
                "dp ms (1 thr)", "intra-op ms", "speedup", "cpus dp/io", "disturbed");
    std::vector<std::string> json;
    for (const auto& model : split(c.models)) {
      std::vector<double> a_ms, b_ms, a_round, b_round, a_cpus, b_cpus, a_others, b_others;
      int disturbed = 0;
      for (int r = 0; r < c.rounds; ++r) {
        for (int k = 0; k < 2; ++k) {
          const bool dp_now = (k == 0) == (r % 2 == 0);
          Run run;
          for (int attempt = 0; attempt <= c.retries; ++attempt) {
            run = spawn_worker(self, c, model, dp_now ? "dp" : "intraop");
            if (run.others <= kDisturbed) break;
            ++disturbed;
          }
          (dp_now ? a_cpus : b_cpus).push_back(run.cpus);
          (dp_now ? a_others : b_others).push_back(run.others);
          if (run.others > kDisturbed) continue;
          auto& all = dp_now ? a_ms : b_ms;
          all.insert(all.end(), run.ms.begin(), run.ms.end());
          (dp_now ? a_round : b_round).push_back(median(run.ms));
        }
      }
      const double a = median(a_ms), b = median(b_ms);
      char speedup[32] = "     n/a";
      if (a > 0 && b > 0) std::snprintf(speedup, sizeof(speedup), "%7.2fx", b / a);
      std::printf("%-10s %6lld %9d %14.2f %14.2f %s %5.2f/%4.2f %9d\n", model.c_str(),
                  static_cast<long long>(c.batch), c.replicas, a, b, speedup, median(a_cpus),
                  median(b_cpus), disturbed);
      std::fflush(stdout);
      auto list = [](const std::vector<double>& v) {
        std::ostringstream os;
        os << "[";
        for (size_t i = 0; i < v.size(); ++i) os << (i ? "," : "") << v[i];
        os << "]";
        return os.str();
      };
      std::ostringstream js;
      js << "{\"model\":\"" << model << "\",\"batch\":" << c.batch << ",\"replicas\":" << c.replicas
         << ",\"rounds\":" << c.rounds << ",\"steps\":" << c.steps << ",\"dp_median_ms\":" << a
         << ",\"intraop_median_ms\":" << b << ",\"speedup\":" << (a > 0 && b > 0 ? std::to_string(b / a) : "null")
         << ",\"dp_p10_ms\":" << quantile(a_ms, 0.1) << ",\"dp_p90_ms\":" << quantile(a_ms, 0.9)
         << ",\"intraop_p10_ms\":" << quantile(b_ms, 0.1)
         << ",\"intraop_p90_ms\":" << quantile(b_ms, 0.9) << ",\"dp_round_medians_ms\":" << list(a_round)
         << ",\"intraop_round_medians_ms\":" << list(b_round) << ",\"dp_cpus\":" << list(a_cpus)
         << ",\"intraop_cpus\":" << list(b_cpus) << ",\"dp_others\":" << list(a_others)
         << ",\"intraop_others\":" << list(b_others) << ",\"disturbed\":" << disturbed << "}";
      json.push_back(js.str());
    }
    std::printf("load average at end: %s\n", load_average().c_str());
    for (const auto& j : json) std::printf("%s\n", j.c_str());
    if (!c.json_path.empty()) {
      std::ofstream out(c.json_path);
      for (const auto& j : json) out << j << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "lockstep-dp-bench: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
