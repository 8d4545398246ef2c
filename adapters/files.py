"""Opening an adapter file safely: a regular file only (no FIFO that hangs the reader,
optionally no symlink), under a byte cap, with AdapterError messages naming the file."""

from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import AdapterError, AdapterTooLarge


@contextmanager
def open_regular_file(
    path: Path,
    *,
    follow_symlinks: bool,
    max_bytes: int | None,
    missing: str | None = None,  # message when the file does not exist (default: "<name> does not exist")
) -> Iterator[tuple[BinaryIO, int]]:
    """Yields (binary file, size in bytes)."""
    label = path.name
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0))  # O_NONBLOCK: a FIFO must not hang us
    except FileNotFoundError:
        raise AdapterError(missing or f"{label} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise AdapterError(f"{label} is a symlink; adapter files must be regular files") from None
        raise AdapterError(f"{label} cannot be opened: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise AdapterError(f"{label} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if max_bytes is not None and st.st_size > max_bytes:
            raise AdapterTooLarge(f"{label} is {st.st_size} bytes, over the cap of {max_bytes}")
        yield f, st.st_size
