// IDX, CSV and text readers and the dataset adapters. See lockstep/readers.h.
#include "lockstep/readers.h"

#include <ATen/ATen.h>
#include <zlib.h>

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>

#include "lockstep/errors.h"

namespace lockstep {
namespace {

// ---- files ----

void check_readable(const std::string& path, const char* what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    throw InvalidArgument(detail::concat("Cannot open ", what, " '", path,
                                         "': missing file (", std::strerror(err),
                                         "). Check the path."));
  }
  LOCKSTEP_CHECK(S_ISREG(st.st_mode), "Expected ", what, " '", path,
                 "' to be a regular file, but it is not (a directory?).");
}

std::string read_whole_file(const std::string& path, const char* what) {
  check_readable(path, what);
  std::ifstream in(path, std::ios::binary);
  LOCKSTEP_CHECK(in.good(), "Cannot open ", what, " '", path, "' for reading (permissions?).");
  std::ostringstream os;
  os << in.rdbuf();
  LOCKSTEP_CHECK(!in.bad(), "Reading ", what, " '", path, "' failed (I/O error).");
  return os.str();
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
  int64_t size;
  const char* name;
};

bool idx_type(uint8_t code, IdxType* out) {
  switch (code) {
    case 0x08: *out = {at::kByte, 1, "uint8"}; return true;
    case 0x09: *out = {at::kChar, 1, "int8"}; return true;
    case 0x0B: *out = {at::kShort, 2, "int16"}; return true;
    case 0x0C: *out = {at::kInt, 4, "int32"}; return true;
    case 0x0D: *out = {at::kFloat, 4, "float32"}; return true;
    case 0x0E: *out = {at::kDouble, 8, "float64"}; return true;
    default: return false;
  }
}

uint32_t big_endian32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

void swap_to_host(char* data, int64_t count, int64_t width) {
  const uint16_t probe = 1;
  unsigned char first;
  std::memcpy(&first, &probe, 1);
  if (first == 0 || width == 1) return;  // big-endian host or bytes: nothing to do
  for (int64_t i = 0; i < count; ++i) std::reverse(data + i * width, data + (i + 1) * width);
}

std::string shape_string(const std::vector<int64_t>& dims) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  os << "]";
  return os.str();
}

}  // namespace

at::Tensor read_idx(const std::string& path, int64_t expected_dims) {
  check_readable(path, "IDX file");
  GzFile f;
  f.path = path;
  f.file = gzopen(path.c_str(), "rb");
  LOCKSTEP_CHECK(f.file != nullptr, "Cannot open IDX file '", path, "': ", std::strerror(errno),
                 ".");
  gzbuffer(f.file, 1 << 20);  // 1 MiB instead of 8 KiB: fewer read() calls on large files
  unsigned char magic[4];
  const int64_t got = f.read(magic, 4);
  LOCKSTEP_CHECK(got == 4, "IDX file '", path, "' is truncated at offset ", got,
                 ": expected a 4-byte magic number at offset 0, but the file has only ", got,
                 " bytes.");
  IdxType type{};
  LOCKSTEP_CHECK(magic[0] == 0 && magic[1] == 0 && idx_type(magic[2], &type),
                 "IDX file '", path, "' has a bad magic number at offset 0: expected 00 00 "
                 "<type 08|09|0B|0C|0D|0E> <dims>, but found ", std::hex, int{magic[0]}, " ",
                 int{magic[1]}, " ", int{magic[2]}, " ", int{magic[3]}, std::dec,
                 ". Is this an IDX (MNIST-format) file?");
  const int64_t dims = magic[3];
  LOCKSTEP_CHECK(dims >= 1, "IDX file '", path, "' has a wrong dimension count at offset 3: "
                 "expected at least 1, but found 0.");
  LOCKSTEP_CHECK(expected_dims <= 0 || dims == expected_dims, "IDX file '", path,
                 "' has a wrong dimension count at offset 3: expected ", expected_dims,
                 ", but found ", dims, ". Images are 3-D (count, rows, columns), labels 1-D.");
  std::vector<unsigned char> header(static_cast<size_t>(4 * dims));
  const int64_t header_got = f.read(header.data(), 4 * dims);
  LOCKSTEP_CHECK(header_got == 4 * dims, "IDX file '", path, "' is truncated at offset ",
                 4 + header_got, ": the header declares ", dims, " dimension sizes (", 4 * dims,
                 " bytes from offset 4), but the file ends first.");
  std::vector<int64_t> sizes;
  int64_t count = 1;
  for (int64_t d = 0; d < dims; ++d) {
    const int64_t size = big_endian32(&header[static_cast<size_t>(4 * d)]);
    sizes.push_back(size);
    LOCKSTEP_CHECK(size == 0 || count <= (int64_t{1} << 40) / size, "IDX file '", path,
                   "' declares an implausible shape at offset ", 4 + 4 * d, " (dimension ", d,
                   " = ", size, "): more than 2^40 elements.");
    count *= size;
  }
  const int64_t data_offset = 4 + 4 * dims;
  at::Tensor out = at::empty(sizes, at::TensorOptions().dtype(type.dtype));
  const int64_t bytes = count * type.size;
  const int64_t data_got = f.read(out.data_ptr(), bytes);
  LOCKSTEP_CHECK(data_got == bytes, "IDX file '", path, "' is truncated at offset ",
                 data_offset + data_got, ": the header declares ", shape_string(sizes), " ",
                 type.name, " = ", bytes, " bytes of data from offset ", data_offset,
                 ", but only ", data_got, " are present.");
  char extra = 0;
  LOCKSTEP_CHECK(f.read(&extra, 1) == 0, "IDX file '", path, "' has trailing bytes at offset ",
                 data_offset + bytes, ": the header declares ", shape_string(sizes), " ",
                 type.name, ", which ends there. The header or the file is wrong.");
  swap_to_host(static_cast<char*>(out.data_ptr()), count, type.size);
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
  if (options.normalize() && images.scalar_type() == at::kByte) {
    images = images.to(at::kFloat).div_(255.0);
  }
  if (options.channel_dim()) images = images.unsqueeze(1);
  return TensorPairDataset(std::move(images), labels.to(at::kLong));
}

TensorPairDataset load_mnist_directory(const std::string& directory, bool train,
                                       IdxDatasetOptions options) {
  const std::string prefix = directory + "/" + (train ? "train" : "t10k");
  auto pick = [](const std::string& base) {
    struct stat st {};
    return ::stat((base + ".gz").c_str(), &st) == 0 ? base + ".gz" : base;
  };
  return load_idx_dataset(pick(prefix + "-images-idx3-ubyte"),
                          pick(prefix + "-labels-idx1-ubyte"), options);
}

// ---- CSV ----

namespace {

std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && (s[b] == ' ' || s[b] == '\t')) ++b;
  while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t')) --e;
  return s.substr(b, e - b);
}

struct Field {
  std::string text;
  int64_t column;  // 1-based character column where the field starts
};

std::vector<Field> split_fields(const std::string& line, char delimiter) {
  std::vector<Field> fields;
  size_t start = 0;
  while (true) {
    const size_t end = line.find(delimiter, start);
    fields.push_back({line.substr(start, end == std::string::npos ? std::string::npos : end - start),
                      static_cast<int64_t>(start) + 1});
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return fields;
}

}  // namespace

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
  CsvTable table;
  std::vector<double> values;
  int64_t width = -1, header_line = 0, rows = 0, line_no = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (trim(line).empty()) continue;
    std::vector<Field> fields = split_fields(line, options.delimiter());
    if (width < 0) {
      width = static_cast<int64_t>(fields.size());
      header_line = line_no;
      if (options.header()) {
        for (const auto& f : fields) {
          std::string name = trim(f.text);
          if (name.size() >= 2 && name.front() == '"' && name.back() == '"') {
            name = name.substr(1, name.size() - 2);
          }
          table.columns.push_back(name);
        }
        continue;
      }
      for (int64_t c = 0; c < width; ++c) table.columns.push_back(std::to_string(c));
    }
    if (static_cast<int64_t>(fields.size()) != width) {
      const int64_t column = static_cast<int64_t>(fields.size()) > width
                                 ? fields[static_cast<size_t>(width)].column
                                 : static_cast<int64_t>(line.size()) + 1;
      throw InvalidArgument(detail::concat(
          path, ":", line_no, ":", column, ": ragged row: expected ", width, " fields (as on line ",
          header_line, options.header() ? ", the header" : "", "), but found ", fields.size(),
          "."));
    }
    for (size_t c = 0; c < fields.size(); ++c) {
      const std::string field = trim(fields[c].text);
      LOCKSTEP_CHECK(!field.empty(), path, ":", line_no, ":", fields[c].column,
                     ": empty field in column ", c + 1, " ('", table.columns[c],
                     "'): expected a number.");
      char* parse_end = nullptr;
      errno = 0;
      const double value = std::strtod(field.c_str(), &parse_end);
      LOCKSTEP_CHECK(parse_end == field.c_str() + field.size(), path, ":", line_no, ":",
                     fields[c].column, ": non-numeric field '", field, "' in column ", c + 1, " ('",
                     table.columns[c], "'): expected a number.");
      values.push_back(value);
    }
    ++rows;
  }
  LOCKSTEP_CHECK(width >= 0 || !options.header(), "CSV file '", path,
                 "' is empty: expected a header line at line 1.");
  if (width < 0) width = 0;
  table.values = at::tensor(values, at::kDouble).reshape({rows, width}).to(options.dtype());
  return table;
}

// ---- Text ----

namespace {

// Decodes one UTF-8 character at text[i]; returns its byte length, or 0 with `why` set.
size_t utf8_char(const std::string& text, size_t i, uint32_t* code, const char** why) {
  const auto b0 = static_cast<unsigned char>(text[i]);
  size_t len;
  uint32_t cp;
  uint32_t min;
  if (b0 < 0x80) {
    *code = b0;
    return 1;
  } else if ((b0 & 0xE0) == 0xC0) {
    len = 2, cp = b0 & 0x1F, min = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3, cp = b0 & 0x0F, min = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4, cp = b0 & 0x07, min = 0x10000;
  } else {
    *why = "byte is not a valid UTF-8 lead byte";
    return 0;
  }
  if (i + len > text.size()) {
    *why = "truncated multi-byte sequence at end of file";
    return 0;
  }
  for (size_t k = 1; k < len; ++k) {
    const auto b = static_cast<unsigned char>(text[i + k]);
    if ((b & 0xC0) != 0x80) {
      *why = "expected a continuation byte";
      return 0;
    }
    cp = (cp << 6) | (b & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    *why = "overlong encoding, surrogate or code point beyond U+10FFFF";
    return 0;
  }
  *code = cp;
  return len;
}

// Splits UTF-8 text into characters; `where` names the source for errors.
std::vector<std::pair<uint32_t, std::string>> utf8_chars(const std::string& text,
                                                         const std::string& where) {
  std::vector<std::pair<uint32_t, std::string>> out;
  int64_t line = 1, column = 1;
  for (size_t i = 0; i < text.size();) {
    uint32_t cp = 0;
    const char* why = "";
    const size_t len = utf8_char(text, i, &cp, &why);
    LOCKSTEP_CHECK(len > 0, where, ":", line, ":", column, ": invalid UTF-8 at byte offset ", i,
                   " (byte 0x", std::hex, int{static_cast<unsigned char>(text[i])}, std::dec,
                   "): ", why, ". Use TokenKind::kBytes for binary or non-UTF-8 text.");
    out.emplace_back(cp, text.substr(i, len));
    if (cp == '\n') {
      ++line;
      column = 1;
    } else {
      ++column;
    }
    i += len;
  }
  return out;
}

}  // namespace

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
    for (const auto& ch : utf8_chars(text, "<encode input>")) {
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
    const auto chars = utf8_chars(text, path);
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
