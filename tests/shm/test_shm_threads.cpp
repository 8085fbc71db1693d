// Shared-memory and hierarchical groups with ranks as threads, what only they have: the
// in-place shared-buffer path (bitwise equal to the copying path, world sizes 1..4, counts 0,
// 1, odd and several MiB, float32/float64/int64/bfloat16/float16), transport selection,
// mismatched collectives, a departed rank, a stalled rank and refused dtypes. Every collective
// on both (exact, bitwise in the fixed order, every dtype and count) is in
// tests/comm/test_conformance.cpp.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <chrono>
#include <future>

#include "adapter/torch_adapter.h"
#include "comm/nccl_group.h"
#include "comm/shm_channel.h"
#include "comm/shm_segment.h"
#include "lockstep/errors.h"
#include "lockstep/process_group.h"
#include "shm/shm_support.h"
#include "support/threads.h"

using lockstep::ProcessGroupOptions;
using lockstep::ProcessGroupPtr;
using lockstep::ReduceOp;
using lockstep_test::run_ranks;
using shm_test::bitwise_equal;

namespace {

const std::vector<int64_t> kCounts = {0, 1, 1001, 3 * 512 * 1024 + 7};  // last: ~6 MiB f32
const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kLong, at::kBFloat16,
                                             at::kHalf};

std::string unique_job(const char* tag) {
  static std::atomic<int> n{0};
  return std::string("shmtest-") + tag + "-" + std::to_string(getpid()) + "-" +
         std::to_string(n++);
}

ProcessGroupOptions test_options(const std::string& job) {
  return ProcessGroupOptions()
      .timeout(std::chrono::seconds(20))
      .rendezvous_timeout(std::chrono::seconds(20))
      .job_id(job);
}

// Runs fn(pg) on `world` threads, each with a shm group over one in-process store.
void with_shm(int world, const std::function<void(const ProcessGroupPtr&)>& fn,
              const ProcessGroupOptions& options) {
  auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
  run_ranks(world, [&](int r) { fn(lockstep::new_shm_group(r, world, store, options)); });
}

class ShmWorld : public ::testing::TestWithParam<int> {};

// Note [Shared reduction buffers]: new_buffer memory is reduced in place, with the same bits
// as the copying path (and so the same fixed order) on every rank, reusable step after step.
TEST_P(ShmWorld, SharedBufferAllreduceInPlaceMatchesCopyingPathBitwise) {
  const int world = GetParam();
  auto job = unique_job("buf");
  with_shm(world, [&](const ProcessGroupPtr& pg) {
    for (auto dtype : kDtypes) {
      for (int64_t n : kCounts) {
        auto buf = pg->new_buffer(n, at::TensorOptions().dtype(dtype));
        ASSERT_EQ(buf.numel(), n);
        ASSERT_EQ(buf.scalar_type(), dtype);
        ASSERT_TRUE(at::all(buf == 0).item<bool>()) << "new_buffer must be zero-filled";
        // (An empty tensor has no address: it takes the copying path, which moves nothing.)
        EXPECT_EQ(pg->transport_for(buf), n > 0 ? "shm (in place)" : "shm");
        EXPECT_EQ(pg->transport_for(buf.clone()), "shm");
        std::vector<at::Tensor> all;
        for (int r = 0; r < world; ++r) all.push_back(shm_test::random_input(r, n, dtype));
        for (auto op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax}) {
          if (op == ReduceOp::kAvg && dtype == at::kLong) continue;
          for (int round = 0; round < 2; ++round) {  // the buffer is reused
            buf.copy_(all[pg->rank()]);
            pg->allreduce(buf, op)->wait();
            auto copied = all[pg->rank()].clone();
            pg->allreduce(copied, op)->wait();
            ASSERT_TRUE(bitwise_equal(buf, copied))
                << pg->where() << " op " << lockstep::to_string(op) << " dtype " << dtype
                << " n " << n << " round " << round;
            ASSERT_TRUE(bitwise_equal(buf, shm_test::ordered_reference(all, op)))
                << pg->where() << " dtype " << dtype << " n " << n;
          }
        }
      }
    }
    // A view of a buffer is not the buffer: it takes the copying path, with the same result.
    auto buf = pg->new_buffer(100, at::TensorOptions().dtype(at::kFloat));
    buf.fill_(pg->rank() + 1);
    auto part = buf.narrow(0, 10, 50);
    EXPECT_EQ(pg->transport_for(part), "shm");
    pg->allreduce(part)->wait();
    EXPECT_EQ(buf[10].item<float>(), world * (world + 1) / 2.0f);
    EXPECT_EQ(buf[0].item<float>(), pg->rank() + 1.0f);
  }, test_options(job));
  // Every buffer's object was unlinked once all ranks mapped it.
  EXPECT_TRUE(shm_test::shm_entries(job).empty());
}

TEST(ShmSharedBuffer, OutlivesTheGroupAndMismatchedPathsAreNamed) {
  at::Tensor survivor;
  std::vector<std::string> messages(2);
  with_shm(2, [&](const ProcessGroupPtr& pg) {
    auto buf = pg->new_buffer(1000, at::TensorOptions().dtype(at::kFloat));
    if (pg->rank() == 0) survivor = buf;
    // Rank 0 reduces its buffer, rank 1 an ordinary tensor: named, not a silent mix-up.
    auto other = at::ones({1000});
    try {
      pg->allreduce(pg->rank() == 0 ? buf : other)->wait();
      messages[pg->rank()] = "no error";
    } catch (const lockstep::CommError& e) {
      messages[pg->rank()] = e.what();
    }
  }, test_options(unique_job("bufmix")));
  EXPECT_NE(messages[0].find("rank 1 issued allreduce #1"), std::string::npos) << messages[0];
  EXPECT_NE(messages[1].find("rank 0 issued allreduce (shared buffer) #1"), std::string::npos)
      << messages[1];
  // The tensor keeps its mapping after the group is gone.
  survivor.fill_(3);
  EXPECT_EQ(survivor.sum().item<float>(), 3000.0f);
}

// Note [Shared reduction buffers]: every rank writes its reduced slice into its peers'
// regions, so ranks that name different buffers of the same shape must fail before anything
// is written, not reduce into a buffer the peer is not reducing (which autograd may be
// filling at that moment).
TEST(ShmSharedBuffer, DifferentBuffersOfTheSameShapeFailBeforeAnythingIsWritten) {
  std::vector<std::string> messages(2);
  std::vector<bool> untouched(2, false);
  with_shm(2, [&](const ProcessGroupPtr& pg) {
    auto first = pg->new_buffer(1000, at::TensorOptions().dtype(at::kFloat));
    auto second = pg->new_buffer(1000, at::TensorOptions().dtype(at::kFloat));
    first.fill_(pg->rank() + 1);
    second.fill_(10 * (pg->rank() + 1));
    try {
      pg->allreduce(pg->rank() == 0 ? first : second)->wait();
      messages[pg->rank()] = "no error";
    } catch (const lockstep::CommError& e) {
      messages[pg->rank()] = e.what();
    }
    untouched[pg->rank()] = at::all(first == pg->rank() + 1).item<bool>() &&
                            at::all(second == 10 * (pg->rank() + 1)).item<bool>();
  }, test_options(unique_job("bufpair")));
  EXPECT_NE(messages[0].find("shared buffer #1) via shm: rank 1 issued allreduce (shared "
                             "buffer) #1 (1000 x Float, arg 0, shared buffer #2) instead"),
            std::string::npos)
      << messages[0];
  EXPECT_NE(messages[1].find("rank 0 issued allreduce (shared buffer) #1 (1000 x Float, arg 0, "
                             "shared buffer #1) instead"),
            std::string::npos)
      << messages[1];
  EXPECT_TRUE(untouched[0]) << "rank 0's regions changed";
  EXPECT_TRUE(untouched[1]) << "rank 1's regions changed";
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, ShmWorld, ::testing::Values(1, 2, 3, 4));

TEST(ShmSelection, TransportOptionEnvironmentAndAuto) {
  auto pick = [](const std::string& transport, const lockstep::EnvMap& env,
                 const std::vector<std::string>& host_ids) {
    const int world = static_cast<int>(host_ids.size());
    auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
    std::vector<std::string> backends(world);
    auto job = unique_job("sel");
    run_ranks(world, [&](int r) {
      auto opts = test_options(job)
                      .store(store)
                      .rank(r)
                      .world_size(world)
                      .transport(transport)
                      .environment(env)
                      .host_id(host_ids[r]);
      auto pg = lockstep::init_process_group(opts);
      backends[r] = pg->backend();
      // Keep the group until every rank has connected: a leader that destroys its Gloo
      // group early closes sockets a slower leader is still connecting to.
      pg->barrier()->wait();
    });
    for (int r = 1; r < world; ++r) EXPECT_EQ(backends[r], backends[0]);
    return backends[0];
  };
  lockstep::EnvMap none{{"LOCKSTEP_LOG_LEVEL", "warn"}};
  EXPECT_EQ(pick("", none, {"h", "h"}), "shm");                 // auto, one host
  EXPECT_EQ(pick("auto", none, {"h", "g"}), "gloo");            // nobody shares a host
  EXPECT_EQ(pick("", none, {"h", "h", "g"}), "hier");           // some share
  EXPECT_EQ(pick("shm", none, {"h", "g"}), "hier");             // forced
  EXPECT_EQ(pick("gloo", none, {"h", "h"}), "gloo");            // forced
  EXPECT_EQ(pick("", {{"LOCKSTEP_TRANSPORT", "gloo"}}, {"h", "h"}), "gloo");
  EXPECT_EQ(pick("shm", {{"LOCKSTEP_TRANSPORT", "gloo"}}, {"h", "h"}), "shm");  // option wins
  auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
  try {
    lockstep::init_process_group(
        test_options("bad").store(store).rank(0).world_size(1).transport("ucc").environment(none));
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("gloo, shm, nccl or auto, but got 'ucc'"),
              std::string::npos) << e.what();
  }
  if (lockstep::adapter::nccl_compiled()) return;  // the rest is the CPU-only LibTorch's case
  // Asked for NCCL on a LibTorch without it: refused at once, before any rendezvous, naming
  // the LibTorch and what to do.
  try {
    lockstep::init_process_group(test_options("nonccl").store(store).rank(0).world_size(2)
                                     .transport("nccl").environment(none));
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const lockstep::InvalidArgument& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("[rank 0/2] LOCKSTEP_TRANSPORT=nccl: this lockstep has no NCCL backend"),
              std::string::npos) << m;
    EXPECT_NE(m.find("LOCKSTEP_TRANSPORT=auto"), std::string::npos) << m;
  }
  // "auto" without NCCL is the plain host group: CUDA tensors stage through host memory.
  EXPECT_EQ(pick("auto", none, {"h", "h"}), "shm");
}

// Note [CUDA routing]: the route of CUDA tensors is a pure function of every rank's device.
TEST(CudaRoute, AutoTakesNcclOnlyWhenEveryRankHasItsOwnGpu) {
  using lockstep::comm::plan_cuda_route;
  const std::string a = "hostA/boot1", b = "hostB/boot2";
  auto one_each = plan_cuda_route("auto", true, {{a, 0}, {a, 1}, {b, 0}, {b, 1}}, "[rank 0/4]");
  EXPECT_TRUE(one_each.nccl) << one_each.reason;
  EXPECT_TRUE(plan_cuda_route("auto", true, {{a, 0}}, "[rank 0/1]").nccl);  // world 1

  auto shared = plan_cuda_route("auto", true, {{a, 0}, {a, 0}}, "[rank 0/2]");
  EXPECT_FALSE(shared.nccl);
  EXPECT_EQ(shared.reason, "ranks 0 and 1 both use cuda:0 on hostA");

  // Each rank with its own CUDA_VISIBLE_DEVICES sees its GPU as cuda:0: the bus ids tell.
  EXPECT_TRUE(plan_cuda_route("auto", true, {{a, 0, "0000:17:00.0"}, {a, 0, "0000:65:00.0"}},
                              "[rank 0/2]").nccl);
  auto same_bus = plan_cuda_route("auto", true, {{a, 0, "0000:17:00.0"}, {a, 1, "0000:17:00.0"}},
                                  "[rank 0/2]");
  EXPECT_FALSE(same_bus.nccl);
  EXPECT_EQ(same_bus.reason, "ranks 0 and 1 both use cuda:1 on hostA (GPU 0000:17:00.0)");

  auto mixed = plan_cuda_route("auto", true, {{a, 0}, {a, -1}}, "[rank 0/2]");
  EXPECT_FALSE(mixed.nccl);
  EXPECT_EQ(mixed.reason, "rank 1 passed a non-CUDA tensor");

  auto without = plan_cuda_route("auto", false, {{a, 0}, {b, 0}}, "[rank 0/2]");
  EXPECT_FALSE(without.nccl);
  EXPECT_EQ(without.reason, "lockstep was built without NCCL");
}

TEST(CudaRoute, ForcedNcclNamesWhatStandsInItsWay) {
  using lockstep::comm::plan_cuda_route;
  const std::string a = "hostA/boot1";
  EXPECT_TRUE(plan_cuda_route("nccl", true, {{a, 0}, {a, 1}}, "[rank 1/2]").nccl);
  auto message = [&](bool compiled, const std::vector<lockstep::comm::CudaPlacement>& ranks) {
    try {
      plan_cuda_route("nccl", compiled, ranks, "[rank 1/3]");
    } catch (const lockstep::InvalidArgument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  auto shared = message(true, {{a, 0}, {a, 1}, {a, 1}});
  EXPECT_NE(shared.find("[rank 1/3] LOCKSTEP_TRANSPORT=nccl: ranks 1 and 2 both use cuda:1 on "
                        "hostA, and NCCL refuses two ranks on one GPU"), std::string::npos)
      << shared;
  EXPECT_NE(shared.find("--nproc-per-node gpu"), std::string::npos) << shared;
  auto cpu = message(true, {{a, 0}, {a, -1}, {a, 1}});
  EXPECT_NE(cpu.find("rank 1 passed a tensor that is not on CUDA"), std::string::npos) << cpu;
  auto absent = message(false, {{a, 0}, {a, 1}, {a, 2}});
  EXPECT_NE(absent.find("this lockstep has no NCCL backend (LibTorch "), std::string::npos)
      << absent;
  EXPECT_THROW(plan_cuda_route("gloo", true, {}, "[rank 0/1]"), lockstep::InvalidArgument);
}

TEST(ShmFaults, MismatchedCollectivesAreNamed) {
  std::vector<std::string> messages(2);
  with_shm(2, [&](const ProcessGroupPtr& pg) {
    auto t = at::ones({10});
    try {
      (pg->rank() == 0 ? pg->allreduce(t) : pg->broadcast(t, 0))->wait();
      messages[pg->rank()] = "no error";
    } catch (const lockstep::CommError& e) {
      messages[pg->rank()] = e.what();
    }
    // The group is unusable afterwards: later collectives fail at once with the same error.
    EXPECT_THROW(pg->barrier()->wait(), lockstep::CommError);
  }, test_options(unique_job("mismatch")));
  EXPECT_NE(messages[0].find("rank 1 issued broadcast #1"), std::string::npos) << messages[0];
  EXPECT_NE(messages[1].find("rank 0 issued allreduce #1"), std::string::npos) << messages[1];
}

TEST(ShmFaults, DepartedRankIsNamedQuickly) {
  std::string message;
  double seconds = 0;
  with_shm(3, [&](const ProcessGroupPtr& pg_in) {
    ProcessGroupPtr pg = pg_in;
    auto t = at::ones({1000});
    pg->allreduce(t)->wait();
    if (pg->rank() == 2) return;  // leaves: with_shm drops its group
    auto start = std::chrono::steady_clock::now();
    try {
      pg->allreduce(t)->wait();
    } catch (const lockstep::CommError& e) {
      if (pg->rank() == 0) {
        message = e.what();
        seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      }
    }
  }, test_options(unique_job("depart")));
  EXPECT_NE(message.find("rank 2 destroyed its process group"), std::string::npos) << message;
  EXPECT_NE(message.find("allreduce #2"), std::string::npos) << message;
  EXPECT_LT(seconds, 5.0);
}

TEST(ShmFaults, StalledRankTimesOutWithinTheCollectiveTimeout) {
  std::string message0, message2;
  double seconds = 0;
  std::promise<void> done;
  auto done_future = done.get_future().share();
  with_shm(3, [&](const ProcessGroupPtr& pg) {
    if (pg->rank() == 1) {  // alive but never joins: stays until the others gave up
      done_future.wait();
      return;
    }
    auto t = at::ones({1000});
    auto start = std::chrono::steady_clock::now();
    try {
      pg->allreduce(t)->wait();
    } catch (const lockstep::Error& e) {
      (pg->rank() == 0 ? message0 : message2) = e.what();
      if (pg->rank() == 0) {
        seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      }
    }
    if (pg->rank() == 0) done.set_value();
  }, test_options(unique_job("stall")).timeout(std::chrono::seconds(1)));
  // Whoever times out first names rank 1; the other learns it from the abort word.
  EXPECT_NE(message0.find("rank 1"), std::string::npos) << message0;
  EXPECT_NE(message2.find("rank 1"), std::string::npos) << message2;
  EXPECT_GE(seconds, 0.9);
  EXPECT_LT(seconds, 4.0);
}

// (avg of integers and non-contiguous tensors: the shared checks, in test_conformance.)
TEST(ShmFaults, UnsupportedDtypesAreRejected) {
  with_shm(1, [&](const ProcessGroupPtr& pg) {
    auto b = at::ones({3}, at::kBool);
    EXPECT_THROW(pg->allreduce(b), lockstep::InvalidArgument);
  }, test_options(unique_job("args")));
}

}  // namespace

// The mapping of the job's send/recv channel in this process (Note [Shared-memory channel]):
// the /dev/shm object of the job whose size is the channel's for `world` ranks.
char* find_channel_mapping(const std::string& job, int world) {
  const size_t bytes = static_cast<size_t>(world) * (world - 1) *
                       (lockstep::shm::kPage +
                        lockstep::shm::kChannelChunks * lockstep::shm::channel_chunk_bytes(world));
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);) {
    if (line.find("/dev/shm/lockstep-" + job + "-") == std::string::npos) continue;
    uintptr_t start = 0, end = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &start, &end) != 2) continue;
    if (end - start == bytes) return reinterpret_cast<char*>(start);
  }
  return nullptr;
}

// A chunk header in the channel is another process's data: a length beyond the chunk is a
// CommError naming the peer, before anything is copied (never a read past the mapping or a
// write past the tensor).
TEST(ShmChannel, ACorruptChunkHeaderIsACommErrorNamingThePeer) {
  auto job = unique_job("corrupt");
  auto store = std::make_shared<lockstep::Store>(lockstep::Store::hash());
  std::vector<ProcessGroupPtr> groups(2);
  run_ranks(2, [&](int r) { groups[r] = lockstep::new_shm_group(r, 2, store, test_options(job)); });
  ASSERT_TRUE(groups[0] && groups[1]);
  groups[0]->send(at::full({3}, 1.0f), 1, 0)->wait();  // in the ring 0 -> 1, not yet received
  char* base = find_channel_mapping(job, 2);
  ASSERT_NE(base, nullptr) << "no channel mapping of job " << job << " in /proc/self/maps";
  // Ring (0 -> 1) is the first; its control page, then chunk 0: seq, offset, len, total.
  auto* len = reinterpret_cast<uint64_t*>(base + lockstep::shm::kPage + 16);
  ASSERT_EQ(*len, 12u) << "the chunk layout changed; update this test";
  *len = uint64_t{1} << 40;
  auto t = at::zeros({3});
  try {
    groups[1]->recv(t, 0, 0)->wait();
    ADD_FAILURE() << "no error for a corrupt chunk header";
  } catch (const lockstep::CommError& e) {
    EXPECT_NE(std::string(e.what()).find(
                  "rank 0 wrote a corrupt chunk header (payload 1099511627776 bytes at offset 0 "
                  "of a 12-byte message"),
              std::string::npos)
        << e.what();
  }
  EXPECT_TRUE(at::equal(t, at::zeros({3}))) << "nothing may be copied from a corrupt chunk";
}
