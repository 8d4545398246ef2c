"""The CUDA configuration's adapter path, run on the CPU: the Triton shrink/expand
kernels (Triton's interpreter) inside the real runner, with its preallocated mapping
buffers and tile lists, give the tokens of the torch ops; and a bf16 model (CUDA's
compute dtype) gives the torch ops' logits through the kernels."""

import pytest
import torch

from loraplex.adapters.loader import load_adapter_dir
from loraplex.server.model.ops import model_ops
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.request import GenerationRequest, SamplingParams
from loraplex.server.model.llama import score_sequence
from loraplex.server.engine.adapter_pages import AdapterPages
from loraplex.server.model.loader import LoadSpec, load_model
from peft_adapters import ALL_KINDS as KINDS, TINY, save_peft_adapter  # with LoHa and LoKr

PROMPTS = ["the cat", "a small bird watches the", "our team"]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    for i, kind in enumerate(KINDS):
        save_peft_adapter(kind, root / kind, seed=20 + i)
    return {kind: root / kind for kind in KINDS}


def _mixed_batch_tokens(backend, adapter_dirs):
    engine = Engine.from_config(EngineConfig(model_dir=TINY, kv_cache_tokens=1024, max_batch_tokens=48,
                                             adapter_slots=len(KINDS), max_rank=32, lora_backend=backend))  # fmt: skip
    for kind, path in adapter_dirs.items():
        engine.adapters.add(kind, path)
    engine.start()
    try:
        jobs = [(kind, PROMPTS[i % len(PROMPTS)]) for i, kind in enumerate(list(KINDS) + [None])]
        handles = [engine.submit(GenerationRequest(engine.tokenizer.encode(p), SamplingParams(max_new_tokens=5, ignore_eos=True),
                                                   adapter_id=kind)) for kind, p in jobs]  # fmt: skip
        return [h.result(timeout=300).token_ids for h in handles]
    finally:
        engine.shutdown(1.0)


def test_triton_ops_in_the_runner_give_the_torch_tokens(adapter_dirs):
    # all requests in one batch: prefill chunks and decode tokens of every adapter type (LoHa, LoKr too) and base rows
    got = _mixed_batch_tokens("triton", adapter_dirs)
    want = _mixed_batch_tokens("torch", adapter_dirs)
    assert got == want
    assert len({tuple(t) for t in want}) > 3  # the adapters really change the tokens


def test_bf16_model_through_the_kernels(adapter_dirs):
    ids = [1] + [b + 3 for b in b"the teacher paints"]
    bf16 = load_model(TINY, LoadSpec(dtype=torch.bfloat16))
    fp32 = load_model(TINY, LoadSpec())
    bf16_pages, fp32_pages = AdapterPages(bf16, len(KINDS), 32), AdapterPages(fp32, len(KINDS), 32)
    for slot, kind in enumerate(KINDS):
        bf16_pages.write(slot, load_adapter_dir(adapter_dirs[kind], bf16, max_rank=32, dtype=torch.bfloat16))
        fp32_pages.write(slot, load_adapter_dir(adapter_dirs[kind], fp32, max_rank=32, dtype=torch.float32))
    for slot in range(len(KINDS)):
        via_kernels = score_sequence(bf16, ids, slot=slot, ops=model_ops("cpu", lora="triton"))
        via_torch = score_sequence(bf16, ids, slot=slot, ops=model_ops("cpu", lora="torch"))
        exact = score_sequence(fp32, ids, slot=slot)
        base = score_sequence(bf16, ids, slot=-1, ops=model_ops("cpu", lora="torch"))
        # Kernels and torch ops differ by bf16 roundings of the same fp32 sums. Triton's
        # interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest), so its
        # rounding errors reach twice bf16's own, plus one bf16 step at the logits' size.
        bf16_err = (via_torch - exact).abs().max().item()
        ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().max())).item() - 7)
        diff = (via_kernels - via_torch).abs().max().item()
        assert diff <= 2 * bf16_err + ulp, (KINDS[slot], diff, bf16_err)
        assert (via_torch - base).abs().max() > 10 * (2 * bf16_err + ulp)  # far below the adapter's own effect
