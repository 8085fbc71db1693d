#!/usr/bin/env bash
# Recipe runs that must fail with exit code 1 (Note [Recipe exit codes]) and say why:
#   1. a CSV with a NaN (then an Inf) in a record is rejected before training, naming the file,
#      the data row and the column;
#   2. a run whose loss becomes non-finite (here: an absurd learning rate) stops on every rank
#      with the same exit code, naming the step and the ranks, and writes no checkpoint of it;
#   3. a checkpoint without the data sampler's state (as written before the recipes used
#      lockstep::ShardedSampler) is refused with the way out;
# and runs that must exit 2 (bad command line) before anything starts, for every recipe given:
#   4. --device cuda where no CUDA device is visible (CUDA_VISIBLE_DEVICES is emptied, so this
#      holds with a CUDA LibTorch on a GPU machine too) says why and what to use instead, and
#      --device with an unknown value names what is allowed; --device auto falls back to the CPU
#      and trains.
# Usage: errors_test.sh SALES_FORECAST_BINARY [OTHER_RECIPE_BINARY...]
set -euo pipefail
bin=$1
recipes=("$@")
work=$(mktemp -d "${TMPDIR:-/tmp}/lockstep_nonfinite.XXXXXX")
trap 'rm -rf "$work"' EXIT

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Writes a CSV of one store over 100 days (from 2021-03-01) whose data row BAD has VALUE as
# its sales.
# Runs the recipe as one process with the given flags; it must exit 1 saying `expected`.
expect_failure() {
  local expected=$1 out code
  shift
  set +e
  out=$(LOCKSTEP_STANDALONE=1 LOCKSTEP_LOG_LEVEL=warn "$bin" --progress lines "$@" 2>&1)
  code=$?
  set -e
  if [ "$code" != 1 ] || ! grep -qF -- "$expected" <<<"$out"; then
    echo "expected exit code 1 and \"$expected\", got $code:" >&2
    echo "$out" >&2
    exit 1
  fi
}

write_csv() {
  /usr/bin/python3 - "$1" "$2" "$3" <<'PY'
import datetime, sys
path, bad, value = sys.argv[1], int(sys.argv[2]), sys.argv[3]
day0 = datetime.date(2021, 3, 1)
with open(path, "w") as f:
    f.write("date,store,promo,holiday,sales\n")
    for d in range(100):
        sales = value if d + 1 == bad else str(100 + (d * 37) % 50)
        f.write(f"{(day0 + datetime.timedelta(days=d)).strftime('%Y%m%d')},0,0,0,{sales}\n")
PY
}

for value in nan inf; do
  echo "== a CSV with $value in data row 60"
  write_csv "$work/$value.csv" 60 "$value"
  expect_failure "'$work/$value.csv' data row 60, column 'sales': expected a finite number, but got $value" \
    --data "$work/$value.csv" --val-days 10 --out-dir "$work/out_$value"
  if [ -e "$work/out_$value/checkpoint.lsck" ]; then echo "a checkpoint was written" >&2; exit 1; fi
done

echo "== a loss that becomes non-finite, 2 ranks"
write_csv "$work/good.csv" 0 0
port=$(free_port)
pids=()
for r in 0 1; do
  RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    LOCKSTEP_LOG_LEVEL=warn "$bin" --progress lines --threads 1 --data "$work/good.csv" \
    --val-days 10 --batch-size 8 --lr 1e30 --out-dir "$work/lr" > "$work/lr$r.log" 2>&1 &
  pids+=($!)
done
for r in 0 1; do
  code=0
  wait "${pids[$r]}" || code=$?
  # DDP's non-finite policy (kAbort in the recipes) stops backward first, naming the step and
  # where it began; the loss check after the step is the second line of defence.
  if [ "$code" != 1 ] || ! grep -qE "non-finite \(NaN or Inf\) gradient at iteration [0-9]+: began on rank [01] parameter '[a-z0-9_.]+'|the training loss is not finite at step [0-9]+ on rank\(s\) 0, 1" "$work/lr$r.log"; then
    echo "rank $r: expected exit code 1 and a non-finite gradient or loss error naming the step, got $code:" >&2
    cat "$work/lr$r.log" >&2
    exit 1
  fi
done
grep -hE "non-finite|not finite" "$work/lr0.log" | head -1
if [ -e "$work/lr/checkpoint.lsck" ]; then echo "a checkpoint was written" >&2; exit 1; fi

echo "== a checkpoint without the sampler state"
set +e
LOCKSTEP_STANDALONE=1 LOCKSTEP_LOG_LEVEL=warn "$bin" --progress lines --data "$work/good.csv" --val-days 10 --batch-size 8 \
  --stop-after 1 --out-dir "$work/old" > "$work/old.log" 2>&1
code=$?
set -e
[ "$code" = 75 ] || { cat "$work/old.log" >&2; echo "expected exit code 75, got $code" >&2; exit 1; }
# Rename the metadata key "sampler" (same length, so only the header checksum changes).
/usr/bin/python3 - "$work/old/checkpoint.lsck" <<'PY'
import struct, sys, zlib
path = sys.argv[1]
data = bytearray(open(path, "rb").read())
(header_len,) = struct.unpack_from("<Q", data, 12)
header = bytes(data[20:20 + header_len])
assert header.count(b'"sampler":"') == 1, header[:400]
header = header.replace(b'"sampler":"', b'"samplex":"')
data[20:20 + header_len] = header
struct.pack_into("<I", data, 20 + header_len, zlib.crc32(header) & 0xffffffff)
open(path, "wb").write(bytes(data))
PY
expect_failure "holds no data sampler state (written before the recipes used lockstep::ShardedSampler); start afresh with --resume=false or another --out-dir" \
  --data "$work/good.csv" --val-days 10 --batch-size 8 --out-dir "$work/old"
# Runs recipe $1 as one process with the remaining flags and no visible CUDA device; it must
# exit 2 saying `expected`, without having started (no output directory).
expect_usage_error() {
  local recipe=$1 expected=$2 out code
  shift 2
  set +e
  out=$(CUDA_VISIBLE_DEVICES= LOCKSTEP_STANDALONE=1 "$recipe" --progress lines \
        --out-dir "$work/never" "$@" 2>&1)
  code=$?
  set -e
  if [ "$code" != 2 ] || ! grep -qF -- "$expected" <<<"$out"; then
    echo "$(basename "$recipe") $*: expected exit code 2 and \"$expected\", got $code:" >&2
    echo "$out" >&2
    exit 1
  fi
  if [ -e "$work/never" ]; then echo "$(basename "$recipe") $*: it started" >&2; exit 1; fi
}

for recipe in "${recipes[@]}"; do
  echo "== $(basename "$recipe") --device without a visible CUDA device, and a bad --device"
  expect_usage_error "$recipe" "error: --device cuda: Expected a CUDA device for device 'cuda', but no CUDA device is visible: this LibTorch is CPU-only, or there is no GPU, or CUDA_VISIBLE_DEVICES='' hides them. Use device 'cpu', or 'auto' (CUDA when a device is visible, else the CPU)." \
    --device cuda
  expect_usage_error "$recipe" "error: --device cuda:1: Expected a CUDA device for device 'cuda:1', but no CUDA device is visible" \
    --device cuda:1
  expect_usage_error "$recipe" "error: --device gpu: Expected a device 'auto', 'cpu', 'cuda' or 'cuda:N' (N a device index), but got 'gpu'." \
    --device gpu
done

echo "== --device auto without a visible CUDA device trains on the CPU"
set +e
out=$(CUDA_VISIBLE_DEVICES= LOCKSTEP_STANDALONE=1 LOCKSTEP_LOG_LEVEL=warn "$bin" --progress lines \
      --device auto --data "$work/good.csv" --val-days 10 --batch-size 8 --max-steps 3 \
      --out-dir "$work/auto" 2>&1)
code=$?
set -e
if [ "$code" != 0 ] || ! grep -qF "3 steps on 1 rank(s)" <<<"$out"; then
  echo "--device auto: expected exit code 0 and 3 steps, got $code:" >&2
  echo "$out" >&2
  exit 1
fi
echo "PASS"
