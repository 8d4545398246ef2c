"""Hostile and broken adapters through a real server (tests/hardening/conftest.py):
pickles that would run code, ids and paths that try to leave the adapter root,
safetensors files built to break the reader or to blow up its memory, adapters that do
not fit the base, uploads past the size cap or abandoned half-way, and races between
uploads, replacements, unloads and generation on the same adapter.

tests/server/test_admin_rpc.py covers the simple refusals (a `.bin` file name, `../`
ids, one interrupted upload, one replace); tests/adapters/ covers the reader and the
loader one refusal at a time. These add live pickle payloads, read/write/delete
watches outside the root, memory bounds, the device pool, concurrency, and traffic.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from loraplex.client import LoraplexClient
from loraplex.v1 import admin_pb2, admin_pb2_grpc
from live_server import code_of
from lora_dirs import layout, raw_safetensors

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
GEN = dict(max_new_tokens=8, ignore_eos=True)  # greedy


# -- helpers ------------------------------------------------------------------------------------
def messages(adapter_id: str, files: dict[str, bytes], replace: bool = False, chunk: int = 256 << 10):
    yield admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(adapter_id=adapter_id, replace=replace))
    for name, data in files.items():
        for i in range(0, max(len(data), 1), chunk):
            yield admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(filename=name, data=data[i : i + chunk]))


@pytest.fixture
def stub(hardened, kit):
    """upload(id, files, replace=False), load(id, path), unload(id) -> status code;
    the raw AdapterAdmin stub as .admin, its metadata as .metadata."""
    channel = grpc.insecure_channel(hardened.target)
    admin = admin_pb2_grpc.AdapterAdminStub(channel)
    md = (("authorization", f"Bearer {kit.ADMIN_TOKEN}"),)

    class Stub:
        metadata = md

        def __init__(self):
            self.admin = admin

        def upload(self, adapter_id: str, files: dict[str, bytes], replace: bool = False) -> grpc.StatusCode:
            return code_of(lambda: admin.UploadAdapter(messages(adapter_id, files, replace), metadata=md, timeout=60))

        def load(self, adapter_id: str, path: str, replace: bool = False) -> grpc.StatusCode:
            request = admin_pb2.LoadAdapterRequest(adapter_id=adapter_id, path=path, replace=replace)
            return code_of(lambda: admin.LoadAdapter(request, metadata=md, timeout=60))

        def unload(self, adapter_id: str, delete_files: bool = False) -> grpc.StatusCode:
            request = admin_pb2.UnloadAdapterRequest(adapter_id=adapter_id, delete_files=delete_files)
            return code_of(lambda: admin.UnloadAdapter(request, metadata=md, timeout=60))

    yield Stub()
    channel.close()


def small_lora(kit, rank: int = 2, seed: int = 0, targets=("q_proj",)) -> dict[str, bytes]:
    """The two files of a valid LoRA on q_proj (a few KiB)."""
    return {CONFIG: kit.lora_config(rank, targets), WEIGHTS: kit.safetensors_bytes(kit.lora_tensors(rank, targets, seed))}


def broken_safetensors(kit) -> dict[str, bytes]:
    """Weights files that are not valid safetensors, by kind."""
    header, data = layout(kit.lora_tensors(2, ("q_proj",), seed=5))
    names = list(header)
    text = json.dumps(header, separators=(",", ":"))

    def tampered(name: str, **changes) -> bytes:
        h = json.loads(text)
        h[name].update(changes)
        return raw_safetensors(h, data)

    first = header[names[0]]
    second = header[names[1]]
    entry0 = json.dumps(first, separators=(",", ":"))
    return {
        "huge declared header": raw_safetensors(b"{}", b"", declared=2**63 - 1),
        "header past the end": raw_safetensors(text.encode(), data, declared=1 << 20),
        "truncated data": raw_safetensors(header, data[:-100]),
        "overlapping offsets": tampered(names[1], data_offsets=[second["data_offsets"][0] - 4, second["data_offsets"][1] - 4]),
        "offsets out of bounds": tampered(names[-1], data_offsets=[header[names[-1]]["data_offsets"][0], len(data) + 4096]),
        "duplicate keys": raw_safetensors(("{" + f'"{names[0]}":{entry0},' + text[1:]).encode(), data),
        "bytes not shape x dtype": tampered(names[0], shape=[first["shape"][0], first["shape"][1] - 1]),
        "not json": raw_safetensors(b"\xff\xfe{not json", data),
        "empty containers": raw_safetensors(b"[" + b"[]," * 650_000 + b"[]]", b""),  # parsed: ~40 MiB
        "deep nesting": raw_safetensors(b"[" * 200_000 + b"]" * 200_000, b""),
        "many metadata keys": raw_safetensors(
            ("{" + '"__metadata__":{' + ",".join(f'"k{i}":""' for i in range(100_000)) + "}}").encode(), b""
        ),
        # as dense as the reader lets through unparsed: one string per 10 bytes
        "metadata keys at the limit": raw_safetensors(
            ("{" + '"__metadata__":{' + ",".join(f'"k{i:014d}":""' for i in range(90_000)) + "}}").encode(), b""
        ),
    }


def unfit_adapters(kit) -> dict[str, dict[str, bytes]]:
    """Well-formed safetensors whose adapter the server must refuse, by kind."""
    shapes = kit.module_shapes()
    t = kit.lora_tensors(2, ("q_proj",), seed=6)
    a_key = next(k for k in t if k.endswith("lora_A.weight"))
    b_key = next(k for k in t if k.endswith("lora_B.weight"))
    cfg = kit.lora_config(2, ("q_proj",))

    def with_tensor(key, value) -> dict[str, bytes]:
        return {CONFIG: cfg, WEIGHTS: kit.safetensors_bytes({**t, key: value})}

    over = kit.MAX_RANK + 1
    nan_a, inf_b = t[a_key].clone(), t[b_key].clone()
    nan_a[0, 3], inf_b[5, 1] = float("nan"), float("inf")
    return {
        "A wider than the base": with_tensor(a_key, torch.randn(2, shapes["q_proj"][0] + 1)),
        "B taller than the base": with_tensor(b_key, torch.randn(shapes["q_proj"][1] * 2, 2)),
        "rank over the maximum": {CONFIG: kit.lora_config(over, ("q_proj",)),
                                  WEIGHTS: kit.safetensors_bytes(kit.lora_tensors(over, ("q_proj",), seed=7))},  # fmt: skip
        "float64": {CONFIG: cfg, WEIGHTS: kit.safetensors_bytes({k: v.double() for k, v in t.items()})},
        "int32": {CONFIG: cfg, WEIGHTS: kit.safetensors_bytes({k: (v * 100).to(torch.int32) for k, v in t.items()})},
        "NaN": with_tensor(a_key, nan_a),
        "Inf": with_tensor(b_key, inf_b),
        "float16 Inf": {CONFIG: cfg, WEIGHTS: kit.safetensors_bytes({**{k: v.half() for k, v in t.items()}, b_key: inf_b.half()})},
    }


def pool_state(engine) -> tuple:
    s = engine.stats()
    return s.adapter_loads, s.adapters_resident, s.adapters_known, s.adapter_pins, tuple(engine.adapters.device.resident)


# -- pickles --------------------------------------------------------------------------------------
class Payload:
    """Unpickling this writes `marker`: proof that a pickle was opened."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def test_pickle_adapters_are_never_unpickled(hardened, kit, stub, tmp_path):
    marker = tmp_path / "marker"
    payload = pickle.dumps(Payload(marker))
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))  # the payload is live: unpickling it does write
    assert probe.read_text() == "unpickled"

    lora = small_lora(kit)
    cfg = lora[CONFIG]
    for name in ("adapter_model.bin", "adapter_model.pt"):
        assert stub.upload("pickled", {CONFIG: cfg, name: payload}) == grpc.StatusCode.INVALID_ARGUMENT
        assert stub.upload("pickled", {**lora, name: payload}) == grpc.StatusCode.INVALID_ARGUMENT
    # a pickle under the safetensors name: its first 8 bytes read as a header length
    assert stub.upload("pickled", {CONFIG: cfg, WEIGHTS: payload}) == grpc.StatusCode.INVALID_ARGUMENT

    staged = []
    for name, keep_safetensors in (("adapter_model.bin", False), ("adapter_model.pt", True), ("adapter_model.pkl", True)):
        d = hardened.adapter_root / "staging-pickles" / name.replace(".", "-")
        kit.write_adapter(d, cfg, lora[WEIGHTS])
        if not keep_safetensors:
            (d / WEIGHTS).unlink()
        (d / name).write_bytes(payload)
        staged.append(d)
    try:
        for d in staged:
            assert stub.load("pickled", str(d.relative_to(hardened.adapter_root))) == grpc.StatusCode.INVALID_ARGUMENT, d.name
    finally:
        shutil.rmtree(hardened.adapter_root / "staging-pickles")
    assert not marker.exists()
    assert "pickled" not in hardened.engine.adapters and not (hardened.adapter_root / "pickled").exists()
    assert not list(hardened.adapter_root.rglob("*.bin")) and not list(hardened.adapter_root.rglob("*.pt"))
    hardened.wait_no_leftovers()


# -- ids and paths --------------------------------------------------------------------------------
def test_ids_and_paths_stay_inside_the_root(hardened, kit, stub, watch_reads):
    root, outside = hardened.adapter_root, hardened.outside / "paths"
    outside.mkdir()
    (outside / "sentinel.txt").write_text("nothing may touch this")
    kit.write_lora(outside / "adapter", rank=2, targets=("q_proj",), seed=8)  # valid: a read would succeed
    # inside the root: ways out through symlinks
    (root / "link-out").symlink_to(outside / "adapter")
    (root / "file-links").mkdir()
    for name in (CONFIG, WEIGHTS):
        (root / "file-links" / name).symlink_to(outside / "adapter" / name)
    kit.write_adapter(root / "half-link", (outside / "adapter" / CONFIG).read_bytes(), b"")
    (root / "half-link" / WEIGHTS).unlink()
    (root / "half-link" / WEIGHTS).symlink_to(outside / "adapter" / WEIGHTS)
    (root / "id-link").symlink_to(outside / "adapter")  # an adapter id whose directory leads out
    made = ("link-out", "file-links", "half-link", "id-link")

    siblings_before = sorted(p.name for p in root.parent.iterdir())
    outside_before = kit.tree(hardened.outside)
    root_before = sorted(p.name for p in root.iterdir())
    known_before = len(hardened.engine.adapters)
    reads = watch_reads(outside)
    lora = small_lora(kit, seed=9)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    try:
        bad_ids = ["../escape", "../outside/paths/escape", str(outside / "escape"), "a\x00b", "..", ".hidden",
                   "a/b", "x" * 129, "", "good/../../escape"]  # fmt: skip
        for adapter_id in bad_ids:
            assert stub.upload(adapter_id, lora) == invalid, adapter_id
            assert stub.upload(adapter_id, lora, replace=True) == invalid, adapter_id
            assert stub.load(adapter_id, kit.GOOD) == invalid, adapter_id
        bad_paths = [str(outside / "adapter"), "../outside/paths/adapter", f"{kit.GOOD}/../../outside/paths/adapter",
                     "link-out", "file-links", "half-link", "id-link", f"{kit.GOOD}\x00/../../outside/paths/adapter",
                     "/etc", "/", ".", "a/" * 3000]  # fmt: skip
        for path in bad_paths:
            assert stub.load("sneaky", path) == invalid, path[:60]
        for adapter_id in ("../outside/paths/adapter", "id-link", "link-out"):
            assert stub.unload(adapter_id, delete_files=True) in (invalid, grpc.StatusCode.NOT_FOUND), adapter_id

        # an upload under an id whose directory is a symlink out of the root: without
        # replace it exists already; with replace the link is replaced, not its target
        assert stub.upload("id-link", lora) == grpc.StatusCode.ALREADY_EXISTS
        assert stub.upload("id-link", lora, replace=True) == grpc.StatusCode.OK
        assert not (root / "id-link").is_symlink() and (root / "id-link" / WEIGHTS).read_bytes() == lora[WEIGHTS]
        assert stub.unload("id-link", delete_files=True) == grpc.StatusCode.OK
    finally:
        for name in made:
            p = root / name
            if p.is_symlink():
                p.unlink()
            elif p.exists():
                shutil.rmtree(p)
    assert reads == [], reads[:5]
    (outside / "sentinel.txt").read_text()  # the watch itself works: this read is seen
    assert reads and reads[0][1].endswith("sentinel.txt")
    assert kit.tree(hardened.outside) == outside_before
    assert (outside / "sentinel.txt").read_text() == "nothing may touch this"
    assert sorted(p.name for p in root.parent.iterdir()) == siblings_before
    hardened.wait_no_leftovers()
    assert sorted(p.name for p in root.iterdir()) == sorted(set(root_before) - set(made))
    assert len(hardened.engine.adapters) == known_before
    assert "sneaky" not in hardened.engine.adapters


# -- broken safetensors ---------------------------------------------------------------------------
def test_broken_safetensors_are_refused_in_bounded_memory(hardened, kit, stub):
    cfg = small_lora(kit)[CONFIG]
    for kind, weights in broken_safetensors(kit).items():
        assert len(weights) <= kit.UPLOAD_CAP, kind
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            code = stub.upload("broken", {CONFIG: cfg, WEIGHTS: weights})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert code == grpc.StatusCode.INVALID_ARGUMENT, kind
        # Python allocations of the whole process (client and server) during the upload:
        # the header parsed (13x at most: "metadata keys at the limit"), never the 20-25x
        # an unchecked parse takes ("empty containers", "many metadata keys").
        growth = peak - base
        assert growth < 8 * len(weights) + (16 << 20), f"{kind}: {growth >> 20} MiB for a {len(weights) >> 10} KiB file"
    assert "broken" not in hardened.engine.adapters and not (hardened.adapter_root / "broken").exists()
    hardened.wait_no_leftovers()


# -- adapters that do not fit ---------------------------------------------------------------------
def test_unfit_adapters_are_refused_before_the_device_pool(hardened, kit, stub):
    before = pool_state(hardened.engine)
    for kind, files in unfit_adapters(kit).items():
        assert stub.upload("unfit", files) == grpc.StatusCode.INVALID_ARGUMENT, kind
        assert pool_state(hardened.engine) == before, kind
    assert "unfit" not in hardened.engine.adapters and not (hardened.adapter_root / "unfit").exists()
    hardened.wait_no_leftovers()


def test_fifty_hostile_uploads_beside_generate_traffic(hardened, kit, stub, client):
    expected = client.generate(kit.PROMPT, kit.GOOD, **GEN).token_ids  # also makes GOOD resident
    assert expected != client.generate(kit.PROMPT, **GEN).token_ids
    cfg = small_lora(kit)[CONFIG]
    hostile = [{CONFIG: cfg, WEIGHTS: w} for w in broken_safetensors(kit).values()] + list(unfit_adapters(kit).values())
    loads_before = hardened.engine.stats().adapter_loads

    done = threading.Event()
    outputs, errors = [], []

    def traffic(i: int) -> None:
        with LoraplexClient(hardened.target, timeout=60) as own:
            n = 0
            while not done.is_set() or n < 3:
                try:
                    if n % 2:
                        ids = tuple(t for c in own.generate_stream(kit.PROMPT, kit.GOOD, **GEN) for t in c.token_ids)
                    else:
                        ids = own.generate(kit.PROMPT, kit.GOOD, **GEN).token_ids
                    outputs.append(ids)
                except grpc.RpcError as e:
                    errors.append((e.code(), e.details()))
                n += 1

    generators = [threading.Thread(target=traffic, args=(i,)) for i in range(3)]
    for t in generators:
        t.start()
    try:
        with ThreadPoolExecutor(max_workers=50) as pool:
            codes = list(pool.map(lambda i: stub.upload(f"storm-{i}", hostile[i % len(hostile)]), range(50)))
    finally:
        done.set()
        for t in generators:
            t.join(60)
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 50, codes
    assert errors == []
    assert len(outputs) >= 9 and set(outputs) == {expected}
    assert hardened.engine.stats().adapter_loads == loads_before  # nothing reached the device pool
    assert not any(a.startswith("storm-") for a in (i.adapter_id for i in hardened.engine.adapters.list()))
    hardened.wait_no_leftovers()


# -- size cap and abandoned uploads ---------------------------------------------------------------
def test_an_upload_past_the_cap_stops_mid_stream(hardened, kit, stub):
    sent = []
    chunk = b"\0" * (1 << 20)
    total = 24  # MiB, twelve times the cap

    def flood():
        yield admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(adapter_id="flood"))
        for i in range(total):
            sent.append(i)
            yield admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(filename=WEIGHTS, data=chunk))

    code = code_of(lambda: stub.admin.UploadAdapter(flood(), metadata=stub.metadata, timeout=60))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(sent) < total  # refused mid-stream: the client stopped being read
    assert "flood" not in hardened.engine.adapters and not (hardened.adapter_root / "flood").exists()
    hardened.wait_no_leftovers()


def test_a_cancelled_upload_leaves_nothing(hardened, kit, stub):
    lora = small_lora(kit, rank=8, seed=10, targets=kit.ALL_MODULES)
    release = threading.Event()

    def slow():
        yield from list(messages("abandoned", lora, chunk=4096))[:4]  # the header and a few chunks
        release.wait(30)  # then the client dawdles, and cancels

    future = stub.admin.UploadAdapter.future(slow(), metadata=stub.metadata, timeout=60)
    hardened.wait_for(lambda: hardened.leftovers() != [], 10, "the upload's staging directory")
    future.cancel()
    release.set()
    assert future.cancelled() or code_of(future.result) == grpc.StatusCode.CANCELLED
    hardened.wait_no_leftovers()
    assert "abandoned" not in hardened.engine.adapters and not (hardened.adapter_root / "abandoned").exists()


# -- races on one id ------------------------------------------------------------------------------
def test_twenty_concurrent_uploads_of_one_id(hardened, kit, stub):
    uploads = [small_lora(kit, seed=100 + i) for i in range(20)]
    barrier = threading.Barrier(20)

    def upload(i: int) -> grpc.StatusCode:
        barrier.wait(30)
        return stub.upload("contested", uploads[i])

    with ThreadPoolExecutor(max_workers=20) as pool:
        codes = list(pool.map(upload, range(20)))
    try:
        winners = [i for i, c in enumerate(codes) if c == grpc.StatusCode.OK]
        assert len(winners) == 1, codes
        assert sorted(c.name for c in codes if c != grpc.StatusCode.OK) == ["ALREADY_EXISTS"] * 19
        stored = hardened.adapter_root / "contested" / WEIGHTS
        assert stored.read_bytes() == uploads[winners[0]][WEIGHTS]
        assert os.path.realpath(hardened.engine.adapters.get("contested").path) == os.path.realpath(stored.parent)
    finally:
        stub.unload("contested", delete_files=True)
    hardened.wait_no_leftovers()


def _generate_ids(c: LoraplexClient, prompt: str, adapter: str, stream: bool, **params) -> tuple[int, ...]:
    if stream:
        return tuple(t for chunk in c.generate_stream(prompt, adapter, **params) for t in chunk.token_ids)
    return c.generate(prompt, adapter, **params).token_ids


def test_replace_is_atomic_under_traffic_and_a_failed_replace_keeps_the_old(hardened, kit, stub, client):
    versions = [small_lora(kit, rank=4, seed=200, targets=kit.ALL_MODULES),
                small_lora(kit, rank=4, seed=201, targets=kit.ALL_MODULES)]  # fmt: skip
    assert stub.upload("swap", versions[0]) == grpc.StatusCode.OK
    try:
        out = [client.generate(kit.PROMPT, "swap", **GEN).token_ids]
        assert stub.upload("swap", versions[1], replace=True) == grpc.StatusCode.OK
        out.append(client.generate(kit.PROMPT, "swap", **GEN).token_ids)
        assert out[0] != out[1]

        done = threading.Event()
        seen, errors = [], []

        def traffic(i: int) -> None:
            with LoraplexClient(hardened.target, timeout=60) as own:
                n = 0
                while not done.is_set():
                    try:
                        seen.append(_generate_ids(own, kit.PROMPT, "swap", bool((n + i) % 2), **GEN))
                    except grpc.RpcError as e:
                        errors.append((e.code(), e.details()))
                    n += 1

        threads = [threading.Thread(target=traffic, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        try:
            for k in range(6):  # ends on versions[1]
                assert stub.upload("swap", versions[k % 2], replace=True) == grpc.StatusCode.OK
                time.sleep(0.05)
        finally:
            done.set()
            for t in threads:
                t.join(60)
        assert errors == []
        assert seen and set(seen) <= {out[0], out[1]}
        assert client.generate(kit.PROMPT, "swap", **GEN).token_ids == out[1]

        # failed replaces, by upload and by load: the current version goes on serving
        stored = (hardened.adapter_root / "swap" / WEIGHTS).read_bytes()
        for files in unfit_adapters(kit).values():
            assert stub.upload("swap", files, replace=True) == grpc.StatusCode.INVALID_ARGUMENT
        broken = kit.write_adapter(hardened.adapter_root / "staging-broken", versions[0][CONFIG], b"\0" * 64)
        try:
            assert stub.load("swap", "staging-broken", replace=True) == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            shutil.rmtree(broken)
        assert (hardened.adapter_root / "swap" / WEIGHTS).read_bytes() == stored == versions[1][WEIGHTS]
        assert client.generate(kit.PROMPT, "swap", **GEN).token_ids == out[1]
    finally:
        stub.unload("swap", delete_files=True)
    hardened.wait_no_leftovers()


def test_replace_and_unload_during_running_and_queued_calls(hardened, kit, stub, client):
    """Calls running on an adapter that is replaced, then unloaded, finish on the version
    they started with; calls still queued end cleanly (served, or NOT_FOUND once the
    adapter is gone), never INTERNAL; later calls get NOT_FOUND, and the adapter's device
    slot is freed."""
    n_new = 200  # long enough to still run while the admin calls happen
    versions = [small_lora(kit, rank=4, seed=300, targets=kit.ALL_MODULES),
                small_lora(kit, rank=4, seed=301, targets=kit.ALL_MODULES)]  # fmt: skip
    params = dict(max_new_tokens=n_new, ignore_eos=True)
    hardened.wait_idle()
    assert stub.upload("inflight", versions[0]) == grpc.StatusCode.OK
    unloaded = False
    try:
        expected = client.generate(kit.PROMPT, "inflight", **params).token_ids
        results: dict[int, object] = {}

        def call(i: int) -> None:
            with LoraplexClient(hardened.target, timeout=120) as own:
                try:
                    results[i] = _generate_ids(own, kit.PROMPT, "inflight", bool(i % 2), **params)
                except grpc.RpcError as e:
                    results[i] = e.code()

        running, queued = kit.MAX_RUNNING, 2
        threads = [threading.Thread(target=call, args=(i,)) for i in range(running + queued)]
        for t in threads[:running]:
            t.start()
        hardened.wait_for(lambda: hardened.engine.stats().running == running, 20, f"{running} running calls")
        for t in threads[running:]:
            t.start()
        hardened.wait_for(lambda: hardened.engine.stats().queue_depth == queued, 20, f"{queued} queued calls")
        assert stub.upload("inflight", versions[1], replace=True) == grpc.StatusCode.OK
        assert stub.unload("inflight", delete_files=True) == grpc.StatusCode.OK
        unloaded = True
        assert code_of(lambda: client.generate(kit.PROMPT, "inflight", **GEN)) == grpc.StatusCode.NOT_FOUND
        for t in threads:
            t.join(120)
        assert len(results) == running + queued
        for i, r in results.items():
            if i < running:
                assert r == expected, (i, r)  # the version it started with, to the end
            elif isinstance(r, grpc.StatusCode):
                assert r == grpc.StatusCode.NOT_FOUND, (i, r)
            else:
                assert len(r) == n_new, i  # admitted before the unload, on either version
    finally:
        if not unloaded:
            stub.unload("inflight", delete_files=True)
    hardened.wait_idle()
    assert not any(key[0] == "inflight" for key in hardened.engine.adapters.device.resident)
    hardened.wait_no_leftovers()
