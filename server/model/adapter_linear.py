"""A group of base linears that read the same input (q|k|v, gate|up, or one alone),
with the adapter slot stacks of every slice, computed as

    y = concat_i(base_i(x))                       # [T, sum out_i], shared by all tokens
    t = shrink(x, A_i[slot])                      # [n_slices, T, R]
    y = g_i[slot] ⊙ (y_i + s_i[slot] · t_i B_i[slot]ᵀ)   (per slice, in place; slot -1 untouched)
    y += bias                                     # after g: PEFT's DoRA does not scale the bias

`load(slot, deltas)` and `clear(slot)` are the only writers of the stacks.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from loraplex.adapters.form import ModuleDelta
from loraplex.kernels.backend import LoraOps
from loraplex.kernels.mapping import LoraMapping


class AdapterLinear(nn.Module):
    def __init__(
        self,
        names: Sequence[str],  # module names of the slices, e.g. ("q_proj", "k_proj", "v_proj")
        bases: Sequence[nn.Module],  # DenseLinear / NF4Linear, one per slice
        biases: Sequence[torch.Tensor | None],  # [out_i] or None
        in_features: int,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.names = tuple(names)
        self.bases = nn.ModuleList(bases)
        self.in_features = in_features
        self.widths = [b.out_features for b in bases]
        self.dtype = dtype
        bias_list = [b if b is not None else torch.zeros(w) for b, w in zip(biases, self.widths)]
        self.bias = torch.cat(bias_list).to(device=device, dtype=dtype) if any(b is not None for b in biases) else None  # [sum out]
        self.a_stacks = [torch.zeros(num_slots, max_rank, in_features, dtype=dtype, device=device) for _ in bases]  # n × [S, R, in]
        self.b_stacks = [torch.zeros(num_slots, w, max_rank, dtype=dtype, device=device) for w in self.widths]  # n × [S, out_i, R]
        self.scales = torch.zeros(len(bases), num_slots, dtype=torch.float32, device=device)  # [n, S]
        self.ranks = torch.zeros(len(bases), num_slots, dtype=torch.int32, device=device)  # [n, S]
        self.g_stacks = [torch.ones(num_slots, w, dtype=dtype, device=device) for w in self.widths]  # n × [S, out_i]
        self._dora_slots: set[int] = set()

    def slot_bytes(self) -> int:
        per = sum(a[0].numel() * a.element_size() for a in self.a_stacks) + sum(b[0].numel() * b.element_size() for b in self.b_stacks)
        return per + sum(g[0].numel() * g.element_size() for g in self.g_stacks)

    def load(self, slot: int, deltas: Sequence[ModuleDelta | None]) -> None:
        """Writes one adapter's deltas (one per slice, None = slice not adapted) into `slot`."""
        self.clear(slot)
        for i, d in enumerate(deltas):
            if d is None:
                continue
            r = d.rank
            if r > self.a_stacks[i].shape[1]:
                raise ValueError(f"{self.names[i]}: rank {r} exceeds the pool's max rank {self.a_stacks[i].shape[1]}")
            self.a_stacks[i][slot, :r].copy_(d.a)
            self.b_stacks[i][slot, :, :r].copy_(d.b)
            self.scales[i, slot] = d.scale
            self.ranks[i, slot] = r
            if d.g is not None:
                self.g_stacks[i][slot].copy_(d.g)
                self._dora_slots.add(slot)

    def clear(self, slot: int) -> None:
        for i in range(len(self.bases)):
            self.a_stacks[i][slot].zero_()
            self.b_stacks[i][slot].zero_()
            self.g_stacks[i][slot].fill_(1.0)
        self.scales[:, slot] = 0.0
        self.ranks[:, slot] = 0
        self._dora_slots.discard(slot)

    def forward(self, x: torch.Tensor, mapping: LoraMapping, ops: LoraOps) -> torch.Tensor:
        """x: [T, in] -> [T, sum out_i]."""
        outs = [base(x) for base in self.bases]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # [T, sum out]
        if mapping.any_adapter:
            t = ops.shrink(x, self.a_stacks, mapping, self.ranks)  # [n, T, R]
            g = self.g_stacks if self._dora_slots else None
            ops.expand(y, t, self.b_stacks, self.scales, g, mapping, self.ranks)
        if self.bias is not None:
            y = y + self.bias
        return y
