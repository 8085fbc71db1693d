#pragma once
// The message of what a callable throws, for tests that compare errors across ranks.
#include <exception>
#include <functional>
#include <string>

namespace lockstep_test {

/// Runs fn; returns what() of the std::exception it throws, or "" when it returns.
inline std::string message_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace lockstep_test
