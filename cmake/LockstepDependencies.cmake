# Finds every third-party dependency once and exposes it as a namespaced target.
# Each is a Debian 12 package; scripts/install-deps.sh installs them.
#
#   torch                 LibTorch (libtorch-dev). Link the target `torch`, never raw -ltorch:
#                         it carries USE_C10D_GLOO / USE_DISTRIBUTED, without which c10d's
#                         ProcessGroupGloo.hpp compiles to nothing.
#   spdlog::spdlog        logging (libspdlog-dev), private to the library
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

find_package(spdlog REQUIRED)
find_package(nlohmann_json 3.2 REQUIRED)
find_package(ZLIB REQUIRED)

if(LOCKSTEP_BUILD_APPS OR LOCKSTEP_BUILD_TESTS)
  find_package(cxxopts REQUIRED)
endif()
if(LOCKSTEP_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()

# ccache when present: LibTorch headers cost ~10 s per translation unit.
find_program(LOCKSTEP_CCACHE ccache)
if(LOCKSTEP_CCACHE AND NOT CMAKE_CXX_COMPILER_LAUNCHER)
  set(CMAKE_CXX_COMPILER_LAUNCHER "${LOCKSTEP_CCACHE}" CACHE STRING "" FORCE)
endif()
