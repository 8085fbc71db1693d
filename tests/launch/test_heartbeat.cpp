// Heartbeats between launchers (apps/run/heartbeat.h): when another node counts as hung.
#include <gtest/gtest.h>

#include "heartbeat.h"

using lockstep::run::heartbeat_interval;
using lockstep::run::HeartbeatWatch;

TEST(Heartbeat, ANodeIsHungOnlyAfterTheTimeoutWithoutAChange) {
  HeartbeatWatch w(/*nnodes=*/3, /*self=*/0, /*timeout=*/10, /*start=*/100);
  EXPECT_FALSE(w.hung(110));  // exactly the timeout: not yet
  EXPECT_FALSE(w.hung(105));
  for (double t = 101; t <= 140; t += 2) {
    w.observe(1, static_cast<int64_t>(t), t);  // node 1 beats
    w.observe(2, 7, t);                        // node 2's counter is stuck at 7
  }
  // Node 2 was first read at 101 (a change from nothing), then never moved.
  auto h = w.hung(139);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->node, 2);
  EXPECT_DOUBLE_EQ(h->seconds, 38);
  EXPECT_FALSE(w.hung(111)) << "node 2 changed at 101: 10 s later it is not hung yet";
  // It beats again: no longer hung.
  w.observe(2, 8, 140);
  EXPECT_FALSE(w.hung(141));
}

TEST(Heartbeat, ANodeThatNeverBeatsIsHungFromTheStart) {
  HeartbeatWatch w(2, /*self=*/1, 5, 0);
  auto h = w.hung(5.5);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->node, 0);
  EXPECT_DOUBLE_EQ(h->seconds, 5.5);
}

TEST(Heartbeat, TheLongestSilenceIsNamedAndSelfAndStrangersAreIgnored) {
  HeartbeatWatch w(4, /*self=*/2, 5, 0);
  w.observe(1, 1, 3);
  w.observe(3, 1, 1);
  w.observe(2, 1, 0);   // itself: ignored
  w.observe(9, 1, 50);  // no such node: ignored
  w.observe(-1, 1, 50);
  auto h = w.hung(20);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->node, 0) << "node 0 never beat: silent 20 s, the longest";
  w.observe(0, 1, 20);
  h = w.hung(20);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->node, 3);
  EXPECT_DOUBLE_EQ(h->seconds, 19);
  // One node alone has nobody to watch.
  EXPECT_FALSE(HeartbeatWatch(1, 0, 5, 0).hung(1000));
}

TEST(Heartbeat, IntervalIsAFifthOfTheTimeoutButNotBelowTheMonitorInterval) {
  EXPECT_DOUBLE_EQ(heartbeat_interval(30, 0.1), 6);
  EXPECT_DOUBLE_EQ(heartbeat_interval(0.2, 0.1), 0.1);
}

// An elastic round without node 2 (Note [Elastic membership]): node 2 never beats and is
// never called hung; node 1, watched, is.
TEST(Heartbeat, NodesLeftOutOfTheRoundAreNotWatched) {
  HeartbeatWatch w(3, /*self=*/0, 5, 0);
  w.leave_out(2);
  w.observe(1, 1, 1);
  EXPECT_FALSE(w.hung(5.5).has_value());
  auto s = w.hung(7);
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->node, 1);
}
