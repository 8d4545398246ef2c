"""The `loraplex` CLI: client subcommands against the running server, and the parts of
`serve` that need no server (defaults, config validation, demo adapter seeding)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from loraplex.server import cli

TOKEN = "test-admin-token"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in (cli.ENV_ADMIN_TOKEN, cli.ENV_TARGET, cli.ENV_ADAPTER_ROOT):
        monkeypatch.delenv(name, raising=False)


def test_help_defaults_match_engine_config():
    from loraplex.server.engine.config import EngineConfig

    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    assert {k: defaults[k] for k in cli.ENGINE_DEFAULTS} == cli.ENGINE_DEFAULTS


def test_help(capsys):
    for argv in (["--help"], ["serve", "--help"], ["adapters", "upload", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--admin-token" in out and "--insecure-admin" in out and "SIGTERM" in out


def test_serve_config_from_args(tmp_path):
    args = cli.build_parser().parse_args(["serve", "--adapter-root", str(tmp_path), "--adapter-pool-mb", "64", "--port", "0"])
    config = cli.serve_config_from_args(args)
    assert config.engine.adapter_pool_bytes == 64 << 20 and config.engine.adapter_root == tmp_path
    assert config.admin_token is None and not config.insecure_admin and config.host == "127.0.0.1"
    assert config.engine.model_dir.name == "tiny-llama"


def test_insecure_admin_only_on_loopback(capsys):
    assert cli.main(["serve", "--insecure-admin", "--host", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err


def test_demo_adapters_are_copied_once(tmp_path):
    from loraplex.server.app import seed_bundled_adapters

    bundled, root = tmp_path / "bundled", tmp_path / "root"
    for name in ("one", "two"):
        (bundled / name).mkdir(parents=True)
        (bundled / name / "adapter_config.json").write_text("{}")
    assert seed_bundled_adapters(root, bundled) == ["one", "two"]
    (root / "one" / "adapter_config.json").unlink()
    (root / "one").rmdir()  # the operator deleted it: it stays deleted
    assert seed_bundled_adapters(root, bundled) == []
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["two"]


def test_generate_command(running, capsys):
    assert cli.main(["generate", "--target", running.target, "Once upon a time", "--adapter", "alpha",
                     "--max-new-tokens", "6", "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["generated_tokens"] == 6 or result["finish_reason"] == "stop"
    assert cli.main(["generate", "--target", running.target, "Once upon a time", "--adapter", "alpha",
                     "--max-new-tokens", "6", "--stream"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == result["text"].strip()


def test_adapters_commands(running, capsys, make_lora, monkeypatch):
    target = ["--target", running.target]
    assert cli.main(["adapters", "list", *target]) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv(cli.ENV_ADMIN_TOKEN, TOKEN)
    assert cli.main(["adapters", "list", *target]) == 0
    assert "alpha" in capsys.readouterr().out
    src = make_lora(rank=3, seed=21)
    assert cli.main(["adapters", "upload", "from-cli", str(src), "--chunk-mb", "0.01", *target]) == 0
    assert json.loads(capsys.readouterr().out)["ranks"]["q_proj"] == [3] * 4
    assert cli.main(["adapters", "get", "from-cli", *target]) == 0
    assert json.loads(capsys.readouterr().out)["adapter_type"] == "lora"
    assert cli.main(["adapters", "unload", "from-cli", "--delete", *target]) == 0
    assert cli.main(["adapters", "get", "from-cli", *target]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_train_is_mounted_lazily(capsys):
    try:
        import loraplex.adapters.train.cli  # noqa: F401
    except ImportError:
        assert cli.main(["train"]) == 2
        assert "not available" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--help"])
        assert e.value.code == 0
