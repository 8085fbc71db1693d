#pragma once
/// \file
/// Readers for the recipes' data: IDX (MNIST, Fashion-MNIST; gzip or plain), CSV of numeric
/// columns, and plain text as byte or character tokens; plus `torch::data` dataset adapters
/// that `torch::data::make_data_loader` (and `ShardedSampler`) accept.
///
/// Every reader throws `lockstep::InvalidArgument` on bad input, naming the file, the offset
/// (IDX: byte offset in the uncompressed stream) or line:column (CSV, text), and what was
/// wrong: missing file, permission denied, bad magic number, truncated file, wrong dimension
/// count, a header declaring more data than the file can hold (rejected before allocating),
/// images and labels disagreeing in count, a label outside the declared classes,
/// non-numeric field, NaN or infinity where finite numbers are required, ragged row, invalid
/// UTF-8.
///
///     auto train = lockstep::load_idx_dataset(
///         "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz",
///         "/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz");
///     // train.data(): float [60000, 1, 28, 28] in [0, 1]; train.target(): int64 [60000]

#include <ATen/core/Tensor.h>
#include <torch/data/datasets/base.h>
#include <torch/data/example.h>

#include <cstdint>
#include <string>
#include <vector>

#include "lockstep/options.h"

namespace lockstep {

// ---- IDX ----

/// Reads an IDX file (`.gz` or uncompressed; detected from the content, not the name).
/// Returns a tensor whose shape is the file's dimensions and whose dtype follows its type
/// code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64.
/// Sizes come from the header; `expected_dims` > 0 also checks the dimension count.
at::Tensor read_idx(const std::string& path, int64_t expected_dims = 0);

/// How `load_idx_dataset` turns images and labels into tensors.
struct IdxDatasetOptions {
  /// Convert uint8 images to float32 scaled to [0, 1] (default true); false keeps uint8.
  LOCKSTEP_ARG(bool, normalize) = true;
  /// Insert a channel dimension: [N, H, W] becomes [N, 1, H, W] (default true).
  LOCKSTEP_ARG(bool, channel_dim) = true;
  /// Labels must lie in [0, num_classes); the first that does not fails the load, naming the
  /// file, record and byte offset. 0 (default) skips the check; `load_mnist_directory` then
  /// checks 10.
  LOCKSTEP_ARG(int64_t, num_classes) = 0;
};

/// A dataset of (data[i], target[i]) pairs held in two tensors with equal first dimensions.
/// `get_batch` gathers a batch with one `index_select` per tensor instead of per-sample
/// copies. Copies share the tensors.
class TensorPairDataset : public torch::data::datasets::Dataset<TensorPairDataset> {
 public:
  /// InvalidArgument unless both are defined, at least 1-D, and agree in size(0).
  TensorPairDataset(at::Tensor data, at::Tensor target);
  torch::data::Example<> get(size_t index) override;
  std::vector<torch::data::Example<>> get_batch(c10::ArrayRef<size_t> indices) override;
  torch::optional<size_t> size() const override;
  const at::Tensor& data() const { return data_; }
  const at::Tensor& target() const { return target_; }

 private:
  at::Tensor data_;
  at::Tensor target_;
};

/// Reads an IDX image file (3 dims) and an IDX label file (1 dim) and pairs them; labels are
/// int64. InvalidArgument if the counts differ (naming both files and both counts) or a label
/// lies outside `options.num_classes()` (naming the file, record and offset).
TensorPairDataset load_idx_dataset(const std::string& images_path,
                                   const std::string& labels_path,
                                   IdxDatasetOptions options = IdxDatasetOptions());

/// `load_idx_dataset` on the standard MNIST file names in `directory`:
/// `{train,t10k}-{images-idx3,labels-idx1}-ubyte`, with or without `.gz`.
TensorPairDataset load_mnist_directory(const std::string& directory, bool train,
                                       IdxDatasetOptions options = IdxDatasetOptions());

// ---- CSV ----

/// How `read_csv` parses.
struct CsvOptions {
  /// Field separator (default ',').
  LOCKSTEP_ARG(char, delimiter) = ',';
  /// The first line names the columns (default true); false names them "0", "1", ...
  LOCKSTEP_ARG(bool, header) = true;
  /// dtype of the values tensor: float32 (default) or float64.
  LOCKSTEP_ARG(at::ScalarType, dtype) = at::kFloat;
  /// Reject NaN and infinite values, naming file:line:column (default false: they are read
  /// as such).
  LOCKSTEP_ARG(bool, finite) = false;
};

/// A CSV file of numeric columns.
struct CsvTable {
  /// Column names from the header (surrounding spaces and double quotes removed).
  std::vector<std::string> columns;
  /// [rows, columns] values.
  at::Tensor values;
  /// Index of the column called `name`; InvalidArgument listing the columns otherwise.
  int64_t column_index(const std::string& name) const;
  /// values[:, column_index(name)].
  at::Tensor column(const std::string& name) const;
};

/// Reads a CSV file whose fields are all numbers (decimal, exponent, inf, nan; surrounding
/// spaces allowed). Blank lines are skipped; CRLF is accepted. Errors name file:line:column:
/// a non-numeric or empty field, a row with a different number of fields than the header.
CsvTable read_csv(const std::string& path, CsvOptions options = CsvOptions());

// ---- Text ----

/// Byte tokens (vocabulary: all 256 byte values) or character tokens (vocabulary: the
/// distinct UTF-8 characters of the text, sorted by code point).
enum class TokenKind { kBytes, kChars };

/// A tokenised text.
struct TextCorpus {
  TokenKind kind = TokenKind::kBytes;
  /// int64 [length] token ids.
  at::Tensor tokens;
  /// vocab[id] is the UTF-8 text of token id (kBytes: the single byte).
  std::vector<std::string> vocab;
  int64_t vocab_size() const { return static_cast<int64_t>(vocab.size()); }
  /// Token ids back to text.
  std::string decode(const at::Tensor& ids) const;
  /// Text to token ids; InvalidArgument on a character outside the vocabulary.
  at::Tensor encode(const std::string& text) const;
};

/// Reads a whole text file into tokens. kChars rejects invalid UTF-8 with line:column and
/// byte offset. An empty file gives an empty tensor.
TextCorpus read_text(const std::string& path, TokenKind kind = TokenKind::kBytes);

/// Next-token windows over a token stream, for language models: example i is
/// (tokens[s, s + context), tokens[s + 1, s + context + 1)) with s = i * stride.
class TokenWindowDataset : public torch::data::datasets::Dataset<TokenWindowDataset> {
 public:
  /// `stride` 0 (default) means `context` (non-overlapping windows). InvalidArgument if
  /// context < 1 or stride < 0. Fewer than context + 1 tokens give an empty dataset.
  TokenWindowDataset(at::Tensor tokens, int64_t context, int64_t stride = 0);
  torch::data::Example<> get(size_t index) override;
  torch::optional<size_t> size() const override;

 private:
  at::Tensor tokens_;
  int64_t context_;
  int64_t stride_;
  int64_t size_;
};

}  // namespace lockstep
