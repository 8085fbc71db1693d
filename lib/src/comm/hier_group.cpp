// The hierarchical group (see hier_group.h).
#include "comm/hier_group.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "comm/serial_executor.h"
#include "lockstep/errors.h"

namespace lockstep {
namespace shm {

using comm::FailStop;
using comm::SerialExecutor;
using detail::concat;

namespace {


// Note [Hierarchical collectives]
// Ranks are grouped by host identity; within a host, local rank = position by global rank and
// the local rank 0 is the host's leader. Leaders form a Gloo group (host index = order of the
// hosts' lowest global ranks).
//   allreduce: shm allreduce within the host (avg as sum); Gloo allreduce among leaders;
//     leaders divide for avg; shm broadcast from the leader. Every rank of a host gets the
//     leader's bits, and Gloo's ring gives every leader the same bits.
//   broadcast: on the root's host, shm broadcast from the root; Gloo broadcast among leaders
//     from the root host's leader; on the other hosts, shm broadcast from the leader.
//   allgather: shm allgather within the host; leaders exchange host blocks padded to the
//     largest host; shm broadcast of the full result from the leader.
//   barrier: shm barrier, Gloo barrier among leaders, shm barrier.
class HierGroup : public ProcessGroup {
 public:
  HierGroup(const GroupSpec& spec, std::vector<std::vector<int>> hosts, int host,
            ProcessGroupPtr local, ProcessGroupPtr leaders)
      : ProcessGroup(spec.rank, spec.size, spec.timeout, spec.store),
        spec_(spec),
        hosts_(std::move(hosts)),
        host_(host),
        local_(std::move(local)),
        leaders_(std::move(leaders)),
        host_of_(spec.size),
        local_rank_of_(spec.size) {
    for (size_t h = 0; h < hosts_.size(); ++h) {
      for (size_t i = 0; i < hosts_[h].size(); ++i) {
        host_of_[hosts_[h][i]] = static_cast<int>(h);
        local_rank_of_[hosts_[h][i]] = static_cast<int>(i);
      }
    }
    channel_ = channel_of(*local_);  // null above kChannelMaxRanks ranks on a host: the store
    executor_ = std::make_unique<SerialExecutor>();
  }

  ~HierGroup() override { executor_.reset(); }

  std::string backend() const override { return "hier"; }

  at::Tensor new_buffer(int64_t numel, const at::TensorOptions& options) override {
    return local_->new_buffer(numel, options);  // the host phase then reduces it in place
  }

  std::string transport_for(const at::Tensor& tensor) override {
    return concat(local_->transport_for(tensor), " + gloo between hosts");
  }

  WorkPtr allreduce(at::Tensor& tensor, ReduceOp op) override {
    check_allreduce(tensor, op);
    next_sequence();
    at::Tensor t = tensor;
    return post([this, t, op]() mutable {
      ReduceOp inner = op == ReduceOp::kAvg ? ReduceOp::kSum : op;
      local_->allreduce(t, inner)->wait();
      if (leaders_) {
        leaders_->allreduce(t, inner)->wait();
        if (op == ReduceOp::kAvg) t.div_(size());
      }
      local_->broadcast(t, 0)->wait();
    });
  }

  WorkPtr broadcast(at::Tensor& tensor, int root) override {
    check_broadcast(tensor, root);
    next_sequence();
    at::Tensor t = tensor;
    return post([this, t, root]() mutable {
      int root_host = host_of_[root];
      if (host_ == root_host) local_->broadcast(t, local_rank_of_[root])->wait();
      if (leaders_) leaders_->broadcast(t, root_host)->wait();
      if (host_ != root_host) local_->broadcast(t, 0)->wait();
    });
  }

  WorkPtr allgather(std::vector<at::Tensor>& outputs, const at::Tensor& input) override {
    check_allgather(outputs, input);
    next_sequence();
    at::Tensor in = input.contiguous();
    std::vector<at::Tensor> outs = outputs;
    return post([this, in, outs]() mutable {
      const int64_t n = in.numel();
      if (n == 0) return;  // every rank has the same shape; Gloo 1.13 divides by zero on it
      auto flat_in = in.reshape({n});
      std::vector<at::Tensor> mine;
      for (size_t i = 0; i < hosts_[host_].size(); ++i) mine.push_back(at::empty_like(flat_in));
      local_->allgather(mine, flat_in)->wait();
      auto all = at::empty({size(), n}, in.options());
      if (leaders_) {
        size_t widest = 0;
        for (auto& h : hosts_) widest = std::max(widest, h.size());
        auto block = at::zeros({static_cast<int64_t>(widest), n}, in.options());
        for (size_t i = 0; i < mine.size(); ++i) block[static_cast<int64_t>(i)].copy_(mine[i]);
        std::vector<at::Tensor> blocks;
        for (size_t h = 0; h < hosts_.size(); ++h) blocks.push_back(at::empty_like(block));
        leaders_->allgather(blocks, block)->wait();
        for (size_t h = 0; h < hosts_.size(); ++h) {
          for (size_t i = 0; i < hosts_[h].size(); ++i) {
            all[hosts_[h][i]].copy_(blocks[h][static_cast<int64_t>(i)]);
          }
        }
      }
      local_->broadcast(all, 0)->wait();
      for (int r = 0; r < size(); ++r) outs[r].copy_(all[r].view(outs[r].sizes()));
    });
  }

  // Note [Subgroups]: the members grouped by the parent's hosts; make_group builds plain shm
  // when they share one host, else a new hierarchical group with its own leader mesh.
  ProcessGroupPtr make_subgroup(const std::vector<int>& ranks, int sub_rank, uint64_t /*id*/,
                                const std::shared_ptr<Store>& store) override {
    GroupSpec sub = spec_;
    sub.rank = sub_rank;
    sub.size = static_cast<int>(ranks.size());
    sub.store = store;
    sub.host_of_rank.clear();
    for (int r : ranks) sub.host_of_rank.push_back(concat("host", host_of_[r]));
    return make_group(sub);
  }

  // Note [Shared-memory channel] (shm_channel.cpp): ranks on this host through the host
  // group's channel; ranks on other hosts through the store (ProcessGroup's default), since
  // only the hosts' leaders are connected by Gloo.
  WorkPtr run_send(const at::Tensor& tensor, int dst, int tag) override {
    if (host_of_[dst] != host_ || !channel_) return ProcessGroup::run_send(tensor, dst, tag);
    return channel_->send(tensor, local_rank_of_[dst], tag,
                          channel_send_message(where(), tensor, dst, tag));
  }

  WorkPtr run_recv(at::Tensor& tensor, int src, int tag) override {
    if (host_of_[src] != host_ || !channel_) return ProcessGroup::run_recv(tensor, src, tag);
    return channel_->recv(tensor, local_rank_of_[src], tag,
                          channel_recv_message(where(), tensor, src, tag));
  }

  WorkPtr barrier() override {
    next_sequence();
    return post([this] {
      local_->barrier()->wait();
      if (leaders_) leaders_->barrier()->wait();
      local_->barrier()->wait();
    });
  }

 private:
  WorkPtr post(std::function<void()> task) { return executor_->post(fail_stop_.wrap(std::move(task))); }

  GroupSpec spec_;  // for subgroups
  std::vector<std::vector<int>> hosts_;
  int host_;
  ProcessGroupPtr local_;
  Channel* channel_ = nullptr;  // local_'s
  ProcessGroupPtr leaders_;  // null on non-leaders
  std::vector<int> host_of_;
  std::vector<int> local_rank_of_;
  FailStop fail_stop_;
  std::unique_ptr<SerialExecutor> executor_;
};

}  // namespace

ProcessGroupPtr make_hier_group(const GroupSpec& spec, std::vector<std::vector<int>> hosts,
                                int host, ProcessGroupPtr local, ProcessGroupPtr leaders) {
  return std::make_shared<HierGroup>(spec, std::move(hosts), host, std::move(local),
                                     std::move(leaders));
}

}  // namespace shm
}  // namespace lockstep
