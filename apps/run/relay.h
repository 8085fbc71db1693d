#pragma once
// How lockstep-run forwards a worker's output: cut into lines, each with a "[rank r] " prefix.
// Pure (bytes in, bytes out), so tests/launch/test_relay.cpp covers it without processes.
//
// Note [Carriage returns in the relay]
// A progress bar redraws one line with '\r' and ends it with '\n' only when done. Cut at '\n'
// alone, a bar (or any printf("\r...")) reached the console as one line of every redraw, once
// the run ended or 64 KiB had piled up (an issue showed one of 19,796 characters). So '\r'
// ends a line too. When the launcher's stream is a terminal the '\r' is kept: the prefixed
// line is redrawn in place, and every line ends with "\033[K" (erase to the end of the line)
// so that a shorter line, or another rank's line written over a bar, leaves no remnant. When
// it is a file or a pipe, '\r' becomes '\n': one line per redraw, readable in a log. "\r\n"
// is one end of line. A redraw shows once the next one begins (its '\r' ends the previous
// one), one redraw late; the last shows at the bar's final '\n'. The per-rank log files
// (--redirects, --tee) get the worker's bytes unchanged.

#include <string>

namespace lockstep {
namespace run {

/// What the relay of one worker stream keeps between reads.
struct RelayState {
  std::string pending;    ///< the partial line (no end of line yet)
  std::string last_line;  ///< the last complete line, for the verdict's summary
  bool after_cr = false;  ///< the last line ended with '\r' (so a '\n' next completes "\r\n")
};

/// Appends `bytes` of a worker's output and returns what to forward now: every line completed
/// by '\n' or '\r', with `prefix`, as Note [Carriage returns in the relay] says (`terminal`:
/// the launcher's stream is a terminal). The rest waits in `state.pending`.
std::string relay(RelayState& state, const std::string& bytes, const std::string& prefix,
                  bool terminal);

/// The pending partial line as a whole line with `prefix` and '\n' (at the end of the stream,
/// or when it grew too long to hold); "" when there is none.
std::string relay_rest(RelayState& state, const std::string& prefix, bool terminal);

}  // namespace run
}  // namespace lockstep
