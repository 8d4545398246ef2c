"""Our compact Llama-family decoder (Llama, Mistral, Qwen2) over a packed varlen batch:
RMSNorm, RoPE, GQA attention over a paged KV cache, SwiGLU MLP; every decoder linear is
an `AdapterLinear` whose adapter deltas go through the shrink/expand ops.

The forward reads one step context (server/engine/step_context.py: token ids,
positions, KV rows, block tables, the token→slot mapping), bound once with the ops it
runs (`bind`, server/model/ops.py): layers take only hidden states. It knows nothing of
requests, sampling or tokenization: the runner fills the context and gets logits back.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from loraplex.server.model.adapter_linear import AdapterLinear
from loraplex.server.model.attention import KVCache
from loraplex.server.model.config import ModelConfig

# Which target modules share an input, and so one AdapterLinear (one shrink/expand pair).
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


class RMSNorm(nn.Module):
    """An RMSNorm's weight and eps; the op itself is the bound ops' `rms_norm` (kernels/rms_norm.py)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [hidden]
        self.eps = eps


class DecoderLayer(nn.Module):
    """forward(h, delta) -> (h, delta): the residual stream h [T, hidden] and the previous
    layer's output delta (None before the first layer), added into h in place by the
    fused add+norm. Per-step inputs come from the bound step context."""

    def __init__(self, config: ModelConfig, groups: dict[str, AdapterLinear], norms: tuple[RMSNorm, RMSNorm], index: int):
        super().__init__()
        self.config = config
        self.index = index
        self.qkv, self.o, self.gate_up, self.down = (groups[g[0]] for g in GROUPS)
        self.input_norm, self.post_norm = norms
        self.q_width = config.num_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        self.step = None  # StepContext, set by LlamaModel.bind
        self.ops = None  # ModelOps

    def forward(self, h: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        c, step, ops = self.config, self.step, self.ops
        x, h = _add_norm(ops, delta, h, self.input_norm)  # [T, hidden]
        qkv = self.qkv(x)  # [T, q + 2 kv]
        k_cache, v_cache = step.cache.k[self.index], step.cache.v[self.index]
        q = ops.rope_kv(qkv, self.cos_sin, step.positions, k_cache, v_cache, step.kv_rows, c.num_heads, c.num_kv_heads, c.head_dim)  # [T, H, D]
        attn = ops.attention(q, step, self.index, self.scale)  # [T, H, D]
        x, h = _add_norm(ops, self.o(attn.reshape(-1, self.q_width)), h, self.post_norm)
        return h, self.down(ops.silu_mul(self.gate_up(x)))


def _add_norm(ops, delta: torch.Tensor | None, h: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(h + delta), h + delta), the sum written into h; just (norm(h), h) without delta."""
    if delta is None:
        return ops.rms_norm(h, norm.weight, norm.eps), h
    return ops.rms_norm(delta, norm.weight, norm.eps, residual=h)


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        embed: torch.Tensor,  # [V, hidden]
        layers: Sequence[DecoderLayer],
        norm: RMSNorm,
        lm_head: torch.Tensor,  # [V, hidden]
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.config = config
        self.embed = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = nn.Parameter(lm_head, requires_grad=False)
        self.num_slots = 0  # adapter slots of the layers' tensors (set by the adapter manager's AdapterPages)
        self.dtype = dtype
        self.device = device
        self.step = None  # the bound StepContext (bind)
        self.ops = None  # the bound ModelOps
        self.cos_sin = None  # [max_positions, 2, head_dim]: RoPE's cos and sin rows, built once (bind)

    # -- BaseModelView (what adapter conversion needs) --------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def module_shape(self, layer: int, name: str) -> tuple[int, int]:
        if not 0 <= layer < self.config.num_layers:
            raise KeyError(f"layer {layer} out of range (the base has {self.config.num_layers})")
        return self.config.module_shape(name)

    def dense_weight(self, layer: int, name: str) -> torch.Tensor:
        group, i = self._find(layer, name)
        return group.base.dense_weight(i)

    def _find(self, layer: int, name: str) -> tuple[AdapterLinear, int]:
        for group in (self.layers[layer].qkv, self.layers[layer].o, self.layers[layer].gate_up, self.layers[layer].down):
            if name in group.names:
                return group, group.names.index(name)
        raise KeyError(name)

    def adapter_groups(self):
        """(layer index, AdapterLinear) of every adapted group."""
        for i, layer in enumerate(self.layers):
            for group in (layer.qkv, layer.o, layer.gate_up, layer.down):
                yield i, group

    # -- the step ----------------------------------------------------------------------
    def bind(self, step, ops, max_positions: int, static_adapters: bool = False) -> None:
        """Points every layer at `step` (a StepContext, read by the forward) and `ops` (a
        ModelOps), and builds RoPE's cos/sin rows for positions below max_positions.
        static_adapters: the adapter layers always run their kernels with every vector
        (DoRA's g, VeRA's d and o), whatever the resident adapters and the step's slots, so
        the forward's ops do not change with them (what a captured CUDA graph needs)."""
        from loraplex.kernels.rope_kv import rope_cache

        if self.cos_sin is None or self.cos_sin.shape[0] < max_positions:
            inv_freq, scaling = self.config.rope_inv_freq(self.device)
            self.cos_sin = rope_cache(inv_freq, scaling, max_positions, self.dtype, self.device)
        self.step, self.ops = step, ops
        for layer in self.layers:
            layer.step, layer.ops, layer.cos_sin = step, ops, self.cos_sin
            for group in (layer.qkv, layer.o, layer.gate_up, layer.down):
                group.step, group.ops, group.static = step, ops.lora, static_adapters

    @torch.inference_mode()
    def forward(self) -> torch.Tensor:  # [num_logits, vocab] float32
        """The bound step: its tokens through every layer, logits of its logits rows."""
        step = self.step
        h = self.embed[step.input_ids]  # [T, hidden]
        delta = None
        for layer in self.layers:
            h, delta = layer(h, delta)
        rows = step.logits_rows
        x, _ = self.ops.rms_norm(delta[rows], self.norm.weight, self.norm.eps, residual=h[rows])  # [B, hidden]
        return (x @ self.lm_head.t()).float()


def score_sequence(model: LlamaModel, ids: Sequence[int], slot: int = -1, ops=None) -> torch.Tensor:
    """Logits at every position of one sequence ([T, vocab] float32), with adapter `slot`
    (-1 = base), in a private KV cache and step context (bound to the model: for scoring
    and fidelity checks, not beside a running engine). ops: ModelOps (default: the device's)."""
    from loraplex.server.engine.step_context import StepContext, StepInputs
    from loraplex.server.model.ops import model_ops

    c, n, block = model.config, len(ids), 16
    num_blocks = -(-n // block)
    cache = KVCache(c.num_layers, num_blocks, block, c.num_kv_heads, c.head_dim, model.dtype, model.device)
    ops = ops or model_ops(model.device)
    step = StepContext(cache, n, 1, num_blocks, max(model.num_slots, 1), model.device, c.sliding_window, host_layout=ops.host_layout)
    model.bind(step, ops, max(n, model.cos_sin.shape[0] if model.cos_sin is not None else 0))
    step.fill(StepInputs(list(ids), list(range(n)), list(range(n)), [slot] * n, [0, n], [n], [list(range(num_blocks))], list(range(n))))
    return model()
