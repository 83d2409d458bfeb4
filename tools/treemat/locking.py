"""Advisory file locks (fcntl.flock) for state shared between treemat processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class LockBusy(Exception):
    """A non-blocking lock attempt found the lock held by someone else."""


@contextlib.contextmanager
def file_lock(
    path: Path, *, shared: bool = False, blocking: bool = True, timeout: float | None = None
) -> Iterator[None]:
    """Hold a flock on `path` (created if missing) for the duration of the `with` block.

    `shared=True` takes a reader lock; several processes may hold it at once. With `blocking=False`
    a held lock raises LockBusy instead of waiting; with a `timeout`, once it held that many seconds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if not blocking or timeout is not None:
            operation |= fcntl.LOCK_NB
        deadline = time.monotonic() + (timeout or 0.0)
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, operation)
                break
            except BlockingIOError as exc:
                if not blocking or time.monotonic() >= deadline:
                    raise LockBusy(str(path)) from exc
            time.sleep(pause)  # polled: flock has no timeout (a holder that hangs must not hang us)
            pause = min(pause * 2, 0.05)
        yield
    finally:
        os.close(fd)


class ForkGate:
    """Keeps a process from forking while a CAS ingest holds a writable descriptor (many ingests, one fork).

    A child forked in that window inherits the descriptor until it execs (O_CLOEXEC only closes it then), so the
    descriptor's last close, and its IN_CLOSE_WRITE event, could land after the blob is published and watched:
    a write that never happened. Ingests hold the gate shared from creating their temp file until its writable
    descriptor is closed; tool launches hold it exclusively until the child has exec'd.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._writers = 0
        self._forking = False
        self._waiting_forks = 0  # a waiting fork holds new ingests back, so a stream of ingests cannot starve it

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Held around a writable temp descriptor's life."""
        with self._condition:
            while self._forking or self._waiting_forks:
                self._condition.wait()
            self._writers += 1
        try:
            yield
        finally:
            with self._condition:
                self._writers -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def forking(self) -> Iterator[None]:
        """Held around fork + exec of a child process."""
        with self._condition:
            self._waiting_forks += 1
            while self._forking or self._writers:
                self._condition.wait()
            self._waiting_forks -= 1
            self._forking = True
        try:
            yield
        finally:
            with self._condition:
                self._forking = False
                self._condition.notify_all()
