"""An accepted adapter is numerically servable (adapters/numerics.py): scales, factors and
vectors finite where the device stores them, the delta on the scale of the base. Real
adapters (the bundled demos, PEFT adapters of every type) pass with a wide margin."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, VeraConfig
from safetensors.torch import load_file, save_file

import loraplex
from loraplex.adapters.errors import AdapterError
from loraplex.adapters.loader import load_adapter_dir
from loraplex.adapters.numerics import DELTA_LIMIT, GAIN_LIMIT, base_norm, check_delta

DEMOS = Path(loraplex.__file__).parent / "assets" / "adapters"
SLOW = r"(?:.|\.|[a-z]|\w)*(?!)"  # never matches; exponential backtracking on any name of 20+ characters


def _edit(d: Path, config: dict | None = None, scale_tensors: tuple[str, float] | None = None) -> Path:
    if config:
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps(cfg | config))
    if scale_tensors:
        substring, factor = scale_tensors
        p = d / "adapter_model.safetensors"
        tensors = load_file(str(p))
        save_file({k: v * factor if substring in k else v for k, v in tensors.items()}, str(p))
    return d


@pytest.fixture(scope="module")
def qv_lora(tmp_path_factory, kit) -> Path:
    """The issue's adapter before it is made hostile: PEFT LoRA r=4 on q_proj, v_proj."""
    d = tmp_path_factory.mktemp("qv")
    kit.save_peft(d, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), quant="none")
    return d


@pytest.fixture
def copy(tmp_path):
    def copy(src: Path) -> Path:
        return Path(shutil.copytree(src, tmp_path / f"copy{len(list(tmp_path.iterdir()))}"))

    return copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "config, tensors, match",
    [
        ({"lora_alpha": 1e308}, None, r"layer 0 q_proj: scale s = 2.5e\+307 \(lora_alpha=1e\+308 / r, r=4\) is not finite in float32"),
        ({"lora_alpha": 1e30}, None, r"layer 0 q_proj: the delta's norm bound .* lora_alpha=1e\+30"),
        (None, ("lora_B", 1e30), r"layer 0 q_proj: .*lora_B.weight"),
        ({"lora_alpha": -1e30}, None, r"layer 0 q_proj: the delta's norm bound"),
    ],
    ids=["alpha 1e308", "alpha 1e30", "B x 1e30", "alpha -1e30"],
)
def test_hostile_scales_are_refused(qv_lora, copy, dense_view, dtype, config, tensors, match):
    d = _edit(copy(qv_lora), config, tensors)
    with pytest.raises(AdapterError, match=match):
        load_adapter_dir(d, dense_view, max_rank=16, dtype=dtype)


def test_the_issue_adapter_loads_untouched(qv_lora, dense_view):
    w = load_adapter_dir(qv_lora, dense_view, max_rank=16, dtype=torch.bfloat16)
    assert sorted(w.modules) == [(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")]


def test_dora_gain_and_vera_vectors_are_bounded(kit, tmp_path, dense_view):
    dora = tmp_path / "dora"
    kit.save_peft(dora, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"], init_lora_weights=False), quant="none")
    load_adapter_dir(dora, dense_view, max_rank=16, dtype=torch.float32)
    _edit(dora, scale_tensors=("lora_magnitude_vector", 1e30))
    with pytest.raises(AdapterError, match=r"layer 0 q_proj: DoRA's scale g .* reaches 1e\+30.* lora_magnitude_vector"):
        load_adapter_dir(dora, dense_view, max_rank=16, dtype=torch.float32)

    vera = tmp_path / "vera"
    kit.save_peft(vera, VeraConfig(r=8, target_modules=["q_proj", "v_proj"], save_projection=True), quant="none",
                  perturb=kit.perturb_params("vera_lambda", lambda p: torch.randn_like(p)))  # fmt: skip
    load_adapter_dir(vera, dense_view, max_rank=16, dtype=torch.float32)
    for name in ("vera_lambda_b", "vera_lambda_d"):
        bad = _edit(Path(shutil.copytree(vera, tmp_path / name)), scale_tensors=(name, 1e30))
        with pytest.raises(AdapterError, match=rf"layer 0 q_proj: the delta's norm bound .*{name}"):
            load_adapter_dir(bad, dense_view, max_rank=16, dtype=torch.float32)


def test_adalora_alpha_is_bounded(kit, tmp_path, dense_view):
    from peft import AdaLoraConfig

    d = tmp_path / "adalora"
    kit.save_peft(d, AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10, target_modules=["q_proj"]),
                  quant="none", perturb=kit.perturb_params("lora_", lambda p: torch.randn_like(p)))  # fmt: skip
    load_adapter_dir(d, dense_view, max_rank=16, dtype=torch.float32)
    _edit(d, {"lora_alpha": 1e35})
    with pytest.raises(AdapterError, match=r"norm bound .* lora_alpha=1e\+35 \(r if <= 0\) / \(init_r=4"):
        load_adapter_dir(d, dense_view, max_rank=16, dtype=torch.float32)


class _View:
    """A base view whose modules' weights are [8, 8] of `value` (Frobenius norm 8 x it)."""

    num_layers = 1

    def __init__(self, value: float):
        self.value, self.calls = value, []

    def module_shape(self, layer: int, name: str) -> tuple[int, int]:
        return 8, 8

    def dense_weight(self, layer: int, name: str) -> torch.Tensor:
        self.calls.append((layer, name))
        return torch.full((8, 8), self.value)


def _view(value: float):
    view = _View(value)
    return view, view.calls


def test_every_partial_sum_is_finite_in_the_serving_dtype():
    view, _ = _view(1e3)  # ‖W‖_F = 8e3: the norm bound admits s·B·A up to 8e7
    a, b = torch.ones(2, 8), torch.ones(8, 2)  # ‖B_i‖ ‖A_j‖ = 2
    check_delta("m", {"A": a.half(), "B": b.half()}, 1e4, torch.float16, view, (0, "q_proj"), {"s": "lora_alpha"})
    with pytest.raises(AdapterError, match=r"m: s·B·A can reach 1e\+05, which overflows torch.float16 \(s = 5e\+04 from lora_alpha"):
        check_delta("m", {"A": a.half(), "B": b.half()}, 5e4, torch.float16, view, (0, "q_proj"), {"s": "lora_alpha"})
    check_delta("m", {"A": a.bfloat16(), "B": b.bfloat16()}, 5e4, torch.bfloat16, view, (0, "q_proj"), {})


def test_base_norms_are_computed_once_per_module_and_base():
    view, calls = _view(1.0)
    for _ in range(3):
        assert base_norm(view, (0, "q_proj")) == pytest.approx(8.0)
    base_norm(view, (0, "v_proj"))
    assert calls == [(0, "q_proj"), (0, "v_proj")]
    other, other_calls = _view(2.0)
    assert base_norm(other, (0, "q_proj")) == pytest.approx(16.0) and len(other_calls) == 1


def _worst(weights, base) -> tuple[float, float]:
    """(max |s|·‖B'‖·‖A'‖ / limit, max |g| / GAIN_LIMIT) over the modules."""
    bound, gain = 0.0, 0.0
    for key, d in weights.modules.items():
        a = d.a.float() if d.rank_scale is None else d.rank_scale.float()[:, None] * d.a.float()
        b = d.b.float() if d.out_scale is None else d.out_scale.float()[:, None] * d.b.float()
        bound = max(bound, abs(d.scale) * float(b.norm() * a.norm()) / (DELTA_LIMIT * max(base_norm(base, key), 1.0)))
        if d.g is not None:
            gain = max(gain, float(d.g.float().abs().max()) / GAIN_LIMIT)
    return bound, gain


@pytest.fixture(scope="module")
def tiny_nf4_view(kit):
    from peft_adapters import nf4_base  # tests/support, on sys.path via tests/conftest.py

    return kit.HFBaseView(nf4_base())


@pytest.mark.parametrize("name", sorted(p.name for p in DEMOS.iterdir()))
def test_demo_adapters_pass_with_a_wide_margin(tiny_nf4_view, name):
    bound, gain = _worst(load_adapter_dir(DEMOS / name, tiny_nf4_view, max_rank=64, dtype=torch.bfloat16), tiny_nf4_view)
    assert bound < 1e-3 and gain < 1e-2, (bound, gain)  # measured: 4.6e-4 and 1.3e-3


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "vera", "adalora"])
def test_peft_adapters_pass_with_a_wide_margin(tiny_nf4_view, tmp_path, kind):
    from peft_adapters import save_peft_adapter

    save_peft_adapter(kind, tmp_path / kind, strength=4.0)
    bound, gain = _worst(load_adapter_dir(tmp_path / kind, tiny_nf4_view, max_rank=64, dtype=torch.bfloat16), tiny_nf4_view)
    assert bound < 1e-2 and gain < 1e-2, (bound, gain)  # measured: 2.7e-3 at most (rslora, adalora)


def test_startup_skips_an_unservable_adapter_with_its_reason(tmp_path, caplog):
    from lora_dirs import TINY, lora_config, lora_tensors, safetensors_bytes, write_adapter, write_lora

    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine

    root = tmp_path / "root"
    write_lora(root / "fine", rank=4, targets=("q_proj", "v_proj"))
    hostile = json.loads(lora_config(4, ("q_proj", "v_proj")))
    weights = safetensors_bytes(lora_tensors(4, ("q_proj", "v_proj")))
    write_adapter(root / "huge-alpha", json.dumps(hostile | {"lora_alpha": 1e308}).encode(), weights)
    write_adapter(root / "slow-regex", json.dumps(hostile | {"target_modules": SLOW}).encode(), weights)
    with caplog.at_level(logging.WARNING):
        engine = Engine.from_config(EngineConfig(model_dir=TINY, adapter_root=root, device="cpu", kv_cache_tokens=512,
                                                 max_batch_tokens=64, adapter_slots=2, max_rank=8))  # fmt: skip
    try:
        engine.adapters.wait_validated(60)  # directories register from their config; weights are checked in the background
        assert [a.adapter_id for a in engine.adapters.list()] == ["fine"]
        skipped = "\n".join(r.getMessage() for r in caplog.records if "skipping adapter" in r.getMessage())
        assert "skipping adapter huge-alpha: layer 0 q_proj: scale s = 2.5e+307" in skipped, skipped
        assert "skipping adapter slow-regex: adapter_config.json: target_modules" in skipped and "took longer than" in skipped, skipped
    finally:
        engine.shutdown(grace_s=1.0)
