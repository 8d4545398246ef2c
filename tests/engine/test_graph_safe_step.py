"""The decode forward is graph-safe, proven on the CPU: two decode steps of the same
bucket with different contents (other adapters, other context lengths, other block
tables) run the same ops with the same shapes as the base-only rows a bucket's graph is
captured from, and none of them synchronises with the host. The CUDA configuration's ops run in Triton's interpreter (the Triton launches are
recorded by name, with their tensor arguments' shapes)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loraplex.server.engine.adapter_pages import AdapterPages
from loraplex.server.engine.cuda_graphs import fill_for_capture
from loraplex.server.engine.step_context import StepContext, StepInputs
from loraplex.server.model.attention import KVCache
from loraplex.server.model.loader import LoadSpec, load_model
from loraplex.server.model.ops import model_ops
from lora_dirs import write_lora
from peft_adapters import TINY

# aten ops that read a device value back to the host, or whose output shape depends on values
SYNCING = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique2", "bincount", "is_nonzero",
           "repeat_interleave", "tolist", "equal"}  # fmt: skip
BUCKET, BLOCK, SLOTS = 4, 16, 3


class Recorder(TorchDispatchMode):
    """Records every aten op and every Triton launch (name, tensor shapes, host ints)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((func.overloadpacket.__name__, shapes))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        import triton.runtime.interpreter as interp

        self._real = real = interp.InterpretedFunction.run
        rec = self

        def run(fn, *args, grid, **kwargs):
            sig = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args if isinstance(a, (torch.Tensor, int)))
            rec.ops.append((f"triton:{fn.fn.__name__}", sig, tuple(grid) if isinstance(grid, tuple) else "fn"))
            with torch.utils._python_dispatch._disable_current_modes():  # the interpreter's own copies are not the step's ops
                return real(fn, *args, grid=grid, **kwargs)

        interp.InterpretedFunction.run = run
        return super().__enter__()

    def __exit__(self, *exc):
        import triton.runtime.interpreter as interp

        interp.InterpretedFunction.run = self._real
        return super().__exit__(*exc)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from loraplex.adapters.loader import load_adapter_dir

    model = load_model(TINY, LoadSpec())
    pages = AdapterPages(model, SLOTS, 32)
    root = tmp_path_factory.mktemp("graph")
    for slot, rank in enumerate((4, 16, 32)):
        pages.write(slot, load_adapter_dir(write_lora(root / f"a{slot}", rank=rank, seed=slot), model, max_rank=32, dtype=torch.float32))
    return model


def decode_step(contexts: list[int], slots: list[int], first_block: int) -> StepInputs:
    """One decode token per sequence; sequence b's blocks start at first_block + 8b."""
    tables = [[first_block + 8 * b + j for j in range(-(-n // BLOCK))] for b, n in enumerate(contexts)]
    rows = [t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for t, n in zip(tables, contexts)]
    return StepInputs([5 + b for b in range(len(contexts))], [n - 1 for n in contexts], rows, slots,
                      list(range(len(contexts) + 1)), contexts, tables, list(range(len(contexts))))  # fmt: skip


def test_two_decode_steps_of_one_bucket_run_the_same_ops_without_a_sync(model):
    c = model.config
    cache = KVCache(c.num_layers, 64, BLOCK, c.num_kv_heads, c.head_dim, model.dtype, model.device)
    step = StepContext(cache, BUCKET, BUCKET, 8, SLOTS, model.device, c.sliding_window)
    model.bind(step, model_ops("cpu", lora="triton", kernels="triton"), 128, static_adapters=True)
    traces = []
    for contexts, slots, first in (([3, 17, 40, 9], [0, 1, -1, 2], 0), ([30, 2, 5, 61], [2, 2, 0, -1], 32)):
        step.fill(decode_step(contexts, slots, first))
        with Recorder() as rec:
            logits = model()
        assert logits.shape == (BUCKET, c.vocab_size) and torch.isfinite(logits).all()
        traces.append(rec.ops)
    fill_for_capture(step, BUCKET)  # what a bucket's graph is captured from: base-only padding rows
    with Recorder() as rec:
        model()
    first, second = traces
    assert first == second  # the same ops, in the same order, with the same shapes
    assert rec.ops == first  # the captured graph holds every kernel a real step of the bucket runs
    names = {op[0] for op in first}
    assert not names & SYNCING, names & SYNCING
    launched = {name for name in names if name.startswith("triton:")}
    assert {"triton:_shrink_kernel", "triton:_expand_kernel", "triton:_paged_attention_kernel", "triton:_rope_kv_kernel",
            "triton:_rms_norm_kernel", "triton:_silu_mul_kernel"} <= launched  # fmt: skip


def test_the_step_context_fills_in_one_copy_with_padding(model):
    c = model.config
    cache = KVCache(c.num_layers, 64, BLOCK, c.num_kv_heads, c.head_dim, model.dtype, model.device)
    step = StepContext(cache, 8, 8, 8, SLOTS, model.device, c.sliding_window)
    step.fill(decode_step([3, 17], [0, -1], 0), pad_tokens=2, pad_seqs=2)
    assert step.num_tokens == 4 and step.num_seqs == 4
    assert step.kv_rows.tolist()[2:] == [-1, -1] and step.context_lens[:4].tolist() == [3, 17, 0, 0]
    assert step.query_starts[:5].tolist() == [0, 1, 2, 2, 2] and step.mapping.token_slots.tolist() == [0, -1, -1, -1]
    with pytest.raises(ValueError, match="exceeds the context"):
        step.fill(decode_step([3] * 9, [0] * 9, 0))


def test_decode_buckets():
    from loraplex.server.engine.cuda_graphs import buckets_for

    assert buckets_for(64, 2048) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert buckets_for(20, 2048) == [1, 2, 4, 8, 16, 20] and buckets_for(64, 3) == [1, 2, 3]
