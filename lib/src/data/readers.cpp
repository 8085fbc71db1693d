// IDX, CSV and text readers and the dataset adapters. See lockstep/readers.h.
#include "lockstep/readers.h"

#include <ATen/ATen.h>
#include <zlib.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>

#include "data/reader_parsing.h"
#include "lockstep/errors.h"

namespace lockstep {
namespace {

using detail::shape_string;

// ---- files ----

std::string read_whole_file(const std::string& path, const char* what) {
  int64_t size = 0;
  const int fd = detail::open_regular_file(path, what, &size);
  std::string out;
  char buf[1 << 16];
  while (true) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      throw InvalidArgument(detail::concat("Reading ", what, " '", path, "' failed at offset ",
                                           out.size(), ": ", std::strerror(err), "."));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

// ---- IDX ----

// Note [IDX format]
// Big-endian throughout. Bytes 0-1 are zero, byte 2 the element type, byte 3 the number of
// dimensions d; then d uint32 sizes; then prod(sizes) elements. We read through gzread, which
// passes uncompressed files through unchanged, so offsets in messages are offsets in the
// uncompressed stream. Sizes come only from the header; the file must end exactly after the
// data (trailing bytes mean the header is wrong).

struct GzFile {
  gzFile file = nullptr;
  std::string path;
  int64_t offset = 0;  // uncompressed bytes consumed
  ~GzFile() {
    if (file) gzclose(file);
  }
  // Reads up to `n` bytes; returns how many were read. Throws on a corrupt gzip stream.
  int64_t read(void* dst, int64_t n) {
    int64_t done = 0;
    auto* out = static_cast<char*>(dst);
    while (done < n) {
      const auto chunk = static_cast<unsigned>(std::min<int64_t>(n - done, 1 << 30));
      const int got = gzread(file, out + done, chunk);
      if (got < 0) {
        int errnum = 0;
        const char* msg = gzerror(file, &errnum);
        throw InvalidArgument(detail::concat("Cannot read IDX file '", path, "' at offset ",
                                             offset + done, ": corrupt gzip stream (", msg,
                                             "). Re-download the file."));
      }
      if (got == 0) break;
      done += got;
    }
    offset += done;
    return done;
  }
};

struct IdxType {
  at::ScalarType dtype;
};

void idx_type(uint8_t code, IdxType* out) {
  switch (code) {
    case 0x08: out->dtype = at::kByte; break;
    case 0x09: out->dtype = at::kChar; break;
    case 0x0B: out->dtype = at::kShort; break;
    case 0x0C: out->dtype = at::kInt; break;
    case 0x0D: out->dtype = at::kFloat; break;
    default: out->dtype = at::kDouble; break;  // 0x0E; parse_idx_header rejects the rest
  }
}

void swap_to_host(char* data, int64_t count, int64_t width) {
  const uint16_t probe = 1;
  unsigned char first;
  std::memcpy(&first, &probe, 1);
  if (first == 0 || width == 1) return;  // big-endian host or bytes: nothing to do
  for (int64_t i = 0; i < count; ++i) std::reverse(data + i * width, data + (i + 1) * width);
}

}  // namespace

at::Tensor read_idx(const std::string& path, int64_t expected_dims) {
  int64_t file_size = 0;
  const int fd = detail::open_regular_file(path, "IDX file", &file_size);
  unsigned char gz_magic[2] = {0, 0};
  const bool gz = ::pread(fd, gz_magic, 2, 0) == 2 && gz_magic[0] == 0x1f && gz_magic[1] == 0x8b;
  GzFile f;
  f.path = path;
  f.file = gzdopen(fd, "rb");  // owns fd from here
  if (f.file == nullptr) {
    ::close(fd);
    throw InvalidArgument(detail::concat("Cannot open IDX file '", path, "': zlib could not "
                                         "allocate its stream."));
  }
  gzbuffer(f.file, 1 << 20);  // 1 MiB instead of 8 KiB: fewer read() calls on large files
  // Note [Bounded reads]: what the stream can hold bounds what the header may declare.
  const int64_t stream_bound =
      gz ? (file_size > INT64_MAX / detail::kGzipMaxRatio ? INT64_MAX
                                                          : file_size * detail::kGzipMaxRatio)
         : file_size;
  unsigned char head[4 + 4 * 255];
  int64_t got = f.read(head, 4);
  if (got == 4) got += f.read(head + 4, 4 * int64_t{head[3]});
  const detail::IdxHeader h =
      detail::parse_idx_header(head, static_cast<size_t>(got), path, expected_dims, stream_bound);
  IdxType type{};
  idx_type(h.type_code, &type);
  at::Tensor out = at::empty(h.sizes, at::TensorOptions().dtype(type.dtype));
  const int64_t bytes = h.data_bytes();
  const int64_t data_got = f.read(out.data_ptr(), bytes);
  LOCKSTEP_CHECK(data_got == bytes, "IDX file '", path, "' is truncated at offset ",
                 h.data_offset + data_got, ": the header declares ", shape_string(h.sizes), " ",
                 h.type_name, " = ", bytes, " bytes of data from offset ", h.data_offset,
                 ", but only ", data_got, " are present.");
  char extra = 0;
  LOCKSTEP_CHECK(f.read(&extra, 1) == 0, "IDX file '", path, "' has trailing bytes at offset ",
                 h.data_offset + bytes, ": the header declares ", shape_string(h.sizes), " ",
                 h.type_name, ", which ends there. The header or the file is wrong.");
  swap_to_host(static_cast<char*>(out.data_ptr()), h.count, h.element_size);
  return out;
}

TensorPairDataset::TensorPairDataset(at::Tensor data, at::Tensor target)
    : data_(std::move(data)), target_(std::move(target)) {
  LOCKSTEP_CHECK(data_.defined() && target_.defined() && data_.dim() >= 1 && target_.dim() >= 1,
                 "Expected TensorPairDataset(data, target) with defined tensors of at least one "
                 "dimension.");
  LOCKSTEP_CHECK(data_.size(0) == target_.size(0), "Expected data and target with the same "
                 "number of examples, but data has ", data_.size(0), " and target ",
                 target_.size(0), ".");
}

torch::data::Example<> TensorPairDataset::get(size_t index) {
  LOCKSTEP_CHECK(static_cast<int64_t>(index) < data_.size(0), "Expected an index < ",
                 data_.size(0), " in TensorPairDataset::get, but got ", index, ".");
  const auto i = static_cast<int64_t>(index);
  return {data_[i], target_[i]};
}

std::vector<torch::data::Example<>> TensorPairDataset::get_batch(c10::ArrayRef<size_t> indices) {
  std::vector<int64_t> idx(indices.begin(), indices.end());
  for (int64_t i : idx) {
    LOCKSTEP_CHECK(i >= 0 && i < data_.size(0), "Expected indices < ", data_.size(0),
                   " in TensorPairDataset::get_batch, but got ", i, ".");
  }
  const at::Tensor index = at::tensor(idx, at::kLong);
  const std::vector<at::Tensor> data = data_.index_select(0, index).unbind(0);
  const std::vector<at::Tensor> target = target_.index_select(0, index).unbind(0);
  std::vector<torch::data::Example<>> batch;
  batch.reserve(idx.size());
  for (size_t i = 0; i < idx.size(); ++i) batch.push_back({data[i], target[i]});
  return batch;
}

torch::optional<size_t> TensorPairDataset::size() const {
  return static_cast<size_t>(data_.size(0));
}

TensorPairDataset load_idx_dataset(const std::string& images_path, const std::string& labels_path,
                                   IdxDatasetOptions options) {
  at::Tensor images = read_idx(images_path, 3);
  at::Tensor labels = read_idx(labels_path, 1);
  LOCKSTEP_CHECK(images.size(0) == labels.size(0), "IDX images and labels disagree in count: '",
                 images_path, "' holds ", images.size(0), " images but '", labels_path,
                 "' holds ", labels.size(0), " labels. Pair the files of the same split.");
  at::Tensor targets = labels.to(at::kLong).contiguous();
  detail::IdxHeader label_header;
  label_header.data_offset = 4 + 4 * labels.dim();
  label_header.element_size = static_cast<int64_t>(labels.element_size());
  detail::check_labels(targets.data_ptr<int64_t>(), targets.numel(), label_header,
                       options.num_classes(), labels_path);
  if (options.normalize() && images.scalar_type() == at::kByte) {
    images = images.to(at::kFloat).div_(255.0);
  }
  if (options.channel_dim()) images = images.unsqueeze(1);
  return TensorPairDataset(std::move(images), std::move(targets));
}

TensorPairDataset load_mnist_directory(const std::string& directory, bool train,
                                       IdxDatasetOptions options) {
  const std::string prefix = directory + "/" + (train ? "train" : "t10k");
  auto pick = [](const std::string& base) {
    struct stat st {};
    return ::stat((base + ".gz").c_str(), &st) == 0 ? base + ".gz" : base;
  };
  return load_idx_dataset(pick(prefix + "-images-idx3-ubyte"),
                          pick(prefix + "-labels-idx1-ubyte"),
                          options.num_classes() > 0 ? options : options.num_classes(10));
}

// ---- CSV ----

int64_t CsvTable::column_index(const std::string& name) const {
  for (size_t i = 0; i < columns.size(); ++i) {
    if (columns[i] == name) return static_cast<int64_t>(i);
  }
  std::string all;
  for (const auto& c : columns) all += (all.empty() ? "" : ", ") + c;
  throw InvalidArgument(detail::concat("No CSV column named '", name, "'; the columns are: ", all,
                                       "."));
}

at::Tensor CsvTable::column(const std::string& name) const {
  return values.select(1, column_index(name));
}

CsvTable read_csv(const std::string& path, CsvOptions options) {
  LOCKSTEP_CHECK(options.dtype() == at::kFloat || options.dtype() == at::kDouble,
                 "Expected CsvOptions::dtype float32 or float64, but got ", options.dtype(), ".");
  const std::string text = read_whole_file(path, "CSV file");
  detail::CsvParsed parsed = detail::parse_csv_text(text, path, options.delimiter(),
                                                    options.header(), options.finite());
  CsvTable table;
  table.columns = std::move(parsed.columns);
  table.values = at::tensor(parsed.values, at::kDouble)
                     .reshape({parsed.rows, parsed.width})
                     .to(options.dtype());
  return table;
}

// ---- Text ----

std::string TextCorpus::decode(const at::Tensor& ids) const {
  const at::Tensor flat = ids.to(at::kLong).contiguous().view(-1);
  const int64_t* p = flat.data_ptr<int64_t>();
  std::string out;
  for (int64_t i = 0; i < flat.numel(); ++i) {
    LOCKSTEP_CHECK(p[i] >= 0 && p[i] < vocab_size(), "Expected token ids in [0, ", vocab_size(),
                   "), but got ", p[i], " at position ", i, ".");
    out += vocab[static_cast<size_t>(p[i])];
  }
  return out;
}

at::Tensor TextCorpus::encode(const std::string& text) const {
  std::vector<int64_t> ids;
  if (kind == TokenKind::kBytes) {
    for (char c : text) ids.push_back(static_cast<unsigned char>(c));
  } else {
    std::map<std::string, int64_t> index;
    for (size_t i = 0; i < vocab.size(); ++i) index[vocab[i]] = static_cast<int64_t>(i);
    for (const auto& ch : detail::utf8_chars(text, "<encode input>")) {
      const auto it = index.find(ch.second);
      LOCKSTEP_CHECK(it != index.end(), "Character '", ch.second, "' (U+", std::hex, ch.first,
                     std::dec, ") is not in the vocabulary of ", vocab.size(), " characters.");
      ids.push_back(it->second);
    }
  }
  return at::tensor(ids, at::kLong);
}

TextCorpus read_text(const std::string& path, TokenKind kind) {
  const std::string text = read_whole_file(path, "text file");
  TextCorpus corpus;
  corpus.kind = kind;
  std::vector<int64_t> ids;
  ids.reserve(text.size());
  if (kind == TokenKind::kBytes) {
    for (int b = 0; b < 256; ++b) corpus.vocab.emplace_back(1, static_cast<char>(b));
    for (char c : text) ids.push_back(static_cast<unsigned char>(c));
  } else {
    const auto chars = detail::utf8_chars(text, path);
    std::map<uint32_t, std::string> distinct;
    for (const auto& ch : chars) distinct.emplace(ch.first, ch.second);
    std::map<uint32_t, int64_t> id_of;
    for (const auto& entry : distinct) {
      id_of[entry.first] = static_cast<int64_t>(corpus.vocab.size());
      corpus.vocab.push_back(entry.second);
    }
    for (const auto& ch : chars) ids.push_back(id_of[ch.first]);
  }
  corpus.tokens = at::tensor(ids, at::kLong);
  return corpus;
}

TokenWindowDataset::TokenWindowDataset(at::Tensor tokens, int64_t context, int64_t stride)
    : tokens_(std::move(tokens)), context_(context), stride_(stride == 0 ? context : stride) {
  LOCKSTEP_CHECK(tokens_.defined() && tokens_.dim() == 1, "Expected a 1-D token tensor for "
                 "TokenWindowDataset.");
  LOCKSTEP_CHECK(context >= 1, "Expected context >= 1 for TokenWindowDataset, but got ", context,
                 ".");
  LOCKSTEP_CHECK(stride >= 0, "Expected stride >= 0 for TokenWindowDataset, but got ", stride,
                 ".");
  const int64_t n = tokens_.size(0);
  size_ = n >= context_ + 1 ? (n - context_ - 1) / stride_ + 1 : 0;
}

torch::data::Example<> TokenWindowDataset::get(size_t index) {
  LOCKSTEP_CHECK(static_cast<int64_t>(index) < size_, "Expected an index < ", size_,
                 " in TokenWindowDataset::get, but got ", index, ".");
  const int64_t s = static_cast<int64_t>(index) * stride_;
  return {tokens_.slice(0, s, s + context_), tokens_.slice(0, s + 1, s + context_ + 1)};
}

torch::optional<size_t> TokenWindowDataset::size() const { return static_cast<size_t>(size_); }

}  // namespace lockstep
