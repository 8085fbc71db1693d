#pragma once
/// \file
/// Checkpoints: lockstep's own versioned file format of named tensors plus JSON metadata,
/// with checksums, written atomically by rank 0 and read without running any code.
///
/// Note [Checkpoint format]
/// A checkpoint file is, in order (all integers little-endian):
///   1. magic "LSTPCKPT" (8 bytes), format version (u32, currently 1), header length (u64);
///   2. the header: UTF-8 JSON {"metadata": <user JSON>, "tensors": [{"name", "dtype",
///      "shape", "offset", "nbytes", "crc32"}, ...]}, then its CRC-32 (u32);
///   3. the tensor data, contiguous, at the offsets the header names (relative to the
///      start of the data section);
///   4. a trailer: "LSTPEND!" (8 bytes) and the total file length (u64).
/// Reading checks every one of those before returning anything: a truncated file fails on
/// the trailer or an offset past the end, a flipped bit fails a CRC, a file of another
/// version fails on the version, and `load_module` / `load_optimizer` reject a file of
/// another model by its missing or unexpected keys and shape differences. Nothing is
/// unpickled and no TorchScript runs, and everything the file declares is bounded before it
/// is used (JSON depth and size, tensor counts, shapes and sizes against the file's size,
/// metadata numbers through `metadata_int`; Note [Bounded checkpoint parsing] in
/// lib/src/train/checkpoint_parsing.h), so a hostile file can at worst be rejected.
///
/// Note [Atomic checkpoint writes]
/// `write_checkpoint_file` writes `<path>.tmp.<pid>`, fsyncs it, renames it over `path`
/// (on every failure, of open, write, fsync, close or rename, ENOSPC and `ulimit -f` included,
/// the temporary file is removed before the error is thrown),
/// and fsyncs the directory: a crash at any moment leaves either the previous checkpoint or
/// the new one, never a torn file. `save_checkpoint` lets rank 0 do that and then makes all
/// ranks agree on the outcome with one all-reduce, so a failed save (disk full, permission)
/// raises the same error on every rank instead of leaving the others waiting.

#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <vector>

#include "lockstep/agreement.h"
#include "lockstep/process_group.h"

namespace torch {
namespace nn {
class Module;
}
namespace optim {
class Optimizer;
class LRScheduler;
}
}  // namespace torch

namespace lockstep {
namespace train {

/// Version written by this build; `read_checkpoint_file` accepts only this version.
constexpr uint32_t kCheckpointFormatVersion = 1;

/// The contents of one checkpoint: named CPU tensors and free-form JSON metadata.
struct Checkpoint {
  /// Tensors by name (sorted, so files are reproducible). CPU, any dense dtype.
  std::map<std::string, at::Tensor> tensors;
  /// A JSON object as text (step, epoch, sampler position, config hash, ...). Default "{}".
  std::string metadata = "{}";
};

/// Writes `checkpoint` to `path` atomically (see Note [Atomic checkpoint writes]). Not a
/// collective. Throws lockstep::Error naming the path and the failing system call.
void write_checkpoint_file(const std::string& path, const Checkpoint& checkpoint);

/// Reads and fully validates the checkpoint at `path`. Not a collective. Throws
/// InvalidArgument naming the path and the reason (truncated, checksum mismatch at a named
/// tensor, wrong version, not a checkpoint, ...). Returns nothing partial.
Checkpoint read_checkpoint_file(const std::string& path);

/// Rank 0 writes `checkpoint` to `path` atomically; every rank returns only after all agree
/// that it was written, or every rank throws the same error (rank 0's reason travels through
/// the group's store). Collective. Ranks other than 0 may pass an empty checkpoint.
void save_checkpoint(ProcessGroup& group, const std::string& path, const Checkpoint& checkpoint);

/// Every rank reads `path`; returns only when every rank read it successfully, else every
/// rank throws (naming the ranks that failed and why on those ranks). Collective.
Checkpoint load_checkpoint(ProcessGroup& group, const std::string& path);

/// True when `path` exists (a checkpoint to resume from). Not a collective.
bool checkpoint_exists(const std::string& path);

/// The integer field `key` of `checkpoint.metadata`, checked to lie in [min, max]: use it for
/// every number a program resumes from (step, epoch, batch). InvalidArgument naming the
/// field, the value found and `path` (the file it came from) when the field is missing, not
/// an integer or out of range. Not a collective.
int64_t metadata_int(const Checkpoint& checkpoint, const std::string& key, int64_t min,
                     int64_t max, const std::string& path);

/// Adds `module`'s parameters and buffers as "<prefix><name>" (detached CPU copies).
void add_module(Checkpoint& checkpoint, const torch::nn::Module& module,
                const std::string& prefix = "model.");

/// Copies "<prefix><name>" tensors into `module`'s parameters and buffers. Validates first
/// (missing keys, unexpected keys under `prefix`, shape and dtype differences, all named in
/// one error) and copies nothing unless everything matches.
void load_module(const Checkpoint& checkpoint, torch::nn::Module& module,
                 const std::string& prefix = "model.");

/// Adds the optimizer's per-parameter state and every parameter group's hyperparameters
/// (lr, momentum, betas, ...), as Python's `optimizer.state_dict()` holds them, for
/// torch::optim's SGD, Adam, AdamW, Adagrad, RMSprop and LBFGS (its history lists included).
/// Throws InvalidArgument for other optimizer types. Tensors are "<prefix><group>.<index>.<field>";
/// docs/checkpoints-and-recipes.md lists the fields.
void add_optimizer(Checkpoint& checkpoint, torch::optim::Optimizer& optimizer,
                   const std::string& prefix = "optim.");

/// Restores what `add_optimizer` saved into an optimizer of the same type over the same
/// parameters (state and hyperparameters, as Python's `load_state_dict`), validating
/// everything (type, group count, each hyperparameter's range, each tensor's shape, dtype
/// and range, missing and unexpected keys) before changing anything. State is moved to each
/// parameter's device. Files that hold only each group's "lr" (written before the other
/// hyperparameters were saved) restore the learning rates alone.
void load_optimizer(const Checkpoint& checkpoint, torch::optim::Optimizer& optimizer,
                    const std::string& prefix = "optim.");

/// Adds a learning-rate scheduler's state (torch::optim::LRScheduler and its subclasses such
/// as StepLR): its type and step count, as "<prefix>type" and "<prefix>step_count" in the
/// metadata. The learning rates it has set are the optimizer's: save them with `add_optimizer`.
void add_scheduler(Checkpoint& checkpoint, torch::optim::LRScheduler& scheduler,
                   const std::string& prefix = "sched.");

/// Restores what `add_scheduler` saved into a scheduler of the same type, built with the same
/// arguments (StepLR's step_size and gamma) over the optimizer that `load_optimizer` restored.
/// Checks the type and the step count's range before changing anything.
void load_scheduler(const Checkpoint& checkpoint, torch::optim::LRScheduler& scheduler,
                    const std::string& prefix = "sched.");

/// Adds the default CPU generator's state as "<name>".
void add_rng_state(Checkpoint& checkpoint, const std::string& name = "rng.cpu");

/// Restores the default CPU generator's state saved by `add_rng_state`.
void load_rng_state(const Checkpoint& checkpoint, const std::string& name = "rng.cpu");

// config_hash and check_config_agreement live in lockstep/agreement.h (they are collective
// checks, not checkpoint concerns); the names stay reachable as train:: for existing callers.
using lockstep::config_hash;

using lockstep::check_config_agreement;

}  // namespace train
}  // namespace lockstep
