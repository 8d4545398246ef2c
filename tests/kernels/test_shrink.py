"""shrink (Triton; the interpreter on CPU) against shrink_ref in fp32.

Sizes stay small: on CPU every program runs in Triton's interpreter.
"""

import pytest
import torch

from loraplex.kernels.mapping import build_mapping
from loraplex.kernels.shrink import shrink, shrink_ref

from slot_mixes import RANK_CHOICES, token_slots

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# shrink returns fp32 for every input dtype: products of 16-bit inputs are exact in
# fp32, so only the order of the fp32 sums differs from the reference.
TOL = {  # dtype: (atol, rtol)
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (1e-3, 1e-3),
    torch.float16: (1e-3, 1e-3),
}


def make_case(num_tokens, in_features, num_slots, max_rank, n_slices, dtype, mix, seed=0, pad=0.0):
    """x [T, in], A stacks n × [S, R, in] (rows past each slot's rank = `pad`), ranks [n, S], mapping."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, in_features, generator=gen)
    choices = torch.tensor([r for r in RANK_CHOICES if r <= max_rank] + [max_rank], dtype=torch.int32)
    ranks = choices[torch.randint(0, len(choices), (n_slices, num_slots), generator=gen)]
    stacks = []
    for i in range(n_slices):
        a = torch.randn(num_slots, max_rank, in_features, generator=gen) / in_features**0.5
        for s in range(num_slots):
            a[s, ranks[i, s] :] = pad
        stacks.append(a.to(dtype).to(DEVICE))
    mapping = build_mapping(token_slots(mix, num_tokens, num_slots, gen).to(DEVICE), num_slots)
    return x.to(dtype).to(DEVICE), stacks, ranks.to(DEVICE), mapping


def run_shrink(x, stacks, mapping, ranks, **kw):
    out = torch.full((len(stacks), x.shape[0], stacks[0].shape[1]), float("nan"), device=x.device)  # poison
    res = shrink(x, stacks, mapping, ranks, out=out, **kw)
    assert res is out
    return out


def check(x, stacks, mapping, ranks, got):
    want = shrink_ref(x, stacks, mapping, ranks)  # fp32 math on the same (rounded) inputs
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    base = mapping.token_slots < 0
    assert torch.equal(got[:, base], torch.zeros_like(got[:, base]))  # base rows exactly zero


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("mix", ["identical", "distinct", "zipf", "base25", "sparse"])
def test_matches_ref(dtype, mix):
    # ranks 1..128 mixed in one batch, hidden 123, three slices
    x, stacks, ranks, mapping = make_case(29, 123, 9, 128, 3, dtype, mix)
    check(x, stacks, mapping, ranks, run_shrink(x, stacks, mapping, ranks))


def test_wide_split_k_is_deterministic():
    # in = 2049 over 4 K splits, reduced in a fixed order: bit-identical runs
    x, stacks, ranks, mapping = make_case(5, 2049, 4, 16, 1, torch.bfloat16, "base25", seed=1)
    first = run_shrink(x, stacks, mapping, ranks, split_k=4)
    check(x, stacks, mapping, ranks, first)
    assert torch.equal(first, run_shrink(x, stacks, mapping, ranks, split_k=4))
    check(x, stacks, mapping, ranks, run_shrink(x, stacks, mapping, ranks, split_k=1))


def test_deterministic():
    x, stacks, ranks, mapping = make_case(33, 70, 6, 32, 2, torch.float16, "zipf", seed=2)
    assert torch.equal(run_shrink(x, stacks, mapping, ranks), run_shrink(x, stacks, mapping, ranks))


@pytest.mark.parametrize("max_rank,n_slices,use_ranks", [(8, 4, False), (100, 3, True), (128, 1, True)])
def test_prefill_tiles(max_rank, n_slices, use_ranks):
    # 300 tokens: 64-token tiles, rank tiles of up to 64 (3 slices) or 128 (1 slice);
    # 4 slices: two launches; ranks None: every slot at R
    x, stacks, ranks, mapping = make_case(300, 40, 3, max_rank, n_slices, torch.bfloat16, "base25", seed=3)
    assert mapping.block_m == 64
    ranks = ranks if use_ranks else None
    check(x, stacks, mapping, ranks, run_shrink(x, stacks, mapping, ranks))


def test_reads_nothing_past_the_rank():
    # padding past each slot's rank is NaN: the kernel must neither read nor multiply it
    x, stacks, ranks, mapping = make_case(17, 50, 5, 64, 2, torch.bfloat16, "zipf", seed=4, pad=float("nan"))
    got = run_shrink(x, stacks, mapping, ranks)
    clean = [a.nan_to_num(0.0) for a in stacks]
    check(x, clean, mapping, ranks, got)


def test_no_adapter_and_no_tokens():
    x, stacks, ranks, _ = make_case(6, 32, 3, 8, 2, torch.float32, "identical")
    none = build_mapping(torch.full((6,), -1, dtype=torch.int32, device=DEVICE), 3)
    assert not none.any_adapter or DEVICE == "cuda"
    assert torch.equal(run_shrink(x, stacks, none, ranks), torch.zeros(2, 6, 8, device=DEVICE))
    empty = build_mapping(torch.zeros(0, dtype=torch.int32, device=DEVICE), 3)
    assert shrink(x[:0], stacks, empty, ranks).shape == (2, 0, 8)


def test_rejects_bad_inputs():
    x, stacks, ranks, mapping = make_case(4, 32, 3, 8, 2, torch.float32, "identical")
    with pytest.raises(ValueError):
        shrink(x, [stacks[0].half(), stacks[1].half()], mapping, ranks)  # dtype differs from x
    with pytest.raises(ValueError):
        shrink(x, stacks, mapping, ranks.long())
    with pytest.raises(ValueError):
        shrink(x, [a.transpose(1, 2).contiguous().transpose(1, 2) for a in stacks], mapping, ranks)
    with pytest.raises(ValueError):
        shrink(x[:3], stacks, mapping, ranks)  # mapping is for 4 tokens


@pytest.mark.gpu
def test_launch_never_syncs():
    x, stacks, ranks, mapping = make_case(64, 256, 64, 16, 3, torch.bfloat16, "distinct")
    shrink(x, stacks, mapping, ranks)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = shrink(x, stacks, mapping, ranks)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check(x, stacks, mapping, ranks, got)
