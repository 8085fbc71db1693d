#pragma once
// Reading the exceptions that c10d and Gloo throw, for lockstep's own messages. Internal.

#include <algorithm>
#include <cctype>
#include <exception>
#include <string>

namespace lockstep {
namespace comm {

/// The first line of an exception's message without a trailing full stop, for embedding in
/// one of ours (c10d appends C++ backtraces after the first line).
inline std::string brief(const std::exception& e) {
  std::string what = e.what();
  what = what.substr(0, what.find('\n'));
  while (!what.empty() && (what.back() == '.' || what.back() == ' ')) what.pop_back();
  return what;
}

/// True when a foreign message reports a timeout.
inline bool looks_like_timeout(std::string what) {
  std::transform(what.begin(), what.end(), what.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return what.find("timed out") != std::string::npos || what.find("timeout") != std::string::npos;
}

}  // namespace comm
}  // namespace lockstep
