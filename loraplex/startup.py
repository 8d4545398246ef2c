"""What a loraplex process does first: keep bitsandbytes' import quiet and correct.

bitsandbytes 0.50 (`bitsandbytes/backends/cpu/ops.py`, on CPUs with AVX512-BF16) tries
`from kernels import get_kernel` when it is imported, for an optional kernel from the
Hugging Face Hub (PyPI package `kernels`), and on failure logs a WARNING on the logger
`bitsandbytes.backends.cpu.ops`: "Failed to load CPU gemm_4bit_forward from
kernels-community: No module named 'kernels'" where that package is not installed, or,
run from the repository root, "cannot import name 'get_kernel' from 'kernels'
(.../kernels/__init__.py)": our `kernels/` folder (installed as `loraplex.kernels`)
shadows the package, and gets imported a second time, as top-level `kernels`. Either way
bitsandbytes then uses its own CPU kernel; nothing is lost but the message is noise.

`quiet_bitsandbytes()`, called by the entry points before anything imports bitsandbytes
(the `loraplex` command's `main`, bench/common.py):
- when top-level `kernels` would resolve to our own folder, marks it absent
  (sys.modules["kernels"] = None): the probe then fails as it would from any other
  directory, and our kernels are never imported twice under two names;
- adds a filter to that logger which drops exactly that record when its cause is an
  ImportError (the optional package absent or shadowed). Any other failure of an
  installed `kernels` package is still logged.
Idempotent. Library modules never call it: importing loraplex changes nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _OptionalKernelAbsent(logging.Filter):
    """Drops bitsandbytes' warning that the optional `kernels` package cannot be imported."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (
            isinstance(record.msg, str)
            and record.msg.startswith(BNB_KERNEL_MESSAGE)
            and any(isinstance(a, ImportError) for a in args)
        )


def _shadowed_by_our_kernels() -> bool:
    """Whether `import kernels` would import our kernels/ folder (run from the repo root)."""
    if "kernels" in sys.modules:
        return False
    try:
        theirs = importlib.util.find_spec("kernels")
        ours = importlib.util.find_spec("loraplex.kernels")
    except (ImportError, ValueError):
        return False
    if theirs is None or ours is None or not theirs.origin or not ours.origin:
        return False
    return os.path.realpath(theirs.origin) == os.path.realpath(ours.origin)


def quiet_bitsandbytes() -> None:
    """See the module doc. Call before bitsandbytes is imported."""
    if _shadowed_by_our_kernels():
        sys.modules["kernels"] = None  # type: ignore[assignment]  # `import kernels` -> ModuleNotFoundError
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _OptionalKernelAbsent) for f in logger.filters):
        logger.addFilter(_OptionalKernelAbsent())
