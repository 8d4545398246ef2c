"""nf4_matmul against its Semantics (`nf4_matmul_ref`) and the repack against bitsandbytes.

Runs on the CUDA device when there is one, else on CPU with the kernels in Triton's
interpreter (tests/conftest.py). Small odd shapes everywhere; the larger shapes and
CUDA-graph replay are `gpu` tests. Timing lives in bench/nf4_matmul.py, never here.
"""

from __future__ import annotations

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from loraplex.kernels import nf4_matmul as nf4  # noqa: E402
from loraplex.kernels.nf4_matmul import (  # noqa: E402
    FP32,
    GEMV,
    MID,
    PREFILL,
    DECODE,
    PackedNF4,
    TileConfig,
    bnb_nbytes,
    config_for,
    dequantize_packed,
    nf4_matmul,
    nf4_matmul_ref,
    use_triton_nf4,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Launcher (rounded to x.dtype) vs the fp32 reference, whose weights are rounded like the kernel's:
# the differences are fp32 summation order plus the output's own rounding (bf16 2^-8, fp16 2^-11).
TOL = {
    torch.float32: dict(atol=1e-3, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=2e-3),
    torch.bfloat16: dict(atol=5e-2, rtol=1e-2),
}


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """[n, k] float32 with uneven row scales and outliers, so absmax varies across blocks."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.05 + 2 * torch.rand(n, 1, generator=g))
    w[::7, ::13] *= 8
    return w


def _quant(n: int, k: int, nested: bool = True, dtype=torch.float32, device=DEVICE, seed: int = 0):
    return bnbf.quantize_4bit(_weight(n, k, seed).to(device, dtype), blocksize=64,
                              compress_statistics=nested, quant_type="nf4")


def _x(m: int, k: int, dtype, device=DEVICE, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(device, dtype)


def _assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    tol = TOL[dtype]
    scale = max(1.0, ref.abs().max().item())  # atol relative to the output's magnitude (large K)
    torch.testing.assert_close(out.float(), ref, atol=tol["atol"] * scale, rtol=tol["rtol"])


# ----------------------------------------------------------------------------- repack


@pytest.mark.parametrize("n,k", [(33, 64), (97, 192), (300, 128), (5, 1024)])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_repack_dequantizes_bit_identically(n, k, nested, dtype):
    packed, qs = _quant(n, k, nested, dtype)
    p = PackedNF4.from_bnb(packed, qs)
    expected = bnbf.dequantize_4bit(packed, qs)  # [n, k] of dtype
    assert torch.equal(dequantize_packed(p, dtype), expected)
    if dtype == torch.float32:
        assert torch.equal(dequantize_packed(p, torch.bfloat16), expected.bfloat16())


@pytest.mark.parametrize("nested", [False, True])
def test_repack_layout_and_inverse(nested):
    n, k = 9, 128
    packed, qs = _quant(n, k, nested)
    p = PackedNF4.from_bnb(packed, qs)
    flat = packed.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 15), 1).reshape(n, k)  # bitsandbytes: even element high nibble
    for kb in range(k // 64):
        byte = p.qweight[:, kb * 32:(kb + 1) * 32]
        assert torch.equal(byte & 15, codes[:, kb * 64:kb * 64 + 32])
        assert torch.equal(byte >> 4, codes[:, kb * 64 + 32:kb * 64 + 64])
    assert torch.equal(p.absmax.t().reshape(-1), qs.absmax)
    packed2, qs2 = p.to_bnb()
    assert torch.equal(packed2, packed) and torch.equal(qs2.absmax, qs.absmax)
    assert torch.equal(bnbf.dequantize_4bit(packed2, qs2), bnbf.dequantize_4bit(packed, qs))
    assert p.nbytes == bnb_nbytes(packed, qs)  # replaces bitsandbytes' storage, byte for byte


def test_repack_rejects_other_formats():
    w = _weight(8, 256).to(DEVICE)
    packed, qs = bnbf.quantize_4bit(w, blocksize=128, quant_type="nf4")
    with pytest.raises(ValueError, match="blocksize"):
        PackedNF4.from_bnb(packed, qs)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="NF4"):
        PackedNF4.from_bnb(packed, qs)


# ----------------------------------------------------------------------------- matmul


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [64, 192])
@pytest.mark.parametrize("n", [33, 97])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_matches_reference(m, n, k, dtype):
    packed, qs = _quant(n, k, nested=(n == 97), seed=n + k)
    p = PackedNF4.from_bnb(packed, qs)
    x = _x(m, k, dtype, seed=m)
    _assert_matches(nf4_matmul(x, p), nf4_matmul_ref(x, packed, qs), dtype)


CONFIGS = {
    "gemv1": GEMV,
    "gemv2": TileConfig(2, 64, 4, True, 8, 1),
    "gemv4-split2": TileConfig(4, 32, 1, True, 4, 1, split_k=2),
    "decode": DECODE,
    "decode-nosplit": TileConfig(16, 64, 4, True, 4, 3, split_k=1),
    "mid32": TileConfig(32, 128, 2, True, 4, 3),
    "mid64": MID,
    "prefill": PREFILL,
    "prefill-split3": TileConfig(128, 128, 1, False, 8, 3, split_k=3),
    "fp32": FP32,
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_config_with_bias(name, dtype):
    m, n, k = 17, 97, 192
    packed, qs = _quant(n, k)
    p = PackedNF4.from_bnb(packed, qs)
    x = _x(m, k, dtype)
    bias = _x(1, n, dtype, seed=5)[0]
    out = nf4_matmul(x, p, bias, config=CONFIGS[name])
    _assert_matches(out, nf4_matmul_ref(x, packed, qs, bias), dtype)


@pytest.mark.parametrize("config", [None, TileConfig(16, 32, 1, True, 4, 2, split_k=3)], ids=["default", "split3"])
@pytest.mark.parametrize("m", [3, 17])
def test_poisoned_out_is_fully_written(m, config):
    n, k, dtype = 33, 192, torch.bfloat16
    packed, qs = _quant(n, k)
    p = PackedNF4.from_bnb(packed, qs)
    x = _x(m, k, dtype)
    bias = torch.linspace(-1, 1, n, device=DEVICE)  # fp32 bias with bf16 activations
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    assert nf4_matmul(x, p, bias, out=out, config=config) is out
    assert not out.isnan().any()
    _assert_matches(out, nf4_matmul_ref(x, packed, qs, bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested", [False, True])
def test_identity_input_returns_the_weights_exactly(dtype, nested):
    """x = I: every output element is one product 1 * w, so the fused kernel must return
    bitsandbytes' dequantized weight (rounded to dtype) bit for bit, split-K included."""
    n, k = 33, 192
    packed, qs = _quant(n, k, nested)
    p = PackedNF4.from_bnb(packed, qs)
    wt = bnbf.dequantize_4bit(packed, qs).t().to(dtype)  # [k, n]
    eye = torch.eye(k, dtype=dtype, device=DEVICE)
    assert torch.equal(nf4_matmul(eye, p), wt)
    assert torch.equal(nf4_matmul(eye[:2], p, config=config_for(2, dtype)), wt[:2])
    assert torch.equal(nf4_matmul(eye[:17], p, config=TileConfig(16, 32, 1, True, 4, 2, split_k=3)), wt[:17])


def test_split_k_is_deterministic():
    packed, qs = _quant(97, 192)
    p = PackedNF4.from_bnb(packed, qs)
    x = _x(5, 192, torch.bfloat16)
    cfg = TileConfig(16, 64, 1, True, 4, 2, split_k=3)
    assert torch.equal(nf4_matmul(x, p, config=cfg), nf4_matmul(x, p, config=cfg))


def test_launcher_checks():
    packed, qs = _quant(33, 128)
    p = PackedNF4.from_bnb(packed, qs)
    x = _x(3, 128, torch.bfloat16)
    assert nf4_matmul(x[:0], p).shape == (0, 33)
    with pytest.raises(ValueError, match="must be"):
        nf4_matmul(_x(3, 64, torch.bfloat16), p)
    with pytest.raises(ValueError, match="bfloat16"):
        nf4_matmul(x.to(torch.int32), p)
    with pytest.raises(ValueError, match="unit stride"):
        nf4_matmul(_x(128, 6, torch.bfloat16).t()[:, :128], p)
    with pytest.raises(ValueError, match="out"):
        nf4_matmul(x, p, out=torch.empty(3, 33, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="bias"):
        nf4_matmul(x, p, torch.zeros(32, device=DEVICE))
    with pytest.raises(ValueError, match="swap_ab"):
        TileConfig(4, 64, 1, False, 4, 1)


def test_policy_and_plans():
    assert not use_triton_nf4(4096, 4096, "cpu")
    assert [config_for(m).block_m for m in (1, 2, 3, 16, 17, 32, 33, 256, 257)] == [1, 2, 16, 16, 32, 32, 64, 64, 128]
    assert config_for(100, torch.float32) == FP32
    for cfg in (GEMV, DECODE, MID, PREFILL, TileConfig(16, 64, 4, True, 4, 3, split_k=7)):
        for m, n, k in [(1, 33, 64), (1, 4096, 4096), (16, 1024, 14336), (300, 97, 192)]:
            group, split, per_split = nf4._plan(cfg, m, n, k, num_sms=132)
            iters = k // 64 // group
            assert (k // 64) % group == 0 and 1 <= split <= iters
            assert (split - 1) * per_split < iters <= split * per_split  # no empty split


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (4096, 14336)])
def test_gpu_repack_exact_llama_shapes(n, k):
    packed, qs = _quant(n, k, nested=True, dtype=torch.bfloat16, device="cuda")
    p = PackedNF4.from_bnb(packed, qs)
    assert torch.equal(dequantize_packed(p, torch.bfloat16), bnbf.dequantize_4bit(packed, qs))
    eye = torch.eye(k, dtype=torch.bfloat16, device="cuda")[:512]
    assert torch.equal(nf4_matmul(eye, p), bnbf.dequantize_4bit(packed, qs)[:, :512].t())


# every config bucket of M (GEMV, decode, mid, prefill; M odd, a multiple of 16 or not) on
# three shapes in bf16, and one shape in fp16: each case compiles its own kernel variants
# on a fresh machine, so the grid is as small as the buckets allow
GPU_CASES = [(m, n, k, torch.bfloat16) for m in (1, 2, 3, 16, 17, 64, 300, 1024) for n, k in ((1024, 4096), (4096, 1024), (2000, 1216))]
GPU_CASES += [(m, 2000, 1216, torch.float16) for m in (1, 17, 64, 300)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,dtype", GPU_CASES)
def test_gpu_matches_reference(m, n, k, dtype):
    packed, qs = _quant(n, k, device="cuda")
    p = PackedNF4.from_bnb(packed, qs)
    x = _x(m, k, dtype, device="cuda")
    bias = _x(1, n, dtype, device="cuda", seed=7)[0]
    _assert_matches(nf4_matmul(x, p, bias), nf4_matmul_ref(x, packed, qs, bias), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("lookup_via_asm", [True, False])
def test_gpu_every_config(name, lookup_via_asm, monkeypatch):
    monkeypatch.setattr(nf4, "LOOKUP_VIA_ASM", lookup_via_asm)
    m, n, k, dtype = 40, 1024, 4096, torch.bfloat16
    packed, qs = _quant(n, k, device="cuda")
    p = PackedNF4.from_bnb(packed, qs)
    x = _x(m, k, dtype, device="cuda")
    _assert_matches(nf4_matmul(x, p, config=CONFIGS[name]), nf4_matmul_ref(x, packed, qs), dtype)
    eye = torch.eye(k, dtype=dtype, device="cuda")[:m]
    w = bnbf.dequantize_4bit(packed, qs)[:, :m].t().to(dtype)
    assert torch.equal(nf4_matmul(eye, p, config=CONFIGS[name]), w)  # no fma contraction, exact lookups


@pytest.mark.gpu
def test_gpu_split_k_deterministic_and_cuda_graph_replay():
    packed, qs = _quant(1024, 4096, device="cuda")
    p = PackedNF4.from_bnb(packed, qs)
    x = _x(4, 4096, torch.bfloat16, device="cuda")
    runs = [nf4_matmul(x, p) for _ in range(5)]  # DECODE, 16 output tiles: split-K is on
    assert all(torch.equal(r, runs[0]) for r in runs)
    out = torch.empty_like(runs[0])
    nf4_matmul(x, p, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nf4_matmul(x, p, out=out)
    x.copy_(_x(4, 4096, torch.bfloat16, device="cuda", seed=9))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, nf4_matmul(x, p))


@pytest.mark.gpu
def test_gpu_policy():
    assert use_triton_nf4(4096, 4096, "cuda") == (torch.cuda.get_device_capability() >= (8, 0))
    assert not use_triton_nf4(4096, 4000, "cuda")
