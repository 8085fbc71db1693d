#pragma once
/// \file
/// Weights exchange with Python: files that `torch.load(path, weights_only=True)` reads, and
/// state dicts that Python's `torch.save(dict(model.state_dict()), path)` wrote.
///
/// The files are PyTorch's own zip/pickle format (LibTorch's `torch::jit::pickle_save` and
/// `torch::jit::pickle_load`). Reading uses LibTorch's restricted unpickler, which builds only
/// tensors and plain containers and calls no Python or user code; still, prefer lockstep's
/// checkpoint format (lockstep/train/checkpoint.h) for resuming, and import only files you trust.

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

/// Reads a dict {name: tensor} saved by Python's `torch.save` or by `save_torch_weights`.
/// LibTorch 1.13's unpickler cannot rebuild the OrderedDict (with its `_metadata`) that
/// `model.state_dict()` returns, nor a one-entry dict (pickle SETITEM): save
/// `dict(model.state_dict())` from Python. Throws InvalidArgument naming the path and what
/// was found when the file holds anything else.
std::map<std::string, at::Tensor> load_torch_weights(const std::string& path);

/// `module`'s parameters and buffers, by their dotted names as in Python's state_dict().
void export_weights(const torch::nn::Module& module, const std::string& path);

/// Copies a state dict saved from Python into `module` (strict: missing/unexpected keys and
/// shape differences are listed in one error and nothing is copied).
void import_weights(torch::nn::Module& module, const std::string& path);

}  // namespace train
}  // namespace lockstep
