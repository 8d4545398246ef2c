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
(server/engine/adapter_pages.py). `allocate` sizes the tensors once; `write_pages`,
`write_slot` and `reset_slot` are the only writers, and they only copy.
"""

from __future__ import annotations

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
        self.allocate(0, 1, 0)

    def allocate(self, num_slots: int, max_pages: int, num_pages: int) -> None:
        """(Re)allocates the adapter tensors: `num_pages` rank pages per slice, `num_slots`
        slots of at most `max_pages` pages each. Every slot starts empty."""
        n, dt, dev = len(self.widths), self.dtype, self.device
        self.num_slots, self.max_pages, self.num_pages = num_slots, max_pages, num_pages
        self.a_pages = [torch.zeros(num_pages, RANK_PAGE, self.in_features, dtype=dt, device=dev) for _ in range(n)]  # n × [P, 16, in]
        self.bt_pages = [torch.zeros(num_pages, RANK_PAGE, w, dtype=dt, device=dev) for w in self.widths]  # n × [P, 16, out_i]
        self.page_table = torch.zeros(n, num_slots, max_pages, dtype=torch.int32, device=dev)  # [n, S, MP]
        self.scales = torch.zeros(n, num_slots, dtype=torch.float32, device=dev)  # [n, S]
        self.ranks = torch.zeros(n, num_slots, dtype=torch.int32, device=dev)  # [n, S]
        self.g_stacks = [torch.ones(num_slots, w, dtype=dt, device=dev) for w in self.widths]  # n × [S, out_i]
        self.out_scales = [torch.ones(num_slots, w, dtype=dt, device=dev) for w in self.widths]  # n × [S, out_i]
        self.rank_scales = torch.ones(n, num_slots, max_pages * RANK_PAGE, dtype=torch.float32, device=dev)  # [n, S, R]
        self._dora_slots: set[int] = set()  # slots with g: the forward passes g only when there are any
        self._scaled_slots: set[int] = set()  # slots with d or o (VeRA)

    def page_bytes(self) -> int:
        """Device bytes of one rank page in every slice."""
        size = torch.finfo(self.dtype).bits // 8
        return sum(RANK_PAGE * (self.in_features + w) * size for w in self.widths)

    # -- the writers (called by the adapter manager only) ----------------------------------
    def write_pages(self, i: int, page_ids: torch.Tensor, a_rows: torch.Tensor, bt_rows: torch.Tensor) -> None:
        """Copies rank pages of slice i: page_ids [n] int64; a_rows [n, 16, in]; bt_rows [n, 16, out_i]."""
        self.a_pages[i].index_copy_(0, page_ids, a_rows)
        self.bt_pages[i].index_copy_(0, page_ids, bt_rows)

    def write_slot(
        self,
        i: int,
        slot: int,
        page_ids: torch.Tensor,  # [n] int32, the slot's pages in rank order
        rank: int,
        scale: torch.Tensor,  # [] float32
        g: torch.Tensor | None = None,  # [out_i]
        rank_scale: torch.Tensor | None = None,  # [rank] float32
        out_scale: torch.Tensor | None = None,  # [out_i]
    ) -> None:
        """Points slice i of `slot` at its pages and sets its scale, rank and vectors."""
        self.page_table[i, slot, : page_ids.shape[0]].copy_(page_ids)
        self.scales[i, slot].copy_(scale)
        self.ranks[i, slot] = rank
        if g is not None:
            self.g_stacks[i][slot].copy_(g)
            self._dora_slots.add(slot)
        if rank_scale is not None:
            self.rank_scales[i, slot, :rank].copy_(rank_scale)
            self._scaled_slots.add(slot)
        if out_scale is not None:
            self.out_scales[i][slot].copy_(out_scale)
            self._scaled_slots.add(slot)

    def reset_slot(self, slot: int) -> None:
        """Empties `slot` in every slice (its pages are the manager's to reuse)."""
        for i in range(len(self.widths)):
            self.g_stacks[i][slot].fill_(1.0)
            self.out_scales[i][slot].fill_(1.0)
        self.rank_scales[:, slot] = 1.0
        self.page_table[:, slot] = 0
        self.scales[:, slot] = 0.0
        self.ranks[:, slot] = 0
        self._dora_slots.discard(slot)
        self._scaled_slots.discard(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, sum out_i], with the bound step's token→slot mapping."""
        mapping, ops = self.step.mapping, self.ops
        y = self.base(x)  # [T, sum out]: one matmul for the group
        if mapping.any_adapter or self.static:
            scaled = self.static or bool(self._scaled_slots)
            t = ops.shrink(x, self.a_pages, self.page_table, self.ranks, mapping, rank_scale=self.rank_scales if scaled else None)  # [n, T, R]
            g = self.g_stacks if self.static or self._dora_slots else None
            ops.expand(y, t, self.bt_pages, self.page_table, self.ranks, self.scales, g, mapping, out_scale=self.out_scales if scaled else None)
        if self.bias is not None:
            y = y + self.bias
        return y
