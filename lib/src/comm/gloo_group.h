#pragma once
// The Gloo process group: c10d's ProcessGroupGloo (through the torch adapter) behind
// lockstep's ProcessGroup, with lockstep's argument checks, averages and error messages.
// Internal: users reach it through init_process_group or new_gloo_group.

#include <chrono>
#include <memory>

#include "adapter/torch_adapter.h"
#include "lockstep/process_group.h"
#include "lockstep/store.h"

namespace lockstep {
namespace comm {

/// A Gloo group over `store` (the caller scopes the store). Connects the full mesh, so it is
/// collective and bounded by the store's timeout. Throws InvalidArgument (unusable network
/// device), TimeoutError or CommError naming this rank.
ProcessGroupPtr make_gloo_group(int rank, int size, const std::shared_ptr<Store>& store,
                                std::chrono::milliseconds timeout, int threads,
                                const adapter::GlooDeviceSpec& device);

}  // namespace comm
}  // namespace lockstep
