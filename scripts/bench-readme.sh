#!/bin/sh
# Regenerates the measured tables of README.md's performance section from a lockstep-bench
# JSON file: everything between "<!-- bench:begin -->" and "<!-- bench:end -->" is replaced by
# `lockstep-bench --from-json FILE --markdown`, which carries the command that produced it.
#   scripts/bench-readme.sh bench.json [README.md]
set -eu
json=${1:?usage: scripts/bench-readme.sh bench.json [README.md]}
readme=${2:-README.md}
bench=${LOCKSTEP_BENCH:-build/apps/bench/lockstep-bench}
md=$(mktemp)
trap 'rm -f "$md" "$md.readme"' EXIT
"$bench" --from-json "$json" --markdown "$md" > /dev/null
grep -q '<!-- bench:begin -->' "$readme" || { echo "$readme has no <!-- bench:begin --> marker" >&2; exit 1; }
awk -v md="$md" '
  /<!-- bench:begin -->/ { print; while ((getline line < md) > 0) print line; skip = 1; next }
  /<!-- bench:end -->/   { skip = 0 }
  !skip { print }
' "$readme" > "$md.readme"
cat "$md.readme" > "$readme"
echo "updated $readme from $json"
