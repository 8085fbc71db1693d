#!/usr/bin/env bash
# scripts/check-header-deps.sh on planted dependency lists: a distribution spdlog or fmt is
# named, LibTorch's own bundled fmt is allowed, and no dependency information is an error.
set -euo pipefail
check="$1/scripts/check-header-deps.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
expect() {  # expect RC DIR TEXT
  local out rc=0
  out=$("$check" "$2" 2>&1) || rc=$?
  if [[ $rc -ne $1 || "$out" != *"$3"* ]]; then
    echo "FAIL: expected exit $1 and '$3' for $2, got exit $rc: $out"
    exit 1
  fi
}
mkdir -p "$tmp/clean/lib" "$tmp/spdlog/lib" "$tmp/fmt/apps" "$tmp/empty"
printf 'lib/a.cpp.o: /work/lib/src/a.cpp /usr/include/c10/core/Device.h \\\n /opt/venv/torch/include/fmt/format.h\n' \
  >"$tmp/clean/lib/a.cpp.o.d"
printf 'lib/b.cpp.o: /work/lib/src/b.cpp \\\n /usr/include/spdlog/spdlog.h /usr/include/fmt/core.h\n' \
  >"$tmp/spdlog/lib/b.cpp.o.d"
printf 'apps/c.cpp.o: /work/apps/c.cpp /usr/include/fmt/format.h\n' >"$tmp/fmt/apps/c.cpp.o.d"
expect 0 "$tmp/clean" "1 objects, none includes"
expect 1 "$tmp/spdlog" "spdlog/spdlog.h"
expect 1 "$tmp/fmt" "/usr/include/fmt/format.h"
expect 2 "$tmp/empty" "found none; build first"
echo "header_deps_test: 4 cases pass"
