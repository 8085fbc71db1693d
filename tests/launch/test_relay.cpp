// lockstep-run's output relay (apps/run/relay.h): lines cut at '\n' and '\r', prefixed, and
// '\r' kept on a terminal or turned into '\n' for files and pipes.
#include <gtest/gtest.h>

#include <string>

#include "relay.h"

using lockstep::run::relay;
using lockstep::run::relay_rest;
using lockstep::run::RelayState;

namespace {
const std::string P = "[rank 1] ";
const std::string K = "\033[K";  // erase to the end of the line, after every terminal line
}  // namespace

TEST(Relay, NewlinesAsBefore) {
  RelayState s;
  EXPECT_EQ(relay(s, "a\nbc", P, /*terminal=*/false), P + "a\n");
  EXPECT_EQ(s.pending, "bc");
  EXPECT_EQ(relay(s, "d\n\n", P, false), P + "bcd\n" + P + "\n");
  EXPECT_EQ(s.last_line, "");
  EXPECT_EQ(relay(s, "tail", P, false), "");
  EXPECT_EQ(relay_rest(s, P, false), P + "tail\n");
  EXPECT_EQ(s.last_line, "tail");
  EXPECT_EQ(relay_rest(s, P, false), "");
}

// The issue: printf("\r...") redraws from one rank came out as one 19,796-character line.
TEST(Relay, CarriageReturnEndsALineWhenItArrives) {
  RelayState s;
  // A bar's redraws: "\r" + text, over and over; each redraw is out once the next begins.
  EXPECT_EQ(relay(s, "\rstep 1/3", P, false), "");
  EXPECT_EQ(relay(s, "\rstep 2/3", P, false), P + "step 1/3\n");
  EXPECT_EQ(relay(s, "\rstep 3/3\n", P, false), P + "step 2/3\n" + P + "step 3/3\n");
  EXPECT_EQ(s.pending, "");
  EXPECT_EQ(s.last_line, "step 3/3");

  // On a terminal the '\r' stays, so the prefixed line is redrawn in place.
  RelayState t;
  EXPECT_EQ(relay(t, "\rA\rB", P, /*terminal=*/true), P + "A" + K + "\r");
  EXPECT_EQ(relay(t, "\rC\n", P, true), P + "B" + K + "\r" + P + "C" + K + "\n");
  // A bar's last redraw then its final "\n" alone (Progress::finish): the cursor moves below.
  EXPECT_EQ(relay(t, "\rD\r", P, true), P + "D" + K + "\r");
  EXPECT_EQ(relay(t, "\n", P, true), "\n");
  EXPECT_EQ(relay(t, "next\n", P, true), P + "next" + K + "\n");
  // A stream that ends with the bar's line open: the cursor moves below it too.
  EXPECT_EQ(relay(t, "E\r", P, true), P + "E" + K + "\r");
  EXPECT_EQ(relay_rest(t, P, true), "\n");
  EXPECT_EQ(relay_rest(t, P, true), "");

  // Many redraws in one read, none lost and none merged.
  RelayState m;
  std::string in, want;
  for (int i = 0; i < 1000; ++i) {
    in += "\r" + std::to_string(i) + "%";
    if (i > 0) want += P + std::to_string(i - 1) + "%\n";
  }
  EXPECT_EQ(relay(m, in, P, false), want);
  EXPECT_EQ(m.pending, "999%");
}

TEST(Relay, CrLfIsOneEndOfLine) {
  RelayState s;
  EXPECT_EQ(relay(s, "dos\r\nline\r", P, false), P + "dos\n" + P + "line\n");
  // "\r" at the end of one read and "\n" at the start of the next: still one end of line.
  EXPECT_EQ(relay(s, "\nafter\n", P, false), P + "after\n");
  RelayState t;
  EXPECT_EQ(relay(t, "dos\r", P, true), P + "dos" + K + "\r");
  EXPECT_EQ(relay(t, "\n", P, true), "\n");
  // An empty line after a "\r\n" is still a line.
  EXPECT_EQ(relay(s, "\n", P, false), P + "\n");
}
