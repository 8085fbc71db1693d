#!/usr/bin/env bash
# lockstep-report: two runs (a run directory and a metrics.jsonl path) overlaid in one page,
# one polyline per run in the loss chart with both labels in the legend; usage errors exit 2
# and a missing metrics file exits 1 naming the path.
set -euo pipefail
bin=$1
work=$(mktemp -d "${TMPDIR:-/tmp}/lockstep_report_cli.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/run_a"
printf '%s\n' '{"kind":"step","step":1,"loss":2.0}' '{"kind":"step","step":2,"loss":1.5}' \
  '{"kind":"epoch","epoch":1,"val_loss":1.4}' > "$work/run_a/metrics.jsonl"
printf '%s\n' '{"kind":"step","step":1,"loss":2.2}' '{"kind":"step","step":2,"loss":1.0}' > "$work/b.jsonl"
"$bin" "$work/run_a" "$work/b.jsonl" -o "$work/out.html" --title "A vs B"
html=$(cat "$work/out.html")
fail() { echo "report_cli: $*" >&2; exit 1; }
[[ $html == *"<title>A vs B</title>"* ]] || fail "no title"
chart=${html#*>loss by run<}
chart=${chart%%</svg>*}
[ "$(grep -o '<polyline' <<<"$chart" | wc -l)" = 2 ] || fail "the loss chart should have 2 polylines: $chart"
[[ $chart == *"$work/run_a (last 1.5)"* ]] || fail "run_a missing from the legend"
[[ $chart == *"$work/b.jsonl (last 1)"* ]] || fail "b.jsonl missing from the legend"
[[ $html == *"val_loss by run"* ]] || fail "no val_loss chart"
code=0; "$bin" "$work/run_a" 2>"$work/err" || code=$?
[ "$code" = 2 ] && grep -q "and no -o" "$work/err" || fail "no -o: exit $code, $(cat "$work/err")"
code=0; "$bin" "$work/missing" -o "$work/x.html" 2>"$work/err" || code=$?
[ "$code" = 1 ] && grep -q "$work/missing" "$work/err" || fail "missing run: exit $code, $(cat "$work/err")"
echo "report_cli: ok"
