#pragma once
/// \file
/// Logging. Lines carry a `[rank r/w]` prefix once the rank is known; the level comes from
/// `LOCKSTEP_LOG_LEVEL` (trace, debug, info, warn, error, off; default info) or
/// `set_log_level`. Thread-safe.

#include <string>

namespace lockstep {

enum class LogLevel { kTrace, kDebug, kInfo, kWarn, kError, kOff };

/// Parses "trace", "debug", "info", "warn"/"warning", "error", "off" (case-insensitive).
/// Throws InvalidArgument naming the accepted values otherwise.
LogLevel parse_log_level(const std::string& text);

/// Sets the level of lockstep's logger.
void set_log_level(LogLevel level);

/// Current level of lockstep's logger.
LogLevel log_level();

/// Sets the `[rank r/w]` prefix of every following line. Called by init_process_group.
void set_log_rank(int rank, int world_size);

/// Writes one line at `level`.
void log(LogLevel level, const std::string& message);

inline void log_debug(const std::string& m) { log(LogLevel::kDebug, m); }
inline void log_info(const std::string& m) { log(LogLevel::kInfo, m); }
inline void log_warn(const std::string& m) { log(LogLevel::kWarn, m); }
inline void log_error(const std::string& m) { log(LogLevel::kError, m); }

}  // namespace lockstep
