#pragma once
/// \file
/// Process groups whose ranks are threads of one process: collectives by direct memory
/// reduction, no sockets, no store round trips. For tests, programs that run ranks as
/// threads, and DataParallel (one DDP Reducer per replica over a thread group, reducing with
/// `ProcessGroup::reduce` straight into the primary's gradients).

#include <chrono>
#include <vector>

#include "lockstep/process_group.h"

namespace lockstep {

/// Options for `new_thread_groups`.
struct ThreadGroupOptions {
  /// How long `Work::wait()` waits for the other threads to reach the same collective before
  /// it throws TimeoutError naming them. Default 300 s.
  LOCKSTEP_ARG(std::chrono::milliseconds, timeout) = std::chrono::seconds(300);
  /// Work unit of a collective in bytes: a reduction is split into slices of this size, and
  /// every rank that waits on the collective reduces slices alongside the last rank to
  /// arrive. Default 256 KiB.
  LOCKSTEP_ARG(int64_t, slice_bytes) = 256 * 1024;
  /// How long `Work::wait()` polls (helping with slices) before it blocks on a condition
  /// variable: worth it only when every rank's thread has a core of its own. Default 0.
  LOCKSTEP_ARG(std::chrono::microseconds, spin) = std::chrono::microseconds(0);
};

/// Creates `size` groups sharing one in-process state; `groups[r]` is rank r's group and is
/// meant to be used by one thread (collectives of one rank must be issued in one order).
/// Every collective is asynchronous: a rank deposits its tensor and returns; the last rank to
/// arrive reduces (in slices, helped by ranks blocked in `wait()`), in rank order 0..size-1
/// for every element, so every rank receives bitwise the same result. Tensors may live on
/// different devices (the reduction runs on rank 0's tensor's device). A rank's tensor must
/// not be touched until its Work completed. Not collective (plain construction).
std::vector<ProcessGroupPtr> new_thread_groups(
    int size, const ThreadGroupOptions& options = ThreadGroupOptions());

/// Fails every pending and future collective of the groups created with `group` (a group
/// from `new_thread_groups`) with CommError carrying `reason`: for a thread that died
/// mid-step, so that its peers stop waiting. Safe from any thread; the groups stay failed.
/// Throws InvalidArgument if `group` is not a thread group.
void abort_thread_groups(const ProcessGroupPtr& group, const std::string& reason);

}  // namespace lockstep
