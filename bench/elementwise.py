"""Times the fused elementwise kernels of the decode step against their torch refs (the
ops the model runs today), at Llama-3-8B shapes in bf16: hidden 4096, I 14336, H 32,
KVH 8, D 128, for T = 32 (decode) and 2048 (prefill) tokens.

    rms_norm        kernels/rms_norm.py, x [T, hidden] -> y
    add+rms_norm    the same with residual: residual += x in place, y = norm(residual)
    silu_mul        kernels/silu_mul.py, gate_up [T, 2I] -> [T, I]
    rope_kv         kernels/rope_kv.py, qkv [T, (H + 2 KVH) D]: q rotated in place, k and v
                    written to the cache at slot_mapping

Columns: median µs per call (CUDA events, L2 flushed before each call, bench/common.py)
of the torch ref and of ours; ref/ours; for rope_kv also `today` (llama.py's per-step
cos/sin, rotation and KVCache.write, without the ref's padding mask, which syncs); the
bytes ours must move; its GB/s and fraction of the measured device-to-device copy
bandwidth; ours' max difference from the ref in units of the ref's dtype eps. Each op's
result is checked against its ref first (exit 1 on a mismatch).

    python bench/elementwise.py            # full table, needs a GPU (~30 s)
    python bench/elementwise.py --smoke    # tiny shapes on CPU via Triton's interpreter, checks results
"""

from __future__ import annotations

import argparse
import sys

import torch

try:
    from bench import common  # python -m bench.elementwise
except ImportError:
    import common  # python bench/elementwise.py

SHAPES = dict(hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128)  # Llama-3-8B
SMOKE_SHAPES = dict(hidden=123, inter=75, heads=4, kv_heads=2, head_dim=80)
TS = [32, 2048]
SMOKE_TS = [3, 17]
MAX_POSITIONS = 8192
BLOCK_SIZE = 16
EPS = 1e-5
TOL_EPS = {torch.bfloat16: 2.0, torch.float16: 2.0, torch.float32: 16.0}  # max |ours - ref| / (eps * |ref|)

COLUMNS = [
    ("op", "op", ""), ("t", "T", "d"), ("ref_us", "ref us", ".1f"), ("ours_us", "ours us", ".1f"),
    ("speedup", "ref/ours", ".2f"), ("today_us", "today us", ".1f"), ("mb", "MB", ".2f"),
    ("gbs", "GB/s", ".0f"), ("frac", "%copy", ".0%"), ("err_eps", "err/eps", ".2f"), ("ok", "ok", ""),
]  # fmt: skip


def rel_err_eps(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / (eps * max(|want|, tiny)) over finite elements, in units of the dtype's eps;
    inf when the NaN patterns differ."""
    if not torch.equal(got.isnan(), want.isnan()):
        return float("inf")
    g, w = got.float().nan_to_num(), want.float().nan_to_num()
    tiny = torch.finfo(want.dtype).tiny
    return ((g - w).abs() / w.abs().clamp(min=tiny)).max().item() / torch.finfo(want.dtype).eps if w.numel() else 0.0


def cases(t: int, s: dict, dtype, device, gen):
    """(name, ours(), ref(), today() or None, check() -> err in eps, bytes moved by ours) per op."""
    from loraplex.kernels.rms_norm import rms_norm, rms_norm_ref
    from loraplex.kernels.rope_kv import rope_cache, rope_kv_write, rope_kv_write_ref, rotate_half
    from loraplex.kernels.silu_mul import silu_mul, silu_mul_ref

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device, dtype)

    elt = torch.finfo(dtype).bits // 8
    hidden, inter, h, kvh, d = s["hidden"], s["inter"], s["heads"], s["kv_heads"], s["head_dim"]

    x, w, res = rand(t, hidden), rand(hidden, scale=0.1) + 1, rand(t, hidden)  # [T, hidden], [hidden]
    y = torch.empty_like(x)

    def check_norm():
        return rel_err_eps(rms_norm(x, w, EPS, out=y), rms_norm_ref(x, w, EPS))

    def check_add_norm():
        r1, r2 = res.clone(), res.clone()
        got, _ = rms_norm(x, w, EPS, residual=r1, out=y)
        want, _ = rms_norm_ref(x, w, EPS, residual=r2)
        return max(rel_err_eps(got, want), rel_err_eps(r1, r2))

    yield ("rms_norm", lambda: rms_norm(x, w, EPS, out=y), lambda: rms_norm_ref(x, w, EPS), None, check_norm,
           (2 * t * hidden + hidden) * elt)  # fmt: skip
    yield ("add+rms_norm", lambda: rms_norm(x, w, EPS, residual=res, out=y),
           lambda: rms_norm_ref(x, w, EPS, residual=res), None, check_add_norm, (4 * t * hidden + hidden) * elt)  # fmt: skip

    gu = rand(t, 2 * inter, scale=2.0)  # [T, 2I]
    act = torch.empty(t, inter, dtype=dtype, device=device)
    yield ("silu_mul", lambda: silu_mul(gu, out=act), lambda: silu_mul_ref(gu), None,
           lambda: rel_err_eps(silu_mul(gu, out=act), silu_mul_ref(gu)), 3 * t * inter * elt)  # fmt: skip

    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))  # [D/2]
    table = rope_cache(inv_freq, 1.0, MAX_POSITIONS, dtype, device)  # [P, 2, D]
    qkv = rand(t, (h + 2 * kvh) * d)  # [T, (H + 2 KVH) D]
    positions = torch.randint(0, MAX_POSITIONS, (t,), generator=gen).to(device)
    num_rows = BLOCK_SIZE * (t // BLOCK_SIZE + 4)
    slots = torch.randperm(num_rows, generator=gen)[:t].to(device)  # [T] int64, distinct
    k_cache = torch.full((num_rows, kvh, d), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    args = (table, positions, k_cache, v_cache, slots, h, kvh, d)

    def today():  # llama.py: per-step cos/sin, DecoderLayer's rotation, KVCache.write
        freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)
        q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
        q, k, v = q.reshape(-1, h, d), k.reshape(-1, kvh, d), v.reshape(-1, kvh, d)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache.index_copy_(0, slots, k)
        v_cache.index_copy_(0, slots, v.contiguous())
        return q

    def check_rope():
        pad = slots.clone()
        pad[0] = -1  # one padding row: its cache row must stay NaN
        outs = []
        for fn in (rope_kv_write, rope_kv_write_ref):
            qq, kc, vc = qkv.clone(), torch.full_like(k_cache, float("nan")), torch.full_like(v_cache, float("nan"))
            fn(qq, table, positions, kc, vc, pad, h, kvh, d)
            outs.append((qq, kc, vc))
        return max(rel_err_eps(a, b) for a, b in zip(*outs))

    nbytes = (t * (h + 2 * kvh) * d + t * h * d + 2 * t * kvh * d + 2 * t * d) * elt + 2 * t * 8
    yield ("rope_kv", lambda: rope_kv_write(qkv, *args), lambda: rope_kv_write_ref(qkv, *args), today, check_rope,
           nbytes)  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", nargs="+", type=int, default=None, help=f"token counts (default {TS})")
    common.add_kernel_bench_args(p, "elementwise", 0.2)
    return p.parse_args(argv)  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.kernel_bench_device(args.smoke)
    if device is None:
        return 2
    shapes, ts = (SMOKE_SHAPES, args.t or SMOKE_TS) if args.smoke else (SHAPES, args.t or TS)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(args.seed)
    timer = common.kernel_timer(device, args)
    copy_gbs = common.copy_bandwidth_gbs(device)
    env = common.environment(device)
    print(f"device copy bandwidth: {copy_gbs:.0f} GB/s ({env['device']})")
    rows = []
    with torch.inference_mode():
        for t in ts:
            for name, ours, ref, today, check, nbytes in cases(t, shapes, dtype, device, gen):
                err = check()  # before timing: the timed calls rewrite their in-place inputs
                row = dict(op=name, t=t, err_eps=err, ok=err <= TOL_EPS[dtype], mb=nbytes / 1e6,
                           ref_us=timer(ref), ours_us=timer(ours))  # fmt: skip
                if today is not None:
                    row["today_us"] = timer(today)
                row["speedup"] = row["ref_us"] / row["ours_us"]
                row["gbs"] = nbytes / (row["ours_us"] * 1e-6) / 1e9
                row["frac"] = row["gbs"] / copy_gbs
                rows.append(row)
                print(f"  {name} T={t}: ours {row['ours_us']:.1f} us, ref {row['ref_us']:.1f}, err {err:.2f} eps",
                      file=sys.stderr, flush=True)  # fmt: skip

    common.print_table(rows, [c for c in COLUMNS if any(c[0] in r for r in rows)])
    bad = [f"{r['op']} T={r['t']}" for r in rows if not r["ok"]]
    payload = dict(bench="elementwise", smoke=args.smoke, env=env, dtype=str(dtype).removeprefix("torch."),
                   shapes=shapes, copy_gbs=copy_gbs, rows=rows, mismatches=bad,
                   note="L2 flushed before each timed call; bytes = what ours reads and writes")  # fmt: skip
    path = common.write_json(args.out, "elementwise-smoke" if args.smoke else "elementwise", payload)
    print(f"wrote {path}")
    if not args.smoke:
        common.write_bandwidth_png(path, "fused elementwise ops (bf16)", rows, ("op", "t"))
    if bad:
        print(f"MISMATCH against the ref (> {TOL_EPS[dtype]} eps): {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
