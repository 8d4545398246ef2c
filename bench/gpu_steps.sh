# Sourced by bench/gpu_check.sh and bench/gpu_adapters.sh (set NAME first): the output
# folder, the GPU check, the timed steps, the install and the packing of the results.
#   $OUT (default bench/results/gpu): $NAME.log (every step's whole output), $NAME-summary.txt
#   (step, exit status, seconds); `pack` adds $NAME-results.tar (the benches' JSON and PNGs,
#   written under $RESULTS meanwhile).
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOG=$OUT/$NAME.log
SUMMARY=$OUT/$NAME-summary.txt
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
TMP_STEP=$(mktemp)
RESULTS=$(mktemp -d) # the benches' JSON and PNGs: kept here, tarred into $OUT by `pack`
trap 'rm -rf "$TMP_STEP" "$RESULTS"' EXIT
MODEL_DIR=$HOME/llama3-8b-8layer # written by the first bench that needs it, reused by the next

fail_no_gpu() {
  echo "$NAME: no GPU here ($1). Run it on the GPU machine: one device call with carry [\".whl\"]" \
    "running 'bash bench/$NAME.sh' (after ../shared/gpu/prepare-wheels.sh here)." | tee -a "$LOG" >&2
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

install() { # the wheels and the project into $HOME/site, no index, no deps (the later steps need it on the path)
  step install 30 bash -c '
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$HOME/site" .whl/*.whl &&
      python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$HOME/site" . &&
      nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv'
  export PYTHONPATH=$HOME/site
}

pack() { # every JSON and PNG under $RESULTS into $OUT/$NAME-results.tar; the summary; exit 1 if a step failed
  (cd "$RESULTS" && files=$(ls ./*.json ./*.png 2>/dev/null); [ -n "$files" ] && tar cf "$OUT/$NAME-results.tar" $files) ||
    echo "no results to pack" | tee -a "$LOG"
  echo "== summary (${SECONDS}s in all)"
  cat "$SUMMARY"
  ! grep -qE 'exit +[1-9]' "$SUMMARY"
}
