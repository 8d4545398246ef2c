"""Starting loraplex prints nothing about bitsandbytes' optional Hub kernel, from the
repository root (whose kernels/ folder shadows the PyPI package `kernels`) or elsewhere
(loraplex/startup.py). Each case is a fresh interpreter: the warning comes at import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = "gemm_4bit_forward"
# what `loraplex serve` does: main() first, then the model loader and bitsandbytes
STARTED = """
import sys
from loraplex.server.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
import loraplex.server.model.loader, bitsandbytes
k = sys.modules.get("kernels")
print("top-level kernels:", getattr(k, "__file__", k))
"""
BARE = "import bitsandbytes, bitsandbytes.functional as f; print('avx512bf16:', f.has_avx512bf16())"


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("where", ["repo root", "elsewhere"])
def test_start_is_quiet(where, tmp_path):
    cwd = ROOT if where == "repo root" else tmp_path
    bare = _run(BARE, cwd)
    assert bare.returncode == 0, bare.stderr
    if "avx512bf16: True" in bare.stdout:  # the probe only runs on such CPUs: the test is then meaningful
        assert MESSAGE in bare.stderr, bare.stderr[-2000:]
    started = _run(STARTED, cwd)
    assert started.returncode == 0, started.stderr[-2000:]
    assert MESSAGE not in started.stderr and "kernels" not in started.stderr, started.stderr[-2000:]
    assert "top-level kernels: None" in started.stdout  # our kernels/ was not imported under a second name
