// Sales forecasting from a CSV (date as YYYYMMDD, store, promo, holiday, sales; all numeric): an MLP predicts each
// store's next-day sales from the last four weeks, trained data-parallel; reports validation
// error against the seasonal-naive baseline (the same weekday one week earlier).
//
// No Debian package ships a retail sales table, so by default the recipe generates one with
// the documented process of `generate_sales` below (seeded, so every run and every rank
// sees the same file) and then reads it back with lockstep::read_csv like any user file.
// Pass --data FILE.csv with the same columns to use real data.
//
//   lockstep-run --nproc-per-node 2 lockstep-sales-forecast --out-dir out/sales
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>

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
      std::strftime(date, sizeof(date), "%Y%m%d", &t);
      out << date << "," << s << "," << promo << "," << (holiday ? 1 : 0) << ","
          << std::lround(v) << "\n";
    }
  }
  out.close();
  if (!out || std::rename((path + ".tmp").c_str(), path.c_str()) != 0) {
    throw Error(concat("could not write '", path, "'"));
  }
}

// Day number (days since 1970-01-01, a Thursday) of a YYYYMMDD date; InvalidArgument naming
// the row otherwise.
int64_t day_number(double yyyymmdd, const std::string& path, int64_t row) {
  const auto v = static_cast<int64_t>(yyyymmdd);
  std::tm t{};
  t.tm_year = static_cast<int>(v / 10000) - 1900;
  t.tm_mon = static_cast<int>(v / 100 % 100) - 1;
  t.tm_mday = static_cast<int>(v % 100);
  t.tm_hour = 12;  // noon: the division below is exact whatever the time zone
  std::time_t secs = -1;
  const int mon = t.tm_mon, mday = t.tm_mday;
  LOCKSTEP_CHECK(static_cast<double>(v) == yyyymmdd && v > 0 && (secs = std::mktime(&t)) != -1 && t.tm_mon == mon &&
                     t.tm_mday == mday,
                 "'", path, "' data row ", row + 1, ": expected a date as YYYYMMDD, got ", std::to_string(yyyymmdd));
  return static_cast<int64_t>(secs) / 86400;
}

constexpr int kLags = 28;

// Note [Sales features]
// A plain MLP on raw lags does worse than the seasonal-naive forecast (same weekday last
// week): it has to rediscover the weekly cycle, and its errors on the level dominate. So the
// model predicts the *correction* to the naive forecast, on a per-store, causal scale:
//   scale_i  = mean sales of the store over days [i - 28, i)   (nothing from day i or later)
//   target   = (sales_i - sales_{i-7}) / scale_i, standardised with the training mean/std
//   features = sales_{i-k} / scale_i - 1 and promo_{i-k}, holiday_{i-k} for k = 1..28 (so the
//              model can see why last week's value was high or low), the target day's
//              weekday (one-hot), promo and holiday
//   forecast = sales_{i-7} + scale_i * (target_mean + target_std * net(features))
// The output layer starts at zero, so the untrained model is the naive forecast plus the mean
// training correction, and training only has to learn what improves on it (averaging the same weekday over four weeks
// to cancel noise, promotion and holiday effects).
struct Examples {
  torch::Tensor x, y, scale, naive;  // y: raw correction; naive: sales 7 days earlier
  torch::Tensor truth;               // sales, raw units
  torch::Tensor day;                 // day index within its store, to split by time
};

// Reads a CSV with the numeric columns date (YYYYMMDD), store, promo (0/1), holiday (0/1),
// sales, in any order, through lockstep::read_csv. Rows must be grouped by store, with
// consecutive days in date order (as the generator writes them).
Examples build(const std::string& path) {
  auto table = read_csv(path, CsvOptions().dtype(torch::kDouble));
  auto col = [&](const char* name) {
    auto c = table.column(name).contiguous();
    std::vector<double> values(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
    for (size_t i = 0; i < values.size(); ++i) {
      LOCKSTEP_CHECK(std::isfinite(values[i]), "'", path, "' data row ", i + 1, ", column '", name,
                     "': expected a finite number, but got ", values[i], "; fix or remove that record");
    }
    return values;
  };
  const auto date = col("date"), store = col("store"), promo = col("promo"), holiday = col("holiday"),
             sales = col("sales");
  const size_t n = sales.size();
  LOCKSTEP_CHECK(n > 0, "'", path, "' has no rows");
  std::vector<float> xs, ys, scales, naive, truth, days;
  size_t begin = 0;
  while (begin < n) {
    size_t end = begin;
    while (end < n && store[end] == store[begin]) ++end;
    const int64_t first_day = day_number(date[begin], path, static_cast<int64_t>(begin));
    const int first_weekday = static_cast<int>((first_day + 3) % 7);  // 0 = Monday
    for (size_t i = begin + 1; i < end; ++i) {
      LOCKSTEP_CHECK(day_number(date[i], path, static_cast<int64_t>(i)) == first_day + static_cast<int64_t>(i - begin),
                     "'", path, "' data row ", i + 1, ": store ", store[i], "'s date ", static_cast<int64_t>(date[i]),
                     " is not the day after ", static_cast<int64_t>(date[i - 1]),
                     "; sort the rows by store, then date, one row per day");
    }
    for (size_t i = begin + kLags; i < end; ++i) {
      double scale = 0;
      for (int k = 1; k <= kLags; ++k) scale += sales[i - k];
      scale = std::max(1.0, scale / kLags);
      for (int k = 1; k <= kLags; ++k) xs.push_back(static_cast<float>(sales[i - k] / scale - 1));
      for (int k = 1; k <= kLags; ++k) xs.push_back(static_cast<float>(promo[i - k]));
      for (int k = 1; k <= kLags; ++k) xs.push_back(static_cast<float>(holiday[i - k]));
      const int weekday = static_cast<int>((first_weekday + (i - begin)) % 7);
      for (int w = 0; w < 7; ++w) xs.push_back(w == weekday ? 1.f : 0.f);
      xs.push_back(static_cast<float>(promo[i]));
      xs.push_back(static_cast<float>(holiday[i]));
      ys.push_back(static_cast<float>((sales[i] - sales[i - 7]) / scale));
      scales.push_back(static_cast<float>(scale));
      naive.push_back(static_cast<float>(sales[i - 7]));
      truth.push_back(static_cast<float>(sales[i]));
      days.push_back(static_cast<float>(i - begin));
    }
    begin = end;
  }
  const int64_t m = static_cast<int64_t>(ys.size());
  LOCKSTEP_CHECK(m > 0, "'", path, "': no store has more than ", kLags, " days of history");
  const int64_t f = 3 * kLags + 7 + 2;
  return {torch::tensor(xs).reshape({m, f}), torch::tensor(ys), torch::tensor(scales), torch::tensor(naive),
          torch::tensor(truth), torch::tensor(days)};
}

struct MlpImpl : torch::nn::Module {
  MlpImpl(int64_t in, int64_t hidden) {
    fc1 = register_module("fc1", torch::nn::Linear(in, hidden));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, hidden));
    out = register_module("out", torch::nn::Linear(hidden, 1));
    torch::NoGradGuard no_grad;  // Note [Sales features]: start as the naive forecast
    out->weight.zero_();
    out->bias.zero_();
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
    ("data", "CSV file with numeric columns date (YYYYMMDD), store, promo, holiday, sales, rows grouped by store in date order; empty: generate OUT_DIR/sales.csv (see --stores, --days, --data-seed)", cxxopts::value<std::string>()->default_value(""))
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
  const torch::Device device = recipe::bind_device(common);  // Note [Recipe device]
  auto pg = recipe::start(common.threads);  // installs the stop handlers once joined
  const int rank = pg->rank(), world = pg->size();
  const int64_t local = recipe::local_batch_size(common, *pg);
  auto config = common.as_config();
  config["recipe"] = "sales_forecast";
  config["data"] = data;
  config["stores"] = std::to_string(stores);
  config["days"] = std::to_string(days);
  config["data-seed"] = std::to_string(data_seed);
  config["val-days"] = std::to_string(val_days);
  config["hidden"] = std::to_string(hidden);
  train::check_config_agreement(*pg, config);
  recipe::make_out_dir(*pg, common.out_dir);
  if (data.empty()) {
    if (rank == 0) generate_sales(common.out_dir + "/sales.csv", stores, days, data_seed);
    pg->barrier()->wait();
  }
  if (data.empty()) data = common.out_dir + "/sales.csv";
  auto ex = build(data);
  // Time split: for every store, the last val_days days validate.
  auto max_day = ex.day.max().item<float>();
  auto val_mask = ex.day > (max_day - val_days);
  auto train_idx = torch::nonzero(~val_mask).squeeze(1), val_idx = torch::nonzero(val_mask).squeeze(1);
  auto xtr = ex.x.index_select(0, train_idx), ytr_raw = ex.y.index_select(0, train_idx);
  // Standardise the target with training statistics only (Note [Sales features]).
  const double y_mean = ytr_raw.mean().item<double>(), y_std = std::max(1e-6, ytr_raw.std().item<double>());
  auto ytr = (ytr_raw - y_mean) / y_std;
  int64_t n = xtr.size(0);
  if (common.limit_train > 0) n = std::min(n, common.limit_train);

  torch::manual_seed(common.seed);
  Mlp net(ex.x.size(1), hidden);
  net->to(device);  // before the optimizer takes its parameters
  torch::optim::Adam optimizer(net->parameters(), torch::optim::AdamOptions(common.lr));
  // Full local batches from the sharded sampler (Note [Recipe data order]).
  auto sampler = recipe::train_sampler(*pg, n, common.seed);
  const int64_t per_epoch = static_cast<int64_t>(sampler.size()) / local;
  LOCKSTEP_CHECK(per_epoch > 0, "fewer training rows (", n, ") than one global batch");
  const int64_t total = recipe::total_steps(common, per_epoch);
  recipe::Checkpointer checkpointer(*pg, common.checkpoint, "sales_forecast", *net, optimizer, sampler, config);
  recipe::Position pos;
  bool resumed = common.resume && checkpointer.load(pos);
  // A NaN or Inf gradient stops every rank, naming the step, rank and parameter.
  DistributedDataParallel ddp(net, pg,
                              recipe::ddp_options(common));
  const std::string metrics_path = common.out_dir + "/metrics.jsonl";
  const char* const kReportTitle = "lockstep: next-day sales forecast";
  // A crash after the checkpoint left records the resumed run writes again: drop them.
  if (rank == 0 && resumed) train::rewind_metrics(metrics_path, pos.step, /*epochs_done=*/pos.epoch);
  train::MetricsWriter metrics = recipe::metrics_writer(common, rank, metrics_path, resumed, pos.step);
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
    auto truth = ex.truth.index_select(0, val_idx);
    auto naive = ex.naive.index_select(0, val_idx);
    auto pred = naive + scale * (y_mean + y_std * net->forward(xv.to(device)).to(torch::kCPU));
    auto mae = (pred - truth).abs().mean().item<double>();
    auto rmse = (pred - truth).pow(2).mean().sqrt().item<double>();
    auto nmae = (naive - truth).abs().mean().item<double>();
    auto nrmse = (naive - truth).pow(2).mean().sqrt().item<double>();
    return std::array<double, 4>{mae, rmse, nmae, nrmse};
  };
  auto t_start = std::chrono::steady_clock::now();
  bool preempted = false;
  while (pos.step < total && !preempted) {
    double loss_sum = 0;
    int64_t count = 0;
    progress.set_label(concat("epoch ", pos.epoch + 1, "/", common.epochs));
    while (pos.batch < per_epoch && pos.step < total) {
      auto idx = recipe::next_batch(sampler, local);
      if (static_cast<int64_t>(idx.size()) < local) break;
      auto index = torch::from_blob(idx.data(), {static_cast<int64_t>(idx.size())}, torch::kLong);
      auto t0 = std::chrono::steady_clock::now();
      optimizer.zero_grad();
      auto loss = torch::mse_loss(ddp->forward(xtr.index_select(0, index).to(device)),
                                  ytr.index_select(0, index).to(device));
      loss.backward();
      optimizer.step();
      ++pos.step;
      ++pos.batch;
      const double l = loss.item<double>();
      loss_sum += l;
      ++count;
      progress.update(pos.step, common.batch_size, l);
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const bool logged = pos.step % 20 == 0;
      if (logged) metrics.write({"step", {{"step", double(pos.step)}, {"loss", l}}});
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
  auto v = validate();
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  if (rank == 0) {
    const std::string report = common.out_dir + "/report.html";
    train::write_report(recipe::report_options(common, metrics_path, kReportTitle, config, argc, argv)
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
