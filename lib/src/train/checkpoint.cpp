// save_checkpoint and load_checkpoint: rank 0 writes, every rank reads, and all agree on the
// outcome (raise_if_any_rank_failed).
#include "lockstep/agreement.h"
#include "lockstep/errors.h"
#include "lockstep/train/checkpoint.h"

namespace lockstep {
namespace train {

using detail::concat;


void save_checkpoint(ProcessGroup& group, const std::string& path, const Checkpoint& checkpoint) {
  std::string error;
  if (group.rank() == 0) {
    try {
      write_checkpoint_file(path, checkpoint);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  raise_if_any_rank_failed(group, error, concat("saving checkpoint '", path, "'"));
}

Checkpoint load_checkpoint(ProcessGroup& group, const std::string& path) {
  std::string error;
  Checkpoint out;
  try {
    out = read_checkpoint_file(path);
  } catch (const std::exception& e) {
    error = e.what();
  }
  raise_if_any_rank_failed(group, error, concat("loading checkpoint '", path, "'"));
  return out;
}

}  // namespace train
}  // namespace lockstep
