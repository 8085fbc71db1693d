// The store's job token: generation, hex form, environment and file.
#include "comm/store_token.h"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstdio>
#include <cstring>

#include "core/sha256.h"
#include "lockstep/env_vars.h"
#include "lockstep/errors.h"

namespace lockstep {
namespace comm {

using detail::concat;

namespace {

constexpr const char* kHowToMake =
    "Make one with `openssl rand -hex 32` (or let lockstep-run generate it).";

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

void secure_random_bytes(uint8_t* out, size_t size) {
  size_t done = 0;
  while (done < size) {
    ssize_t n = getrandom(out + done, size - done, 0);
    if (n > 0) {
      done += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    break;  // ENOSYS and the like: fall back to the device
  }
  if (done == size) return;
  int fd = ::open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw CommError(concat("Could not read random bytes: getrandom and /dev/urandom failed (",
                           std::strerror(errno), "). The store cannot create a job token or "
                           "a handshake nonce without a random source."));
  }
  while (done < size) {
    ssize_t n = ::read(fd, out + done, size - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ::close(fd);
      throw CommError("Could not read random bytes from /dev/urandom.");
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
}

std::string generate_store_token(size_t size) {
  LOCKSTEP_CHECK(size >= kMinStoreTokenBytes, "Expected a store token of at least ",
                 kMinStoreTokenBytes, " bytes, but ", size, " were asked for.");
  std::string token(size, '\0');
  secure_random_bytes(reinterpret_cast<uint8_t*>(&token[0]), size);
  return token;
}

std::string store_token_to_hex(const std::string& token) {
  return core::to_hex(token.data(), token.size());
}

std::string store_token_from_hex(const std::string& text, const std::string& where) {
  size_t begin = 0, end = text.size();
  while (begin < end && std::isspace(static_cast<unsigned char>(text[begin]))) ++begin;
  while (end > begin && std::isspace(static_cast<unsigned char>(text[end - 1]))) --end;
  const size_t digits = end - begin;
  bool hex = digits % 2 == 0;
  for (size_t i = begin; hex && i < end; ++i) hex = hex_digit(text[i]) >= 0;
  // The text is a secret: messages name its length, never its contents.
  LOCKSTEP_CHECK(hex, "Expected the store token in ", where,
                 " to be an even number of hex digits, but got ", digits,
                 " characters that are not. ", kHowToMake);
  LOCKSTEP_CHECK(digits / 2 >= kMinStoreTokenBytes, "Expected a store token of at least ",
                 kMinStoreTokenBytes, " bytes (", 2 * kMinStoreTokenBytes, " hex digits) in ",
                 where, ", but got ", digits / 2, " bytes. ", kHowToMake);
  std::string token(digits / 2, '\0');
  for (size_t i = 0; i < token.size(); ++i) {
    token[i] = static_cast<char>(hex_digit(text[begin + 2 * i]) * 16 +
                                 hex_digit(text[begin + 2 * i + 1]));
  }
  return token;
}

std::string read_store_token_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  LOCKSTEP_CHECK(fd >= 0, "Could not open the store token file ", path, " (",
                 env::kStoreTokenFile, "): ", std::strerror(errno),
                 ". Expected a regular file, mode 0600, holding the job token in hex.");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw InvalidArgument(concat("Expected the store token file ", path, " (",
                                 env::kStoreTokenFile, ") to be a regular file, but it is not."));
  }
  if ((st.st_mode & 077) != 0) {
    ::close(fd);
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o", unsigned(st.st_mode & 07777));
    throw InvalidArgument(concat("Expected the store token file ", path, " (",
                                 env::kStoreTokenFile, ") to have mode 0600 or stricter, but "
                                 "it has mode ", mode, ": other users could read the job's "
                                 "secret. Run `chmod 600 ", path, "`."));
  }
  std::string text;
  char buffer[512];
  while (text.size() <= 64 * 1024) {
    ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    text.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  LOCKSTEP_CHECK(text.size() <= 64 * 1024, "Expected the store token file ", path,
                 " to hold a hex token, but it is larger than 64 KiB.");
  return store_token_from_hex(text, concat(env::kStoreTokenFile, "=", path));
}

std::optional<std::string> store_token_from_env() {
  const char* hex = std::getenv(env::kStoreToken);
  const char* file = std::getenv(env::kStoreTokenFile);
  if (hex != nullptr && *hex == '\0') hex = nullptr;
  if (file != nullptr && *file == '\0') file = nullptr;
  LOCKSTEP_CHECK(hex == nullptr || file == nullptr, "Expected one of ", env::kStoreToken,
                 " and ", env::kStoreTokenFile, ", but both are set. Unset one of them.");
  if (hex != nullptr) return store_token_from_hex(hex, env::kStoreToken);
  if (file != nullptr) return read_store_token_file(file);
  return std::nullopt;
}

}  // namespace comm
}  // namespace lockstep
