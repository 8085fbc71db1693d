#pragma once
/// \file
/// lockstep's exception hierarchy and its two check macros.
///
/// Every error lockstep raises derives from `lockstep::Error`, so one `catch` handles all of
/// them; the subclasses say what the caller can do about it:
///   - `InvalidArgument`: the caller passed something wrong; fix the call or the input.
///   - `TimeoutError`:    a peer or the store did not answer in time; check the named rank.
///   - `CommError`:       a collective or the rendezvous failed (peer died, socket closed);
///                        the process group is unusable, rebuild it or restart the job.
///   - `StateError`:      an API was used in the wrong state (e.g. backward twice in no_sync).
///   - `NonFiniteError`:  training produced NaN or Inf (DDPOptions::nonfinite kAbort); the
///                        message names the step, the rank and the parameter where it began.
///   - `InternalError`:   a broken invariant inside lockstep: a bug, please report it.
/// Nothing in the library calls abort() or exit(): applications map errors to exit codes.

#include <sstream>
#include <stdexcept>
#include <string>

namespace lockstep {

/// Base of every exception lockstep throws.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

/// A caller-supplied value is wrong. The message says what was expected, what was found,
/// where, and what to do.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// A bounded wait expired (rendezvous, collective, store key).
class TimeoutError : public Error {
 public:
  using Error::Error;
};

/// Communication failed: a peer closed its connection, died, or sent something unexpected.
class CommError : public Error {
 public:
  using Error::Error;
};

/// An API was used in a state that does not allow it.
class StateError : public Error {
 public:
  using Error::Error;
};

/// Gradients became NaN or Inf and the policy asked to stop (DDPOptions::nonfinite).
class NonFiniteError : public Error {
 public:
  using Error::Error;
};

/// A lockstep invariant was broken: this is a bug in lockstep.
class InternalError : public Error {
 public:
  using Error::Error;
};

namespace detail {

inline void str_append(std::ostringstream&) {}
template <typename T, typename... Rest>
void str_append(std::ostringstream& os, const T& value, const Rest&... rest) {
  os << value;
  str_append(os, rest...);
}

/// Concatenates its arguments with operator<< (like c10::str).
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  str_append(os, args...);
  return os.str();
}

[[noreturn]] void throw_internal(const char* file, int line, const char* condition,
                                 const std::string& message);

}  // namespace detail
}  // namespace lockstep

/// Throws `ExceptionType` with the concatenated message when `cond` is false.
#define LOCKSTEP_CHECK_T(ExceptionType, cond, ...)                   \
  do {                                                               \
    if (!(cond)) {                                                   \
      throw ExceptionType(::lockstep::detail::concat(__VA_ARGS__));     \
    }                                                                \
  } while (false)

/// User-error check: throws `lockstep::InvalidArgument`. Write the message as
/// "Expected X, but got Y (where). What to do."
#define LOCKSTEP_CHECK(cond, ...) LOCKSTEP_CHECK_T(::lockstep::InvalidArgument, cond, __VA_ARGS__)

/// State check: throws `lockstep::StateError`.
#define LOCKSTEP_CHECK_STATE(cond, ...) LOCKSTEP_CHECK_T(::lockstep::StateError, cond, __VA_ARGS__)

/// Internal invariant: throws `lockstep::InternalError` naming the file, line and condition.
/// Never aborts.
#define LOCKSTEP_ASSERT(cond, ...)                                                      \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      ::lockstep::detail::throw_internal(__FILE__, __LINE__, #cond,                     \
                                         ::lockstep::detail::concat("", ##__VA_ARGS__));      \
    }                                                                                   \
  } while (false)
