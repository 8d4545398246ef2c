"""One replica's adapters kept in step with a shared adapter root (no Ray here).

    service = SharedStoreService(engine, AdapterStore(root), metrics)
    service.sync("shout")        # registers, re-registers or unregisters "shout" to match root/shout

Every replica of a deployment reads the same adapter root (a shared directory). Nothing
is pushed between replicas: each one compares the directory `root/<id>` with what it
registered, when a request for `<id>` arrives, before the request is submitted.

The rule: a request for adapter X is served by the version of `root/X` that was in place
when the request reached its replica, or by a newer one. The store (adapters/store.py)
commits uploads and replaces by renaming a fresh directory into place, so every commit
changes the directory's identity. `fingerprint` is (inode, mtime) of the directory and
(inode, size, mtime) of its two files; a replica that finds a fingerprint other than the
one it registered re-registers (replace: requests in flight finish on the old version,
new ones bind the new version). The stat comes before the files are read, so the
registered contents are never older than the fingerprint recorded for them. A directory
gone from the root unregisters the adapter (an unload, or a delete through any replica).
Adapters this replica registered from elsewhere (`load` of another path under the root)
stay local to it.

Unload across replicas: `unload` of an adapter that lives at `root/<id>` also deletes
`root/<id>` (the store is the shared state; without that, the next request would register
it again), so every replica drops it at its next request for it.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from loraplex.adapters.errors import AdapterError
from loraplex.adapters.loader import ADAPTER_FILES
from loraplex.adapters.store import validate_id
from loraplex.server.service import Service

log = logging.getLogger(__name__)

Fingerprint = tuple[int, ...]


def fingerprint(path: Path) -> Fingerprint | None:
    """Identity of an adapter directory's committed version; None when it is not there."""
    try:
        d = os.stat(path, follow_symlinks=False)
        files = [os.stat(path / name, follow_symlinks=False) for name in ADAPTER_FILES]
    except (FileNotFoundError, NotADirectoryError):
        return None
    out = [d.st_ino, d.st_mtime_ns]
    for f in files:
        out += [f.st_ino, f.st_size, f.st_mtime_ns]
    return tuple(out)


def adapter_named(model: str, base_model: str) -> str | None:
    """The adapter id a `model` name would mean (None: the base), without checking it:
    the mapping of Service.adapter_for_model (`<base>:<adapter>` or `<adapter>`)."""
    if model == base_model:
        return None
    base, sep, adapter = model.partition(":")
    return adapter if sep and base == base_model else model


class SharedStoreService(Service):
    """The service of one replica over a shared adapter root (module docstring)."""

    def __init__(self, engine, store, metrics=None, served_model_name: str | None = None):
        super().__init__(engine, store, metrics, served_model_name)
        self._versions: dict[str, Fingerprint] = {}  # adapter id -> fingerprint of the registered root/<id>
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self.registrations = 0  # registrations from the shared root (first use or a newer version)

    @property
    def store(self):
        return self._store

    def _lock(self, adapter_id: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(adapter_id, threading.Lock())

    def adapter_named(self, model: str) -> str | None:
        """The adapter id a `model` name would mean (None: the base), without checking it."""
        return adapter_named(model, self.base_model)

    def sync(self, adapter_id: str) -> bool:
        """Makes this replica's registration of `adapter_id` match root/<id>; True when the
        adapter is registered afterwards. Raises AdapterError for an invalid directory."""
        try:
            path = self._store.path(validate_id(adapter_id))
        except AdapterError:
            return False
        adapters = self._engine.adapters
        with self._lock(adapter_id):
            fp = fingerprint(path)  # first: what is read below is this version or newer
            registered = adapter_id in adapters
            ours = registered and (adapter_id in self._versions or Path(adapters.get(adapter_id).path) == path)
            if fp is None:
                if ours:  # unloaded or deleted through another replica
                    self._forget(adapter_id)
                return adapter_id in adapters
            if registered and not ours:
                return True  # loaded here from another path: local to this replica
            if registered and self._versions.get(adapter_id) == fp:
                return True
            adapters.add(adapter_id, path, replace=registered)
            self._versions[adapter_id] = fp
            self.registrations += 1
            log.info("%s adapter %s from the shared root", "re-registered" if registered else "registered", adapter_id)
            return True

    def _forget(self, adapter_id: str) -> None:
        self._versions.pop(adapter_id, None)
        try:
            self._engine.adapters.remove(adapter_id)
        except Exception:  # noqa: BLE001 — removed meanwhile
            pass
        if self._metrics is not None:
            self._metrics.forget_adapter(adapter_id)

    # -- Service, with the shared root ----------------------------------------------------
    def adapter_for_model(self, model: str) -> str | None:
        adapter = self.adapter_named(model)
        if adapter:
            self.sync(adapter)
        return super().adapter_for_model(model)

    def submit(self, request):
        if request.adapter_id:
            self.sync(request.adapter_id)
        return super().submit(request)

    def models(self) -> list[tuple[str, str | None]]:
        ids = set(self._store.ids()) | {info.adapter_id for info in self._engine.adapters.list()
                                        if Path(info.path) != self._store.path(info.adapter_id)}  # fmt: skip
        return [(self.base_model, None)] + [(i, self.base_model) for i in sorted(ids)]

    def load(self, adapter_id: str, path: str, replace: bool = False):
        """root/<id> registers as a shared adapter (every replica serves it); another path
        under the root registers on this replica only."""
        validate_id(adapter_id)
        if self._store.resolve_load_path(path) == self._store.path(adapter_id):
            self.sync(adapter_id)
            return self._engine.adapters.get(adapter_id)
        return super().load(adapter_id, path, replace=replace)

    def unload(self, adapter_id: str, delete_files: bool = False) -> None:
        path = self._store.path(validate_id(adapter_id))
        with self._lock(adapter_id):
            if adapter_id not in self._engine.adapters and self._store.exists(adapter_id):
                self._store.delete(adapter_id)  # registered on other replicas only: they drop it
                return
            shared = adapter_id in self._engine.adapters and Path(self._engine.adapters.get(adapter_id).path) == path
            super().unload(adapter_id, delete_files=delete_files or shared)
            self._versions.pop(adapter_id, None)
