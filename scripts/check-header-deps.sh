#!/usr/bin/env bash
# Issue 18's build clash, checked at its root: no lockstep object (library, apps, recipes,
# tests) may include a header of spdlog or of a standalone fmt. LibTorch 2.x bundles its own
# fmt; a distribution's spdlog is compiled against the distribution's fmt, and mixing the two
# in one translation unit does not compile. lockstep writes its own log lines (Note
# [lockstep's log lines]), so neither is needed; this keeps it that way.
#
# usage: scripts/check-header-deps.sh BUILD_DIR
# Reads the compiler's dependency lists: Ninja's log (ninja -t deps) or the .o.d files other
# generators keep. Exit 0: clean; 1: an object includes one (named, with the header); 2: no
# dependency information (build first).
set -euo pipefail
build=${1:?usage: $0 BUILD_DIR}
deps=$(mktemp)
trap 'rm -f "$deps"' EXIT
if [[ -f "$build/.ninja_deps" ]]; then
  (cd "$build" && ninja -t deps) >"$deps"
else
  find "$build" -name '*.o.d' -exec cat {} + >"$deps" 2>/dev/null || true
fi
objects=$(grep -c '\.o:' "$deps" || true)
if [[ "$objects" -eq 0 ]]; then
  echo "check-header-deps: expected dependency lists under $build, found none; build first." >&2
  exit 2
fi
# Ninja prints "object: #deps N, ..." then one indented header per line.
bad=$(awk '{ for (i = 1; i <= NF; i++) {
               if ($i ~ /\.o:$/) obj = $i
               else if ($i ~ /(^|\/)(spdlog|fmt)\/[^ ]*\.h/ && $i !~ /\/torch\/include\/(spdlog|fmt)\//)
                 print obj " includes " $i } }' "$deps" || true)
if [[ -n "$bad" ]]; then
  echo "check-header-deps: lockstep objects include spdlog or fmt headers (issue 18: they clash" >&2
  echo "with the fmt bundled in LibTorch 2.x; use lockstep/log.h and detail::concat):" >&2
  echo "$bad" | head -20 >&2
  exit 1
fi
echo "check-header-deps: $objects objects, none includes spdlog or fmt"
