// PromiseWork and then_work: the two ways lockstep completes a Work of its own.
#include <condition_variable>
#include <mutex>

#include "lockstep/errors.h"
#include "lockstep/process_group.h"

namespace lockstep {

// ---------------------------------------------------------------------------------------------
// PromiseWork

struct PromiseWork::State {
  std::mutex mutex;
  std::condition_variable cv;
  bool done = false;
  std::exception_ptr error;
};

PromiseWork::PromiseWork() : state_(std::make_unique<State>()) {}
PromiseWork::~PromiseWork() = default;

bool PromiseWork::is_completed() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->done;
}

void PromiseWork::wait() {
  std::unique_lock<std::mutex> lock(state_->mutex);
  state_->cv.wait(lock, [&] { return state_->done; });
  if (state_->error) std::rethrow_exception(state_->error);
}

void PromiseWork::set_completed() {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (state_->done) return;
    state_->done = true;
  }
  state_->cv.notify_all();
}

void PromiseWork::set_error(std::exception_ptr error) {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (state_->done) return;
    state_->done = true;
    state_->error = std::move(error);
  }
  state_->cv.notify_all();
}

WorkPtr PromiseWork::completed() {
  auto work = std::make_shared<PromiseWork>();
  work->set_completed();
  return work;
}

// ---------------------------------------------------------------------------------------------
// then_work

namespace {

class ThenWork : public Work {
 public:
  ThenWork(std::vector<WorkPtr> inner, std::function<void()> then)
      : inner_(std::move(inner)), then_(std::move(then)) {}

  bool is_completed() override {
    for (auto& w : inner_) {
      if (!w->is_completed()) return false;
    }
    try {
      wait();  // does not block now; a failure is rethrown by wait(), not here
    } catch (...) {
    }
    return true;
  }

  void wait() override {
    for (auto& w : inner_) w->wait();
    std::call_once(once_, [this] {
      if (then_) then_();
    });
  }

 private:
  std::vector<WorkPtr> inner_;
  std::function<void()> then_;
  std::once_flag once_;
};

}  // namespace

WorkPtr then_work(std::vector<WorkPtr> inner, std::function<void()> then) {
  for (const auto& w : inner) {
    LOCKSTEP_CHECK(w != nullptr, "Expected a Work to chain onto, but got null.");
  }
  return std::make_shared<ThenWork>(std::move(inner), std::move(then));
}

WorkPtr then_work(WorkPtr inner, std::function<void()> then) {
  return then_work(std::vector<WorkPtr>{std::move(inner)}, std::move(then));
}

}  // namespace lockstep
