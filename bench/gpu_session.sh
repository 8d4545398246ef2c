#!/usr/bin/env bash
# One GPU session's measurements, in stages that each fit one device call (10 min).
# Run on the device machine from the repo root, after ../shared/gpu/prepare-wheels.sh
# has filled .whl/ here (carry ".whl"):
#
#   bash bench/gpu_session.sh install tests vera     # call 1: ~8 min
#   bash bench/gpu_session.sh install lora           # call 2: issue 4's table
#   bash bench/gpu_session.sh install nf4 engine     # call 3: issue 7's table, the engine
#
# (install again in every call: a machine given back between calls comes back bare)
# Each stage writes $OUT/<stage>.log (the table as printed) and its JSON results to
# $OUT/ (at most 8 files come back); a stage that fails does not stop the next.
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

stage() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name exit $? after ${SECONDS}s in all"
  tail -n 60 "$OUT/$name.log"
}

for s in "$@"; do
  case $s in
    install)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$HOME/site" .whl/*.whl &&
        python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$HOME/site" . ||
        { echo "install failed"; exit 1; }
      export PYTHONPATH=$HOME/site
      nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
      ;;
    tests)  # the GPU-marked tests: kernels against their refs, CUDA-graph replay, bf16 engine
      stage tests 300 python3 -P -m pytest -q -m gpu -p no:cacheprovider tests  # -P: the repo root would shadow PyPI kernels
      ;;
    lora)  # issue 4's table: LoRA decode and prefill rows
      stage lora 540 python3 bench/lora_kernels.py --phases decode prefill --budget 0.15 --out "$OUT/lora_kernels.json"
      ;;
    vera)  # issue 4's VeRA rows: shared projections vs folded factors
      stage vera 240 python3 bench/lora_kernels.py --phases vera --budget 0.15 --out "$OUT/lora_kernels_vera.json"
      ;;
    nf4)  # issue 7's table and the tile sweep that sets the crossovers
      stage nf4 420 python3 bench/nf4_matmul.py --sweep --budget 0.1 --out "$OUT/nf4_matmul.json"
      ;;
    engine)  # loraplex vs PEFT mixed-adapter batches on the tiny model, bf16
      stage engine 240 python3 bench/engine_mixed.py --device cuda --json "$OUT/engine_mixed.json"
      ;;
    *)
      echo "unknown stage $s (install tests lora vera nf4 engine)"
      exit 2
      ;;
  esac
done
