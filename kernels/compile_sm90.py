"""Compiles the Triton launches our launchers make for Hopper (sm_90) on a machine
without a GPU, and reads each cubin's registers, stack frame and shared memory.

    launches = capture(lambda: shrink(x, pages, table, ranks, mapping))  # nothing runs
    res = compile_launch(launches[0])                                   # Resources

`capture` runs a launcher inside `on_fake_cuda()`: tensors made with device="cuda" are
CPU tensors that report `device.type == "cuda"`, so the launcher takes its GPU branches
(native bf16 dots, inline PTX, split-K sized for 132 SMs), and every `JITFunction.run`
is intercepted: it records the launch, specialized by Triton's own binder exactly as a
GPU launch would be (16-byte-aligned pointers and ints divisible by 16 get
`tt.divisibility`, ints equal to 1 become constants), and executes nothing. Base
allocations are 64-byte aligned on the CPU and 256-byte on a GPU, so views keep the
alignment they would have there. `compile_launch` builds that variant with
`triton.compile(ASTSource, GPUTarget("cuda", 90, 32))` (ptxas needs no driver) and
reads REG / STACK / LOCAL from the wheel's `cuobjdump -res-usage`; shared memory is
Triton's dynamic allocation, `metadata.shared` (cuobjdump's SHARED is the static part).
`compiled.n_regs` / `n_spills` exist only once a driver loads the binary.

Kernels must be `JITFunction`s: run this in a process without TRITON_INTERPRET (the
interpreter's functions cannot be compiled). `python -m loraplex.kernels.compile_sm90
CASES_FILE OUT_JSON` does that for the `CASES` of a file (tests/kernels/test_compile_sm90.py).
Autotuned kernels are not supported (their choice needs a GPU to time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

SM90 = ("cuda", 90, 32)  # GPUTarget fields: H100 / H200
H100_SMS = 132  # SMs of an H100 SXM and an H200: what split-K heuristics see
MAX_SHARED_PER_BLOCK = 232448  # 227 KiB, the opt-in limit per block on sm_90


@dataclass(frozen=True)
class Case:
    """One shape case: `run` calls real launchers on tensors made with device="cuda"."""

    name: str  # e.g. "llama3-8b T=32 qkv r16"
    run: Callable[[], Any]


@dataclass
class Launch:
    """One intercepted launch, specialized as Triton would specialize it on a GPU."""

    kernel: Any  # the JITFunction
    signature: dict  # arg name -> "*bf16", "i32", "constexpr", ...
    constexprs: dict  # (arg index,) -> value
    attrs: dict  # (arg index,) -> [["tt.divisibility", 16]]
    options: dict  # CUDAOptions fields (num_warps, num_stages, enable_fp_fusion, ...)
    grid: tuple

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def qualname(self) -> str:
        return f"{self.kernel.module}.{self.kernel.__name__}"

    def constants(self) -> dict[str, Any]:
        """Constexpr arguments by name (values as repr-able Python objects)."""
        names = self.kernel.arg_names
        return {names[k[0]]: _plain(v) for k, v in self.constexprs.items() if len(k) == 1}

    def key(self) -> str:
        """Identifies the compiled variant (two launches with one key build one cubin)."""
        attrs = sorted((k, repr(v)) for k, v in self.attrs.items())
        consts = sorted((k, repr(_plain(v))) for k, v in self.constexprs.items())
        opts = sorted((k, repr(v)) for k, v in self.options.items())
        return repr((self.qualname, sorted(self.signature.items()), consts, attrs, opts))


@dataclass
class Resources:
    regs: int  # registers per thread (255 is the cap)
    stack: int  # bytes of stack frame per thread: > 0 means spills (or local arrays)
    local: int  # bytes of local memory per thread
    shared: int  # bytes of dynamic shared memory per block
    seconds: float  # compile time


def _plain(v: Any) -> Any:
    v = getattr(v, "value", v) if type(v).__name__ == "constexpr" else v
    return str(v) if type(v).__name__ == "dtype" else v


# --------------------------------------------------------------------------- fake CUDA

_CUDA = torch.device("cuda", 0)


class _OnCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device; torch ops on it return _OnCuda too."""

    @property
    def device(self) -> torch.device:
        return _CUDA

    @property
    def is_cuda(self) -> bool:
        return True


def _is_cuda(d: Any) -> bool:
    return (isinstance(d, torch.device) and d.type == "cuda") or (isinstance(d, str) and d.startswith("cuda"))


class _FakeCudaMode(TorchFunctionMode):
    """device="cuda" in any torch call becomes the CPU; the result is marked _OnCuda."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        to_cuda = _is_cuda(kwargs.get("device"))
        if to_cuda:
            kwargs["device"] = "cpu"
        if getattr(func, "__name__", "") == "to" and args[1:] and _is_cuda(args[1]):
            args, to_cuda = (args[0], "cpu", *args[2:]), True
        out = func(*args, **kwargs)
        if to_cuda and isinstance(out, torch.Tensor) and not isinstance(out, _OnCuda):
            out = out.as_subclass(_OnCuda)
        return out


@contextlib.contextmanager
def on_fake_cuda(num_sms: int = H100_SMS) -> Iterator[None]:
    """Tensors made on "cuda" live on the CPU and report CUDA; torch.cuda answers as an
    H100 (sm_90, `num_sms` SMs) would. Only for capturing launches: nothing may run."""
    props = types.SimpleNamespace(name="H100 (compile-only)", major=9, minor=0, multi_processor_count=num_sms,
                                  total_memory=80 << 30, max_shared_memory_per_block_optin=MAX_SHARED_PER_BLOCK)
    patches = {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "get_device_properties": lambda *a, **k: props,
        "get_device_capability": lambda *a, **k: (9, 0),
        "device": lambda *a, **k: contextlib.nullcontext(),
    }
    saved = {k: getattr(torch.cuda, k) for k in patches}
    try:
        for k, v in patches.items():
            setattr(torch.cuda, k, v)
        with _FakeCudaMode():
            yield
    finally:
        for k, v in saved.items():
            setattr(torch.cuda, k, v)


# --------------------------------------------------------------------------- capture


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget(*SM90)


def _unwrap(a: Any) -> Any:
    if isinstance(a, _OnCuda):
        return a.as_subclass(torch.Tensor)
    if isinstance(a, (tuple, list)):
        return type(a)(_unwrap(x) for x in a)
    return a


def capture(fn: Callable[[], Any]) -> list[Launch]:
    """Runs `fn` (which calls launchers) on fake CUDA; returns its launches, none executed."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = _target()
    backend = make_backend(target)
    launches: list[Launch] = []

    def run(self, *args, grid, warmup, **kwargs):
        # what JITFunction.run does before it compiles, with the sm_90 backend
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        args, kwargs = _unwrap(args), {k: _unwrap(v) for k, v in kwargs.items()}
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        if callable(grid):
            grid = grid(bound)
        launches.append(Launch(self, signature, constexprs, attrs, dict(options.__dict__), tuple(grid)))
        return None

    if knobs.runtime.interpret:
        raise RuntimeError("capture needs compiled kernels: unset TRITON_INTERPRET before importing them")
    saved = JITFunction.run
    JITFunction.run = run
    try:
        with on_fake_cuda():
            fn()
    finally:
        JITFunction.run = saved
    return launches


# --------------------------------------------------------------------------- compile


_RES = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def cuobjdump_res_usage(cubin: bytes) -> dict[str, int]:
    """{"REG", "STACK", "SHARED", "LOCAL"} of the one function in `cubin`."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    found = {k: int(v) for k, v in _RES.findall(out)}
    if "REG" not in found:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG:\n{out}")
    return found


def compile_launch(launch: Launch) -> Resources:
    """Builds the launch's cubin for sm_90 and reads its resources."""
    import triton
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    src = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    compiled = triton.compile(src, target=_target(), options=launch.options)
    res = cuobjdump_res_usage(compiled.asm["cubin"])
    return Resources(res["REG"], res.get("STACK", 0), res.get("LOCAL", 0), int(compiled.metadata.shared),
                     time.perf_counter() - t0)


_POOL_LAUNCHES: list[Launch] = []  # what forked compile workers inherit (set just before the fork)


def _compile_one(i: int) -> dict:
    try:
        return dataclasses.asdict(compile_launch(_POOL_LAUNCHES[i])) | {"error": None}
    except Exception as e:  # a compile error is a result to report, not a crash
        return {"error": f"{type(e).__name__}: {e}"[:4000]}


# --------------------------------------------------------------------------- the runner


def run_cases(cases: list[Case], jobs: int = 1) -> dict:
    """Captures every case, compiles each distinct variant once; JSON-able results:
    {"rows": [one per (case, launch)], "variants": n, "seconds": wall time}."""
    t0 = time.perf_counter()
    rows, variants = [], {}  # key -> Launch
    for case in cases:
        try:
            launches = capture(case.run)
        except Exception as e:
            rows.append({"case": case.name, "kernel": None, "error": f"capture: {type(e).__name__}: {e}"})
            continue
        for ln in launches:
            variants.setdefault(ln.key(), ln)
            rows.append({"case": case.name, "kernel": ln.qualname, "key": ln.key(),
                         "constants": {k: repr(v) if not isinstance(v, (int, str, bool, float)) else v
                                       for k, v in ln.constants().items()},
                         "num_warps": ln.options.get("num_warps"), "num_stages": ln.options.get("num_stages"),
                         "grid": list(ln.grid)})
    keys = list(variants)
    _POOL_LAUNCHES[:] = [variants[k] for k in keys]
    if jobs > 1 and len(keys) > 1:
        import multiprocessing

        # fork: the children inherit the captured JITFunctions; nothing has compiled yet
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile_one, range(len(keys)), chunksize=1)
    else:
        results = [_compile_one(i) for i in range(len(keys))]
    by_key = dict(zip(keys, results))
    for row in rows:
        if row.get("key") is not None:
            row.update(by_key[row["key"]])
    return {"rows": rows, "variants": len(keys), "seconds": time.perf_counter() - t0}


def load_cases(path: str) -> list[Case]:
    """The `CASES` list of a Python file, imported under a private name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_compile_sm90_cases", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return list(mod.CASES)


def run_in_subprocess(cases_file: str, jobs: int, timeout: float = 1800) -> dict:
    """Runs `run_cases` for a file's CASES in a fresh interpreter without TRITON_INTERPRET
    (the calling process may be running kernels in the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "results.json")
        cmd = [sys.executable, "-m", "loraplex.kernels.compile_sm90", cases_file, out, "--jobs", str(jobs)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="compile a file's CASES for sm_90 and write resources as JSON")
    p.add_argument("cases_file")
    p.add_argument("out_json")
    p.add_argument("--jobs", type=int, default=1)
    a = p.parse_args(argv)
    result = run_cases(load_cases(a.cases_file), a.jobs)
    with open(a.out_json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
