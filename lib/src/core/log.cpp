// Errors and logging: the bottom of the stack, free of LibTorch headers (fast to compile).
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <mutex>

#include "lockstep/env_vars.h"
#include "lockstep/errors.h"
#include "lockstep/log.h"

namespace lockstep {
namespace detail {

void throw_internal(const char* file, int line, const char* condition, const std::string& message) {
  throw InternalError(concat("lockstep internal error at ", file, ":", line, ": expected '",
                          condition, "' to hold", message.empty() ? "" : ": ", message,
                          ". This is a bug in lockstep; please report it with this message."));
}

}  // namespace detail

namespace {

spdlog::level::level_enum to_spdlog(LogLevel level) {
  switch (level) {
    case LogLevel::kTrace: return spdlog::level::trace;
    case LogLevel::kDebug: return spdlog::level::debug;
    case LogLevel::kInfo: return spdlog::level::info;
    case LogLevel::kWarn: return spdlog::level::warn;
    case LogLevel::kError: return spdlog::level::err;
    case LogLevel::kOff: return spdlog::level::off;
  }
  return spdlog::level::info;
}

struct Logger {
  std::shared_ptr<spdlog::logger> logger;
  std::atomic<LogLevel> level{LogLevel::kInfo};

  Logger() {
    // stderr, so that a program's stdout stays its own.
    logger = std::make_shared<spdlog::logger>(
        "lockstep", std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
    set_rank_pattern("");
    if (const char* text = std::getenv(env::kLogLevel)) {
      try {
        level = parse_log_level(text);
      } catch (const InvalidArgument& e) {
        level = LogLevel::kInfo;
        logger->warn("{} (falling back to info)", e.what());
      }
    }
    logger->set_level(to_spdlog(level));
  }

  void set_rank_pattern(const std::string& where) {
    logger->set_pattern("[%H:%M:%S.%e] [lockstep] " + where + "[%^%l%$] %v");
  }
};

Logger& instance() {
  static Logger logger;  // thread-safe initialisation
  return logger;
}

}  // namespace

LogLevel parse_log_level(const std::string& text) {
  std::string t = text;
  std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return std::tolower(c); });
  if (t == "trace") return LogLevel::kTrace;
  if (t == "debug") return LogLevel::kDebug;
  if (t == "info") return LogLevel::kInfo;
  if (t == "warn" || t == "warning") return LogLevel::kWarn;
  if (t == "error") return LogLevel::kError;
  if (t == "off" || t == "none") return LogLevel::kOff;
  throw InvalidArgument(detail::concat("Expected ", env::kLogLevel,
                                    " to be one of trace, debug, info, warn, error, off, but got '",
                                    text, "'."));
}

void set_log_level(LogLevel level) {
  instance().level = level;
  instance().logger->set_level(to_spdlog(level));
}

LogLevel log_level() { return instance().level; }

void set_log_rank(int rank, int world_size) {
  instance().set_rank_pattern(detail::concat("[rank ", rank, "/", world_size, "] "));
}

void log(LogLevel level, const std::string& message) {
  if (level < instance().level.load() || level == LogLevel::kOff) return;
  instance().logger->log(to_spdlog(level), message);
}

}  // namespace lockstep
