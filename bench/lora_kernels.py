"""Times the Triton shrink+expand pair (one module's adapter delta) on Llama-3-8B shapes
against (a) a per-adapter loop of torch matmuls, as PEFT runs a mixed batch, and (b) one
gathered bmm (every token's A and B gathered, then batched matmuls).

Rows: modules qkv (4096 -> 4096|1024|1024), o (4096 -> 4096), gate_up (4096 ->
2 x 14336), down (14336 -> 4096); ranks 8, 16, 64 and a mix (8..64 per adapter);
decode batches of 1-256 tokens over 1, sqrt(B), B distinct adapters and a zipf draw;
prefill of 512-8192 tokens over 1-8 sequences (one adapter each). Optional VeRA rows
compare serving VeRA folded into per-adapter factors (our kernels, rank 256) with the
shared-projection form (two dense matmuls for the whole batch, per-token lambda scales).

Columns: median µs per call (CUDA events, L2 flushed before each call), the bytes that
must move (each distinct adapter's A and B once, x once, y read and written once),
achieved GB/s and its fraction of the measured device-to-device copy bandwidth, and
speedups over the baselines. Results go to bench/results/ as JSON (--out overrides).

    python bench/lora_kernels.py                 # full sweep, needs a GPU
    python bench/lora_kernels.py --smoke         # tiny shapes on CPU via Triton's interpreter
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.kernels.mapping import LoraMappingBuffers, build_mapping  # no Triton in there

try:
    from bench import common  # python -m bench.lora_kernels
except ImportError:
    import common  # python bench/lora_kernels.py

MODULES = {  # name: (in_features, output slices), Llama-3-8B
    "qkv": (4096, [4096, 1024, 1024]),
    "o": (4096, [4096]),
    "gate_up": (4096, [14336, 14336]),
    "down": (14336, [4096]),
}
SMOKE_MODULES = {"qkv": (64, [64, 16, 16]), "gate_up": (48, [80, 80])}
RANK_MIX = [8, 16, 32, 64]  # "mix": each adapter draws one, stacks padded to 64
DECODE_BATCHES = [1, 4, 16, 64, 256]
MIXES = ["one", "sqrt", "distinct", "zipf"]
PREFILL = [(512, 1), (2048, 1), (2048, 4), (8192, 1), (8192, 8)]  # (tokens, sequences)
VERA_RANK = 256  # PEFT's VeraConfig default r
NUM_SLOTS = 256  # adapter pool: room for 256 distinct adapters in one decode batch
BMM_MAX_BYTES = 4 << 30  # the gathered bmm materialises T x out x R; skip it past this
TARGET_FRACTION, TARGET_VS_LOOP = 0.70, 20.0  # issue 4: decode 64 tokens / 64 rank-16 adapters


@dataclass
class Stacks:
    """One module's adapter pool."""

    a: list[torch.Tensor]  # n_slices × [S, R, in]
    b: list[torch.Tensor]  # n_slices × [S, out_i, R]
    ranks: torch.Tensor  # [n_slices, S] int32
    rank_of: list[int]  # [S] host copy (one rank per adapter and module)
    scales: torch.Tensor  # [n_slices, S] float32


def make_stacks(in_f, widths, num_slots, rank_spec, device, dtype, gen) -> Stacks:
    if rank_spec == "mix":
        max_rank = max(RANK_MIX)
        rank_of = [RANK_MIX[i] for i in torch.randint(0, len(RANK_MIX), (num_slots,), generator=gen)]
    else:
        max_rank = int(rank_spec)
        rank_of = [max_rank] * num_slots
    ranks = torch.tensor(rank_of, dtype=torch.int32, device=device)  # [S]
    live = torch.arange(max_rank, device=device)[None, :] < ranks[:, None]  # [S, R]
    a = [torch.randn(num_slots, max_rank, in_f, device=device, dtype=dtype) * in_f**-0.5 for _ in widths]
    a = [ai * live[:, :, None] for ai in a]  # zero past each adapter's rank
    b = [(torch.randn(num_slots, w, max_rank, device=device, dtype=dtype) * 0.1) * live[:, None, :] for w in widths]
    n = len(widths)
    return Stacks(a, b, ranks.repeat(n, 1).contiguous(), rank_of, torch.full((n, num_slots), 0.5, device=device))


def decode_slots(num_tokens: int, mix: str, num_slots: int, gen: torch.Generator) -> list[int]:
    pool = torch.randperm(num_slots, generator=gen).tolist()
    if mix == "one":
        return [pool[0]] * num_tokens
    if mix == "sqrt":
        n = max(1, round(math.sqrt(num_tokens)))
        return [pool[i % n] for i in range(num_tokens)]
    if mix == "distinct":
        return pool[:num_tokens]
    w = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.1  # zipf over the pool
    return [pool[i] for i in torch.multinomial(w, num_tokens, replacement=True, generator=gen).tolist()]


def prefill_slots(num_tokens: int, seqs: int, num_slots: int, gen: torch.Generator) -> list[int]:
    pool = torch.randperm(num_slots, generator=gen).tolist()
    return [pool[i * seqs // num_tokens] for i in range(num_tokens)]


def min_bytes(slots: list[int], st: Stacks, in_f: int, widths: list[int], elt: int) -> int:
    """Each distinct adapter's A and B (at its own rank) once, x once, y read + written."""
    adapters = sum(st.rank_of[s] * (in_f * len(widths) + sum(widths)) for s in set(slots))
    return elt * (adapters + len(slots) * in_f + 2 * len(slots) * sum(widths))


def peft_loop(x, y, st: Stacks, groups, widths):
    """PEFT's mixed-batch forward: per adapter, lora_B(lora_A(x[idx])) * scale into y[idx]."""
    for s, idx in groups:
        xs = x[idx]  # [T_s, in]
        r, off = st.rank_of[s], 0
        for i, w in enumerate(widths):
            d = (xs @ st.a[i][s, :r].T) @ st.b[i][s, :, :r].T  # [T_s, out_i]
            y[idx, off : off + w] += d * 0.5
            off += w


def gathered_bmm(x, y, st: Stacks, slots_dev, widths):
    """Every token's A and B gathered, then two bmms per slice."""
    sl = slots_dev.long()  # [T]
    off = 0
    for i, w in enumerate(widths):
        t = torch.bmm(st.a[i][sl], x.unsqueeze(2))  # [T, R, 1]
        d = torch.bmm(st.b[i][sl], t).squeeze(2)  # [T, out_i]
        y[:, off : off + w] += d * st.scales[i, sl].to(d.dtype)[:, None]
        off += w


def vera_shared(x, y, a_shared, b_shared, lam_d, lam_b, slots_dev, widths):
    """VeRA served unfolded: shared A/B for the whole batch, per-token lambda scales."""
    sl = slots_dev.long()
    off = 0
    for i, w in enumerate(widths):
        t = (x @ a_shared.T) * lam_d[i][sl]  # [T, r]
        y[:, off : off + w] += (t @ b_shared[:w].T) * lam_b[i][sl]  # [T, out_i]
        off += w


class Bench:
    def __init__(self, args, device, dtype, ops):
        self.args, self.device, self.dtype = args, device, dtype
        self.shrink, self.expand, self.shrink_ref, self.expand_ref = ops
        # smoke: one call per measurement, the interpreter is slow and its timings meaningless
        self.timer = common.Timer(device, args.budget, *((1, 1, 0) if args.smoke else (5, 100, 2)))
        self.copy_gbs = common.copy_bandwidth_gbs(device)
        self.rows: list[dict] = []

    def triton_pair(self, x, y, t, st, mapping):
        self.shrink(x, st.a, mapping, st.ranks, out=t)
        self.expand(y, t, st.b, st.scales, None, mapping, st.ranks)

    def row(self, module, rank_spec, phase, label, slots, st, in_f, widths, baselines=True):
        dev, elt = self.device, torch.finfo(self.dtype).bits // 8
        T = len(slots)
        slots_dev = torch.tensor(slots, dtype=torch.int32, device=dev)
        mapping = build_mapping(slots_dev, len(st.rank_of))
        x = torch.randn(T, in_f, device=dev, dtype=self.dtype)
        y = torch.randn(T, sum(widths), device=dev, dtype=self.dtype)
        t = torch.empty(len(widths), T, st.a[0].shape[1], device=dev)
        # correctness on up to 64 rows against the reference (it gathers fp32 weights per
        # token: too big for a whole prefill); timings then run on y in place
        got = y.clone()
        self.triton_pair(x, got, t, st, mapping)
        sub = torch.linspace(0, T - 1, min(T, 64), device=dev).long().unique()  # [T_sub]
        sub_map = build_mapping(slots_dev[sub], len(st.rank_of))
        want = y[sub].float()
        ref_t = self.shrink_ref(x[sub], st.a, sub_map, st.ranks)
        self.expand_ref(want, ref_t, [b.float() for b in st.b], st.scales, None, sub_map, st.ranks)
        err = (got[sub].float() - want).abs().max().item()

        nbytes = min_bytes(slots, st, in_f, widths, elt)
        us = self.timer(lambda: self.triton_pair(x, y, t, st, mapping))
        r = dict(module=module, rank=rank_spec, phase=phase, tokens=T, mix=label, adapters=len(set(slots)),
                 mbytes=nbytes / 1e6, us=us, gbs=nbytes / us / 1e3, frac=nbytes / us / 1e3 / self.copy_gbs,
                 max_err=err)  # fmt: skip
        r["shrink_us"] = self.timer(lambda: self.shrink(x, st.a, mapping, st.ranks, out=t))
        r["expand_us"] = self.timer(lambda: self.expand(y, t, st.b, st.scales, None, mapping, st.ranks))
        buffers = LoraMappingBuffers(T, len(st.rank_of), dev)
        r["map_us"] = self.timer(lambda: buffers.update(slots_dev))
        if baselines:
            groups = [(s, torch.nonzero(slots_dev == s).squeeze(1)) for s in sorted(set(slots))]
            r["loop_us"] = self.timer(lambda: peft_loop(x, y, st, groups, widths))
            r["x_loop"] = r["loop_us"] / us
            gathered = T * (sum(widths) + in_f) * st.a[0].shape[1] * elt
            if gathered <= BMM_MAX_BYTES:
                r["bmm_us"] = self.timer(lambda: gathered_bmm(x, y, st, slots_dev, widths))
                r["x_bmm"] = r["bmm_us"] / us
        self.rows.append(r)
        return r


def sweep(bench: Bench, args, modules, num_slots, decode_batches, prefill, gen):
    for name in args.modules:
        in_f, widths = modules[name]
        for rank_spec in args.ranks:
            st = make_stacks(in_f, widths, num_slots, rank_spec, bench.device, bench.dtype, gen)
            if "decode" in args.phases:
                for T in decode_batches:
                    for mix in MIXES if T > 1 else ["one"]:
                        if mix == "distinct" and T > num_slots:
                            continue
                        slots = decode_slots(T, mix, num_slots, gen)
                        r = bench.row(name, rank_spec, "decode", mix, slots, st, in_f, widths)
                        progress(r)
            if "prefill" in args.phases:
                for T, seqs in prefill:
                    slots = prefill_slots(T, seqs, num_slots, gen)
                    r = bench.row(name, rank_spec, "prefill", f"{seqs}seq", slots, st, in_f, widths)
                    progress(r)
            del st
        if "vera" in args.phases:
            vera_rows(bench, name, in_f, widths, num_slots, decode_batches, gen)


def vera_rows(bench: Bench, name, in_f, widths, num_slots, decode_batches, gen):
    dev, dt = bench.device, bench.dtype
    rank = VERA_RANK if not bench.args.smoke else 16
    a_shared = torch.randn(rank, in_f, device=dev, dtype=dt) * in_f**-0.5  # [r, in]
    b_shared = torch.randn(max(widths), rank, device=dev, dtype=dt) * 0.1  # [out_max, r]
    lam_d = [torch.rand(num_slots, rank, device=dev, dtype=dt) for _ in widths]  # n × [S, r]
    lam_b = [torch.rand(num_slots, w, device=dev, dtype=dt) for w in widths]  # n × [S, out_i]
    # folded per adapter: A_eff = diag(lam_d) A_shared, B_eff = diag(lam_b) B_shared
    a = [(lam_d[i][:, :, None] * a_shared[None]).contiguous() for i in range(len(widths))]
    b = [(lam_b[i][:, :, None] * b_shared[None, :w]).contiguous() for i, w in enumerate(widths)]
    st = Stacks(a, b, torch.full((len(widths), num_slots), rank, dtype=torch.int32, device=dev), [rank] * num_slots,
                torch.ones(len(widths), num_slots, device=dev))  # fmt: skip
    for T in decode_batches:
        for mix in ["one", "sqrt", "distinct"] if T > 1 else ["one"]:
            if mix == "distinct" and T > num_slots:
                continue
            slots = decode_slots(T, mix, num_slots, gen)
            r = bench.row(name, f"vera{rank}", "vera", mix, slots, st, in_f, widths, baselines=False)
            slots_dev = torch.tensor(slots, dtype=torch.int32, device=dev)
            x = torch.randn(T, in_f, device=dev, dtype=dt)
            y = torch.randn(T, sum(widths), device=dev, dtype=dt)
            r["shared_us"] = bench.timer(lambda: vera_shared(x, y, a_shared, b_shared, lam_d, lam_b, slots_dev, widths))
            r["x_shared"] = r["shared_us"] / r["us"]  # > 1: folded (our kernels) is faster
            progress(r)


def progress(r):
    print(f"  {r['module']:>7} r={r['rank']:<6} {r['phase']:<7} T={r['tokens']:<5} {r['mix']:<8} {r['us']:9.1f} us",
          file=sys.stderr)  # fmt: skip


def targets(rows, copy_gbs) -> list[dict]:
    out = []
    for module in ("qkv", "gate_up"):
        for r in rows:
            if (r["module"], r["rank"], r["phase"], r["tokens"], r["mix"]) == (module, "16", "decode", 64, "distinct"):
                out.append(dict(check=f"{module} decode 64 tok / 64 r16 adapters: >= {TARGET_FRACTION:.0%} of copy BW",
                                value=r["frac"], ok=r["frac"] >= TARGET_FRACTION))  # fmt: skip
                if "x_loop" in r:
                    out.append(dict(check=f"{module} same: >= {TARGET_VS_LOOP:.0f}x the per-adapter loop",
                                    value=r["x_loop"], ok=r["x_loop"] >= TARGET_VS_LOOP))  # fmt: skip
    slower = [r for r in rows if r.get("x_bmm") is not None and r["x_bmm"] < 1.0]
    out.append(dict(check="never slower than the gathered bmm (rows slower)", value=len(slower), ok=not slower))
    return out


COLUMNS = [
    ("module", "module", ""), ("rank", "rank", ""), ("phase", "phase", ""), ("tokens", "T", "d"),
    ("mix", "mix", ""), ("adapters", "adp", "d"), ("mbytes", "MB", ".2f"), ("us", "us", ".1f"),
    ("shrink_us", "shrink", ".1f"), ("expand_us", "expand", ".1f"), ("gbs", "GB/s", ".0f"),
    ("frac", "%copy", ".0%"), ("loop_us", "loop us", ".1f"), ("x_loop", "x loop", ".1f"),
    ("bmm_us", "bmm us", ".1f"), ("x_bmm", "x bmm", ".2f"), ("shared_us", "vera shared", ".1f"),
    ("x_shared", "x shared", ".2f"), ("map_us", "map us", ".1f"), ("max_err", "max err", ".1e"),
]  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU through Triton's interpreter (proves the script; timings meaningless)")
    p.add_argument("--modules", nargs="+", default=None, help=f"subset of {list(MODULES)}")
    p.add_argument("--ranks", nargs="+", default=None, help="subset of 8 16 64 mix (or any integer)")
    p.add_argument("--phases", nargs="+", default=["decode", "prefill", "vera"], choices=["decode", "prefill", "vera"])
    p.add_argument("--budget", type=float, default=0.3, help="seconds of timing per measurement (at least 5 calls)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default bench/results/lora_kernels-<UTC time>.json)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        # before the kernel modules are imported: @triton.jit reads it at decoration
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
        modules, num_slots, decode_batches, prefill = SMOKE_MODULES, 8, [4], [(40, 2)]
        args.modules = args.modules or ["qkv"]
        args.ranks = args.ranks or ["8", "mix"]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: the full sweep needs a GPU (try --smoke)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        modules, num_slots, decode_batches, prefill = MODULES, NUM_SLOTS, DECODE_BATCHES, PREFILL
        args.modules = args.modules or list(MODULES)
        args.ranks = args.ranks or ["8", "16", "64", "mix"]
    unknown = set(args.modules) - set(modules)
    if unknown:
        print(f"unknown modules {sorted(unknown)}; choose from {list(modules)}", file=sys.stderr)
        return 2

    from loraplex.kernels.expand import expand, expand_ref  # after TRITON_INTERPRET is set
    from loraplex.kernels.shrink import shrink, shrink_ref

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    bench = Bench(args, device, torch.bfloat16, (shrink, expand, shrink_ref, expand_ref))
    print(f"device copy bandwidth: {bench.copy_gbs:.0f} GB/s ({common.environment(device)['device']})")
    with torch.inference_mode():
        sweep(bench, args, modules, num_slots, decode_batches, prefill, gen)

    common.print_table(bench.rows, COLUMNS)
    checks = targets(bench.rows, bench.copy_gbs)
    for c in checks:
        verdict = "n/a (smoke)" if args.smoke else "PASS" if c["ok"] else "FAIL"
        print(f"{verdict}  {c['check']}: {c['value']:.3g}")
    payload = dict(bench="lora_kernels", smoke=args.smoke, env=common.environment(device), dtype="bfloat16",
                   copy_gbs=bench.copy_gbs, rows=bench.rows, targets=checks,
                   note="L2 flushed before each timed call; bytes = distinct adapters' A and B + x + 2*y")  # fmt: skip
    path = common.write_json(args.out, "lora_kernels-smoke" if args.smoke else "lora_kernels", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
