#!/usr/bin/env bash
# The whole GPU verification in ONE device call of at most 9 minutes on a fresh machine,
# installation included. Here, first (fills .whl/, git-ignored):
#
#   ../shared/gpu/prepare-wheels.sh
#
# then one device call: command `bash bench/gpu_check.sh`, carry [".whl"], timeout_s 600.
#
# Steps, each under `timeout` with its own budget (they sum to <= 540 s), each logged; a
# failing step does not stop the next:
#   1 install (wheels and the project into $HOME/site, no index, no deps) + nvidia-smi  30 s
#   2 the GPU tests (pytest -m gpu; a fresh machine compiles every kernel variant): the
#     engine's first (the whole model on CUDA: graphs, overlapped steps, side-stream
#     loads), then the kernels', each with its own budget so that one that runs out does
#     not take the other's results with it                                        90 + 120 s
#   3 short kernel tables: adapter shrink/expand, NF4 matmul, paged attention and the
#     elementwise kernels (the last two only where their bench files exist)            115 s
#   4 one adapter's device write (bench/adapter_writes.py: launches and issue time)     15 s
#   5 the end-to-end engine bench (bench/engine_e2e.py; loraplex on the fused NF4
#     kernel, bitsandbytes if that fails, which it says)                             170 s
# Writes to $OUT (default bench/results/gpu) 4 files: gpu_check.log (every step's whole
# output, tables included), gpu_check-summary.txt (step, exit status, seconds),
# engine_e2e.json, and gpu_check-results.tar (every bench's JSON and PNG: kernel GB/s
# against the copy bandwidth, the e2e tokens/s). The e2e model directory stays in
# ~/llama3-8b-8layer for bench/gpu_adapters.sh, the adapter residency benches: a second
# call, for the minutes that are left, while the machine is still warm.
# Without a GPU (no nvidia-smi, or torch sees no CUDA) it exits 3 at once with a message.
NAME=gpu_check
source "$(dirname "$0")/gpu_steps.sh"

# 1: install
install

# 2: the GPU-marked tests: kernels against their refs, CUDA-graph replay, the bf16 engine
# (-P: the repo root must not shadow the installed package; a PyPI `kernels` exists too).
# Only the folders that hold GPU tests are collected: the image lacks the HTTP, Ray and
# hypothesis packages that other test folders import.
# -v: one line per test as it ends, so that a timed-out run still shows how far it got.
step tests_engine 90 python3 -P -m pytest -v -m gpu -p no:cacheprovider --durations=10 tests/engine
step tests_kernels 120 python3 -P -m pytest -v -m gpu -p no:cacheprovider --durations=10 tests/kernels

# 3: short kernel tables
step lora_kernels 40 python3 bench/lora_kernels.py --phases decode --ranks 16 --budget 0.03 --out "$RESULTS/lora_kernels.json"
step nf4_matmul 30 python3 bench/nf4_matmul.py --m 1 32 256 2048 --budget 0.03 --out "$RESULTS/nf4_matmul.json"
optional paged_attention 30 bench/paged_attention.py --budget 0.03 --out "$RESULTS/paged_attention.json"
optional elementwise 15 bench/elementwise.py --budget 0.03 --out "$RESULTS/elementwise.json"

# 4: one adapter's write into a device slot, at Llama-3-8B's shapes (8 and 32 layers)
step adapter_writes 15 python3 bench/adapter_writes.py --device cuda --shapes llama3-8b-8layer llama3-8b --json "$RESULTS/adapter_writes.json"

# 5: end to end: loraplex (32 / 1 / no adapters) and HF NF4 + PEFT on 8 layers of Llama-3-8B
step engine_e2e 170 python3 bench/engine_e2e.py --model-dir "$MODEL_DIR" --json "$RESULTS/engine_e2e.json" --png "$RESULTS/engine_e2e.png"

cp "$RESULTS/engine_e2e.json" "$OUT"/ 2>/dev/null
pack
