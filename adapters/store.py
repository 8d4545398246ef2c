"""The adapter store on disk: one directory per adapter id under a root.

    root/<id>/adapter_config.json
    root/<id>/adapter_model.safetensors

Ids match ID_PATTERN (no '/', no '..', no leading '.'), so temp and trash directories,
which start with '.', never collide with an adapter. Uploads are written into a temp
directory inside root (only the two file names allowed, under a byte cap) and become
visible only at `commit`: one atomic rename, or an atomic exchange when replacing
(renameat2(RENAME_EXCHANGE) where the kernel has it, else two renames). `resolve_load_path`
admits server-side paths only when their real path lies inside root and passes through
no hidden ('.'-prefixed) entry: those are the store's own temp and trash directories.

Thread-safe: commit and delete hold the store's lock. It validates ids and paths but
not adapter contents: `commit` takes the validation (usually a loader call) as a function.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import AdapterError, AdapterExists, AdapterNotFound, AdapterTooLarge
from .loader import ADAPTER_FILES

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DEFAULT_MAX_UPLOAD_BYTES = 2 << 30
MAX_PATH_CHARS = 4096  # PATH_MAX
_UPLOAD_PREFIX = ".upload-"
_TRASH_PREFIX = ".trash-"


def validate_id(adapter_id: object) -> str:
    if not isinstance(adapter_id, str) or not ID_PATTERN.fullmatch(adapter_id) or ".." in adapter_id:
        shown = adapter_id[:64] + "..." if isinstance(adapter_id, str) and len(adapter_id) > 64 else adapter_id
        raise AdapterError(
            f"adapter id {shown!r} is invalid: 1-128 characters of letters, digits, '.', '_', '-', "
            "starting with a letter or digit, without '..'"
        )
    return adapter_id


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2). False where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class UploadWriter:
    """Files of one upload, in a temp directory inside the store root. Use as a context
    manager (aborts unless committed). Not for concurrent use by several threads."""

    def __init__(self, store: AdapterStore, adapter_id: str, tmp_dir: Path, max_bytes: int):
        self.store = store
        self.adapter_id = adapter_id
        self.tmp_dir = tmp_dir
        self.max_bytes = max_bytes
        self.nbytes = 0  # written so far, all files together
        self._files: dict[str, BinaryIO] = {}
        self._done = False

    def write(self, file_name: str, data: bytes) -> None:
        """Appends `data` to `file_name` (adapter_config.json or adapter_model.safetensors)."""
        if self._done:
            raise AdapterError("upload is already committed or aborted")
        if file_name not in ADAPTER_FILES:
            raise AdapterError(f"upload file name {file_name!r} is not allowed (only {', '.join(ADAPTER_FILES)})")
        if self.nbytes + len(data) > self.max_bytes:
            raise AdapterTooLarge(f"upload of adapter {self.adapter_id!r} is over the cap of {self.max_bytes} bytes")
        f = self._files.get(file_name)
        if f is None:
            fd = os.open(self.tmp_dir / file_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            f = self._files[file_name] = os.fdopen(fd, "wb")
        f.write(data)
        self.nbytes += len(data)

    def _close_files(self, sync: bool) -> None:
        for f in self._files.values():
            if sync:
                f.flush()
                os.fsync(f.fileno())
            f.close()
        self._files.clear()

    def commit(self, validate_fn: Callable[[Path], object] | None = None, *, replace: bool = False) -> Path:
        """Validates the files (validate_fn(temp dir) raises to refuse) and moves them into
        place atomically. AdapterExists if the id exists and not replace. Returns the path."""
        if self._done:
            raise AdapterError("upload is already committed or aborted")
        try:
            self._close_files(sync=True)
            for name in ADAPTER_FILES:
                if not (self.tmp_dir / name).is_file():
                    raise AdapterError(f"upload of adapter {self.adapter_id!r} has no {name}")
            if validate_fn is not None:
                validate_fn(self.tmp_dir)
            _fsync_dir(self.tmp_dir)
            path = self.store._install(self.adapter_id, self.tmp_dir, replace=replace)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return path

    def abort(self) -> None:
        """Removes the temp directory (idempotent)."""
        self._close_files(sync=False)
        self._done = True
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> UploadWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self.abort()


class AdapterStore:
    """Adapter directories under `root` (created if missing)."""

    def __init__(self, root: str | os.PathLike, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
        os.makedirs(root, exist_ok=True)
        self.root = Path(os.path.realpath(root))
        self.max_upload_bytes = max_upload_bytes
        self._lock = threading.Lock()

    def path(self, adapter_id: str) -> Path:
        return self.root / validate_id(adapter_id)

    def exists(self, adapter_id: str) -> bool:
        p = self.path(adapter_id)
        return p.is_dir() and not p.is_symlink()

    def ids(self) -> list[str]:
        """Stored adapter ids, sorted (temp/trash directories and stray files excluded)."""
        out = []
        for entry in os.scandir(self.root):
            if ID_PATTERN.fullmatch(entry.name) and ".." not in entry.name and entry.is_dir(follow_symlinks=False):
                out.append(entry.name)
        return sorted(out)

    def resolve_load_path(self, path: str | os.PathLike) -> Path:
        """The real path of an adapter directory given relative to root (or absolute),
        refused unless it lies inside root: no NUL, no '..', no symlink out of root."""
        text = os.fspath(path)
        if isinstance(text, bytes) or "\x00" in text:
            raise AdapterError("adapter path must be text without NUL bytes")
        if len(text) > MAX_PATH_CHARS:
            raise AdapterError(f"adapter path is {len(text)} characters long, over {MAX_PATH_CHARS}")
        if not text or ".." in Path(text).parts:
            raise AdapterError(f"adapter path {text!r} is empty or contains '..'")
        try:
            real = Path(os.path.realpath(self.root / text))
            if real == self.root or self.root not in real.parents:
                raise AdapterError(f"adapter path {text!r} is not inside the adapter root")
            if any(part.startswith(".") for part in real.relative_to(self.root).parts):
                raise AdapterError(f"adapter path {text!r} is a hidden directory (uploads in progress live there)")
            if not real.is_dir():
                raise AdapterNotFound(f"adapter path {text!r} is not a directory")
        except OSError as e:  # ENAMETOOLONG, EACCES, ...: a path we cannot look at is not an adapter
            raise AdapterNotFound(f"adapter path {text!r} cannot be read: {e.strerror}") from None
        return real

    def begin_upload(self, adapter_id: str, *, max_bytes: int | None = None) -> UploadWriter:
        validate_id(adapter_id)
        tmp = Path(tempfile.mkdtemp(prefix=_UPLOAD_PREFIX, dir=self.root))
        return UploadWriter(self, adapter_id, tmp, self.max_upload_bytes if max_bytes is None else max_bytes)

    def _install(self, adapter_id: str, tmp_dir: Path, *, replace: bool) -> Path:
        dest = self.path(adapter_id)
        with self._lock:
            if os.path.lexists(dest):
                if not replace:
                    raise AdapterExists(f"adapter {adapter_id!r} already exists")
                if _rename_exchange(tmp_dir, dest):
                    _remove(tmp_dir)  # now holds the old adapter
                else:
                    trash = Path(tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=self.root)) / "old"
                    os.rename(dest, trash)
                    os.rename(tmp_dir, dest)
                    shutil.rmtree(trash.parent, ignore_errors=True)
            else:
                os.rename(tmp_dir, dest)
            _fsync_dir(self.root)
        return dest

    def delete(self, adapter_id: str) -> None:
        """Removes an adapter; AdapterNotFound if there is none. The id disappears atomically."""
        dest = self.path(adapter_id)
        with self._lock:
            if not self.exists(adapter_id):
                raise AdapterNotFound(f"adapter {adapter_id!r} does not exist")
            trash = Path(tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=self.root)) / "old"
            os.rename(dest, trash)
            _fsync_dir(self.root)
        shutil.rmtree(trash.parent, ignore_errors=True)

    def remove_leftovers(self) -> list[str]:
        """Removes temp and trash directories left by a crash; call at start-up, before uploads."""
        removed = []
        for entry in os.scandir(self.root):
            if entry.name.startswith((_UPLOAD_PREFIX, _TRASH_PREFIX)) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
        return sorted(removed)
