"""Our compact Llama-family decoder (Llama, Mistral, Qwen2) over a packed varlen batch:
RMSNorm, RoPE, GQA attention over a paged KV cache, SwiGLU MLP; every decoder linear is
an `AdapterLinear` whose adapter deltas go through the shrink/expand ops.

It knows nothing of requests, sampling or tokenization: the engine hands it token ids,
positions, attention metadata and the token→slot mapping, and gets logits back.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.adapters.form import AdapterWeights
from loraplex.kernels.backend import LoraOps
from loraplex.kernels.mapping import LoraMapping
from loraplex.kernels.rank_pages import RANK_PAGE
from loraplex.server.model.adapter_linear import AdapterLinear
from loraplex.server.model.attention import AttentionMetadata, KVCache, paged_attention_torch
from loraplex.server.model.config import ModelConfig

# Which target modules share an input, and so one AdapterLinear (one shrink/expand pair).
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def adapter_page_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Device bytes of one rank page (16 rank rows of A [r, in] and Bᵀ [r, out]) in every
    target module of every layer: what AdapterLinear allocates per page of its pools."""
    size = torch.finfo(dtype).bits // 8
    per_layer = sum(RANK_PAGE * sum(config.module_shape(name)) * size for names in GROUPS for name in names)
    return per_layer * config.num_layers


def adapter_slot_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Device bytes of one adapter slot's per-slot state over all layers: DoRA's g [out]
    and VeRA's λ_b [out] per target module (scales, ranks, λ_d and page-table rows are a
    few bytes more)."""
    size = torch.finfo(dtype).bits // 8
    per_layer = sum(2 * config.module_shape(name)[0] * size for names in GROUPS for name in names)
    return per_layer * config.num_layers


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [hidden]
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, groups: dict[str, AdapterLinear], norms: tuple[RMSNorm, RMSNorm]):
        super().__init__()
        self.config = config
        self.qkv, self.o, self.gate_up, self.down = (groups[g[0]] for g in GROUPS)
        self.input_norm, self.post_norm = norms
        self.q_width = config.num_heads * config.head_dim
        self.kv_width = config.num_kv_heads * config.head_dim

    def forward(self, h, cos, sin, layer: int, cache: KVCache, meta: AttentionMetadata, mapping: LoraMapping, ops: LoraOps):
        c = self.config
        x = self.input_norm(h)  # [T, hidden]
        qkv = self.qkv(x, mapping, ops)  # [T, q + 2 kv]
        q, k, v = qkv.split([self.q_width, self.kv_width, self.kv_width], dim=-1)
        q = q.reshape(-1, c.num_heads, c.head_dim)  # [T, H, D]
        k = k.reshape(-1, c.num_kv_heads, c.head_dim)  # [T, KVH, D]
        v = v.reshape(-1, c.num_kv_heads, c.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        cache.write(layer, k, v.contiguous(), meta.slot_mapping)
        attn = paged_attention_torch(q, cache, layer, meta, scale=c.head_dim**-0.5)  # [T, H, D]
        h = h + self.o(attn.reshape(-1, self.q_width), mapping, ops)
        x = self.post_norm(h)
        gate, up = self.gate_up(x, mapping, ops).chunk(2, dim=-1)  # [T, I] each
        return h + self.down(F.silu(gate) * up, mapping, ops)


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        embed: torch.Tensor,  # [V, hidden]
        layers: Sequence[DecoderLayer],
        norm: RMSNorm,
        lm_head: torch.Tensor,  # [V, hidden]
        num_slots: int,
        max_rank: int,
        num_pages: int,  # rank pages per target module
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.config = config
        self.embed = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = nn.Parameter(lm_head, requires_grad=False)
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.num_pages = num_pages
        self.dtype = dtype
        self.device = device
        inv_freq, self.rope_scaling = config.rope_inv_freq(device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [head_dim / 2]

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
        return group.bases[i].dense_weight()

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

    # -- the pool's writers and its page budget ------------------------------------------
    def _deltas(self, weights: AdapterWeights):
        for i, group in self.adapter_groups():
            yield group, [weights.modules.get((i, name)) for name in group.names]

    def load_adapter(self, slot: int, weights: AdapterWeights) -> None:
        for group, deltas in self._deltas(weights):
            group.load(slot, deltas)

    def clear_adapter(self, slot: int) -> None:
        for _, group in self.adapter_groups():
            group.clear(slot)

    def fits(self, weights: AdapterWeights, evicted: set[int]) -> bool:
        """Would `weights` find its rank pages once the slots `evicted` are cleared?"""
        return all(group.fits(deltas, evicted) for group, deltas in self._deltas(weights))

    def pages_free(self) -> list[int]:
        """Free rank pages of every target module's pool."""
        return [n for _, group in self.adapter_groups() for n in group.free_pages()]

    def page_bytes(self) -> int:
        """Device bytes of one rank page in every target module (see adapter_page_bytes)."""
        return sum(group.page_bytes() for _, group in self.adapter_groups())

    # -- forward -------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        cache: KVCache,
        meta: AttentionMetadata,
        mapping: LoraMapping,
        ops: LoraOps,
        logits_rows: torch.Tensor,  # [B] int64, rows whose next-token logits are needed
    ) -> torch.Tensor:  # [B, vocab] float32
        h = self.embed[input_ids]  # [T, hidden]
        freqs = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        cos = (emb.cos() * self.rope_scaling).to(self.dtype).unsqueeze(1)  # [T, 1, D]
        sin = (emb.sin() * self.rope_scaling).to(self.dtype).unsqueeze(1)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, i, cache, meta, mapping, ops)
        h = self.norm(h[logits_rows])  # [B, hidden]
        return (h @ self.lm_head.t()).float()


def score_sequence(model: LlamaModel, ids: Sequence[int], slot: int = -1, ops: LoraOps | None = None) -> torch.Tensor:
    """Logits at every position of one sequence ([T, vocab] float32), with adapter `slot`
    (-1 = base), in a private KV cache: for scoring and for fidelity checks."""
    from loraplex.kernels.backend import lora_ops
    from loraplex.kernels.mapping import build_mapping

    c, n, block = model.config, len(ids), 16
    num_blocks = -(-n // block)
    cache = KVCache(c.num_layers, num_blocks, block, c.num_kv_heads, c.head_dim, model.dtype, model.device)
    dev = model.device
    meta = AttentionMetadata([0, n], [n], [torch.arange(num_blocks, device=dev)], torch.arange(n, device=dev), c.sliding_window)
    mapping = build_mapping(torch.full((n,), slot, dtype=torch.int32), model.num_slots)
    positions = torch.arange(n, device=dev)
    ids_t = torch.tensor(list(ids), dtype=torch.int64, device=dev)
    return model(ids_t, positions, cache, meta, mapping, ops or lora_ops(dev), positions)
