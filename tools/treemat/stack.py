"""The one place that wires treemat's layers: CAS -> guard -> backends -> materializer -> dircache -> executor.

Every entry point (the worker, the CLI commands, replay, benchmarks, tests) calls `open_stack`, so the choice
of isolation and placement methods is made, and reported, the same way everywhere.

Every tool runs in the sandbox (sandbox.py), chosen here by what actually works on this machine (see
docs/hermeticity.md):
- `overlay`: namespaces + overlayfs: hardlinked inputs (a write copies up), exec dirs reused;
- `copy-on-write`: namespaces without overlayfs: hardlinks are never used; reflink / clonefile / btrfs snapshots
  where the filesystem has them, a copy otherwise;
- `none`: only when asked for: no sandbox, no hardlinks (reported by `probe`, `stats` and every action's counters).
Where no sandbox works and `none` was not asked for, the stack still opens, and every action fails with the
kernel's reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.layout import Root
from treemat.sandbox import (
    ISOLATION_COW,
    ISOLATION_NONE,
    ISOLATION_OVERLAY,
    Sandbox,
    SandboxUnavailable,
    open_sandbox,
    refusing_sandbox,
)

if TYPE_CHECKING:  # imported by open_stack, after the sandbox has started
    from treemat.backends import BackendProbe, Method
    from treemat.blobguard import BlobGuard
    from treemat.budget import StoreBudget
    from treemat.dircache import DirectoryCache
    from treemat.executor import ActionExecutor
    from treemat.materializer import Materializer

DEFAULT_DIRCACHE_MIN_FILES = 64  # = dircache.MIN_SUBTREE_FILES, measured there (not imported: start-up cost)
ISOLATION_CHOICES = ("auto", ISOLATION_OVERLAY, ISOLATION_COW, ISOLATION_NONE)
__all__ = ["ISOLATION_COW", "ISOLATION_NONE", "ISOLATION_OVERLAY", "Stack", "open_stack"]


@dataclass(slots=True)
class Stack:
    """Every layer of one treemat process, wired; a context manager (closing it flushes the ledger)."""

    root: Path
    layout: Root
    counters: Counters
    cas: ContentStore
    guard: BlobGuard
    budget: StoreBudget
    probe: BackendProbe
    materializer: Materializer
    dircache: DirectoryCache
    sandbox: Sandbox
    executor: ActionExecutor

    @property
    def isolation(self) -> str:
        """overlay | copy-on-write | none | unavailable."""
        return self.sandbox.mode

    @property
    def isolation_detail(self) -> str:
        """Why this isolation (the kernel's refusal, when there is one)."""
        return self.sandbox.reason or {
            ISOLATION_OVERLAY: "user+mount+pid namespaces, overlayfs: hardlinks",
            ISOLATION_COW: "user+mount+pid namespaces, no overlayfs here: no hardlinks",
            ISOLATION_NONE: "asked for: tools run UNSANDBOXED, no hardlinks",
        }.get(self.sandbox.mode, "")

    def describe(self) -> dict[str, object]:
        """What `treemat stats` / `probe` show about the choices made."""
        return {
            "isolation": self.isolation,
            "isolation_detail": self.isolation_detail,
            **self.guard.describe(),
            "methods": [method.value for method in self.probe.order],
            "method_timings_us": dict(self.probe.timings),
            **self.dircache.describe(),
            "cas_budget_bytes": self.budget.max_bytes,
            "cas_estimated_bytes": self.budget.state().estimated_bytes,
        }

    def close(self) -> None:
        """Remove pooled exec dirs, flush the ledger, stop the sandbox helper, release descriptors."""
        try:
            self.executor.close()
        finally:
            self.guard.close()
            self.sandbox.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _sandbox_for(root: Path, want: str) -> Sandbox:
    """The sandbox for `want`; where none works (and `none` was not asked for), one that refuses every tool."""
    if want not in ISOLATION_CHOICES:
        raise ValueError(f"unknown isolation {want!r} (choose from {', '.join(ISOLATION_CHOICES)})")
    try:
        return open_sandbox(root, want)
    except SandboxUnavailable as exc:
        if want != "auto":
            raise
        return refusing_sandbox(str(exc))


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
    """Open (creating if needed) the treemat root and wire every layer over it; close it (or use `with`).

    `isolation` is auto | overlay | copy-on-write | none: an explicit mode that does not work here is an error;
    `auto` that finds no sandbox gives a stack whose actions all fail with the reason.
    """
    layout = Root(root, group_shared=group_shared)
    root = layout.path
    counters = counters if counters is not None else Counters()
    cas = ContentStore(root, counters=counters, group_shared=group_shared)
    sandbox = _sandbox_for(root, isolation)
    try:
        from treemat.backends import DEFAULT_ORDER, BackendProbe, Method
        from treemat.blobguard import BlobGuard
        from treemat.budget import StoreBudget, default_budget
        from treemat.dircache import DirectoryCache, KernelTreeCloner
        from treemat.executor import ActionExecutor
        from treemat.ledger import VerifiedLedger
        from treemat.materializer import Materializer
        from treemat.toolcache import ToolCaches

        guard = BlobGuard(cas, counters=counters, ledger=VerifiedLedger(layout.verified))
        budget = StoreBudget(cas, max_bytes if max_bytes is not None else default_budget(root), counters=counters)
    except BaseException:
        sandbox.close()
        raise
    order = list(prefer) if prefer else list(DEFAULT_ORDER)
    if not sandbox.overlay:
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
        sandbox=sandbox,
        guard=guard,
        tool_caches=ToolCaches(layout.tool_cache, sandbox),
        layout=layout,
        budget=budget,
        counters=counters,
        keep_exec_dirs=keep_exec_dirs,
        background_cleanup=background_cleanup,
    )
    return Stack(
        root=root,
        layout=layout,
        counters=counters,
        cas=cas,
        guard=guard,
        budget=budget,
        probe=probe,
        materializer=materializer,
        dircache=dircache,
        sandbox=sandbox,
        executor=executor,
    )
