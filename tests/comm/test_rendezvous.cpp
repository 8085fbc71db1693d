// Rendezvous of ranks as threads over an in-process store: disagreeing world sizes, a rank
// claimed twice and a rank that never joins are named. (The collectives themselves are checked
// on every transport by test_conformance.)
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <vector>

#include "lockstep/errors.h"
#include "lockstep/process_group.h"
#include "support/threads.h"

namespace {

TEST(Rendezvous, WorldSizeDisagreementIsNamed) {
  auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
  auto opts = lockstep::ProcessGroupOptions()
                  .rendezvous_timeout(std::chrono::seconds(10))
                  .timeout(std::chrono::seconds(10));
  std::vector<std::string> messages(2);
  lockstep_test::run_ranks(2, [&](int r) {
    try {
      lockstep::new_gloo_group(r, r == 0 ? 2 : 3, store, opts);
      messages[r] = "no error";
    } catch (const lockstep::InvalidArgument& e) {
      messages[r] = e.what();
    }
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(messages[r].find("world sizes disagree"), std::string::npos) << messages[r];
  }
}

TEST(Rendezvous, DuplicateRankIsNamed) {
  auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
  auto opts = lockstep::ProcessGroupOptions().rendezvous_timeout(std::chrono::seconds(10));
  std::vector<std::string> messages(2);
  lockstep_test::run_ranks(2, [&](int r) {
    try {
      lockstep::new_gloo_group(0, 2, store, opts);  // both claim rank 0
      messages[r] = "no error";
    } catch (const lockstep::InvalidArgument& e) {
      messages[r] = e.what();
    }
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(messages[r].find("claimed"), std::string::npos) << messages[r];
  }
}

TEST(Rendezvous, MissingRankTimesOutNamingIt) {
  auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
  auto opts = lockstep::ProcessGroupOptions().rendezvous_timeout(std::chrono::milliseconds(500));
  auto start = std::chrono::steady_clock::now();
  try {
    lockstep::new_gloo_group(0, 3, store, opts);
    FAIL() << "expected TimeoutError";
  } catch (const lockstep::TimeoutError& e) {
    EXPECT_NE(std::string(e.what()).find("rank(s) 1, 2 of 3 never joined"), std::string::npos)
        << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

}  // namespace
