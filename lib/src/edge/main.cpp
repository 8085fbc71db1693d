// run_main and the worker error file (see lockstep/main.h).
#include "lockstep/main.h"

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <typeinfo>

#include "lockstep/env_vars.h"
#include "lockstep/errors.h"
#include "lockstep/launch_env.h"
#include "lockstep/log.h"

namespace lockstep {
namespace {

// The most specific lockstep class name, else the C++ type's (mangled) name.
std::string type_name(const std::exception& e) {
  if (dynamic_cast<const InvalidArgument*>(&e)) return "lockstep::InvalidArgument";
  if (dynamic_cast<const TimeoutError*>(&e)) return "lockstep::TimeoutError";
  if (dynamic_cast<const CommError*>(&e)) return "lockstep::CommError";
  if (dynamic_cast<const StateError*>(&e)) return "lockstep::StateError";
  if (dynamic_cast<const InternalError*>(&e)) return "lockstep::InternalError";
  if (dynamic_cast<const Error*>(&e)) return "lockstep::Error";
  return typeid(e).name();
}

int rank_or_minus_one() {
  try {
    return resolve_launch_env(process_environment()).rank;
  } catch (const std::exception&) {
    return -1;
  }
}

bool write_json(const char* variable, const nlohmann::json& value) {
  const char* path = std::getenv(variable);
  if (path == nullptr || *path == '\0') return true;
  std::ofstream out(path, std::ios::trunc);
  out << value.dump(2) << "\n";
  out.close();
  if (!out) {
    log_error(detail::concat("could not write the error file ", path, " (from ", variable, ")"));
    return false;
  }
  return true;
}

}  // namespace

bool write_error_file(const std::string& type, const std::string& message) {
  auto now = std::chrono::system_clock::now().time_since_epoch();
  double seconds = std::chrono::duration<double>(now).count();
  nlohmann::json ours = {{"message", message},
                         {"type", type},
                         {"rank", rank_or_minus_one()},
                         {"pid", static_cast<long>(getpid())},
                         {"time", seconds}};
  // torchelastic's ErrorHandler format; torchrun 1.13 prints extraInfo.py_callstack as the
  // failure's "traceback", so that is where the message goes.
  nlohmann::json theirs = {
      {"message",
       {{"message", type + ": " + message},
        {"extraInfo",
         {{"py_callstack", type + ": " + message},
          {"timestamp", std::to_string(static_cast<long long>(seconds))}}}}}};
  bool ok = write_json(env::kErrorFile, ours);
  return write_json("TORCHELASTIC_ERROR_FILE", theirs) && ok;
}

int run_main(const std::function<int()>& body) {
  std::string type;
  std::string message;
  try {
    return body();
  } catch (const std::exception& e) {
    type = type_name(e);
    message = e.what();
  } catch (...) {
    type = "unknown exception";
    message = "a value that is not a std::exception was thrown";
  }
  log_error(detail::concat("uncaught ", type, ": ", message));
  write_error_file(type, message);
  return kExitUncaughtError;
}

}  // namespace lockstep
