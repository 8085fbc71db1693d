#!/usr/bin/env bash
# Recipe smoke + resume test, on a small slice of the recipe's data:
#   1. an uninterrupted run of WORLD ranks, which also writes TensorBoard scalars;
#   2. the same run stopped after STOP steps (as if preempted: exit 75, checkpoint written),
#      then started again: it must resume and end with a checkpoint byte-identical to (1)
#      (parameters, optimizer state, RNG state, position);
#      and its metrics.jsonl holds the uninterrupted run's records, each once, although the
#      stopped run's file was given the records a crash past the checkpoint leaves behind,
#      with "time" going on across the resume rather than back to 0;
#      the stopped run's live report (--report-every 1) was written at its last step, and the
#      resumed run's TensorBoard file purges the steps past the checkpoint;
#   3. a config file with an unknown key and one with a bad value, and a negative
#      --report-every, are rejected by name (exit 2).
# If RECIPE_CHECK is set, it is a Python expression over `r`, the last "epoch" record of run
# (1)'s metrics.jsonl, that must be true (a quality bar, e.g. the model beats a baseline).
# Usage: resume_test.sh BINARY WORLD STOP [recipe flags...]
set -euo pipefail
bin=$1 world=$2 stop=$3
shift 3
work=$(mktemp -d "${TMPDIR:-/tmp}/lockstep_recipe.XXXXXX")
trap 'rm -rf "$work"' EXIT

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts WORLD ranks of the recipe with a torchrun-style environment; returns rank 0's code
# (every rank must exit with the same code).
launch() {
  local port pids=() codes=() r
  port=$(free_port)
  for ((r = 0; r < world; r++)); do
    RANK=$r WORLD_SIZE=$world LOCAL_RANK=$r LOCAL_WORLD_SIZE=$world MASTER_ADDR=127.0.0.1 \
      MASTER_PORT=$port LOCKSTEP_LOG_LEVEL=warn "$bin" --progress lines --threads 1 "$@" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do
    c=0
    wait "$p" || c=$?
    codes+=("$c")
  done
  for c in "${codes[@]}"; do
    if [ "$c" != "${codes[0]}" ]; then echo "ranks disagree on the exit code: ${codes[*]}" >&2; return 99; fi
  done
  return "${codes[0]}"
}

echo "== uninterrupted run ($world rank(s)), with TensorBoard scalars"
launch --out-dir "$work/a" --tensorboard "$work/a/tb" "$@"
test -f "$work/a/checkpoint.lsck"
# Rank 0 alone writes one event file, holding the step records' loss scalars (the format
# itself is checked in tests/train/test_tensorboard.cpp).
events=("$work"/a/tb/events.out.tfevents.*)
[ "${#events[@]}" = 1 ] && [ -f "${events[0]}" ] || { echo "expected one event file in $work/a/tb, found: ${events[*]}" >&2; exit 1; }
grep -q "step/loss" "${events[0]}" || { echo "${events[0]} has no step/loss scalar" >&2; exit 1; }
test -f "$work/a/report.html"
# The final report shows the run's settings and command and no longer refreshes (the live
# writes at each epoch end carry a refresh; the last write drops it).
grep -q "<table class='settings'>" "$work/a/report.html" || { echo "report.html has no settings table" >&2; exit 1; }
grep -q "<pre class='command'>[^<]*--out-dir" "$work/a/report.html" || { echo "report.html has no command line" >&2; exit 1; }
if grep -q 'http-equiv="refresh"' "$work/a/report.html"; then echo "the final report.html still refreshes" >&2; exit 1; fi
# Per-rank throughput: one line per rank, from the step times the end-of-step all-reduce carries.
rank_lines() {
  /usr/bin/python3 - "$1" <<'PY'
import sys
html = open(sys.argv[1]).read()
at = html.find(">throughput per rank (samples/s)<")
print(html[at:html.find("</svg>", at)].count("<polyline") if at >= 0 else -1)
PY
}
[ "$(rank_lines "$work/a/report.html")" = "$world" ] || { echo "report.html: expected a per-rank throughput chart with $world line(s), got $(rank_lines "$work/a/report.html")" >&2; exit 1; }
if [ -n "${RECIPE_CHECK:-}" ]; then
  /usr/bin/python3 - "$work/a/metrics.jsonl" "$RECIPE_CHECK" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
epochs = [x for x in records if x.get("kind") == "epoch"]
if not epochs:
    sys.exit(f"{sys.argv[1]} has no epoch record")
r = epochs[-1]
if not eval(sys.argv[2], {}, {"r": r}):
    sys.exit(f"quality check failed: {sys.argv[2]} with r = {r}")
print(f"quality check passed: {sys.argv[2]} with r = {r}")
PY
fi

# Each metrics record's identity: kind and its step/epoch/bucket numbers. A resumed run's
# metrics.jsonl must hold the uninterrupted run's records, each once, in the same order.
same_records() {
  /usr/bin/python3 - "$1" "$2" <<'PY'
import json, sys
def keys(path):
    return [tuple([r.get("kind")] + [r.get(k) for k in ("step", "epoch", "bucket")])
            for r in map(json.loads, filter(str.strip, open(path)))]
want, got = keys(sys.argv[1]), keys(sys.argv[2])
if got != want:
    seen, dup = set(), None
    for k in got:
        if k in seen and dup is None: dup = k
        seen.add(k)
    sys.exit(f"{sys.argv[2]}: {len(got)} records, expected the {len(want)} of {sys.argv[1]}"
             + (f"; {dup} appears twice" if dup else ""))
print(f"{sys.argv[2]}: the uninterrupted run's {len(want)} records, each once")
PY
}

# The "time" of a resumed run's records goes on from the kept records' (never back to 0).
times_increase() {
  /usr/bin/python3 - "$1" <<'PY'
import json, sys
t = [r["time"] for r in map(json.loads, filter(str.strip, open(sys.argv[1])))]
back = [(i, a, b) for i, (a, b) in enumerate(zip(t, t[1:])) if b < a]
if back:
    sys.exit(f"{sys.argv[1]}: time goes back from {back[0][1]} to {back[0][2]} at record {back[0][0] + 1}")
print(f"{sys.argv[1]}: time never goes back ({t[0]:.1f} .. {t[-1]:.1f} s)")
PY
}

echo "== stopped after $stop steps"
set +e; launch --out-dir "$work/b" --stop-after "$stop" --report-every 1 "$@"; code=$?; set -e
if [ "$code" != 75 ]; then echo "expected exit code 75 (preempted), got $code" >&2; exit 1; fi
# --report-every 1: the live report was rewritten after the last step, mid-epoch, and still
# reloads itself (the run is not finished).
grep -q "<tr><td>steps</td><td>$stop</td></tr>" "$work/b/report.html" || { echo "the live report.html was not written at step $stop" >&2; exit 1; }
grep -q 'http-equiv="refresh"' "$work/b/report.html" || { echo "the live report.html does not refresh" >&2; exit 1; }
# As if the run had crashed after its checkpoint rather than stopping there: the records the
# uninterrupted run wrote past this point (which the resumed run writes again), then a line
# torn by the crash.
tail -n "+$(( $(wc -l < "$work/b/metrics.jsonl") + 1 ))" "$work/a/metrics.jsonl" >> "$work/b/metrics.jsonl"
printf '{"kind":"step","st' >> "$work/b/metrics.jsonl"
echo "== resumed"
launch --out-dir "$work/b" --tensorboard "$work/b/tb" "$@" | tee "$work/resume.log"
grep -q "resumed at step $stop" "$work/resume.log" || { echo "the second run did not resume at step $stop" >&2; exit 1; }
# The resumed run's event file asks TensorBoard to drop what earlier files hold from step
# stop + 1 on: an Event {step (key 0x10) stop + 1, session_log (0x3a, 2 bytes) {status (0x08)
# START (1)}} (the purge rule itself is checked in tests/train/test_tensorboard.cpp).
[ "$stop" -lt 127 ] || { echo "this check encodes step $stop + 1 as a one-byte varint" >&2; exit 1; }
start_event=$(printf '\\x10\\x%02x\\x3a\\x02\\x08\\x01' $((stop + 1)))
LC_ALL=C grep -qaP "$start_event" "$work"/b/tb/events.out.tfevents.* ||
  { echo "the resumed run's event file has no SessionLog START at step $((stop + 1))" >&2; exit 1; }
if ! cmp "$work/a/checkpoint.lsck" "$work/b/checkpoint.lsck"; then
  echo "resumed run's final checkpoint differs from the uninterrupted run's" >&2; exit 1
fi
echo "resumed run is bitwise equal to the uninterrupted run"
same_records "$work/a/metrics.jsonl" "$work/b/metrics.jsonl"
times_increase "$work/b/metrics.jsonl"

if [ -n "${LOCKSTEP_RUN:-}" ]; then
  echo "== under lockstep-run --max-restarts 1, one worker killed with SIGKILL after the first checkpoint"
  "$LOCKSTEP_RUN" --standalone --nproc-per-node "$world" --max-restarts 1 "$bin" --progress lines \
    --threads 1 --out-dir "$work/c" --checkpoint-every 2 "$@" > "$work/c.log" 2>&1 &
  launcher=$!
  for _ in $(seq 1 3000); do  # bounded wait for the first checkpoint file (up to 300 s)
    [ -f "$work/c/checkpoint.lsck" ] && break
    sleep 0.1
  done
  victim=$(pgrep -P "$launcher" | head -1 || true)
  [ -n "$victim" ] || { cat "$work/c.log"; echo "no worker to kill" >&2; exit 1; }
  kill -9 "$victim"
  set +e; wait "$launcher"; code=$?; set -e
  if [ "$code" != 0 ]; then cat "$work/c.log"; echo "lockstep-run exited $code" >&2; exit 1; fi
  grep -q "resumed at step" "$work/c.log" || { cat "$work/c.log"; echo "the restarted ranks did not resume" >&2; exit 1; }
  cmp "$work/a/checkpoint.lsck" "$work/c/checkpoint.lsck" || { echo "the run restarted after kill -9 differs from the uninterrupted run" >&2; exit 1; }
  echo "the run restarted after kill -9 is bitwise equal to the uninterrupted run"
  same_records "$work/a/metrics.jsonl" "$work/c/metrics.jsonl"
  times_increase "$work/c/metrics.jsonl"
fi

echo "== config file errors"
echo '{"learning_rate": 0.1}' > "$work/bad_key.json"
set +e; out=$("$bin" --config "$work/bad_key.json" 2>&1); code=$?; set -e
[ "$code" = 2 ] && grep -q "unknown key 'learning_rate'" <<<"$out" || { echo "bad key not rejected: $code $out" >&2; exit 1; }
echo '{"epochs": "many"}' > "$work/bad_value.json"
set +e; out=$("$bin" --config "$work/bad_value.json" 2>&1); code=$?; set -e
[ "$code" = 2 ] && grep -q "bad value for 'epochs'" <<<"$out" || { echo "bad value not rejected: $code $out" >&2; exit 1; }
set +e; out=$("$bin" --report-every -1 2>&1); code=$?; set -e
[ "$code" = 2 ] && grep -q -- "--report-every must be >= 0" <<<"$out" || { echo "negative --report-every not rejected: $code $out" >&2; exit 1; }
# Into a file: `grep -q` on a pipe exits at the match and a help longer than stdio's buffer
# then dies of SIGPIPE (exit 141 under pipefail).
"$bin" --help > "$work/help.txt"
grep -q -- "--checkpoint-every" "$work/help.txt"
grep -q -- "--report-every" "$work/help.txt"
echo "PASS"
