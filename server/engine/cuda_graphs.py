"""CUDA graphs of the decode forward, one per batch-size bucket.

At warm-up, for each bucket B (1, 2, 4, 8, 16, 24, 32, ... up to max_running), the step
context is filled with B dummy decode rows and the model's forward is captured once (all
buckets share one memory pool, the largest captured first). A pure decode step of n ≤
max bucket sequences then runs as: fill the context for the smallest bucket B ≥ n (rows
n..B-1 are padding: base-only tokens whose KV rows are -1, so nothing is written, and
empty sequences), replay B's graph, read the first n rows of its logits. Steps with a
prefill chunk, and decode steps past the largest bucket, run eagerly.

What makes a replay valid: the forward reads only the step context's buffers (the same
tensors every step for a given token count), its launches depend only on host integers
that are fixed per bucket, the adapter layers run every kernel and vector whatever is
resident (`LlamaModel.bind(static_adapters=True)`), and it never synchronises
(tests/engine/test_graph_safe_step.py records two steps of a bucket on the CPU). The
token→slot mapping is built eagerly in `StepContext.fill`, and sampling runs eagerly
after the replay (it has host-side branches per sampling mode).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from loraplex.server.engine.step_context import StepContext, StepInputs

log = logging.getLogger(__name__)


def buckets_for(max_running: int, max_tokens: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_running (and max_running itself), within max_tokens."""
    limit = min(max_running, max_tokens)
    sizes = [b for b in (1, 2, 4, 8) if b <= limit] + list(range(16, limit + 1, 8))
    if limit not in sizes:
        sizes.append(limit)
    return sizes


@dataclass(frozen=True)
class CaptureStats:
    buckets: int
    seconds: float
    bytes: int  # device memory the graphs' pool took


class DecodeGraphs:
    def __init__(self, model, step: StepContext, buckets: list[int]):
        self.model = model
        self.step = step
        self.buckets = sorted(buckets)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}  # [B, vocab] float32, the graph's output
        self.stats: CaptureStats | None = None
        self.replays = 0

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def capture(self) -> CaptureStats:
        """Captures every bucket (on the calling thread's current stream: the engine's)."""
        device = self.step.device
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_reserved(device)
        start = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        for b in reversed(self.buckets):  # the largest first: the smaller ones reuse its pool
            fill_for_capture(self.step, b)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                self.model()  # warm up: Triton compiles, allocator settles
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the adapter validator may pin host memory meanwhile, which a
            # global-mode capture would refuse (and be invalidated by)
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                self._logits[b] = self.model()
            self._graphs[b] = graph
        torch.cuda.synchronize(device)
        self.stats = CaptureStats(len(self.buckets), time.monotonic() - start, torch.cuda.memory_reserved(device) - before)
        log.info("captured CUDA graphs of %d decode buckets (%s) in %.1f s, %.1f MiB",
                 self.stats.buckets, self.buckets, self.stats.seconds, self.stats.bytes / 2**20)  # fmt: skip
        return self.stats

    def run(self, inputs: StepInputs) -> torch.Tensor | None:
        """[n, vocab] logits of a pure decode step by replay, or None when no bucket fits."""
        n = len(inputs.context_lens)
        b = self.bucket(n)
        if b is None or b not in self._graphs or len(inputs.input_ids) != n or len(inputs.logits_rows) != n:
            return None
        self.step.fill(dataclasses.replace(inputs, logits_rows=list(range(b))), pad_tokens=b - n, pad_seqs=b - n)
        self._graphs[b].replay()
        self.replays += 1
        return self._logits[b][:n]


def fill_for_capture(step: StepContext, b: int) -> None:
    """Fills `step` with b decode rows of context 1 on block 0, base only, writing no KV
    row: what a bucket's graph is captured from. The layers, bound static, still run the
    adapter kernels on it (AdapterLinear.forward), so the graph holds them."""
    step.fill(StepInputs([0] * b, [0] * b, [-1] * b, [-1] * b, list(range(b + 1)), [1] * b, [[0]] * b, list(range(b))))
