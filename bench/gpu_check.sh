#!/usr/bin/env bash
# The whole GPU verification in ONE device call of at most 9 minutes on a fresh machine,
# installation included. Here, first (fills .whl/, git-ignored):
#
#   ../shared/gpu/prepare-wheels.sh
#
# then one device call: command `bash bench/gpu_check.sh`, carry [".whl"], timeout_s 600.
#
# Steps, each under `timeout` with its own budget (they sum to <= 530 s), each logged; a
# failing step does not stop the next:
#   1 install (wheels and the project into $HOME/site, no index, no deps) + nvidia-smi  45 s
#   2 the GPU tests (pytest -m gpu)                                                    170 s
#   3 short kernel tables: adapter shrink/expand, NF4 matmul, paged attention and the
#     elementwise kernels (the last two only where their bench files exist)            145 s
#   4 the end-to-end engine bench (bench/engine_e2e.py)                                170 s
# Writes to $OUT (default bench/results/gpu) at most 8 files: gpu_check.log (every step's
# whole output), summary.txt (step, exit status, seconds), the five benches' JSON, and
# plots.tar (their PNGs: kernel GB/s against the copy bandwidth, the e2e tokens/s).
# Without a GPU (no nvidia-smi, or torch sees no CUDA) it exits 3 at once with a message.
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.txt
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
TMP_STEP=$(mktemp)
PLOTS=$(mktemp -d)  # the benches write PNGs beside their JSON: kept here, tarred into $OUT at the end
trap 'rm -rf "$TMP_STEP" "$PLOTS"' EXIT

fail_no_gpu() {
  echo "gpu_check: no GPU here ($1). Run it on the GPU machine: one device call with carry [\".whl\"]" \
    "running 'bash bench/gpu_check.sh' (after ../shared/gpu/prepare-wheels.sh here)." | tee -a "$LOG" >&2
  echo "no-gpu 3 0 ($1)" >>"$SUMMARY"
  exit 3
}

command -v nvidia-smi >/dev/null 2>&1 || fail_no_gpu "nvidia-smi not found"
timeout 20 nvidia-smi -L >/dev/null 2>&1 || fail_no_gpu "nvidia-smi lists no GPU"
timeout 60 python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 ||
  fail_no_gpu "python3's torch sees no CUDA device"

step() { # name, seconds, command...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >"$TMP_STEP" 2>&1
  rc=$?
  cat "$TMP_STEP" >>"$LOG"
  tail -n 25 "$TMP_STEP"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "== $name TIMED OUT after ${limit}s" | tee -a "$LOG"
  echo "== $name exit $rc in $((SECONDS - t0))s (${SECONDS}s in all)" | tee -a "$LOG"
  printf '%-16s exit %-4s %4ss\n' "$name" "$rc" "$((SECONDS - t0))" >>"$SUMMARY"
}

optional() { # name, seconds, bench file, args...: runs the bench if another engineer's file is there
  local name=$1 limit=$2 file=$3
  shift 3
  if [ -f "$file" ]; then
    step "$name" "$limit" python3 "$file" "$@"
  else
    echo "== $name: $file missing" | tee -a "$LOG"
    printf '%-16s missing\n' "$name" >>"$SUMMARY"
  fi
}

# 1: install (the later steps need $HOME/site on the path even if it failed part-way)
step install 45 bash -c '
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$HOME/site" .whl/*.whl &&
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$HOME/site" . &&
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv'
export PYTHONPATH=$HOME/site

# 2: the GPU-marked tests: kernels against their refs, CUDA-graph replay, the bf16 engine
# (-P: the repo root must not shadow the installed package; a PyPI `kernels` exists too).
# Only the folders that hold GPU tests are collected: the image lacks the HTTP, Ray and
# hypothesis packages that other test folders import.
step tests 170 python3 -P -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/engine

# 3: short kernel tables
step lora_kernels 50 python3 bench/lora_kernels.py --phases decode --ranks 16 --budget 0.03 --out "$PLOTS/lora_kernels.json"
step nf4_matmul 35 python3 bench/nf4_matmul.py --m 1 16 32 64 256 2048 --budget 0.03 --out "$PLOTS/nf4_matmul.json"
optional paged_attention 40 bench/paged_attention.py --budget 0.03 --out "$PLOTS/paged_attention.json"
optional elementwise 20 bench/elementwise.py --budget 0.03 --out "$PLOTS/elementwise.json"

# 4: end to end: loraplex (32 / 1 / no adapters) and HF NF4 + PEFT on 8 layers of Llama-3-8B
step engine_e2e 170 python3 bench/engine_e2e.py --json "$PLOTS/engine_e2e.json" --png "$PLOTS/engine_e2e.png"

cp "$PLOTS"/*.json "$OUT"/ 2>/dev/null
(cd "$PLOTS" && ls *.png >/dev/null 2>&1 && tar cf "$OUT/plots.tar" *.png) || echo "no plots" | tee -a "$LOG"

echo "== summary (${SECONDS}s in all)"
cat "$SUMMARY"
! grep -qE 'exit +[1-9]' "$SUMMARY"
