// Reading Python's torch.save files of tensors without LibTorch's TorchScript unpickler.
//
// Note [State dict unpickler]
// `model.state_dict()` is a collections.OrderedDict carrying a `_metadata` attribute.
// LibTorch's unpickler (1.13 and 2.x alike) turns the OrderedDict global into None, because
// it expects OrderedDicts only as a tensor's empty backward hooks, and then fails an internal
// assert on SETITEMS. So lockstep reads these files itself: the zip container's directory
// (stored entries only, as torch.save writes them) and a small pickle machine that knows
// exactly the globals a dict of tensors needs (collections.OrderedDict,
// torch._utils._rebuild_tensor_v2 / _rebuild_parameter, torch.<Type>Storage). Every other
// global is refused, so nothing of Python runs and no object but containers, numbers,
// strings and tensors is built. Every length, count, offset and tensor extent read from the
// file is checked against the bytes actually present before anything is allocated from it.
// Only ATen's public tensor API is used: this file does not differ between LibTorch versions.
#include <ATen/ATen.h>

#include <cstring>
#include <map>
#include <memory>
#include <unordered_map>

#include "adapter/torch_adapter.h"
#include "lockstep/errors.h"

namespace lockstep {
namespace adapter {

using detail::concat;

namespace {

[[noreturn]] void fail(const std::string& what) { throw InvalidArgument(what); }

uint64_t read_le(const std::vector<char>& b, uint64_t pos, int n) {
  if (pos > b.size() || static_cast<uint64_t>(n) > b.size() - pos) {
    fail("is not a torch.save file: its zip directory points past the end of the file "
         "(truncated or damaged?)");
  }
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(b[pos + i]);
  return v;
}

struct ZipEntry {
  uint64_t offset = 0;  // of the data
  uint64_t size = 0;
};

// name -> where its (stored) bytes lie in `b`.
std::map<std::string, ZipEntry> read_zip_directory(const std::vector<char>& b) {
  constexpr uint64_t kEocdSize = 22;
  if (b.size() < kEocdSize) fail("is not a torch.save file (too short to be a zip archive)");
  uint64_t eocd = UINT64_MAX;
  const uint64_t lowest = b.size() > kEocdSize + 65535 ? b.size() - kEocdSize - 65535 : 0;
  for (uint64_t p = b.size() - kEocdSize + 1; p-- > lowest;) {
    if (read_le(b, p, 4) == 0x06054b50) {
      eocd = p;
      break;
    }
  }
  if (eocd == UINT64_MAX) {
    if (static_cast<uint8_t>(b[0]) == 0x80) {
      fail("is in PyTorch's legacy (pre-1.6, not zip) torch.save format, which lockstep does "
           "not read; load it in Python and save it again with a current torch.save");
    }
    fail("is not a torch.save file (no zip archive found)");
  }
  uint64_t count = read_le(b, eocd + 10, 2);
  uint64_t cd_offset = read_le(b, eocd + 16, 4);
  if ((count == 0xFFFF || cd_offset == 0xFFFFFFFF) && eocd >= 20 &&
      read_le(b, eocd - 20, 4) == 0x07064b50) {  // zip64
    const uint64_t eocd64 = read_le(b, eocd - 20 + 8, 8);
    if (read_le(b, eocd64, 4) != 0x06064b50) fail("is not a torch.save file (bad zip64 record)");
    count = read_le(b, eocd64 + 32, 8);
    cd_offset = read_le(b, eocd64 + 48, 8);
  }
  // Each central directory entry is at least 46 bytes: bounds the count before the loop.
  if (cd_offset > b.size() || count > (b.size() - cd_offset) / 46) {
    fail(concat("is not a torch.save file: its zip directory declares ", count,
                " entries, more than the file can hold"));
  }
  std::map<std::string, ZipEntry> out;
  uint64_t p = cd_offset;
  for (uint64_t i = 0; i < count; ++i) {
    if (read_le(b, p, 4) != 0x02014b50) fail("is not a torch.save file (bad zip directory)");
    const uint64_t method = read_le(b, p + 10, 2);
    uint64_t comp = read_le(b, p + 20, 4);
    uint64_t uncomp = read_le(b, p + 24, 4);
    const uint64_t name_len = read_le(b, p + 28, 2);
    const uint64_t extra_len = read_le(b, p + 30, 2);
    const uint64_t comment_len = read_le(b, p + 32, 2);
    uint64_t local = read_le(b, p + 42, 4);
    if (p + 46 + name_len + extra_len > b.size()) fail("is not a torch.save file (bad zip entry)");
    std::string name(b.data() + p + 46, name_len);
    // Zip64 extra field: the 8-byte values replace the saturated 4-byte ones, in this order.
    for (uint64_t e = p + 46 + name_len; e + 4 <= p + 46 + name_len + extra_len;) {
      const uint64_t id = read_le(b, e, 2), len = read_le(b, e + 2, 2);
      if (id == 0x0001) {
        uint64_t q = e + 4;
        if (uncomp == 0xFFFFFFFF) uncomp = read_le(b, q, 8), q += 8;
        if (comp == 0xFFFFFFFF) comp = read_le(b, q, 8), q += 8;
        if (local == 0xFFFFFFFF) local = read_le(b, q, 8);
      }
      e += 4 + len;
    }
    if (method != 0 || comp != uncomp) {
      fail(concat("is not a torch.save file lockstep can read: entry '", name,
                  "' is compressed (torch.save stores entries uncompressed)"));
    }
    if (read_le(b, local, 4) != 0x04034b50) fail("is not a torch.save file (bad zip entry)");
    const uint64_t data = local + 30 + read_le(b, local + 26, 2) + read_le(b, local + 28, 2);
    if (data > b.size() || uncomp > b.size() - data) {
      fail(concat("is truncated: zip entry '", name, "' declares ", uncomp,
                  " bytes past the end of the file"));
    }
    out[name] = ZipEntry{data, uncomp};
    p += 46 + name_len + extra_len + comment_len;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The pickle machine

struct Value;
using ValuePtr = std::shared_ptr<Value>;

struct Value {
  enum class Kind { kNone, kBool, kInt, kFloat, kString, kTuple, kList, kDict, kGlobal, kTensor };
  Kind kind = Kind::kNone;
  int64_t i = 0;
  double f = 0;
  std::string s;                // string; global "module.name"
  std::vector<ValuePtr> items;  // tuple, list; dict as key, value, key, value, ...
  at::Tensor tensor;            // tensor; a storage is a 1-D tensor with is_storage
  bool is_storage = false;
};

const char* kind_name(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kNone: return "None";
    case Value::Kind::kBool: return "bool";
    case Value::Kind::kInt: return "int";
    case Value::Kind::kFloat: return "float";
    case Value::Kind::kString: return "str";
    case Value::Kind::kTuple: return "tuple";
    case Value::Kind::kList: return "list";
    case Value::Kind::kDict: return "dict";
    case Value::Kind::kGlobal: return "Python global";
    case Value::Kind::kTensor: return v.is_storage ? "storage" : "tensor";
  }
  return "?";
}

ValuePtr make(Value::Kind kind) {
  auto v = std::make_shared<Value>();
  v->kind = kind;
  return v;
}

bool storage_dtype(const std::string& global, at::ScalarType* out) {
  static const std::map<std::string, at::ScalarType> kTypes = {
      {"torch.FloatStorage", at::kFloat},          {"torch.DoubleStorage", at::kDouble},
      {"torch.HalfStorage", at::kHalf},            {"torch.BFloat16Storage", at::kBFloat16},
      {"torch.LongStorage", at::kLong},            {"torch.IntStorage", at::kInt},
      {"torch.ShortStorage", at::kShort},          {"torch.CharStorage", at::kChar},
      {"torch.ByteStorage", at::kByte},            {"torch.BoolStorage", at::kBool},
      {"torch.ComplexFloatStorage", at::kComplexFloat},
      {"torch.ComplexDoubleStorage", at::kComplexDouble}};
  auto it = kTypes.find(global);
  if (it == kTypes.end()) return false;
  *out = it->second;
  return true;
}

class Unpickler {
 public:
  Unpickler(const std::vector<char>& file, const std::map<std::string, ZipEntry>& entries,
            std::string prefix, ZipEntry pickle)
      : file_(file), entries_(entries), prefix_(std::move(prefix)),
        start_(pickle.offset), pos_(pickle.offset), end_(pickle.offset + pickle.size) {}

  ValuePtr run() {
    for (;;) {
      const uint8_t op = byte();
      switch (op) {
        case 0x80: byte(); break;                // PROTO
        case 0x95: bytes(8); break;              // FRAME
        case '.':                                // STOP
          if (stack_.size() != 1) fail("is not a torch.save file (malformed pickle)");
          return stack_.back();
        case '(': marks_.push_back(stack_.size()); break;
        case 'N': push(make(Value::Kind::kNone)); break;
        case 0x88: case 0x89: {
          auto v = make(Value::Kind::kBool);
          v->i = op == 0x88;
          push(v);
          break;
        }
        case 'K': push_int(static_cast<uint8_t>(byte())); break;
        case 'M': push_int(static_cast<int64_t>(le(2))); break;
        case 'J': push_int(static_cast<int32_t>(static_cast<uint32_t>(le(4)))); break;
        case 0x8a: {  // LONG1
          const int n = byte();
          if (n > 8) fail("holds an integer wider than 64 bits, which no state dict needs");
          uint64_t v = le(n);
          if (n > 0 && n < 8 && (v >> (8 * n - 1)) & 1) v |= ~uint64_t{0} << (8 * n);
          push_int(static_cast<int64_t>(v));
          break;
        }
        case 'G': {
          uint64_t bits = 0;
          for (int k = 0; k < 8; ++k) bits = (bits << 8) | byte();
          auto v = make(Value::Kind::kFloat);
          std::memcpy(&v->f, &bits, 8);
          push(v);
          break;
        }
        case 'X': push_string(le(4)); break;
        case 0x8c: push_string(byte()); break;
        case 'c': {
          auto v = make(Value::Kind::kGlobal);
          v->s = line();
          v->s += "." + line();
          push(v);
          break;
        }
        case 0x93: {  // STACK_GLOBAL (protocol 4): module and name from the stack
          auto name = pop();
          auto module = pop();
          if (module->kind != Value::Kind::kString || name->kind != Value::Kind::kString ||
              module->s.size() + name->s.size() > 512) {
            fail("is not a torch.save file (malformed global in its pickle)");
          }
          auto v = make(Value::Kind::kGlobal);
          v->s = module->s + "." + name->s;
          push(v);
          break;
        }
        case 'q': memo_[byte()] = top(); break;
        case 'r': memo_[le(4)] = top(); break;
        case 0x94: memo_[memo_.size()] = top(); break;
        case 'h': push(memo(byte())); break;
        case 'j': push(memo(le(4))); break;
        case ')': push(make(Value::Kind::kTuple)); break;
        case ']': push(make(Value::Kind::kList)); break;
        case '}': push(make(Value::Kind::kDict)); break;
        case 't': {
          auto v = make(Value::Kind::kTuple);
          v->items = pop_to_mark();
          push(v);
          break;
        }
        case 0x85: case 0x86: case 0x87: {
          auto v = make(Value::Kind::kTuple);
          const size_t n = op - 0x84;
          if (stack_.size() < n) fail("is not a torch.save file (malformed pickle)");
          v->items.assign(stack_.end() - n, stack_.end());
          stack_.resize(stack_.size() - n);
          push(v);
          break;
        }
        case 'a': {
          auto item = pop();
          container(Value::Kind::kList)->items.push_back(item);
          break;
        }
        case 'e': {
          auto items = pop_to_mark();
          auto& list = container(Value::Kind::kList)->items;
          list.insert(list.end(), items.begin(), items.end());
          break;
        }
        case 's': {
          auto value = pop();
          auto key = pop();
          auto& dict = container(Value::Kind::kDict)->items;
          dict.push_back(key);
          dict.push_back(value);
          break;
        }
        case 'u': {
          auto items = pop_to_mark();
          if (items.size() % 2) fail("is not a torch.save file (malformed pickle)");
          auto& dict = container(Value::Kind::kDict)->items;
          dict.insert(dict.end(), items.begin(), items.end());
          break;
        }
        case 'b':  // BUILD: an OrderedDict's attributes (`_metadata`) or a Parameter's; unused
          pop();
          if (stack_.empty()) fail("is not a torch.save file (malformed pickle)");
          break;
        case 'Q': push(persistent_load(pop())); break;
        case 'R': {
          auto args = pop();
          auto callable = pop();
          push(reduce(*callable, *args));
          break;
        }
        case 0x81: {  // NEWOBJ: cls.__new__(cls, *args), a Python object
          pop();
          auto cls = pop();
          fail(concat("is not a state dict lockstep can read: it holds a Python object",
                      cls->kind == Value::Kind::kGlobal ? " of class " + cls->s : std::string(),
                      " (lockstep builds only dicts, tensors and numbers, and runs no Python)"));
        }
        default:
          fail(concat("is not a state dict lockstep can read: its pickle uses opcode 0x",
                      std::hex, static_cast<int>(op), std::dec, " at byte ",
                      pos_ - 1 - start_,
                      ", which a dict of tensors saved by torch.save does not"));
      }
    }
  }

 private:
  uint8_t byte() {
    if (pos_ >= end_) fail("is truncated: its pickle ends before STOP");
    return static_cast<uint8_t>(file_[pos_++]);
  }
  const char* bytes(uint64_t n) {
    if (n > end_ - pos_) fail("is truncated: its pickle ends inside a value");
    const char* p = file_.data() + pos_;
    pos_ += n;
    return p;
  }
  uint64_t le(int n) {
    const char* p = bytes(n);
    uint64_t v = 0;
    for (int k = n - 1; k >= 0; --k) v = (v << 8) | static_cast<uint8_t>(p[k]);
    return v;
  }
  std::string line() {
    std::string s;
    for (char c; (c = static_cast<char>(byte())) != '\n';) {
      if (s.size() > 256) fail("is not a torch.save file (a global name longer than 256)");
      s += c;
    }
    return s;
  }
  void push(ValuePtr v) { stack_.push_back(std::move(v)); }
  void push_int(int64_t i) {
    auto v = make(Value::Kind::kInt);
    v->i = i;
    push(v);
  }
  void push_string(uint64_t n) {
    auto v = make(Value::Kind::kString);
    const char* p = bytes(n);  // bounded by the pickle's length before allocating
    v->s.assign(p, n);
    push(v);
  }
  ValuePtr top() {
    if (stack_.empty()) fail("is not a torch.save file (malformed pickle)");
    return stack_.back();
  }
  ValuePtr pop() {
    auto v = top();
    stack_.pop_back();
    if (!marks_.empty() && marks_.back() > stack_.size()) {
      fail("is not a torch.save file (malformed pickle)");
    }
    return v;
  }
  ValuePtr memo(uint64_t key) {
    auto it = memo_.find(key);
    if (it == memo_.end()) fail("is not a torch.save file (pickle refers to a missing memo)");
    return it->second;
  }
  std::vector<ValuePtr> pop_to_mark() {
    if (marks_.empty()) fail("is not a torch.save file (malformed pickle)");
    const size_t mark = marks_.back();
    marks_.pop_back();
    std::vector<ValuePtr> items(stack_.begin() + mark, stack_.end());
    stack_.resize(mark);
    return items;
  }
  Value* container(Value::Kind kind) {
    Value* v = top().get();
    if (v->kind != kind) fail("is not a torch.save file (malformed pickle)");
    return v;
  }

  ValuePtr persistent_load(const ValuePtr& pid) {
    // ('storage', torch.<Type>Storage, key, location, numel)
    const auto& t = pid->items;
    at::ScalarType dtype;
    if (pid->kind != Value::Kind::kTuple || t.size() != 5 ||
        t[0]->kind != Value::Kind::kString || t[0]->s != "storage" ||
        t[1]->kind != Value::Kind::kGlobal || t[2]->kind != Value::Kind::kString ||
        t[4]->kind != Value::Kind::kInt) {
      fail("is not a state dict lockstep can read: it refers to an external object other "
           "than a tensor storage");
    }
    if (!storage_dtype(t[1]->s, &dtype)) {
      fail(concat("holds a storage of type ", t[1]->s, ", which lockstep does not read"));
    }
    auto cached = storages_.find(t[2]->s);
    if (cached != storages_.end()) return cached->second;
    auto entry = entries_.find(prefix_ + "data/" + t[2]->s);
    if (entry == entries_.end()) {
      fail(concat("is truncated or damaged: storage '", t[2]->s, "' has no data/", t[2]->s,
                  " entry"));
    }
    const uint64_t item = c10::elementSize(dtype);
    const int64_t numel = t[4]->i;
    if (numel < 0 || entry->second.size != static_cast<uint64_t>(numel) * item ||
        static_cast<uint64_t>(numel) > entry->second.size) {
      fail(concat("is damaged: storage '", t[2]->s, "' declares ", numel, " elements of ",
                  dtype, " but its entry holds ", entry->second.size, " bytes"));
    }
    auto v = make(Value::Kind::kTensor);
    v->is_storage = true;
    v->tensor = at::empty({numel}, at::TensorOptions().dtype(dtype));
    if (numel > 0) {
      std::memcpy(v->tensor.data_ptr(), file_.data() + entry->second.offset, entry->second.size);
    }
    storages_[t[2]->s] = v;
    return v;
  }

  static std::vector<int64_t> int_tuple(const Value& v, const char* what) {
    if (v.kind != Value::Kind::kTuple || v.items.size() > 64) {
      fail(concat("is not a state dict lockstep can read: a tensor's ", what,
                  " is not a tuple of at most 64 integers"));
    }
    std::vector<int64_t> out;
    for (const auto& x : v.items) {
      if (x->kind != Value::Kind::kInt || x->i < 0) {
        fail(concat("is damaged: a tensor's ", what, " holds a negative or non-integer value"));
      }
      out.push_back(x->i);
    }
    return out;
  }

  ValuePtr reduce(const Value& callable, const Value& args) {
    if (callable.kind != Value::Kind::kGlobal || args.kind != Value::Kind::kTuple) {
      fail("is not a torch.save file (malformed pickle)");
    }
    const auto& a = args.items;
    if (callable.s == "collections.OrderedDict") {
      if (!a.empty()) fail("is not a torch.save file (OrderedDict built from arguments)");
      return make(Value::Kind::kDict);
    }
    if (callable.s == "torch._utils._rebuild_parameter" && (a.size() == 3 || a.size() == 2) &&
        a[0]->kind == Value::Kind::kTensor && !a[0]->is_storage) {
      return a[0];
    }
    if (callable.s == "torch._utils._rebuild_tensor_v2" && a.size() >= 4 && a.size() <= 7 &&
        a[0]->kind == Value::Kind::kTensor && a[0]->is_storage &&
        a[1]->kind == Value::Kind::kInt) {
      const at::Tensor& storage = a[0]->tensor;
      auto size = int_tuple(*a[2], "size");
      auto stride = int_tuple(*a[3], "stride");
      if (size.size() != stride.size()) fail("is damaged: a tensor's size and stride differ in rank");
      // The highest element the view reaches must lie inside the storage (no overflow: each
      // term is checked against the storage's size, which the file bounded).
      const int64_t numel = storage.numel();
      int64_t last = a[1]->i;
      bool empty = false;
      for (size_t d = 0; d < size.size(); ++d) empty = empty || size[d] == 0;
      bool ok = last >= 0 && last <= numel;
      for (size_t d = 0; d < size.size() && ok && !empty; ++d) {
        ok = size[d] - 1 <= numel && (stride[d] == 0 || (size[d] - 1) <= numel / stride[d]) &&
             (size[d] - 1) * stride[d] <= numel - last;
        if (ok) last += (size[d] - 1) * stride[d];
      }
      if (!ok || (!empty && last >= numel)) {
        fail(concat("is damaged: a tensor of size ", at::IntArrayRef(size), " and stride ",
                    at::IntArrayRef(stride), " at offset ", a[1]->i,
                    " reaches past its storage of ", numel, " elements"));
      }
      auto v = make(Value::Kind::kTensor);
      v->tensor = storage.as_strided(size, stride, a[1]->i);
      return v;
    }
    fail(concat("is not a state dict lockstep can read: it calls Python's ", callable.s,
                " (lockstep builds only dicts, tensors and numbers, and runs no Python)"));
  }

  const std::vector<char>& file_;
  const std::map<std::string, ZipEntry>& entries_;
  std::string prefix_;
  uint64_t start_, pos_, end_;
  std::vector<ValuePtr> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, ValuePtr> memo_;
  std::map<std::string, ValuePtr> storages_;
};

std::map<std::string, at::Tensor> to_tensor_dict(const Value& v, const std::string& where) {
  if (v.kind != Value::Kind::kDict) {
    fail(concat("holds a ", kind_name(v), where,
                ", expected a dict of name -> tensor (a state_dict)"));
  }
  std::map<std::string, at::Tensor> out;
  for (size_t k = 0; k < v.items.size(); k += 2) {
    const Value& key = *v.items[k];
    const Value& value = *v.items[k + 1];
    if (key.kind != Value::Kind::kString || value.kind != Value::Kind::kTensor ||
        value.is_storage) {
      fail(concat(": entry ", key.kind == Value::Kind::kString ? "'" + key.s + "'" : kind_name(key),
                  " -> ", kind_name(value), where,
                  " is not a name -> tensor pair, as in a state_dict"));
    }
    out[key.s] = value.tensor;
  }
  return out;
}

}  // namespace

std::map<std::string, at::Tensor> read_tensor_dict_archive(const std::vector<char>& bytes,
                                                           const std::string& key) {
  auto entries = read_zip_directory(bytes);
  // torch.save puts every entry under one top folder ("archive/" or the file's stem).
  std::string prefix;
  for (const auto& e : entries) {
    auto slash = e.first.find('/');
    if (slash != std::string::npos && e.first.compare(slash + 1, std::string::npos, "data.pkl") == 0) {
      prefix = e.first.substr(0, slash + 1);
      break;
    }
  }
  auto pickle = entries.find(prefix + "data.pkl");
  if (pickle == entries.end()) fail("is a zip archive but not a torch.save file (no data.pkl)");
  auto order = entries.find(prefix + "byteorder");
  if (order != entries.end() &&
      std::string(bytes.data() + order->second.offset, order->second.size) != "little") {
    fail("holds big-endian tensors, which lockstep does not read");
  }
  ValuePtr top = Unpickler(bytes, entries, prefix, pickle->second).run();
  if (key.empty()) return to_tensor_dict(*top, "");
  if (top->kind != Value::Kind::kDict) {
    fail(concat("holds a ", kind_name(*top), ", expected a dict with an entry '", key, "'"));
  }
  std::string keys;
  for (size_t k = 0; k < top->items.size(); k += 2) {
    const Value& name = *top->items[k];
    if (name.kind != Value::Kind::kString) continue;
    if (name.s == key) return to_tensor_dict(*top->items[k + 1], concat(" under '", key, "'"));
    if (keys.size() < 200) keys += (keys.empty() ? "'" : ", '") + name.s + "'";
  }
  fail(concat("has no entry '", key, "' (its top-level keys: ", keys.empty() ? "none" : keys,
              "); pass the key the state dict was saved under"));
}

}  // namespace adapter
}  // namespace lockstep
