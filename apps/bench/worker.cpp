// lockstep-bench's worker: one rank of one scenario (see worker.h).
#include "worker.h"

#include <torch/cuda.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "lockstep/comm_hooks.h"
#include "lockstep/data_parallel.h"
#include "lockstep/ddp.h"
#include "lockstep/errors.h"
#include "lockstep/launch_env.h"
#include "lockstep/process_group.h"
#include "models.h"
#include "proc.h"
#include "stats.h"

namespace lockstep {
namespace bench {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Note [lockstep-bench on CUDA] (scenarios.h): this rank's device, cuda:<LOCAL_RANK % visible
// GPUs> (ranks of one host share GPU 0 on a one-GPU machine), or the CPU.
torch::Device worker_device(const WorkerConfig& c) {
  if (c.device != "cuda") return torch::kCPU;
  if (!torch::cuda::is_available()) {
    throw InvalidArgument(cuda_unavailable_message(std::getenv("CUDA_VISIBLE_DEVICES")));
  }
  const int gpus = static_cast<int>(torch::cuda::device_count());
  const int local_rank = resolve_launch_env(process_environment()).local_rank;
  return torch::Device(torch::kCUDA, static_cast<torch::DeviceIndex>(local_rank % gpus));
}

// Waits for the work queued on `device` (nothing on the CPU): CUDA kernels run asynchronously,
// so a clock read without it would time the launches, not the step. torch::cuda::synchronize
// is in LibTorch 1.13's and 2.x's torch/cuda.h alike.
void sync_device(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

// One all-reduce of every gradient as one flat tensor on the gradients' device, median of
// `iters`: the communication a data-parallel step cannot avoid, the denominator of the
// exposed-communication fraction.
double time_allreduce_all_grads(ProcessGroup& pg, int64_t numel, int iters,
                                const torch::Device& device) {
  auto flat = torch::zeros({numel}, torch::TensorOptions().device(device));
  pg.allreduce(flat)->wait();  // warm the pairs for this size
  sync_device(device);
  pg.barrier()->wait();
  std::vector<double> t;
  for (int i = 0; i < iters; ++i) {
    auto t0 = Clock::now();
    pg.allreduce(flat)->wait();
    sync_device(device);
    t.push_back(ms_since(t0));
  }
  return median(t);
}

// Milliseconds per call of `op`: the median of 3 runs of `iters` back-to-back calls, each run
// started together on every rank (a barrier), as nccl-tests time collectives.
double per_call_ms(ProcessGroup& pg, int iters, const std::function<void()>& op) {
  std::vector<double> runs;
  for (int run = 0; run < 3; ++run) {
    pg.barrier()->wait();
    const auto t0 = Clock::now();
    for (int i = 0; i < iters; ++i) op();
    runs.push_back(ms_since(t0) / iters);
  }
  return median(runs);
}

// Note [The memory floor of a reduction]: this machine's memory bandwidth for the bytes an
// all-reduce moves, with every rank at it at once (as in a real step, where both ranks reduce
// while they share the memory bus and L3): the median per-iteration time of a copy of n
// floats (memcpy) and of an add of n floats into n (dst[i] += src[i]), after a barrier, in
// back-to-back iterations like the sweep's. The in-place all-reduce reads n and writes n per
// rank (its slice of every rank's region, in one pass: Note [One pass per element]), the
// bytes of a copy of n, so the copy column bounds it from below and the add column (read 2n,
// write n) shows what an extra read costs.
// Both buffers are page-aligned, as the shared regions are: glibc's memcpy on this AMD EPYC
// VM is 10-30x slower for 16-256 KiB when the destination lies 16 bytes past the source
// modulo 4 KiB (256 KiB: 342 us against 11-33 us at 0, 48, 64, 80 or 4032 bytes), which two
// neighbouring malloc'd vectors are, so the column would have measured that instead.
std::pair<double, double> time_memory(ProcessGroup& pg, int64_t n, int iters) {
  auto page_aligned = [n] {
    void* p = nullptr;
    const size_t bytes = (static_cast<size_t>(n) * sizeof(float) + 4095) / 4096 * 4096;
    LOCKSTEP_CHECK(posix_memalign(&p, 4096, bytes) == 0, "memory benchmark: could not allocate ",
                   bytes, " bytes");
    return std::unique_ptr<float, decltype(&std::free)>(static_cast<float*>(p), &std::free);
  };
  auto a = page_aligned(), b = page_aligned();
  std::fill(a.get(), a.get() + n, 1.0f);
  std::fill(b.get(), b.get() + n, 0.0f);
  float* dst = b.get();
  const float* src = a.get();
  const double copy = per_call_ms(pg, iters, [&] {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  });
  const double add = per_call_ms(pg, iters, [&] {
    for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
  });
  // Keep the adds observable so that they are not optimised away.
  LOCKSTEP_CHECK(std::isfinite(dst[n - 1]), "memory benchmark produced ", dst[n - 1]);
  return {copy, add};
}

constexpr int64_t kMaxSharedSweepBytes = int64_t{32} << 20;

json sweep_allreduce(ProcessGroup& pg, int64_t min_bytes, int64_t max_bytes) {
  json rows = json::array();
  const int w = pg.size();
  for (int64_t bytes = min_bytes; bytes <= max_bytes; bytes *= 4) {
    const int64_t n = std::max<int64_t>(1, bytes / 4);
    auto t = torch::ones({n});
    pg.allreduce(t)->wait();
    LOCKSTEP_CHECK(t[0].item<float>() == static_cast<float>(w) &&
                       t[n - 1].item<float>() == static_cast<float>(w),
                   "all-reduce of ones over ", w, " ranks gave ", t[0].item<float>(), " at ", bytes,
                   " bytes");
    t.zero_();  // zeros stay zeros however often they are summed
    // Back-to-back iterations, as nccl-tests time them; the same count on every rank.
    const int iters =
        static_cast<int>(std::clamp<int64_t>((256LL << 20) / std::max<int64_t>(bytes, 1), 5, 200));
    const double ms = per_call_ms(pg, iters, [&] { pg.allreduce(t)->wait(); });
    const double algbw = static_cast<double>(n * 4) / (ms * 1e-3) / 1e9;
    // The same all-reduce of a shared reduction buffer (Note [Shared reduction buffers]):
    // what DDP's buckets take; on a transport without such buffers, the copying path again.
    // A shared buffer holds every rank's copy in /dev/shm: only up to kMaxSharedSweepBytes
    // in all, so that a small /dev/shm (a container's 64 MiB) does not fail the sweep.
    json inplace = nullptr;
    if (n * 4 * w <= kMaxSharedSweepBytes) {
      auto shared = pg.new_buffer(n, torch::dtype(torch::kFloat));
      pg.allreduce(shared)->wait();
      inplace = per_call_ms(pg, iters, [&] { pg.allreduce(shared)->wait(); });
    }
    const auto memory = time_memory(pg, n, iters);
    rows.push_back({{"bytes", n * 4},
                    {"ms", ms},
                    {"inplace_ms", inplace},
                    {"copy_ms", memory.first},
                    {"add_ms", memory.second},
                    {"algbw_gbps", algbw},
                    {"busbw_gbps", algbw * 2.0 * (w - 1) / w},
                    {"iters", iters}});
  }
  return rows;
}

torch::Tensor loss_of(const torch::Tensor& out, const torch::Tensor& y) {
  return torch::nn::functional::cross_entropy(out, y);
}

// Plain training of `net` with `opt` on `data`: one step.
void plain_step(BenchNet& net, torch::optim::Optimizer& opt, const Batch& data) {
  opt.zero_grad();
  loss_of(net->forward(data.input), data.target).backward();
  opt.step();
}

// Note [The synchronized floor]: the ranks train side by side with no gradient communication;
// one 1-element all-reduce of `token` per step keeps them in step, so the wait for the slower
// rank is in the floor as it is in DDP's step.
void floor_step(BenchNet& net, torch::optim::Optimizer& opt, const Batch& data,
                ProcessGroup& pg, at::Tensor& token) {
  plain_step(net, opt, data);
  pg.allreduce(token)->wait();
}

// The `ddp_stats` object of a result: lockstep DDP's own view of the timed steps (where the
// step went, how much of the communication backward had to wait for) and the memory the
// wrapper added over plain training.
json summarise_ddp(const std::vector<DDPStats>& stats, std::pair<long, long> mem_before,
                   int64_t numel) {
  auto field = [&](double DDPStats::*f) {
    std::vector<double> v;
    for (const auto& st : stats) v.push_back(st.*f);
    return median(v);
  };
  json d;
  d["forward_ms"] = field(&DDPStats::forward_ms);
  d["backward_compute_ms"] = field(&DDPStats::backward_compute_ms);
  d["comm_ms"] = field(&DDPStats::comm_ms);
  d["exposed_comm_ms"] = field(&DDPStats::exposed_comm_ms);
  d["buckets"] = stats.empty() ? 0 : stats.back().buckets.size();
  json sizes = json::array();
  if (!stats.empty()) {
    for (const auto& b : stats.back().buckets) sizes.push_back(b.bytes);
  }
  d["bucket_bytes"] = sizes;
  // Each bucket's timeline (ms since the iteration's first gradient hook), the median over
  // the steps of the last bucket plan: [ready, launched, done].
  json timeline = json::array();
  if (!stats.empty()) {
    const size_t nb = stats.back().buckets.size();
    for (size_t b = 0; b < nb; ++b) {
      std::vector<double> ready, launched, done;
      for (const auto& st : stats) {
        if (st.buckets.size() != nb) continue;  // before the buckets were rebuilt
        ready.push_back(st.buckets[b].ready_ms);
        launched.push_back(st.buckets[b].launched_ms);
        done.push_back(st.buckets[b].done_ms);
      }
      timeline.push_back({median(ready), median(launched), median(done)});
    }
  }
  d["bucket_ms"] = timeline;
  const auto mem_after = rss_pss_kb();
  if (mem_before.first >= 0 && mem_after.first >= 0) {
    d["extra_rss_mib"] = (mem_after.first - mem_before.first) / 1024.0;
    d["extra_pss_mib"] = (mem_after.second - mem_before.second) / 1024.0;
  }
  d["gradient_mib"] = numel * 4 / 1048576.0;  // float32 models
  return d;
}

// Note [Cluster scenarios] in scenarios.cpp: the DDP communication hooks a ddp worker can use
// (--comm-hook), by name. A new hook is one row.
const std::map<std::string, std::function<CommHookPtr()>>& comm_hooks() {
  static const std::map<std::string, std::function<CommHookPtr()>> table = {
      {"allreduce", [] { return allreduce_hook(); }},
      {"fp16", [] { return fp16_compress_hook(); }},
      {"bf16", [] { return bf16_compress_hook(); }},
      // Issue 17's setting: rank 4, compressing from the second iteration (the warm-up steps
      // are untimed, so every timed step is compressed).
      {"powersgd", [] {
         return powersgd_hook(
             PowerSGDOptions().matrix_approximation_rank(4).start_powersgd_iter(1));
       }},
  };
  return table;
}

CommHookPtr make_comm_hook(const std::string& name) {
  const auto& table = comm_hooks();
  auto it = table.find(name);
  if (it == table.end()) {
    std::string names;
    for (const auto& kv : table) names += (names.empty() ? "" : ", ") + kv.first;
    throw InvalidArgument("--comm-hook: unknown hook '" + name + "'; expected one of " + names);
  }
  return it->second();
}

}  // namespace

int run_worker(const WorkerConfig& c) {
  at::set_num_threads(c.threads);
  torch::manual_seed(0);
  json out;
  out["kind"] = c.kind;
  // Before the process group, so that a rank without its GPU fails at once.
  const torch::Device device = worker_device(c);
  out["device"] = device.str();

  // Before the process group: a bad hook fails this rank at once, not in a collective.
  const CommHookPtr hook = c.kind == "ddp" ? make_comm_hook(c.comm_hook) : nullptr;
  ProcessGroupPtr pg;
  if (c.kind != "plain" && c.kind != "dp") {
    pg = init_process_group();
    out["rank"] = pg->rank();
    out["world"] = pg->size();
    out["backend"] = pg->backend();
  } else {
    out["rank"] = 0;
    out["world"] = 1;
    out["backend"] = "none";
  }

  if (c.kind == "allreduce") {
    out["sweep"] = sweep_allreduce(*pg, c.sweep_min_bytes, c.sweep_max_bytes);
    out["step_ms"] = json::array();
    out["vmhwm_kb"] = vm_hwm_kb();
    std::ofstream(c.result) << out.dump();
    pg->barrier()->wait();
    return 0;
  }

  BenchNet net(c.model);
  const int64_t numel = parameter_count(*net);
  out["params"] = numel;
  net->to(device);  // before the optimizer and DDP see the parameters
  auto data = make_batch(c.model, c.batch);
  data.input = data.input.to(device);
  data.target = data.target.to(device);
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.01));
  std::function<void()> step;
  std::function<void()> per_step;  // after each timed step, outside the timer (statistics)
  std::function<void()> after;     // after the timed steps
  std::vector<DDPStats> ddp_stats;
  std::vector<double> plain_ms;  // overhead: the plain steps between the DDP ones

  if (c.kind == "plain") {
    step = [&] { plain_step(net, opt, data); };
  } else if (c.kind == "floor") {
    auto token = torch::zeros({1});
    step = [&, token]() mutable { floor_step(net, opt, data, *pg, token); };
  } else if (c.kind == "perparam") {
    // The pattern of pytorch/examples' cpp/distributed/dist-mnist.cpp: after backward, one
    // blocking all-reduce per parameter, then divide by the world size.
    const double w = pg->size();
    step = [&, w] {
      opt.zero_grad();
      loss_of(net->forward(data.input), data.target).backward();
      for (auto& p : net->parameters()) {
        auto g = p.mutable_grad();
        pg->allreduce(g)->wait();
        g.div_(w);
      }
      opt.step();
    };
  } else if (c.kind == "ddp") {
    // Memory baseline: plain training state (weights, gradients, activations freed) before
    // the wrapper exists, in the same process and after the process group.
    {
      opt.zero_grad();
      loss_of(net->forward(data.input), data.target).backward();
    }
    const auto mem_before = rss_pss_kb();
    DistributedDataParallel<BenchNetImpl> ddp(
        net, pg,
        DDPOptions().bucket_cap_mb(c.bucket_cap_mb).comm_hook(hook));
    out["comm_hook"] = c.comm_hook;
    step = [&, ddp]() mutable {
      opt.zero_grad();
      loss_of(ddp->forward(data.input), data.target).backward();
      opt.step();
    };
    per_step = [&, ddp] { ddp_stats.push_back(ddp->last_stats()); };
    after = [&, mem_before] { out["ddp_stats"] = summarise_ddp(ddp_stats, mem_before, numel); };
  } else if (c.kind == "overhead") {
    // Note [Alternating steps]
    // A plain copy of the model and a DDP-wrapped one take steps alternately in the same
    // processes (which goes first alternates too, the same on every rank), so that load,
    // allocator and thread pools are the same for both and a burst of noise hits both alike.
    // At world 1 the plain step is plain training; at world 2 and more it is the synchronized
    // floor's step (Note [The synchronized floor]): plain training and a 1-element all-reduce.
    // `step` times the wrapped one; the plain ones go to plain_step_ms. Each model's weights
    // and gradients are colder in the cache than in a process of their own (the other model
    // ran in between), alike for both sides.
    torch::manual_seed(0);
    auto plain_net = std::make_shared<BenchNet>(c.model);
    auto plain_opt = std::make_shared<torch::optim::SGD>((*plain_net)->parameters(),
                                                         torch::optim::SGDOptions(0.01));
    DistributedDataParallel<BenchNetImpl> ddp(net, pg, DDPOptions().bucket_cap_mb(c.bucket_cap_mb));
    auto count = std::make_shared<int>(0);
    auto token = torch::zeros({1});
    step = [&, ddp, plain_net, plain_opt, count, token]() mutable {
      auto timed_plain = [&] {
        auto t0 = Clock::now();
        if (pg->size() > 1) {
          floor_step(*plain_net, *plain_opt, data, *pg, token);
        } else {
          plain_step(*plain_net, *plain_opt, data);
        }
        plain_ms.push_back(ms_since(t0));
      };
      if (++*count % 2 == 0) timed_plain();
      {
        opt.zero_grad();
        loss_of(ddp->forward(data.input), data.target).backward();
        opt.step();
      }
      if (*count % 2 == 1) timed_plain();
    };
  } else if (c.kind == "dp") {
    // BenchNet is not Cloneable: the other replicas come from a factory (their values are
    // overwritten from the primary at every step anyway).
    const std::string model = c.model;
    auto dp = std::make_shared<DataParallel<BenchNetImpl>>(
        net.ptr(),
        DataParallelOptions()
            .cpu_replicas(c.replicas)
            .threads_per_replica(c.threads)
            .scope_blas_threads(c.scope_blas),
        [model] { return std::make_shared<BenchNetImpl>(model); });
    step = [&, dp] {
      opt.zero_grad();
      dp->train_step(data.input, data.target, loss_of);
      opt.step();
    };
  } else {
    std::cerr << "lockstep-bench: unknown worker kind '" << c.kind << "'" << std::endl;
    return kExitUsage;
  }

  // The overhead kind's step is timed twice over: only its wrapped half counts, below.
  // On CUDA every clock read at a step's boundary follows sync_device, so that a step's time
  // is its GPU work, not its kernel launches (the overhead kind runs on the CPU only).
  std::vector<double> times;
  for (int i = 0; i < c.warmup; ++i) step();
  sync_device(device);
  plain_ms.clear();
  if (pg) pg->barrier()->wait();
  const double cpu0 = process_cpu_seconds();
  const double busy0 = machine_busy_seconds();
  const auto start = Clock::now();
  for (int i = 0; i < c.steps; ++i) {
    const size_t plain_before = plain_ms.size();
    auto t0 = Clock::now();
    step();
    sync_device(device);
    double ms = ms_since(t0);
    if (plain_ms.size() > plain_before) ms -= plain_ms.back();
    times.push_back(ms);
    if (per_step) per_step();
  }
  // Note [Disturbed runs] in coordinator.h reads these three.
  out["wall_s"] = std::chrono::duration<double>(Clock::now() - start).count();
  out["cpu_s"] = process_cpu_seconds() - cpu0;
  out["busy_s"] = machine_busy_seconds() - busy0;
  out["step_ms"] = times;
  // Note [Allocator settings] in coordinator.cpp: what this worker's malloc ran with.
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  out["glibc_tunables"] = tunables ? tunables : "";
  if (c.kind == "overhead") {
    out["plain_step_ms"] = plain_ms;
  } else if (c.steps > 0) {
    // CPU time of this rank per step (all its threads): the work a scenario does, which
    // other processes on the machine stretch less than they stretch wall time.
    out["cpu_ms_per_step"] = out["cpu_s"].get<double>() * 1e3 / c.steps;
  }
  if (after) after();
  if (pg) {
    out["allreduce_all_grads_ms"] = time_allreduce_all_grads(*pg, numel, /*iters=*/10, device);
  }
  out["vmhwm_kb"] = vm_hwm_kb();
  std::ofstream(c.result) << out.dump();
  if (pg) pg->barrier()->wait();  // nobody tears the group down while a peer still uses it
  return 0;
}

}  // namespace bench
}  // namespace lockstep
