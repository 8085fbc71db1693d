// lockstep's log lines (Note [lockstep's log lines] in lib/src/core/log.cpp): the layout, the
// rank prefix, level filtering, no colour when stderr is not a terminal, whole lines from many
// threads at once, and the level names LOCKSTEP_LOG_LEVEL accepts.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "lockstep/errors.h"
#include "lockstep/log.h"

namespace {

// Runs `body` with stderr redirected to a file and returns what it wrote.
template <typename F>
std::string capture_stderr(F body) {
  char path[] = "/tmp/lockstep-test-log-XXXXXX";
  const int fd = mkstemp(path);
  EXPECT_GE(fd, 0);
  std::fflush(stderr);
  const int saved = dup(STDERR_FILENO);
  dup2(fd, STDERR_FILENO);
  body();
  std::fflush(stderr);
  dup2(saved, STDERR_FILENO);
  close(saved);
  close(fd);
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  unlink(path);
  return ss.str();
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::stringstream ss(text);
  for (std::string line; std::getline(ss, line);) lines.push_back(line);
  return lines;
}

class Log : public ::testing::Test {
 protected:
  void SetUp() override { saved_ = lockstep::log_level(); }
  void TearDown() override { lockstep::set_log_level(saved_); }
  lockstep::LogLevel saved_ = lockstep::LogLevel::kInfo;
};

TEST_F(Log, LineLayoutRankPrefixAndLevelNames) {
  lockstep::set_log_level(lockstep::LogLevel::kInfo);
  lockstep::set_log_rank(1, 4);
  const auto out = capture_stderr([] {
    lockstep::log_info("ready");
    lockstep::log_warn("slow peer");
    lockstep::log_error("lost peer");
  });
  const auto lines = lines_of(out);
  ASSERT_EQ(lines.size(), 3u) << out;
  const std::regex layout(
      R"(\[\d\d:\d\d:\d\d\.\d\d\d\] \[lockstep\] \[rank 1/4\] \[(info|warning|error)\] .*)");
  for (const auto& line : lines) EXPECT_TRUE(std::regex_match(line, layout)) << line;
  EXPECT_NE(lines[0].find("[info] ready"), std::string::npos) << lines[0];
  EXPECT_NE(lines[1].find("[warning] slow peer"), std::string::npos) << lines[1];
  EXPECT_NE(lines[2].find("[error] lost peer"), std::string::npos) << lines[2];
  // stderr is a file here: no colour escapes.
  EXPECT_EQ(out.find('\033'), std::string::npos) << out;
}

TEST_F(Log, LevelFiltersLowerLevelsAndOffSilencesAll) {
  lockstep::set_log_level(lockstep::LogLevel::kWarn);
  auto out = capture_stderr([] {
    lockstep::log_debug("hidden debug");
    lockstep::log_info("hidden info");
    lockstep::log_warn("shown");
  });
  EXPECT_EQ(lines_of(out).size(), 1u) << out;
  EXPECT_NE(out.find("shown"), std::string::npos);
  lockstep::set_log_level(lockstep::LogLevel::kOff);
  out = capture_stderr([] { lockstep::log_error("nothing"); });
  EXPECT_TRUE(out.empty()) << out;
  EXPECT_EQ(lockstep::log_level(), lockstep::LogLevel::kOff);
}

TEST_F(Log, LinesFromManyThreadsStayWhole) {
  lockstep::set_log_level(lockstep::LogLevel::kInfo);
  const int threads = 4, per_thread = 200;
  const auto out = capture_stderr([&] {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([t] {
        for (int i = 0; i < per_thread; ++i) {
          lockstep::log_info("thread " + std::to_string(t) + " line " + std::to_string(i) + " " +
                             std::string(200, 'x'));
        }
      });
    }
    for (auto& th : pool) th.join();
  });
  const auto lines = lines_of(out);
  ASSERT_EQ(lines.size(), static_cast<size_t>(threads * per_thread));
  const std::regex whole(R"(\[[0-9:.]+\] \[lockstep\] (\[rank \d+/\d+\] )?\[info\] thread \d line \d+ x{200})");
  for (const auto& line : lines) ASSERT_TRUE(std::regex_match(line, whole)) << line;
}

// A non-blocking stderr pipe that is full (EAGAIN) gets the whole line once its reader drains
// it: the writer waits for the pipe instead of dropping the rest of the line.
TEST_F(Log, FullNonBlockingStderrLosesNothingOnceTheReaderDrains) {
  lockstep::set_log_level(lockstep::LogLevel::kInfo);
  lockstep::set_log_rank(0, 1);
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  ASSERT_EQ(fcntl(fds[1], F_SETFL, fcntl(fds[1], F_GETFL) | O_NONBLOCK), 0);
  std::string filler(4096, 'x');
  size_t prefilled = 0;
  while (true) {  // fill the pipe until it says EAGAIN
    const ssize_t n = write(fds[1], filler.data(), filler.size());
    if (n <= 0) break;
    prefilled += static_cast<size_t>(n);
  }
  ASSERT_EQ(errno, EAGAIN);
  const std::string message(200000, 'm');  // several pipe buffers' worth
  std::string received;
  std::thread reader([&] {  // drains until the log line's newline arrives
    char buffer[65536];
    while (received.size() < prefilled || received.find('\n', prefilled) == std::string::npos) {
      const ssize_t n = read(fds[0], buffer, sizeof(buffer));
      if (n <= 0) break;
      received.append(buffer, static_cast<size_t>(n));
    }
  });
  std::fflush(stderr);
  const int saved = dup(STDERR_FILENO);
  dup2(fds[1], STDERR_FILENO);
  lockstep::log_info(message);
  dup2(saved, STDERR_FILENO);
  close(saved);
  close(fds[1]);
  reader.join();
  close(fds[0]);
  ASSERT_GE(received.size(), prefilled);
  const std::string line = received.substr(prefilled);
  EXPECT_NE(line.find("[info] " + message + "\n"), std::string::npos)
      << "got " << line.size() << " bytes of the line";
}

TEST(LogLevel, ParsesEveryNameAndRejectsOthersNamingTheChoices) {
  using lockstep::LogLevel;
  EXPECT_EQ(lockstep::parse_log_level("TRACE"), LogLevel::kTrace);
  EXPECT_EQ(lockstep::parse_log_level("debug"), LogLevel::kDebug);
  EXPECT_EQ(lockstep::parse_log_level("Info"), LogLevel::kInfo);
  EXPECT_EQ(lockstep::parse_log_level("warn"), LogLevel::kWarn);
  EXPECT_EQ(lockstep::parse_log_level("warning"), LogLevel::kWarn);
  EXPECT_EQ(lockstep::parse_log_level("error"), LogLevel::kError);
  EXPECT_EQ(lockstep::parse_log_level("none"), LogLevel::kOff);
  try {
    lockstep::parse_log_level("verbose");
    ADD_FAILURE() << "no error for 'verbose'";
  } catch (const lockstep::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("LOCKSTEP_LOG_LEVEL to be one of trace, debug, info, "
                                         "warn, error, off, but got 'verbose'"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
