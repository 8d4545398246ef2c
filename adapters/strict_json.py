"""Strict JSON for untrusted adapter files: duplicate keys and NaN/Infinity are refused
(Python's json accepts both), and every failure is an AdapterError naming `what`."""

from __future__ import annotations

import json
from typing import Any

from .errors import AdapterError


def strict_json(data: bytes, what: str) -> Any:
    """The JSON value of `data` (UTF-8); `what` names it in errors, e.g. "safetensors header"."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for k, v in pairs:
            if k in out:
                raise AdapterError(f"{what} has the key {k!r} twice")
            out[k] = v
        return out

    def no_constants(name: str):
        raise AdapterError(f"{what} contains {name}, which is not JSON")

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except AdapterError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AdapterError(f"{what} is not valid JSON: {e}") from None
