"""Access control through real servers on loopback: API tokens for generation (and the
admin token for everything, an API token for no admin RPC), TLS and mutual TLS on the
server and the client, the serve flags that set them. Health and reflection stay open.

The servers are front ends on the session's engine (conftest `front_end`), each with
its own ServeConfig; the certificates are made here, with `cryptography`.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from loraplex.client import LoraplexClient
from loraplex.server import cli
from loraplex.v1 import generate_pb2, generate_pb2_grpc
from live_server import code_of
from lora_dirs import write_lora
from pki import make_pki

API_TOKENS = ("client-token-a", "client-token-b")
GEN = dict(max_new_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def plain_output(hardened, kit) -> tuple[int, ...]:
    with LoraplexClient(hardened.target, timeout=30) as c:  # the session's plaintext, open server
        return c.generate(kit.PROMPT, kit.GOOD, **GEN).token_ids


# -- tokens -----------------------------------------------------------------------------------------
def test_api_tokens_guard_generation_and_not_health(hardened, front_end, kit, monkeypatch):
    server = front_end(api_tokens=API_TOKENS)
    submitted = []
    submit = hardened.engine.submit
    monkeypatch.setattr(hardened.engine, "submit", lambda r: submitted.append(r) or submit(r))
    request = generate_pb2.GenerateRequest(text=kit.PROMPT, adapter_id=kit.GOOD,
                                           params=generate_pb2.SamplingParameters(max_new_tokens=4, ignore_eos=True))  # fmt: skip
    with grpc.insecure_channel(server.target) as channel:
        gen = generate_pb2_grpc.GenerationStub(channel)

        def both(metadata):
            return (code_of(lambda: gen.Generate(request, metadata=metadata, timeout=30)),
                    code_of(lambda: list(gen.GenerateStream(request, metadata=metadata, timeout=30))))  # fmt: skip

        unauthenticated = (grpc.StatusCode.UNAUTHENTICATED,) * 2
        for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", f"Basic {API_TOKENS[0]}"),),
                         (("authorization", "Bearer"),), (("authorization", f"Bearer {API_TOKENS[0]}x"),),
                         (("x-api-key", API_TOKENS[0]),)):  # fmt: skip
            assert both(metadata) == unauthenticated, metadata
        assert submitted == []  # refused before the queue
        for token in (*API_TOKENS, kit.ADMIN_TOKEN):
            assert both((("authorization", f"Bearer {token}"),)) == (grpc.StatusCode.OK,) * 2, token
        assert len(submitted) == 6

        # health and reflection need no token
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        assert "loraplex.v1.Generation" in set(ProtoReflectionDescriptorDatabase(channel).get_services())

    expected = plain_output(hardened, kit)
    with LoraplexClient(server.target, api_token=API_TOKENS[1], timeout=30) as c:
        assert c.generate(kit.PROMPT, kit.GOOD, **GEN).token_ids == expected
    with LoraplexClient(server.target, admin_token=kit.ADMIN_TOKEN, timeout=30) as c:  # the admin token, for generation too
        assert c.generate(kit.PROMPT, kit.GOOD, **GEN).token_ids == expected


def test_an_api_token_cannot_call_the_admin_api(hardened, front_end, kit, tmp_path):
    server = front_end(api_tokens=API_TOKENS)
    src = kit.write_lora(tmp_path / "src", rank=2, targets=("q_proj",), seed=3)
    with LoraplexClient(server.target, admin_token=API_TOKENS[0], timeout=30) as c:
        calls = {
            "list": c.list_adapters,
            "get": lambda: c.get_adapter(kit.GOOD),
            "unload": lambda: c.unload_adapter(kit.GOOD),
            "load": lambda: c.load_adapter("x", kit.GOOD),
            "upload": lambda: c.upload_adapter("by-client", src),
        }
        for name, call in calls.items():
            assert code_of(call) == grpc.StatusCode.PERMISSION_DENIED, name
    with LoraplexClient(server.target, timeout=30) as c:
        assert code_of(c.list_adapters) == grpc.StatusCode.UNAUTHENTICATED
    with LoraplexClient(server.target, admin_token=kit.ADMIN_TOKEN, timeout=30) as c:
        assert kit.GOOD in [a.adapter_id for a in c.list_adapters()]
        assert c.get_adapter(kit.GOOD).adapter_type == "lora"
    assert kit.GOOD in hardened.engine.adapters and "by-client" not in hardened.engine.adapters
    assert not (hardened.adapter_root / "by-client").exists()
    hardened.wait_no_leftovers()


def test_serve_flags_and_environment(tmp_path, monkeypatch, pki, capsys):
    monkeypatch.delenv(cli.ENV_API_TOKENS, raising=False)
    monkeypatch.delenv(cli.ENV_ADMIN_TOKEN, raising=False)
    argv = ["serve", "--adapter-root", str(tmp_path), "--api-token", "a1", "--api-token", "a2",
            "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]), "--tls-client-ca", str(pki["ca"])]  # fmt: skip
    config = cli.serve_config_from_args(cli.build_parser().parse_args(argv))
    assert config.api_tokens == ("a1", "a2") and config.tls and config.tls_client_ca == pki["ca"]
    monkeypatch.setenv(cli.ENV_API_TOKENS, " e1, e2 ,,")
    plain = ["serve", "--adapter-root", str(tmp_path)]
    assert cli.serve_config_from_args(cli.build_parser().parse_args(plain)).api_tokens == ("e1", "e2")
    assert cli.serve_config_from_args(cli.build_parser().parse_args(plain + ["--api-token", "f"])).api_tokens == ("f",)
    monkeypatch.delenv(cli.ENV_API_TOKENS)

    for extra, message in ((["--tls-cert", str(pki["server_cert"])], "both"),
                           (["--tls-client-ca", str(pki["ca"])], "needs tls_cert"),
                           (["--api-token", "has space"], "printable"),
                           (["--api-token", "same", "--admin-token", "same"], "admin token")):  # fmt: skip
        assert cli.main(plain + ["--port", "0", *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra

    missing = ["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(pki["server_key"]), "--no-demo-adapters"]
    assert cli.main(plain + ["--port", "0", *missing]) == 2  # before the model loads
    assert "missing.pem" in capsys.readouterr().err

    from loraplex.server.grpc.tls import TlsError, channel_credentials, server_credentials

    with pytest.raises(TlsError, match="cannot be read"):
        server_credentials(tmp_path / "missing.pem", pki["server_key"])
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(TlsError, match="not PEM"):
        server_credentials(tmp_path / "junk.pem", pki["server_key"])
    with pytest.raises(TlsError, match="both"):
        channel_credentials(pki["ca"], cert=pki["client_cert"])

    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--api-token", "--tls-cert", "--tls-key", "--tls-client-ca", cli.ENV_API_TOKENS))
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--api-token", "--tls-ca", "--tls-cert", "--tls-key"))


# -- TLS --------------------------------------------------------------------------------------------
def test_tls(hardened, front_end, kit, pki, capsys, monkeypatch):
    server = front_end(tls_cert=pki["server_cert"], tls_key=pki["server_key"], api_tokens=API_TOKENS)
    expected = plain_output(hardened, kit)
    with LoraplexClient(server.target, api_token=API_TOKENS[0], tls_ca=pki["ca"], timeout=30) as c:
        assert c.health() == "SERVING"
        assert c.generate(kit.PROMPT, kit.GOOD, **GEN).token_ids == expected
        assert tuple(t for chunk in c.generate_stream(kit.PROMPT, kit.GOOD, **GEN) for t in chunk.token_ids) == expected
    with LoraplexClient(server.target, api_token=API_TOKENS[0], timeout=5) as plaintext:
        assert code_of(plaintext.health) == grpc.StatusCode.UNAVAILABLE
        assert code_of(lambda: plaintext.generate(kit.PROMPT, **GEN)) == grpc.StatusCode.UNAVAILABLE
    with LoraplexClient(server.target, tls_ca=pki["rogue_ca"], timeout=5) as untrusting:  # not the server's CA
        assert code_of(untrusting.health) == grpc.StatusCode.UNAVAILABLE

    monkeypatch.delenv(cli.ENV_API_TOKEN, raising=False)
    monkeypatch.delenv(cli.ENV_ADMIN_TOKEN, raising=False)
    argv = ["generate", kit.PROMPT, "--target", server.target, "--adapter", kit.GOOD, "--max-new-tokens", "4", "--json",
            "--tls-ca", str(pki["ca"]), "--api-token", API_TOKENS[1]]  # fmt: skip
    assert cli.main(argv) == 0
    got = tuple(json.loads(capsys.readouterr().out)["token_ids"])
    assert got and got == expected[: len(got)]  # without ignore_eos, EOS may end it sooner
    assert cli.main(argv[:-2]) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_mutual_tls(hardened, front_end, kit, pki, capsys, monkeypatch, tmp_path):
    server = front_end(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"])
    with LoraplexClient(server.target, admin_token=kit.ADMIN_TOKEN, tls_ca=pki["ca"], tls_cert=pki["client_cert"],
                        tls_key=pki["client_key"], timeout=30) as c:  # fmt: skip
        assert c.health() == "SERVING"
        assert c.generate(kit.PROMPT, kit.GOOD, **GEN).generated_tokens >= 1
        assert kit.GOOD in [a.adapter_id for a in c.list_adapters()]
    refused = {
        "no client certificate": dict(tls_ca=pki["ca"]),
        "a certificate of another CA": dict(tls_ca=pki["ca"], tls_cert=pki["rogue_cert"], tls_key=pki["rogue_key"]),
        "plaintext": {},
    }
    for case, tls in refused.items():
        with LoraplexClient(server.target, admin_token=kit.ADMIN_TOKEN, timeout=5, **tls) as c:
            assert code_of(c.health) == grpc.StatusCode.UNAVAILABLE, case
            assert code_of(lambda: c.generate(kit.PROMPT, **GEN)) == grpc.StatusCode.UNAVAILABLE, case
            assert code_of(c.list_adapters) == grpc.StatusCode.UNAVAILABLE, case

    monkeypatch.setenv(cli.ENV_ADMIN_TOKEN, kit.ADMIN_TOKEN)
    tls = ["--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client_cert"]), "--tls-key", str(pki["client_key"])]
    assert cli.main(["adapters", "list", "--json", "--target", server.target, *tls]) == 0
    assert kit.GOOD in [a["adapter_id"] for a in json.loads(capsys.readouterr().out)]
    assert cli.main(["adapters", "list", "--target", server.target, "--timeout", "5", *tls[:2]]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err

    # the trainer's --upload speaks the same TLS
    from loraplex.adapters.train.upload import upload_adapter

    trained = write_lora(tmp_path / "trained", rank=4, seed=5)
    info = upload_adapter(server.target, trained, tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"])
    assert info.adapter_id == "trained"
    with pytest.raises(grpc.RpcError) as refused_upload:
        upload_adapter(server.target, trained, "again", tls_ca=pki["ca"])  # no client certificate
    assert refused_upload.value.code() == grpc.StatusCode.UNAVAILABLE
