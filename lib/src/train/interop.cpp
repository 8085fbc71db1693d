// Weights exchange with Python's torch.save / torch.load(weights_only=True).
#include "lockstep/train/interop.h"

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/nn/module.h>

#include <cstdio>
#include <fstream>
#include <iterator>

#include "lockstep/errors.h"
#include "lockstep/train/checkpoint.h"

namespace lockstep {
namespace train {

using detail::concat;

void save_torch_weights(const std::string& path, const std::map<std::string, at::Tensor>& tensors) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& kv : tensors) dict.insert(kv.first, kv.second.detach().to(at::kCPU).contiguous());
  // Note [weights_only export]
  // torch::jit::pickle_save tags containers with torch.jit._pickle.restore_type_tag, which
  // Python's weights_only unpickler refuses. Pickling with tag_aggregates=false gives a plain
  // dict of tensors (rebuilt by torch._utils._rebuild_tensor_v2, which weights_only allows),
  // in the same zip container that torch.save writes.
  std::vector<char> pickled;
  torch::jit::Pickler pickler(
      [&](const char* buf, size_t n) { pickled.insert(pickled.end(), buf, buf + n); },
      /*tensor_table=*/nullptr, /*type_renamer=*/nullptr, /*memoized_class_types=*/nullptr,
      /*get_tensor_id=*/nullptr, /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(c10::IValue(dict));
  pickler.stop();
  const std::string tmp = path + ".tmp";
  try {
    caffe2::serialize::PyTorchStreamWriter writer(tmp);
    torch::jit::writeArchiveAndTensors("data", pickled.data(), pickled.size(), pickler.tensorData(),
                                       writer);
    writer.writeEndOfFile();
  } catch (const std::exception& e) {
    throw Error(concat("could not write weights file '", tmp, "': ", e.what()));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    throw Error(concat("could not rename '", tmp, "' to '", path, "'"));
  }
}

std::map<std::string, at::Tensor> load_torch_weights(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InvalidArgument(concat("cannot open weights file '", path, "'"));
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  c10::IValue value;
  try {
    value = torch::jit::pickle_load(bytes);
  } catch (const std::exception& e) {
    std::string what = e.what();
    what = what.substr(0, what.find("\nException raised from"));
    throw InvalidArgument(concat("weights file '", path, "' is not a torch.save file LibTorch "
                                 "can read (", what, "). A state_dict saved from Python must be "
                                 "a plain dict: torch.save(dict(model.state_dict()), path)"));
  }
  if (!value.isGenericDict()) {
    throw InvalidArgument(concat("weights file '", path, "' holds a ", value.tagKind(),
                                 ", expected a dict of name -> tensor (a state_dict)"));
  }
  std::map<std::string, at::Tensor> out;
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString() || !item.value().isTensor()) {
      throw InvalidArgument(concat("weights file '", path, "': entry ", item.key().tagKind(),
                                   " -> ", item.value().tagKind(),
                                   " is not a string -> tensor pair"));
    }
    out[item.key().toStringRef()] = item.value().toTensor();
  }
  return out;
}

void export_weights(const torch::nn::Module& module, const std::string& path) {
  std::map<std::string, at::Tensor> tensors;
  for (const auto& p : module.named_parameters(true)) tensors[p.key()] = p.value();
  for (const auto& b : module.named_buffers(true)) tensors[b.key()] = b.value();
  save_torch_weights(path, tensors);
}

void import_weights(torch::nn::Module& module, const std::string& path) {
  Checkpoint ck;
  ck.tensors = load_torch_weights(path);
  try {
    load_module(ck, module, /*prefix=*/"");
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(concat("importing '", path, "': ", e.what()));
  }
}

}  // namespace train
}  // namespace lockstep
