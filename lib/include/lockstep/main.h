#pragma once
/// \file
/// `lockstep::run_main`: the body of a worker's `main()` that turns an uncaught error into a
/// logged line, an error file for the launcher's summary, and a documented exit code.
///
///     int main(int argc, char** argv) {
///       return lockstep::run_main([&] { return train(argc, argv); });
///     }
///
/// On a `lockstep::Error` or any `std::exception` escaping `body`, run_main
///   1. logs "uncaught <type>: <message>" at error level (with the `[rank r/w]` prefix),
///   2. writes the error as JSON to `$LOCKSTEP_ERROR_FILE` (set by lockstep-run):
///      `{"message": ..., "type": ..., "rank": r, "pid": p, "time": unix-seconds}`, and to
///      `$TORCHELASTIC_ERROR_FILE` (set by torchrun) in torchelastic's own format, so that
///      torchrun's failure summary shows the message too,
///   3. returns `kExitUncaughtError`.
/// It never calls exit() or abort(): the caller returns its result from main().

#include <functional>
#include <string>

namespace lockstep {

/// Exit code run_main returns when `body` threw (torchrun's convention: 1).
constexpr int kExitUncaughtError = 1;

/// Runs `body` and returns its result; on an exception, reports it (see the file comment) and
/// returns kExitUncaughtError. Exceptions that are not std::exception are reported as
/// "unknown exception".
int run_main(const std::function<int()>& body);

/// Writes `message` (of exception type `type`) to the error file(s) named by the environment,
/// as run_main does. Returns false (and logs why) when a file could not be written; does
/// nothing and returns true when neither variable is set. For programs with their own handler.
bool write_error_file(const std::string& type, const std::string& message);

}  // namespace lockstep
