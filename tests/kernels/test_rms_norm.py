"""rms_norm (Triton; the interpreter on CPU) against rms_norm_ref, and rms_norm_ref
against the model code it replaces (RMSNorm.forward, the decoder's `h + delta`),
bit for bit.

Outputs start as NaN, so an element left unwritten fails. Sizes stay small: on CPU every
program runs in Triton's interpreter.
"""

import pytest
import torch

from loraplex.kernels.rms_norm import MAX_HIDDEN, rms_norm, rms_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
# (atol, rtol). fp32: the kernel differs from the ref only in the order of the sum of
# squares and in rsqrt (a few fp32 ulps). 16-bit: those can flip the rounding of the
# normalized row to the dtype, one ulp before the weight product; 2 eps covers it.
TOL = {
    torch.float32: (1e-6, 2e-6),
    torch.bfloat16: (1e-5, 2 * 2**-7),
    torch.float16: (1e-6, 2 * 2**-10),
}
MIN_EXACT = 0.97  # 16-bit: fraction of elements bitwise equal to the ref (only rare roundings flip)


def check(got, want):
    atol, rtol = TOL[want.dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    if want.dtype != torch.float32:  # fp32: a one-ulp rsqrt changes a whole row
        assert (got == want).float().mean() >= MIN_EXACT


def inputs(num_tokens, hidden, dtype, seed=0, row_pad=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden + row_pad, generator=gen).to(dtype).to(DEVICE)[:, :hidden]  # [T, hidden]
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)  # [hidden]
    residual = (3 * torch.randn(num_tokens, hidden + row_pad, generator=gen)).to(dtype).to(DEVICE)[:, :hidden]
    return x, weight, residual


def nan_like(x):
    return torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("hidden", [123, 2049])
@pytest.mark.parametrize("fused", [False, True])
def test_matches_ref(dtype, hidden, fused):
    x, w, r = inputs(9, hidden, dtype, seed=hidden)
    if not fused:
        got = rms_norm(x, w, EPS, out=nan_like(x))
        check(got, rms_norm_ref(x, w, EPS))
        return
    r_ref, r_got = r.clone(), r.clone()
    want, res_want = rms_norm_ref(x, w, EPS, residual=r_ref)
    got, res_got = rms_norm(x, w, EPS, residual=r_got, out=nan_like(x))
    assert res_got is r_got and res_want is r_ref
    assert torch.equal(r_got, r_ref)  # h = residual + x: the same rounding as the torch add
    check(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_widest_row_and_strides(dtype):
    # hidden 8192 in one program; x, residual and out with row strides past hidden
    x, w, r = inputs(3, MAX_HIDDEN, dtype, seed=1, row_pad=5)
    out = nan_like(torch.empty(3, MAX_HIDDEN + 7, dtype=dtype, device=DEVICE))[:, :MAX_HIDDEN]
    assert x.stride(0) == r.stride(0) == MAX_HIDDEN + 5 and out.stride(0) == MAX_HIDDEN + 7
    r_ref = r.clone()
    want, _ = rms_norm_ref(x, w, EPS, residual=r_ref)
    got, res = rms_norm(x, w, EPS, residual=r, out=out)
    assert got is out and res is r
    assert torch.equal(r, r_ref)
    check(out, want)


def test_out_may_be_x():
    x, w, r = inputs(17, 300, torch.float16, seed=2)
    want = rms_norm_ref(x, w, EPS)
    y = x.clone()
    assert rms_norm(y, w, EPS, out=y) is y
    check(y, want)
    # the decoder's fused form, delta buffer reused for the normed output
    r_ref, r_got, d = r.clone(), r.clone(), x.clone()
    want, _ = rms_norm_ref(x, w, EPS, residual=r_ref)
    got, _ = rms_norm(d, w, EPS, residual=r_got, out=d)
    assert got is d and torch.equal(r_got, r_ref)
    check(d, want)
    ref_out = x.clone()
    assert rms_norm_ref(ref_out, w, EPS, out=ref_out) is ref_out and torch.equal(ref_out, rms_norm_ref(x, w, EPS))


@pytest.mark.parametrize("dtype", list(TOL))
def test_ref_is_todays_model_code(dtype):
    # RMSNorm.forward, and the decoder's h = h + delta; x = norm(h): bit for bit
    x, w, h = inputs(11, 2049, dtype, seed=3)

    def norm(v):  # RMSNorm.forward as llama.py had it before the fused op replaced it
        f = v.float()
        return w * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + EPS)).to(v.dtype)

    assert torch.equal(rms_norm_ref(x, w, EPS), norm(x))
    h_new = h + x  # today: a new tensor
    res = h.clone()
    y, res_out = rms_norm_ref(x, w, EPS, residual=res)
    assert res_out is res and torch.equal(res, h_new) and torch.equal(y, norm(h_new))


def test_no_tokens():
    x, w, r = inputs(0, 64, torch.bfloat16)
    assert rms_norm(x, w, EPS).shape == (0, 64)
    y, res = rms_norm(x, w, EPS, residual=r)
    assert y.shape == (0, 64) and res is r


def test_rejects_bad_inputs():
    x, w, r = inputs(4, 64, torch.float32)
    bad = [
        dict(x=x, weight=w.half()),  # weight dtype differs
        dict(x=x, weight=w[:-1]),
        dict(x=x.t().contiguous().t(), weight=w),  # column stride
        dict(x=x, weight=w, residual=r[:3]),
        dict(x=x, weight=w, residual=r.half()),
        dict(x=x, weight=w, out=torch.empty(4, 64, dtype=torch.float16, device=DEVICE)),
        dict(x=torch.zeros(2, MAX_HIDDEN + 1, device=DEVICE), weight=torch.ones(MAX_HIDDEN + 1, device=DEVICE)),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            rms_norm(eps=EPS, **kw)
    with pytest.raises(TypeError):
        rms_norm(x.double(), w.double(), EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_graph_replay_with_new_contents(fused):
    x, w, r = inputs(32, 4096, torch.bfloat16, seed=4)
    out = torch.empty_like(x)
    rms_norm(x, w, EPS, residual=r.clone() if fused else None, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            rms_norm(x, w, EPS, residual=r if fused else None, out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x2, _, r2 = inputs(32, 4096, torch.bfloat16, seed=5)
    x.copy_(x2)
    r.copy_(r2)
    graph.replay()
    torch.cuda.synchronize()
    if fused:
        want, res_want = rms_norm_ref(x2, w, EPS, residual=r2.clone())
        assert torch.equal(r, res_want)
    else:
        want = rms_norm_ref(x2, w, EPS)
    check(out, want)
