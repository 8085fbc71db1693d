#pragma once
/// \file
/// `LOCKSTEP_ARG`: declares a chainable option field, as the torch C++ frontend's TORCH_ARG
/// does: `Options().bucket_cap_mb(25).first_bucket_mb(1)`. Each use generates a setter that
/// returns `*this`, two getters, and a private `name_` member whose default follows the macro.

#include <utility>

#define LOCKSTEP_ARG(T, name)                                        \
 public:                                                             \
  inline auto name(const T& new_##name)->decltype(*this) {           \
    this->name##_ = new_##name;                                      \
    return *this;                                                    \
  }                                                                  \
  inline auto name(T&& new_##name)->decltype(*this) {                \
    this->name##_ = std::move(new_##name);                           \
    return *this;                                                    \
  }                                                                  \
  inline const T& name() const noexcept { return this->name##_; }    \
  inline T& name() noexcept { return this->name##_; }                \
                                                                     \
 private:                                                            \
  T name##_
