# lockstep_install_program(target): gives a command-line program (lockstep-run, lockstep-bench,
# the recipes) a run path relative to itself and, when lockstep installs, an install rule into
# <prefix>/bin. Note [Installed run path]: `cmake --install` replaces the build tree's run path
# with INSTALL_RPATH, which is empty by default, so an installed program could not find
# liblockstep.so without LD_LIBRARY_PATH. $ORIGIN/../lib (computed from GNUInstallDirs, so
# lib64 or a multiarch libdir work too) finds it under any prefix, `--prefix /some/dir` and a
# moved tree included; INSTALL_RPATH_USE_LINK_PATH keeps the directories of libraries linked
# from outside the project (a LibTorch archive's lib/; Debian's LibTorch is on the default
# search path and needs none).
include(GNUInstallDirs)

function(lockstep_relative_rpath out)
  if(IS_ABSOLUTE "${CMAKE_INSTALL_BINDIR}" OR IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}")
    set(${out} "${CMAKE_INSTALL_FULL_LIBDIR}" PARENT_SCOPE)
    return()
  endif()
  file(RELATIVE_PATH rel "/${CMAKE_INSTALL_BINDIR}" "/${CMAKE_INSTALL_LIBDIR}")
  if(APPLE)
    set(${out} "@loader_path/${rel}" PARENT_SCOPE)
  else()
    set(${out} "$ORIGIN/${rel}" PARENT_SCOPE)
  endif()
endfunction()

# lockstep_install_program(target [EXPORT]): EXPORT also puts it in lockstep's export set, so
# find_package(lockstep) users get it as an imported executable (lockstep::<EXPORT_NAME>).
function(lockstep_install_program target)
  cmake_parse_arguments(ARG "EXPORT" "" "" ${ARGN})
  lockstep_relative_rpath(rpath)
  set_target_properties(${target} PROPERTIES INSTALL_RPATH "${rpath}"
                                             INSTALL_RPATH_USE_LINK_PATH TRUE)
  if(LOCKSTEP_INSTALL)
    if(ARG_EXPORT)
      install(TARGETS ${target} EXPORT lockstepTargets RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
    else()
      install(TARGETS ${target} RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
    endif()
  endif()
endfunction()
