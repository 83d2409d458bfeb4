"""The one place that wires treemat's layers: CAS -> guard -> backends -> materializer -> dircache -> executor.

Every entry point (the worker, the CLI commands, replay, benchmarks, tests) calls `open_stack`, so the choice
of isolation and placement methods is made, and reported, the same way everywhere.

Isolation is chosen here, by what actually works on this machine (see docs/hermeticity.md):
- `overlay`: hardlinked inputs, the tool in user+mount+pid namespaces over an overlayfs (sandbox.py);
- `copy-on-write`: no working sandbox, so hardlinks are never used; reflink / clonefile / btrfs snapshots where
  the filesystem has them, a copy otherwise. Either way no tool can write a CAS inode through its inputs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from treemat.cas import ContentStore, prepare_root
from treemat.counters import Counters
from treemat.sandbox import OverlaySandbox, SandboxProbe

if TYPE_CHECKING:  # imported by open_stack, while the sandbox probe runs (see PendingIsolation)
    from treemat.backends import BackendProbe, Method
    from treemat.blobguard import BlobGuard
    from treemat.budget import StoreBudget
    from treemat.dircache import DirectoryCache
    from treemat.executor import ActionExecutor
    from treemat.materializer import Materializer

DEFAULT_DIRCACHE_MIN_FILES = 64  # = dircache.MIN_SUBTREE_FILES, measured there (not imported: start-up cost)
ISOLATION_OVERLAY = "overlay"
ISOLATION_COW = "copy-on-write"


def default_root() -> Path:
    """`$TREEMAT_ROOT`, else `$XDG_CACHE_HOME/treemat`, else `~/.cache/treemat`."""
    explicit = os.environ.get("TREEMAT_ROOT")
    if explicit:
        return Path(explicit).expanduser().absolute()
    cache = os.environ.get("XDG_CACHE_HOME")
    return ((Path(cache) if cache else Path.home() / ".cache") / "treemat").absolute()


@dataclass(slots=True)
class Stack:
    """Every layer of one treemat process, wired."""

    root: Path
    counters: Counters
    cas: ContentStore
    guard: BlobGuard
    budget: StoreBudget
    probe: BackendProbe
    materializer: Materializer
    dircache: DirectoryCache
    executor: ActionExecutor
    isolation: str
    isolation_detail: str

    def describe(self) -> dict[str, object]:
        """What `treemat stats` / `probe` show about the choices made."""
        return {
            "isolation": self.isolation,
            "isolation_detail": self.isolation_detail,
            "write_watch": "inotify" if self.guard.watching else "hash on first use",
            "methods": [method.value for method in self.probe.order],
            "method_timings_us": dict(self.probe.timings),
            **self.dircache.describe(),
            "cas_budget_bytes": self.budget.max_bytes,
            "cas_estimated_bytes": self.budget.state().estimated_bytes,
        }

    def close(self) -> None:
        """Remove pooled exec dirs and release descriptors (the guard's inotify instance)."""
        self.executor.close()
        self.guard.close()


class PendingIsolation:
    """The isolation choice, started (the sandbox probe forked) now and decided by `result()`.

    The probe's tool runs in child processes for tens of milliseconds: started before the other layers are
    imported and built, it costs a worker's start-up almost nothing. `result()` waits for it.
    """

    def __init__(self, root: Path, *, want: str = "auto") -> None:
        self.want = want
        self._probe = None if want == ISOLATION_COW else SandboxProbe(root)

    def result(self) -> tuple[OverlaySandbox | None, str, str]:
        """(sandbox or None, isolation name, why); OSError if `overlay` was asked for and does not work."""
        if self._probe is None:
            return None, ISOLATION_COW, "asked for (no hardlinks)"
        sandbox, reason = self._probe.result()
        if sandbox is not None:
            return sandbox, ISOLATION_OVERLAY, reason
        if self.want == ISOLATION_OVERLAY:
            raise OSError(f"overlay isolation was asked for but does not work here: {reason}")
        return None, ISOLATION_COW, f"no hardlinks: {reason}"


def choose_isolation(root: Path, *, want: str = "auto") -> tuple[OverlaySandbox | None, str, str]:
    """(sandbox or None, isolation name, why) for `want` in auto | overlay | copy-on-write."""
    return PendingIsolation(root, want=want).result()


def open_stack(
    root: Path,
    *,
    counters: Counters | None = None,
    prefer: Sequence[Method] | None = None,
    concurrency: int | None = None,
    dircache_min_files: int | None = DEFAULT_DIRCACHE_MIN_FILES,
    isolation: str = "auto",
    group_shared: bool = False,
    keep_exec_dirs: bool = False,
    background_cleanup: bool = True,
    max_bytes: int | None = None,
) -> Stack:
    """Open (creating if needed) the treemat root and wire every layer over it.

    The isolation probe starts as soon as the root exists and runs while the other layers are imported and
    built; it is joined before the placement methods are chosen, so no stager exists until it has finished.
    """
    root = prepare_root(Path(root).absolute(), group_shared=group_shared)
    counters = counters if counters is not None else Counters()
    cas = ContentStore(root, counters=counters, group_shared=group_shared)  # creates tmp/, where the probe runs
    pending_isolation = PendingIsolation(root, want=isolation)
    try:
        # Imported here, while the probe's tool runs (a worker's start-up cost): `import treemat.stack` is light.
        from treemat.backends import DEFAULT_ORDER, BackendProbe, Method
        from treemat.blobguard import BlobGuard, VerifiedLedger
        from treemat.budget import StoreBudget, default_budget
        from treemat.dircache import DirectoryCache, KernelTreeCloner
        from treemat.executor import ActionExecutor
        from treemat.materializer import Materializer

        guard = BlobGuard(cas, counters=counters, ledger=VerifiedLedger(root / "verified"))
        budget = StoreBudget(cas, max_bytes if max_bytes is not None else default_budget(root), counters=counters)
    except BaseException:
        with contextlib.suppress(Exception):
            pending_isolation.result()  # reap the probe and remove its scratch directory; the error above wins
        raise
    sandbox, isolation_name, detail = pending_isolation.result()
    order = list(prefer) if prefer else list(DEFAULT_ORDER)
    if sandbox is None:
        order = [method for method in order if method is not Method.HARDLINK] or [Method.COPY]
    elif dircache_min_files == DEFAULT_DIRCACHE_MIN_FILES:
        # with the overlay, exec dirs are reused (O(changed)): the directory cache would only make first
        # stagings cheaper, at a snapshot per subtree, and its snapshots would keep dirs out of the pool
        dircache_min_files = None
    probe = BackendProbe(prefer=order, measure=not prefer)
    materializer = Materializer(cas, probe, counters=counters, concurrency=concurrency)
    dircache = DirectoryCache(
        root, materializer, counters=counters, cloner=KernelTreeCloner(), min_files=dircache_min_files
    )
    executor = ActionExecutor(
        root,
        cas,
        dircache,
        guard=guard,
        sandbox=sandbox,
        budget=budget,
        counters=counters,
        keep_exec_dirs=keep_exec_dirs,
        background_cleanup=background_cleanup,
    )
    return Stack(
        root=root,
        counters=counters,
        cas=cas,
        guard=guard,
        budget=budget,
        probe=probe,
        materializer=materializer,
        dircache=dircache,
        executor=executor,
        isolation=isolation_name,
        isolation_detail=detail,
    )
