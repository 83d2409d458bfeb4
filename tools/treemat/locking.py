"""Advisory file locks (fcntl.flock) for state shared between treemat processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class LockBusy(Exception):
    """A non-blocking lock attempt found the lock held by someone else."""


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False, blocking: bool = True) -> Iterator[None]:
    """Hold a flock on `path` (created if missing) for the duration of the `with` block.

    `shared=True` takes a reader lock; several processes may hold it at once. With `blocking=False`
    a held lock raises LockBusy instead of waiting.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if not blocking:
            operation |= fcntl.LOCK_NB
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError as exc:
            raise LockBusy(str(path)) from exc
        yield
    finally:
        os.close(fd)
