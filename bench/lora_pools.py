"""The adapters of bench/lora_kernels.py's cases, as the kernels read them (rank pages,
kernels/rank_pages.py) and as the baselines read them (dense stacks padded to the case's
largest rank), built from the same weights; and the bytes each case must move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.kernels.rank_pages import RANK_PAGE, pages_for  # no Triton in there

RANK_MIX = [8, 16, 32, 64]  # "mix": each adapter draws one; 1, 1, 2 or 4 pages, dense stacks padded to 64


@dataclass
class Pool:
    """One module's adapters of one case: rank pages for the kernels and, for the
    baselines, dense stacks padded to the case's largest rank (the same weights)."""

    a_pages: list[torch.Tensor]  # n_slices × [P_i, 16, in], rank pages of A
    bt_pages: list[torch.Tensor]  # n_slices × [P_i, 16, out_i], rank pages of Bᵀ
    page_table: torch.Tensor  # [n_slices, S, MP] int32, MP = ceil(max rank / 16)
    ranks: torch.Tensor  # [n_slices, S] int32
    rank_of: list[int]  # [S] host copy (one rank per adapter and module)
    scales: torch.Tensor  # [n_slices, S] float32
    a: list[torch.Tensor] | None = None  # n_slices × [S, R, in], R = max(rank_of), zero past each rank
    b: list[torch.Tensor] | None = None  # n_slices × [S, out_i, R]
    rank_scale: torch.Tensor | None = None  # [n_slices, S, MP * 16] float32, VeRA's λ_d (shared form)
    out_scale: list[torch.Tensor] | None = None  # n_slices × [S, out_i] in y's dtype, VeRA's λ_b (shared form)

    @property
    def num_slots(self) -> int:
        return len(self.rank_of)

    @property
    def t_width(self) -> int:
        return self.page_table.shape[2] * RANK_PAGE  # MP * 16, the width of shrink's output

    def pool_bytes(self) -> int:
        """Adapter memory as pages (each adapter's rank rounded up to 16, A and Bᵀ; pages
        that several slots share count once), plus VeRA's per-slot vectors if any."""
        vecs = ([self.rank_scale] if self.rank_scale is not None else []) + (self.out_scale or [])
        return sum(a.nbytes + b.nbytes for a, b in zip(self.a_pages, self.bt_pages)) + sum(v.nbytes for v in vecs)

    def padded_bytes(self) -> int:
        """Adapter memory with every adapter padded to the case's largest rank (dense stacks)."""
        in_f, elt = self.a_pages[0].shape[2], self.a_pages[0].element_size()
        widths = [b.shape[2] for b in self.bt_pages]
        return elt * self.num_slots * max(self.rank_of) * (in_f * len(widths) + sum(widths))


def page_in(factors: list[torch.Tensor], rank_of: list[int], gen: torch.Generator):
    """Cuts one slice's factors, each [S, R, w_j] in rank rows (A, then Bᵀ) and zero past
    each slot's rank, into pools of pages [P, 16, w_j], P = sum(ceil(rank / 16)), under one
    page table [S, MP] int32. Page ids come in shuffled order, so an adapter's pages are
    scattered over the pool; table entries past an adapter's pages are 0 (never read)."""
    num_slots, r_max, _ = factors[0].shape
    dev = factors[0].device
    mp = pages_for(max(rank_of))
    counts = torch.tensor([pages_for(r) for r in rank_of])  # [S]
    used = torch.arange(mp)[None, :] < counts[:, None]  # [S, MP]
    num_pages = int(counts.sum())
    table = torch.zeros(num_slots, mp, dtype=torch.int32)  # [S, MP]
    table[used] = torch.randperm(num_pages, generator=gen).to(torch.int32)
    ids, used_dev = table[used].long().to(dev), used.to(dev)  # [P] in (slot, page) order
    pools = []
    for f in factors:
        w = f.shape[2]
        padded = torch.nn.functional.pad(f, (0, 0, 0, mp * RANK_PAGE - r_max)).reshape(num_slots, mp, RANK_PAGE, w)
        pages = torch.empty(num_pages, RANK_PAGE, w, device=dev, dtype=f.dtype)  # [P, 16, w]
        pages[ids] = padded[used_dev]
        pools.append(pages)
    return pools, table.to(dev)


def make_pool(in_f, widths, num_slots, rank_spec, device, dtype, gen) -> Pool:
    if rank_spec == "mix":
        rank_of = [RANK_MIX[i] for i in torch.randint(0, len(RANK_MIX), (num_slots,), generator=gen).tolist()]
    else:
        rank_of = [int(rank_spec)] * num_slots
    r_max = max(rank_of)
    ranks = torch.tensor(rank_of, dtype=torch.int32, device=device)  # [S]
    live = torch.arange(r_max, device=device)[None, :] < ranks[:, None]  # [S, R]
    a = [(torch.randn(num_slots, r_max, in_f, device=device, dtype=dtype) * in_f**-0.5) * live[:, :, None]
         for _ in widths]  # fmt: skip
    b = [(torch.randn(num_slots, w, r_max, device=device, dtype=dtype) * 0.1) * live[:, None, :] for w in widths]
    a_pages, bt_pages, tables = [], [], []
    for ai, bi in zip(a, b):
        (ap, bp), table = page_in([ai, bi.transpose(1, 2)], rank_of, gen)
        a_pages.append(ap)
        bt_pages.append(bp)
        tables.append(table)
    n = len(widths)
    return Pool(a_pages, bt_pages, torch.stack(tables).contiguous(), ranks.repeat(n, 1).contiguous(), rank_of,
                torch.full((n, num_slots), 0.5, device=device), a, b)  # fmt: skip


def min_bytes(slots: list[int], pool: Pool, in_f: int, widths: list[int], elt: int, exact: bool = False) -> int:
    """Each distinct adapter's pages of A and Bᵀ once (its rank rounded up to 16; with
    `exact`, its rank: the kernels never read a page's rows past the rank), x once, y read
    and written once."""
    rows = sum(r if exact else pages_for(r) * RANK_PAGE for r in (pool.rank_of[s] for s in set(slots)))
    return elt * (rows * (in_f * len(widths) + sum(widths)) + len(slots) * in_f + 2 * len(slots) * sum(widths))


def vera_shared_bytes(slots: list[int], pool: Pool, in_f: int, widths: list[int], elt: int) -> int:
    """VeRA's shared form: the projections' pages of A and Bᵀ once per slice (every slot
    names the same pages), x once, y read and written once, and each distinct adapter's
    λ_d (fp32, one per column of t) and λ_b (y's dtype) of every slice."""
    rows = pages_for(pool.rank_of[0]) * RANK_PAGE
    vecs = pool.rank_scale[0, 0].nbytes * len(widths) + sum(o[0].nbytes for o in pool.out_scale)
    T = len(slots)
    return elt * (rows * (in_f * len(widths) + sum(widths)) + T * in_f + 2 * T * sum(widths)) + len(set(slots)) * vecs


def vera_pools(in_f, widths, num_slots, rank, device, dtype, gen) -> tuple[dict[str, Pool], tuple]:
    """VeRA's two forms of the same `num_slots` adapters, which share the projections
    A [r, in] and B [out_max, r] and each have λ_d [r] and λ_b [out_i] per slice:
    "shared", every slot's page-table row naming one copy of A's and Bᵀ's pages (per
    slice, as the server stores factors with one shared_key), λ_d as rank_scale and λ_b
    as out_scale; "folded", each slot its own pages of λ_d·A and Bᵀ·λ_b (scale 1, no
    vectors). Also (A, B, λ_d, λ_b) for the torch baseline."""
    a_sh = torch.randn(rank, in_f, device=device, dtype=dtype) * in_f**-0.5  # [r, in]
    b_sh = torch.randn(max(widths), rank, device=device, dtype=dtype) * 0.1  # [out_max, r]
    lam_d = [torch.rand(num_slots, rank, device=device, dtype=dtype) for _ in widths]  # n × [S, r]
    lam_b = [torch.rand(num_slots, w, device=device, dtype=dtype) for w in widths]  # n × [S, out_i]
    n, mp, rank_of = len(widths), pages_for(rank), [rank] * num_slots
    ranks = torch.full((n, num_slots), rank, dtype=torch.int32, device=device)  # [n, S]
    ones = torch.ones(n, num_slots, device=device)  # [n, S] scales: VeRA's s is 1
    rank_scale = torch.ones(n, num_slots, mp * RANK_PAGE, device=device)  # [n, S, MP * 16] fp32
    rank_scale[:, :, :rank] = torch.stack(lam_d).float()
    forms = {"shared": ([], [], []), "folded": ([], [], [])}  # A pages, Bᵀ pages, tables [S, MP] per slice
    for i, w in enumerate(widths):
        bt = b_sh[:w].T  # [r, out_i]
        (ap, bp), table = page_in([a_sh[None], bt[None]], [rank], gen)  # one copy: [MP, 16, w], table [1, MP]
        for acc, v in zip(forms["shared"], (ap, bp, table.expand(num_slots, mp))):
            acc.append(v)
        # folded one slice at a time: gate_up's dense [S, r, out_i] at rank 256 is 1.9 GB
        (ap, bp), table = page_in([lam_d[i][:, :, None] * a_sh[None], lam_b[i][:, None, :] * bt[None]], rank_of, gen)
        for acc, v in zip(forms["folded"], (ap, bp, table)):
            acc.append(v)
    pools = {form: Pool(ap, bp, torch.stack(tables).contiguous(), ranks, rank_of, ones)
             for form, (ap, bp, tables) in forms.items()}  # fmt: skip
    pools["shared"].rank_scale, pools["shared"].out_scale = rank_scale, lam_b
    return pools, (a_sh, b_sh, lam_d, lam_b)
