// A character-level language model (a small causal Transformer) trained data-parallel on
// real English text shipped by Debian: the fortune cookie files of the `fortunes` package
// (/usr/share/games/fortunes; BSD licence, see /usr/share/doc/fortunes/copyright). Reports
// training and validation loss (nats per character) and prints a short generated sample.
//
//   lockstep-run --nproc-per-node 2 lockstep-char-lm --out-dir out/char_lm
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <sstream>

#include "recipe.h"

using namespace lockstep;
using lockstep::detail::concat;

namespace {

// The files' text with the '%' separator lines removed; fortunes are separated by a blank
// line. Bytes outside printable ASCII and newline are dropped (vocabulary of 96 symbols).
std::string read_corpus(const std::string& dir, const std::vector<std::string>& files) {
  std::string text;
  for (const auto& f : files) {
    std::ifstream in(dir + "/" + f);
    if (!in) throw InvalidArgument(concat("cannot read '", dir, "/", f, "'; install the Debian package "
                                          "fortunes or pass --text-dir/--text-files"));
    std::string line;
    while (std::getline(in, line)) {
      if (line == "%") {
        text += "\n";
        continue;
      }
      for (char c : line) {
        if ((c >= 32 && c < 127) || c == '\t') text += (c == '\t' ? ' ' : c);
      }
      text += "\n";
    }
  }
  return text;
}

// 0: newline, 1..95: ' '..'~'.
int64_t encode(char c) { return c == '\n' ? 0 : (c - 31); }
char decode(int64_t v) { return v == 0 ? '\n' : static_cast<char>(v + 31); }
constexpr int64_t kVocab = 96;

struct LMImpl : torch::nn::Module {
  LMImpl(int64_t context, int64_t d_model, int64_t heads, int64_t layers, double dropout)
      : context_(context) {
    tok = register_module("tok", torch::nn::Embedding(kVocab, d_model));
    pos = register_module("pos", torch::nn::Embedding(context, d_model));
    encoder = register_module(
        "encoder", torch::nn::TransformerEncoder(
                       torch::nn::TransformerEncoderOptions(
                           torch::nn::TransformerEncoderLayerOptions(d_model, heads)
                               .dim_feedforward(4 * d_model)
                               .dropout(dropout)
                               .activation(torch::kGELU),
                           layers)
                           .norm(torch::nn::AnyModule(torch::nn::LayerNorm(
                               torch::nn::LayerNormOptions({d_model}))))));
    head = register_module("head", torch::nn::Linear(d_model, kVocab));
    mask_ = torch::nn::TransformerImpl::generate_square_subsequent_mask(context);
  }
  // tokens: N x S (S <= context) -> logits N x S x vocab.
  torch::Tensor forward(torch::Tensor tokens) {
    const int64_t s = tokens.size(1);
    auto positions = torch::arange(s, tokens.options());
    if (mask_.device() != tokens.device()) mask_ = mask_.to(tokens.device());  // not a buffer
    auto h = tok(tokens) + pos(positions).unsqueeze(0);
    h = encoder(h.transpose(0, 1), mask_.narrow(0, 0, s).narrow(1, 0, s));
    return head(h.transpose(0, 1));
  }
  int64_t context_;
  torch::Tensor mask_;
  torch::nn::Embedding tok{nullptr}, pos{nullptr};
  torch::nn::TransformerEncoder encoder{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(LM);

// Mean cross-entropy (nats/char) over non-overlapping windows of `data`, sharded, computed on
// `device`. Collective.
double evaluate(ProcessGroup& pg, LM& lm, const torch::Tensor& data, int64_t context, int64_t limit,
                const torch::Device& device) {
  torch::NoGradGuard no_grad;
  lm->eval();
  int64_t windows = (data.numel() - 1) / context;
  if (limit > 0) windows = std::min(windows, limit);
  auto sums = torch::zeros({2}, torch::kDouble);
  for (int64_t w = pg.rank(); w < windows; w += pg.size() * 32) {
    std::vector<torch::Tensor> xs, ys;
    for (int64_t k = w; k < std::min(windows, w + pg.size() * 32); k += pg.size()) {
      xs.push_back(data.narrow(0, k * context, context));
      ys.push_back(data.narrow(0, k * context + 1, context));
    }
    auto x = torch::stack(xs).to(device), y = torch::stack(ys).to(device);
    auto logits = lm->forward(x);
    sums[0] += torch::nn::functional::cross_entropy(
                   logits.reshape({-1, kVocab}), y.reshape({-1}),
                   torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                   .item<double>();
    sums[1] += static_cast<double>(y.numel());
  }
  if (pg.size() > 1) pg.allreduce(sums)->wait();
  lm->train();
  return sums[0].item<double>() / std::max(1.0, sums[1].item<double>());
}

std::string generate(LM& lm, const std::string& prompt, int64_t length, int64_t context,
                     double temperature, uint64_t seed, const torch::Device& device) {
  torch::NoGradGuard no_grad;
  lm->eval();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<int64_t> ids;
  for (char c : prompt) ids.push_back(encode(c));
  std::string out = prompt;
  for (int64_t i = 0; i < length; ++i) {
    int64_t start = std::max<int64_t>(0, static_cast<int64_t>(ids.size()) - context);
    auto x = torch::tensor(std::vector<int64_t>(ids.begin() + start, ids.end()), torch::kLong).unsqueeze(0).to(device);
    // Sampled on the CPU with the seeded CPU generator, whatever the device.
    auto logits = lm->forward(x).select(1, x.size(1) - 1).squeeze(0).to(torch::kCPU) / temperature;
    auto next = torch::multinomial(torch::softmax(logits, 0), 1, false, gen).item<int64_t>();
    ids.push_back(next);
    out += decode(next);
  }
  lm->train();
  return out;
}

int run(int argc, char** argv) {
  cxxopts::Options options("lockstep-char-lm",
                           "Trains a small character-level Transformer language model on the "
                           "English fortune files of Debian's `fortunes` package (BSD licence), "
                           "on 1 or more ranks; reports train/validation loss and a sample.");
  recipe::add_common_options(options, /*epochs=*/2, /*batch=*/32, /*lr=*/1e-3);
  // clang-format off
  options.add_options("char_lm")
    ("text-dir", "Directory of the text files", cxxopts::value<std::string>()->default_value("/usr/share/games/fortunes"))
    ("text-files", "Comma-separated files in --text-dir", cxxopts::value<std::vector<std::string>>()->default_value("wisdom,literature,humorists,people,love,education"))
    ("context", "Characters per training window", cxxopts::value<int64_t>()->default_value("64"))
    ("d-model", "Transformer width", cxxopts::value<int64_t>()->default_value("128"))
    ("heads", "Attention heads", cxxopts::value<int64_t>()->default_value("4"))
    ("layers", "Transformer layers", cxxopts::value<int64_t>()->default_value("2"))
    ("dropout", "Dropout in the Transformer layers", cxxopts::value<double>()->default_value("0.1"))
    ("val-fraction", "Fraction of the text (its end) held out for validation", cxxopts::value<double>()->default_value("0.1"))
    ("sample-length", "Characters to generate at the end", cxxopts::value<int64_t>()->default_value("300"))
    ("prompt", "Start of the generated sample", cxxopts::value<std::string>()->default_value("The "));
  // clang-format on
  auto args = recipe::parse(options, argc, argv);
  auto common = recipe::read_common(args);
  const auto dir = args["text-dir"].as<std::string>();
  const auto files = args["text-files"].as<std::vector<std::string>>();
  const int64_t context = args["context"].as<int64_t>(), d_model = args["d-model"].as<int64_t>();
  const int64_t heads = args["heads"].as<int64_t>(), layers = args["layers"].as<int64_t>();
  const double dropout = args["dropout"].as<double>(), val_fraction = args["val-fraction"].as<double>();
  const int64_t sample_length = args["sample-length"].as<int64_t>();
  const std::string prompt = args["prompt"].as<std::string>();
  if (context < 2 || d_model < 1 || heads < 1 || layers < 1 || d_model % heads != 0) {
    throw recipe::UsageError("--context must be >= 2, --d-model, --heads, --layers >= 1, and "
                             "--d-model divisible by --heads");
  }
  if (!(val_fraction > 0 && val_fraction < 1)) throw recipe::UsageError("--val-fraction must be in (0, 1)");
  for (char c : prompt) {
    if (!(c == '\n' || (c >= 32 && c < 127))) throw recipe::UsageError("--prompt must be printable ASCII");
  }

  const torch::Device device = recipe::bind_device(common);  // Note [Recipe device]
  auto pg = recipe::start(common.threads);  // installs the stop handlers once joined
  const int rank = pg->rank(), world = pg->size();
  const int64_t local = recipe::local_batch_size(common, *pg);
  auto config = common.as_config();
  config["recipe"] = "char_lm";
  std::string joined;
  for (const auto& f : files) joined += (joined.empty() ? "" : ",") + f;
  config["text-files"] = joined;
  config["context"] = std::to_string(context);
  config["d-model"] = std::to_string(d_model);
  config["heads"] = std::to_string(heads);
  config["layers"] = std::to_string(layers);
  config["dropout"] = concat(dropout);
  config["val-fraction"] = concat(val_fraction);
  train::check_config_agreement(*pg, config);
  recipe::make_out_dir(*pg, common.out_dir);

  std::string text = read_corpus(dir, files);
  std::vector<int64_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = encode(text[i]);
  auto all = torch::tensor(ids, torch::kLong);
  const int64_t split = static_cast<int64_t>(all.numel() * (1 - val_fraction));
  auto train_data = all.narrow(0, 0, split);
  auto val_data = all.narrow(0, split, all.numel() - split);
  // Example i is the window starting at i * context (targets shifted by one character).
  int64_t n = (train_data.numel() - 1) / context;
  if (common.limit_train > 0) n = std::min(n, common.limit_train);

  torch::manual_seed(common.seed);
  LM lm(context, d_model, heads, layers, dropout);
  lm->to(device);  // before the optimizer takes its parameters
  torch::optim::AdamW optimizer(lm->parameters(), torch::optim::AdamWOptions(common.lr).weight_decay(0.01));
  // Full local batches of windows from the sharded sampler (Note [Recipe data order]).
  auto sampler = recipe::train_sampler(*pg, n, common.seed);
  const int64_t per_epoch = static_cast<int64_t>(sampler.size()) / local;
  LOCKSTEP_CHECK(per_epoch > 0, "the text gives ", n, " windows, fewer than one global batch (", common.batch_size, ")");
  const int64_t total = recipe::total_steps(common, per_epoch);
  recipe::Checkpointer checkpointer(*pg, common.checkpoint, "char_lm", *lm, optimizer, sampler, config);
  recipe::Position pos;
  bool resumed = common.resume && checkpointer.load(pos);
  if (!resumed) torch::manual_seed(common.seed * 31 + static_cast<uint64_t>(rank) + 1);
  // Averages gradients, overlapped with backward; a NaN or Inf gradient stops every rank,
  // naming the step, rank and parameter where it began.
  DistributedDataParallel ddp(lm, pg,
                              recipe::ddp_options(common));
  const std::string metrics_path = common.out_dir + "/metrics.jsonl";
  const char* const kReportTitle = "lockstep: character-level Transformer on Debian's fortunes";
  // A crash after the checkpoint left records the resumed run writes again: drop them.
  if (rank == 0 && resumed) train::rewind_metrics(metrics_path, pos.step, /*epochs_done=*/pos.epoch);
  train::MetricsWriter metrics = recipe::metrics_writer(common, rank, metrics_path, resumed, pos.step);
  train::Progress progress(train::ProgressOptions().total_steps(total).rank(rank).tty(common.progress));
  if (rank == 0) {
    std::printf("char_lm: %d rank(s), %lld training / %lld validation characters from %zu files, "
                "%lld steps%s\n",
                world, static_cast<long long>(train_data.numel()), static_cast<long long>(val_data.numel()),
                files.size(), static_cast<long long>(total),
                resumed ? concat(", resumed at step ", pos.step).c_str() : "");
    std::fflush(stdout);
  }
  auto t_start = std::chrono::steady_clock::now();
  bool preempted = false;
  double last_train = NAN;
  while (pos.step < total && !preempted) {
    progress.set_label(concat("epoch ", pos.epoch + 1, "/", common.epochs));
    double loss_sum = 0;
    int64_t count = 0;
    while (pos.batch < per_epoch && pos.step < total) {
      auto idx = recipe::next_batch(sampler, local);
      if (static_cast<int64_t>(idx.size()) < local) break;
      std::vector<torch::Tensor> xs, ys;
      for (auto i : idx) {
        xs.push_back(train_data.narrow(0, i * context, context));
        ys.push_back(train_data.narrow(0, i * context + 1, context));
      }
      auto x = torch::stack(xs).to(device), y = torch::stack(ys).to(device);
      auto t0 = std::chrono::steady_clock::now();
      optimizer.zero_grad();
      auto loss = torch::nn::functional::cross_entropy(ddp->forward(x).reshape({-1, kVocab}), y.reshape({-1}));
      loss.backward();
      torch::nn::utils::clip_grad_norm_(lm->parameters(), 1.0);
      optimizer.step();
      ++pos.step;
      ++pos.batch;
      double l = loss.item<double>();
      loss_sum += l;
      ++count;
      double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      progress.update(pos.step, common.batch_size, l);
      const bool logged = pos.step % 10 == 0 || pos.step == total;
      if (logged) {
        metrics.write({"step", {{"step", double(pos.step)}, {"loss", l},
                                {"chars_per_s", common.batch_size * context / dt}}});
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
    if (count > 0) last_train = loss_sum / count;
    if (pos.batch >= per_epoch) {
      double val = evaluate(*pg, lm, val_data, context, common.limit_eval, device);
      progress.finish();
      metrics.write({"epoch", {{"epoch", double(pos.epoch + 1)}, {"train_loss", last_train}, {"val_loss", val}}});
      if (rank == 0) {
        std::printf("epoch %lld: train loss %.4f, validation loss %.4f nats/char (%.3f bits/char)\n",
                    static_cast<long long>(pos.epoch + 1), last_train, val, val / std::log(2.0));
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
  double val = evaluate(*pg, lm, val_data, context, common.limit_eval, device);
  double train_loss = evaluate(*pg, lm, train_data, context, common.limit_eval > 0 ? common.limit_eval : 2000, device);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  if (rank == 0) {
    std::string sample = generate(lm, prompt, sample_length, context, 0.8, common.seed, device);
    const std::string report = common.out_dir + "/report.html";
    train::write_report(recipe::report_options(common, metrics_path, kReportTitle, config, argc, argv)
                            .summary({{"train loss (nats/char)", concat(train_loss)},
                                      {"validation loss (nats/char)", concat(val)},
                                      {"uniform baseline (nats/char)", concat(std::log(double(kVocab)))},
                                      {"ranks", std::to_string(world)},
                                      {"steps", std::to_string(pos.step)},
                                      {"text", concat(dir, ": ", joined, " (BSD licence)")}})
                            .preformatted(sample));
    std::printf("train loss %.4f, validation loss %.4f nats/char (uniform: %.4f); %lld steps on %d "
                "rank(s), this run %s\nsample:\n%s\nreport: %s\n",
                train_loss, val, std::log(double(kVocab)), static_cast<long long>(pos.step), world,
                recipe::seconds_text(secs).c_str(), sample.c_str(), report.c_str());
    std::fflush(stdout);
  }
  pg->barrier()->wait();
  return recipe::kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  return recipe::run_main([&] { return run(argc, argv); });
}
