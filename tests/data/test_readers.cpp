// IDX, CSV and text readers: real Fashion-MNIST, round trips, and every error on small files
// written to a temp dir.
#include <gtest/gtest.h>
#include <torch/data.h>
#include <zlib.h>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <fstream>
#include <set>
#include <string>

#include "data/reader_parsing.h"
#include "lockstep/errors.h"
#include "lockstep/readers.h"
#include "lockstep/sampler.h"

namespace {

class Readers : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* base = std::getenv("TMPDIR");
    std::string templ = std::string(base ? base : "/tmp") + "/lockstep_readers_XXXXXX";
    std::vector<char> buf(templ.begin(), templ.end());
    buf.push_back('\0');
    ASSERT_NE(mkdtemp(buf.data()), nullptr);
    dir_ = buf.data();
  }
  void TearDown() override { std::system(("rm -rf '" + dir_ + "'").c_str()); }

  std::string write(const std::string& name, const std::string& bytes, bool gz = false) {
    const std::string path = dir_ + "/" + name;
    if (gz) {
      gzFile f = gzopen(path.c_str(), "wb");
      gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
      gzclose(f);
    } else {
      std::ofstream(path, std::ios::binary) << bytes;
    }
    return path;
  }

  static std::string idx_header(uint8_t type, std::vector<uint32_t> dims) {
    std::string h = {0, 0, static_cast<char>(type), static_cast<char>(dims.size())};
    for (uint32_t d : dims) {
      for (int shift = 24; shift >= 0; shift -= 8) h.push_back(static_cast<char>((d >> shift) & 0xFF));
    }
    return h;
  }

  // Expects `fn` to throw InvalidArgument whose message contains every one of `parts`.
  template <typename Fn>
  static void expect_error(Fn fn, std::vector<std::string> parts) {
    try {
      fn();
      ADD_FAILURE() << "expected InvalidArgument containing '" << parts[0] << "'";
    } catch (const lockstep::InvalidArgument& e) {
      const std::string what = e.what();
      for (const auto& p : parts) {
        EXPECT_NE(what.find(p), std::string::npos) << "message lacks '" << p << "': " << what;
      }
    }
  }

  std::string dir_;
};

const char* kFashion = "/usr/share/datasets/fashion-mnist";

TEST_F(Readers, FashionMnistFromGzip) {
  std::ifstream probe(std::string(kFashion) + "/train-images-idx3-ubyte.gz");
  if (!probe.good()) GTEST_SKIP() << kFashion << " not installed (dataset-fashion-mnist)";
  const at::Tensor raw = lockstep::read_idx(std::string(kFashion) + "/t10k-images-idx3-ubyte.gz");
  EXPECT_EQ(raw.sizes(), (std::vector<int64_t>{10000, 28, 28}));
  EXPECT_EQ(raw.scalar_type(), at::kByte);
  EXPECT_GT(raw.to(at::kFloat).mean().item<float>(), 10.f);  // not all zeros
  auto train = lockstep::load_mnist_directory(kFashion, /*train=*/true);
  EXPECT_EQ(train.data().sizes(), (std::vector<int64_t>{60000, 1, 28, 28}));
  EXPECT_EQ(train.target().scalar_type(), at::kLong);
  EXPECT_LE(train.data().max().item<float>(), 1.f);
  EXPECT_GE(train.data().min().item<float>(), 0.f);
  // Fashion-MNIST's training labels are 6000 of each of 10 classes.
  const at::Tensor counts = at::bincount(train.target());
  ASSERT_EQ(counts.numel(), 10);
  for (int64_t c = 0; c < 10; ++c) EXPECT_EQ(counts[c].item<int64_t>(), 6000);
  // Usable by make_data_loader with the sharded sampler and workers.
  lockstep::ShardedSampler sampler(*train.size(),
                                   lockstep::ShardedSamplerOptions().num_replicas(4).rank(1));
  auto loader = torch::data::make_data_loader(
      train.map(torch::data::transforms::Stack<>()), sampler,
      torch::data::DataLoaderOptions().batch_size(256).workers(2));
  int64_t seen = 0;
  for (auto& batch : *loader) {
    EXPECT_EQ(batch.data.size(1), 1);
    seen += batch.target.size(0);
  }
  EXPECT_EQ(seen, 15000);
}

TEST_F(Readers, IdxRoundTripsEveryTypeGzipAndPlain) {
  // int16 big-endian values 1, -2, 300, -32768 in shape [2, 2].
  std::string body = idx_header(0x0B, {2, 2});
  for (int v : {1, -2, 300, -32768}) {
    body.push_back(static_cast<char>((v >> 8) & 0xFF));
    body.push_back(static_cast<char>(v & 0xFF));
  }
  for (bool gz : {false, true}) {
    const at::Tensor t = lockstep::read_idx(write(gz ? "s.gz" : "s.idx", body, gz));
    EXPECT_EQ(t.scalar_type(), at::kShort);
    EXPECT_EQ(t.sizes(), (std::vector<int64_t>{2, 2}));
    EXPECT_EQ(t.flatten()[2].item<int64_t>(), 300);
    EXPECT_EQ(t.flatten()[3].item<int64_t>(), -32768);
  }
  // float32 1.5 and double -0.25.
  std::string f = idx_header(0x0D, {1});
  f += std::string("\x3F\xC0\x00\x00", 4);
  EXPECT_FLOAT_EQ(lockstep::read_idx(write("f.idx", f)).item<float>(), 1.5f);
  std::string d = idx_header(0x0E, {1});
  d += std::string("\xBF\xD0\x00\x00\x00\x00\x00\x00", 8);
  EXPECT_DOUBLE_EQ(lockstep::read_idx(write("d.idx", d)).item<double>(), -0.25);
  // A zero-length dimension is a valid, empty tensor.
  EXPECT_EQ(lockstep::read_idx(write("z.idx", idx_header(0x08, {0, 28, 28}))).numel(), 0);
}

TEST_F(Readers, IdxErrorsNameFileOffsetAndProblem) {
  const std::string missing = dir_ + "/nope-idx3-ubyte.gz";
  expect_error([&] { lockstep::read_idx(missing); }, {missing, "missing file"});
  const std::string bad_magic = write("magic.gz", std::string("\x12\x34\x08\x03", 4) + std::string(12, 0), true);
  expect_error([&] { lockstep::read_idx(bad_magic); }, {bad_magic, "bad magic number", "offset 0"});
  const std::string bad_type = write("type.idx", idx_header(0x07, {1}) + "x");
  expect_error([&] { lockstep::read_idx(bad_type); }, {bad_type, "bad magic number"});
  const std::string labels = write("labels.idx", idx_header(0x08, {3}) + "abc");
  expect_error([&] { lockstep::read_idx(labels, 3); },
               {labels, "wrong dimension count", "offset 3", "expected 3", "found 1"});
  const std::string short_magic = write("short.idx", std::string("\x00\x00", 2));
  expect_error([&] { lockstep::read_idx(short_magic); }, {short_magic, "truncated", "offset 2"});
  const std::string short_header = write("sh.idx", idx_header(0x08, {5, 5}).substr(0, 9));
  expect_error([&] { lockstep::read_idx(short_header); }, {short_header, "truncated", "offset 9"});
  const std::string short_data = write("sd.gz", idx_header(0x08, {4, 2, 2}) + std::string(10, 1), true);
  expect_error([&] { lockstep::read_idx(short_data); },
               {short_data, "truncated", "offset 26", "16 bytes of data from offset 16"});
  const std::string trailing = write("tr.idx", idx_header(0x08, {2}) + "abc");
  expect_error([&] { lockstep::read_idx(trailing); }, {trailing, "trailing bytes", "offset 10"});
  // A gzip stream cut in the middle.
  const std::string whole = write("whole.gz", idx_header(0x08, {3000}) + std::string(3000, 7), true);
  std::ifstream in(whole, std::ios::binary);
  std::string gz((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string cut = write("cut.gz", gz.substr(0, gz.size() / 2));
  expect_error([&] { lockstep::read_idx(cut); }, {cut, "offset"});
  // Images and labels of different counts.
  const std::string images = write("i.idx", idx_header(0x08, {3, 2, 2}) + std::string(12, 9));
  const std::string four = write("l.idx", idx_header(0x08, {4}) + std::string(4, 1));
  expect_error([&] { lockstep::load_idx_dataset(images, four); },
               {images, four, "disagree in count", "3 images", "4 labels"});
  auto ok = lockstep::load_idx_dataset(images, write("l3.idx", idx_header(0x08, {3}) + "\x01\x02\x03"));
  EXPECT_EQ(ok.data().sizes(), (std::vector<int64_t>{3, 1, 2, 2}));
  EXPECT_NEAR(ok.data()[0][0][0][0].item<float>(), 9.f / 255.f, 1e-7);
  EXPECT_EQ(ok.target()[2].item<int64_t>(), 3);
}

TEST_F(Readers, CsvParsesNumbersWithHeader) {
  const std::string path = write("t.csv", "a, \"b\" ,c\r\n1,2.5,-3e2\r\n\r\n 4 , inf,0x10\n7,8,9");
  const auto t = lockstep::read_csv(path);
  EXPECT_EQ(t.columns, (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(t.values.sizes(), (std::vector<int64_t>{3, 3}));
  EXPECT_EQ(t.values.scalar_type(), at::kFloat);
  EXPECT_FLOAT_EQ(t.values[0][2].item<float>(), -300.f);
  EXPECT_TRUE(std::isinf(t.values[1][1].item<float>()));
  EXPECT_FLOAT_EQ(t.column("c")[2].item<float>(), 9.f);
  expect_error([&] { t.column_index("z"); }, {"'z'", "a, b, c"});
  const auto semi = lockstep::read_csv(write("s.csv", "1;2\n3;4\n"),
                                       lockstep::CsvOptions().delimiter(';').header(false).dtype(at::kDouble));
  EXPECT_EQ(semi.columns, (std::vector<std::string>{"0", "1"}));
  EXPECT_EQ(semi.values.scalar_type(), at::kDouble);
  EXPECT_DOUBLE_EQ(semi.values[1][0].item<double>(), 3.0);
  EXPECT_EQ(lockstep::read_csv(write("h.csv", "x,y\n")).values.sizes(), (std::vector<int64_t>{0, 2}));
}

TEST_F(Readers, CsvErrorsNameLineColumnAndProblem) {
  const std::string missing = dir_ + "/missing.csv";
  expect_error([&] { lockstep::read_csv(missing); }, {missing, "missing file"});
  const std::string nonnum = write("n.csv", "a,b,c\n1,2,3\n4,x5,6\n");
  expect_error([&] { lockstep::read_csv(nonnum); },
               {nonnum + ":3:3", "non-numeric field 'x5'", "column 2", "'b'"});
  const std::string partial = write("p.csv", "a,b\n1,2.5.1\n");
  expect_error([&] { lockstep::read_csv(partial); }, {partial + ":2:3", "non-numeric field '2.5.1'"});
  const std::string ragged_long = write("r1.csv", "a,b\n1,2\n3,4,5\n");
  expect_error([&] { lockstep::read_csv(ragged_long); },
               {ragged_long + ":3:5", "ragged row", "expected 2 fields", "found 3"});
  const std::string ragged_short = write("r2.csv", "a,b,c\n1,2\n");
  expect_error([&] { lockstep::read_csv(ragged_short); },
               {ragged_short + ":2:4", "ragged row", "expected 3 fields", "found 2"});
  const std::string empty_field = write("e.csv", "a,b\n1,\n");
  expect_error([&] { lockstep::read_csv(empty_field); }, {empty_field + ":2:3", "empty field"});
  const std::string empty = write("empty.csv", "");
  expect_error([&] { lockstep::read_csv(empty); }, {empty, "empty", "header"});
}

TEST_F(Readers, TextTokensBytesAndChars) {
  const std::string text = "héllo 日本\nab";
  const std::string path = write("t.txt", text);
  const auto bytes = lockstep::read_text(path, lockstep::TokenKind::kBytes);
  EXPECT_EQ(bytes.vocab_size(), 256);
  EXPECT_EQ(bytes.tokens.numel(), static_cast<int64_t>(text.size()));
  EXPECT_EQ(bytes.decode(bytes.tokens), text);
  const auto chars = lockstep::read_text(path, lockstep::TokenKind::kChars);
  EXPECT_EQ(chars.tokens.numel(), 11);  // h é l l o ' ' 日 本 \n a b
  EXPECT_EQ(chars.vocab_size(), 10);    // l repeats
  EXPECT_EQ(chars.vocab.front(), "\n");  // sorted by code point
  EXPECT_EQ(chars.vocab.back(), "本");
  EXPECT_EQ(chars.decode(chars.tokens), text);
  const at::Tensor encoded = chars.encode("日ab");
  ASSERT_EQ(encoded.numel(), 3);
  EXPECT_EQ(encoded[0].item<int64_t>(), chars.tokens[6].item<int64_t>());
  EXPECT_EQ(encoded[2].item<int64_t>(), chars.tokens[10].item<int64_t>());
  expect_error([&] { chars.encode("z"); }, {"'z'", "not in the vocabulary"});
  expect_error([&] { chars.decode(at::tensor(std::vector<int64_t>{10}, at::kLong)); },
               {"[0, 10)", "got 10"});
  EXPECT_EQ(lockstep::read_text(write("empty.txt", "")).tokens.numel(), 0);
}

TEST_F(Readers, TextErrorsNameLineColumnAndOffset) {
  const std::string missing = dir_ + "/missing.txt";
  expect_error([&] { lockstep::read_text(missing); }, {missing, "missing file"});
  const std::string bad = write("bad.txt", "ok\nab\xC3(");
  expect_error([&] { lockstep::read_text(bad, lockstep::TokenKind::kChars); },
               {bad + ":2:3", "invalid UTF-8", "byte offset 5", "continuation"});
  const std::string cut = write("cut.txt", "x\xE6\x97");
  expect_error([&] { lockstep::read_text(cut, lockstep::TokenKind::kChars); },
               {cut + ":1:2", "truncated"});
  const std::string overlong = write("ol.txt", "\xC0\xAF");
  expect_error([&] { lockstep::read_text(overlong, lockstep::TokenKind::kChars); },
               {overlong + ":1:1", "overlong"});
  // Bytes mode takes anything.
  EXPECT_EQ(lockstep::read_text(bad).tokens.numel(), 7);
}

TEST_F(Readers, TokenWindowsAndTensorPairs) {
  const at::Tensor tokens = at::arange(10, at::kLong);
  lockstep::TokenWindowDataset windows(tokens, /*context=*/3);
  ASSERT_EQ(*windows.size(), 3u);  // starts 0, 3, 6 (the target of 6..8 ends at 9)
  auto ex = windows.get(2);
  EXPECT_TRUE(ex.data.equal(at::arange(6, 9, at::kLong)));
  EXPECT_TRUE(ex.target.equal(at::arange(7, 10, at::kLong)));
  EXPECT_EQ(*lockstep::TokenWindowDataset(tokens, 3, /*stride=*/1).size(), 7u);
  EXPECT_EQ(*lockstep::TokenWindowDataset(tokens, 10).size(), 0u);
  EXPECT_THROW(lockstep::TokenWindowDataset(tokens, 0), lockstep::InvalidArgument);
  EXPECT_THROW(windows.get(3), lockstep::InvalidArgument);
  auto loader = torch::data::make_data_loader(
      lockstep::TokenWindowDataset(tokens, 2, 1).map(torch::data::transforms::Stack<>()),
      lockstep::ShardedSampler(8, lockstep::ShardedSamplerOptions().shuffle(false)),
      torch::data::DataLoaderOptions().batch_size(4));
  int64_t batches = 0;
  for (auto& b : *loader) {
    EXPECT_TRUE(b.target.equal(b.data + 1));
    ++batches;
  }
  EXPECT_EQ(batches, 2);

  lockstep::TensorPairDataset pairs(at::arange(12).reshape({6, 2}), at::arange(6));
  auto batch = pairs.get_batch(std::vector<size_t>{5, 0});
  EXPECT_TRUE(batch[0].data.equal(at::arange(10, 12)));
  EXPECT_EQ(batch[1].target.item<int64_t>(), 0);
  EXPECT_THROW(lockstep::TensorPairDataset(at::zeros({3}), at::zeros({4})), lockstep::InvalidArgument);
  EXPECT_THROW(pairs.get_batch(std::vector<size_t>{6}), lockstep::InvalidArgument);
}

// Note [Bounded reads]: a header's claims are bounded by the file before anything is allocated.
TEST_F(Readers, IdxHeaderClaimsBoundedByTheFileBeforeAllocating) {
  // 2^31 images of 28x28 (1.6 TiB) in a file of 16 bytes: rejected without allocating.
  const std::string huge = write("huge.idx", idx_header(0x08, {1u << 31, 28, 28}));
  expect_error([&] { lockstep::read_idx(huge, 3); },
               {huge, "declares more data than it can hold", "[2147483648, 28, 28] uint8",
                "1683627180032 bytes from offset 16", "at most 0 bytes", "nothing was allocated"});
  // The same in gzip: a few dozen compressed bytes can inflate to at most 1032 times as many.
  const std::string huge_gz = write("huge.gz", idx_header(0x08, {1u << 31, 28, 28}), true);
  expect_error([&] { lockstep::read_idx(huge_gz, 3); },
               {huge_gz, "declares more data than it can hold", "nothing was allocated"});
  // float64 of 2^30 elements in a plain file: the element size counts too.
  const std::string wide = write("wide.idx", idx_header(0x0E, {1u << 30}) + std::string(64, 0));
  expect_error([&] { lockstep::read_idx(wide); },
               {wide, "[1073741824] float64 = 8589934592 bytes from offset 8", "at most 64 bytes"});
}

TEST_F(Readers, LabelOutsideTheDeclaredClassesNamesFileRecordAndOffset) {
  std::string labels(2000, '\x03');
  labels[1234] = static_cast<char>(200);
  const std::string images = write("i.idx", idx_header(0x08, {2000, 1, 1}) + std::string(2000, 9));
  const std::string bad = write("l.idx", idx_header(0x08, {2000}) + labels);
  expect_error(
      [&] {
        lockstep::load_idx_dataset(images, bad, lockstep::IdxDatasetOptions().num_classes(10));
      },
      {bad + ": record 1234 (offset 1242) has label 200, but the dataset declares 10 classes "
             "(labels 0-9)",
       "corrupt or belongs to another dataset"});
  // int32 labels: the offset steps by the element size; negative labels are caught too.
  std::string wide = idx_header(0x0C, {3});
  for (int v : {1, 2, -1}) {
    for (int shift = 24; shift >= 0; shift -= 8) wide.push_back(static_cast<char>((v >> shift) & 0xFF));
  }
  const std::string three = write("i3.idx", idx_header(0x08, {3, 1, 1}) + std::string(3, 9));
  const std::string neg = write("neg.idx", wide);
  expect_error(
      [&] { lockstep::load_idx_dataset(three, neg, lockstep::IdxDatasetOptions().num_classes(5)); },
      {neg + ": record 2 (offset 16) has label -1, but the dataset declares 5 classes (labels 0-4)"});
  // Without a declared class count nothing is checked; load_mnist_directory declares 10.
  EXPECT_EQ(lockstep::load_idx_dataset(images, bad).target()[1234].item<int64_t>(), 200);
  write("train-images-idx3-ubyte", idx_header(0x08, {2000, 1, 1}) + std::string(2000, 9));
  const std::string mnist_labels = write("train-labels-idx1-ubyte", idx_header(0x08, {2000}) + labels);
  expect_error([&] { lockstep::load_mnist_directory(dir_, /*train=*/true); },
               {mnist_labels + ": record 1234 (offset 1242) has label 200, but the dataset "
                               "declares 10 classes (labels 0-9)"});
}

TEST_F(Readers, UnreadableFileSaysPermissionDeniedNotMissing) {
  EXPECT_NE(lockstep::detail::open_failure_message("/d/x", "IDX file", EACCES)
                .find("Cannot open IDX file '/d/x': permission denied"),
            std::string::npos);
  EXPECT_NE(lockstep::detail::open_failure_message("/d/x", "CSV file", ENOENT)
                .find("Cannot open CSV file '/d/x': missing file"),
            std::string::npos);
  EXPECT_NE(lockstep::detail::open_failure_message("/d/x", "text file", EMFILE)
                .find("Cannot open text file '/d/x': Too many open files (errno 24)"),
            std::string::npos);
  // A real mode-000 file. Root reads it anyway, so a forked child drops to `nobody` first.
  ASSERT_EQ(::chmod(dir_.c_str(), 0755), 0);
  const std::string idx = write("locked.idx", idx_header(0x08, {1}) + "x");
  const std::string csv = write("locked.csv", "a\n1\n");
  const std::string text = write("locked.txt", "hi");
  for (const auto& p : {idx, csv, text}) ASSERT_EQ(::chmod(p.c_str(), 0), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    if (::geteuid() == 0 && ::setuid(65534) != 0) ::_exit(10);
    int failures = 0;
    auto check = [&](const std::function<void()>& fn, const std::string& path, const char* what) {
      try {
        fn();
        ++failures;
      } catch (const lockstep::InvalidArgument& e) {
        const std::string msg = e.what();
        const std::string want = std::string("Cannot open ") + what + " '" + path +
                                 "': permission denied";
        if (msg.find(want) == std::string::npos || msg.find("chmod") == std::string::npos ||
            msg.find("missing") != std::string::npos) {
          std::fprintf(stderr, "unexpected message: %s\n", msg.c_str());
          ++failures;
        }
      }
    };
    check([&] { lockstep::read_idx(idx); }, idx, "IDX file");
    check([&] { lockstep::read_csv(csv); }, csv, "CSV file");
    check([&] { lockstep::read_text(text); }, text, "text file");
    ::_exit(failures);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the child's messages are on stderr above";
}

TEST_F(Readers, CsvFiniteRejectsNanAndInfinityNamingLineAndColumn) {
  const std::string path = write("nan.csv", "a,b\n1,2\n3, nan\n");
  EXPECT_TRUE(std::isnan(lockstep::read_csv(path).values[1][1].item<float>()));  // default
  expect_error([&] { lockstep::read_csv(path, lockstep::CsvOptions().finite(true)); },
               {path + ":3:3: NaN value 'nan' in column 2 ('b'): expected a finite number "
                       "(CsvOptions::finite is set)"});
  const std::string inf = write("inf.csv", "1,-inf\n", false);
  expect_error(
      [&] { lockstep::read_csv(inf, lockstep::CsvOptions().header(false).finite(true)); },
      {inf + ":1:3: infinite value '-inf' in column 2 ('1')"});
  EXPECT_EQ(lockstep::read_csv(write("ok.csv", "x\n1e3\n"), lockstep::CsvOptions().finite(true))
                .values.item<float>(),
            1000.f);
}

}  // namespace
