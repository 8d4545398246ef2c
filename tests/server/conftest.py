"""A real loraplex server on loopback for the server tests: the bundled tiny model (NF4,
CPU), small queue sizes, a temporary adapter root holding three hand-written LoRA
adapters. One server for the whole session (loading the model takes seconds); tests
must leave it as they found it (cancel what they start, unload what they upload).

Test modules cannot import this file; they get helpers through fixtures (`write_lora`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import loraplex
from lora_dirs import ALL_MODULES, write_lora

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
ADMIN_TOKEN = "test-admin-token"
# Adapters in the adapter root at start: id -> (rank, target modules, seed).
START_ADAPTERS = {
    "alpha": (4, ("q_proj", "v_proj"), 1),
    "beta": (8, ALL_MODULES, 2),
    "gamma": (2, ("o_proj", "down_proj", "up_proj"), 3),
}


@dataclass
class RunningServer:
    server: object  # LoraplexServer
    target: str
    metrics_url: str
    adapter_root: Path
    health_before_warmup: str  # what grpc.health.v1 said between start() and warm_up()

    @property
    def engine(self):
        return self.server.engine

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Waits until no request runs or waits and every KV block is free."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.engine.stats()
            if s.running == 0 and s.queue_depth == 0 and s.kv_blocks_used == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"engine not idle after {timeout}s: {s}")
            time.sleep(0.01)


@pytest.fixture(scope="session")
def running(tmp_path_factory) -> RunningServer:
    from loraplex.client import LoraplexClient
    from loraplex.server.app import LoraplexServer, ServeConfig
    from loraplex.server.engine.config import EngineConfig

    root = tmp_path_factory.mktemp("adapter-root")
    for adapter_id, (rank, targets, seed) in START_ADAPTERS.items():
        write_lora(root / adapter_id, rank, targets, seed)
    engine_config = EngineConfig(
        model_dir=TINY, adapter_root=root, quantize="nf4", device="cpu", max_batch_tokens=512,
        max_running=4, max_queue=8, kv_cache_tokens=4096, adapter_slots=4, max_rank=128, max_new_tokens=900,
    )  # fmt: skip
    config = ServeConfig(engine=engine_config, host="127.0.0.1", port=0, metrics_port=0, admin_token=ADMIN_TOKEN)
    server = LoraplexServer(config)
    server.start()
    try:
        with LoraplexClient(server.target, timeout=10) as client:
            before = client.health()
        server.warm_up()
        yield RunningServer(server, server.target, f"http://127.0.0.1:{server.metrics_port}/metrics", root, before)
    finally:
        server.stop(2.0)


@pytest.fixture
def client(running):
    from loraplex.client import LoraplexClient

    with LoraplexClient(running.target, timeout=30) as c:
        yield c


@pytest.fixture
def admin(running):
    from loraplex.client import LoraplexClient

    with LoraplexClient(running.target, admin_token=ADMIN_TOKEN, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def make_lora(tmp_path_factory) -> Callable[..., Path]:
    """make_lora(rank, targets=ALL_MODULES, seed=0) -> a fresh adapter directory."""
    base = tmp_path_factory.mktemp("made-adapters")
    counter = iter(range(1_000_000))

    def make(rank: int, targets=ALL_MODULES, seed: int = 0) -> Path:
        return write_lora(base / f"a{next(counter)}", rank, targets, seed)

    return make


@pytest.fixture
def copy_into_root(running):
    """Copies an adapter directory to a path under the server's adapter root; cleans up."""
    made = []

    def copy(src: Path, relative: str) -> Path:
        dst = running.adapter_root / relative
        shutil.copytree(src, dst)
        made.append(running.adapter_root / Path(relative).parts[0])
        return dst

    yield copy
    for d in made:
        shutil.rmtree(d, ignore_errors=True)
