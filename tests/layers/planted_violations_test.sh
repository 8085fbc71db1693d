#!/usr/bin/env bash
# scripts/check-layers.sh passes on the tree and names each planted violation in a copy.
set -euo pipefail
root=$1
"$root/scripts/check-layers.sh" "$root" >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$root/lib" "$root/apps" "$root/recipes" "$root/scripts" "$work/"
echo '#include "ddp/reducer.h"' >> "$work/lib/src/data/sampler.cpp"
echo '#include "comm/store_impl.h"' >> "$work/lib/src/adapter/c10d_adapter.cpp"
echo '#include <torch/csrc/distributed/c10d/Store.hpp>' >> "$work/lib/include/lockstep/store.h"
echo '#include "comm/shm_group.h"' >> "$work/apps/run/main.cpp"
if out=$("$work/scripts/check-layers.sh" "$work" 2>&1); then
  echo "expected check-layers.sh to fail on planted violations, but it passed: $out" >&2
  exit 1
fi
for expect in "lib/src/data/sampler.cpp" "(data) includes ddp/reducer.h (ddp)" \
              "lib/src/adapter/c10d_adapter.cpp" "(adapter) includes comm/store_impl.h" \
              "public headers must not include Gloo or c10d" \
              "apps/run/main.cpp" "4 violation(s)"; do
  if [[ "$out" != *"$expect"* ]]; then
    echo "expected check-layers.sh to report '$expect', but it said:" >&2
    echo "$out" >&2
    exit 1
  fi
done
echo "check-layers.sh names all 4 planted violations"
