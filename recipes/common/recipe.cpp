// Shared plumbing of the recipes; see recipe.h.
#include "recipe.h"

#include "lockstep/main.h"

#include <ATen/CPUGeneratorImpl.h>

#include <sys/stat.h>

#include <cmath>
#include <csignal>
#include <mutex>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace lockstep {
namespace recipe {

using detail::concat;
using nlohmann::json;

void add_common_options(cxxopts::Options& options, int default_epochs, int default_batch,
                        double default_lr) {
  // clang-format off
  options.add_options("common")
    ("h,help", "Print this help and exit")
    ("config", "JSON file of settings: an object whose keys are these long flag names "
               "(e.g. {\"lr\": 0.01}); flags on the command line override it",
     cxxopts::value<std::string>()->default_value(""))
    ("epochs", "Passes over the training data", cxxopts::value<int>()->default_value(std::to_string(default_epochs)))
    ("batch-size", "Global batch size (split evenly over the ranks; must be divisible by their number)",
     cxxopts::value<int64_t>()->default_value(std::to_string(default_batch)))
    ("lr", "Learning rate", cxxopts::value<double>()->default_value(concat(default_lr)))
    ("seed", "Random seed (model initialisation, data order, dropout)", cxxopts::value<uint64_t>()->default_value("1"))
    ("threads", "Intra-op threads per rank", cxxopts::value<int>()->default_value("1"))
    ("device", "Where each rank trains: cpu; cuda (cuda:LOCAL_RANK, one GPU per rank: launch "
               "with lockstep-run --nproc-per-node gpu); cuda:N; or auto (cuda when a GPU is "
               "visible, else cpu). The CUDA path is unverified on a GPU",
     cxxopts::value<std::string>()->default_value("cpu"))
    ("out-dir", "Directory for the checkpoint, metrics, report and exported weights",
     cxxopts::value<std::string>()->default_value("out"))
    ("checkpoint", "Checkpoint path (default: OUT_DIR/checkpoint.lsck)", cxxopts::value<std::string>()->default_value(""))
    ("resume", "Resume from the checkpoint when it exists", cxxopts::value<bool>()->default_value("true"))
    ("checkpoint-every", "Also checkpoint every N steps (0: at the end of each epoch only)",
     cxxopts::value<int64_t>()->default_value("0"))
    ("max-steps", "Finish after N steps in total (0: run all epochs)", cxxopts::value<int64_t>()->default_value("0"))
    ("stop-after", "Testing: act as if preempted after N steps in total (checkpoint, exit 75)",
     cxxopts::value<int64_t>()->default_value("0"))
    ("limit-train", "Use only the first N training examples (0: all)", cxxopts::value<int64_t>()->default_value("0"))
    ("limit-eval", "Use only the first N evaluation examples (0: all)", cxxopts::value<int64_t>()->default_value("0"))
    ("progress", "Progress display: auto (bar on a terminal), bar or lines",
     cxxopts::value<std::string>()->default_value("auto"))
    ("comm-hook", "How DDP reduces gradients: allreduce (exact, the default), fp16, bf16, "
                  "int8, or powersgd (rank 4 after 10 exact steps, with error feedback; its state "
                  "is not checkpointed, so a resumed run is not bitwise that of an uninterrupted one)",
     cxxopts::value<std::string>()->default_value("allreduce"))
    ("tensorboard", "Also write the metrics as TensorBoard scalars to an event file in DIR "
                    "(rank 0; e.g. OUT_DIR/tb, then `tensorboard --logdir OUT_DIR/tb`)",
     cxxopts::value<std::string>()->default_value(""))
    ("report-every", "Also rewrite the live OUT_DIR/report.html every N steps (0: at epoch ends only)",
     cxxopts::value<int64_t>()->default_value("200"));
  // clang-format on
}

namespace {

std::set<std::string> long_names(const cxxopts::Options& options) {
  std::set<std::string> names;
  for (const auto& group : options.groups()) {
    for (const auto& o : options.group_help(group).options) {
      for (const auto& l : o.l) names.insert(l);
    }
  }
  return names;
}

std::string scalar_text(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  return v.dump();
}

}  // namespace

cxxopts::ParseResult parse(cxxopts::Options& options, int argc, char** argv) {
  // Find --config first (cxxopts cannot re-parse, so scan by hand).
  std::string config_path;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--config" && i + 1 < argc) config_path = argv[i + 1];
    if (a.rfind("--config=", 0) == 0) config_path = a.substr(9);
  }
  std::vector<std::string> args = {argv[0]};
  if (!config_path.empty()) {
    std::ifstream in(config_path);
    if (!in) throw UsageError(concat("cannot read config file '", config_path, "'"));
    json j;
    try {
      in >> j;
    } catch (const std::exception& e) {
      throw UsageError(concat("config file '", config_path, "' is not valid JSON: ", e.what()));
    }
    if (!j.is_object()) throw UsageError(concat("config file '", config_path, "' must hold a JSON object"));
    auto known = long_names(options);
    for (const auto& kv : j.items()) {
      if (!known.count(kv.key()) || kv.key() == "help" || kv.key() == "config") {
        throw UsageError(concat("config file '", config_path, "': unknown key '", kv.key(),
                                "'. Known keys are the long flags listed by --help."));
      }
      if (kv.value().is_object() || kv.value().is_array() || kv.value().is_null()) {
        throw UsageError(concat("config file '", config_path, "': key '", kv.key(),
                                "' must be a string, number or boolean, but got ", kv.value().dump()));
      }
      std::string arg = concat("--", kv.key(), "=", scalar_text(kv.value()));
      // Parse each key alone first so that a bad value is reported with its key and file.
      try {
        std::vector<const char*> one = {argv[0], arg.c_str()};
        cxxopts::Options probe = options;
        probe.parse(2, one.data());
      } catch (const std::exception& e) {
        throw UsageError(concat("config file '", config_path, "': bad value for '", kv.key(),
                                "': ", kv.value().dump(), " (", e.what(), ")"));
      }
      args.push_back(arg);
    }
  }
  for (int i = 1; i < argc; ++i) args.push_back(argv[i]);
  std::vector<const char*> ptrs;
  for (const auto& a : args) ptrs.push_back(a.c_str());
  cxxopts::ParseResult result;
  try {
    result = options.parse(static_cast<int>(ptrs.size()), ptrs.data());
  } catch (const std::exception& e) {
    throw UsageError(concat(e.what(), ". See --help."));
  }
  if (result.count("help")) {
    std::cout << options.help() << "\nExit codes: 0 finished, 1 error, 2 bad flag or config, "
                 "75 preempted (checkpoint written; run again to resume).\n";
    throw HelpShown{};
  }
  if (!result.unmatched().empty()) {
    throw UsageError(concat("unexpected argument '", result.unmatched().front(), "'. See --help."));
  }
  return result;
}

std::map<std::string, std::string> Common::as_config() const {
  // Run-control flags (stop-after, resume, progress, paths) are left out: a resumed run may
  // differ in them without being a different experiment.
  return {{"epochs", std::to_string(epochs)},        {"batch-size", std::to_string(batch_size)},
          {"lr", concat(lr)},                         {"seed", std::to_string(seed)},
          {"max-steps", std::to_string(max_steps)},   {"limit-train", std::to_string(limit_train)},
          {"limit-eval", std::to_string(limit_eval)},  {"comm-hook", comm_hook}};
}

lockstep::DDPOptions ddp_options(const Common& common) {
  // A NaN or Inf gradient stops every rank, naming the step, rank and parameter.
  auto options = lockstep::DDPOptions().nonfinite(lockstep::NonFinite::kAbort);
  const std::string& h = common.comm_hook;
  if (h == "allreduce") return options.comm_hook(lockstep::allreduce_hook());
  if (h == "fp16") return options.comm_hook(lockstep::fp16_compress_hook());
  if (h == "bf16") return options.comm_hook(lockstep::bf16_compress_hook());
  if (h == "int8") return options.comm_hook(lockstep::int8_quantize_hook());
  if (h == "powersgd") {
    return options.comm_hook(lockstep::powersgd_hook(
        lockstep::PowerSGDOptions().matrix_approximation_rank(4).start_powersgd_iter(10)));
  }
  throw UsageError(concat("--comm-hook must be allreduce, fp16, bf16, int8 or powersgd, but got '",
                          h, "'"));
}

Common read_common(const cxxopts::ParseResult& r) {
  Common c;
  c.epochs = r["epochs"].as<int>();
  c.batch_size = r["batch-size"].as<int64_t>();
  c.lr = r["lr"].as<double>();
  c.seed = r["seed"].as<uint64_t>();
  c.threads = r["threads"].as<int>();
  c.device = r["device"].as<std::string>();
  c.out_dir = r["out-dir"].as<std::string>();
  c.checkpoint = r["checkpoint"].as<std::string>();
  if (c.checkpoint.empty()) c.checkpoint = c.out_dir + "/checkpoint.lsck";
  c.resume = r["resume"].as<bool>();
  c.checkpoint_every = r["checkpoint-every"].as<int64_t>();
  c.stop_after = r["stop-after"].as<int64_t>();
  c.max_steps = r["max-steps"].as<int64_t>();
  c.limit_train = r["limit-train"].as<int64_t>();
  c.limit_eval = r["limit-eval"].as<int64_t>();
  c.tensorboard = r["tensorboard"].as<std::string>();
  c.comm_hook = r["comm-hook"].as<std::string>();
  c.report_every = r["report-every"].as<int64_t>();
  (void)ddp_options(c);  // an unknown hook is a usage error before anything starts
  std::string p = r["progress"].as<std::string>();
  if (p == "auto") c.progress = -1;
  else if (p == "bar") c.progress = 1;
  else if (p == "lines") c.progress = 0;
  else throw UsageError(concat("--progress must be auto, bar or lines, but got '", p, "'"));
  if (c.epochs < 1) throw UsageError(concat("--epochs must be >= 1, but got ", c.epochs));
  if (c.batch_size < 1) throw UsageError(concat("--batch-size must be >= 1, but got ", c.batch_size));
  if (!(c.lr > 0)) throw UsageError(concat("--lr must be > 0, but got ", c.lr));
  if (c.threads < 1) throw UsageError(concat("--threads must be >= 1, but got ", c.threads));
  for (auto* v : {&c.checkpoint_every, &c.stop_after, &c.max_steps, &c.limit_train, &c.limit_eval}) {
    if (*v < 0) throw UsageError("step and limit flags must be >= 0");
  }
  if (c.report_every < 0) {
    throw UsageError(concat("--report-every must be >= 0 (0: a report at epoch ends only), but got ",
                            c.report_every));
  }
  return c;
}

torch::Device bind_device(const Common& common) {
  try {
    return lockstep::bind_local_device(common.device);
  } catch (const InvalidArgument& e) {
    throw UsageError(concat("--device ", common.device, ": ", e.what()));
  }
}

// ---------------------------------------------------------------------------------------------
// Signals

namespace {
volatile std::sig_atomic_t g_stop = 0;
extern "C" void on_stop_signal(int) { g_stop = 1; }
}  // namespace

void install_stop_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
}

bool stop_signalled() { return g_stop != 0; }

StepEnd end_step(ProcessGroup& group, const Common& common, int64_t step, double loss,
                 double step_seconds) {
  // One all-reduce (max) per step: [0] stop, [1 + r] rank r's loss is not finite, [1 + W + r]
  // rank r's step seconds (the other ranks put 0 there, so the max is rank r's value).
  const int world = group.size();
  auto flags = torch::zeros({1 + 2 * world}, torch::kDouble);
  auto f = flags.accessor<double, 1>();
  const bool stop = stop_signalled() || (common.stop_after > 0 && step >= common.stop_after);
  f[0] = stop ? 1 : 0;
  f[1 + group.rank()] = std::isfinite(loss) ? 0 : 1;
  f[1 + world + group.rank()] = std::max(0.0, step_seconds);
  if (world > 1) group.allreduce(flags, ReduceOp::kMax)->wait();
  std::string bad;
  for (int r = 0; r < world; ++r) {
    if (f[1 + r] != 0) bad += concat(bad.empty() ? "" : ", ", r);
  }
  if (!bad.empty()) {
    throw Error(concat(group.where(), " the training loss is not finite at step ", step,
                       " on rank(s) ", bad, " (this rank's loss: ", loss,
                       "); stopping without a checkpoint of this step. Look for NaN/Inf in the "
                       "input data or lower --lr (now ", common.lr, ")."));
  }
  StepEnd end;
  end.stop = f[0] != 0;
  for (int r = 0; r < world; ++r) end.step_seconds.push_back(f[1 + world + r]);
  return end;
}

ProcessGroupPtr start(int threads) {
  torch::set_num_threads(threads);
  at::set_num_interop_threads(1);
  // Note [Preemption]: the handlers go in only once the group is up. Installed before, they
  // turned a SIGTERM during set-up into a flag nobody reads until the first step, so a rank
  // whose peer died during set-up ignored the launcher's SIGTERM until the rendezvous timeout.
  auto pg = init_process_group();
  install_stop_handlers();
  return pg;
}

void make_out_dir(ProcessGroup& group, const std::string& dir) {
  if (group.rank() == 0) ::mkdir(dir.c_str(), 0755);
  group.barrier()->wait();
}

int64_t local_batch_size(const Common& common, const ProcessGroup& group) {
  if (common.batch_size % group.size() != 0) {
    throw UsageError(concat("--batch-size ", common.batch_size, " is not divisible by the ",
                            group.size(), " ranks"));
  }
  return common.batch_size / group.size();
}

int64_t total_steps(const Common& common, int64_t per_epoch) {
  const int64_t total = per_epoch * common.epochs;
  return common.max_steps > 0 ? std::min(total, common.max_steps) : total;
}

// ---------------------------------------------------------------------------------------------
// Data order (Note [Recipe data order])

ShardedSampler train_sampler(const ProcessGroup& group, int64_t n, uint64_t seed) {
  return ShardedSampler(static_cast<size_t>(n), group,
                        ShardedSamplerOptions().seed(seed).shuffle(true).drop_last(true));
}

std::vector<int64_t> next_batch(ShardedSampler& sampler, int64_t size) {
  auto next = sampler.next(static_cast<size_t>(size));
  if (!next) return {};
  return std::vector<int64_t>(next->begin(), next->end());
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

Checkpointer::Checkpointer(ProcessGroup& group, std::string path, std::string recipe,
                           torch::nn::Module& model, torch::optim::Optimizer& optimizer,
                           ShardedSampler sampler, std::map<std::string, std::string> config)
    : group_(group),
      path_(std::move(path)),
      recipe_(std::move(recipe)),
      model_(model),
      optimizer_(optimizer),
      sampler_(std::move(sampler)),
      config_(std::move(config)) {}

int Checkpointer::exit_preempted(const Position& position) const {
  save(position);
  if (group_.rank() == 0) {
    std::printf("preempted after step %lld: checkpoint written to %s; run the same command to "
                "resume (exit code %d)\n",
                static_cast<long long>(position.step), path_.c_str(), kExitPreempted);
    std::fflush(stdout);
  }
  return kExitPreempted;
}

void Checkpointer::save(const Position& position) const {
  ProcessGroup& group = group_;
  // Every rank's generator state travels to rank 0 (dropout streams differ per rank).
  auto gen = at::detail::getDefaultCPUGenerator();
  torch::Tensor mine;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    mine = gen.get_state().clone();
  }
  std::vector<torch::Tensor> states(group.size());
  for (auto& s : states) s = torch::empty_like(mine);
  group.allgather(states, mine)->wait();
  train::Checkpoint ck;
  if (group.rank() == 0) {
    json meta = {{"recipe", recipe_},
                 {"epoch", position.epoch},
                 {"batch", position.batch},
                 {"step", position.step},
                 {"sampler", sampler_.state().to_string()},
                 {"world_size", group.size()},
                 {"config", config_},
                 {"config_hash", train::config_hash(config_)}};
    ck.metadata = meta.dump();
    train::add_module(ck, model_);
    train::add_optimizer(ck, optimizer_);
    for (int r = 0; r < group.size(); ++r) ck.tensors[concat("rng.cpu.rank", r)] = states[r];
  }
  train::save_checkpoint(group, path_, ck);
}

bool Checkpointer::load(Position& position) {
  ProcessGroup& group = group_;
  const std::string& path = path_;
  const std::map<std::string, std::string>& config = config_;
  // All ranks must agree whether there is something to resume from.
  auto exists = torch::tensor({train::checkpoint_exists(path) ? 1 : 0}, torch::kInt);
  auto any = exists.clone();
  if (group.size() > 1) {
    group.allreduce(exists, ReduceOp::kMin)->wait();
    group.allreduce(any, ReduceOp::kMax)->wait();
  }
  if (any.item<int>() == 0) return false;
  LOCKSTEP_CHECK(exists.item<int>() == 1, group.where(), " checkpoint '", path,
                 "' exists on some ranks but not on others; put it on a shared file system or "
                 "copy it to every host");
  auto ck = train::load_checkpoint(group, path);
  json meta = json::parse(ck.metadata);
  LOCKSTEP_CHECK(meta.value("recipe", "") == recipe_, "checkpoint '", path, "' was written by recipe '",
                 meta.value("recipe", ""), "', not '", recipe_, "'; use another --out-dir or --checkpoint");
  std::map<std::string, std::string> saved = meta.value("config", std::map<std::string, std::string>{});
  if (saved != config) {
    std::ostringstream os;
    os << "checkpoint '" << path << "' was written with another configuration; resume with the "
          "same settings or start afresh with another --out-dir (--resume=false overwrites it):";
    std::set<std::string> keys;
    for (auto& kv : saved) keys.insert(kv.first);
    for (auto& kv : config) keys.insert(kv.first);
    for (const auto& k : keys) {
      auto a = saved.count(k) ? saved.at(k) : "<unset>";
      auto b = config.count(k) ? config.at(k) : "<unset>";
      if (a != b) os << "\n  " << k << ": checkpoint has '" << a << "', this run has '" << b << "'";
    }
    throw InvalidArgument(os.str());
  }
  LOCKSTEP_CHECK(meta.contains("sampler") && meta.at("sampler").is_string(), "checkpoint '", path,
                 "' holds no data sampler state (written before the recipes used "
                 "lockstep::ShardedSampler); start afresh with --resume=false or another --out-dir");
  train::load_module(ck, model_);
  train::load_optimizer(ck, optimizer_);
  // Range-checked: a hostile or edited file is rejected naming the field, never resumed from.
  constexpr int64_t kMaxPosition = int64_t{1} << 53;
  position.epoch = train::metadata_int(ck, "epoch", 0, kMaxPosition, path);
  position.batch = train::metadata_int(ck, "batch", 0, kMaxPosition, path);
  position.step = train::metadata_int(ck, "step", 0, kMaxPosition, path);
  sampler_.load_state(SamplerState::from_string(meta.at("sampler").get<std::string>()));
  auto rng = ck.tensors.find(concat("rng.cpu.rank", group.rank()));
  if (meta.value("world_size", 0) == group.size() && rng != ck.tensors.end()) {
    train::load_rng_state(ck, rng->first);
  } else {
    log_warn(concat("checkpoint '", path, "' was written by ", meta.value("world_size", 0),
                    " ranks, this run has ", group.size(), ": dropout streams start afresh"));
    torch::manual_seed(static_cast<uint64_t>(position.step) * 7919 + group.rank());
  }
  if (group.rank() == 0) {
    std::printf("resumed from %s at step %lld (epoch %lld), written by %lld rank(s); this run "
                "has %d\n",
                path.c_str(), static_cast<long long>(position.step),
                static_cast<long long>(position.epoch),
                static_cast<long long>(meta.value("world_size", int64_t{0})), group.size());
    std::fflush(stdout);
  }
  return true;
}

train::MetricsWriter metrics_writer(const Common& common, int rank, const std::string& path,
                                    bool resumed, int64_t step) {
  if (rank != 0) return train::MetricsWriter(train::MetricsOptions());
  // Steps count from 1: the checkpoint at `step` covers steps <= step, the resumed run writes
  // step + 1 onwards, so TensorBoard drops what the crashed run wrote from step + 1 on.
  return train::MetricsWriter(train::MetricsOptions()
                                  .path(path)
                                  .append(resumed)
                                  .tensorboard_dir(common.tensorboard)
                                  .tensorboard_purge_step(resumed ? step + 1 : -1));
}

void write_rank_throughput(train::MetricsWriter& metrics, int64_t step,
                           const std::vector<double>& step_seconds, int64_t samples_per_rank) {
  train::MetricRecord record{"rank_throughput", {{"step", double(step)}}};
  for (size_t r = 0; r < step_seconds.size(); ++r) {
    const double s = step_seconds[r];
    record.fields.emplace_back(concat("rank", r), s > 0 ? samples_per_rank / s : 0.0);
  }
  metrics.write(record);
}

bool report_due(const Common& common, int64_t step) {
  return common.report_every > 0 && step % common.report_every == 0;
}

void write_live_report(train::ReportOptions options, const Position& position) {
  // docs/checkpoints-and-recipes.md, "Live report": the page reloads itself; the final,
  // non-live write at the end of the run stops that.
  train::write_report(options.live(true).summary(
      {{"epochs done", std::to_string(position.epoch)}, {"steps", std::to_string(position.step)}}));
}

bool finish_step(ProcessGroup& group, const Common& common, const Position& position,
                 double loss, double step_seconds, bool logged, int64_t samples_per_rank,
                 train::MetricsWriter& metrics,
                 const std::function<train::ReportOptions()>& report) {
  const StepEnd end = end_step(group, common, position.step, loss, step_seconds);
  // Every rank's step time came with the end-of-step all-reduce: one line per rank.
  if (logged) write_rank_throughput(metrics, position.step, end.step_seconds, samples_per_rank);
  if (group.rank() == 0 && report_due(common, position.step)) write_live_report(report(), position);
  return end.stop;
}

void write_ddp_stats(train::MetricsWriter& metrics, int64_t step, const DDPStats& stats) {
  metrics.write({"ddp", {{"step", double(step)},
                         {"forward_ms", stats.forward_ms},
                         {"backward_compute_ms", stats.backward_compute_ms},
                         {"comm_ms", stats.comm_ms},
                         {"exposed_comm_ms", stats.exposed_comm_ms}}});
  for (const auto& b : stats.buckets) {
    metrics.write({"bucket", {{"step", double(step)},
                              {"bucket", double(b.index)},
                              {"bytes", double(b.bytes)},
                              {"ready_ms", b.ready_ms},
                              {"start_ms", b.launched_ms},
                              {"end_ms", b.done_ms}}});
  }
}

int run_main(const std::function<int()>& body) {
  return lockstep::run_main([&]() -> int {
    try {
      return body();
    } catch (const HelpShown&) {
      return kExitOk;
    } catch (const UsageError& e) {
      std::cerr << "error: " << e.what() << "\n";
      return kExitUsage;
    }
  });
}

train::ReportOptions report_options(const Common& common, const std::string& metrics_path,
                                    const std::string& title,
                                    const std::map<std::string, std::string>& config, int argc,
                                    char** argv) {
  return train::ReportOptions()
      .metrics_path(metrics_path)
      .output_path(common.out_dir + "/report.html")
      .title(title)
      .settings(config)
      .command(command_line(argc, argv));
}

std::string command_line(int argc, char** argv) {
  std::string line;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    const bool plain = !a.empty() && a.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                         "0123456789-_./=:,+@%") == std::string::npos;
    if (!line.empty()) line += ' ';
    if (plain) {
      line += a;
    } else {
      line += '\'';
      for (char c : a) line += c == '\'' ? std::string("'\\''") : std::string(1, c);
      line += '\'';
    }
  }
  return line;
}

std::string seconds_text(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%d:%02d", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  return buf;
}

}  // namespace recipe
}  // namespace lockstep
