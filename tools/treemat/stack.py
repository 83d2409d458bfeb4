"""The one place that wires treemat's layers: CAS -> guard -> backends -> materializer -> dircache -> executor.

Every entry point (the worker, the CLI commands, replay, the bot, benchmarks, tests) makes the root's `Root`
once and opens the stack over it with `with open_stack(layout) as stack:`, so the choice of isolation and
placement methods is made, and reported, the same way everywhere, and the ledger is flushed at exit.
No collaborator defaults another: what a constructor needs, this module hands it.

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

import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
    from treemat.housekeeping import Housekeeper
    from treemat.materializer import Materializer
    from treemat.toolrun import ToolRunner
    from treemat.treeclone import TreeCloner
    from treemat.writewatch import WriteWatch

DEFAULT_DIRCACHE_MIN_FILES = 64  # = dircache.MIN_SUBTREE_FILES, measured there (not imported: start-up cost)
ISOLATION_CHOICES = ("auto", ISOLATION_OVERLAY, ISOLATION_COW, ISOLATION_NONE)
__all__ = ["ISOLATION_COW", "ISOLATION_NONE", "ISOLATION_OVERLAY", "Stack", "Store", "open_stack", "open_store"]


class Store:
    """The bottom of the stack: the root's CAS and its counters, with no sandbox helper, guard or watcher.

    What `treemat cas ...` and the storage benchmarks need; `open_stack` builds its CAS and materializer here too,
    so there is one wiring.
    """

    def __init__(self, layout: Root, *, counters: Counters | None = None) -> None:
        self.layout = layout
        self.counters = counters if counters is not None else Counters()
        self.cas = ContentStore(layout, counters=self.counters)

    def materializer(
        self, prefer: Sequence[Method], *, measure: bool, concurrency: int | None = None
    ) -> tuple[BackendProbe, Materializer]:
        """A placement probe trying `prefer` in order (timing each method when `measure`) and its materializer."""
        from treemat.backends import BackendProbe
        from treemat.materializer import Materializer

        probe = BackendProbe(prefer=prefer, measure=measure)
        return probe, Materializer(self.cas, probe, counters=self.counters, concurrency=concurrency)


@contextmanager
def open_store(layout: Root, *, counters: Counters | None = None) -> Iterator[Store]:
    """Open only the CAS of `layout` (no sandbox helper): for commands that stage nothing and run no tool."""
    yield Store(layout, counters=counters)


class Stack:
    """Every layer of one treemat process, wired; a context manager (closing it flushes the ledger).

    The executor is built on first use: a process that only stages and runs tools by hand (the bot) has none.
    """

    def __init__(
        self,
        *,
        store: Store,
        watch: WriteWatch,
        guard: BlobGuard,
        budget: StoreBudget,
        probe: BackendProbe,
        materializer: Materializer,
        dircache: DirectoryCache,
        sandbox: Sandbox,
        runner: ToolRunner,
        housekeeper: Housekeeper,
        build_executor: Callable[[Stack], ActionExecutor],
    ) -> None:
        self.store = store
        self.layout = store.layout
        self.root = store.layout.path
        self.counters = store.counters
        self.cas = store.cas
        self.watch = watch
        self.guard = guard
        self.budget = budget
        self.probe = probe
        self.materializer = materializer
        self.dircache = dircache
        self.sandbox = sandbox
        self.runner = runner
        self.housekeeper = housekeeper
        self._build_executor = build_executor
        self._executor: ActionExecutor | None = None
        self._executor_lock = threading.Lock()

    @property
    def executor(self) -> ActionExecutor:
        """The action executor (with its input stager and exec-dir pool), built on first use."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = self._build_executor(self)
            return self._executor

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
        """Let queued removals finish, remove pooled exec dirs, flush the ledger, stop the sandbox helper."""
        try:
            if self._executor is not None:
                self._executor.close()
            else:
                self.housekeeper.flush()
        finally:
            self.guard.close()
            self.watch.close()
            self.sandbox.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _sandbox_for(layout: Root, want: str) -> Sandbox:
    """The sandbox for `want`; where none works (and `none` was not asked for), one that refuses every tool."""
    if want not in ISOLATION_CHOICES:
        raise ValueError(f"unknown isolation {want!r} (choose from {', '.join(ISOLATION_CHOICES)})")
    try:
        return open_sandbox(layout, want)
    except SandboxUnavailable as exc:
        if want != "auto":
            raise
        return refusing_sandbox(str(exc))


GIL_SWITCH_SECONDS = 0.0005  # a serving process's thread switch interval (Python's default: 0.005)


def favour_syscall_threads() -> None:
    """Switch threads every 0.5 ms, not every 5 ms: a request whose staging is syscalls (inotify watches, lstat,
    links: each releases the GIL) beside a request doing Python work waited up to 5 ms for the GIL after every
    call (a new execroot's 64-input first check: 0.9 ms alone, 170-290 ms beside one busy thread, 19-26 ms at 0.5
    ms). For the processes that serve concurrent requests: the service, the in-process worker, the bot."""
    sys.setswitchinterval(GIL_SWITCH_SECONDS)


def open_stack(
    layout: Root,
    *,
    counters: Counters | None = None,
    prefer: Sequence[Method] | None = None,
    concurrency: int | None = None,
    dircache_min_files: int | None = DEFAULT_DIRCACHE_MIN_FILES,
    isolation: str = "auto",
    keep_exec_dirs: bool = False,
    background_cleanup: bool = True,
    max_bytes: int | None = None,
    pool_size: int | None = None,
    cloner: TreeCloner | None = None,
) -> Stack:
    """Wire every layer over the treemat root `layout`; close the stack (or use `with`).

    `isolation` is auto | overlay | copy-on-write | none: an explicit mode that does not work here is an error;
    `auto` that finds no sandbox gives a stack whose actions all fail with the reason. `cloner` replaces the
    directory cache's snapshot maker (a benchmark times it).
    """
    store = Store(layout, counters=counters)
    counters, cas = store.counters, store.cas
    sandbox = _sandbox_for(layout, isolation)
    try:
        from treemat.backends import DEFAULT_ORDER, Method
        from treemat.blobguard import BlobGuard
        from treemat.budget import StoreBudget, default_budget
        from treemat.dircache import DirectoryCache
        from treemat.housekeeping import Housekeeper
        from treemat.ledger import VerifiedLedger
        from treemat.toolrun import ToolRunner
        from treemat.treeclone import KernelTreeCloner
        from treemat.writewatch import WriteWatch

        watch = WriteWatch()
    except BaseException:
        sandbox.close()
        raise
    try:
        guard = BlobGuard(cas, watch, counters=counters, ledger=VerifiedLedger(layout.verified))
        budget = StoreBudget(
            cas, max_bytes if max_bytes is not None else default_budget(layout.path), counters=counters
        )
    except BaseException:
        watch.close()
        sandbox.close()
        raise
    order = list(prefer) if prefer else list(DEFAULT_ORDER)
    if not sandbox.overlay:
        order = [method for method in order if method is not Method.HARDLINK] or [Method.COPY]
    elif dircache_min_files == DEFAULT_DIRCACHE_MIN_FILES:
        # with the overlay, exec dirs are reused (O(changed)): the directory cache would only make first
        # stagings cheaper, at a snapshot per subtree, and its snapshots would keep dirs out of the pool
        dircache_min_files = None
    probe, materializer = store.materializer(order, measure=not prefer, concurrency=concurrency)
    dircache = DirectoryCache(
        layout.dircache,
        materializer,
        counters=counters,
        cloner=cloner or KernelTreeCloner(),
        min_files=dircache_min_files,
    )

    def build_executor(stack: Stack) -> ActionExecutor:
        from treemat.execpool import DEFAULT_POOL_SIZE, ExecDirPool
        from treemat.executor import ActionExecutor
        from treemat.inputs import InputStager
        from treemat.toolcache import ToolCaches

        size = DEFAULT_POOL_SIZE if pool_size is None else pool_size
        # exec-dir reuse needs the overlay: there the staged tree is untouched by the tool
        pool = None
        if stack.sandbox.overlay and size > 0:
            pool = ExecDirPool(stack.cas, stack.guard, stack.watch, dispose=stack.housekeeper.dispose, size=size)
        return ActionExecutor(
            layout=layout,
            cas=stack.cas,
            guard=stack.guard,
            inputs=InputStager(stack.cas, stack.guard, counters=counters, pooled=pool is not None),
            dircache=stack.dircache,
            pool=pool,
            sandbox=stack.sandbox,
            runner=stack.runner,
            tool_caches=ToolCaches(layout.tool_cache, stack.sandbox),
            housekeeper=stack.housekeeper,
            budget=stack.budget,
            counters=counters,
            keep_exec_dirs=keep_exec_dirs,
        )

    return Stack(
        store=store,
        watch=watch,
        guard=guard,
        budget=budget,
        probe=probe,
        materializer=materializer,
        dircache=dircache,
        sandbox=sandbox,
        runner=ToolRunner(sandbox, cas.fork_gate),
        housekeeper=Housekeeper(layout.exec, guard, background=background_cleanup),
        build_executor=build_executor,
    )
