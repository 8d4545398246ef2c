"""The CUDA configuration end to end (GPU only): the Triton adapter kernels in the
runner, NF4 through bitsandbytes and through our fused kernel. A mixed batch of five
adapter types gives every request its solo tokens (in fp32: in bf16 a different batch
may pick other GEMM tilings and round differently), and in bf16 the kernels give the
torch ops' logits within bf16's own error."""

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
from peft_adapters import KINDS, TINY, save_peft_adapter

pytestmark = pytest.mark.gpu
PROMPTS = ["the cat", "a small bird watches the", "our team builds the garden every"]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    for i, kind in enumerate(KINDS):
        save_peft_adapter(kind, root / kind, seed=40 + i, strength=6.0)
    return {kind: root / kind for kind in KINDS}


@pytest.mark.parametrize("nf4_backend", ["bnb", "triton"])
def test_mixed_batch_on_cuda_gives_solo_tokens(adapter_dirs, nf4_backend):
    engine = Engine.from_config(EngineConfig(model_dir=TINY, device="cuda", dtype="float32", kv_cache_tokens=4096,
                                             max_batch_tokens=64, adapter_slots=8, max_rank=32, nf4_backend=nf4_backend))  # fmt: skip
    assert engine.runner.ops.name == "triton" and engine.runner.ops.lora.name == "triton"
    for kind, path in adapter_dirs.items():
        engine.adapters.add(kind, path)
    engine.start()
    try:
        jobs = [(kind, p) for kind in list(KINDS) + [None] for p in PROMPTS]

        def req(kind, prompt):
            return GenerationRequest(engine.tokenizer.encode(prompt), SamplingParams(max_new_tokens=12, ignore_eos=True), adapter_id=kind)

        solo = [engine.generate(req(k, p), timeout=120).token_ids for k, p in jobs]
        handles = [engine.submit(req(k, p)) for k, p in jobs]  # all at once: prefill chunks beside decode tokens
        assert [h.result(timeout=120).token_ids for h in handles] == solo
        assert len({tuple(t) for t in solo}) > len(PROMPTS) * 3  # the adapters change the tokens
    finally:
        engine.shutdown(1.0)


def test_adapters_loaded_on_the_side_stream_while_others_decode_give_solo_tokens(adapter_dirs):
    """Two slots for five adapters: every round evicts and loads while other requests decode,
    the writes issued by the engine thread on the side stream and joined by events."""
    engine = Engine.from_config(EngineConfig(model_dir=TINY, device="cuda", dtype="float32", kv_cache_tokens=4096,
                                             max_batch_tokens=64, adapter_slots=2, max_rank=32))  # fmt: skip
    for kind, path in adapter_dirs.items():
        engine.adapters.add(kind, path)
    engine.start()
    try:
        def req(kind, prompt, n=16):
            return GenerationRequest(engine.tokenizer.encode(prompt), SamplingParams(max_new_tokens=n, ignore_eos=True), adapter_id=kind)

        solo = {(k, p): engine.generate(req(k, p), timeout=120).token_ids for k in KINDS for p in PROMPTS}
        loads = engine.stats().adapter_loads
        for _ in range(3):
            handles = [((k, p), engine.submit(req(k, p))) for p in PROMPTS for k in KINDS]
            assert {job: h.result(timeout=120).token_ids for job, h in handles} == solo
        assert engine.stats().adapter_loads > loads + 5 and engine.stats().adapter_load_failures == 0
    finally:
        engine.shutdown(1.0)


def _decode_batch_tokens(adapter_dirs, graphs: bool, overlap: str):
    engine = Engine.from_config(EngineConfig(model_dir=TINY, device="cuda", dtype="float32", kv_cache_tokens=4096, max_running=16,
                                             max_batch_tokens=256, adapter_slots=8, max_rank=32, cuda_graphs=graphs,
                                             overlap_steps=overlap))  # fmt: skip
    for kind, path in adapter_dirs.items():
        engine.adapters.add(kind, path)
    engine.start()
    try:
        engine.warmup()
        jobs = [(kind, p) for kind in list(KINDS) + [None] for p in PROMPTS][:11]  # 11 rows: bucket 16 with padding
        # every third row seeded sampling: its draws are keyed by position, so overlapped steps must feed the same ids
        params = [SamplingParams(max_new_tokens=24, ignore_eos=True, **(dict(temperature=0.9, top_p=0.9, seed=i) if i % 3 == 0 else {}))
                  for i in range(len(jobs))]  # fmt: skip
        handles = [engine.submit(GenerationRequest(engine.tokenizer.encode(p), params[i], adapter_id=k)) for i, (k, p) in enumerate(jobs)]
        return [h.result(timeout=120).token_ids for h in handles], engine.stats()
    finally:
        engine.shutdown(1.0)


def test_cuda_graph_replays_and_overlapped_steps_give_the_eager_sync_tokens(adapter_dirs):
    eager, eager_stats = _decode_batch_tokens(adapter_dirs, graphs=False, overlap="off")
    graphed, stats = _decode_batch_tokens(adapter_dirs, graphs=True, overlap="off")
    assert eager_stats.cuda_graph_buckets == 0 and eager_stats.cuda_graph_replays == 0
    assert stats.cuda_graph_buckets == 5 and stats.cuda_graph_replays > 10 and stats.cuda_graph_bytes > 0  # buckets 1 2 4 8 16
    assert graphed == eager
    # the CUDA default: each step launched before the host reads the previous one's ids (pinned copies, events)
    overlapped, overlapped_stats = _decode_batch_tokens(adapter_dirs, graphs=True, overlap="auto")
    assert overlapped_stats.cuda_graph_replays > 10
    assert overlapped == eager


def test_overlapped_steps_survive_preemption_on_cuda(adapter_dirs):
    """A KV cache too small for the batch: sequences are preempted while a step that wrote
    their blocks is still in flight, and others take those blocks in the next step; the
    tokens must equal sync steps', with every block and pin back at the end."""
    def run(overlap: str):
        engine = Engine.from_config(EngineConfig(model_dir=TINY, device="cuda", dtype="float32", kv_cache_tokens=96, block_size=8,
                                                 max_batch_tokens=16, adapter_slots=2, max_rank=32, overlap_steps=overlap))  # fmt: skip
        for kind, path in adapter_dirs.items():
            engine.adapters.add(kind, path)
        engine.start()
        try:
            kinds = list(KINDS)
            handles = [engine.submit(GenerationRequest(engine.tokenizer.encode(p), SamplingParams(max_new_tokens=40, ignore_eos=True),
                                                       adapter_id=kinds[i % len(kinds)])) for i, p in enumerate(PROMPTS * 2)]  # fmt: skip
            tokens = [h.result(timeout=120).token_ids for h in handles]
            stats = engine.stats()
            assert engine.blocks.num_used == 0 and stats.running == 0 and stats.adapter_pins == 0
            return tokens, stats.preemptions
        finally:
            engine.shutdown(1.0)

    sync, _ = run("off")
    overlapped, preemptions = run("on")
    assert preemptions > 0
    # The two runs preempt at other steps, and a recomputed prefix goes through the prefill
    # attention path instead of decode's (another fp32 summation order): one request may
    # flip at a near-tie. Blocks reused while a writer was in flight would corrupt many.
    assert sum(a == b for a, b in zip(overlapped, sync)) >= len(sync) - 1


def test_cuda_defaults_are_bf16_and_triton():
    config = EngineConfig(model_dir=TINY)
    assert config.torch_device.type == "cuda" and config.torch_dtype == torch.bfloat16


def test_kernels_match_torch_ops_in_bf16(adapter_dirs):
    ids = [1] + [b + 3 for b in b"the teacher paints a blue boat"]
    bf16 = load_model(TINY, LoadSpec(dtype=torch.bfloat16, device="cuda"))
    fp32 = load_model(TINY, LoadSpec(dtype=torch.float32, device="cuda"))
    bf16_pages, fp32_pages = AdapterPages(bf16, len(KINDS), 32), AdapterPages(fp32, len(KINDS), 32)
    for slot, kind in enumerate(KINDS):
        bf16_pages.write(slot, load_adapter_dir(adapter_dirs[kind], bf16, max_rank=32, dtype=torch.bfloat16))
        fp32_pages.write(slot, load_adapter_dir(adapter_dirs[kind], fp32, max_rank=32, dtype=torch.float32))
    for slot, kind in enumerate(KINDS):
        via_kernels = score_sequence(bf16, ids, slot=slot, ops=model_ops("cuda", "triton", "triton"))
        via_torch = score_sequence(bf16, ids, slot=slot, ops=model_ops("cuda", "torch", "torch"))
        exact = score_sequence(fp32, ids, slot=slot, ops=model_ops("cuda", "torch", "torch"))
        bf16_err = (via_torch - exact).abs().max().item()
        assert (via_kernels - via_torch).abs().max().item() <= bf16_err, kind  # both round to nearest on a GPU
        assert (via_kernels - exact).abs().max().item() <= 2 * bf16_err, kind
