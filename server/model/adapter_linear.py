"""A group of base linears that read the same input (q|k|v, gate|up, or one alone),
with the adapter tensors of every slice, computed as

    y = base(x)                                   # [T, sum out_i]: one matmul for the group
    t = d_i[slot] ⊙ shrink(x, A_i[slot])          # [n_slices, T, R]
    y = g_i[slot] ⊙ (y_i + s_i[slot] · o_i[slot] ⊙ (t_i B_i[slot]ᵀ))   (per slice, in place; slot -1 untouched)
    y += bias                                     # after g: PEFT's DoRA does not scale the bias

Adapters' A and Bᵀ live in rank pages (kernels/rank_pages.py): each slice has a pool of
pages, and page-table rows, scales, ranks and the vectors g, d, o are per slot. This
layer holds those tensors and nothing else: which adapter sits in which slot, which
pages are free and which factors are shared is the adapter manager's
(server/engine/adapter_pages.py). The tensors are views into the manager's stacks, one
per width across all layers (server/engine/adapter_stacks.py, `attach`), and that is
where they are written: one adapter's load is a few ops for the whole model.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from loraplex.kernels.backend import LoraOps
from loraplex.kernels.rank_pages import RANK_PAGE


class AdapterLinear(nn.Module):
    def __init__(
        self,
        names: Sequence[str],  # module names of the slices, e.g. ("q_proj", "k_proj", "v_proj")
        base: nn.Module,  # the slices' base linears as one (server/model/linear.py): [T, in] -> [T, sum out_i]
        biases: Sequence[torch.Tensor | None],  # [out_i] or None
        in_features: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.names = tuple(names)
        self.base = base
        self.in_features = in_features
        self.widths = list(base.widths)
        self.dtype = dtype
        self.device = device
        bias_list = [b if b is not None else torch.zeros(w) for b, w in zip(biases, self.widths)]
        self.bias = torch.cat(bias_list).to(device=device, dtype=dtype) if any(b is not None for b in biases) else None  # [sum out]
        self.step = None  # StepContext and LoraOps, set by LlamaModel.bind
        self.ops: LoraOps | None = None
        self.static = False  # always run the kernels with every vector (LlamaModel.bind)
        self.num_slots = 0  # no adapter tensors until the adapter manager attaches them
        self.dora_slots: set[int] = set()
        self.scaled_slots: set[int] = set()

    def attach(self, num_slots: int, max_pages: int, num_pages: int, *, a_pages: list[torch.Tensor], bt_pages: list[torch.Tensor],
               g_stacks: list[torch.Tensor], out_scales: list[torch.Tensor], page_table: torch.Tensor, scales: torch.Tensor,
               ranks: torch.Tensor, rank_scales: torch.Tensor) -> None:  # fmt: skip
        """Takes the adapter tensors (views into the manager's stacks, adapter_stacks.py):
        `num_pages` rank pages per slice, `num_slots` slots of at most `max_pages` pages."""
        self.num_slots, self.max_pages, self.num_pages = num_slots, max_pages, num_pages
        self.a_pages = a_pages  # n × [P, 16, in]
        self.bt_pages = bt_pages  # n × [P, 16, out_i]
        self.page_table = page_table  # [n, S, MP] int32
        self.scales = scales  # [n, S] float32
        self.ranks = ranks  # [n, S] int32
        self.g_stacks = g_stacks  # n × [S, out_i]
        self.out_scales = out_scales  # n × [S, out_i]
        self.rank_scales = rank_scales  # [n, S, R] float32
        self.dora_slots: set[int] = set()  # slots with g: the forward passes g only when there are any (the manager keeps it)
        self.scaled_slots: set[int] = set()  # slots with d or o (VeRA, AdaLoRA)

    def page_bytes(self) -> int:
        """Device bytes of one rank page in every slice."""
        size = torch.finfo(self.dtype).bits // 8
        return sum(RANK_PAGE * (self.in_features + w) * size for w in self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, sum out_i], with the bound step's token→slot mapping."""
        mapping, ops = self.step.mapping, self.ops
        if self.static and not mapping.any_adapter:  # the launchers skip a base-only step; static must not
            mapping = dataclasses.replace(mapping, any_adapter=True)
        y = self.base(x)  # [T, sum out]: one matmul for the group
        if mapping.any_adapter:
            scaled = self.static or bool(self.scaled_slots)
            t = ops.shrink(x, self.a_pages, self.page_table, self.ranks, mapping, rank_scale=self.rank_scales if scaled else None)  # [n, T, R]
            g = self.g_stacks if self.static or self.dora_slots else None
            ops.expand(y, t, self.bt_pages, self.page_table, self.ranks, self.scales, g, mapping, out_scale=self.out_scales if scaled else None)
        if self.bias is not None:
            y = y + self.bias
        return y
