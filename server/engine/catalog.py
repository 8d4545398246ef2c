"""The adapters the engine knows: id → version key, source directory, metadata, and a
host cache of their converted weights (the one form) under a byte budget.

Validation and conversion run in the caller's thread (an admin RPC) or in a background
loader thread, never in the engine's step loop. A replaced or removed adapter's old
version key is handed to `on_retire`, so the engine frees its slot once no running
request uses it; requests already running on it complete.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from loraplex.adapters.errors import AdapterExists
from loraplex.adapters.form import AdapterWeights, BaseModelView
from loraplex.server.engine.errors import UnknownAdapter

log = logging.getLogger(__name__)

AdapterKey = tuple[str, int]  # (adapter id, version): a replaced adapter gets a new key


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    adapter_type: str  # lora | dora | vera | adalora
    ranks: dict[str, list[int]]  # module name -> rank per adapted layer
    target_modules: list[str]
    size_bytes: int  # the converted weights (one form)
    resident: bool  # in a device slot now
    path: str


@dataclass
class _Entry:
    key: AdapterKey
    path: Path
    info: AdapterInfo


class AdapterCatalog:
    def __init__(
        self,
        base: BaseModelView,
        *,
        max_rank: int,
        dtype: torch.dtype,
        host_cache_bytes: int,
        max_adapter_bytes: int | None = None,
        is_resident: Callable[[AdapterKey], bool] = lambda key: False,
        on_retire: Callable[[AdapterKey], None] = lambda key: None,
    ):
        self._base = base
        self._max_rank = max_rank
        self._dtype = dtype
        self._max_adapter_bytes = max_adapter_bytes
        self._host_cache_bytes = host_cache_bytes
        self._is_resident = is_resident
        self._on_retire = on_retire
        self._entries: dict[str, _Entry] = {}
        self._cache: "OrderedDict[AdapterKey, AdapterWeights]" = OrderedDict()
        self._pending: dict[AdapterKey, Future] = {}
        self._versions = itertools.count(1)
        self._lock = threading.RLock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")
        self.load_failures = 0

    # -- admin side ----------------------------------------------------------------------
    def convert(self, path: Path | str) -> AdapterWeights:
        """Validates and converts an adapter directory (AdapterError names the problem)."""
        from loraplex.adapters.loader import load_adapter_dir

        try:
            return load_adapter_dir(Path(path), self._base, max_rank=self._max_rank, dtype=self._dtype, max_bytes=self._max_adapter_bytes)
        except Exception:
            with self._lock:
                self.load_failures += 1
            raise

    def validate(self, path: Path | str) -> AdapterInfo:
        weights = self.convert(path)
        return self._info("", weights, Path(path), resident=False)

    def add(self, adapter_id: str, path: Path | str, replace: bool = False, weights: AdapterWeights | None = None) -> AdapterInfo:
        """Registers (or, with replace, atomically swaps in) an adapter after validating it.
        `weights`: the directory's contents already converted (an upload validated them)."""
        path = Path(path)
        with self._lock:
            if adapter_id in self._entries and not replace:
                raise AdapterExists(f"adapter {adapter_id!r} already exists")
        if weights is None:
            weights = self.convert(path)  # outside the lock: may take a while
        with self._lock:
            if adapter_id in self._entries and not replace:
                raise AdapterExists(f"adapter {adapter_id!r} already exists")
            old = self._entries.get(adapter_id)
            key = (adapter_id, next(self._versions))
            entry = _Entry(key, path, self._info(adapter_id, weights, path, resident=False))
            self._entries[adapter_id] = entry
            self._cache_put(key, weights)
        if old is not None:
            self._retire(old.key)
        return entry.info

    def remove(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(adapter_id, None)
        if entry is None:
            raise UnknownAdapter(f"adapter {adapter_id!r} not found")
        self._retire(entry.key)

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.info.adapter_id)
        return [self._with_residency(e) for e in entries]

    def get(self, adapter_id: str) -> AdapterInfo:
        return self._with_residency(self._entry(adapter_id))

    def __contains__(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def key_of(self, adapter_id: str) -> AdapterKey:
        return self._entry(adapter_id).key

    # -- engine side ---------------------------------------------------------------------
    def current_key(self, key: AdapterKey) -> AdapterKey:
        """The registered version of `key`'s adapter id (a replace makes a new one);
        UnknownAdapter if the id was removed."""
        return self._entry(key[0]).key

    def weights_ready(self, key: AdapterKey) -> bool:
        """True if `key`'s weights are in the host cache; otherwise starts loading them in
        the background (the engine asks again next step)."""
        with self._lock:
            if key in self._cache:
                return True
            if key in self._pending:
                return False
            entry = next((e for e in self._entries.values() if e.key == key), None)
            if entry is None:
                raise UnknownAdapter(f"adapter {key[0]!r} was removed")
            self._pending[key] = self._loader.submit(self._reload, key, entry.path)
            return False

    def weights(self, key: AdapterKey) -> AdapterWeights:
        with self._lock:
            weights = self._cache.get(key)
            if weights is not None:
                self._cache.move_to_end(key)
                return weights
        raise KeyError(f"weights of {key} are not in the host cache")

    def load_error(self, key: AdapterKey) -> BaseException | None:
        """The error of a failed background load of `key` (then forgotten), if any."""
        with self._lock:
            fut = self._pending.get(key)
            if fut is None or not fut.done() or fut.exception() is None:
                return None
            del self._pending[key]
            return fut.exception()

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    # -- internals -------------------------------------------------------------------------
    def _reload(self, key: AdapterKey, path: Path) -> None:
        weights = self.convert(path)
        with self._lock:
            self._pending.pop(key, None)
            if any(e.key == key for e in self._entries.values()):
                self._cache_put(key, weights)

    def _cache_put(self, key: AdapterKey, weights: AdapterWeights) -> None:
        self._cache[key] = weights
        self._cache.move_to_end(key)
        total = sum(w.nbytes for w in self._cache.values())
        while total > self._host_cache_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            total -= dropped.nbytes

    def _retire(self, key: AdapterKey) -> None:
        with self._lock:
            self._cache.pop(key, None)
        self._on_retire(key)

    def _entry(self, adapter_id: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(adapter_id)
        if entry is None:
            raise UnknownAdapter(f"adapter {adapter_id!r} not found")
        return entry

    def _with_residency(self, entry: _Entry) -> AdapterInfo:
        info = entry.info
        return AdapterInfo(info.adapter_id, info.adapter_type, info.ranks, info.target_modules, info.size_bytes, self._is_resident(entry.key), info.path)

    @staticmethod
    def _info(adapter_id: str, w: AdapterWeights, path: Path, resident: bool) -> AdapterInfo:
        return AdapterInfo(adapter_id, w.adapter_type, w.ranks, w.target_modules, w.nbytes, resident, str(path))
