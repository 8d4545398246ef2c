"""Fixtures of the trainer tests: the bundled tiny model and small generated data sets."""

import json
import random
from pathlib import Path

import pytest
import torch

import loraplex
from loraplex.server.model.tiny import corpus_sentence

TINY = Path(loraplex.__file__).resolve().parent / "assets" / "tiny-llama"


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """The tiny model's matmuls gain nothing from a second thread, and on a shared CPU the
    threads' barriers cost dearly (measured at load 4.5 on 2 cores: one training test
    5.5 s with 1 thread, 21 s with 2). Restored after each module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    assert (TINY / "config.json").is_file(), f"the bundled tiny model is missing ({TINY})"
    return TINY


def _pairs(n: int, seed: int) -> list[dict]:
    """Sentence start -> rest of the sentence ending in '!!!' (a task the tiny model learns in a few steps)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = corpus_sentence(rng).split(" ")
        k = rng.randint(1, len(words) - 1)
        rows.append({"prompt": " ".join(words[:k]), "completion": " " + " ".join(words[k:]).rstrip(".") + "!!!"})
    return rows


@pytest.fixture(scope="session")
def pair_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pairs(96, seed=1)))
    return path


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    rng = random.Random(2)
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps({"text": corpus_sentence(rng) + " " + corpus_sentence(rng)}) + "\n" for _ in range(24)))
    return path


@pytest.fixture(scope="module")
def runner_model(tiny_model_dir):
    """(loraplex's model runner on the tiny model, its AdapterPages with 1 slot of max rank 64)."""
    from loraplex.server.engine.adapter_pages import AdapterPages
    from loraplex.server.model.loader import LoadSpec, load_model

    model = load_model(tiny_model_dir, LoadSpec())
    return model, AdapterPages(model, 1, 64)
