from pathlib import Path

import pytest

import loraplex
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"


@pytest.fixture
def step_mode(request):
    """EngineConfig.overlap_steps of `make_engine`'s engines. A module runs its tests in
    both modes, sync and overlapped, with
    `pytestmark = pytest.mark.parametrize("step_mode", ["off", "on"], indirect=True)`."""
    return getattr(request, "param", "auto")


@pytest.fixture
def make_engine(step_mode):
    """Builds started engines on the bundled tiny model; shuts them down after the test."""
    engines = []

    def make(**overrides) -> Engine:
        cfg = dict(model_dir=TINY, kv_cache_tokens=4096, max_batch_tokens=256, adapter_slots=8, max_rank=32, overlap_steps=step_mode)
        cfg.update(overrides)
        engine = Engine.from_config(EngineConfig(**cfg))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown(grace_s=1.0)
