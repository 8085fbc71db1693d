// Weights exchange with Python's torch.save / torch.load(weights_only=True).
#include "lockstep/train/interop.h"

#include <torch/nn/module.h>

#include <cstdio>
#include <fstream>
#include <iterator>

#include "adapter/torch_adapter.h"
#include "lockstep/errors.h"
#include "lockstep/train/checkpoint.h"

namespace lockstep {
namespace train {

using detail::concat;

void save_torch_weights(const std::string& path, const std::map<std::string, at::Tensor>& tensors) {
  std::map<std::string, at::Tensor> cpu;
  for (const auto& kv : tensors) cpu[kv.first] = kv.second.detach().to(at::kCPU).contiguous();
  const std::string tmp = path + ".tmp";
  try {
    adapter::write_tensor_dict_archive(tmp, cpu);
  } catch (const std::exception& e) {
    std::remove(tmp.c_str());
    throw Error(concat("could not write weights file '", tmp, "': ", e.what()));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error(concat("could not rename '", tmp, "' to '", path, "'"));
  }
}

std::map<std::string, at::Tensor> load_torch_weights(const std::string& path,
                                                      const std::string& key) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InvalidArgument(concat("cannot open weights file '", path, "'"));
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  try {
    return adapter::read_tensor_dict_archive(bytes, key);
  } catch (const InvalidArgument& e) {
    const std::string what = e.what();
    throw InvalidArgument(concat("weights file '", path, "'", what.front() == ':' ? "" : " ",
                                 what));
  }
}

void export_weights(const torch::nn::Module& module, const std::string& path) {
  std::map<std::string, at::Tensor> tensors;
  for (const auto& p : module.named_parameters(true)) tensors[p.key()] = p.value();
  for (const auto& b : module.named_buffers(true)) tensors[b.key()] = b.value();
  save_torch_weights(path, tensors);
}

void import_weights(torch::nn::Module& module, const std::string& path,
                    const std::string& key) {
  Checkpoint ck;
  ck.tensors = load_torch_weights(path, key);
  try {
    load_module(ck, module, /*prefix=*/"");
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(concat("importing '", path, "': ", e.what()));
  }
}

}  // namespace train
}  // namespace lockstep
