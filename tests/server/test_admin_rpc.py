"""AdapterAdmin through a real server: chunked upload (past gRPC's 4 MiB message
limit) then generation with it, list/get/load/unload, ids and paths that try to leave
the adapter root, and the admin token."""

from __future__ import annotations

import time

import grpc
import pytest

from loraplex.client import LoraplexClient
from loraplex.server.engine.request import GenerationRequest, SamplingParams
from loraplex.v1 import admin_pb2, admin_pb2_grpc

FOUR_MIB = 4 << 20


def _engine_ids(engine, prompt, adapter_id, n=10):
    request = GenerationRequest(engine.tokenizer.encode(prompt), SamplingParams(max_new_tokens=n, ignore_eos=True), adapter_id=adapter_id)
    return engine.generate(request, timeout=30).token_ids


def test_list_and_get(admin):
    ids = [a.adapter_id for a in admin.list_adapters()]
    assert {"alpha", "beta", "gamma"} <= set(ids) and ids == sorted(ids)
    beta = admin.get_adapter("beta")
    assert beta.adapter_type == "lora" and set(beta.target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # fmt: skip
    assert all(ranks == [8] * 4 for ranks in beta.ranks.values()) and beta.size_bytes > 0
    with pytest.raises(grpc.RpcError) as e:
        admin.get_adapter("nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_pages_through_every_adapter(admin):
    everything = [a.adapter_id for a in admin.list_adapters()]
    assert [a.adapter_id for a in admin.list_adapters(page_size=1)] == everything  # one page per adapter
    first = admin._admin.ListAdapters(admin_pb2.ListAdaptersRequest(page_size=2), metadata=admin._admin_metadata)
    assert [a.adapter_id for a in first.adapters] == everything[:2] and first.next_page_token
    last = admin._admin.ListAdapters(admin_pb2.ListAdaptersRequest(page_token=everything[-2]), metadata=admin._admin_metadata)
    assert [a.adapter_id for a in last.adapters] == everything[-1:] and last.next_page_token == ""
    with pytest.raises(grpc.RpcError) as e:
        admin._admin.ListAdapters(admin_pb2.ListAdaptersRequest(page_size=1001), metadata=admin._admin_metadata)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_upload_large_adapter_in_chunks_then_generate(running, admin, client, make_lora):
    src = make_lora(rank=128, seed=11)
    assert (src / "adapter_model.safetensors").stat().st_size > FOUR_MIB  # one message could not carry it
    try:
        info = admin.upload_adapter("big", src)  # 1 MiB chunks
        assert info.adapter_id == "big" and info.ranks["q_proj"] == [128] * 4
        assert (running.adapter_root / "big" / "adapter_model.safetensors").read_bytes() == (
            src / "adapter_model.safetensors"
        ).read_bytes()
        got = client.generate("Once upon a time", "big", max_new_tokens=10, ignore_eos=True)
        assert got.token_ids == _engine_ids(running.engine, "Once upon a time", "big")
        assert got.token_ids != client.generate("Once upon a time", max_new_tokens=10, ignore_eos=True).token_ids

        with pytest.raises(grpc.RpcError) as e:
            admin.upload_adapter("big", src)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        other = make_lora(rank=4, seed=12)
        assert admin.upload_adapter("big", other, replace=True, chunk_size=1000).ranks["q_proj"] == [4] * 4
        assert client.generate("Once upon a time", "big", max_new_tokens=10, ignore_eos=True).token_ids == _engine_ids(
            running.engine, "Once upon a time", "big"
        )
    finally:
        admin.unload_adapter("big", delete_files=True)
    assert not (running.adapter_root / "big").exists()
    with pytest.raises(grpc.RpcError) as e:
        client.generate("hi", "big", max_new_tokens=2)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_upload_with_config_in_header(running, make_lora):
    src = make_lora(rank=2, seed=13)
    weights = (src / "adapter_model.safetensors").read_bytes()
    messages = [admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(
        adapter_id="hdr", config_json=(src / "adapter_config.json").read_text()))]  # fmt: skip
    messages += [
        admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(filename="adapter_model.safetensors", data=weights[i : i + 3000]))
        for i in range(0, len(weights), 3000)
    ]
    with grpc.insecure_channel(running.target) as channel:
        stub = admin_pb2_grpc.AdapterAdminStub(channel)
        md = (("authorization", "Bearer test-admin-token"),)
        info = stub.UploadAdapter(iter(messages), metadata=md, timeout=30)
        assert info.adapter_id == "hdr" and info.adapter_type == "lora"
        stub.UnloadAdapter(admin_pb2.UnloadAdapterRequest(adapter_id="hdr", delete_files=True), metadata=md, timeout=10)


BAD_UPLOADS = {
    "path in id": ("../evil", "adapter_model.safetensors"),
    "absolute id": ("/tmp/evil", "adapter_model.safetensors"),
    "dot id": ("..", "adapter_model.safetensors"),
    "path in file name": ("fine", "../adapter_model.safetensors"),
    "pickle file": ("fine", "adapter_model.bin"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=list(BAD_UPLOADS))
def test_upload_refuses_path_tricks(running, case):
    adapter_id, filename = BAD_UPLOADS[case]
    before = sorted(p.name for p in running.adapter_root.parent.iterdir())
    messages = [
        admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(adapter_id=adapter_id)),
        admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(filename=filename, data=b"x" * 10)),
    ]
    with grpc.insecure_channel(running.target) as channel:
        stub = admin_pb2_grpc.AdapterAdminStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.UploadAdapter(iter(messages), metadata=(("authorization", "Bearer test-admin-token"),), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert sorted(p.name for p in running.adapter_root.parent.iterdir()) == before
    assert not any(p.name.startswith(".upload-") for p in running.adapter_root.iterdir())


def test_upload_of_an_invalid_adapter_leaves_nothing(running, admin, make_lora, tmp_path):
    src = make_lora(rank=2, seed=14)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((src / "adapter_config.json").read_text().replace('"LORA"', '"IA3"'))
    (bad / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    with pytest.raises(grpc.RpcError) as e:
        admin.upload_adapter("broken", bad)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "IA3" in e.value.details()
    assert not (running.adapter_root / "broken").exists() and "broken" not in running.engine.adapters
    assert not any(p.name.startswith(".upload-") for p in running.adapter_root.iterdir())


def test_load_from_under_the_root_only(running, admin, client, make_lora, copy_into_root):
    src = make_lora(rank=4, targets=("q_proj",), seed=15)
    copy_into_root(src, "staging/loaded")
    try:
        info = admin.load_adapter("loaded", "staging/loaded")
        assert info.target_modules == ["q_proj"] and info.resident is False
        assert client.generate("hi", "loaded", max_new_tokens=3).generated_tokens == 3
        with pytest.raises(grpc.RpcError) as e:
            admin.load_adapter("loaded", "staging/loaded")
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as e:  # not stored by an upload: its files are not ours to delete
            admin.unload_adapter("loaded", delete_files=True)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        admin.unload_adapter("loaded")
    assert (running.adapter_root / "staging" / "loaded").is_dir()
    for path, code in ((str(src), grpc.StatusCode.INVALID_ARGUMENT), ("../x", grpc.StatusCode.INVALID_ARGUMENT),
                       ("staging/missing", grpc.StatusCode.NOT_FOUND)):  # fmt: skip
        with pytest.raises(grpc.RpcError) as e:
            admin.load_adapter("outside", path)
        assert e.value.code() == code, path


def test_unload_unknown_is_not_found(admin):
    with pytest.raises(grpc.RpcError) as e:
        admin.unload_adapter("nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_admin_token_is_required(running, make_lora):
    src = make_lora(rank=2, seed=16)
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.PERMISSION_DENIED)):
        with LoraplexClient(running.target, admin_token=token, timeout=10) as c:
            calls = (
                c.list_adapters,
                lambda: c.get_adapter("alpha"),
                lambda: c.unload_adapter("alpha"),
                lambda: c.load_adapter("x", "alpha"),
                lambda: c.upload_adapter("sneaky", src),
            )
            for call in calls:
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == code
    assert "alpha" in running.engine.adapters and not (running.adapter_root / "sneaky").exists()


def test_admin_disabled_without_a_configured_token():
    from loraplex.server.grpc.auth import AdminAuthInterceptor

    assert AdminAuthInterceptor({"s"}, None).check([("authorization", "Bearer x")])[0] == grpc.StatusCode.PERMISSION_DENIED
    assert AdminAuthInterceptor({"s"}, None, insecure=True).check([]) is None
    assert AdminAuthInterceptor({"s"}, "t").check([("authorization", "bearer t")]) is None
    assert AdminAuthInterceptor({"s"}, "t").check([("authorization", "Basic dDp0")])[0] == grpc.StatusCode.UNAUTHENTICATED


def test_interrupted_upload_leaves_nothing(running, admin, make_lora):
    src = make_lora(rank=8, seed=17)

    class Interrupted(Exception):
        pass

    def messages():
        yield admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(adapter_id="interrupted"))
        yield admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(
            filename="adapter_model.safetensors", data=(src / "adapter_model.safetensors").read_bytes()[:5000]))  # fmt: skip
        raise Interrupted  # the client dies mid-upload: gRPC cancels the call

    with grpc.insecure_channel(running.target) as channel:
        stub = admin_pb2_grpc.AdapterAdminStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.UploadAdapter(messages(), metadata=(("authorization", "Bearer test-admin-token"),), timeout=10)
    assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    deadline = time.monotonic() + 5  # the server notices the cancellation on its own thread
    while any(p.name.startswith(".upload-") for p in running.adapter_root.iterdir()):
        assert time.monotonic() < deadline, "temp upload directory left behind"
        time.sleep(0.01)
    assert "interrupted" not in running.engine.adapters and not (running.adapter_root / "interrupted").exists()
