"""The strict safetensors reader: agrees with safetensors on valid files, refuses the rest."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.adapters.errors import AdapterError, AdapterTooLarge
from loraplex.adapters.safetensors_io import read_safetensors


def raw_file(path, header: dict | bytes, data: bytes = b"", *, length: int | None = None):
    """A safetensors file built byte by byte."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


def entry(dtype="F32", shape=(2,), begin=0, end=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def refused(path, match, **kw):
    with pytest.raises(AdapterError, match=match):
        read_safetensors(path, **kw)


def test_round_trip_matches_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g),
        "b.half": torch.randn(7, generator=g).half(),
        "c.bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "empty": torch.zeros(0, 64),
        "scalar": torch.tensor(1.5),
    }
    p = tmp_path / "x.safetensors"
    save_file(tensors, str(p), metadata={"format": "pt"})
    got = read_safetensors(p)
    ref = load_file(str(p))
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape
        assert torch.equal(got[k], ref[k])


@pytest.mark.parametrize(
    "dtype",
    [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.float64, torch.float8_e4m3fn],
)
def test_non_float_dtypes_refused_with_name(tmp_path, dtype):
    p = tmp_path / "x.safetensors"
    save_file({"ok": torch.ones(2), "bad.tensor": torch.zeros(4).to(dtype)}, str(p))
    refused(p, r"'bad\.tensor' has dtype '\w+'; only F32, F16 and BF16")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_inf_refused_with_name(tmp_path, value, dtype):
    t = torch.ones(3, 4, dtype=dtype)
    t[1, 2] = value
    p = tmp_path / "x.safetensors"
    save_file({"fine": torch.ones(2), "layer.lora_A.weight": t}, str(p))
    refused(p, r"'layer\.lora_A\.weight' contains NaN or Inf")


def test_header_caps(tmp_path):
    p = raw_file(tmp_path / "big", b"{}" + b" " * 100)
    refused(p, "header of 102 bytes is over the cap of 64", max_header_bytes=64)
    p = raw_file(tmp_path / "long", b"{}", length=10**6)
    refused(p, "runs past the end")
    p = raw_file(tmp_path / "huge", b"{}", length=2**63)
    refused(p, "over the cap")
    (tmp_path / "short").write_bytes(b"\x01\x02")
    refused(tmp_path / "short", "too short")


def test_file_size_cap(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(100)}, str(p))
    with pytest.raises(AdapterTooLarge, match="over the cap of 100"):
        read_safetensors(p, max_bytes=100)
    assert read_safetensors(p, max_bytes=os.path.getsize(p))["a"].shape == (100,)


@pytest.mark.parametrize(
    "header, match",
    [
        (b"\xff\xfe{}", "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": {"dtype": "F32", "shape": [0], '
         b'"data_offsets": [0, 0]}}', "key 'a' twice"),
        (b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}', "NaN"),
        (b'{"__metadata__": {"x": 1}}', "__metadata__"),
    ],
)  # fmt: skip
def test_bad_json_refused(tmp_path, header, match):
    refused(raw_file(tmp_path / "x", header), match)


@pytest.mark.parametrize(
    "entries, data_len, match",
    [
        ({"a": entry(end=12)}, 8, r"outside the data section"),
        ({"a": entry(begin=4, end=2)}, 8, r"outside the data section"),
        ({"a": entry(begin=-8, end=0)}, 8, r"outside the data section"),
        ({"a": entry(shape=(3,))}, 8, r"hold 8 bytes, but shape \(3,\) of F32 needs 12"),
        ({"a": entry(), "b": entry(begin=4, end=12)}, 12, r"'a' and 'b' overlap"),
        ({"a": entry(), "b": entry()}, 8, r"'a' and 'b' overlap"),
        ({"a": entry(begin=4, end=12)}, 12, r"bytes \[0, 4\) of the data section belong to no tensor"),
        ({"a": entry()}, 12, r"bytes \[8, 12\) of the data section belong to no tensor"),
        ({"a": entry(shape=(-2,))}, 8, "invalid shape"),
        ({"a": entry(shape=(2.0,))}, 8, "invalid shape"),
        ({"a": entry(shape=(True, 2))}, 8, "invalid shape"),
        ({"a": entry(shape=(0, 2**40), end=0)}, 0, "invalid shape"),
        ({"a": {**entry(), "data_offsets": [0]}}, 8, "invalid data_offsets"),
        ({"a": {**entry(), "extra": 1}}, 8, "exactly dtype, shape, data_offsets"),
        ({"a": {"dtype": "F32", "shape": [2]}}, 8, "exactly dtype, shape, data_offsets"),
        ({"a": [1, 2]}, 8, "exactly dtype, shape, data_offsets"),
        ({"": entry()}, 8, "empty name"),
    ],
)
def test_bad_entries_refused(tmp_path, entries, data_len, match):
    refused(raw_file(tmp_path / "x", entries, b"\x00" * data_len), match)


def test_zero_length_tensors_may_share_an_offset(tmp_path):
    p = raw_file(tmp_path / "x", {"a": entry(shape=(0, 4), end=0), "b": entry(shape=(0,), end=0), "c": entry()},
                 struct.pack("<2f", 1.0, 2.0))  # fmt: skip
    got = read_safetensors(p)
    assert got["a"].shape == (0, 4) and got["c"].tolist() == [1.0, 2.0]


def test_not_a_regular_file(tmp_path):
    refused(tmp_path, "not a regular file|cannot be opened")
    refused(tmp_path / "missing", "does not exist")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(fifo, "not a regular file")


def test_symlink_refused_when_asked(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(2)}, str(p))
    link = tmp_path / "link.safetensors"
    link.symlink_to(p)
    assert read_safetensors(link)["a"].tolist() == [1.0, 1.0]
    refused(link, "is a symlink", follow_symlinks=False)
