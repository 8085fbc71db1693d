#!/usr/bin/env bash
# The layering of docs/architecture.md as a check: exits 1, naming every offending include,
# when a file includes a header of a layer it may not see, when a public header includes
# Gloo or c10d, or when an app or recipe includes one of the library's internal headers.
# Usage: scripts/check-layers.sh [repository root]
set -euo pipefail
root=${1:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$root"

# The layer of each public header (lib/include/lockstep/...).
public_layer() {
  case "$1" in
    lockstep/errors.h|lockstep/log.h|lockstep/env_vars.h|lockstep/options.h) echo core ;;
    lockstep/launch_env.h|lockstep/store.h|lockstep/process_group.h|lockstep/thread_group.h|\
    lockstep/agreement.h) echo comm ;;
    lockstep/ddp.h|lockstep/comm_hooks.h|lockstep/sync_batch_norm.h|lockstep/grad_scaler.h|\
    lockstep/zero_redundancy_optimizer.h) echo ddp ;;
    lockstep/data_parallel.h) echo dp ;;
    lockstep/sampler.h|lockstep/readers.h) echo data ;;
    lockstep/train/*) echo train ;;
    lockstep/main.h|lockstep/lockstep.h) echo edge ;;
    *) echo unknown ;;
  esac
}

# The layers a layer may include (itself and those below it).
allowed() {
  case "$1" in
    core) echo "core" ;;
    adapter) echo "core adapter" ;;
    comm) echo "core adapter comm" ;;
    ddp) echo "core adapter comm ddp" ;;
    dp) echo "core adapter comm ddp dp" ;;
    data) echo "core adapter comm data" ;;
    train) echo "core adapter comm train" ;;
    edge) echo "core adapter comm ddp dp data train edge" ;;
  esac
}

failures=0
fail() {
  echo "check-layers: $1" >&2
  failures=$((failures + 1))
}

# The layer an include names, from the including file's point of view.
include_layer() {
  case "$1" in
    lockstep/*) public_layer "$1" ;;
    core/*|adapter/*|comm/*|ddp/*|dp/*|data/*|train/*|edge/*) echo "${1%%/*}" ;;
    *) echo external ;;
  esac
}

check_file() {  # file layer
  local file=$1 layer=$2 ok
  ok=" $(allowed "$layer") "
  while IFS=: read -r line inc; do
    inc=${inc#*\"}
    inc=${inc%%\"*}
    local target
    target=$(include_layer "$inc")
    [ "$target" = external ] && continue
    if [ "$target" = unknown ]; then
      fail "$file:$line includes $inc, a public header check-layers.sh does not know; give it a layer in public_layer()"
    elif [[ "$ok" != *" $target "* ]]; then
      fail "$file:$line ($layer) includes $inc ($target); $layer may include only: $(allowed "$layer")"
    fi
  done < <(grep -n '^[[:space:]]*#[[:space:]]*include[[:space:]]*"' "$file" || true)
}

# Library sources: the folder is the layer.
for dir in lib/src/*/; do
  layer=$(basename "$dir")
  if [ -z "$(allowed "$layer")" ]; then
    fail "lib/src/$layer/ is not a known layer; add it to docs/architecture.md and allowed()"
    continue
  fi
  while IFS= read -r f; do check_file "$f" "$layer"; done < <(find "$dir" -name '*.h' -o -name '*.cpp' | sort)
done
for f in lib/src/*.cpp lib/src/*.h; do
  [ -e "$f" ] && fail "$f sits outside a layer folder"
done

# Public headers: their own layer, and never Gloo or c10d.
while IFS= read -r f; do
  rel=${f#lib/include/}
  layer=$(public_layer "$rel")
  if [ "$layer" = unknown ]; then
    fail "$f has no layer; give it one in public_layer()"
    continue
  fi
  check_file "$f" "$layer"
  while IFS=: read -r line inc; do
    fail "$f:$line includes ${inc#*#include}: public headers must not include Gloo or c10d"
  done < <(grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](gloo/|torch/csrc/distributed/|c10d/)' "$f" || true)
done < <(find lib/include -name '*.h' | sort)

# Apps and recipes use only the public API.
while IFS= read -r f; do
  while IFS=: read -r line inc; do
    fail "$f:$line includes ${inc#*#include}: apps and recipes use only lockstep/... headers"
  done < <(grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*"(core|adapter|comm|ddp|dp|data|train|edge)/' "$f" || true)
done < <(find apps recipes -name '*.h' -o -name '*.cpp' | sort)

if [ "$failures" -gt 0 ]; then
  echo "check-layers: $failures violation(s); see docs/architecture.md for what each layer may include" >&2
  exit 1
fi
echo "check-layers: every include respects the layers"
