#!/usr/bin/env bash
# The adapter residency benches on a GPU (issue 12's GPU figures), in one device call of
# at most 4.5 minutes: the second call of a GPU session, right after bench/gpu_check.sh
# while the machine is warm (it then reuses the installed packages and gpu_check's model
# directory; on a fresh machine it installs and writes the model itself, and the cold
# adapter bench may not finish in its budget). Command `bash bench/gpu_adapters.sh`,
# carry [".whl"], timeout_s 290.
#   1 install, unless gpu_check's is there                                             30 s
#   2 cold adapters under steady decode, 8 layers of Llama-3-8B (bench/cold_adapter.py):
#     step p99 with loads in flight against the no-load p50 (target <= 1.1x), cold
#     TTFT from the host cache against warm (target <= warm + 20 ms)                  130 s
#   3 throughput with 1 to 1,000 adapters in rotation (bench/many_adapters.py, the
#     bundled model, every adapter in the host cache first as in S-LoRA's figure;
#     target <= 10% loss)                                                              75 s
#   4 the engine thread's host work per decode step, forward excluded (bench/step_host.py) 30 s
# Writes to $OUT (default bench/results/gpu): gpu_adapters.log, gpu_adapters-summary.txt
# and gpu_adapters-results.tar (the JSON and PNGs). Exits 3 at once without a GPU.
NAME=gpu_adapters
source "$(dirname "$0")/gpu_steps.sh"

if PYTHONPATH=$HOME/site python3 -P -c "import loraplex.server, bitsandbytes" >/dev/null 2>&1; then  # -P: not the repo's own folder
  export PYTHONPATH=$HOME/site
  echo "== install: found in $HOME/site" | tee -a "$LOG"
else
  install
fi

step cold_adapter 130 python3 bench/cold_adapter.py --device cuda --model-shape llama3-8b-8layer --model-dir "$MODEL_DIR" \
  --json "$RESULTS/cold_adapter.json"
step many_adapters 75 python3 bench/many_adapters.py --device cuda --dirs 0 --rotation 1 10 100 1000 --requests 400 --rate 40 \
  --warm-host --validate-seconds 15 \
  --json "$RESULTS/many_adapters.json"
step step_host 30 python3 bench/step_host.py --device cuda --lengths 64 768 --steps 30 --json "$RESULTS/step_host.json"

pack
