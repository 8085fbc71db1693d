// Sales forecasting from a CSV (date, store, promo, holiday, sales): an MLP predicts each
// store's next-day sales from the last four weeks, trained data-parallel; reports validation
// error against the seasonal-naive baseline (the same weekday one week earlier).
//
// No Debian package ships a retail sales table, so by default the recipe generates one with
// the documented process of `generate_sales` below (seeded, so every run and every rank
// sees the same file) and then reads it back through the CSV reader like any user file.
// Pass --data FILE.csv with the same columns to use real data.
//
//   lockstep-run --nproc-per-node 2 lockstep-sales-forecast --out-dir out/sales
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>
#include <sys/stat.h>

#include "recipe.h"

using namespace lockstep;
using lockstep::detail::concat;

namespace {

// Note [Synthetic sales data]
// For store s in [0, stores) and day d in [0, days) (day 0 is a Monday, 2020-01-06):
//   level_s   ~ U(80, 220)                        store size
//   trend     = 1 + growth_s * d / 365,  growth_s ~ U(-0.05, 0.15)
//   weekly    = {0.85, 0.9, 0.95, 1.0, 1.15, 1.4, 0.75}[weekday]   Mon..Sun
//   yearly    = 1 + 0.15 * sin(2 pi (d + phase_s) / 365.25),  phase_s ~ U(0, 30)
//   promo     ~ Bernoulli(0.12) per store-day, lifts sales by 25%, and by 8% the day after
//   holiday   = 1 on fixed days of the year (1 Jan, 25/26 Dec, a spring and a summer day):
//               sales x 0.3
//   sales     = level_s * trend * weekly * yearly * promo * holiday * exp(N(0, 0.08)),
//               rounded to whole units
// The generator is std::mt19937_64 seeded with --data-seed.
void generate_sales(const std::string& path, int stores, int days, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u01(0, 1);
  std::normal_distribution<double> noise(0, 0.08);
  const double weekly[7] = {0.85, 0.9, 0.95, 1.0, 1.15, 1.4, 0.75};
  const std::tm epoch_tm = [] {
    std::tm t{};
    t.tm_year = 120;
    t.tm_mon = 0;
    t.tm_mday = 6;
    return t;
  }();
  std::ofstream out(path + ".tmp");
  out << "date,store,promo,holiday,sales\n";
  for (int s = 0; s < stores; ++s) {
    double level = 80 + 140 * u01(rng), growth = -0.05 + 0.2 * u01(rng), phase = 30 * u01(rng);
    int prev_promo = 0;
    for (int d = 0; d < days; ++d) {
      std::tm t = epoch_tm;
      t.tm_mday += d;
      std::mktime(&t);
      int yday = t.tm_yday;
      bool holiday = yday == 0 || (t.tm_mon == 11 && (t.tm_mday == 25 || t.tm_mday == 26)) ||
                     yday == 100 || yday == 200;
      int promo = u01(rng) < 0.12 ? 1 : 0;
      double v = level * (1 + growth * d / 365.0) * weekly[d % 7] *
                 (1 + 0.15 * std::sin(2 * M_PI * (d + phase) / 365.25)) * (promo ? 1.25 : 1.0) *
                 (prev_promo ? 1.08 : 1.0) * (holiday ? 0.3 : 1.0) * std::exp(noise(rng));
      prev_promo = promo;
      char date[16];
      std::strftime(date, sizeof(date), "%Y-%m-%d", &t);
      out << date << "," << s << "," << promo << "," << (holiday ? 1 : 0) << ","
          << std::lround(v) << "\n";
    }
  }
  out.close();
  if (!out || std::rename((path + ".tmp").c_str(), path.c_str()) != 0) {
    throw Error(concat("could not write '", path, "'"));
  }
}

struct Table {
  std::vector<std::string> dates;  // per row
  std::vector<int64_t> store;
  std::vector<double> promo, holiday, sales;
};

// Reads the CSV, checking the header and every field; errors name the file, line and column.
Table read_csv(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InvalidArgument(concat("cannot read '", path, "'"));
  std::string line;
  std::getline(in, line);
  if (!line.empty() && line.back() == '\r') line.pop_back();
  LOCKSTEP_CHECK(line == "date,store,promo,holiday,sales", "'", path,
                 "': expected the header 'date,store,promo,holiday,sales', but got '", line, "'");
  Table t;
  size_t lineno = 1;
  while (std::getline(in, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    std::vector<std::string> f;
    std::stringstream ss(line);
    std::string cell;
    while (std::getline(ss, cell, ',')) f.push_back(cell);
    LOCKSTEP_CHECK(f.size() == 5, "'", path, "' line ", lineno, ": expected 5 fields, got ", f.size());
    try {
      size_t used = 0;
      t.store.push_back(std::stoll(f[1], &used));
      t.promo.push_back(std::stod(f[2]));
      t.holiday.push_back(std::stod(f[3]));
      t.sales.push_back(std::stod(f[4]));
    } catch (const std::exception&) {
      throw InvalidArgument(concat("'", path, "' line ", lineno, ": a field is not a number: '", line, "'"));
    }
    t.dates.push_back(f[0]);
  }
  LOCKSTEP_CHECK(!t.sales.empty(), "'", path, "' has no rows");
  return t;
}

constexpr int kLags = 28;

// One example per (store, day >= kLags): features from the previous four weeks of that store
// (sales / store mean), the target day's weekday, promo and holiday flags; target = sales /
// store mean. Rows must be grouped by store and sorted by date (as the generator writes them).
struct Examples {
  torch::Tensor x, y, scale, naive;  // naive: sales 7 days earlier (the baseline), raw units
  torch::Tensor day;                 // day index within its store, to split by time
};

Examples build(const Table& t) {
  std::vector<float> xs, ys, scales, naive, days;
  const size_t n = t.sales.size();
  size_t begin = 0;
  while (begin < n) {
    size_t end = begin;
    while (end < n && t.store[end] == t.store[begin]) ++end;
    double mean = 0;
    for (size_t i = begin; i < end; ++i) mean += t.sales[i];
    mean = std::max(1.0, mean / (end - begin));
    for (size_t i = begin + kLags; i < end; ++i) {
      for (int k = 1; k <= kLags; ++k) xs.push_back(static_cast<float>(t.sales[i - k] / mean));
      int weekday = static_cast<int>((i - begin) % 7);
      for (int w = 0; w < 7; ++w) xs.push_back(w == weekday ? 1.f : 0.f);
      xs.push_back(static_cast<float>(t.promo[i]));
      xs.push_back(static_cast<float>(t.promo[i - 1]));
      xs.push_back(static_cast<float>(t.holiday[i]));
      xs.push_back(static_cast<float>(t.holiday[i - 7]));
      ys.push_back(static_cast<float>(t.sales[i] / mean));
      scales.push_back(static_cast<float>(mean));
      naive.push_back(static_cast<float>(t.sales[i - 7]));
      days.push_back(static_cast<float>(i - begin));
    }
    begin = end;
  }
  const int64_t m = static_cast<int64_t>(ys.size());
  const int64_t f = kLags + 7 + 4;
  return {torch::tensor(xs).reshape({m, f}), torch::tensor(ys), torch::tensor(scales),
          torch::tensor(naive), torch::tensor(days)};
}

struct MlpImpl : torch::nn::Module {
  MlpImpl(int64_t in, int64_t hidden) {
    fc1 = register_module("fc1", torch::nn::Linear(in, hidden));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, hidden));
    out = register_module("out", torch::nn::Linear(hidden, 1));
  }
  torch::Tensor forward(torch::Tensor x) {
    return out(torch::relu(fc2(torch::relu(fc1(x))))).squeeze(1);
  }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, out{nullptr};
};
TORCH_MODULE(Mlp);

int run(int argc, char** argv) {
  cxxopts::Options options("lockstep-sales-forecast",
                           "Forecasts next-day sales per store from a CSV (date,store,promo,"
                           "holiday,sales) with an MLP, on 1 or more ranks; reports validation "
                           "MAE/RMSE against the seasonal-naive baseline.");
  recipe::add_common_options(options, /*epochs=*/8, /*batch=*/128, /*lr=*/2e-3);
  // clang-format off
  options.add_options("sales_forecast")
    ("data", "CSV file; empty: generate OUT_DIR/sales.csv (see --stores, --days, --data-seed)", cxxopts::value<std::string>()->default_value(""))
    ("stores", "Stores in the generated data", cxxopts::value<int>()->default_value("20"))
    ("days", "Days per store in the generated data", cxxopts::value<int>()->default_value("730"))
    ("data-seed", "Seed of the generated data", cxxopts::value<uint64_t>()->default_value("2024"))
    ("val-days", "Last N days of every store are the validation set", cxxopts::value<int>()->default_value("90"))
    ("hidden", "Width of the two hidden layers", cxxopts::value<int64_t>()->default_value("64"));
  // clang-format on
  auto args = recipe::parse(options, argc, argv);
  auto common = recipe::read_common(args);
  std::string data = args["data"].as<std::string>();
  const int stores = args["stores"].as<int>(), days = args["days"].as<int>(), val_days = args["val-days"].as<int>();
  const uint64_t data_seed = args["data-seed"].as<uint64_t>();
  const int64_t hidden = args["hidden"].as<int64_t>();
  if (stores < 1 || days < kLags + val_days + 14 || val_days < 1 || hidden < 1) {
    throw recipe::UsageError(concat("need --stores >= 1, --val-days >= 1, --hidden >= 1 and --days >= ",
                                    kLags + 14, " + --val-days"));
  }
  recipe::install_stop_handlers();
  auto pg = recipe::start(common.threads);
  const int rank = pg->rank(), world = pg->size();
  if (common.batch_size % world != 0) {
    throw recipe::UsageError(concat("--batch-size ", common.batch_size, " is not divisible by the ", world, " ranks"));
  }
  auto config = common.as_config();
  config["recipe"] = "sales_forecast";
  config["data"] = data;
  config["stores"] = std::to_string(stores);
  config["days"] = std::to_string(days);
  config["data-seed"] = std::to_string(data_seed);
  config["val-days"] = std::to_string(val_days);
  config["hidden"] = std::to_string(hidden);
  train::check_config_agreement(*pg, config);
  if (rank == 0) {
    ::mkdir(common.out_dir.c_str(), 0755);
    if (data.empty()) generate_sales(common.out_dir + "/sales.csv", stores, days, data_seed);
  }
  pg->barrier()->wait();
  if (data.empty()) data = common.out_dir + "/sales.csv";
  auto table = read_csv(data);
  auto ex = build(table);
  // Time split: for every store, the last val_days days validate.
  auto max_day = ex.day.max().item<float>();
  auto val_mask = ex.day > (max_day - val_days);
  auto train_idx = torch::nonzero(~val_mask).squeeze(1), val_idx = torch::nonzero(val_mask).squeeze(1);
  auto xtr = ex.x.index_select(0, train_idx), ytr = ex.y.index_select(0, train_idx);
  int64_t n = xtr.size(0);
  if (common.limit_train > 0) n = std::min(n, common.limit_train);

  torch::manual_seed(common.seed);
  Mlp net(ex.x.size(1), hidden);
  torch::optim::Adam optimizer(net->parameters(), torch::optim::AdamOptions(common.lr));
  recipe::Position pos;
  bool resumed = common.resume && recipe::load(*pg, common.checkpoint, "sales_forecast", *net, optimizer, pos, config);
  DistributedDataParallel ddp(net, pg);
  const int64_t per_epoch = recipe::batches_per_epoch(n, common.batch_size);
  LOCKSTEP_CHECK(per_epoch > 0, "fewer training rows (", n, ") than one global batch");
  int64_t total = per_epoch * common.epochs;
  if (common.max_steps > 0) total = std::min(total, common.max_steps);
  const std::string metrics_path = common.out_dir + "/metrics.jsonl";
  train::MetricsWriter metrics(rank == 0 ? metrics_path : "", resumed);
  train::Progress progress(train::ProgressOptions().total_steps(total).rank(rank).tty(common.progress));
  if (rank == 0) {
    std::printf("sales_forecast: %d rank(s), %s: %lld training / %lld validation rows, %lld steps%s\n", world,
                data.c_str(), static_cast<long long>(n), static_cast<long long>(val_idx.numel()),
                static_cast<long long>(total), resumed ? concat(", resumed at step ", pos.step).c_str() : "");
    std::fflush(stdout);
  }
  // Validation error in sales units of the model and of the seasonal-naive baseline.
  auto validate = [&]() {
    torch::NoGradGuard no_grad;
    auto xv = ex.x.index_select(0, val_idx);
    auto scale = ex.scale.index_select(0, val_idx);
    auto truth = ex.y.index_select(0, val_idx) * scale;
    auto pred = net->forward(xv) * scale;
    auto naive = ex.naive.index_select(0, val_idx);
    auto mae = (pred - truth).abs().mean().item<double>();
    auto rmse = (pred - truth).pow(2).mean().sqrt().item<double>();
    auto nmae = (naive - truth).abs().mean().item<double>();
    auto nrmse = (naive - truth).pow(2).mean().sqrt().item<double>();
    return std::array<double, 4>{mae, rmse, nmae, nrmse};
  };
  auto t_start = std::chrono::steady_clock::now();
  bool preempted = false;
  while (pos.step < total && !preempted) {
    auto order = recipe::epoch_order(n, common.seed, pos.epoch);
    double loss_sum = 0;
    int64_t count = 0;
    progress.set_label(concat("epoch ", pos.epoch + 1, "/", common.epochs));
    while (pos.batch < per_epoch && pos.step < total) {
      auto idx = recipe::local_batch(order, pos.batch, common.batch_size, rank, world);
      auto index = torch::from_blob(idx.data(), {static_cast<int64_t>(idx.size())}, torch::kLong);
      optimizer.zero_grad();
      auto loss = torch::mse_loss(ddp->forward(xtr.index_select(0, index)), ytr.index_select(0, index));
      loss.backward();
      optimizer.step();
      ++pos.step;
      ++pos.batch;
      loss_sum += loss.item<double>();
      ++count;
      progress.update(pos.step, common.batch_size, loss.item<double>());
      if (pos.step % 20 == 0) metrics.write({"step", {{"step", double(pos.step)}, {"loss", loss.item<double>()}}});
      if (recipe::agree_stop(*pg, common.stop_after > 0 && pos.step >= common.stop_after)) {
        preempted = true;
        break;
      }
      if (common.checkpoint_every > 0 && pos.step % common.checkpoint_every == 0) {
        recipe::save(*pg, common.checkpoint, "sales_forecast", *net, optimizer, pos, config);
      }
    }
    if (preempted) break;
    if (pos.batch >= per_epoch) {
      auto v = validate();
      progress.finish();
      metrics.write({"epoch", {{"epoch", double(pos.epoch + 1)}, {"train_loss", loss_sum / std::max<int64_t>(1, count)},
                               {"val_mae", v[0]}, {"val_rmse", v[1]}, {"naive_mae", v[2]}}});
      if (rank == 0) {
        std::printf("epoch %lld: train mse %.5f, validation MAE %.2f (seasonal naive %.2f)\n",
                    static_cast<long long>(pos.epoch + 1), loss_sum / std::max<int64_t>(1, count), v[0], v[2]);
        std::fflush(stdout);
      }
      ++pos.epoch;
      pos.batch = 0;
    }
    recipe::save(*pg, common.checkpoint, "sales_forecast", *net, optimizer, pos, config);
  }
  progress.finish();
  if (preempted) {
    recipe::save(*pg, common.checkpoint, "sales_forecast", *net, optimizer, pos, config);
    if (rank == 0) std::printf("preempted after step %lld: checkpoint written to %s\n",
                               static_cast<long long>(pos.step), common.checkpoint.c_str());
    return recipe::kExitPreempted;
  }
  auto v = validate();
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  if (rank == 0) {
    const std::string report = common.out_dir + "/report.html";
    train::write_report(train::ReportOptions()
                            .metrics_path(metrics_path)
                            .output_path(report)
                            .title("lockstep: next-day sales forecast")
                            .summary({{"validation MAE (model)", concat(v[0])},
                                      {"validation MAE (seasonal naive)", concat(v[2])},
                                      {"validation RMSE (model)", concat(v[1])},
                                      {"validation RMSE (seasonal naive)", concat(v[3])},
                                      {"data", data},
                                      {"ranks", std::to_string(world)}}));
    std::printf("validation MAE %.2f vs seasonal-naive %.2f (%.1f%% lower); RMSE %.2f vs %.2f; "
                "%lld steps on %d rank(s), this run %s\nreport: %s\n",
                v[0], v[2], 100 * (1 - v[0] / v[2]), v[1], v[3], static_cast<long long>(pos.step),
                world, recipe::seconds_text(secs).c_str(), report.c_str());
    std::fflush(stdout);
  }
  pg->barrier()->wait();
  return recipe::kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  return recipe::run_main([&] { return run(argc, argv); });
}
