# lockstep's NCCL backend (Note [NCCL adapter] in lib/src/adapter/c10d_adapter.cpp).
#
#   LOCKSTEP_NCCL=AUTO (default)  on when LibTorch has c10d's NCCL (its target defines
#                                 USE_C10D_NCCL) and the adapter compiles against it; off, with a
#                                 warning that says why, otherwise
#   LOCKSTEP_NCCL=ON              the same checks, but a failure stops the configure
#   LOCKSTEP_NCCL=OFF             never (LOCKSTEP_TRANSPORT=nccl then fails with a clear error)
#
# The adapter is try-compiled first because this code cannot be compiled on a CPU-only
# LibTorch (Debian's): a LibTorch whose c10d moved on costs lockstep its NCCL backend, never
# the build. lockstep_enable_nccl(target) defines LOCKSTEP_WITH_NCCL on `target` when on, and
# sets LOCKSTEP_NCCL_ENABLED.
set(LOCKSTEP_NCCL "AUTO" CACHE STRING "NCCL backend: AUTO, ON or OFF")
set_property(CACHE LOCKSTEP_NCCL PROPERTY STRINGS AUTO ON OFF)

# Turns NCCL off for `why` (a message of `level`, STATUS or WARNING), or stops the configure
# under LOCKSTEP_NCCL=ON; returns from the calling function (a macro's return() does).
macro(lockstep_nccl_off level why)
  if(mode STREQUAL "ON")
    message(FATAL_ERROR "LOCKSTEP_NCCL=ON, but ${why}. Point CMAKE_PREFIX_PATH at a CUDA build "
                        "of LibTorch with c10d's NCCL, or set LOCKSTEP_NCCL=AUTO.")
  endif()
  message(${level} "lockstep: NCCL backend off: ${why}.")
  return()
endmacro()

function(lockstep_enable_nccl target)
  set(LOCKSTEP_NCCL_ENABLED OFF PARENT_SCOPE)
  string(TOUPPER "${LOCKSTEP_NCCL}" mode)
  if(NOT mode MATCHES "^(AUTO|ON|OFF)$")
    message(FATAL_ERROR "LOCKSTEP_NCCL: expected AUTO, ON or OFF, but got '${LOCKSTEP_NCCL}'.")
  endif()
  if(mode STREQUAL "OFF")
    message(STATUS "lockstep: NCCL backend off (LOCKSTEP_NCCL=OFF)")
    return()
  endif()
  set(has_nccl FALSE)
  foreach(t torch torch_cpu torch_cuda)
    if(TARGET ${t})
      get_target_property(defs ${t} INTERFACE_COMPILE_DEFINITIONS)
      if(defs MATCHES "USE_C10D_NCCL")
        set(has_nccl TRUE)
      endif()
    endif()
  endforeach()
  if(NOT has_nccl)  # torch_cuda carries it (PUBLIC); torch only through torch_cuda_library
    lockstep_nccl_off(STATUS
                      "this LibTorch was built without c10d's NCCL (CPU-only, or ROCm without RCCL)")
  endif()
  # nccl.h: LibTorch's CMake config does not name its folder. A CUDA toolkit or a system NCCL
  # has it in the usual places; a pip LibTorch's comes from the nvidia-nccl wheel.
  set(hints $ENV{NCCL_INCLUDE_DIR} $ENV{NCCL_ROOT}/include $ENV{CUDA_HOME}/include)
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_Interpreter_FOUND)
    execute_process(COMMAND ${Python3_EXECUTABLE} -c
                    "import os, nvidia.nccl as n; print(os.path.join(list(n.__path__)[0], 'include'))"
                    OUTPUT_VARIABLE wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    list(APPEND hints ${wheel})
  endif()
  find_path(LOCKSTEP_NCCL_INCLUDE_DIR nccl.h HINTS ${hints} PATH_SUFFIXES include
            DOC "folder holding nccl.h, for lockstep's NCCL adapter")
  if(NOT LOCKSTEP_NCCL_INCLUDE_DIR)
    lockstep_nccl_off(WARNING
                      "nccl.h was not found (set LOCKSTEP_NCCL_INCLUDE_DIR or NCCL_INCLUDE_DIR to its folder)")
  endif()
  set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)
  try_compile(LOCKSTEP_NCCL_COMPILES ${CMAKE_BINARY_DIR}/lockstep_nccl_check
    SOURCES ${PROJECT_SOURCE_DIR}/lib/src/adapter/c10d_adapter.cpp
    CMAKE_FLAGS
      "-DINCLUDE_DIRECTORIES=${PROJECT_SOURCE_DIR}/lib/src;${PROJECT_SOURCE_DIR}/lib/include;${LOCKSTEP_NCCL_INCLUDE_DIR}"
    COMPILE_DEFINITIONS -DLOCKSTEP_WITH_NCCL
    LINK_LIBRARIES torch
    CXX_STANDARD 17
    CXX_STANDARD_REQUIRED ON
    OUTPUT_VARIABLE output)
  if(NOT LOCKSTEP_NCCL_COMPILES)
    set(log ${CMAKE_BINARY_DIR}/lockstep_nccl_check.log)
    file(WRITE ${log} "${output}")
    string(CONCAT why "lib/src/adapter/c10d_adapter.cpp does not compile against this "
           "LibTorch's ProcessGroupNCCL (compiler output, please report it: ${log})")
    lockstep_nccl_off(WARNING "${why}")
  endif()
  target_compile_definitions(${target} PRIVATE LOCKSTEP_WITH_NCCL)
  target_include_directories(${target} SYSTEM PRIVATE ${LOCKSTEP_NCCL_INCLUDE_DIR})
  set(LOCKSTEP_NCCL_ENABLED ON PARENT_SCOPE)
  message(STATUS "lockstep: NCCL backend on")
endfunction()
