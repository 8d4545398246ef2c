"""A strict safetensors reader that we control: adapter files come from users.

Reads the format (https://github.com/huggingface/safetensors, "Format") by hand: an
8-byte little-endian header length N, N bytes of JSON, then the data section. Nothing
is ever unpickled, and the file is refused (AdapterError naming the problem) unless:

- N is at most `max_header_bytes` and 8 + N is within the file; the whole file is at
  most `max_bytes` when given; the path is a regular file;
- the header holds at most one JSON object or array per MIN_BYTES_PER_CONTAINER bytes
  and one string per MIN_BYTES_PER_STRING bytes, checked before parsing: `[[],[],...]`
  or a `__metadata__` of a million short keys would become Python objects 20x the
  header's size. A real header has three containers and five strings per tensor entry
  of 50-150 bytes. Parsed, a header then takes at most ~15x its size;
- the header is UTF-8 JSON, an object without duplicate keys or NaN/Infinity literals,
  whose entries are `{"dtype", "shape", "data_offsets"}` (and an optional string map
  `__metadata__`);
- every dtype is F32, F16 or BF16 (adapters are float; ints, bool and fp8 are refused);
- every data_offsets [begin, end] lies in the data section, end - begin equals
  prod(shape) x dtype size, and the ranges tile the data section exactly (no overlap,
  no hole, no trailing bytes), as the reference implementation requires;
- every value is finite (NaN/Inf refused, naming the tensor).

Returns {name: tensor} in the stored dtype, on the CPU, in header order. It knows
nothing of adapters (key names, shapes per module): see loader.py.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AdapterError
from .files import open_regular_file
from .strict_json import strict_json

MAX_HEADER_BYTES = 16 * 2**20  # the reference implementation's own cap (100 MB) is far above any adapter's
MAX_NDIM = 8
MAX_DIM = 2**31 - 1  # per dimension; keeps shape products and torch.empty sane
MIN_BYTES_PER_CONTAINER = 8  # JSON objects and arrays
MIN_BYTES_PER_STRING = 10

# safetensors dtype name -> (torch dtype, bytes per element). Only floats: adapters are float.
FLOAT_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorEntry:
    """One header entry, validated."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offset into the data section
    end: int


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_header(header: bytes, data_len: int) -> list[TensorEntry]:
    """Validates a header (the N JSON bytes) against a data section of `data_len` bytes."""
    containers = header.count(b"[") + header.count(b"{")
    strings = header.count(b'"') // 2
    if containers > len(header) // MIN_BYTES_PER_CONTAINER + 4 or strings > len(header) // MIN_BYTES_PER_STRING + 16:
        raise AdapterError(
            f"safetensors header has {containers} JSON objects and arrays and {strings} strings in "
            f"{len(header)} bytes; a real header has a few per tensor entry of 50-150 bytes"
        )
    obj = strict_json(header, "safetensors header")
    if not isinstance(obj, dict):
        raise AdapterError(f"safetensors header is a JSON {type(obj).__name__}, not an object")

    entries: list[TensorEntry] = []
    for name, info in obj.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise AdapterError("safetensors __metadata__ must be an object of strings")
            continue
        if not name:
            raise AdapterError("safetensors header has a tensor with an empty name")
        if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
            keys = sorted(info) if isinstance(info, dict) else type(info).__name__
            raise AdapterError(f"tensor {name!r}: header entry must have exactly dtype, shape, data_offsets, not {keys}")
        dtype_name = info["dtype"]
        if dtype_name not in FLOAT_DTYPES:
            raise AdapterError(
                f"tensor {name!r} has dtype {dtype_name!r}; only F32, F16 and BF16 tensors are accepted"
            )
        dtype, itemsize = FLOAT_DTYPES[dtype_name]
        shape = info["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)
        ):
            raise AdapterError(f"tensor {name!r} has an invalid shape {shape!r}")
        offsets = info["data_offsets"]
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise AdapterError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise AdapterError(
                f"tensor {name!r}: data_offsets [{begin}, {end}] are outside the data section of {data_len} bytes"
            )
        nbytes = math.prod(shape) * itemsize
        if end - begin != nbytes:
            raise AdapterError(
                f"tensor {name!r}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but shape "
                f"{tuple(shape)} of {dtype_name} needs {nbytes}"
            )
        entries.append(TensorEntry(name, dtype, tuple(shape), begin, end))

    # The ranges must tile the data section: no overlap, no hole, nothing after the last.
    covered, last = 0, None
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin < covered:
            raise AdapterError(f"tensors {last!r} and {e.name!r} overlap in the data section")
        if e.begin > covered:
            raise AdapterError(f"bytes [{covered}, {e.begin}) of the data section belong to no tensor")
        covered, last = e.end, e.name
    if covered != data_len:
        raise AdapterError(f"bytes [{covered}, {data_len}) of the data section belong to no tensor")
    return entries


def read_safetensors(
    path: str | os.PathLike,
    *,
    max_bytes: int | None = None,
    max_header_bytes: int = MAX_HEADER_BYTES,
    follow_symlinks: bool = True,
) -> dict[str, torch.Tensor]:
    """{name: CPU tensor} from a safetensors file, after all the checks of the module doc.
    With follow_symlinks=False a symlink at `path` is refused (O_NOFOLLOW)."""
    if sys.byteorder != "little":  # the format is little-endian; we copy bytes as they are
        raise RuntimeError("read_safetensors needs a little-endian host")
    path = Path(path)
    label = path.name
    with open_regular_file(path, follow_symlinks=follow_symlinks, max_bytes=max_bytes) as (f, size):
        if size < 8:
            raise AdapterError(f"{label} is {size} bytes, too short for a safetensors header")
        n = int.from_bytes(f.read(8), "little")
        if n > max_header_bytes:
            raise AdapterError(f"{label}: header of {n} bytes is over the cap of {max_header_bytes}")
        if 8 + n > size:
            raise AdapterError(f"{label}: header of {n} bytes runs past the end of the {size}-byte file")
        header = f.read(n)
        if len(header) != n:
            raise AdapterError(f"{label} was truncated while being read")
        try:
            entries = parse_header(header, size - 8 - n)
        except AdapterError as e:
            raise type(e)(f"{label}: {e}") from None

        out: dict[str, torch.Tensor] = {}
        for e in entries:
            nbytes = e.end - e.begin
            if nbytes == 0:
                out[e.name] = torch.empty(e.shape, dtype=e.dtype)
                continue
            f.seek(8 + n + e.begin)
            buf = bytearray(f.read(nbytes))
            if len(buf) != nbytes:
                raise AdapterError(f"{label} was truncated while being read")
            t = torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape)
            if not bool(torch.isfinite(t).all()):
                raise AdapterError(f"{label}: tensor {e.name!r} contains NaN or Inf values")
            out[e.name] = t
    # Header order, as written.
    return out
