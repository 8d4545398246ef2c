"""Every Triton kernel in kernels/ compiles for Hopper (sm_90) at the configurations its
launcher picks, with no register spills and shared memory within 227 KiB per block.

No GPU needed: `CASES` call the real launchers on fake-CUDA tensors with every launch
intercepted (kernels/compile_sm90.py), and each distinct variant is compiled once, in a
subprocess without TRITON_INTERPRET, to a cubin whose resources `cuobjdump -res-usage`
reads. `pytest -s` prints the table (kernel, case, blocks, warps, stages, regs, stack,
shared), the starting point for tuning.

Adding a kernel file: write a `<op>_cases(model)` that builds its inputs on
device="cuda" at the model's shapes and calls the launcher, and add it to `CASES`.
`test_every_kernel_has_a_compile_case` fails until every `_<name>_kernel` is launched
by some case.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

import loraplex  # noqa: E402
from loraplex.kernels import compile_sm90  # noqa: E402
from loraplex.kernels.compile_sm90 import MAX_SHARED_PER_BLOCK, Case  # noqa: E402

KERNELS_DIR = Path(compile_sm90.__file__).parent
DEV = "cuda"  # fake CUDA inside a capture: CPU storage, GPU branches in the launchers
BF16 = torch.bfloat16


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ModelShapes:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def groups(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """AdapterLinear groups (server/model/llama.py GROUPS): name -> (in, out per slice)."""
        return {
            "qkv": (self.hidden, (self.q_width, self.kv_width, self.kv_width)),
            "o": (self.q_width, (self.hidden,)),
            "gate_up": (self.hidden, (self.intermediate, self.intermediate)),
            "down": (self.intermediate, (self.hidden,)),
        }

    def linears(self) -> list[tuple[int, int]]:
        """Distinct (out, in) of the NF4 base linears (one per target module)."""
        return sorted({(n, k) for k, outs in self.groups().values() for n in outs})


def _tiny() -> ModelShapes:
    cfg = json.loads((Path(loraplex.__file__).parent / "assets/tiny-llama/config.json").read_text())
    return ModelShapes("tiny", cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                       cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"])


LLAMA3_8B = ModelShapes("llama3-8b", 4096, 14336, 32, 8, 128, 128256)
TINY = _tiny()
TOKENS = (32, 2048)  # decode, prefill
NF4_EXTRA_TOKENS = (1, 16, 64)  # the NF4 launcher's gemv, decode and mid (block_m 64) tiles
RANKS = (16, 64)
NUM_SLOTS = 8


# --------------------------------------------------------------------------- cases


def _lora_step(t: int, in_features: int, outs: tuple[int, ...], rank: int, variant: str) -> None:
    """shrink then expand, as AdapterLinear.forward calls them. variant: lora, dora, vera."""
    from loraplex.kernels.expand import expand
    from loraplex.kernels.mapping import build_mapping
    from loraplex.kernels.shrink import shrink

    n, s, mp = len(outs), NUM_SLOTS, rank // 16
    x = torch.zeros(t, in_features, dtype=BF16, device=DEV)  # [T, in]
    a_pages = [torch.zeros(s * mp, 16, in_features, dtype=BF16, device=DEV) for _ in outs]  # n × [P, 16, in]
    bt_pages = [torch.zeros(s * mp, 16, w, dtype=BF16, device=DEV) for w in outs]  # n × [P, 16, out_i]
    table = torch.zeros(n, s, mp, dtype=torch.int32, device=DEV)  # [n, S, MP]
    ranks = torch.full((n, s), rank, dtype=torch.int32, device=DEV)  # [n, S]
    scales = torch.ones(n, s, dtype=torch.float32, device=DEV)  # [n, S]
    mapping = build_mapping(torch.zeros(t, dtype=torch.int32, device=DEV), s)
    y = torch.zeros(t, sum(outs), dtype=BF16, device=DEV)  # [T, sum out]
    vecs = [torch.ones(s, w, dtype=BF16, device=DEV) for w in outs]  # n × [S, out_i]
    rank_scale = torch.ones(n, s, rank, dtype=torch.float32, device=DEV) if variant == "vera" else None
    tt = shrink(x, a_pages, table, ranks, mapping, rank_scale=rank_scale)  # [n, T, R] fp32
    expand(y, tt, bt_pages, table, ranks, scales, vecs if variant == "dora" else None, mapping,
           out_scale=vecs if variant == "vera" else None)


def adapter_cases(m: ModelShapes) -> list[Case]:
    """shrink + expand for every group, rank and token count; DoRA and VeRA at rank 64."""
    cases = []
    for t in TOKENS:
        for group, (k, outs) in m.groups().items():
            for rank in RANKS:
                for variant in ("lora",) + (("dora", "vera") if rank == max(RANKS) else ()):
                    cases.append(Case(f"{m.name} T={t} {group} r{rank} {variant}",
                                      lambda t=t, k=k, outs=outs, r=rank, v=variant: _lora_step(t, k, outs, r, v)))
    return cases


def _nf4_weight(n: int, k: int, nested: bool):
    from loraplex.kernels.nf4_matmul import QBLOCK, PackedNF4

    kb = k // QBLOCK
    qweight = torch.zeros(n, k // 2, dtype=torch.uint8, device=DEV)  # [N, K/2]
    code = torch.zeros(16, dtype=torch.float32, device=DEV)  # [16]
    if not nested:
        absmax = torch.ones(kb, n, dtype=torch.float32, device=DEV)  # [K/64, N]
        return PackedNF4(qweight, absmax, None, None, None, code, (n, k), BF16)
    absmax = torch.zeros(kb, n, dtype=torch.uint8, device=DEV)  # [K/64, N] codes
    absmax2 = torch.ones(-(-n * kb // 256), dtype=torch.float32, device=DEV)  # [ceil(N*K/64 / 256)]
    code2 = torch.zeros(256, dtype=torch.float32, device=DEV)
    offset = torch.zeros(1, dtype=torch.float32, device=DEV)
    return PackedNF4(qweight, absmax, absmax2, code2, offset, code, (n, k), BF16)


def _nf4_step(t: int, n: int, k: int, nested: bool) -> None:
    from loraplex.kernels.nf4_matmul import nf4_matmul

    nf4_matmul(torch.zeros(t, k, dtype=BF16, device=DEV), _nf4_weight(n, k, nested))  # [T, K] -> [T, N]


def _nf4_dequant(n: int, k: int, nested: bool) -> None:
    from loraplex.kernels.nf4_matmul import dequantize_packed

    dequantize_packed(_nf4_weight(n, k, nested), torch.float32)  # NF4Linear.dense_weight


def nf4_cases(m: ModelShapes) -> list[Case]:
    """nf4_matmul for every base linear and token count, with and without double
    quantization (NESTED), and dequantize_packed per linear."""
    cases = []
    for nested in (False, True):
        dq = "dq" if nested else "plain"
        for n, k in m.linears():
            for t in NF4_EXTRA_TOKENS + TOKENS:
                cases.append(Case(f"{m.name} T={t} nf4 {n}x{k} {dq}", lambda t=t, n=n, k=k, d=nested: _nf4_step(t, n, k, d)))
            cases.append(Case(f"{m.name} dequant {n}x{k} {dq}", lambda n=n, k=k, d=nested: _nf4_dequant(n, k, d)))
    return cases


def rms_norm_cases(m: ModelShapes) -> list[Case]:
    """The decoder's norms: plain and fused with the residual add."""
    from loraplex.kernels.rms_norm import rms_norm

    def step(t: int, residual: bool) -> None:
        x = torch.zeros(t, m.hidden, dtype=BF16, device=DEV)  # [T, hidden]
        res = torch.zeros(t, m.hidden, dtype=BF16, device=DEV) if residual else None
        rms_norm(x, torch.ones(m.hidden, dtype=BF16, device=DEV), 1e-5, residual=res)

    return [Case(f"{m.name} T={t} rms_norm{' +residual' if r else ''}", lambda t=t, r=r: step(t, r))
            for t in TOKENS for r in (False, True)]


def silu_mul_cases(m: ModelShapes) -> list[Case]:
    from loraplex.kernels.silu_mul import silu_mul

    return [Case(f"{m.name} T={t} silu_mul",
                 lambda t=t: silu_mul(torch.zeros(t, 2 * m.intermediate, dtype=BF16, device=DEV)))  # [T, 2I]
            for t in TOKENS]


KV_BLOCK = 16  # tokens per KV block (server/engine/config.py)
MAX_CONTEXT = 4096  # block-table width × KV_BLOCK the cases give every sequence


def rope_kv_cases(m: ModelShapes) -> list[Case]:
    from loraplex.kernels.rope_kv import rope_kv_write

    def step(t: int) -> None:
        d, rows = m.head_dim, MAX_CONTEXT
        qkv = torch.zeros(t, m.q_width + 2 * m.kv_width, dtype=BF16, device=DEV)  # [T, (H + 2 KVH) D]
        cos_sin = torch.zeros(MAX_CONTEXT, 2, d, dtype=BF16, device=DEV)  # [P, 2, D]
        cache = [torch.zeros(rows, m.kv_heads, d, dtype=BF16, device=DEV) for _ in range(2)]  # [N, KVH, D]
        idx = torch.zeros(t, dtype=torch.int64, device=DEV)  # [T] positions, slot mapping
        rope_kv_write(qkv, cos_sin, idx, cache[0], cache[1], idx.clone(), m.heads, m.kv_heads, d)

    return [Case(f"{m.name} T={t} rope_kv", lambda t=t: step(t)) for t in TOKENS]


def paged_attention_cases(m: ModelShapes) -> list[Case]:
    """Decode (T sequences of one token, flash-decoding splits where the launcher picks
    them) and prefill (one sequence of T tokens)."""
    from loraplex.kernels.paged_attention import paged_attention

    def step(t: int) -> None:
        seqs, qlen = (t, 1) if t <= 256 else (1, t)
        blocks = MAX_CONTEXT // KV_BLOCK
        q = torch.zeros(t, m.heads, m.head_dim, dtype=BF16, device=DEV)  # [T, H, D]
        cache = [torch.zeros(seqs * MAX_CONTEXT, m.kv_heads, m.head_dim, dtype=BF16, device=DEV) for _ in range(2)]
        tables = torch.zeros(seqs, blocks, dtype=torch.int32, device=DEV)  # [max_seqs, max_blocks]
        ctx = torch.zeros(seqs, dtype=torch.int32, device=DEV)  # [max_seqs]
        starts = torch.zeros(seqs + 1, dtype=torch.int32, device=DEV)  # [max_seqs + 1]
        paged_attention(q, cache[0], cache[1], tables, ctx, starts, seqs, qlen, KV_BLOCK, m.head_dim**-0.5)

    return [Case(f"{m.name} T={t} paged_attention", lambda t=t: step(t)) for t in TOKENS]


# One builder per kernel file; a new file adds its `<op>_cases` here.
CASE_BUILDERS = (adapter_cases, nf4_cases, rms_norm_cases, silu_mul_cases, rope_kv_cases, paged_attention_cases)
CASES: list[Case] = [c for m in (LLAMA3_8B, TINY) for build in CASE_BUILDERS for c in build(m)]


# --------------------------------------------------------------------------- results


def _jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def sm90() -> dict:
    """Capture and compile once for the module: {"rows": [...], "variants", "seconds"}."""
    from triton import knobs

    for tool in ("ptxas_blackwell", "cuobjdump"):  # Triton 3.9 assembles sm_90 with ptxas-blackwell
        try:
            found = os.path.exists(getattr(knobs.nvidia, tool).path)
        except Exception:  # older Triton: no such tool, or no binary shipped
            found = False
        if not found:
            pytest.skip(f"Triton's {tool} not found")
    return compile_sm90.run_in_subprocess(__file__, _jobs())


def _blocks(consts: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in consts.items() if k.startswith(("BLOCK", "GROUP", "N_SLICES", "NUM_SPLITS", "HALF_BLOCK", "HEADS")))


def resource_table(rows: list[dict]) -> str:
    head = f"{'kernel':<24} {'case':<38} {'blocks':<44} {'w':>2} {'st':>2} {'regs':>4} {'stack':>5} {'shared':>7}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        name = (r.get("kernel") or "?").rsplit(".", 1)[-1]
        if r.get("error"):
            lines.append(f"{name:<24} {r['case']:<38} ERROR {r['error'].splitlines()[0][:120]}")
            continue
        note = "SPILL" if r["stack"] else ("SHARED>227K" if r["shared"] > MAX_SHARED_PER_BLOCK else "")
        note = note or ("at 255-reg cap" if r["regs"] >= 255 else "")
        lines.append(f"{name:<24} {r['case']:<38} {_blocks(r['constants']):<44} {r['num_warps']:>2} "
                     f"{r['num_stages']:>2} {r['regs']:>4} {r['stack']:>5} {r['shared']:>7}  {note}")
    return "\n".join(lines)


def _distinct(rows: list[dict]) -> list[dict]:
    """One row per compiled variant (the first case that launched it)."""
    seen, out = set(), []
    for r in rows:
        key = r.get("key") or r["case"]
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_compiles_for_sm90_without_spills(sm90, case):
    rows = [r for r in sm90["rows"] if r["case"] == case]
    assert rows, f"{case}: no launch captured (did the launcher return early?)"
    bad = [r for r in rows if r.get("error") or r["stack"] or r["local"] or r["shared"] > MAX_SHARED_PER_BLOCK]
    assert not bad, f"{case}:\n{resource_table(bad)}"


@pytest.mark.slow
def test_resource_table(sm90, request):
    table = resource_table(_distinct(sm90["rows"]))
    summary = f"{sm90['variants']} variants of {len(CASES)} cases compiled for sm_90 in {sm90['seconds']:.0f} s"
    request.node.add_report_section("call", "sm_90 resources", f"{summary}\n{table}")
    print(f"\n{summary}\n{table}")


def _jit_kernels() -> set[str]:
    """`module._<name>_kernel` for every Triton kernel defined in kernels/*.py."""
    from triton.runtime.jit import KernelInterface

    found = set()
    for path in sorted(KERNELS_DIR.glob("*.py")):
        if path.stem in ("__init__", "compile_sm90"):
            continue
        mod = importlib.import_module(f"loraplex.kernels.{path.stem}")
        for name, obj in vars(mod).items():
            fn = getattr(obj, "fn", None)  # JITFunction, or InterpretedFunction under TRITON_INTERPRET
            if isinstance(obj, KernelInterface) and fn is not None and fn.__module__ == mod.__name__:
                if name.startswith("_") and name.endswith("_kernel"):
                    found.add(f"{mod.__name__}.{name}")
    return found


def test_every_kernel_has_a_compile_case(sm90):
    compiled = {r["kernel"] for r in sm90["rows"] if r.get("kernel")}
    missing = sorted(_jit_kernels() - compiled)
    assert not missing, f"no case in {Path(__file__).name} launches {missing}: add a `<op>_cases` to CASE_BUILDERS"
