// allgather_strings and the collective agreement checks built on it (lockstep/agreement.h).
#include "lockstep/agreement.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <set>
#include <sstream>

#include "lockstep/errors.h"

namespace lockstep {

using detail::concat;

std::vector<std::string> allgather_strings(ProcessGroup& group, const std::string& mine) {
  const int world = group.size();
  std::vector<at::Tensor> lengths(world);
  for (auto& t : lengths) t = at::zeros({1}, at::kLong);
  group.allgather(lengths, at::tensor({static_cast<int64_t>(mine.size())}, at::kLong))->wait();
  int64_t longest = 0;
  for (auto& t : lengths) longest = std::max(longest, t.item<int64_t>());
  std::vector<std::string> out(world);
  if (longest == 0) return out;  // every rank saw the same lengths: all skip the second step
  auto buf = at::zeros({longest}, at::kByte);
  std::memcpy(buf.data_ptr(), mine.data(), mine.size());
  std::vector<at::Tensor> texts(world);
  for (auto& t : texts) t = at::zeros({longest}, at::kByte);
  group.allgather(texts, buf)->wait();
  for (int r = 0; r < world; ++r) {
    out[r].assign(static_cast<const char*>(texts[r].data_ptr()),
                  static_cast<size_t>(lengths[r].item<int64_t>()));
  }
  return out;
}

void raise_if_any_rank_failed(ProcessGroup& group, const std::string& local_error,
                              const std::string& what) {
  auto errors = allgather_strings(group, local_error);
  std::ostringstream msg;
  bool any = false;
  for (size_t r = 0; r < errors.size(); ++r) {
    if (errors[r].empty()) continue;
    if (!any) msg << group.where() << " " << what << " failed:";
    any = true;
    msg << "\n  rank " << r << ": " << errors[r];
  }
  if (any) throw Error(msg.str());
}

// ---------------------------------------------------------------------------------------------
// Configuration agreement

namespace {

std::string serialize_config(const std::map<std::string, std::string>& config) {
  std::string s;
  for (const auto& kv : config) s += kv.first + "=" + kv.second + "\n";
  return s;
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

std::map<std::string, std::string> parse_config(const std::string& text) {
  std::map<std::string, std::string> out;
  std::istringstream is(text);
  std::string line;
  while (std::getline(is, line)) {
    auto eq = line.find('=');
    if (eq != std::string::npos) out[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return out;
}

}  // namespace

std::string config_hash(const std::map<std::string, std::string>& config) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx",
                static_cast<unsigned long long>(fnv1a(serialize_config(config))));
  return buf;
}

void check_config_agreement(ProcessGroup& group, const std::map<std::string, std::string>& config) {
  for (const auto& kv : config) {
    LOCKSTEP_CHECK(kv.first.find_first_of("=\n") == std::string::npos &&
                       kv.second.find('\n') == std::string::npos,
                   "configuration key '", kv.first, "' or its value contains '=' or a newline");
  }
  const int world = group.size();
  uint64_t h = fnv1a(serialize_config(config));
  int64_t hs;
  std::memcpy(&hs, &h, sizeof(hs));
  std::vector<at::Tensor> hashes(world);
  for (auto& t : hashes) t = at::zeros({1}, at::kLong);
  group.allgather(hashes, at::tensor({hs}, at::kLong))->wait();
  // Every rank takes the same branch: each saw the same gathered hashes.
  bool all_same = true;
  for (int r = 1; r < world; ++r) {
    all_same = all_same && hashes[r].item<int64_t>() == hashes[0].item<int64_t>();
  }
  if (all_same) return;
  auto texts = allgather_strings(group, serialize_config(config));
  std::vector<std::map<std::string, std::string>> configs;
  std::set<std::string> keys;
  for (const auto& t : texts) {
    configs.push_back(parse_config(t));
    for (const auto& kv : configs.back()) keys.insert(kv.first);
  }
  std::ostringstream os;
  os << group.where() << " the ranks' configurations differ (hash " << config_hash(configs[0])
     << " on rank 0); start every rank with the same flags and config file. Differences:";
  for (const auto& key : keys) {
    auto value = [&](int r) {
      auto it = configs[r].find(key);
      return it == configs[r].end() ? std::string("<unset>") : it->second;
    };
    std::map<std::string, std::vector<int>> by_value;
    for (int r = 0; r < world; ++r) by_value[value(r)].push_back(r);
    if (by_value.size() == 1) continue;
    os << "\n  " << key << ": rank 0 has '" << value(0) << "'";
    for (const auto& kv : by_value) {
      if (kv.first == value(0)) continue;
      os << (kv.second.size() > 1 ? ", ranks " : ", rank ");
      for (size_t i = 0; i < kv.second.size(); ++i) os << (i ? "," : "") << kv.second[i];
      os << (kv.second.size() > 1 ? " have '" : " has '") << kv.first << "'";
    }
  }
  throw InvalidArgument(os.str());
}

}  // namespace lockstep
