// The readers' torch-free parsing. See data/reader_parsing.h and Note [Bounded reads].
#include "data/reader_parsing.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "lockstep/errors.h"

namespace lockstep {
namespace detail {

std::string open_failure_message(const std::string& path, const char* what, int err) {
  if (err == ENOENT || err == ENOTDIR) {
    return concat("Cannot open ", what, " '", path, "': missing file (", std::strerror(err),
                  "). Check the path.");
  }
  if (err == EACCES || err == EPERM) {
    return concat("Cannot open ", what, " '", path, "': permission denied (", std::strerror(err),
                  "): the file exists but user id ", ::geteuid(),
                  " may not read it. Check its mode and owner and those of its directories "
                  "(ls -l, chmod, chown).");
  }
  return concat("Cannot open ", what, " '", path, "': ", std::strerror(err), " (errno ", err,
                ").");
}

int open_regular_file(const std::string& path, const char* what, int64_t* size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw InvalidArgument(open_failure_message(path, what, errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw InvalidArgument(concat("Expected ", what, " '", path,
                                 "' to be a regular file, but it is not (a directory?)."));
  }
  *size = static_cast<int64_t>(st.st_size);
  return fd;
}

bool idx_type_code(uint8_t code, int64_t* size, const char** name) {
  switch (code) {
    case 0x08: *size = 1, *name = "uint8"; return true;
    case 0x09: *size = 1, *name = "int8"; return true;
    case 0x0B: *size = 2, *name = "int16"; return true;
    case 0x0C: *size = 4, *name = "int32"; return true;
    case 0x0D: *size = 4, *name = "float32"; return true;
    case 0x0E: *size = 8, *name = "float64"; return true;
    default: return false;
  }
}

namespace {

uint32_t big_endian32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

}  // namespace

std::string shape_string(const std::vector<int64_t>& dims) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  os << "]";
  return os.str();
}


IdxHeader parse_idx_header(const unsigned char* p, size_t n, const std::string& path,
                           int64_t expected_dims, int64_t stream_bound) {
  IdxHeader h;
  const auto got = static_cast<int64_t>(std::min<size_t>(n, 4));
  LOCKSTEP_CHECK(got == 4, "IDX file '", path, "' is truncated at offset ", got,
                 ": expected a 4-byte magic number at offset 0, but the file has only ", got,
                 " bytes.");
  LOCKSTEP_CHECK(p[0] == 0 && p[1] == 0 && idx_type_code(p[2], &h.element_size, &h.type_name),
                 "IDX file '", path, "' has a bad magic number at offset 0: expected 00 00 "
                 "<type 08|09|0B|0C|0D|0E> <dims>, but found ", std::hex, int{p[0]}, " ",
                 int{p[1]}, " ", int{p[2]}, " ", int{p[3]}, std::dec,
                 ". Is this an IDX (MNIST-format) file?");
  h.type_code = p[2];
  const int64_t dims = p[3];
  LOCKSTEP_CHECK(dims >= 1, "IDX file '", path, "' has a wrong dimension count at offset 3: "
                 "expected at least 1, but found 0.");
  LOCKSTEP_CHECK(expected_dims <= 0 || dims == expected_dims, "IDX file '", path,
                 "' has a wrong dimension count at offset 3: expected ", expected_dims,
                 ", but found ", dims, ". Images are 3-D (count, rows, columns), labels 1-D.");
  const auto header_got = static_cast<int64_t>(n) - 4;
  LOCKSTEP_CHECK(header_got >= 4 * dims, "IDX file '", path, "' is truncated at offset ",
                 4 + header_got, ": the header declares ", dims, " dimension sizes (", 4 * dims,
                 " bytes from offset 4), but the file ends first.");
  bool any_zero = false;
  long double claimed = static_cast<long double>(h.element_size);  // for the message only
  for (int64_t d = 0; d < dims; ++d) {
    h.sizes.push_back(big_endian32(p + 4 + 4 * d));
    any_zero = any_zero || h.sizes.back() == 0;
    claimed *= static_cast<long double>(h.sizes.back());
  }
  h.data_offset = 4 + 4 * dims;
  // Note [Bounded reads]: the element count is bounded by the room after the header, one
  // dimension at a time, so the product never overflows.
  const int64_t room = std::max<int64_t>(stream_bound - h.data_offset, 0);
  const int64_t max_count = room / h.element_size;
  h.count = 1;
  for (int64_t d = 0; d < dims && !any_zero; ++d) {
    const int64_t size = h.sizes[static_cast<size_t>(d)];
    LOCKSTEP_CHECK(h.count <= max_count / size, "IDX file '", path, "' declares more data than "
                   "it can hold: the header (offset 4) declares ", shape_string(h.sizes), " ",
                   h.type_name, " = ",
                   claimed < 9e18L ? std::to_string(static_cast<long long>(claimed))
                                   : std::string("more than 9e18"),
                   " bytes from offset ", h.data_offset, ", but the file can hold at most ", room,
                   " bytes there. The header is wrong or the file is truncated; nothing was "
                   "allocated.");
    h.count *= size;
  }
  if (any_zero) h.count = 0;
  LOCKSTEP_CHECK(h.count <= (int64_t{1} << 40), "IDX file '", path, "' declares an implausible "
                 "shape at offset 4: ", shape_string(h.sizes), " is more than 2^40 elements.");
  return h;
}

void check_labels(const int64_t* labels, int64_t count, const IdxHeader& header,
                  int64_t num_classes, const std::string& path) {
  if (num_classes <= 0) return;
  for (int64_t i = 0; i < count; ++i) {
    if (labels[i] < 0 || labels[i] >= num_classes) {
      throw InvalidArgument(concat(path, ": record ", i, " (offset ",
                                   header.data_offset + i * header.element_size,
                                   ") has label ", labels[i], ", but the dataset declares ",
                                   num_classes, " classes (labels 0-", num_classes - 1,
                                   "). The labels file is corrupt or belongs to another "
                                   "dataset."));
    }
  }
}

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

CsvParsed parse_csv_text(const std::string& text, const std::string& path, char delimiter,
                         bool header, bool finite) {
  CsvParsed table;
  int64_t width = -1, header_line = 0, line_no = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (trim(line).empty()) continue;
    std::vector<Field> fields = split_fields(line, delimiter);
    if (width < 0) {
      width = static_cast<int64_t>(fields.size());
      header_line = line_no;
      if (header) {
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
      throw InvalidArgument(concat(path, ":", line_no, ":", column, ": ragged row: expected ",
                                   width, " fields (as on line ", header_line,
                                   header ? ", the header" : "", "), but found ", fields.size(),
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
                     fields[c].column, ": non-numeric field '", field, "' in column ", c + 1,
                     " ('", table.columns[c], "'): expected a number.");
      LOCKSTEP_CHECK(!finite || std::isfinite(value), path, ":", line_no, ":", fields[c].column,
                     ": ", std::isnan(value) ? "NaN" : "infinite", " value '", field,
                     "' in column ", c + 1, " ('", table.columns[c],
                     "'): expected a finite number (CsvOptions::finite is set). Fix or drop "
                     "the row.");
      table.values.push_back(value);
    }
    ++table.rows;
  }
  LOCKSTEP_CHECK(width >= 0 || !header, "CSV file '", path,
                 "' is empty: expected a header line at line 1.");
  table.width = std::max<int64_t>(width, 0);
  return table;
}

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

}  // namespace

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

}  // namespace detail
}  // namespace lockstep
