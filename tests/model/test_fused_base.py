"""One base matmul per group (server/model/linear.py): the slices of q|k|v and gate|up are
quantized one by one, as PEFT's Linear4bit does, then stacked into one NF4 weight. The
stack must dequantize to the slices' weights bit for bit, its one matmul must equal the
per-slice matmuls concatenated, and a group forward must launch one matmul."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

from loraplex.kernels import nf4_matmul as nf4  # noqa: E402
from loraplex.server.model.linear import DenseLinear, NF4Linear, SlicedLinear, nf4_group  # noqa: E402
from loraplex.server.model.quantize import QuantSpec, dequantize_nf4, nf4_params, stack_nf4  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # else Triton's interpreter (tests/conftest.py)
IN = 128
WIDTHS = (96, 32, 48)  # 192, 64, 96 quant blocks: no slice fills whole nested groups of 256


def _slices(widths=WIDTHS, k=IN, nested=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(double_quant=nested)
    ws = [torch.randn(w, k, generator=g) * (0.05 + 2 * torch.rand(w, 1, generator=g)) for w in widths]
    return [nf4_params(w.to(DEVICE), spec) for w in ws]


def _x(m, k=IN, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _per_slice(parts, x):
    """The reference: one bitsandbytes matmul per slice, as PEFT runs them, then a cat."""
    return torch.cat([bnb.matmul_4bit(x, p.t(), quant_state=p.quant_state) for p in parts], dim=-1)


@pytest.mark.parametrize("nested", [True, False])
def test_stack_dequantizes_like_each_slice(nested):
    parts = _slices(nested=nested)
    stacked = stack_nf4(parts)
    assert not stacked.quant_state.nested and stacked.quant_state.absmax.dtype == torch.float32
    assert tuple(stacked.quant_state.shape) == (sum(WIDTHS), IN)
    torch.testing.assert_close(dequantize_nf4(stacked), torch.cat([dequantize_nf4(p) for p in parts]), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["bnb", "triton"])
@pytest.mark.parametrize("nested", [True, False])
def test_dense_weight_of_each_slice_is_bitsandbytes(backend, nested):
    parts = _slices(nested=nested)
    base = nf4_group(parts, torch.float32, backend)
    assert isinstance(base, NF4Linear) and base.widths == WIDTHS
    assert (base.packed is not None) == (backend == "triton")
    for i, p in enumerate(parts):
        torch.testing.assert_close(base.dense_weight(i), dequantize_nf4(p), atol=0, rtol=0)


@pytest.mark.parametrize("nested", [True, False])
def test_bnb_group_matmul_is_the_per_slice_matmuls(nested):
    """On CPU bitsandbytes dequantizes and calls linear: the stack gives the same bits."""
    parts = _slices(nested=nested)
    base = nf4_group(parts, torch.float32, "bnb")
    for m in (1, 5, 37):
        x = _x(m)
        got, ref = base(x), _per_slice(parts, x)
        assert got.shape == (m, sum(WIDTHS))
        if x.device.type == "cpu":
            torch.testing.assert_close(got, ref, atol=0, rtol=0)
        else:
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("nested", [True, False])
def test_triton_group_matmul_is_the_per_slice_matmuls(nested):
    parts = _slices(nested=nested)
    base = nf4_group(parts, torch.float32, "triton")
    for m in (1, 7):
        x = _x(m)
        torch.testing.assert_close(base(x), _per_slice(parts, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["bnb", "triton"])
def test_one_matmul_per_group(monkeypatch, backend):
    calls = []
    real_bnb, real_nf4 = bnb.matmul_4bit, nf4.nf4_matmul
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *a, **k: calls.append("bnb") or real_bnb(*a, **k))
    monkeypatch.setattr(nf4, "nf4_matmul", lambda *a, **k: calls.append("triton") or real_nf4(*a, **k))
    base = nf4_group(_slices(), torch.float32, backend)
    y = base(_x(3))
    assert calls == [backend] and y.shape == (3, sum(WIDTHS))


def test_one_matmul_per_group_in_the_model(monkeypatch):
    """A forward of the tiny model runs one bitsandbytes matmul per group: 4 per layer."""
    from loraplex.server.model.llama import score_sequence
    from loraplex.server.model.loader import LoadSpec, load_model
    from peft_adapters import TINY

    model = load_model(TINY, LoadSpec())
    assert [len(g.widths) for _, g in model.adapter_groups()][:4] == [3, 1, 2, 1]
    calls = []
    real = bnb.matmul_4bit
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    score_sequence(model, [1, 2, 3])
    assert len(calls) == 4 * model.config.num_layers


def test_single_slice_keeps_its_nested_absmax():
    (p,) = _slices(widths=(64,))
    base = nf4_group([p], torch.float32, "bnb")
    assert base.weight is p and base.weight.quant_state.nested


def test_stacked_storage_costs_fp32_absmax():
    """4 + 32/64 bits per weight stacked, against 4 + 8/64 + 32/(64*256) nested per slice."""
    parts = _slices()
    n = sum(WIDTHS) * IN
    stacked = stack_nf4(parts)
    assert nf4.bnb_nbytes(stacked.data, stacked.quant_state) == n // 2 + n // 64 * 4 + 16 * 4
    nested = sum(nf4.bnb_nbytes(p.data, p.quant_state) for p in parts)
    assert nested == n // 2 + n // 64 + sum(-(-(w * IN // 64) // 256) * 4 + 256 * 4 + 4 + 16 * 4 for w in WIDTHS)


def test_in_features_off_the_quant_block_fall_back_to_one_matmul_per_slice(monkeypatch):
    k = 96  # quant blocks of 64 cross rows: storage cannot stack
    parts = _slices(widths=(32, 16, 16), k=k)
    base = nf4_group(parts, torch.float32, "bnb")
    assert isinstance(base, SlicedLinear) and base.widths == (32, 16, 16)
    with pytest.raises(ValueError, match="multiple of the quant block"):
        stack_nf4(parts)
    x = _x(4, k)
    ref = _per_slice(parts, x)
    calls = []
    real = bnb.matmul_4bit
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.testing.assert_close(base(x), ref, atol=0, rtol=0)
    assert len(calls) == 3
    for i, p in enumerate(parts):
        torch.testing.assert_close(base.dense_weight(i), bnbf.dequantize_4bit(p.data, p.quant_state).float(), atol=0, rtol=0)


def test_dense_group_is_one_matmul_over_the_stacked_weights():
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(w, IN, generator=g) for w in WIDTHS]
    base = DenseLinear.stack(ws, torch.float32)
    assert base.widths == WIDTHS and base.out_features == sum(WIDTHS)
    x = _x(5).cpu()
    torch.testing.assert_close(base(x), torch.cat([x @ w.t() for w in ws], dim=-1), atol=1e-5, rtol=1e-5)
    for i, w in enumerate(ws):
        torch.testing.assert_close(base.dense_weight(i), w, atol=0, rtol=0)
