#pragma once
// What a lockstep::Store holds. Internal: comm's process groups reach the key-value store
// underneath (Gloo connects through it, Note [Forwarding store]).

#include <memory>
#include <string>

#include "core/key_value_store.h"
#include "lockstep/store.h"

namespace lockstep {

struct Store::Impl {
  std::shared_ptr<detail::KeyValueStore> kv;
  std::string description;  ///< "tcp://host:port", "file:///path", ..., with any prefix
  int port = -1;
};

}  // namespace lockstep
