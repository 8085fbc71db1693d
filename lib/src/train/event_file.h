#pragma once
// TensorBoard's event-file format, written by hand (no protobuf library): TFRecord framing
// around serialized `tensorflow.Event` messages. Pure functions; TensorBoardWriter
// (lockstep/train/metrics.h) puts their bytes in a file.
//
// Note [TensorBoard event files]
// A file is a sequence of TFRecords, each
//   uint64 length (little-endian) | uint32 masked crc32c(length bytes) | data | uint32 masked crc32c(data)
// (core/crc32c.h has the mask). The first record's data is an Event {wall_time (1, double),
// file_version (3, string) = "brain.Event:2"}; each later one an Event {wall_time (1, double),
// step (2, int64 varint), summary (5, Summary {value (1, repeated Value {tag (1, string),
// simple_value (2, float)})})}. Field numbers are those of tensorflow/core/util/event.proto
// and tensorflow/core/framework/summary.proto; TensorBoard reads `simple_value` as a scalar
// (its "legacy" scalar form, which torch.utils.tensorboard writes too). The file name holds
// "tfevents" (TensorBoard's filter): events.out.tfevents.<unix time>.<host>.<pid>.<n>, as
// torch.utils.tensorboard names its files.
//
// Note [TensorBoard purge step]
// A run resumed from a checkpoint at step N writes steps >= N again, and its new event file
// sits in the same directory as the crashed run's, which TensorBoard reads first (it reads a
// run's files in name order, and the Unix time in seconds comes first in the name; a restart
// within the same second may sort either way, as with torch's files). TensorBoard's
// EventAccumulator drops every event of the run with step >= S that it has read so far, on
// every tag, when it reads an Event {step (2) = S, session_log (7) = SessionLog {status (1) =
// START (1)}} in a file whose file_version is "brain.Event:2" or later (its
// _CheckForRestartAndMaybePurge). torch.utils.tensorboard's SummaryWriter(purge_step=N)
// writes a file_version event at step N and then that START event at step N; so does
// TensorBoardWriter(dir, purge_step), its first event carrying step N.

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lockstep {
namespace train {
namespace detail {

/// The serialized first Event of a file: wall_time and file_version "brain.Event:2", and
/// `step` when it is >= 0 (a purging writer's, Note [TensorBoard purge step]).
std::string encode_file_version_event(double wall_time, int64_t step = -1);

/// The serialized Event {wall_time, step, session_log {status START}} that makes TensorBoard
/// drop the events with step >= `step` it read before (Note [TensorBoard purge step]).
std::string encode_session_start_event(double wall_time, int64_t step);

/// The serialized Event of `values` (tag, value) at `step`: one Summary with a Value each.
std::string encode_scalars_event(double wall_time, int64_t step,
                                 const std::vector<std::pair<std::string, float>>& values);

/// `data` framed as one TFRecord: length, masked CRC of the length, data, masked CRC of data.
std::string frame_record(const std::string& data);

}  // namespace detail
}  // namespace train
}  // namespace lockstep
