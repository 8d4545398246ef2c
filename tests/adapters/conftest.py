"""Fixtures for adapter tests: a tiny Llama (dense or NF4), a BaseModelView over it, and
PEFT adapters saved with save_pretrained (the format users have). Tests run in
importlib mode and cannot import this module: they get the helpers from the `kit`
fixture."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from torch import nn

TINY = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def make_base(quant: str = "nf4", seed: int = 0) -> nn.Module:
    """A tiny LlamaForCausalLM; quant "nf4" quantizes its decoder linears like the server."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraplex.server.model.quantize import quantize_hf_decoder_

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    if quant == "nf4":
        import bitsandbytes as bnb

        quantize_hf_decoder_(model, torch.float32)
        # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight in place on its
        # first eval forward and rounds absmax to bf16, which changes the dequantized W (and DoRA's
        # norm). Keep the layout the GPU uses, so W is the same before and after any forward.
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
    return model.eval()


class HFBaseView:
    """BaseModelView over a (possibly PEFT-wrapped) HF Llama model."""

    def __init__(self, model: nn.Module):
        from peft import PeftModel

        if isinstance(model, PeftModel):
            model = model.get_base_model()
        self.layers = model.get_decoder().layers
        self.num_layers = len(self.layers)

    def base_module(self, layer: int, name: str) -> nn.Module:
        from peft.tuners.tuners_utils import BaseTunerLayer

        from loraplex.adapters.config import MODULE_PARENT

        module = getattr(getattr(self.layers[layer], MODULE_PARENT[name]), name)
        return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module

    def module_shape(self, layer: int, name: str) -> tuple[int, int]:
        m = self.base_module(layer, name)
        return m.out_features, m.in_features

    def dense_weight(self, layer: int, name: str) -> torch.Tensor:
        import bitsandbytes as bnb

        from loraplex.server.model.quantize import dequantize_nf4

        w = self.base_module(layer, name).weight
        return dequantize_nf4(w) if isinstance(w, bnb.nn.Params4bit) else w.detach().float()


def peft_module(peft_model: nn.Module, layer: int, name: str) -> nn.Module:
    """The PEFT-wrapped target module (layer, name)."""
    from loraplex.adapters.config import MODULE_PARENT

    decoder_layer = peft_model.get_base_model().get_decoder().layers[layer]
    return getattr(getattr(decoder_layer, MODULE_PARENT[name]), name)


def save_peft(
    directory: Path,
    peft_config,
    *,
    quant: str = "nf4",
    perturb: Callable[[nn.Module], None] | None = None,
    seed: int = 0,
):
    """get_peft_model on a fresh tiny base, perturb its adapter weights in place (so
    deltas are non-zero), save_pretrained into `directory`. Returns the PEFT model."""
    from peft import get_peft_model

    model = get_peft_model(make_base(quant, seed), peft_config).eval()
    if perturb is not None:
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            perturb(model)
    model.save_pretrained(str(directory))
    return model


def perturb_params(substring: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A perturb function that sets every parameter whose name holds `substring` to fn(param)."""

    def perturb(model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if substring in n:
                p.copy_(fn(p))

    return perturb


def write_adapter(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """An adapter directory written by hand (for refusals)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    return directory


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    return SimpleNamespace(
        TINY=TINY, make_base=make_base, HFBaseView=HFBaseView, peft_module=peft_module, save_peft=save_peft,
        perturb_params=perturb_params, write_adapter=write_adapter,
    )


@pytest.fixture(scope="session")
def dense_view() -> HFBaseView:
    return HFBaseView(make_base("none"))


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory) -> Path:
    """A LoRA adapter (r=4, q_proj and down_proj) saved by PEFT: refusal tests copy and break it."""
    from peft import LoraConfig

    d = tmp_path_factory.mktemp("lora")
    save_peft(d, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
              quant="none")  # fmt: skip
    return d
