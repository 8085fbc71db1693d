#pragma once
// SerialExecutor and FailStop: the thread on which the shared-memory and hierarchical groups
// run their collectives, one at a time in issue order, and the rule that after a failure
// every later collective fails with it. Internal to comm/.

#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "lockstep/process_group.h"

namespace lockstep {
namespace comm {

class SerialExecutor {
 public:
  SerialExecutor() : thread_([this] { loop(); }) {}
  ~SerialExecutor() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  WorkPtr post(std::function<void()> task) {
    auto work = std::make_shared<PromiseWork>();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.emplace_back(std::move(task), work);
    }
    cv_.notify_one();
    return work;
  }

 private:
  void loop() {
    while (true) {
      std::pair<std::function<void()>, std::shared_ptr<PromiseWork>> item;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stop requested and drained
        item = std::move(queue_.front());
        queue_.pop_front();
      }
      try {
        item.first();
        item.second->set_completed();
      } catch (...) {
        item.second->set_error(std::current_exception());
      }
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::pair<std::function<void()>, std::shared_ptr<PromiseWork>>> queue_;
  bool stop_ = false;
  std::thread thread_;  // last: starts after the members it uses
};

// Runs tasks on the executor; after the first failure every later task fails with it.
class FailStop {
 public:
  std::function<void()> wrap(std::function<void()> task) {
    return [this, task = std::move(task)] {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (error_) std::rethrow_exception(error_);
      }
      try {
        task();
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        error_ = std::current_exception();
        throw;
      }
    };
  }

 private:
  std::mutex mutex_;
  std::exception_ptr error_;
};

}  // namespace comm
}  // namespace lockstep
