#pragma once
// The per-job secret of the store (Note [Store protocol] in store_protocol.h): generated from
// the kernel's random source, handed to ranks through LOCKSTEP_STORE_TOKEN (hex) or
// LOCKSTEP_STORE_TOKEN_FILE (a file only its owner can read), never on a command line and
// never in a log line or an error message.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace lockstep {
namespace comm {

/// Shortest token accepted: 32 bytes.
constexpr size_t kMinStoreTokenBytes = 32;

/// Fills `size` bytes from getrandom(2) (falling back to /dev/urandom). Throws CommError when
/// neither works.
void secure_random_bytes(uint8_t* out, size_t size);

/// A fresh random token of `size` (>= 32) bytes.
std::string generate_store_token(size_t size = kMinStoreTokenBytes);

/// Lower-case hex of a token, the form LOCKSTEP_STORE_TOKEN and the token file hold.
std::string store_token_to_hex(const std::string& token);

/// Parses a token written in hex (surrounding whitespace ignored). `where` names the source
/// for the error ("LOCKSTEP_STORE_TOKEN"). Throws InvalidArgument when the text is not hex or
/// decodes to fewer than 32 bytes; the message never repeats the text.
std::string store_token_from_hex(const std::string& text, const std::string& where);

/// Reads a hex token from `path`, which must be a regular file of mode 0600 or stricter
/// (no permission for group or others). Throws InvalidArgument naming the path otherwise.
std::string read_store_token_file(const std::string& path);

/// The job token from the environment: LOCKSTEP_STORE_TOKEN (hex) or
/// LOCKSTEP_STORE_TOKEN_FILE; nullopt when neither is set. Throws InvalidArgument when both
/// are set or the value is bad. Read only at the edges (process-group set-up, the launcher).
std::optional<std::string> store_token_from_env();

}  // namespace comm
}  // namespace lockstep
