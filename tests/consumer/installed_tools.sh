#!/usr/bin/env bash
# The installed programs start from a clean shell: no LD_LIBRARY_PATH, a minimal PATH, nothing
# of the build tree. Usage: installed_tools.sh PREFIX
#   1. lockstep-run --help and every installed recipe's --help exit 0 and print their usage;
#   2. each finds liblockstep.so inside PREFIX (its run path, not the build tree);
#   3. the installed lockstep-run really launches a 2-worker job.
set -euo pipefail
prefix=$1
bin=$prefix/bin
clean() { env -i PATH=/usr/bin:/bin HOME="${HOME:-/tmp}" "$@"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

[ -x "$bin/lockstep-run" ] || fail "$bin/lockstep-run was not installed"
recipes=(lockstep-fashion-mnist lockstep-char-lm lockstep-sales-forecast)
for r in "${recipes[@]}"; do
  [ -x "$bin/$r" ] || fail "recipe $bin/$r was not installed"
done

for p in lockstep-run "${recipes[@]}"; do
  out=$(clean "$bin/$p" --help 2>&1) || fail "$p --help exited $? from a clean shell: $out"
  grep -qi "usage\|lockstep-run" <<<"$out" || fail "$p --help printed no usage: $out"
  lib=$(clean ldd "$bin/$p" | awk '/liblockstep/ {print $3}')
  case "$lib" in
    "$prefix"/*) ;;
    *) fail "$p loads liblockstep from '$lib', expected it under $prefix" ;;
  esac
  echo "ok: $p --help (liblockstep from $lib)"
done

out=$(clean "$bin/lockstep-run" --standalone --nproc-per-node 2 --quiet -- /bin/sh -c 'echo "worker $RANK of $WORLD_SIZE"' 2>&1) \
  || fail "installed lockstep-run could not run a job: $out"
for r in 0 1; do
  grep -q "worker $r of 2" <<<"$out" || fail "no output from worker $r: $out"
done
echo "ok: installed lockstep-run ran 2 workers"
echo "installed tools ok"
