"""The adapter manager: everything about where adapters live.

    disk (registered directories)  --loader thread: validate, convert, stage-->
    host cache (staged, pinned on CUDA, bounded in bytes, LRU)  --side stream (CUDA) / writer thread (CPU)-->
    device slots and rank pages (LRU of adapters no running request pins)

It registers adapters (id → version key, directory, metadata; a replace makes a new
key) — uploads after a full validation, directories found at start (`register`) from
their config alone, so thousands register in seconds, their weights validated by a
background validator (an invalid one is then unregistered, with its reason logged) or
at first use, whichever comes first — sizes the device pool from the byte budget, and owns the host cache, the device
slots (device_adapters.py) and the rank pages (adapter_pages.py). Validation and
conversion run in the caller's thread (an admin RPC) or on the loader thread, never on
the engine thread; device writes are issued by the engine thread on CUDA (a side stream)
and run on the writer thread on the CPU (device_adapters.py). The engine thread calls
`acquire`, `release`, `prefetch`, `collect` and `join_loads`; a request binds the version
current when it is admitted (`current_key`), and a replaced or removed version is freed
once no running request uses it, never handed out again.

Mixtures (adapters/mixture.py) are virtual adapters under a `MixtureKey`: built on the
loader thread from their parts' converted weights (the host cache's, else each part's
directory), then cached, staged, slotted and evicted like any adapter. A mixture's key
names its parts' versions, so a replaced or removed part retires the mixtures built from
it, and the next bind resolves the parts' current versions (a new key).
"""

from __future__ import annotations

import itertools
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.adapters.errors import AdapterError, AdapterExists
from loraplex.adapters.form import AdapterWeights
from loraplex.adapters.mixture import check_parts, check_ranks, check_type, mix, rank_bound
from loraplex.kernels.rank_pages import pages_for
from loraplex.server.engine.adapter_pages import AdapterPages, StagedAdapter, adapter_page_bytes, adapter_slot_bytes
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.device_adapters import DeviceAdapters
from loraplex.server.engine.errors import UnknownAdapter
from loraplex.server.engine.host_cache import HostCache
from loraplex.server.engine.threads import helper_executor, helper_torch_threads
from loraplex.server.model.config import ModelConfig

log = logging.getLogger(__name__)

AdapterKey = tuple[str, int]  # (adapter id, version): a replaced adapter gets a new key
# ("_mixture", ((adapter id, version, weight), ...)), parts sorted by id. "_mixture" is no
# adapter id (ids start with a letter or digit: adapters/store.py).
MIXTURE = "_mixture"
MixtureKey = tuple[str, tuple[tuple[str, int, float], ...]]


def is_mixture(key) -> bool:
    return key[0] == MIXTURE


def describe(key) -> str:
    """A key as messages name it: 'shout', or mixture('shout' 0.5, 'calm' 0.5)."""
    if is_mixture(key):
        return "mixture(" + ", ".join(f"{i!r} {w:g}" for i, _, w in key[1]) + ")"
    return repr(key[0])

# Host loads started ahead of need for waiting requests (the loader works them in order).
MAX_PREFETCH_LOADS = 4


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    adapter_type: str  # lora | dora | vera | adalora
    ranks: dict[str, list[int]]  # module name -> rank per adapted layer
    target_modules: list[str]
    size_bytes: int  # the converted weights (one form)
    resident: bool  # in a device slot now
    path: str
    host_cached: bool = False  # staged in the host cache now
    validated: bool = True  # False: registered from its config; ranks and size_bytes as declared


@dataclass
class _Entry:
    key: AdapterKey
    path: Path
    info: AdapterInfo


def adapter_pool_size(config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype) -> tuple[int, int]:
    """(slots, rank pages per target module) that adapter_pool_bytes holds: every slot's
    own state, then pages, at most enough for every slot to hold an adapter of max_rank."""
    slot_bytes = adapter_slot_bytes(model_config, dtype)
    page_bytes = adapter_page_bytes(model_config, dtype)
    max_pages = pages_for(config.max_rank)
    pages = min(config.adapter_slots * max_pages, (config.adapter_pool_bytes - config.adapter_slots * slot_bytes) // page_bytes)
    if pages < max_pages:
        need = config.adapter_slots * slot_bytes + max_pages * page_bytes
        raise ValueError(
            f"adapter_pool_bytes {config.adapter_pool_bytes} cannot hold one adapter of rank {config.max_rank} beside "
            f"{config.adapter_slots} slots: it needs at least {need} bytes on this model "
            f"(raise --adapter-pool-mb, or lower --max-rank or --adapter-slots)"
        )
    return config.adapter_slots, pages


class AdapterManager:
    def __init__(self, model, config: EngineConfig):
        self._base = model
        self._max_rank = config.max_rank
        self._dtype = model.dtype
        self._max_adapter_bytes = config.max_adapter_bytes
        self._fold_shared = config.vera_form == "folded"
        slots, pages = adapter_pool_size(config, model.config, model.dtype)
        self.pages = AdapterPages(model, slots, config.max_rank, pages)
        self.device = DeviceAdapters(self.pages, slots)
        self.host = HostCache(config.host_cache_bytes)
        self._entries: dict[str, _Entry] = {}
        self._pending: dict[AdapterKey, Future] = {}  # host loads in flight or failed
        self._retired: list[AdapterKey] = []  # replaced/removed versions the engine thread frees
        self._mixtures: set = set()  # MixtureKeys loading, host-cached or resident: retired with their parts
        self._versions = itertools.count(1)
        self._lock = threading.RLock()
        self._loader = helper_executor("adapter-loader", model.device)
        self._validator = helper_executor("adapter-validator", model.device)
        self._validating: list[Future] = []
        self.load_failures = 0
        # conversions' device work (DoRA's ‖W + s·B·A‖, the numerics' ‖W‖ of NF4 weights
        # dequantized on the device) on a stream of their own, not queued with the steps'
        self._convert_stream = None
        if model.device.type == "cuda":
            self._convert_stream = torch.cuda.Stream(model.device)
            self._convert_stream.wait_stream(torch.cuda.current_stream(model.device))  # after the model's loading

    @property
    def num_slots(self) -> int:
        return self.device.num_slots

    # -- admin side (any thread) ---------------------------------------------------------
    def convert(self, path: Path | str) -> AdapterWeights:
        """Validates and converts an adapter directory (AdapterError names the problem)."""
        from loraplex.adapters.loader import load_adapter_dir

        try:
            with torch.cuda.stream(self._convert_stream), helper_torch_threads(self._base.device):  # stream None (CPU): no-op
                return load_adapter_dir(Path(path), self._base, max_rank=self._max_rank, dtype=self._dtype, max_bytes=self._max_adapter_bytes)
        except Exception:
            with self._lock:
                self.load_failures += 1
            raise

    def validate(self, path: Path | str) -> AdapterInfo:
        return self._info("", self.convert(path), Path(path))

    def add(self, adapter_id: str, path: Path | str, replace: bool = False, weights: AdapterWeights | None = None) -> AdapterInfo:
        """Registers (or, with replace, atomically swaps in) an adapter after validating it.
        `weights`: the directory's contents already converted (an upload validated them)."""
        path = Path(path)
        with self._lock:
            if adapter_id in self._entries and not replace:
                raise AdapterExists(f"adapter {adapter_id!r} already exists")
        if weights is None:
            weights = self.convert(path)  # outside the lock: may take a while
        staged = self._stage(weights)
        with self._lock:
            if adapter_id in self._entries and not replace:
                raise AdapterExists(f"adapter {adapter_id!r} already exists")
            old = self._entries.get(adapter_id)
            key = (adapter_id, next(self._versions))
            entry = _Entry(key, path, self._info(adapter_id, weights, path))
            self._entries[adapter_id] = entry
            self.host.put(key, staged)
        if old is not None:
            self._retire(old.key)
        return entry.info

    def register(self, adapter_id: str, path: Path | str) -> AdapterInfo:
        """Registers a directory from its config (loader.summarize_adapter_dir: no weights
        read) and queues its full validation on the background validator."""
        from loraplex.adapters.loader import summarize_adapter_dir

        path = Path(path)
        s = summarize_adapter_dir(path, self._base.num_layers, max_rank=self._max_rank, max_bytes=self._max_adapter_bytes,
                                  base=self._base)
        with self._lock:
            if adapter_id in self._entries:
                raise AdapterExists(f"adapter {adapter_id!r} already exists")
            key = (adapter_id, next(self._versions))
            entry = _Entry(key, path, AdapterInfo(adapter_id, s.adapter_type, s.ranks, s.target_modules, s.file_bytes, False,
                                                  str(path), validated=False))  # fmt: skip
            self._entries[adapter_id] = entry
            self._validating.append(self._validator.submit(self._validate_registered, key))
        return entry.info

    def wait_validated(self, timeout: float | None = None) -> None:
        """Blocks until the background validation of every registered directory is done."""
        with self._lock:
            pending = list(self._validating)
        for fut in pending:
            fut.exception(timeout)

    def remove(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(adapter_id, None)
        if entry is None:
            raise UnknownAdapter(f"adapter {adapter_id!r} not found")
        self._retire(entry.key)

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.info.adapter_id)
        return [self._with_state(e) for e in entries]

    def list_page(self, after: str, limit: int) -> tuple[list[AdapterInfo], str]:
        """Up to `limit` adapters with ids after `after` ("" = from the first), in id order,
        and the token of the next page ("" on the last)."""
        with self._lock:
            ids = sorted(i for i in self._entries if i > after)
            page = [self._entries[i] for i in ids[:limit]]
        next_token = page[-1].info.adapter_id if len(ids) > limit else ""
        return [self._with_state(e) for e in page], next_token

    def get(self, adapter_id: str) -> AdapterInfo:
        return self._with_state(self._entry(adapter_id))

    def __contains__(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def key_of(self, adapter_id: str) -> AdapterKey:
        return self._entry(adapter_id).key

    # -- engine side (the engine thread) ------------------------------------------------------
    def current_key(self, key: AdapterKey) -> AdapterKey:
        """The registered version of `key`'s adapter id (a replace makes a new one), or
        of each part of a mixture; UnknownAdapter if an id was removed."""
        if is_mixture(key):
            return (MIXTURE, tuple((i, self._entry(i).key[1], w) for i, _, w in key[1]))
        return self._entry(key[0]).key

    def mixture_key(self, parts) -> MixtureKey:
        """The key of the mixture of `parts` ((adapter id, weight) ...) at the parts'
        current versions. UnknownAdapter: an id is not registered; AdapterError: the
        mixture is refused (adapters/mixture.py; the rank check is the upper bound of the
        parts' declared ranks: the build checks each layer exactly)."""
        parts = [(i, float(w)) for i, w in parts]
        check_parts(parts)
        entries = [(self._entry(i), w) for i, w in parts]
        for e, _ in entries:
            check_type(e.info.adapter_id, e.info.adapter_type)
        check_ranks(rank_bound(e.info.ranks for e, _ in entries), self._max_rank, exact=False)
        return (MIXTURE, tuple(sorted((e.key[0], e.key[1], w) for e, w in entries)))

    def is_gone(self, key) -> bool:
        """Whether `key`'s adapter id (or one of a mixture's parts) is no longer registered."""
        ids = [i for i, _, _ in key[1]] if is_mixture(key) else [key[0]]
        with self._lock:
            return any(i not in self._entries for i in ids)

    def acquire(self, key: AdapterKey) -> int | None:
        """Pins `key` in a device slot and returns the slot, or None while it loads (from
        disk on the loader thread, then to the device on the CPU's writer thread) or while every slot
        and page it needs is pinned. Never blocks."""
        staged = None
        if self.device.slot_of(key) is None:
            staged = self.host.get(key)
            if staged is None:
                self._load_host(key)
        return self.device.acquire(key, staged)

    def release(self, key: AdapterKey) -> None:
        self.device.release(key)

    def prefetch(self, keys) -> None:
        """Starts loading the adapters of waiting requests, in queue order: to the host
        cache (a few at a time), and to the device where there is room without evicting."""
        started = 0
        for key in dict.fromkeys(keys):
            try:
                key = self.current_key(key)  # a request binds the version current at its admission
            except UnknownAdapter:
                continue
            if self.device.slot_of(key) is not None:
                continue
            staged = self.host.get(key)
            if staged is not None:
                self.device.prefetch(key, staged)
            elif started < MAX_PREFETCH_LOADS and self._load_host(key):
                started += 1

    def load_error(self, key: AdapterKey) -> BaseException | None:
        """The error of a failed load of `key` (host or device; then forgotten), if any."""
        with self._lock:
            fut = self._pending.get(key)
            if fut is not None and fut.done() and fut.exception() is not None:
                del self._pending[key]
                return fut.exception()
        return self.device.failure(key)

    def collect(self) -> None:
        """Frees the device slots of retired versions (now, or at their last release)."""
        with self._lock:
            retired, self._retired = self._retired, []
        for key in retired:
            self.device.remove(key)
        self.device.settle()

    def has_retired(self) -> bool:
        with self._lock:
            return bool(self._retired)

    def join_loads(self) -> None:
        """Makes the coming step wait (on the device) for the loads it uses."""
        self.device.join_loads()

    def close(self) -> None:
        self._validator.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)
        self.device.close()

    # -- internals -------------------------------------------------------------------------
    def _stage(self, weights: AdapterWeights) -> StagedAdapter:
        with helper_torch_threads(self._base.device):  # an admin thread's upload stages here too
            staged = self.pages.stage(weights, fold_shared=self._fold_shared)
        if staged.nbytes > self.host.budget_bytes:
            raise AdapterError(f"the adapter takes {staged.nbytes} bytes in the host cache, over its budget of "
                               f"{self.host.budget_bytes} (raise --host-cache-mb)")  # fmt: skip
        return staged

    def _load_host(self, key: AdapterKey) -> bool:
        """Starts converting `key`'s directory on the loader thread; False if it is already
        loading (or failed and not yet reported). UnknownAdapter if the version is gone."""
        with self._lock:
            if key in self._pending or key in self.host:
                return False
            if is_mixture(key):
                parts = [self._entries.get(i) for i, _, _ in key[1]]
                for e, (i, version, _) in zip(parts, key[1]):
                    if e is None or e.key != (i, version):
                        raise UnknownAdapter(f"adapter {i!r} (part of {describe(key)}) was removed or replaced")
                self._prune_mixtures()
                self._mixtures.add(key)
                self._pending[key] = self._loader.submit(self._build_mixture, key, [(e.key, e.path) for e in parts])
                return True
            entry = self._entries.get(key[0])
            if entry is None or entry.key != key:
                raise UnknownAdapter(f"adapter {key[0]!r} was removed")
            self._pending[key] = self._loader.submit(self._reload, key, entry.path)
            return True

    def _prune_mixtures(self) -> None:
        """Forgets mixtures neither loading, host-cached nor resident (evicted by both
        LRUs), so one key per weight combination ever asked for is not kept. Under the lock."""
        if len(self._mixtures) > 4 * self.device.num_slots:
            self._mixtures = {m for m in self._mixtures if m in self._pending or m in self.host
                              or self.device.slot_of(m) is not None}  # fmt: skip

    def _build_mixture(self, key: MixtureKey, parts: list[tuple[AdapterKey, Path]]) -> None:
        """On the loader thread: the mixture's weights from its parts' (host-cached, else
        converted from their directories), staged into the host cache if every part is
        still the current version."""
        converted = []
        for (part_key, path), (_, _, w) in zip(parts, key[1]):
            cached = self.host.get(part_key)
            if cached is not None:
                weights = cached.weights
            else:
                try:
                    weights = self.convert(path)
                except Exception as e:
                    self._unregister_invalid(part_key, e)
                    raise
                with self._lock:
                    entry = self._entries.get(part_key[0])
                    if entry is not None and entry.key == part_key:
                        self._mark_validated(entry, weights)
            converted.append((part_key[0], weights, w))
        staged = self._stage(mix(converted, self._max_rank))
        with self._lock:
            self._pending.pop(key, None)
            if key in self._mixtures and all(self._entries.get(k[0]) is not None and self._entries[k[0]].key == k
                                             for k, _ in parts):  # fmt: skip
                self.host.put(key, staged)

    def _reload(self, key: AdapterKey, path: Path) -> None:
        try:
            weights = self.convert(path)
            staged = self._stage(weights)
        except Exception as e:
            self._unregister_invalid(key, e)
            raise
        with self._lock:
            self._pending.pop(key, None)
            entry = self._entries.get(key[0])
            if entry is not None and entry.key == key:
                self.host.put(key, staged)
                self._mark_validated(entry, weights)

    def _validate_registered(self, key: AdapterKey) -> None:
        """On the validator thread: converts a directory registered from its config, once.
        Valid: its info gets the converted ranks and size. Invalid: unregistered."""
        with self._lock:
            entry = self._entries.get(key[0])
            if entry is None or entry.key != key or entry.info.validated or key in self._pending:
                return  # gone, replaced, or the loader has it (it validates too)
        try:
            weights = self.convert(entry.path)
            staged = self._stage(weights)
        except Exception as e:  # noqa: BLE001
            self._unregister_invalid(key, e)
            return
        with self._lock:
            self._mark_validated(entry, weights)
            if self._entries.get(key[0]) is entry:
                self.host.offer(key, staged)  # kept where the host cache has room: the first use then reads no disk

    def _mark_validated(self, entry: _Entry, weights: AdapterWeights) -> None:
        if not entry.info.validated:
            entry.info = self._info(entry.info.adapter_id, weights, entry.path)

    def _unregister_invalid(self, key: AdapterKey, error: BaseException) -> None:
        """A directory registered from its config failed validation: it leaves the registry."""
        with self._lock:
            entry = self._entries.get(key[0])
            if entry is None or entry.key != key or entry.info.validated:
                return
            del self._entries[key[0]]
        log.warning("skipping adapter %s: %s", key[0], error)
        self._retire(key)

    def _retire(self, key: AdapterKey) -> None:
        """`key` (a version replaced or removed) and the mixtures built from it are freed
        by the engine thread (`collect`), at their last release where they are pinned."""
        with self._lock:
            mixtures = [m for m in self._mixtures if any((i, v) == key for i, v, _ in m[1])]
            self._mixtures.difference_update(mixtures)
            for m in mixtures:
                self._pending.pop(m, None)  # a build in flight finds its key gone and caches nothing
            for k in (key, *mixtures):
                self.host.drop(k)
                self._retired.append(k)

    def _entry(self, adapter_id: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(adapter_id)
        if entry is None:
            raise UnknownAdapter(f"adapter {adapter_id!r} not found")
        return entry

    def _with_state(self, entry: _Entry) -> AdapterInfo:
        i = entry.info
        resident = self.device.slot_of(entry.key) is not None
        return AdapterInfo(i.adapter_id, i.adapter_type, i.ranks, i.target_modules, i.size_bytes, resident, i.path,
                           entry.key in self.host, i.validated)  # fmt: skip

    @staticmethod
    def _info(adapter_id: str, w: AdapterWeights, path: Path) -> AdapterInfo:
        return AdapterInfo(adapter_id, w.adapter_type, w.ranks, w.target_modules, w.nbytes, False, str(path))
