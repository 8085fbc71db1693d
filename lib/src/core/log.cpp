// Errors and logging: the bottom of the stack, free of LibTorch headers (fast to compile).
#include <poll.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
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

// Note [lockstep's log lines]
// One line per message on stderr (a program's stdout stays its own), in the layout
//   [HH:MM:SS.mmm] [lockstep] [rank r/w] [level] message
// with the level coloured when stderr is a terminal (and NO_COLOR is unset). Each line is one
// write(2) under a mutex, so lines of different threads never interleave and a line reaches
// the launcher's relay whole. lockstep writes its own lines rather than through spdlog: a
// distribution's spdlog is compiled against the distribution's fmt, which LibTorch 2.x's
// bundled fmt shadows on the include path, and the build then fails (issue 18).
constexpr auto kFullStderrWait = std::chrono::seconds(2);

const char* level_name(LogLevel level) {
  switch (level) {
    case LogLevel::kTrace: return "trace";
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarn: return "warning";
    case LogLevel::kError: return "error";
    case LogLevel::kOff: return "off";
  }
  return "info";
}

const char* level_colour(LogLevel level) {
  switch (level) {
    case LogLevel::kTrace: return "\033[37m";
    case LogLevel::kDebug: return "\033[36m";
    case LogLevel::kInfo: return "\033[32m";
    case LogLevel::kWarn: return "\033[33m\033[1m";
    case LogLevel::kError: return "\033[31m\033[1m";
    case LogLevel::kOff: return "";
  }
  return "";
}

struct Logger {
  std::mutex mutex;
  std::string where;  // "[rank r/w] " once known
  bool colour = false;
  std::atomic<LogLevel> level{LogLevel::kInfo};

  Logger() {
    const char* term = std::getenv("TERM");
    colour = isatty(STDERR_FILENO) == 1 && std::getenv("NO_COLOR") == nullptr &&
             !(term != nullptr && std::strcmp(term, "dumb") == 0);
    if (const char* text = std::getenv(env::kLogLevel)) {
      try {
        level = parse_log_level(text);
      } catch (const InvalidArgument& e) {
        level = LogLevel::kInfo;
        write(LogLevel::kWarn, detail::concat(e.what(), " (falling back to info)"));
      }
    }
  }

  void write(LogLevel at, const std::string& message) {
    timeval now{};
    gettimeofday(&now, nullptr);
    std::tm local{};
    localtime_r(&now.tv_sec, &local);
    char stamp[32];
    std::snprintf(stamp, sizeof(stamp), "[%02d:%02d:%02d.%03d] ", local.tm_hour, local.tm_min,
                  local.tm_sec, static_cast<int>(now.tv_usec / 1000));
    std::string line;
    line.reserve(message.size() + 64);
    line += stamp;
    line += "[lockstep] ";
    std::lock_guard<std::mutex> lock(mutex);
    line += where;
    line += '[';
    if (colour) line += level_colour(at);
    line += level_name(at);
    if (colour) line += "\033[m";
    line += "] ";
    line += message;
    line += '\n';
    const char* p = line.data();
    size_t left = line.size();
    // A non-blocking stderr (a pipe another process made O_NONBLOCK) that is full says EAGAIN:
    // wait until it takes more, up to kFullStderrWait per line, so a slow reader does not lose
    // the rest of the line; a reader gone for that long loses it (logging never blocks the
    // program for good, nor fails it).
    auto deadline = std::chrono::steady_clock::now() + kFullStderrWait;
    while (left > 0) {
      const ssize_t n = ::write(STDERR_FILENO, p, left);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        const auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        if (remaining.count() <= 0) break;
        pollfd out{STDERR_FILENO, POLLOUT, 0};
        ::poll(&out, 1, static_cast<int>(remaining.count()));
        continue;
      }
      if (n <= 0) break;  // stderr closed: logging never fails the program
      p += n;
      left -= static_cast<size_t>(n);
    }
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

void set_log_level(LogLevel level) { instance().level = level; }

LogLevel log_level() { return instance().level; }

void set_log_rank(int rank, int world_size) {
  auto& logger = instance();
  std::lock_guard<std::mutex> lock(logger.mutex);
  logger.where = detail::concat("[rank ", rank, "/", world_size, "] ");
}

void log(LogLevel level, const std::string& message) {
  if (level < instance().level.load() || level == LogLevel::kOff) return;
  instance().write(level, message);
}

}  // namespace lockstep
