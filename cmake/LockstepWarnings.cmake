# One place for warning flags; applied per target, never globally.
function(lockstep_set_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wno-unused-parameter
                                             -Wno-missing-field-initializers)
  endif()
endfunction()
