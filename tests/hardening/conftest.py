"""Fixtures of the hardening tests: one real server on loopback for the session
(`hardened`: the bundled tiny model, NF4 on the CPU, an admin token, a 2 MiB upload
cap, max rank 16), a directory beside its adapter root for sentinel files, and
`front_end(...)`: more servers with other ServeConfigs (tokens, TLS) on the same engine,
so that no test loads the model twice; `watch_reads(path)`: the files the server opens
under `path`; and `kit`: the helpers below for test modules.

Tests leave the server as they found it (unload what they upload, cancel what they
start). test_cancel_storm.py and test_overload.py bring their own servers.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

import loraplex
from live_server import LentEngine, LiveServer
from lora_dirs import ALL_MODULES, lora_config, lora_tensors, module_shapes, safetensors_bytes, write_adapter, write_lora

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
ADMIN_TOKEN = "hardening-admin-token"
UPLOAD_CAP = 2 << 20
MAX_RANK = 16
MAX_RUNNING = 8
PROMPT = "Once upon a time"
GOOD = "good"  # a LoRA in the adapter root at start; tests may generate with it, never change it


@dataclass
class Hardened(LiveServer):
    adapter_root: Path
    outside: Path  # beside the adapter root: sentinels that nothing may touch

    def leftovers(self) -> list[str]:
        """Temp and trash directories of uploads in the adapter root."""
        return sorted(p.name for p in self.adapter_root.iterdir() if p.name.startswith((".upload-", ".trash-")))

    def wait_no_leftovers(self, timeout: float = 10.0) -> None:
        self.wait_for(lambda: not self.leftovers(), timeout, f"no upload leftovers (have {self.leftovers()})")


@pytest.fixture(scope="session")
def hardened(tmp_path_factory) -> Hardened:
    from loraplex.server.app import LoraplexServer, ServeConfig
    from loraplex.server.engine.config import EngineConfig

    base = tmp_path_factory.mktemp("hardening")
    root, outside = base / "adapter-root", base / "outside"
    write_lora(root / GOOD, rank=4, seed=1)
    outside.mkdir()
    engine = EngineConfig(
        model_dir=TINY, adapter_root=root, quantize="nf4", device="cpu", max_batch_tokens=512,
        max_running=MAX_RUNNING, max_queue=32, kv_cache_tokens=4096, adapter_slots=4, max_rank=MAX_RANK,
        max_new_tokens=256,
    )  # fmt: skip
    config = ServeConfig(engine=engine, port=0, metrics_port=0, admin_token=ADMIN_TOKEN, max_upload_bytes=UPLOAD_CAP)
    server = LoraplexServer(config)
    server.start()
    try:
        server.warm_up()
        yield Hardened(server, server.target, root, outside)
    finally:
        server.stop(2.0)


@pytest.fixture
def front_end(hardened):
    """front_end(**serve_config_fields) -> a started, SERVING LoraplexServer on the
    session's engine (metrics off unless asked); stopped after the test."""
    import dataclasses

    from loraplex.server.app import LoraplexServer

    started = []

    def make(**fields):
        fields.setdefault("metrics_port", None)
        config = dataclasses.replace(hardened.server.config, port=0, **fields)
        server = LoraplexServer(config, engine=LentEngine(hardened.engine))
        started.append(server)
        server.start()
        server.warm_up()
        return server

    yield make
    for server in started:
        server.stop(1.0)


@pytest.fixture
def admin(hardened):
    from loraplex.client import LoraplexClient

    with LoraplexClient(hardened.target, admin_token=ADMIN_TOKEN, timeout=60) as c:
        yield c


@pytest.fixture
def client(hardened):
    from loraplex.client import LoraplexClient

    with LoraplexClient(hardened.target, timeout=60) as c:
        yield c


def tree(path: Path) -> dict[str, tuple]:
    """Every entry under `path` (symlinks not followed): kind, size, mtime, content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
            out[str(p.relative_to(path))] = (p.is_symlink(), p.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return out


# Reads are watched with an audit hook (opens and directory listings by the server's
# Python code, which runs in this process). Installed once; idle unless a test watches.
_WATCHED: list[tuple[str, list]] = []
_HOOK = threading.local()
_AUDITING = False


def _audit(event: str, args) -> None:
    if not _WATCHED or event not in ("open", "os.listdir", "os.scandir") or getattr(_HOOK, "busy", False):
        return
    target = args[0] if args else None
    if not isinstance(target, (str, bytes, os.PathLike)):
        return
    _HOOK.busy = True
    try:
        path = os.fsdecode(target)
        flags = args[2] if event == "open" and len(args) > 2 and isinstance(args[2], int) else 0
        if flags & os.O_NOFOLLOW:  # a symlink at the end is refused (ELOOP), not followed
            real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        else:
            real = os.path.realpath(path)
        for root, hits in _WATCHED:
            if real == root or real.startswith(root + os.sep):
                hits.append((event, real))
    finally:
        _HOOK.busy = False


@pytest.fixture
def watch_reads():
    """watch_reads(path) -> a list that collects (event, real path) of every open or
    listing under `path` until the test ends."""
    global _AUDITING
    if not _AUDITING:  # audit hooks cannot be removed: one for the session
        sys.addaudithook(_audit)
        _AUDITING = True
    added = []

    def watch(path: Path) -> list:
        hits: list = []
        entry = (os.path.realpath(path), hits)
        _WATCHED.append(entry)
        added.append(entry)
        return hits

    yield watch
    for entry in added:
        _WATCHED.remove(entry)


@pytest.fixture(scope="session")
def kit():
    """The helpers and constants above, for test modules (they cannot import a conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        TINY=TINY, ADMIN_TOKEN=ADMIN_TOKEN, UPLOAD_CAP=UPLOAD_CAP, MAX_RANK=MAX_RANK, MAX_RUNNING=MAX_RUNNING,
        PROMPT=PROMPT, ALL_MODULES=ALL_MODULES, GOOD=GOOD, module_shapes=module_shapes, lora_tensors=lora_tensors,
        lora_config=lora_config, safetensors_bytes=safetensors_bytes, write_adapter=write_adapter, write_lora=write_lora,
        tree=tree,
    )  # fmt: skip
