"""expand (Triton; the interpreter on CPU) against expand_ref in fp32, and the
shrink+expand pair under CUDA-graph replay on a GPU.

Sizes stay small: on CPU every program runs in Triton's interpreter. expand updates y
in place, so "poison" here means: every updated element must move by a delta far above
the tolerance (an element the kernel skipped fails), and base rows must stay bit-exact.
"""

import pytest
import torch

from loraplex.kernels.expand import expand, expand_ref
from loraplex.kernels.mapping import LoraMappingBuffers, build_mapping
from loraplex.kernels.shrink import shrink, shrink_ref

from slot_mixes import RANK_CHOICES, token_slots

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# y is rounded to its dtype once; on a GPU the 16-bit paths multiply t in tf32 (11-bit
# mantissa), below one bf16 ulp and about one fp16 ulp. rtol covers one ulp of the dtype.
TOL = {  # dtype: (atol, rtol)
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 1.6e-2),
    torch.float16: (4e-3, 2e-3),
}
QKV = [48, 17, 17]  # q|k|v-like: unequal widths (GQA), one not a multiple of anything


def make_case(num_tokens, widths, num_slots, max_rank, dtype, mix, seed=0, dora=True, pad=0.0):
    """y [T, sum(widths)], t [n, T, R] fp32, B stacks n × [S, out_i, R], scales, g, ranks, mapping.

    B columns and t columns past each slot's rank are `pad` and 0. With `dora`, even
    slots get a magnitude scale g and odd slots g = 1 (plain LoRA rows beside DoRA rows).
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(widths)
    choices = torch.tensor([r for r in RANK_CHOICES if r <= max_rank] + [max_rank], dtype=torch.int32)
    ranks = choices[torch.randint(0, len(choices), (n, num_slots), generator=gen)]
    slots = token_slots(mix, num_tokens, num_slots, gen)
    t = torch.randn(n, num_tokens, max_rank, generator=gen)
    bs, gs = [], []
    for i, w in enumerate(widths):
        b = torch.randn(num_slots, w, max_rank, generator=gen) / max_rank**0.5
        for s in range(num_slots):
            b[s, :, ranks[i, s] :] = pad
        for tok in range(num_tokens):
            t[i, tok, ranks[i, slots[tok]] :] = 0  # what shrink returns past the rank (slot -1: any row)
        bs.append(b.to(dtype).to(DEVICE))
        g = 0.5 + torch.rand(num_slots, w, generator=gen)
        g[1::2] = 1.0
        gs.append(g.to(DEVICE))
    scales = (1.0 + 2.0 * torch.rand(n, num_slots, generator=gen)).to(DEVICE)  # deltas well above tolerance
    y = torch.randn(num_tokens, sum(widths), generator=gen).to(dtype).to(DEVICE)
    mapping = build_mapping(slots.to(DEVICE), num_slots)
    return y, t.to(DEVICE), bs, scales, gs if dora else None, ranks.to(DEVICE), mapping


def reference(y, t, bs, scales, gs, mapping, ranks):
    """expand_ref in fp32 on the same (rounded) inputs, rounded to y's dtype at the end."""
    want = y.float().clone()
    expand_ref(want, t.float(), [b.float() for b in bs], scales, gs, mapping, ranks)
    return want


def check(y0, got, want, mapping):
    atol, rtol = TOL[y0.dtype]
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)
    base = mapping.token_slots < 0
    assert torch.equal(got[base], y0[base])  # base rows untouched, bit for bit
    moved = (got.float() - y0.float()).abs()[~base]
    # every adapter-row element must have been rewritten (deltas here are O(1))
    assert (moved > 0).float().mean() > 0.95


def run_expand(y, *args):
    out = y.clone()
    expand(out, *args)
    return out


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("mix", ["identical", "distinct", "zipf", "base25", "sparse"])
def test_matches_ref(dtype, mix):
    # q|k|v of unequal widths in one launch, ranks 1..128 mixed, DoRA rows beside plain rows
    y, t, bs, scales, gs, ranks, mapping = make_case(29, QKV, 9, 128, dtype, mix)
    got = run_expand(y, t, bs, scales, gs, mapping, ranks)
    check(y, got, reference(y, t, bs, scales, gs, mapping, ranks), mapping)


def test_wide_output_no_dora():
    y, t, bs, scales, _, ranks, mapping = make_case(5, [2049], 3, 16, torch.bfloat16, "base25", seed=1, dora=False)
    got = run_expand(y, t, bs, scales, None, mapping, ranks)
    check(y, got, reference(y, t, bs, scales, None, mapping, ranks), mapping)


def test_deterministic_and_bf16_t():
    y, t, bs, scales, gs, ranks, mapping = make_case(33, QKV, 6, 32, torch.float16, "zipf", seed=2)
    args = (t.bfloat16(), bs, scales, gs, mapping, ranks)
    first = run_expand(y, *args)
    assert torch.equal(first, run_expand(y, *args))
    check(y, first, reference(y, *args), mapping)


def test_prefill_tiles_ranks_none_and_four_slices():
    # 300 tokens: 64-token tiles; 4 slices: two launches; ranks None: K runs to R
    y, t, bs, scales, gs, _, mapping = make_case(300, [16, 9, 20, 7], 3, 8, torch.float32, "base25", seed=3)
    assert mapping.block_m == 64
    got = run_expand(y, t, bs, scales, gs, mapping, None)
    check(y, got, reference(y, t, bs, scales, gs, mapping, None), mapping)


def test_reads_nothing_past_the_rank():
    # B columns past each slot's rank are NaN: the K loop must stop at the rank
    y, t, bs, scales, gs, ranks, mapping = make_case(17, QKV, 5, 64, torch.bfloat16, "zipf", seed=4, pad=float("nan"))
    got = run_expand(y, t, bs, scales, gs, mapping, ranks)
    clean = [b.nan_to_num(0.0) for b in bs]
    check(y, got, reference(y, t, clean, scales, gs, mapping, ranks), mapping)


def test_shrink_then_expand():
    # the pair as a linear layer uses it: q|k|v from hidden 123, fp16, zipf over 7 adapters
    gen = torch.Generator().manual_seed(5)
    y, _, bs, scales, gs, ranks, mapping = make_case(21, QKV, 7, 16, torch.float16, "zipf", seed=5)
    x = torch.randn(21, 123, generator=gen).half().to(DEVICE)
    a = [(torch.randn(7, 16, 123, generator=gen) / 11).half().to(DEVICE) for _ in QKV]
    got = y.clone()
    expand(got, shrink(x, a, mapping, ranks), bs, scales, gs, mapping, ranks)
    check(y, got, reference(y, shrink_ref(x, a, mapping, ranks), bs, scales, gs, mapping, ranks), mapping)


def test_no_adapter_leaves_y_alone():
    y, t, bs, scales, gs, ranks, _ = make_case(6, QKV, 3, 8, torch.float32, "identical")
    none = build_mapping(torch.full((6,), -1, dtype=torch.int32, device=DEVICE), 3)
    assert torch.equal(run_expand(y, t, bs, scales, gs, none, ranks), y)


def test_rejects_bad_inputs():
    y, t, bs, scales, gs, ranks, mapping = make_case(4, QKV, 3, 8, torch.float32, "identical")
    with pytest.raises(ValueError):
        expand(y[:, :-1], t, bs, scales, gs, mapping, ranks)  # slices do not cover y
    with pytest.raises(ValueError):
        expand(y, t.half(), bs, scales, gs, mapping, ranks)  # t must never be fp16
    with pytest.raises(ValueError):
        expand(y, t, [b.half() for b in bs], scales, gs, mapping, ranks)
    with pytest.raises(ValueError):
        expand(y, t, bs, scales.double(), gs, mapping, ranks)


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_mapping():
    """Capture shrink+expand for a decode step, rewrite the mapping buffers with another
    mapping of the same token count, replay, compare with the references."""
    num_tokens, num_slots, rank, hidden = 64, 64, 16, 256
    gen = torch.Generator().manual_seed(6)
    widths = [256, 64, 64]
    _, _, bs, scales, gs, ranks, _ = make_case(num_tokens, widths, num_slots, rank, torch.bfloat16, "distinct", seed=6)
    a = [(torch.randn(num_slots, rank, hidden, generator=gen) / 16).bfloat16().cuda() for _ in widths]
    x = torch.randn(num_tokens, hidden, generator=gen).bfloat16().cuda()
    y0 = torch.randn(num_tokens, sum(widths), generator=gen).bfloat16().cuda()
    buffers = LoraMappingBuffers(num_tokens, num_slots, "cuda")
    first = torch.randperm(num_slots, generator=gen)[:num_tokens].to(torch.int32).cuda()
    mapping = buffers.update(first)
    t = torch.empty(len(widths), num_tokens, rank, device="cuda")
    y = y0.clone()

    def step():
        shrink(x, a, mapping, ranks, out=t)
        expand(y, t, bs, scales, gs, mapping, ranks)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    y.copy_(y0)
    with torch.cuda.graph(graph):
        step()

    for new in (
        torch.randint(-1, num_slots, (num_tokens,), generator=gen),  # zipf-free uniform, some base rows
        torch.full((num_tokens,), 3),  # one adapter
        torch.tensor([5, -1] * (num_tokens // 2)),
    ):
        buffers.update(new.to(torch.int32).cuda())  # same buffers, new contents
        y.copy_(y0)
        graph.replay()
        torch.cuda.synchronize()
        ref_map = build_mapping(new.to(torch.int32).cuda(), num_slots)
        want = reference(y0, shrink_ref(x, a, ref_map, ranks), bs, scales, gs, ref_map, ranks)
        check(y0, y.clone(), want, ref_map)


@pytest.mark.gpu
def test_launch_never_syncs():
    y, t, bs, scales, gs, ranks, mapping = make_case(64, [256, 64, 64], 64, 16, torch.bfloat16, "distinct")
    expand(y.clone(), t, bs, scales, gs, mapping, ranks)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = y.clone()
        expand(got, t, bs, scales, gs, mapping, ranks)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check(y, got, reference(y, t, bs, scales, gs, mapping, ranks), mapping)
