// Fashion-MNIST: a two-convolution CNN trained data-parallel on the real dataset
// (Debian package dataset-fashion-mnist), evaluated on its 10,000 test images.
//
//   lockstep-run --nproc-per-node 2 lockstep-fashion-mnist --out-dir out/fashion_mnist
//
// Ends by printing the test accuracy and the path of the HTML report. Resumes from
// OUT_DIR/checkpoint.lsck when present. See recipes/common/recipe.h for exit codes.

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <iostream>

#include "lockstep/readers.h"
#include "lockstep/train/interop.h"
#include "recipe.h"

using namespace lockstep;
using lockstep::detail::concat;

namespace {

struct Split {
  torch::Tensor images;  // N x 1 x 28 x 28 float, normalised
  torch::Tensor labels;  // N long
};

// The library's bounded IDX reader (lockstep/readers.h): header claims are checked against the
// file before anything is allocated, every label against the 10 classes (naming file, record
// and offset), and an unreadable file is told apart from a missing one.
Split load_split(const std::string& dir, const std::string& prefix, int64_t limit) {
  const std::string images_path = dir + "/" + prefix + "-images-idx3-ubyte.gz";
  const std::string labels_path = dir + "/" + prefix + "-labels-idx1-ubyte.gz";
  for (const auto& path : {images_path, labels_path}) {
    if (access(path.c_str(), F_OK) != 0 && errno == ENOENT) {
      throw InvalidArgument(concat("'", path, "' does not exist; install the Debian package "
                                   "dataset-fashion-mnist or pass --data-dir"));
    }
  }
  auto set = lockstep::load_idx_dataset(
      images_path, labels_path,
      lockstep::IdxDatasetOptions().normalize(false).channel_dim(false).num_classes(10));
  auto images = set.data();
  auto labels = set.target();
  if (limit > 0 && limit < images.size(0)) {
    images = images.narrow(0, 0, limit);
    labels = labels.narrow(0, 0, limit);
  }
  // Mean and standard deviation of the Fashion-MNIST training pixels.
  auto x = (images.to(torch::kFloat).div_(255.0).sub_(0.2860).div_(0.3530)).unsqueeze(1);
  return {x.contiguous(), labels.to(torch::kLong)};
}

// With `batch_norm`, a BatchNorm after each convolution: SyncBatchNorm over `group` when it
// has more than one rank (statistics of the global batch), plain BatchNorm2d otherwise.
struct NetImpl : torch::nn::Module {
  NetImpl(int64_t c1, int64_t c2, int64_t hidden, double dropout, bool batch_norm = false,
          const ProcessGroupPtr& group = nullptr) {
    conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, c1, 3).padding(1)));
    conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(c1, c2, 3).padding(1)));
    fc1 = register_module("fc1", torch::nn::Linear(c2 * 7 * 7, hidden));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, 10));
    drop = register_module("drop", torch::nn::Dropout(dropout));
    if (batch_norm) {
      bn1 = make_norm("bn1", c1, group);
      bn2 = make_norm("bn2", c2, group);
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    // BatchNorm in float32 (under bf16 autocast the convolutions return bfloat16, and the
    // CPU batch-norm kernels of LibTorch 1.13 refuse mixed dtypes).
    x = conv1(x);
    if (!bn1.is_empty()) x = bn1.forward(x.to(torch::kFloat));
    x = torch::max_pool2d(torch::relu(x), 2);
    x = conv2(x);
    if (!bn2.is_empty()) x = bn2.forward(x.to(torch::kFloat));
    x = torch::max_pool2d(torch::relu(x), 2);
    x = drop(torch::relu(fc1(x.flatten(1))));
    return fc2(x);
  }
  torch::nn::AnyModule make_norm(const std::string& name, int64_t channels,
                                 const ProcessGroupPtr& group) {
    if (group && group->size() > 1) {
      return torch::nn::AnyModule(register_module(
          name, lockstep::SyncBatchNorm(lockstep::SyncBatchNormOptions(channels, group))));
    }
    return torch::nn::AnyModule(register_module(name, torch::nn::BatchNorm2d(channels)));
  }
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::Dropout drop{nullptr};
  torch::nn::AnyModule bn1, bn2;
};
TORCH_MODULE(Net);

// Accuracy and mean loss over `split`, sharded over ranks and summed, computed on `device`.
// Collective.
std::pair<double, double> evaluate(ProcessGroup& pg, Net& net, const Split& split,
                                   const torch::Device& device) {
  torch::NoGradGuard no_grad;
  net->eval();
  const int64_t n = split.images.size(0);
  const int64_t per = (n + pg.size() - 1) / pg.size();
  const int64_t begin = std::min(n, per * pg.rank()), end = std::min(n, begin + per);
  auto sums = torch::zeros({3}, torch::kDouble);  // correct, loss sum, count
  for (int64_t i = begin; i < end; i += 1000) {
    int64_t len = std::min<int64_t>(1000, end - i);
    auto logits = net->forward(split.images.narrow(0, i, len).to(device));
    auto y = split.labels.narrow(0, i, len).to(device);
    sums[0] += logits.argmax(1).eq(y).sum().item<double>();
    sums[1] += torch::nn::functional::cross_entropy(
                   logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                   .item<double>();
    sums[2] += static_cast<double>(len);
  }
  if (pg.size() > 1) pg.allreduce(sums)->wait();
  net->train();
  double count = std::max(1.0, sums[2].item<double>());
  return {sums[0].item<double>() / count, sums[1].item<double>() / count};
}

int run(int argc, char** argv) {
  cxxopts::Options options("lockstep-fashion-mnist",
                           "Trains a two-convolution CNN on Fashion-MNIST with lockstep, on 1 or "
                           "more ranks (launch with lockstep-run or torchrun).");
  recipe::add_common_options(options, /*epochs=*/3, /*batch=*/64, /*lr=*/1e-3);
  // clang-format off
  options.add_options("fashion_mnist")
    ("data-dir", "Directory of the *-idx?-ubyte.gz files", cxxopts::value<std::string>()->default_value("/usr/share/datasets/fashion-mnist"))
    ("conv1", "Channels of the first convolution", cxxopts::value<int64_t>()->default_value("32"))
    ("conv2", "Channels of the second convolution", cxxopts::value<int64_t>()->default_value("64"))
    ("hidden", "Width of the hidden fully-connected layer", cxxopts::value<int64_t>()->default_value("128"))
    ("dropout", "Dropout before the last layer", cxxopts::value<double>()->default_value("0.25"))
    ("batch-norm", "BatchNorm after each convolution, synchronized over the ranks (SyncBatchNorm)")
    ("autocast", "Mixed precision: off, or bf16 (autocast forward with a GradScaler)",
     cxxopts::value<std::string>()->default_value("off"));
  // clang-format on
  auto args = recipe::parse(options, argc, argv);
  auto common = recipe::read_common(args);
  const std::string data_dir = args["data-dir"].as<std::string>();
  const int64_t c1 = args["conv1"].as<int64_t>(), c2 = args["conv2"].as<int64_t>();
  const int64_t hidden = args["hidden"].as<int64_t>();
  const double dropout = args["dropout"].as<double>();
  if (c1 < 1 || c2 < 1 || hidden < 1) throw recipe::UsageError("--conv1, --conv2 and --hidden must be >= 1");
  if (dropout < 0 || dropout >= 1) throw recipe::UsageError(concat("--dropout must be in [0, 1), but got ", dropout));
  const bool batch_norm = args.count("batch-norm") > 0;
  const std::string autocast_mode = args["autocast"].as<std::string>();
  if (autocast_mode != "off" && autocast_mode != "bf16") {
    throw recipe::UsageError(concat("--autocast must be off or bf16, but got '", autocast_mode, "'"));
  }
  const bool autocast = autocast_mode == "bf16";

  const torch::Device device = recipe::bind_device(common);  // Note [Recipe device]
  auto pg = recipe::start(common.threads);  // installs the stop handlers once joined
  const int rank = pg->rank(), world = pg->size();
  const int64_t local = recipe::local_batch_size(common, *pg);
  auto config = common.as_config();
  config["recipe"] = "fashion_mnist";
  config["conv1"] = std::to_string(c1);
  config["conv2"] = std::to_string(c2);
  config["hidden"] = std::to_string(hidden);
  config["dropout"] = concat(dropout);
  if (batch_norm) config["batch_norm"] = "sync";
  if (autocast) config["autocast"] = "bf16";
  train::check_config_agreement(*pg, config);  // before step 0, naming any differing keys

  recipe::make_out_dir(*pg, common.out_dir);
  auto train_set = load_split(data_dir, "train", common.limit_train);
  auto test_set = load_split(data_dir, "t10k", common.limit_eval);

  torch::manual_seed(common.seed);  // same initial weights on every rank
  Net net(c1, c2, hidden, dropout, batch_norm, pg);
  net->to(device);  // before the optimizer takes its parameters
  torch::optim::Adam optimizer(net->parameters(), torch::optim::AdamOptions(common.lr));
  // Mixed precision (--autocast bf16): the forward under CPU bfloat16 autocast, the loss scaled
  // by a GradScaler whose skip decision every rank shares (DDP's gradients are identical on
  // every rank). Its scale is not checkpointed: a resumed run starts from the initial scale.
  lockstep::GradScaler scaler(lockstep::GradScalerOptions().enabled(autocast));
  // Each rank draws its share of every epoch from the sharded sampler (Note [Recipe data
  // order]); the last local batch of an epoch may be short.
  const int64_t n = train_set.images.size(0);
  auto sampler = recipe::train_sampler(*pg, n, common.seed);
  const int64_t per_epoch = (static_cast<int64_t>(sampler.size()) + local - 1) / local;
  LOCKSTEP_CHECK(per_epoch > 0, "the training set (", n, " examples) is smaller than the ", world, " ranks");
  const int64_t total = recipe::total_steps(common, per_epoch);
  recipe::Checkpointer checkpointer(*pg, common.checkpoint, "fashion_mnist", *net, optimizer, sampler, config);
  recipe::Position pos;
  bool resumed = common.resume && checkpointer.load(pos);
  if (!resumed) torch::manual_seed(common.seed * 31 + static_cast<uint64_t>(rank) + 1);  // dropout
  // Averages gradients, overlapped with backward; a NaN or Inf gradient stops every rank,
  // naming the step, rank and parameter where it began.
  DistributedDataParallel ddp(net, pg,
                              recipe::ddp_options(common));

  const std::string metrics_path = common.out_dir + "/metrics.jsonl";
  const char* const kReportTitle = "lockstep: Fashion-MNIST CNN";
  // A crash after the checkpoint left records the resumed run writes again: drop them.
  if (rank == 0 && resumed) train::rewind_metrics(metrics_path, pos.step, /*epochs_done=*/pos.epoch);
  train::MetricsWriter metrics = recipe::metrics_writer(common, rank, metrics_path, resumed, pos.step);
  train::Progress progress(train::ProgressOptions().total_steps(total).rank(rank).tty(common.progress));
  if (rank == 0) {
    std::printf("fashion_mnist: %d rank(s), %lld training / %lld test images, global batch %lld, "
                "%lld steps%s\n",
                world, static_cast<long long>(n), static_cast<long long>(test_set.images.size(0)),
                static_cast<long long>(common.batch_size), static_cast<long long>(total),
                resumed ? concat(", resumed at step ", pos.step).c_str() : "");
    std::fflush(stdout);
  }

  auto t_start = std::chrono::steady_clock::now();
  bool preempted = false;
  while (pos.step < total && !preempted) {
    progress.set_label(concat("epoch ", pos.epoch + 1, "/", common.epochs));
    double loss_sum = 0;
    int64_t loss_count = 0;
    auto t_epoch = std::chrono::steady_clock::now();
    while (pos.batch < per_epoch && pos.step < total) {
      auto idx = recipe::next_batch(sampler, local);
      if (idx.empty()) break;
      auto index = torch::from_blob(idx.data(), {static_cast<int64_t>(idx.size())}, torch::kLong);
      auto x = train_set.images.index_select(0, index).to(device);
      auto y = train_set.labels.index_select(0, index).to(device);
      auto t0 = std::chrono::steady_clock::now();
      optimizer.zero_grad();
      torch::Tensor loss;
      {
        lockstep::AutocastGuard mixed(device, torch::kBFloat16, autocast);
        loss = torch::nn::functional::cross_entropy(ddp->forward(x), y);
      }
      if (autocast) {
        scaler.scale(loss).backward();
        scaler.step(optimizer);  // skipped on every rank alike when a gradient overflowed
        scaler.update();
      } else {
        loss.backward();
        optimizer.step();
      }
      ++pos.step;
      ++pos.batch;
      double l = loss.item<double>();
      loss_sum += l;
      ++loss_count;
      double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      progress.update(pos.step, common.batch_size, l);
      const bool logged = pos.step % 20 == 0 || pos.step == total;
      if (logged) {
        metrics.write({"step", {{"step", double(pos.step)}, {"epoch", double(pos.epoch)},
                                {"loss", l}, {"samples_per_s", common.batch_size / dt}}});
        if (world > 1) recipe::write_ddp_stats(metrics, pos.step, ddp->last_stats());
      }
      const auto report = [&] {
        return recipe::report_options(common, metrics_path, kReportTitle, config, argc, argv);
      };
      if (recipe::finish_step(*pg, common, pos, l, dt, logged, static_cast<int64_t>(idx.size()),
                              metrics, report)) {
        preempted = true;
        break;
      }
      if (common.checkpoint_every > 0 && pos.step % common.checkpoint_every == 0) checkpointer.save(pos);
    }
    if (preempted) break;
    if (pos.batch >= per_epoch) {  // epoch finished: evaluate, checkpoint
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_epoch).count();
      auto [acc, test_loss] = evaluate(*pg, net, test_set, device);
      progress.finish();
      metrics.write({"epoch", {{"epoch", double(pos.epoch + 1)},
                               {"train_loss", loss_sum / std::max<int64_t>(1, loss_count)},
                               {"test_loss", test_loss},
                               {"test_accuracy", acc},
                               {"samples_per_s", loss_count * common.batch_size / secs}}});
      if (rank == 0) {
        std::printf("epoch %lld: train loss %.4f, test loss %.4f, test accuracy %.2f%% (%s)\n",
                    static_cast<long long>(pos.epoch + 1), loss_sum / std::max<int64_t>(1, loss_count),
                    test_loss, 100 * acc, recipe::seconds_text(secs).c_str());
        std::fflush(stdout);
      }
      ++pos.epoch;
      pos.batch = 0;
      sampler.set_epoch(pos.epoch);
      // A live report at each epoch end: an open browser tab follows the run.
      if (rank == 0) {
        recipe::write_live_report(
            recipe::report_options(common, metrics_path, kReportTitle, config, argc, argv), pos);
      }
    }
    checkpointer.save(pos);
  }
  progress.finish();
  if (preempted) return checkpointer.exit_preempted(pos);
  auto [acc, test_loss] = evaluate(*pg, net, test_set, device);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  if (rank == 0) {
    const std::string weights = common.out_dir + "/fashion_mnist_weights.pt";
    train::export_weights(*net, weights);
    const std::string report = common.out_dir + "/report.html";
    train::write_report(recipe::report_options(common, metrics_path, kReportTitle, config, argc, argv)
                            .summary({{"test accuracy", concat(100 * acc, " %")},
                                      {"test loss", concat(test_loss)},
                                      {"ranks", std::to_string(world)},
                                      {"global batch", std::to_string(common.batch_size)},
                                      {"steps", std::to_string(pos.step)},
                                      {"config hash", train::config_hash(config)},
                                      {"weights (torch.load)", weights}}));
    std::printf("test accuracy: %.2f%% (test loss %.4f, %lld steps, %d rank(s), this run %s)\n",
                100 * acc, test_loss, static_cast<long long>(pos.step), world,
                recipe::seconds_text(secs).c_str());
    std::printf("report: %s\n", report.c_str());
    std::fflush(stdout);
  }
  pg->barrier()->wait();
  return recipe::kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  return recipe::run_main([&] { return run(argc, argv); });
}
