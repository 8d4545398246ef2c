"""Times the Triton paged attention (kernels/paged_attention.py) on Llama-3-8B shapes
(H=32, KVH=8, D=128, bf16, 16-token cache blocks) against the torch path the model uses
today (server/model/attention.py's `paged_attention_torch`: each context gathered from
the cache and repeated per GQA group, then SDPA; its per-step metadata built once,
outside the timing, as a step shares it across layers).

Rows: decode steps of 1-64 sequences at contexts of 512-8192 tokens (every sequence the
same length, its blocks shuffled over the cache), a whole-prompt prefill, chunked prefill
(chunks at the end of a longer context) and a mixed step (prefill chunks beside decode
rows). Every row first checks the kernel against the torch path (and, in the smoke run,
against `paged_attention_ref`).

Columns: median µs per call (CUDA events, L2 flushed before each call), the bytes that
must move (every sequence's K and V context once, q read and out written once), achieved
GB/s and its fraction of the measured device-to-device copy bandwidth, the context
splits the launcher chose and, for decode rows, the time without splits; the torch
path's µs and the speedup over it; the largest error against the torch path. Results go
to bench/results/ as JSON (--out overrides). Exits 1 if a row's kernel output disagrees.

    python bench/paged_attention.py              # full sweep, needs a GPU (~60 s)
    python bench/paged_attention.py --smoke      # tiny shapes on CPU via Triton's interpreter
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from loraplex.server.model.attention import AttentionMetadata, KVCache, paged_attention_torch

try:
    from bench import common  # python -m bench.paged_attention
except ImportError:
    import common  # python bench/paged_attention.py

SHAPES = dict(heads=32, kv_heads=8, head_dim=128, block_size=16)  # Llama-3-8B
SMOKE_SHAPES = dict(heads=8, kv_heads=2, head_dim=64, block_size=16)
DECODE_BATCHES = [1, 4, 16, 64]
DECODE_CONTEXTS = [512, 2048, 8192]
# (label, q_lens, ctx_lens)
PREFILL = [
    ("prefill", [2048], [2048]),
    ("chunked", [512] * 4, [4096] * 4),
    ("mixed", [256] * 4 + [1] * 32, [1024] * 4 + [2048] * 32),
]
SMOKE_DECODE = [(1, 40), (3, 100)]  # (batch, context)
SMOKE_PREFILL = [("prefill", [30], [30]), ("mixed", [9, 1, 1], [20, 70, 5])]
ERR_ATOL, ERR_RTOL = 2e-2, 2e-2  # bf16 output, one rounding (truncation in the interpreter) + bf16 P on the GPU


def make_step(q_lens, ctx_lens, shapes, dtype, device, gen):
    """(q [T, H, D], cache, meta for the torch path, kernel args) with each context in
    shuffled blocks."""
    bs = shapes["block_size"]
    need = [math.ceil(c / bs) for c in ctx_lens]
    perm = torch.randperm(sum(need), generator=gen).to(device)
    cache = KVCache(1, sum(need), bs, shapes["kv_heads"], shapes["head_dim"], dtype, device)
    cache.k[0].normal_()
    cache.v[0].normal_()
    tables, starts, at = [], [0], 0
    for n, q_len in zip(need, q_lens):
        tables.append(perm[at : at + n])
        at += n
        starts.append(starts[-1] + q_len)
    q = torch.randn(starts[-1], shapes["heads"], shapes["head_dim"], device=device, dtype=dtype)
    meta = AttentionMetadata(starts, list(ctx_lens), tables, torch.zeros(0, dtype=torch.long, device=device))
    meta.decode_layout(bs, device)  # built once per step, shared by all layers: not timed
    padded = torch.zeros(len(ctx_lens), max(need), dtype=torch.int32, device=device)
    for b, t in enumerate(tables):
        padded[b, : t.numel()] = t.to(torch.int32)
    args = (q, cache.k[0], cache.v[0], padded,
            torch.tensor(ctx_lens, dtype=torch.int32, device=device),
            torch.tensor(starts, dtype=torch.int32, device=device),
            len(ctx_lens), max(q_lens), bs, shapes["head_dim"] ** -0.5)  # fmt: skip
    return q, cache, meta, args


class Bench:
    def __init__(self, args, device, dtype, ops):
        self.args, self.device, self.dtype = args, device, dtype
        self.paged_attention, self.paged_attention_ref = ops
        self.timer = common.kernel_timer(device, args)
        self.copy_gbs = common.copy_bandwidth_gbs(device)
        self.rows: list[dict] = []

    def row(self, phase, label, q_lens, ctx_lens, shapes, gen, splits=None):
        q, cache, meta, kargs = make_step(q_lens, ctx_lens, shapes, self.dtype, self.device, gen)
        scale = kargs[-1]
        out = torch.empty_like(q)
        kernel = lambda s=splits: self.paged_attention(*kargs, out=out, num_splits=s)  # noqa: E731
        torch_path = lambda: paged_attention_torch(q, cache, 0, meta, scale)  # noqa: E731
        kernel()
        got = out.float()
        want = torch_path().float()
        errs = {"max_err": (got - want).abs().max().item()}
        ok = bool(((got - want).abs() <= ERR_ATOL + ERR_RTOL * want.abs()).all())
        if self.args.smoke:  # the Semantics too (a per-sequence loop: only for tiny shapes)
            ref = self.paged_attention_ref(*(t.float() if t.is_floating_point() else t for t in kargs[:3]), *kargs[3:])
            errs["ref_err"] = (got - ref).abs().max().item()
            ok &= bool(((got - ref).abs() <= ERR_ATOL + ERR_RTOL * ref.abs()).all())
        elt = q.element_size()
        kv_bytes = 2 * sum(ctx_lens) * shapes["kv_heads"] * shapes["head_dim"] * elt  # K and V once
        nbytes = kv_bytes + 2 * q.numel() * elt  # + q read, out written
        us = self.timer(kernel)
        r = dict(phase=phase, label=label, seqs=len(ctx_lens), tokens=q.shape[0], ctx=max(ctx_lens),
                 splits=self._splits(kargs, splits), us=us, kv_mb=kv_bytes / 1e6, mbytes=nbytes / 1e6,
                 gbs=nbytes / us / 1e3, frac=nbytes / us / 1e3 / self.copy_gbs, **errs, ok=ok)  # fmt: skip
        if phase == "decode" and r["splits"] > 1:
            r["nosplit_us"] = self.timer(lambda: kernel(1))
        r["torch_us"] = self.timer(torch_path)
        r["x_torch"] = r["torch_us"] / us
        self.rows.append(r)
        print(f"  {phase:<7} {label:<10} seqs={r['seqs']:<3} ctx={r['ctx']:<5} {us:9.1f} us", file=sys.stderr)
        del cache, meta, kargs, out
        return r

    def _splits(self, kargs, splits):
        if splits is not None:
            return splits
        from loraplex.kernels.paged_attention import _num_splits, _sm_count

        q, k = kargs[0], kargs[1]
        return _num_splits(kargs[6] * k.shape[1], kargs[7], kargs[3].shape[1] * kargs[8], _sm_count(q.device))


COLUMNS = [
    ("phase", "phase", ""), ("label", "case", ""), ("seqs", "seqs", "d"), ("tokens", "T", "d"), ("ctx", "ctx", "d"),
    ("splits", "splits", "d"), ("kv_mb", "KV MB", ".2f"), ("us", "us", ".1f"), ("gbs", "GB/s", ".0f"),
    ("frac", "%copy", ".0%"), ("nosplit_us", "nosplit us", ".1f"), ("torch_us", "torch us", ".1f"),
    ("x_torch", "x torch", ".2f"), ("max_err", "max err", ".1e"), ("ref_err", "ref err", ".1e"),
]  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_kernel_bench_args(p, "paged_attention", 0.3)
    return p.parse_args(argv)  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.kernel_bench_device(args.smoke)
    if device is None:
        return 2
    if args.smoke:
        shapes, decode, prefill = SMOKE_SHAPES, SMOKE_DECODE, SMOKE_PREFILL
    else:
        shapes, prefill = SHAPES, PREFILL
        decode = [(b, c) for c in DECODE_CONTEXTS for b in DECODE_BATCHES]

    from loraplex.kernels.paged_attention import paged_attention, paged_attention_ref  # after TRITON_INTERPRET

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    bench = Bench(args, device, torch.bfloat16, (paged_attention, paged_attention_ref))
    print(f"device copy bandwidth: {bench.copy_gbs:.0f} GB/s ({common.environment(device)['device']})")
    with torch.inference_mode():
        for batch, ctx in decode:
            bench.row("decode", f"b{batch}", [1] * batch, [ctx] * batch, shapes, gen)
        if args.smoke:  # the flash-decoding path, which the CPU rule never picks
            bench.row("decode", "b3-split2", [1] * 3, [100, 7, 64], shapes, gen, splits=2)
        for label, q_lens, ctx_lens in prefill:
            bench.row("prefill", label, q_lens, ctx_lens, shapes, gen)

    common.print_table(bench.rows, COLUMNS)
    bad = [r for r in bench.rows if not r["ok"]]
    print(f"{'FAIL' if bad else 'PASS'}  kernel matches the torch path{' and paged_attention_ref' if args.smoke else ''}"
          f" (rows off: {len(bad)})")  # fmt: skip
    payload = dict(bench="paged_attention", smoke=args.smoke, env=common.environment(device), dtype="bfloat16",
                   shapes=shapes, copy_gbs=bench.copy_gbs, rows=bench.rows,
                   note="L2 flushed before each timed call; bytes = every sequence's K and V context once + q + out; "
                        "torch_us: paged_attention_torch with its step metadata prebuilt; nosplit_us: the kernel "
                        "forced to one context split; max_err vs the torch path")  # fmt: skip
    path = common.write_json(args.out, "paged_attention-smoke" if args.smoke else "paged_attention", payload)
    print(f"wrote {path}")
    if not args.smoke:
        common.write_bandwidth_png(path, "paged attention (K/V bytes read)", bench.rows, ("phase", "label", "seqs", "ctx"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
