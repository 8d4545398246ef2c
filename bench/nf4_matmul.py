"""Times the fused NF4 dequant-matmul (kernels/nf4_matmul.py) against a bf16 cuBLAS matmul
and bitsandbytes' NF4 matmul (`bnb.matmul_4bit`, what `Linear4bit` runs), on the linears
of Llama-3-8B: 4096->4096 (q, o), 4096->1024 (k, v), 4096->14336 (gate, up),
14336->4096 (down), for M = 1 ... 2048 tokens of bf16 activations.

Columns: median µs per call (CUDA events, L2 flushed before each call, bench/common.py)
for bf16, bitsandbytes and ours; ours/bf16 and ours/bitsandbytes; the bytes ours must
move (the 4-bit weight with its absmax, x, y), achieved GB/s and its fraction of the
measured device-to-device copy bandwidth; the tile config and split-K used; ours' max
difference from bitsandbytes' output relative to its largest value. For M >= 256 it also
times dequantize-then-cuBLAS with our dequantization (`deq+mm`), the alternative prefill
path. Targets (issue 7): ours <= 0.35x bf16 for M <= 16, <= 1.0x up to M = 256, faster
than bitsandbytes at every M. `--sweep` also times candidate tile configs per (shape, M)
and reports the fastest, to replace the unmeasured tile table in kernels/nf4_matmul.py.

    python bench/nf4_matmul.py              # full table, needs a GPU
    python bench/nf4_matmul.py --sweep      # plus the tile-config sweep
    python bench/nf4_matmul.py --smoke      # tiny shapes on CPU via Triton's interpreter
"""

from __future__ import annotations

import argparse
import sys

import torch

try:
    from bench import common  # python -m bench.nf4_matmul
except ImportError:
    import common  # python bench/nf4_matmul.py

SHAPES = {  # name: (in_features K, out_features N)
    "q,o 4096->4096": (4096, 4096),
    "k,v 4096->1024": (4096, 1024),
    "gate,up 4096->14336": (4096, 14336),
    "down 14336->4096": (14336, 4096),
}
SMOKE_SHAPES = {"tiny 192->97": (192, 97)}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048]
SMOKE_MS = [1, 3, 17, 300]
DENSE_MIN_M = 256  # time dequantize-then-cuBLAS from here on
TARGETS = [  # (description, M range, column, bound, strict)
    ("ours/bf16 <= 0.35 for M <= 16", (1, 16), "x_bf16", 0.35, False),
    ("ours/bf16 <= 1.0 for M <= 256", (1, 256), "x_bf16", 1.0, False),
    ("ours/bitsandbytes < 1 at every M", (1, 1 << 30), "x_bnb", 1.0, True),
]

COLUMNS = [
    ("shape", "shape", ""), ("m", "M", "d"), ("bf16_us", "bf16 us", ".1f"), ("bnb_us", "bnb us", ".1f"),
    ("ours_us", "ours us", ".1f"), ("x_bf16", "ours/bf16", ".2f"), ("x_bnb", "ours/bnb", ".2f"),
    ("gbs", "GB/s", ".0f"), ("frac", "%copy", ".0%"), ("config", "config", ""),
    ("dense_us", "deq+mm us", ".1f"), ("best_us", "best us", ".1f"), ("best", "best config", ""),
    ("err", "rel err", ".1e"),
]  # fmt: skip


def sweep_candidates(m: int, nf4) -> dict:
    """Candidate TileConfigs for M, named; the table's own choice is always among them."""
    T = nf4.TileConfig
    p2 = nf4.triton.next_power_of_2(m)
    cands = {"table": nf4.config_for(m)}
    if m <= 4:
        for bn, g, w, c in [(64, 4, 8, 3), (64, 2, 4, 4), (32, 2, 4, 8), (128, 2, 8, 2), (64, 4, 8, 6)]:
            cands[f"gemv {bn}x{g} w{w} c{c}"] = T(p2, bn, g, True, w, 1, ctas_per_sm=c)
    if m <= 32:
        for bn, g, st, c in [(64, 4, 3, 2), (64, 2, 4, 2), (128, 2, 3, 2), (32, 4, 3, 4), (64, 4, 3, 4)]:
            cands[f"dec {bn}x{g} s{st} c{c}"] = T(16 if m <= 16 else 32, bn, g, True, 4, st, ctas_per_sm=c)
        cands["dec nosplit"] = T(16 if m <= 16 else 32, 64, 4, True, 4, 3, split_k=1)
    if 16 < m <= 512:
        bm = 32 if m <= 32 else 64
        for bn, g, w, st, swap in [(128, 2, 4, 3, True), (64, 4, 4, 3, True), (128, 1, 8, 4, True),
                                   (128, 1, 4, 3, False), (256, 1, 8, 3, True)]:
            cands[f"mid {bm}x{bn}x{g} w{w} s{st}{' swap' if swap else ''}"] = T(bm, bn, g, swap, w, st)
    if m > 128:
        for bm, bn, g, w, st in [(128, 128, 1, 8, 3), (128, 256, 1, 8, 3), (64, 128, 1, 4, 4), (128, 128, 2, 8, 3),
                                 (256, 128, 1, 8, 3)]:
            cands[f"pre {bm}x{bn}x{g} w{w} s{st}"] = T(bm, bn, g, False, w, st)
    return cands


def run_shape(name, k, n, ms, device, timer, copy_gbs, args, nf4, bnb, gen):
    from loraplex.server.model.quantize import nf4_params

    w = (torch.randn(n, k, generator=gen) * 0.02).to(device, torch.bfloat16)  # [N, K]
    params = nf4_params(w)  # bitsandbytes Params4bit (blocksize 64, double quantization)
    qs = params.quant_state
    p = nf4.PackedNF4.from_bnb(params.data, qs)
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)  # [M, K]
        ours_out = nf4.nf4_matmul(x, p)
        bnb_out = bnb.matmul_4bit(x, params.t(), quant_state=qs)
        err = ((ours_out.float() - bnb_out.float()).abs().max() / bnb_out.float().abs().max().clamp(min=1e-6)).item()
        cfg = nf4.config_for(m)
        group, split, _ = nf4._plan(cfg, m, n, k, nf4._num_sms(device))
        row = dict(shape=name, k=k, n=n, m=m, err=err,
                   config=f"{cfg.block_m}x{cfg.block_n}x{64 * group}{' swap' if cfg.swap_ab else ''}"
                          f"{'' if cfg.use_dot else ' fma'} sk{split}",
                   bf16_us=timer(lambda: torch.nn.functional.linear(x, w)),
                   bnb_us=timer(lambda: bnb.matmul_4bit(x, params.t(), quant_state=qs)),
                   ours_us=timer(lambda: nf4.nf4_matmul(x, p)))  # fmt: skip
        row["x_bf16"] = row["ours_us"] / row["bf16_us"]
        row["x_bnb"] = row["ours_us"] / row["bnb_us"]
        nbytes = p.nbytes + x.numel() * 2 + m * n * 2
        row["gbs"] = nbytes / (row["ours_us"] * 1e-6) / 1e9
        row["frac"] = row["gbs"] / copy_gbs
        if m >= DENSE_MIN_M:
            row["dense_us"] = timer(lambda: torch.nn.functional.linear(x, nf4.dequantize_packed(p, torch.bfloat16)))
        if args.sweep:
            timed = {}
            for cname, c in sweep_candidates(m, nf4).items():
                try:
                    nf4.nf4_matmul(x, p, config=c)  # compile outside the timing
                    timed[cname] = timer(lambda c=c: nf4.nf4_matmul(x, p, config=c))
                except Exception as e:  # a candidate that fails to compile (shared memory) is skipped
                    print(f"  skip {cname}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
            best = min(timed, key=timed.get)
            row.update(best=best, best_us=timed[best], sweep=timed)
        rows.append(row)
        print(f"  {name} M={m}: ours {row['ours_us']:.1f} us, bf16 {row['bf16_us']:.1f}, bnb {row['bnb_us']:.1f}",
              file=sys.stderr, flush=True)  # fmt: skip
    return rows


def check_targets(rows) -> list[dict]:
    checks = []
    for desc, (lo, hi), col, bound, strict in TARGETS:
        sel = [r for r in rows if lo <= r["m"] <= hi]
        if not sel:
            continue
        worst = max(sel, key=lambda r: r[col])
        ok = worst[col] < bound if strict else worst[col] <= bound
        checks.append(dict(check=desc, value=worst[col], worst=f"{worst['shape']} M={worst['m']}", ok=ok))
    return checks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=None, help=f"subset of {list(SHAPES)} (quote the names)")
    p.add_argument("--m", nargs="+", type=int, default=None, help=f"token counts (default {MS})")
    p.add_argument("--sweep", action="store_true", help="also time candidate tile configs per (shape, M)")
    common.add_kernel_bench_args(p, "nf4_matmul", 0.2)
    return p.parse_args(argv)  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.kernel_bench_device(args.smoke)
    if device is None:
        return 2
    shapes, ms = (SMOKE_SHAPES, args.m or SMOKE_MS) if args.smoke else (SHAPES, args.m or MS)
    if args.shapes:
        unknown = set(args.shapes) - set(shapes)
        if unknown:
            print(f"unknown shapes {sorted(unknown)}; choose from {list(shapes)}", file=sys.stderr)
            return 2
        shapes = {s: shapes[s] for s in args.shapes}

    import bitsandbytes as bnb

    from loraplex.kernels import nf4_matmul as nf4  # after TRITON_INTERPRET is set

    gen = torch.Generator().manual_seed(args.seed)
    timer = common.kernel_timer(device, args)
    copy_gbs = common.copy_bandwidth_gbs(device)
    env = common.environment(device)
    print(f"device copy bandwidth: {copy_gbs:.0f} GB/s ({env['device']})")
    rows = []
    with torch.inference_mode():
        for name, (k, n) in shapes.items():
            rows += run_shape(name, k, n, ms, device, timer, copy_gbs, args, nf4, bnb, gen)

    common.print_table(rows, [c for c in COLUMNS if any(c[0] in r for r in rows)])
    checks = check_targets(rows)
    for c in checks:
        verdict = "n/a (smoke)" if args.smoke else "PASS" if c["ok"] else "FAIL"
        print(f"{verdict}  {c['check']}: worst {c['value']:.2f} at {c['worst']}")
    bnb_faster = sorted({(r["n"], r["k"]) for r in rows if r["x_bnb"] >= 1.0})
    print(f"shapes (N, K) where bitsandbytes wins at some M (BNB_FASTER_SHAPES candidates): {bnb_faster}")
    payload = dict(bench="nf4_matmul", smoke=args.smoke, env=env, dtype="bfloat16", copy_gbs=copy_gbs,
                   rows=rows, targets=checks, bnb_faster_shapes=bnb_faster,
                   note="L2 flushed before each timed call; bytes = 4-bit weight with absmax + x + y")  # fmt: skip
    path = common.write_json(args.out, "nf4_matmul-smoke" if args.smoke else "nf4_matmul", payload)
    print(f"wrote {path}")
    if not args.smoke:
        common.write_bandwidth_png(path, "NF4 matmul (ours)", rows, ("shape", "m"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
