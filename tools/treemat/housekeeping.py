"""The work that must not delay a response: removing exec dirs, refreshing the ledger, LRU atimes, the budget.

One `Housekeeper` per process (open_stack makes it), shared by the executor, the exec-dir pool and the bot.
Its one thread runs queued jobs in order; an error in a job is a lost optimisation, never a lost action.
At start it sweeps the exec dirs of dead processes out of `<root>/exec` (off the start-up path).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from treemat.blobguard import BlobGuard
from treemat.blobstate import BlobKey
from treemat.errors import TreematError
from treemat.fsprims import remove_tree, sweep_dead_owners


class Housekeeper:
    """Background removals under `exec_base`; inline (no thread) when `background` is False, as in tests."""

    def __init__(self, exec_base: Path, guard: BlobGuard, *, background: bool = True) -> None:
        self.exec_base = exec_base
        self.guard = guard
        self._queue: queue.SimpleQueue[Callable[[], object]] | None = None
        if background:
            self._queue = queue.SimpleQueue()
            threading.Thread(target=self._run, name="treemat-background", daemon=True).start()
        self.later(lambda: sweep_dead_owners(exec_base))  # exec dirs of dead workers

    def later(self, job: Callable[[], object]) -> None:
        """Run `job` on the background thread (inline when there is none)."""
        if self._queue is None:
            job()
        else:
            self._queue.put(job)

    def dispose(self, path: Path, blobs: Iterable[BlobKey] = ()) -> None:
        """Remove a directory tree in the background; `blobs` it hardlinked get their new state recorded after."""
        if not (path.exists() or path.is_symlink()):
            return
        keys = list(blobs)
        graveyard = self.exec_base / f".trash-{path.name}-{os.urandom(3).hex()}"
        try:
            os.rename(path, graveyard)
        except OSError:
            graveyard = path

        def remove() -> None:
            remove_tree(graveyard)
            if keys:
                self.guard.refresh(keys)

        self.later(remove)

    def flush(self) -> None:
        """Wait until every job queued so far has run."""
        if self._queue is None:
            return
        done = threading.Event()
        self._queue.put(done.set)
        done.wait()

    def _run(self) -> None:
        assert self._queue is not None
        while True:
            job = self._queue.get()
            with contextlib.suppress(TreematError, OSError):
                job()
