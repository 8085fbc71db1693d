#pragma once
// The operations of a rendezvous key-value store, whatever implements it: c10d's file and
// in-process stores (built by the torch adapter) or lockstep's own TCP store (comm/). Internal:
// users hold a lockstep::Store, which adds prefixes, descriptions and error translation.
//
// Implementations are thread-safe and report failures as any std::exception; lockstep::Store
// turns them into lockstep errors that name the store and the key.

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace lockstep {
namespace detail {

class KeyValueStore {
 public:
  virtual ~KeyValueStore() = default;

  /// Sets `key` to `value`.
  virtual void set(const std::string& key, const std::string& value) = 0;
  /// The value of `key`, waiting up to timeout() for it to appear.
  virtual std::string get(const std::string& key) = 0;
  /// Adds `delta` to the integer at `key` (0 when absent) and returns the new value.
  virtual int64_t add(const std::string& key, int64_t delta) = 0;
  /// Sets `key` to `desired` if its value is `expected` (or it is absent and `expected` is
  /// empty); returns the value after the operation.
  virtual std::string compare_set(const std::string& key, const std::string& expected,
                                  const std::string& desired) = 0;
  /// True when every key exists; does not wait.
  virtual bool check(const std::vector<std::string>& keys) = 0;
  /// Waits until every key exists, at most `timeout`.
  virtual void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) = 0;
  /// Deletes `key`; true if it existed.
  virtual bool remove(const std::string& key) = 0;
  /// Number of keys in the store.
  virtual int64_t num_keys() = 0;

  /// Default wait of get() and wait().
  virtual std::chrono::milliseconds timeout() const = 0;
  virtual void set_timeout(std::chrono::milliseconds timeout) = 0;
};

}  // namespace detail
}  // namespace lockstep
