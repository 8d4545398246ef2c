"""AdapterStore: ids, path containment, atomic uploads, replace, delete."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from loraplex.adapters import store as store_mod
from loraplex.adapters.errors import AdapterError, AdapterExists, AdapterNotFound, AdapterTooLarge
from loraplex.adapters.loader import load_adapter_dir
from loraplex.adapters.store import AdapterStore, validate_id

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture
def store(tmp_path):
    return AdapterStore(tmp_path / "root", max_upload_bytes=1000)


def upload(store, adapter_id, config=b"{}", weights=b"w", **commit_kw):
    up = store.begin_upload(adapter_id)
    up.write(CONFIG, config)
    up.write(WEIGHTS, weights)
    return up.commit(**commit_kw)


def entries(store):
    return sorted(os.listdir(store.root))


@pytest.mark.parametrize("adapter_id", ["a", "A1", "my-adapter_v1.2", "x" * 128, "0.1"])
def test_valid_ids(adapter_id):
    assert validate_id(adapter_id) == adapter_id


@pytest.mark.parametrize(
    "adapter_id",
    ["", ".hidden", "-x", "_x", "a/b", "a\\b", "..", "a..b", "x" * 129, "a b", "é", "a\x00", "a\n", None, 5, b"ab"],
)
def test_invalid_ids(store, adapter_id):
    with pytest.raises(AdapterError, match="adapter id .* is invalid"):
        validate_id(adapter_id)
    with pytest.raises(AdapterError):
        store.path(adapter_id)
    with pytest.raises(AdapterError):
        store.begin_upload(adapter_id)


def test_path_and_root(store, tmp_path):
    assert store.root == tmp_path / "root" and store.root.is_dir()
    assert store.path("abc") == store.root / "abc"


def test_resolve_load_path(store, tmp_path):
    (store.root / "a" / "v1").mkdir(parents=True)
    assert store.resolve_load_path("a/v1") == store.root / "a" / "v1"
    assert store.resolve_load_path(store.root / "a") == store.root / "a"
    (store.root / "inside-link").symlink_to(store.root / "a" / "v1")
    assert store.resolve_load_path("inside-link") == store.root / "a" / "v1"

    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "escape").symlink_to(outside)
    for bad, match in [
        ("escape", "not inside the adapter root"),
        (str(outside), "not inside the adapter root"),
        ("/etc", "not inside the adapter root"),
        (".", "not inside the adapter root"),
        ("a/../a", r"contains '\.\.'"),
        ("../root/a", r"contains '\.\.'"),
        ("", "empty"),
        ("a\x00b", "NUL"),
        (b"a", "text"),
    ]:
        with pytest.raises(AdapterError, match=match):
            store.resolve_load_path(bad)
    with pytest.raises(AdapterNotFound):
        store.resolve_load_path("missing")


def test_upload_is_invisible_until_commit(store):
    up = store.begin_upload("ad1")
    assert up.tmp_dir.parent == store.root
    up.write(CONFIG, b'{"a":')
    up.write(CONFIG, b" 1}")
    up.write(WEIGHTS, b"xyz")
    assert not store.exists("ad1") and store.ids() == []
    seen = []
    path = up.commit(lambda d: seen.append(sorted(os.listdir(d))))
    assert seen == [[CONFIG, WEIGHTS]]
    assert path == store.path("ad1") and store.exists("ad1") and store.ids() == ["ad1"]
    assert (path / CONFIG).read_bytes() == b'{"a": 1}' and (path / WEIGHTS).read_bytes() == b"xyz"
    assert entries(store) == ["ad1"]
    with pytest.raises(AdapterError, match="already committed"):
        up.write(CONFIG, b"")


@pytest.mark.parametrize("name", ["adapter_model.bin", "README.md", "../x", "/etc/passwd", "sub/adapter_config.json"])
def test_only_the_two_file_names(store, name):
    with store.begin_upload("ad1") as up:
        with pytest.raises(AdapterError, match="is not allowed"):
            up.write(name, b"x")
    assert entries(store) == []


def test_byte_cap(store):
    with store.begin_upload("ad1") as up:
        up.write(CONFIG, b"x" * 600)
        with pytest.raises(AdapterTooLarge, match="over the cap of 1000 bytes"):
            up.write(WEIGHTS, b"x" * 401)
    assert entries(store) == []
    with store.begin_upload("ad2", max_bytes=10) as up:
        with pytest.raises(AdapterTooLarge):
            up.write(CONFIG, b"x" * 11)


def test_abort_leaves_nothing(store):
    up = store.begin_upload("ad1")
    up.write(CONFIG, b"{}")
    up.abort()
    up.abort()
    assert entries(store) == []
    with pytest.raises(AdapterError, match="already committed or aborted"):
        up.commit()


def test_failed_validation_aborts(store):
    def refuse(d):
        raise AdapterError("bad adapter")

    up = store.begin_upload("ad1")
    up.write(CONFIG, b"{}")
    up.write(WEIGHTS, b"w")
    with pytest.raises(AdapterError, match="bad adapter"):
        up.commit(refuse)
    assert entries(store) == []


def test_missing_file_at_commit(store):
    up = store.begin_upload("ad1")
    up.write(CONFIG, b"{}")
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        up.commit()
    assert entries(store) == []


def test_exists_and_replace(store):
    upload(store, "ad1", weights=b"old")
    with pytest.raises(AdapterExists, match="'ad1' already exists"):
        upload(store, "ad1", weights=b"new")
    assert (store.path("ad1") / WEIGHTS).read_bytes() == b"old"
    assert entries(store) == ["ad1"]
    upload(store, "ad1", weights=b"new", replace=True)
    assert (store.path("ad1") / WEIGHTS).read_bytes() == b"new"
    assert entries(store) == ["ad1"]


def test_replace_without_rename_exchange(store, monkeypatch):
    monkeypatch.setattr(store_mod, "_rename_exchange", lambda a, b: False)
    upload(store, "ad1", weights=b"old")
    upload(store, "ad1", weights=b"new", replace=True)
    assert (store.path("ad1") / WEIGHTS).read_bytes() == b"new"
    assert entries(store) == ["ad1"]


def test_concurrent_commits_of_one_id(store):
    results = []

    def worker(i):
        try:
            upload(store, "same", weights=str(i).encode())
            results.append("ok")
        except AdapterExists:
            results.append("exists")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["exists"] * 7 + ["ok"]
    assert entries(store) == ["same"]


def test_delete(store):
    upload(store, "ad1")
    upload(store, "ad2")
    store.delete("ad1")
    assert store.ids() == ["ad2"] and entries(store) == ["ad2"]
    with pytest.raises(AdapterNotFound, match="'ad1' does not exist"):
        store.delete("ad1")
    with pytest.raises(AdapterError, match="invalid"):
        store.delete("../ad2")


def test_ids_skip_files_links_and_temp_dirs(store, tmp_path):
    upload(store, "b")
    upload(store, "a")
    (store.root / "stray-file").write_text("x")
    (store.root / "link").symlink_to(store.root / "a")
    store.begin_upload("c")  # left open: a temp dir
    (store.root / ".trash-x").mkdir()
    assert store.ids() == ["a", "b"]
    assert not store.exists("link") and not store.exists("stray-file")
    assert len(store.remove_leftovers()) == 2
    assert entries(store) == ["a", "b", "link", "stray-file"]


def test_upload_a_peft_adapter_end_to_end(store, lora_dir, dense_view):
    store.max_upload_bytes = 1 << 20
    up = store.begin_upload("peft-lora")
    for name in (CONFIG, WEIGHTS):
        data = (lora_dir / name).read_bytes()
        for i in range(0, len(data), 333):
            up.write(name, data[i : i + 333])

    def validate(d):
        load_adapter_dir(d, dense_view, max_rank=16, dtype=torch.float32)

    path = up.commit(validate)
    w = load_adapter_dir(store.resolve_load_path("peft-lora"), dense_view, max_rank=16, dtype=torch.float32)
    assert path == store.path("peft-lora") and len(w.modules) == 4
