// Planted leaks for the leak check (Note [The campaign's leak check] in
// tests/support/no_leaks.h): run by the ctest `leak_check_planted`, which expects the check to
// fail the first two tests, naming what leaked, and to pass the third.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>

#include "support/no_leaks.h"

TEST(PlantedLeak, OrphanedGrandchild) {
  // The child starts a grandchild and exits at once: the grandchild is orphaned.
  pid_t child = fork();
  if (child == 0) {
    if (fork() == 0) {
      execlp("sleep", "sleep", "30", static_cast<char*>(nullptr));
      _exit(127);
    }
    _exit(0);
  }
  waitpid(child, nullptr, 0);
}

TEST(PlantedLeak, EntryLeftInDevShm) {
  const std::string path = "/dev/shm/lockstep-planted-leak-" + std::to_string(getpid());
  if (FILE* f = std::fopen(path.c_str(), "w")) std::fclose(f);
}

TEST(PlantedLeak, NothingLeaked) {}
