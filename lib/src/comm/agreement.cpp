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

namespace {

void check_object_length(const ProcessGroup& group, const char* op, int rank, int64_t length,
                         int64_t max_bytes) {
  if (length >= 0 && length <= max_bytes) return;
  throw InvalidArgument(concat(
      group.where(), " ", op, ": rank ", rank, " announced ", length, " bytes, ",
      length < 0 ? std::string("a negative length")
                 : concat("over the bound of ", max_bytes, " bytes (max_bytes)"),
      "; nothing was allocated. Send less (or raise max_bytes on every rank)."));
}

void check_lengths(const ProcessGroup& group, const char* op, const std::vector<int64_t>& lengths,
                   int64_t max_bytes) {
  for (size_t r = 0; r < lengths.size(); ++r) {
    check_object_length(group, op, static_cast<int>(r), lengths[r], max_bytes);
  }
}

// Note [Bounded object collectives]: every rank's length, checked on every rank.
std::vector<int64_t> exchange_lengths(ProcessGroup& group, const char* op, int64_t mine,
                                      int64_t max_bytes) {
  LOCKSTEP_CHECK(max_bytes >= 0, group.where(), " ", op, ": expected a non-negative max_bytes, "
                 "but got ", max_bytes, ".");
  const int world = group.size();
  std::vector<at::Tensor> lengths(world);
  for (auto& t : lengths) t = at::zeros({1}, at::kLong);
  group.allgather(lengths, at::tensor({mine}, at::kLong))->wait();
  std::vector<int64_t> out;
  for (auto& t : lengths) out.push_back(t.item<int64_t>());
  check_lengths(group, op, out, max_bytes);
  return out;
}

template <typename Out, typename In>
std::vector<Out> allgather_objects(ProcessGroup& group, const char* op, const In& mine,
                                   int64_t max_bytes) {
  const int world = group.size();
  auto lengths = exchange_lengths(group, op, static_cast<int64_t>(mine.size()), max_bytes);
  int64_t longest = 0;
  for (int64_t n : lengths) longest = std::max(longest, n);
  std::vector<Out> out(world);
  if (longest == 0) return out;  // every rank saw the same lengths: all skip the second step
  auto buf = at::zeros({longest}, at::kByte);
  if (!mine.empty()) std::memcpy(buf.data_ptr(), mine.data(), mine.size());
  std::vector<at::Tensor> texts(world);
  for (auto& t : texts) t = at::zeros({longest}, at::kByte);
  group.allgather(texts, buf)->wait();
  for (int r = 0; r < world; ++r) {
    const auto* p = static_cast<const uint8_t*>(texts[r].data_ptr());
    out[r].assign(p, p + lengths[r]);
  }
  return out;
}

template <typename T>
T broadcast_object(ProcessGroup& group, const char* op, const T& bytes, int root,
                   int64_t max_bytes) {
  LOCKSTEP_CHECK(root >= 0 && root < group.size(), group.where(), " ", op,
                 ": expected a root in [0, ", group.size(), "), but got ", root, ".");
  LOCKSTEP_CHECK(max_bytes >= 0, group.where(), " ", op, ": expected a non-negative max_bytes, "
                 "but got ", max_bytes, ".");
  auto length = at::tensor({static_cast<int64_t>(group.rank() == root ? bytes.size() : 0)},
                           at::kLong);
  group.broadcast(length, root)->wait();
  const int64_t n = length.item<int64_t>();
  check_object_length(group, op, root, n, max_bytes);
  if (n == 0) return T();
  auto buf = at::empty({n}, at::kByte);
  if (group.rank() == root) std::memcpy(buf.data_ptr(), bytes.data(), bytes.size());
  group.broadcast(buf, root)->wait();
  const auto* p = static_cast<const uint8_t*>(buf.data_ptr());
  return T(p, p + n);
}

}  // namespace

std::vector<std::string> allgather_strings(ProcessGroup& group, const std::string& mine,
                                           int64_t max_bytes) {
  return allgather_objects<std::string>(group, "allgather_strings", mine, max_bytes);
}

std::vector<Bytes> allgather_bytes(ProcessGroup& group, const Bytes& mine, int64_t max_bytes) {
  return allgather_objects<Bytes>(group, "allgather_bytes", mine, max_bytes);
}

Bytes broadcast_bytes(ProcessGroup& group, const Bytes& bytes, int root, int64_t max_bytes) {
  return broadcast_object(group, "broadcast_bytes", bytes, root, max_bytes);
}

std::string broadcast_string(ProcessGroup& group, const std::string& text, int root,
                             int64_t max_bytes) {
  return broadcast_object(group, "broadcast_string", text, root, max_bytes);
}

std::vector<std::string> gather_strings(ProcessGroup& group, const std::string& mine, int root,
                                        int64_t max_bytes) {
  LOCKSTEP_CHECK(root >= 0 && root < group.size(), group.where(),
                 " gather_strings: expected a root in [0, ", group.size(), "), but got ", root,
                 ".");
  const int world = group.size();
  auto lengths = exchange_lengths(group, "gather_strings", static_cast<int64_t>(mine.size()),
                                  max_bytes);
  int64_t longest = 0;
  for (int64_t n : lengths) longest = std::max(longest, n);
  std::vector<std::string> out;
  if (group.rank() == root) out.resize(world);
  if (longest == 0) return out;
  auto buf = at::zeros({longest}, at::kByte);
  if (!mine.empty()) std::memcpy(buf.data_ptr(), mine.data(), mine.size());
  std::vector<at::Tensor> texts;
  if (group.rank() == root) {
    for (int r = 0; r < world; ++r) texts.push_back(at::zeros({longest}, at::kByte));
  }
  group.gather(texts, buf, root)->wait();
  for (size_t r = 0; r < texts.size(); ++r) {
    out[r].assign(static_cast<const char*>(texts[r].data_ptr()), static_cast<size_t>(lengths[r]));
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
