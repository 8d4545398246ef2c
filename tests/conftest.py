"""Shared fixtures. Without CUDA, Triton kernels run in Triton's interpreter: the
variable must be set before any kernel module is imported, so it is set here."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# tests/support/ holds helpers shared by several test folders (peft_adapters.py). Tests run
# with --import-mode=importlib, so no test folder (tests/kernels!) shadows a real package.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "support"))
