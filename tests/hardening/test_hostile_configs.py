"""Adapters whose config, not whose tensors, is hostile, through the session's real server
(tests/hardening/conftest.py): a regex with catastrophic backtracking must not stall the
streams while the server refuses it, and every malformed config or tensor name is an
INVALID_ARGUMENT that leaves no upload directory behind (issue 16). Beside
test_hostile_uploads.py, which covers hostile files."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest

from loraplex.client import LoraplexClient
from loraplex.v1 import admin_pb2, admin_pb2_grpc

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
SLOW = r"(?:.|\.|[a-z]|\w)*(?!)"  # never matches; exponential backtracking on any name of 20+ characters
TARGETS = ("q_proj", "v_proj")


def _upload(hardened, kit, adapter_id: str, files: dict[str, bytes]) -> grpc.RpcError | None:
    def messages():
        yield admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(adapter_id=adapter_id))
        for name, data in files.items():
            yield admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(filename=name, data=data))

    with grpc.insecure_channel(hardened.target) as channel:
        try:
            admin_pb2_grpc.AdapterAdminStub(channel).UploadAdapter(
                messages(), metadata=(("authorization", f"Bearer {kit.ADMIN_TOKEN}"),), timeout=60
            )
        except grpc.RpcError as e:
            return e
    return None


def _lora(kit, tensors=None, **config) -> dict[str, bytes]:
    cfg = json.loads(kit.lora_config(2, TARGETS)) | config
    return {CONFIG: json.dumps(cfg).encode(), WEIGHTS: kit.safetensors_bytes(tensors or kit.lora_tensors(2, TARGETS, seed=4))}


def test_a_catastrophic_regex_is_refused_while_a_stream_runs(hardened, kit):
    hardened.wait_idle()
    arrivals: list[float] = []
    started = threading.Event()

    def stream() -> None:
        with LoraplexClient(hardened.target, timeout=60) as c:
            for _ in c.generate_stream(kit.PROMPT, max_new_tokens=200, ignore_eos=True):
                arrivals.append(time.perf_counter())
                if len(arrivals) == 5:
                    started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert started.wait(30)
        t0 = time.perf_counter()
        error = _upload(hardened, kit, "slow-regex", _lora(kit, target_modules=SLOW))
        t1 = time.perf_counter()
    finally:
        thread.join(60)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "target_modules" in error.details() and "took longer than 100 ms" in error.details(), error.details()
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if b >= t0 and a <= t1]
    assert arrivals[-1] > t1 and during, "the stream ran through the upload"
    assert max(during) < 0.1, f"longest inter-token gap {max(during) * 1e3:.0f} ms during a {(t1 - t0) * 1e3:.0f} ms upload"
    assert "slow-regex" not in hardened.engine.adapters
    hardened.wait_no_leftovers()


def _hostile(kit) -> dict[str, dict[str, bytes]]:
    t = kit.lora_tensors(2, TARGETS, seed=4)
    renamed = {k.replace("layers.0.", "layers." + "7" * 5000 + "."): v for k, v in t.items()}
    huge = {k: v * 1e30 if "lora_B" in k else v for k, v in t.items()}
    return {
        "lora_alpha 1e308": _lora(kit, lora_alpha=1e308),
        "lora_alpha 1e30": _lora(kit, lora_alpha=1e30),
        "weights x 1e30": _lora(kit, huge),
        "layers_pattern (": _lora(kit, layers_pattern=["("], layers_to_transform=[0]),
        "rank_pattern (?i)": _lora(kit, rank_pattern={"(?i)q_proj": 2}),
        "5000-digit layer": _lora(kit, renamed),
        "huge int alpha": {CONFIG: _lora(kit)[CONFIG].replace(b'"lora_alpha": 4', b'"lora_alpha": ' + b"9" * 400), WEIGHTS: _lora(kit)[WEIGHTS]},
    }


@pytest.mark.parametrize("kind", ["lora_alpha 1e308", "lora_alpha 1e30", "weights x 1e30", "layers_pattern (",
                                  "rank_pattern (?i)", "5000-digit layer", "huge int alpha"])  # fmt: skip
def test_malformed_configs_and_names_are_invalid_argument(hardened, kit, kind):
    before = hardened.engine.stats().adapter_loads
    error = _upload(hardened, kit, "hostile-config", _hostile(kit)[kind])
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, (kind, error)
    assert "hostile-config" not in hardened.engine.adapters
    assert hardened.engine.stats().adapter_loads == before
    hardened.wait_no_leftovers()
