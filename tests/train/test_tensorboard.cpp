// TensorBoard event files: CRC-32C against published vectors, and files read back with a
// TFRecord reader and protobuf decoder written here, independently of the library's encoder.
#include <gtest/gtest.h>

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "core/crc32c.h"
#include "lockstep/errors.h"
#include "lockstep/train/metrics.h"
#include "train/event_file.h"

using namespace lockstep::train;
using lockstep::core::crc32c;
using lockstep::core::mask_crc32c;

namespace {

std::string fresh_dir(const std::string& name) {
  std::string dir = ::testing::TempDir() + "lockstep_tb_" + name + "_" + std::to_string(::getpid());
  std::system(("rm -rf '" + dir + "'").c_str());
  return dir;
}

std::vector<std::string> files_in(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      if (e->d_name[0] != '.') names.push_back(e->d_name);
    }
    ::closedir(d);
  }
  return names;
}

uint64_t read_le(const std::string& s, size_t pos, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t(static_cast<uint8_t>(s.at(pos + i))) << (8 * i);
  return v;
}

// Reads TFRecords, checking each length and both masked CRCs; returns the records' data.
std::vector<std::string> read_records(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> records;
  size_t pos = 0;
  while (pos < bytes.size()) {
    EXPECT_GE(bytes.size() - pos, 12u) << "torn record header at byte " << pos;
    if (bytes.size() - pos < 12) break;
    const uint64_t length = read_le(bytes, pos, 8);
    EXPECT_EQ(read_le(bytes, pos + 8, 4), mask_crc32c(crc32c(bytes.data() + pos, 8)))
        << "length CRC of the record at byte " << pos;
    EXPECT_GE(bytes.size() - pos - 12, length + 4) << "record at byte " << pos << " is cut short";
    if (bytes.size() - pos - 12 < length + 4) break;
    std::string data = bytes.substr(pos + 12, length);
    EXPECT_EQ(read_le(bytes, pos + 12 + length, 4), mask_crc32c(crc32c(data)))
        << "data CRC of the record at byte " << pos;
    records.push_back(data);
    pos += 12 + length + 4;
  }
  return records;
}

// A decoded protobuf field: a varint or fixed value in `number`, or bytes in `bytes`.
struct Field {
  uint32_t wire_type = 0;
  uint64_t number = 0;
  std::string bytes;
};

uint64_t read_varint(const std::string& s, size_t& pos) {
  uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    uint8_t b = static_cast<uint8_t>(s.at(pos++));
    v |= uint64_t(b & 0x7F) << shift;
    if (!(b & 0x80)) return v;
  }
  ADD_FAILURE() << "varint longer than 10 bytes";
  return v;
}

std::multimap<uint32_t, Field> decode(const std::string& message) {
  std::multimap<uint32_t, Field> fields;
  size_t pos = 0;
  while (pos < message.size()) {
    uint64_t key = read_varint(message, pos);
    Field f;
    f.wire_type = key & 7;
    switch (f.wire_type) {
      case 0: f.number = read_varint(message, pos); break;
      case 1: f.number = read_le(message, pos, 8); pos += 8; break;
      case 5: f.number = read_le(message, pos, 4); pos += 4; break;
      case 2: {
        uint64_t n = read_varint(message, pos);
        f.bytes = message.substr(pos, n);
        EXPECT_EQ(f.bytes.size(), n) << "length-delimited field runs past the message";
        pos += n;
        break;
      }
      default: ADD_FAILURE() << "unexpected wire type " << f.wire_type; return fields;
    }
    fields.emplace(static_cast<uint32_t>(key >> 3), f);
  }
  return fields;
}

double as_double(const Field& f) {
  double d;
  std::memcpy(&d, &f.number, 8);
  return d;
}

float as_float(const Field& f) {
  uint32_t bits = static_cast<uint32_t>(f.number);
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// A scalar event, decoded: its step, wall time and (tag, value) pairs.
struct Scalars {
  int64_t step = 0;
  double wall_time = 0;
  std::vector<std::pair<std::string, float>> values;
};

// The (tag, simple_value) pairs of a serialized Summary.
std::vector<std::pair<std::string, float>> summary_values(const std::string& bytes) {
  std::vector<std::pair<std::string, float>> values;
  auto summary = decode(bytes);
  for (auto it = summary.lower_bound(1); it != summary.upper_bound(1); ++it) {
    auto value = decode(it->second.bytes);
    EXPECT_EQ(value.count(1), 1u);
    EXPECT_EQ(value.count(2), 1u);
    if (!value.count(1) || !value.count(2)) continue;
    EXPECT_EQ(value.find(2)->second.wire_type, 5u) << "simple_value is a fixed32 float";
    values.emplace_back(value.find(1)->second.bytes, as_float(value.find(2)->second));
  }
  EXPECT_EQ(summary.size(), values.size()) << "Summary holds only `value` fields";
  return values;
}

Scalars decode_scalars(const std::string& event) {
  auto e = decode(event);
  Scalars out;
  EXPECT_EQ(e.count(1), 1u);
  EXPECT_EQ(e.count(2), 1u);
  EXPECT_EQ(e.count(5), 1u);
  if (e.count(1)) out.wall_time = as_double(e.find(1)->second);
  if (e.count(2)) out.step = static_cast<int64_t>(e.find(2)->second.number);
  if (!e.count(5)) return out;
  EXPECT_EQ(e.find(5)->second.wire_type, 2u);
  out.values = summary_values(e.find(5)->second.bytes);
  return out;
}

// One scalar as TensorBoard shows it.
struct Point {
  std::string tag;
  int64_t step;
  float value;
};

// What TensorBoard's EventAccumulator keeps of a run directory: its event files read in name
// order (as TensorBoard reads them), every scalar of every Summary, and, for each Event
// {step S, session_log {status START}} in a file of file_version "brain.Event:2", the points
// read so far with step >= S dropped (Note [TensorBoard purge step] in
// lib/src/train/event_file.h).
std::vector<Point> tensorboard_view(const std::string& dir) {
  auto names = files_in(dir);
  std::sort(names.begin(), names.end());
  std::vector<Point> points;
  for (const auto& name : names) {
    if (name.find("tfevents") == std::string::npos) continue;
    bool version2 = false;
    for (const auto& record : read_records(dir + "/" + name)) {
      auto e = decode(record);
      const int64_t step = e.count(2) ? static_cast<int64_t>(e.find(2)->second.number) : 0;
      if (e.count(3)) version2 = e.find(3)->second.bytes == "brain.Event:2";
      if (e.count(7) && version2) {
        auto session_log = decode(e.find(7)->second.bytes);
        if (session_log.count(1) && session_log.find(1)->second.number == /*START=*/1) {
          points.erase(std::remove_if(points.begin(), points.end(),
                                      [&](const Point& p) { return p.step >= step; }),
                       points.end());
        }
      }
      if (e.count(5)) {
        for (const auto& tv : summary_values(e.find(5)->second.bytes)) {
          points.push_back({tv.first, step, tv.second});
        }
      }
    }
  }
  return points;
}

void expect_file_version(const std::string& event) {
  auto e = decode(event);
  ASSERT_EQ(e.count(1), 1u);
  ASSERT_EQ(e.count(3), 1u);
  EXPECT_EQ(e.find(1)->second.wire_type, 1u);
  EXPECT_GT(as_double(e.find(1)->second), 1.6e9) << "wall_time is Unix seconds";
  EXPECT_EQ(e.find(3)->second.bytes, "brain.Event:2");
}

bool python_has(const std::string& module) {
  return std::system(("/usr/bin/python3 -c 'import " + module + "' >/dev/null 2>&1").c_str()) == 0;
}

}  // namespace

TEST(Crc32c, PublishedVectors) {
  EXPECT_EQ(crc32c("123456789"), 0xE3069283u);
  EXPECT_EQ(crc32c(""), 0u);
  // RFC 3720, B.4.
  std::string zeros(32, '\0'), ones(32, '\xff'), up(32, '\0'), down(32, '\0');
  for (int i = 0; i < 32; ++i) {
    up[i] = static_cast<char>(i);
    down[i] = static_cast<char>(31 - i);
  }
  EXPECT_EQ(crc32c(zeros), 0x8A9136AAu);
  EXPECT_EQ(crc32c(ones), 0x62A8AB43u);
  EXPECT_EQ(crc32c(up), 0x46DD794Eu);
  EXPECT_EQ(crc32c(down), 0x113FDB5Cu);
  // Continuing a CRC over a second piece equals the CRC of the whole.
  EXPECT_EQ(crc32c("6789", 4, crc32c("12345", 5)), 0xE3069283u);
  const uint32_t c = 0xE3069283u;
  EXPECT_EQ(mask_crc32c(c), ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

TEST(TensorBoard, RecordFramingOfAKnownPayload) {
  // An empty Event framed: length 0, CRC of eight zero bytes, no data, CRC of nothing.
  std::string r = detail::frame_record("");
  ASSERT_EQ(r.size(), 16u);
  EXPECT_EQ(read_le(r, 0, 8), 0u);
  EXPECT_EQ(read_le(r, 8, 4), mask_crc32c(crc32c(std::string(8, '\0'))));
  EXPECT_EQ(read_le(r, 12, 4), mask_crc32c(0));
  // Field encodings by hand: step 300 is the varint AC 02 after key 0x10.
  std::string e = detail::encode_scalars_event(0.0, 300, {{"a", 1.0f}});
  EXPECT_NE(e.find(std::string("\x10\xac\x02", 3)), std::string::npos);
  // wall_time 0.0 as key 0x09 and eight zero bytes, first.
  EXPECT_EQ(e.substr(0, 9), std::string("\x09\0\0\0\0\0\0\0\0", 9));
  // Summary (key 0x2a) { Value (key 0x0a) { tag (0x0a) "a", simple_value (0x15) 1.0f } }.
  EXPECT_EQ(e.substr(12), std::string("\x2a\x0a\x0a\x08\x0a\x01" "a" "\x15\x00\x00\x80\x3f", 12));
}

TEST(TensorBoard, WriterFileReadsBackWithCrcsAndFields) {
  const std::string dir = fresh_dir("writer") + "/nested/run";  // parents are created
  std::string path;
  {
    TensorBoardWriter tb(dir);
    path = tb.path();
    tb.add_scalar("loss", 2.5, 1);
    tb.add_scalars(2, {{"step/loss", 1.25}, {"step/lr", 1e-3}});
    tb.add_scalar("big", 7, int64_t(1) << 40);
    // Flushed after each call: the records are in the file while the writer is open.
    EXPECT_EQ(read_records(path).size(), 4u);
  }
  auto names = files_in(dir);
  ASSERT_EQ(names.size(), 1u);
  EXPECT_EQ(names[0].rfind("events.out.tfevents.", 0), 0u) << names[0];
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  EXPECT_NE(names[0].find(std::string(".") + host + "."), std::string::npos) << names[0];
  EXPECT_EQ(dir + "/" + names[0], path);

  auto records = read_records(path);
  ASSERT_EQ(records.size(), 4u);
  expect_file_version(records[0]);
  auto first = decode_scalars(records[1]);
  EXPECT_EQ(first.step, 1);
  EXPECT_GT(first.wall_time, 1.6e9);
  ASSERT_EQ(first.values.size(), 1u);
  EXPECT_EQ(first.values[0].first, "loss");
  EXPECT_EQ(first.values[0].second, 2.5f);
  auto second = decode_scalars(records[2]);
  EXPECT_EQ(second.step, 2);
  ASSERT_EQ(second.values.size(), 2u);
  EXPECT_EQ(second.values[1].first, "step/lr");
  EXPECT_EQ(second.values[1].second, 1e-3f);
  EXPECT_EQ(decode_scalars(records[3]).step, int64_t(1) << 40);

  // A second writer in the same directory makes a second file rather than overwrite.
  TensorBoardWriter again(dir);
  EXPECT_NE(again.path(), path);
  EXPECT_EQ(files_in(dir).size(), 2u);
  // Disabled writer.
  TensorBoardWriter off("");
  off.add_scalar("x", 1, 1);
  EXPECT_EQ(off.path(), "");
}

TEST(TensorBoard, MetricsWriterMirrorsRecordsAsScalars) {
  const std::string dir = fresh_dir("metrics");
  const std::string jsonl = dir + ".jsonl";
  std::string tb_path;
  {
    MetricsWriter w(MetricsOptions().path(jsonl).tensorboard_dir(dir));
    tb_path = w.tensorboard_path();
    w.write({"step", {{"step", 20}, {"epoch", 0}, {"loss", 0.75}}});
    w.write({"bucket", {{"step", 20}, {"bucket", 0}, {"start_ms", 1}, {"end_ms", 2}}});
    w.write({"epoch", {{"epoch", 1}, {"test_accuracy", 0.875}}});
    w.write({"eval", {{"perplexity", 9.5}}});
    w.write({"eval", {{"perplexity", 8.5}}});
  }
  auto records = read_records(tb_path);
  ASSERT_EQ(records.size(), 5u) << "file version + 4 records (bucket records are not mirrored)";
  expect_file_version(records[0]);
  auto step = decode_scalars(records[1]);
  EXPECT_EQ(step.step, 20) << "the record's step field, not its epoch";
  ASSERT_EQ(step.values.size(), 2u);
  EXPECT_EQ(step.values[0].first, "step/epoch");
  EXPECT_EQ(step.values[1].first, "step/loss");
  EXPECT_EQ(step.values[1].second, 0.75f);
  auto epoch = decode_scalars(records[2]);
  EXPECT_EQ(epoch.step, 1);
  ASSERT_EQ(epoch.values.size(), 1u);
  EXPECT_EQ(epoch.values[0].first, "epoch/test_accuracy");
  auto eval0 = decode_scalars(records[3]), eval1 = decode_scalars(records[4]);
  EXPECT_EQ(eval0.step, 0);
  EXPECT_EQ(eval1.step, 1) << "records without step or epoch count their kind";
  ASSERT_EQ(eval1.values.size(), 1u);
  EXPECT_EQ(eval1.values[0], (std::pair<std::string, float>("eval/perplexity", 8.5f)));

  // TensorBoard without JSON lines (path "") still writes; JSON lines without it make no dir.
  const std::string only_tb = fresh_dir("only");
  {
    MetricsWriter w(MetricsOptions().tensorboard_dir(only_tb));
    w.write({"step", {{"step", 1}, {"loss", 1}}});
    EXPECT_EQ(w.path(), "");
    EXPECT_EQ(read_records(w.tensorboard_path()).size(), 2u);
  }
  MetricsWriter plain(jsonl);
  EXPECT_EQ(plain.tensorboard_path(), "");
}

TEST(TensorBoard, UnusableDirectoryIsNamed) {
  const std::string file = fresh_dir("file");
  std::ofstream(file) << "not a directory";
  try {
    TensorBoardWriter tb(file);
    FAIL() << "expected an error for a file where the directory should be";
  } catch (const lockstep::Error& e) {
    EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("not one"), std::string::npos) << e.what();
  }
  try {
    TensorBoardWriter tb(file + "/sub");
    FAIL() << "expected an error for a directory below a file";
  } catch (const lockstep::Error& e) {
    EXPECT_NE(std::string(e.what()).find("could not create the TensorBoard directory"),
              std::string::npos) << e.what();
  }
  std::remove(file.c_str());
}

// TensorBoard's own reader as the oracle, where /usr/bin/python3 has it.
TEST(TensorBoard, PythonTensorBoardReadsTheFile) {
  if (!python_has("tensorboard.backend.event_processing.event_accumulator")) {
    GTEST_SKIP() << "/usr/bin/python3 cannot import tensorboard (pip package `tensorboard`); "
                    "the C++ reader above checks the format instead";
  }
  const std::string dir = fresh_dir("python");
  {
    TensorBoardWriter tb(dir);
    for (int s = 1; s <= 5; ++s) tb.add_scalars(s, {{"train/loss", 1.0 / s}, {"train/lr", 0.5}});
  }
  const std::string script =
      "import sys\n"
      "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n"
      "a = EventAccumulator(sys.argv[1]); a.Reload()\n"
      "assert sorted(a.Tags()['scalars']) == ['train/loss', 'train/lr'], a.Tags()\n"
      "ev = a.Scalars('train/loss')\n"
      "assert [e.step for e in ev] == [1, 2, 3, 4, 5], ev\n"
      "assert abs(ev[3].value - 0.25) < 1e-7, ev\n"
      "print('ok')\n";
  const std::string py = dir + "/check.py";
  std::ofstream(py) << script;
  EXPECT_EQ(std::system(("/usr/bin/python3 '" + py + "' '" + dir + "'").c_str()), 0);
}

// A run that crashed after step 10 with its checkpoint at step 6, resumed: the new event file
// starts with torch's SummaryWriter(purge_step=7) events, and what TensorBoard shows holds each
// step once, steps 1..6 from the crashed run and 7..12 from the resumed one. Without the purge
// step the same reader sees steps 7..10 twice.
TEST(TensorBoard, ResumedRunPurgesTheCrashedRunsStepsPastTheCheckpoint) {
  auto crash_and_resume = [](const std::string& dir, int64_t purge_step) {
    std::vector<std::string> made;
    {
      MetricsWriter crashed(MetricsOptions().tensorboard_dir(dir));
      made.push_back(crashed.tensorboard_path());
      for (int s = 1; s <= 10; ++s) crashed.write({"step", {{"step", s}, {"loss", s}}});
      crashed.write({"epoch", {{"epoch", 1}, {"val_loss", 0.5}}});
    }
    MetricsWriter resumed(MetricsOptions().tensorboard_dir(dir).tensorboard_purge_step(purge_step));
    made.push_back(resumed.tensorboard_path());
    for (int s = 7; s <= 12; ++s) resumed.write({"step", {{"step", s}, {"loss", 100 + s}}});
    auto names = files_in(dir);
    std::sort(names.begin(), names.end());
    EXPECT_EQ(names.size(), 2u);
    EXPECT_EQ(dir + "/" + names.front(), made.front())
        << "TensorBoard reads files in name order: the crashed run's must come first";
    return made;
  };

  const std::string dir = fresh_dir("purge");
  auto made = crash_and_resume(dir, 7);
  // The resumed file: file_version at step 7, then SessionLog START at step 7, then scalars.
  auto records = read_records(made.back());
  ASSERT_EQ(records.size(), 2u + 6u);
  expect_file_version(records[0]);
  auto version = decode(records[0]);
  ASSERT_EQ(version.count(2), 1u);
  EXPECT_EQ(version.find(2)->second.number, 7u);
  auto start = decode(records[1]);
  ASSERT_EQ(start.count(2), 1u);
  EXPECT_EQ(start.find(2)->second.number, 7u);
  ASSERT_EQ(start.count(7), 1u) << "session_log is Event field 7";
  EXPECT_EQ(start.count(5), 0u);
  auto session_log = decode(start.find(7)->second.bytes);
  ASSERT_EQ(session_log.count(1), 1u);
  EXPECT_EQ(session_log.find(1)->second.number, 1u) << "SessionLog.status START is 1";
  // The crashed run's file has no purge events: its first event carries no step.
  auto first = read_records(made.front());
  ASSERT_FALSE(first.empty());
  EXPECT_EQ(decode(first[0]).count(2), 0u);

  std::map<int64_t, std::vector<float>> loss;
  std::vector<float> val_loss;
  for (const auto& p : tensorboard_view(dir)) {
    if (p.tag == "step/loss") loss[p.step].push_back(p.value);
    if (p.tag == "epoch/val_loss") val_loss.push_back(p.value);
  }
  ASSERT_EQ(loss.size(), 12u);
  for (const auto& kv : loss) {
    ASSERT_EQ(kv.second.size(), 1u) << "step " << kv.first << " shows " << kv.second.size() << " times";
    EXPECT_EQ(kv.second[0], kv.first <= 6 ? float(kv.first) : float(100 + kv.first)) << "step " << kv.first;
  }
  EXPECT_EQ(val_loss, std::vector<float>{0.5f}) << "epoch 1 (TensorBoard step 1) is kept";

  // The control: without a purge step, the same view shows steps 7..10 twice.
  const std::string plain = fresh_dir("nopurge");
  crash_and_resume(plain, -1);
  std::map<int64_t, int> seen;
  for (const auto& p : tensorboard_view(plain)) {
    if (p.tag == "step/loss") ++seen[p.step];
  }
  EXPECT_EQ(seen[6], 1);
  EXPECT_EQ(seen[7], 2);
  EXPECT_EQ(seen[10], 2);
  EXPECT_EQ(seen[11], 1);
}

TEST(TensorBoard, PurgeStepBelowMinusOneIsRejected) {
  const std::string dir = fresh_dir("badpurge");
  try {
    TensorBoardWriter tb(dir, -2);
    FAIL() << "expected an error for purge_step -2";
  } catch (const lockstep::InvalidArgument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("expected purge_step >= 0"), std::string::npos) << what;
    EXPECT_NE(what.find("but got -2"), std::string::npos) << what;
    EXPECT_NE(what.find(dir), std::string::npos) << what;
  }
  EXPECT_TRUE(files_in(dir).empty()) << "nothing is created for a rejected writer";
  EXPECT_THROW(MetricsWriter(MetricsOptions().tensorboard_dir(dir).tensorboard_purge_step(-5)),
               lockstep::InvalidArgument);
  // purge_step 0 is valid: it drops everything earlier files hold.
  TensorBoardWriter zero(dir, 0);
  EXPECT_EQ(read_records(zero.path()).size(), 2u);
}
