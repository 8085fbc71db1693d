// The output relay's line cutting (see relay.h).
#include "relay.h"

namespace lockstep {
namespace run {

namespace {

void emit(std::string& out, const std::string& prefix, const std::string& line, char end,
          bool terminal) {
  out += prefix;
  out += line;
  if (terminal) out += "\033[K";
  out += terminal ? end : '\n';
}

}  // namespace

std::string relay(RelayState& state, const std::string& bytes, const std::string& prefix,
                  bool terminal) {
  state.pending += bytes;
  std::string out;
  size_t start = 0;
  for (size_t end; (end = state.pending.find_first_of("\r\n", start)) != std::string::npos;
       start = end + 1) {
    const char c = state.pending[end];
    std::string line = state.pending.substr(start, end - start);
    if (line.empty() && state.after_cr) {
      // "\r\n", or a bar's final '\n' after its last redraw: the line is already out; on a
      // terminal the cursor sits at its start, so move below it.
      if (c == '\n' && terminal) out += '\n';
      if (c == '\n') state.after_cr = false;
      continue;
    }
    if (line.empty() && c == '\r') {  // a bar's first '\r': nothing to show yet
      state.after_cr = true;
      continue;
    }
    state.last_line = line;
    emit(out, prefix, line, c, terminal);
    state.after_cr = c == '\r';
  }
  state.pending.erase(0, start);
  return out;
}

std::string relay_rest(RelayState& state, const std::string& prefix, bool terminal) {
  if (state.pending.empty()) {
    // A bar that never ended its line: move the terminal's cursor below it.
    const bool open_line = state.after_cr && terminal;
    state.after_cr = false;
    return open_line ? "\n" : "";
  }
  std::string out;
  state.last_line = state.pending;
  emit(out, prefix, state.pending, '\n', terminal);
  state.pending.clear();
  state.after_cr = false;
  return out;
}

}  // namespace run
}  // namespace lockstep
