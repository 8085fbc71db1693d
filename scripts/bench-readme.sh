#!/bin/sh
# Regenerates the measured tables of README.md's performance section from lockstep-bench JSON
# files: everything between "<!-- bench:begin -->" and "<!-- bench:end -->" is replaced by
# `lockstep-bench --from-json FILE --markdown` of each file in turn, each carrying the command
# that produced it.
#   scripts/bench-readme.sh bench.json [more.json ...]     (README=path to edit another file)
set -eu
[ $# -ge 1 ] || { echo "usage: scripts/bench-readme.sh bench.json [more.json ...]" >&2; exit 2; }
readme=${README:-README.md}
bench=${LOCKSTEP_BENCH:-build/apps/bench/lockstep-bench}
md=$(mktemp)
trap 'rm -f "$md" "$md.one" "$md.readme"' EXIT
: > "$md"
for json in "$@"; do
  "$bench" --from-json "$json" --markdown "$md.one" > /dev/null
  cat "$md.one" >> "$md"
  echo >> "$md"
done
json="$*"
grep -q '<!-- bench:begin -->' "$readme" || { echo "$readme has no <!-- bench:begin --> marker" >&2; exit 1; }
awk -v md="$md" '
  /<!-- bench:begin -->/ { print; while ((getline line < md) > 0) print line; skip = 1; next }
  /<!-- bench:end -->/   { skip = 0 }
  !skip { print }
' "$readme" > "$md.readme"
cat "$md.readme" > "$readme"
echo "updated $readme from $json"
