#pragma once
/// \file
/// Weights exchange with Python: files that `torch.load(path, weights_only=True)` reads, and
/// state dicts that Python's `torch.save(model.state_dict(), path)` wrote.
///
/// The files are PyTorch's own zip/pickle format. Reading uses lockstep's own restricted
/// unpickler (Note [State dict unpickler] in lib/src/adapter/state_dict_unpickler.cpp): it
/// builds only dicts, tuples, numbers, strings and tensors, refuses every other Python global,
/// calls no Python or user code, and bounds every size in the file before allocating. Still,
/// prefer lockstep's checkpoint format (lockstep/train/checkpoint.h) for resuming.

#include <ATen/core/Tensor.h>

#include <map>
#include <string>

namespace torch {
namespace nn {
class Module;
}
}  // namespace torch

namespace lockstep {
namespace train {

/// Writes `tensors` as a dict {name: tensor} to `path` (atomically) in the format of
/// Python's `torch.save`. Throws lockstep::Error naming the path on failure.
void save_torch_weights(const std::string& path, const std::map<std::string, at::Tensor>& tensors);

/// Reads a dict {name: tensor} saved by Python's `torch.save` (`model.state_dict()`, an
/// OrderedDict, or a plain dict) or by `save_torch_weights`. With a non-empty `key`, the
/// file holds a dict and the state dict is its entry `key`, as in
/// `torch.save({'model': model.state_dict(), 'epoch': 3}, path)` with `key` "model" (other
/// entries may hold tensors, numbers, strings and containers; they are ignored). Tensors
/// come back on the CPU. Throws InvalidArgument naming the path and what was found when the
/// file holds anything else (another Python object, a missing key, a damaged archive).
std::map<std::string, at::Tensor> load_torch_weights(const std::string& path,
                                                      const std::string& key = "");

/// `module`'s parameters and buffers, by their dotted names as in Python's state_dict().
void export_weights(const torch::nn::Module& module, const std::string& path);

/// Copies a state dict saved from Python into `module` (strict: missing/unexpected keys and
/// shape differences are listed in one error and nothing is copied). `key` as in
/// `load_torch_weights`.
void import_weights(torch::nn::Module& module, const std::string& path,
                    const std::string& key = "");

}  // namespace train
}  // namespace lockstep
