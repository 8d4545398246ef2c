from pathlib import Path

import pytest

import loraplex
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"


@pytest.fixture
def make_engine():
    """Builds started engines on the bundled tiny model; shuts them down after the test."""
    engines = []

    def make(**overrides) -> Engine:
        cfg = dict(model_dir=TINY, kv_cache_tokens=4096, max_batch_tokens=256, adapter_slots=8, max_rank=32)
        cfg.update(overrides)
        engine = Engine.from_config(EngineConfig(**cfg))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown(grace_s=1.0)
