"""The checked-in stubs in loraplex/v1/ are what `make protos` makes from proto/."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

import loraplex

REPO = Path(loraplex.__file__).resolve().parent.parent
PROTOS = sorted((REPO / "proto" / "loraplex" / "v1").glob("*.proto"))


def test_stubs_match_the_protos(tmp_path):
    from grpc_tools import protoc

    assert PROTOS, "no .proto files found"
    include = str(resources.files("grpc_tools") / "_proto")
    # as `make protos`: -Iproto, so the files are named loraplex/v1/*.proto
    args = ["protoc", f"-I{REPO / 'proto'}", f"-I{include}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}"]
    assert protoc.main(args + [str(p) for p in PROTOS]) == 0
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "loraplex" / "v1").iterdir())
    assert len(generated) == 3 * len(PROTOS)
    stale = [str(g) for g in generated if (tmp_path / g).read_bytes() != (REPO / g).read_bytes()]
    assert not stale, f"stubs out of date, run `make protos`: {stale}"


@pytest.mark.parametrize("name", ["generate", "admin"])
def test_stubs_import(name):
    import importlib

    module = importlib.import_module(f"loraplex.v1.{name}_pb2_grpc")
    assert module.__name__.endswith("_pb2_grpc")
