// Planted leaks for the leak check (Note [The campaign's leak check] in
// tests/support/no_leaks.h): run by the ctest `leak_check_planted`, which expects the check to
// fail the first two tests, naming what leaked, and to pass the third.
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>

#include "support/no_leaks.h"

TEST(PlantedLeak, OrphanedGrandchild) {
  // The child starts a grandchild and exits once the grandchild has exec'd `sleep 30` (the
  // close-on-exec pipe reads EOF then), so that the leak check finds it named as sleep and not
  // still as this binary: the grandchild is orphaned.
  pid_t child = fork();
  if (child == 0) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) _exit(1);
    if (fork() == 0) {
      close(fds[0]);
      execlp("sleep", "sleep", "30", static_cast<char*>(nullptr));
      _exit(127);
    }
    close(fds[1]);
    char c;
    while (read(fds[0], &c, 1) > 0) {
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
