// Checkpoint files, their collective save/load, model/optimizer/RNG state and configuration
// agreement. See Note [Checkpoint format] and Note [Atomic checkpoint writes].
#include "lockstep/train/checkpoint.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/module.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>
#include <zlib.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "adapter/torch_adapter.h"
#include "lockstep/errors.h"

namespace lockstep {
namespace train {

using detail::concat;
using nlohmann::json;

namespace {

constexpr char kMagic[8] = {'L', 'S', 'T', 'P', 'C', 'K', 'P', 'T'};
constexpr char kEndMagic[8] = {'L', 'S', 'T', 'P', 'E', 'N', 'D', '!'};
constexpr size_t kPreludeBytes = 8 + 4 + 8;
constexpr size_t kTrailerBytes = 8 + 8;

uint32_t crc32_of(const void* data, size_t n) {
  uLong crc = crc32(0L, Z_NULL, 0);
  const auto* p = static_cast<const Bytef*>(data);
  while (n > 0) {  // zlib takes uInt lengths
    uInt chunk = static_cast<uInt>(std::min<size_t>(n, 1u << 30));
    crc = crc32(crc, p, chunk);
    p += chunk;
    n -= chunk;
  }
  return static_cast<uint32_t>(crc);
}

template <typename T>
void put(std::string& out, T value) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));  // little-endian hosts only (x86-64, aarch64)
  out.append(bytes, sizeof(T));
}

template <typename T>
T get_at(const std::string& in, size_t offset) {
  T value;
  std::memcpy(&value, in.data() + offset, sizeof(T));
  return value;
}

const std::vector<at::ScalarType>& known_dtypes() {
  static const std::vector<at::ScalarType> types = {
      at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kByte, at::kChar,
      at::kShort, at::kInt,    at::kLong, at::kBool,     at::kComplexFloat, at::kComplexDouble};
  return types;
}

at::ScalarType parse_dtype(const std::string& name, const std::string& path,
                           const std::string& tensor) {
  for (auto t : known_dtypes()) {
    if (name == c10::toString(t)) return t;
  }
  throw InvalidArgument(concat("checkpoint '", path, "': tensor '", tensor,
                               "' has unknown dtype '", name, "'; the file is corrupt or from "
                               "a newer lockstep"));
}

std::string errno_text() { return std::strerror(errno); }

void write_all(int fd, const char* data, size_t n, const std::string& tmp) {
  while (n > 0) {
    ssize_t w = ::write(fd, data, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw Error(concat("could not write checkpoint temporary file '", tmp, "': ",
                         errno_text(), ". Check free space and permissions."));
    }
    data += w;
    n -= static_cast<size_t>(w);
  }
}

std::string dir_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Every rank contributes `local_error` ("" = fine); if any rank has one, every rank throws
// the same message naming the ranks. Collective.
void agree_or_throw(ProcessGroup& group, const std::string& local_error,
                    const std::string& what) {
  const int world = group.size();
  auto flag = at::tensor({static_cast<int64_t>(local_error.size())}, at::kLong);
  std::vector<at::Tensor> lengths(world);
  for (auto& t : lengths) t = at::zeros({1}, at::kLong);
  group.allgather(lengths, flag)->wait();
  int64_t longest = 0;
  for (auto& t : lengths) longest = std::max(longest, t.item<int64_t>());
  if (longest == 0) return;
  auto mine = at::zeros({longest}, at::kByte);
  std::memcpy(mine.data_ptr(), local_error.data(), local_error.size());
  std::vector<at::Tensor> texts(world);
  for (auto& t : texts) t = at::zeros({longest}, at::kByte);
  group.allgather(texts, mine)->wait();
  std::ostringstream msg;
  msg << group.where() << " " << what << " failed:";
  for (int r = 0; r < world; ++r) {
    int64_t n = lengths[r].item<int64_t>();
    if (n == 0) continue;
    msg << "\n  rank " << r << ": "
        << std::string(static_cast<const char*>(texts[r].data_ptr()), static_cast<size_t>(n));
  }
  throw Error(msg.str());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Files

void write_checkpoint_file(const std::string& path, const Checkpoint& checkpoint) {
  json meta;
  try {
    meta = json::parse(checkpoint.metadata);
  } catch (const std::exception& e) {
    throw InvalidArgument(concat("checkpoint metadata for '", path,
                                 "' must be a JSON object, but it does not parse: ", e.what()));
  }
  LOCKSTEP_CHECK(meta.is_object(), "checkpoint metadata for '", path,
                 "' must be a JSON object, but got: ", checkpoint.metadata);

  std::vector<at::Tensor> datas;
  json entries = json::array();
  uint64_t offset = 0;
  for (const auto& kv : checkpoint.tensors) {
    const at::Tensor& t = kv.second;
    LOCKSTEP_CHECK(t.defined(), "checkpoint '", path, "': tensor '", kv.first, "' is undefined");
    LOCKSTEP_CHECK(t.layout() == at::kStrided, "checkpoint '", path, "': tensor '", kv.first,
                   "' must be dense (strided), but got layout ", t.layout());
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    uint64_t nbytes = static_cast<uint64_t>(c.numel()) * c.element_size();
    entries.push_back({{"name", kv.first},
                       {"dtype", c10::toString(c.scalar_type())},
                       {"shape", c.sizes().vec()},
                       {"offset", offset},
                       {"nbytes", nbytes},
                       {"crc32", crc32_of(c.data_ptr(), nbytes)}});
    offset += nbytes;
    datas.push_back(c);
  }
  json header = {{"metadata", meta}, {"tensors", entries}};
  std::string header_text = header.dump();

  std::string head;
  head.append(kMagic, 8);
  put<uint32_t>(head, kCheckpointFormatVersion);
  put<uint64_t>(head, header_text.size());
  head += header_text;
  put<uint32_t>(head, crc32_of(header_text.data(), header_text.size()));
  const uint64_t total = head.size() + offset + kTrailerBytes;
  std::string tail(kEndMagic, 8);
  put<uint64_t>(tail, total);

  const std::string tmp = concat(path, ".tmp.", ::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    throw Error(concat("could not create checkpoint temporary file '", tmp, "': ", errno_text(),
                       ". Check that the directory exists and is writable."));
  }
  try {
    write_all(fd, head.data(), head.size(), tmp);
    for (const auto& c : datas) {
      write_all(fd, static_cast<const char*>(c.data_ptr()),
                static_cast<size_t>(c.numel()) * c.element_size(), tmp);
    }
    write_all(fd, tail.data(), tail.size(), tmp);
    if (::fsync(fd) != 0) {
      throw Error(concat("fsync of checkpoint temporary file '", tmp, "' failed: ", errno_text()));
    }
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0) {
    ::unlink(tmp.c_str());
    throw Error(concat("close of checkpoint temporary file '", tmp, "' failed: ", errno_text()));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    std::string err = errno_text();
    ::unlink(tmp.c_str());
    throw Error(concat("could not rename '", tmp, "' to '", path, "': ", err));
  }
  int dfd = ::open(dir_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {  // make the rename itself durable
    ::fsync(dfd);
    ::close(dfd);
  }
}

Checkpoint read_checkpoint_file(const std::string& path) {
  auto fail = [&](const std::string& reason) -> InvalidArgument {
    return InvalidArgument(concat("cannot load checkpoint '", path, "': ", reason));
  };
  std::ifstream in(path, std::ios::binary);
  if (!in) throw fail(concat("cannot open it (", errno_text(), ")"));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw fail("read error");

  if (bytes.size() < kPreludeBytes || std::memcmp(bytes.data(), kMagic, 8) != 0) {
    throw fail(concat("not a lockstep checkpoint (expected magic 'LSTPCKPT' at offset 0, file "
                      "is ", bytes.size(), " bytes)"));
  }
  uint32_t version = get_at<uint32_t>(bytes, 8);
  if (version != kCheckpointFormatVersion) {
    throw fail(concat("format version ", version, ", but this build reads version ",
                      kCheckpointFormatVersion, " only"));
  }
  if (bytes.size() < kPreludeBytes + kTrailerBytes ||
      std::memcmp(bytes.data() + bytes.size() - kTrailerBytes, kEndMagic, 8) != 0) {
    throw fail(concat("truncated: the end marker is missing (file is ", bytes.size(),
                      " bytes); the write was interrupted or the file was cut"));
  }
  uint64_t recorded = get_at<uint64_t>(bytes, bytes.size() - 8);
  if (recorded != bytes.size()) {
    throw fail(concat("length mismatch: the trailer records ", recorded, " bytes but the file "
                      "has ", bytes.size()));
  }
  uint64_t header_len = get_at<uint64_t>(bytes, 12);
  if (header_len > bytes.size() - kPreludeBytes - kTrailerBytes - 4) {
    throw fail(concat("corrupt header length ", header_len, " at offset 12"));
  }
  std::string header_text = bytes.substr(kPreludeBytes, header_len);
  uint32_t header_crc = get_at<uint32_t>(bytes, kPreludeBytes + header_len);
  if (crc32_of(header_text.data(), header_text.size()) != header_crc) {
    throw fail(concat("header checksum mismatch (bytes ", kPreludeBytes, "..",
                      kPreludeBytes + header_len, "): the file is corrupt"));
  }
  json header;
  try {
    header = json::parse(header_text);
  } catch (const std::exception& e) {
    throw fail(concat("header is not valid JSON: ", e.what()));
  }
  const uint64_t data_start = kPreludeBytes + header_len + 4;
  const uint64_t data_len = bytes.size() - kTrailerBytes - data_start;
  Checkpoint out;
  try {
    out.metadata = header.at("metadata").dump();
    for (const auto& e : header.at("tensors")) {
      std::string name = e.at("name").get<std::string>();
      auto dtype = parse_dtype(e.at("dtype").get<std::string>(), path, name);
      auto shape = e.at("shape").get<std::vector<int64_t>>();
      uint64_t off = e.at("offset").get<uint64_t>();
      uint64_t nbytes = e.at("nbytes").get<uint64_t>();
      uint32_t crc = e.at("crc32").get<uint32_t>();
      int64_t numel = 1;
      for (auto s : shape) {
        if (s < 0) throw fail(concat("tensor '", name, "' has a negative dimension"));
        numel *= s;
      }
      if (static_cast<uint64_t>(numel) * c10::elementSize(dtype) != nbytes) {
        throw fail(concat("tensor '", name, "': ", nbytes, " bytes do not match its shape"));
      }
      if (off > data_len || nbytes > data_len - off) {
        throw fail(concat("tensor '", name, "' lies past the end of the data (offset ", off,
                          ", ", nbytes, " bytes, data section ", data_len, " bytes)"));
      }
      const char* src = bytes.data() + data_start + off;
      if (crc32_of(src, nbytes) != crc) {
        throw fail(concat("checksum mismatch in tensor '", name, "' (file offset ",
                          data_start + off, ", ", nbytes, " bytes): the file is corrupt"));
      }
      at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
      if (nbytes > 0) std::memcpy(t.data_ptr(), src, nbytes);
      if (!out.tensors.emplace(name, t).second) {
        throw fail(concat("tensor '", name, "' appears twice"));
      }
    }
  } catch (const InvalidArgument&) {
    throw;
  } catch (const std::exception& e) {
    throw fail(concat("malformed header: ", e.what()));
  }
  return out;
}

bool checkpoint_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

void save_checkpoint(ProcessGroup& group, const std::string& path, const Checkpoint& checkpoint) {
  std::string error;
  if (group.rank() == 0) {
    try {
      write_checkpoint_file(path, checkpoint);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  agree_or_throw(group, error, concat("saving checkpoint '", path, "'"));
}

Checkpoint load_checkpoint(ProcessGroup& group, const std::string& path) {
  std::string error;
  Checkpoint out;
  try {
    out = read_checkpoint_file(path);
  } catch (const std::exception& e) {
    error = e.what();
  }
  agree_or_throw(group, error, concat("loading checkpoint '", path, "'"));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Model, optimizer and RNG state

namespace {

std::map<std::string, at::Tensor> module_tensors(const torch::nn::Module& module) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) out[p.key()] = p.value();
  for (const auto& b : module.named_buffers(/*recurse=*/true)) out[b.key()] = b.value();
  return out;
}

void check_same(const std::string& what, const std::string& name, const at::Tensor& have,
                const at::Tensor& want, std::vector<std::string>& problems) {
  if (have.sizes() != want.sizes()) {
    problems.push_back(concat(what, " '", name, "': checkpoint has shape ", have.sizes(),
                              ", the model has ", want.sizes()));
  } else if (have.scalar_type() != want.scalar_type()) {
    problems.push_back(concat(what, " '", name, "': checkpoint has dtype ", have.scalar_type(),
                              ", the model has ", want.scalar_type()));
  }
}

[[noreturn]] void throw_problems(const std::string& what, const std::vector<std::string>& problems) {
  std::ostringstream os;
  os << what << ": the checkpoint does not match (nothing was loaded):";
  for (const auto& p : problems) os << "\n  " << p;
  os << "\nWas it written by another model or configuration?";
  throw InvalidArgument(os.str());
}

}  // namespace

void add_module(Checkpoint& checkpoint, const torch::nn::Module& module, const std::string& prefix) {
  for (const auto& kv : module_tensors(module)) {
    checkpoint.tensors[prefix + kv.first] = kv.second.detach().to(at::kCPU).clone();
  }
}

void load_module(const Checkpoint& checkpoint, torch::nn::Module& module, const std::string& prefix) {
  auto targets = module_tensors(module);
  std::vector<std::string> problems;
  for (const auto& kv : targets) {
    auto it = checkpoint.tensors.find(prefix + kv.first);
    if (it == checkpoint.tensors.end()) {
      problems.push_back(concat("missing key '", prefix + kv.first, "'"));
    } else {
      check_same("tensor", prefix + kv.first, it->second, kv.second, problems);
    }
  }
  for (auto it = checkpoint.tensors.lower_bound(prefix);
       it != checkpoint.tensors.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
    if (!targets.count(it->first.substr(prefix.size()))) {
      problems.push_back(concat("unexpected key '", it->first, "'"));
    }
  }
  if (!problems.empty()) throw_problems("load_module", problems);
  at::NoGradGuard no_grad;
  for (auto& kv : targets) kv.second.copy_(checkpoint.tensors.at(prefix + kv.first));
}

namespace {

// The named tensors of one parameter's optimizer state, plus its integer step (Adam).
struct ParamStateView {
  std::map<std::string, at::Tensor> tensors;
  int64_t step = -1;
};

enum class OptKind { kSGD, kAdam, kAdamW };

OptKind optimizer_kind(torch::optim::Optimizer& optimizer) {
  if (dynamic_cast<torch::optim::SGD*>(&optimizer)) return OptKind::kSGD;
  if (dynamic_cast<torch::optim::AdamW*>(&optimizer)) return OptKind::kAdamW;
  if (dynamic_cast<torch::optim::Adam*>(&optimizer)) return OptKind::kAdam;
  throw InvalidArgument("checkpoints support the state of torch::optim::SGD, Adam and AdamW; "
                        "got another optimizer type. Save its state yourself as named tensors.");
}

const char* kind_name(OptKind k) {
  switch (k) {
    case OptKind::kSGD: return "SGD";
    case OptKind::kAdam: return "Adam";
    case OptKind::kAdamW: return "AdamW";
  }
  return "?";
}

double& group_lr(torch::optim::OptimizerParamGroup& g, OptKind kind) {
  switch (kind) {
    case OptKind::kSGD: return static_cast<torch::optim::SGDOptions&>(g.options()).lr();
    case OptKind::kAdam: return static_cast<torch::optim::AdamOptions&>(g.options()).lr();
    case OptKind::kAdamW: return static_cast<torch::optim::AdamWOptions&>(g.options()).lr();
  }
  throw InternalError("unknown optimizer kind");
}

}  // namespace

void add_optimizer(Checkpoint& checkpoint, torch::optim::Optimizer& optimizer,
                   const std::string& prefix) {
  OptKind kind = optimizer_kind(optimizer);
  auto& groups = optimizer.param_groups();
  json meta = json::parse(checkpoint.metadata);
  json lrs = json::array();
  for (size_t g = 0; g < groups.size(); ++g) {
    lrs.push_back(group_lr(groups[g], kind));
    auto& params = groups[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      auto* state = adapter::find_optimizer_state(optimizer, params[i]);
      if (!state) continue;  // no step taken yet
      std::string key = concat(prefix, g, ".", i, ".");
      auto put_t = [&](const char* n, const at::Tensor& t) {
        if (t.defined()) checkpoint.tensors[key + n] = t.detach().to(at::kCPU).clone();
      };
      if (kind == OptKind::kSGD) {
        put_t("momentum_buffer", static_cast<torch::optim::SGDParamState*>(state)->momentum_buffer());
      } else if (kind == OptKind::kAdam) {
        auto* s = static_cast<torch::optim::AdamParamState*>(state);
        put_t("exp_avg", s->exp_avg());
        put_t("exp_avg_sq", s->exp_avg_sq());
        put_t("max_exp_avg_sq", s->max_exp_avg_sq());
        checkpoint.tensors[key + "step"] = at::tensor({s->step()}, at::kLong);
      } else {
        auto* s = static_cast<torch::optim::AdamWParamState*>(state);
        put_t("exp_avg", s->exp_avg());
        put_t("exp_avg_sq", s->exp_avg_sq());
        put_t("max_exp_avg_sq", s->max_exp_avg_sq());
        checkpoint.tensors[key + "step"] = at::tensor({s->step()}, at::kLong);
      }
    }
  }
  meta[prefix + "type"] = kind_name(kind);
  meta[prefix + "lr"] = lrs;
  checkpoint.metadata = meta.dump();
}

void load_optimizer(const Checkpoint& checkpoint, torch::optim::Optimizer& optimizer,
                    const std::string& prefix) {
  OptKind kind = optimizer_kind(optimizer);
  auto& groups = optimizer.param_groups();
  json meta = json::parse(checkpoint.metadata);
  std::vector<std::string> problems;
  if (!meta.contains(prefix + "type") || meta[prefix + "type"] != kind_name(kind)) {
    problems.push_back(concat("optimizer type: checkpoint has ",
                              meta.contains(prefix + "type") ? meta[prefix + "type"].dump()
                                                             : std::string("none"),
                              ", the program uses ", kind_name(kind)));
  }
  json lrs = meta.value(prefix + "lr", json::array());
  if (lrs.size() != groups.size()) {
    problems.push_back(concat("parameter groups: checkpoint has ", lrs.size(),
                              ", the optimizer has ", groups.size()));
  }
  std::set<std::string> used;
  for (size_t g = 0; g < groups.size() && problems.empty(); ++g) {
    auto& params = groups[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      std::string key = concat(prefix, g, ".", i, ".");
      for (auto it = checkpoint.tensors.lower_bound(key);
           it != checkpoint.tensors.end() && it->first.compare(0, key.size(), key) == 0; ++it) {
        used.insert(it->first);
        if (it->first != key + "step") check_same("optimizer state", it->first, it->second, params[i], problems);
      }
    }
  }
  for (auto it = checkpoint.tensors.lower_bound(prefix);
       it != checkpoint.tensors.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
    if (!used.count(it->first)) problems.push_back(concat("unexpected key '", it->first, "'"));
  }
  if (!problems.empty()) throw_problems("load_optimizer", problems);

  for (size_t g = 0; g < groups.size(); ++g) {
    group_lr(groups[g], kind) = lrs[g].get<double>();
    auto& params = groups[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      std::string key = concat(prefix, g, ".", i, ".");
      auto get_t = [&](const char* n) -> at::Tensor {
        auto it = checkpoint.tensors.find(key + n);
        return it == checkpoint.tensors.end() ? at::Tensor() : it->second.clone();
      };
      if (kind == OptKind::kSGD) {
        auto buf = get_t("momentum_buffer");
        if (!buf.defined()) continue;
        auto s = std::make_unique<torch::optim::SGDParamState>();
        s->momentum_buffer(buf);
        adapter::set_optimizer_state(optimizer, params[i], std::move(s));
      } else {
        auto step = get_t("step");
        if (!step.defined()) continue;
        std::unique_ptr<torch::optim::OptimizerParamState> base;
        if (kind == OptKind::kAdam) {
          auto s = std::make_unique<torch::optim::AdamParamState>();
          s->step(step.item<int64_t>()).exp_avg(get_t("exp_avg")).exp_avg_sq(get_t("exp_avg_sq"));
          if (auto m = get_t("max_exp_avg_sq"); m.defined()) s->max_exp_avg_sq(m);
          base = std::move(s);
        } else {
          auto s = std::make_unique<torch::optim::AdamWParamState>();
          s->step(step.item<int64_t>()).exp_avg(get_t("exp_avg")).exp_avg_sq(get_t("exp_avg_sq"));
          if (auto m = get_t("max_exp_avg_sq"); m.defined()) s->max_exp_avg_sq(m);
          base = std::move(s);
        }
        adapter::set_optimizer_state(optimizer, params[i], std::move(base));
      }
    }
  }
}

void add_rng_state(Checkpoint& checkpoint, const std::string& name) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  checkpoint.tensors[name] = gen.get_state().clone();
}

void load_rng_state(const Checkpoint& checkpoint, const std::string& name) {
  auto it = checkpoint.tensors.find(name);
  LOCKSTEP_CHECK(it != checkpoint.tensors.end(), "load_rng_state: the checkpoint has no '", name,
                 "' tensor; it was saved without add_rng_state");
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  try {
    gen.set_state(it->second);
  } catch (const std::exception& e) {
    throw InvalidArgument(concat("load_rng_state: '", name, "' is not a CPU generator state: ",
                                 e.what()));
  }
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

std::vector<std::string> allgather_strings(ProcessGroup& group, const std::string& mine) {
  const int world = group.size();
  std::vector<at::Tensor> lengths(world);
  for (auto& t : lengths) t = at::zeros({1}, at::kLong);
  group.allgather(lengths, at::tensor({static_cast<int64_t>(mine.size())}, at::kLong))->wait();
  int64_t longest = 1;
  for (auto& t : lengths) longest = std::max(longest, t.item<int64_t>());
  auto buf = at::zeros({longest}, at::kByte);
  std::memcpy(buf.data_ptr(), mine.data(), mine.size());
  std::vector<at::Tensor> texts(world);
  for (auto& t : texts) t = at::zeros({longest}, at::kByte);
  group.allgather(texts, buf)->wait();
  std::vector<std::string> out;
  for (int r = 0; r < world; ++r) {
    out.emplace_back(static_cast<const char*>(texts[r].data_ptr()),
                     static_cast<size_t>(lengths[r].item<int64_t>()));
  }
  return out;
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
  for (int r = 1; r < world; ++r) all_same = all_same && hashes[r].item<int64_t>() == hashes[0].item<int64_t>();
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

}  // namespace train
}  // namespace lockstep
