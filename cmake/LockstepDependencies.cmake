# Finds every third-party dependency once and exposes it as a namespaced target.
# Each is a Debian 12 package; scripts/install-deps.sh installs them.
#
#   torch                 LibTorch (libtorch-dev). Link the target `torch`, never raw -ltorch:
#                         it carries USE_C10D_GLOO / USE_DISTRIBUTED, without which c10d's
#                         ProcessGroupGloo.hpp compiles to nothing.
#   nlohmann_json::nlohmann_json   JSON (nlohmann-json3-dev), private
#   cxxopts::cxxopts      command-line parsing for apps and recipes (libcxxopts-dev)
#   ZLIB::ZLIB            gzip'd IDX files (zlib1g-dev)
#   GTest::gtest_main     tests (libgtest-dev)
find_package(Threads REQUIRED)

if(NOT TARGET torch)
  find_package(Torch REQUIRED)
  # Imported targets are scoped to the directory that found them. When lockstep is
  # add_subdirectory()'d, make LibTorch's visible to the parent project, whose targets link
  # lockstep::lockstep and therefore torch.
  if(NOT LOCKSTEP_IS_TOP)
    foreach(t torch torch_cpu torch_cuda c10 c10_cuda torch_library)
      if(TARGET ${t})
        get_target_property(_imported ${t} IMPORTED)
        if(_imported)
          set_target_properties(${t} PROPERTIES IMPORTED_GLOBAL TRUE)
        endif()
      endif()
    endforeach()
  endif()
endif()
if(NOT TARGET torch)
  message(FATAL_ERROR "find_package(Torch) did not define the CMake target 'torch'. "
                      "Install libtorch-dev (Debian) or point CMAKE_PREFIX_PATH at a LibTorch archive.")
endif()
if(Torch_VERSION)
  message(STATUS "lockstep: LibTorch ${Torch_VERSION}")
endif()

# Without Debian's packages (a pip or archive LibTorch on another distribution), point
# LOCKSTEP_HEADER_DEPS_DIR at a folder holding nlohmann/ and cxxopts.hpp:
# they are then used header-only. LOCKSTEP_GTEST_SOURCE_DIR likewise takes a googletest
# source tree (Debian: /usr/src/googletest).
set(LOCKSTEP_HEADER_DEPS_DIR "" CACHE PATH
    "Folder with nlohmann/ and cxxopts.hpp, used when their CMake packages are absent")
set(LOCKSTEP_GTEST_SOURCE_DIR "" CACHE PATH
    "googletest source tree used when the GTest CMake package is absent")

function(lockstep_header_only_target alias)
  string(REPLACE "::" "_" name "lockstep_dep_${alias}")
  add_library(${name} INTERFACE)
  target_include_directories(${name} SYSTEM INTERFACE ${LOCKSTEP_HEADER_DEPS_DIR})
  target_compile_definitions(${name} INTERFACE ${ARGN})
  add_library(${alias} ALIAS ${name})
endfunction()

function(lockstep_find_or_header_only package alias)
  find_package(${package} QUIET)
  if(NOT ${package}_FOUND)
    if(NOT LOCKSTEP_HEADER_DEPS_DIR)
      message(FATAL_ERROR "lockstep needs ${package}: install its Debian package "
                          "(scripts/install-deps.sh) or set LOCKSTEP_HEADER_DEPS_DIR.")
    endif()
    lockstep_header_only_target(${alias} ${ARGN})
    message(STATUS "lockstep: ${package} header-only from ${LOCKSTEP_HEADER_DEPS_DIR}")
  endif()
endfunction()

# No spdlog: lockstep writes its own log lines (Note [lockstep's log lines] in
# lib/src/core/log.cpp), so a distribution's spdlog built for its own fmt cannot clash with the
# fmt that LibTorch 2.x bundles.
lockstep_find_or_header_only(nlohmann_json nlohmann_json::nlohmann_json)
find_package(ZLIB REQUIRED)

if(LOCKSTEP_BUILD_APPS OR LOCKSTEP_BUILD_LAUNCHER OR LOCKSTEP_BUILD_TESTS)
  lockstep_find_or_header_only(cxxopts cxxopts::cxxopts)
endif()
if(LOCKSTEP_BUILD_TESTS)
  find_package(GTest QUIET)
  if(NOT GTest_FOUND)
    if(NOT LOCKSTEP_GTEST_SOURCE_DIR)
      message(FATAL_ERROR "lockstep's tests need GoogleTest: install libgtest-dev or set "
                          "LOCKSTEP_GTEST_SOURCE_DIR (or configure with -DLOCKSTEP_BUILD_TESTS=OFF).")
    endif()
    set(INSTALL_GTEST OFF CACHE BOOL "" FORCE)
    add_subdirectory(${LOCKSTEP_GTEST_SOURCE_DIR} ${CMAKE_BINARY_DIR}/_googletest EXCLUDE_FROM_ALL)
    add_library(GTest::gtest ALIAS gtest)
    add_library(GTest::gtest_main ALIAS gtest_main)
  endif()
endif()

# ccache when present: LibTorch headers cost ~10 s per translation unit. Only when lockstep is
# the top-level project, and never over the user's own choice (-DCMAKE_CXX_COMPILER_LAUNCHER=...,
# empty included, or the CMAKE_CXX_COMPILER_LAUNCHER environment variable): a project that
# add_subdirectory()s lockstep keeps its own cache untouched.
if(LOCKSTEP_IS_TOP AND NOT DEFINED CMAKE_CXX_COMPILER_LAUNCHER
   AND NOT DEFINED ENV{CMAKE_CXX_COMPILER_LAUNCHER})
  find_program(LOCKSTEP_CCACHE ccache)
  if(LOCKSTEP_CCACHE)
    set(CMAKE_CXX_COMPILER_LAUNCHER "${LOCKSTEP_CCACHE}" CACHE STRING
        "Compiler launcher (lockstep found ccache)")
  endif()
endif()
