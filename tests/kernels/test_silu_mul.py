"""silu_mul (Triton; the interpreter on CPU) against silu_mul_ref, and silu_mul_ref
against the model code it replaces (DecoderLayer's `F.silu(gate) * up`), bit for bit.

Outputs start as NaN, so an element left unwritten fails. Sizes stay small: on CPU every
program runs in Triton's interpreter.
"""

import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels.silu_mul import silu_mul, silu_mul_ref

# the interpreter's numpy exp overflows (to inf, as on the GPU) for gate = -100
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (atol, rtol). The kernel rounds where the ref rounds (silu, then the product), so only
# exp's implementation differs (an fp32 ulp or two of silu); for 16-bit dtypes that can
# flip the rounding of silu(gate) by one ulp, 2 eps after the product.
TOL = {
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (1e-5, 2 * 2**-7),
    torch.float16: (1e-6, 2 * 2**-10),
}
MIN_EXACT = 0.97  # fraction of elements bitwise equal to the ref (16-bit: only rare roundings flip)


def check(got, want):
    atol, rtol = TOL[want.dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    if want.dtype != torch.float32:
        assert (got == want).float().mean() >= MIN_EXACT


def gate_up(num_tokens, inter, dtype, seed=0, row_pad=0):
    gen = torch.Generator().manual_seed(seed)
    gu = 3 * torch.randn(num_tokens, 2 * inter + row_pad, generator=gen)
    gu[:, : min(inter, 4)] = torch.tensor([-100.0, -20.0, 0.0, 30.0])[: min(inter, 4)]  # exp under/overflow
    return gu.to(dtype).to(DEVICE)[:, : 2 * inter]  # [T, 2I]


def nan_out(num_tokens, inter, dtype, row_pad=0):
    return torch.full((num_tokens, inter + row_pad), float("nan"), dtype=dtype, device=DEVICE)[:, :inter]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("inter,row_pad", [(123, 0), (2049, 0), (300, 17)])
def test_matches_ref(dtype, inter, row_pad):
    # 2049: three column blocks, the last of one column; row_pad: gate_up's row stride > 2I
    gu = gate_up(7, inter, dtype, seed=inter, row_pad=row_pad)
    assert gu.stride(0) == 2 * inter + row_pad
    out = nan_out(7, inter, dtype)
    assert silu_mul(gu, out=out) is out
    check(out, silu_mul_ref(gu))


def test_strided_out_and_allocated_out():
    gu = gate_up(5, 64, torch.bfloat16, seed=1, row_pad=3)
    out = nan_out(5, 64, torch.bfloat16, row_pad=9)
    silu_mul(gu, out=out)
    check(out, silu_mul_ref(gu))
    check(silu_mul(gu), silu_mul_ref(gu))
    assert torch.isnan(out.as_strided((5, 9), (73, 1), 64)).all()  # the row padding of out untouched


@pytest.mark.parametrize("dtype", list(TOL))
def test_ref_is_todays_model_code(dtype):
    gu = gate_up(9, 2049, dtype, seed=2)
    gate, up = gu.chunk(2, dim=-1)  # DecoderLayer.forward
    today = F.silu(gate) * up
    assert torch.equal(silu_mul_ref(gu), today)
    out = torch.empty_like(today)
    assert silu_mul_ref(gu, out=out) is out and torch.equal(out, today)


def test_no_tokens():
    gu = gate_up(0, 32, torch.float16)
    assert silu_mul(gu).shape == (0, 32)


def test_rejects_bad_inputs():
    gu = gate_up(4, 32, torch.float32)
    with pytest.raises(ValueError):
        silu_mul(gu[:, :63])  # odd width
    with pytest.raises(ValueError):
        silu_mul(gu.t().contiguous().t())  # column stride
    with pytest.raises(ValueError):
        silu_mul(gu, out=torch.empty(4, 31, device=DEVICE))
    with pytest.raises(ValueError):
        silu_mul(gu, out=torch.empty(4, 32, dtype=torch.float16, device=DEVICE))
    with pytest.raises(TypeError):
        silu_mul(gu.double())


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_contents():
    gu = gate_up(32, 14336, torch.bfloat16, seed=3)
    out = torch.empty(32, 14336, dtype=torch.bfloat16, device=DEVICE)
    silu_mul(gu, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            silu_mul(gu, out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    gu2 = gate_up(32, 14336, torch.bfloat16, seed=4)
    gu.copy_(gu2)
    graph.replay()
    torch.cuda.synchronize()
    check(out, silu_mul_ref(gu2))
