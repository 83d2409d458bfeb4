"""One action end to end: inputs (inputs.py) -> run (toolrun.py, in sandbox.py) -> outputs (outputs.py).

Every tool runs in the sandbox (unless `--isolation=none` was asked for): its exec dir at EXEC_ROOT, read-only
everywhere else but its private /tmp and its per-action tool cache (toolcache.py), TREEMAT_ROOT hidden, and no
process of it outlives the action. Hardlinked inputs are only used under the overlay, where a write copies up
into the run's private upper layer. A write to a blob from anywhere else is caught by the blob guard, and every
action that had that blob staged fails instead of reporting success. Where the guard lost its signal for a blob
an action staged (no live watch, a queue overflow), that blob is hashed again before the result is returned
(`BlobGuard.recheck`): wrong bytes, or an inode that cannot be found, fail the action. Outputs are copied out of
the tool's view by descriptor (outputs.py). Finished exec dirs go back to the pool (execpool.py) or are removed
in the background, where LRU atimes and the store's size budget are also kept.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from treemat.action import ActionRequest, ActionResult, RequestInput
from treemat.blobguard import BlobGuard, GuardMark, StagedBlobs
from treemat.budget import StoreBudget
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.dircache import DirectoryCache
from treemat.errors import ExecutionError, TreematError
from treemat.execpool import DEFAULT_POOL_SIZE, NO_BLOB, ExecDirPool, PooledDir
from treemat.flagfile import ActionSpec
from treemat.fsprims import remove_tree, sweep_dead_owners
from treemat.inputs import InputStager
from treemat.layout import Root
from treemat.outputs import OutputView, collect_outputs
from treemat.sandbox import EXEC_ROOT, TOOL_CACHE, RunDir, Sandbox, ToolPlan, environment
from treemat.toolcache import ToolCaches
from treemat.toolrun import ToolRunner
from treemat.tree import normalize_path

__all__ = ["ActionExecutor", "ActionRequest", "ActionResult", "RequestInput"]


class _Background:
    """One thread for the work that must not delay a response: removals, LRU atimes, the size budget, the ledger."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="treemat-background", daemon=True)
        self._thread.start()

    def put(self, job: Callable[[], object]) -> None:
        """Queue a job; errors in it are a lost optimisation, never a lost action."""
        self._queue.put(job)

    def flush(self) -> None:
        """Wait until every job queued so far has run."""
        done = threading.Event()
        self._queue.put(done.set)
        done.wait()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            with contextlib.suppress(TreematError, OSError):
                job()


class ActionExecutor:
    """Runs actions in private exec dirs under `<root>/exec`; safe to call from several threads."""

    def __init__(
        self,
        root: Path,
        cas: ContentStore,
        dircache: DirectoryCache,
        *,
        sandbox: Sandbox,
        guard: BlobGuard | None = None,
        tool_caches: ToolCaches | None = None,
        layout: Root | None = None,
        budget: StoreBudget | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        counters: Counters | None = None,
        keep_exec_dirs: bool = False,
        background_cleanup: bool = True,
    ) -> None:
        self.root = Path(root)
        self.layout = layout
        self.cas = cas
        self.dircache = dircache
        self.counters = counters if counters is not None else cas.counters
        self.guard = guard if guard is not None else BlobGuard(cas, counters=self.counters)
        self.sandbox = sandbox
        self.budget = budget
        # exec-dir reuse needs the overlay: there the staged tree is untouched by the tool
        self.pool = ExecDirPool(cas, self.guard, size=pool_size) if sandbox.overlay and pool_size > 0 else None
        self.inputs = InputStager(
            cas, self.guard, dircache, self.pool, counters=self.counters, dispose=self._dispose_path
        )
        self.runner = ToolRunner(sandbox, cas.fork_gate)
        self.keep_exec_dirs = keep_exec_dirs
        self.exec_base = self.root / "exec"
        self.exec_base.mkdir(parents=True, exist_ok=True)
        self.tool_caches = tool_caches if tool_caches is not None else ToolCaches(self.root / "tool-cache", None)
        self.recent: collections.deque[dict[str, object]] = collections.deque(maxlen=20)
        self._background = _Background() if background_cleanup else None
        self._later(lambda: sweep_dead_owners(self.exec_base))  # exec dirs of dead workers, off the start-up path

    # ----------------------------------------------------------------------------- public

    def execute(self, request: ActionRequest) -> ActionResult:
        """Run one action; errors a user can cause come back as a failed ActionResult, never an exception."""
        started = time.perf_counter()
        exec_dir = self.exec_base / f"{os.getpid()}-{request.request_id}-{secrets.token_hex(4)}"
        result: ActionResult
        pooled: PooledDir | None = None
        run_dir: RunDir | None = None
        relinked: list[tuple[str, bool]] = []
        try:
            if self.layout is not None:
                self.layout.ensure()  # a user may have deleted cas/, tmp/ or exec/ under us: made again, one mkdir each
            self.guard.poll()
            mark = self.guard.mark()
            with self.cas.in_use():
                pooled, stage = self.inputs.stage_reused(request)
                relinked = list(stage.hardlinked)
                if pooled is not None:
                    exec_dir = pooled.path
                    staged: StagedBlobs | None = None
                else:
                    fresh = self.inputs.stage_fresh(request, exec_dir)
                    staged, stage = fresh.staged, fresh.report
                    relinked = list(stage.hardlinked)
            stage_seconds = time.perf_counter() - started
            self._prepare_outputs(request.spec, exec_dir)
            if stage.hardlinked and not self.sandbox.overlay:
                raise ExecutionError(
                    f"{len(stage.hardlinked)} input(s) were hardlinked but the sandbox has no overlay: refusing to "
                    "let the tool reach CAS inodes (this is a wiring bug: use treemat.stack.open_stack)"
                )
            if pooled is None and self.pool is not None and staged is not None:
                pooled = self.inputs.pooled_from_fresh(request, exec_dir, fresh)
            if pooled is not None:
                pooled.mark = mark  # anything that happened to the guard since is checked on its next reuse
            self.counters.add(f"actions_isolation_{self.sandbox.mode}")
            if self.sandbox.in_place:  # no mount namespace: the tool's /tmp and cache are dirs on disk
                run_dir = RunDir(self.exec_base / f"{exec_dir.name}.run-{secrets.token_hex(3)}")
                run_dir.create()
            result = self._run_tool(request, exec_dir, run_dir)
            result.stage, result.stage_seconds = stage, stage_seconds
            self._check_integrity(staged, pooled, exec_dir, mark, result)
        except TreematError as exc:
            result = ActionResult(exit_code=1, output=f"treemat: error: {exc}\n")
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            result = ActionResult(exit_code=1, output=f"treemat: error: {exc.strerror or exc}{where}\n")
        finally:
            self._finish(exec_dir, pooled, relinked, run_dir)
        self.counters.add("actions")
        if result.exit_code != 0:
            self.counters.add("action_failures")
        self.recent.append(result.summary(request.spec.argv[0] if request.spec.argv else "?", len(request.inputs)))
        return result

    def close(self) -> None:
        """Remove the pooled exec dirs (they pin their blobs against gc while kept); let queued removals finish."""
        if self._background is not None:
            self._background.flush()  # before the guard closes: a removal refreshes the ledger through it
        if self.pool is not None:
            for entry in self.pool.drain():
                self.pool.forget(entry)
                remove_tree(entry.path)
                self.guard.refresh(entry.keys())

    def dispose(self, path: Path, blobs: Iterable[tuple[str, bool]] = ()) -> None:
        """Remove an exec or run dir of this root in the background (`blobs` it hardlinked: ledger refreshed after)."""
        self._dispose_path(path, blobs)

    def cancel(self, request_id: int) -> bool:
        """Kill the running tool of `request_id` (or make it never start). True if it was in flight."""
        return self.runner.cancel(request_id)

    # ----------------------------------------------------------------------------- running

    def _prepare_outputs(self, spec: ActionSpec, exec_dir: Path) -> None:
        for output in spec.outputs:
            (exec_dir / normalize_path(output)).parent.mkdir(parents=True, exist_ok=True)
        for output_dir in spec.output_dirs:
            (exec_dir / normalize_path(output_dir)).mkdir(parents=True, exist_ok=True)

    def _run_tool(self, request: ActionRequest, exec_dir: Path, run_dir: RunDir | None) -> ActionResult:
        """Run the tool in the sandbox, then (if it succeeded) copy its outputs out of its view."""
        spec = request.spec
        cache = self.tool_caches.for_argv(spec.argv, self.sandbox)
        if run_dir is not None:
            argv = spec.argv_in(str(exec_dir), str(run_dir.cache))
            env = environment(os.environ, spec.env, exec_root=str(exec_dir), tmp=str(run_dir.tmp))
        else:
            argv = spec.argv_in(EXEC_ROOT, TOOL_CACHE)
            env = environment(os.environ, spec.env)
        plan = ToolPlan(argv, env, exec_dir, run_dir, overlay=self.sandbox.overlay, cache=cache)
        outcome = self.runner.run(request.request_id, plan)
        result = ActionResult(
            exit_code=outcome.exit_code,
            output=outcome.output,
            tool_seconds=outcome.seconds,
            cancelled=outcome.cancelled,
        )
        if outcome.view_fd < 0:
            return result
        try:
            if result.exit_code == 0 and not result.cancelled:
                prefixes = [str(exec_dir)] if self.sandbox.in_place else [EXEC_ROOT, str(exec_dir)]
                self._collect_outputs(request, OutputView(outcome.view_fd, prefixes), result)
        finally:
            os.close(outcome.view_fd)
        return result

    # ----------------------------------------------------------------------------- outputs

    def _collect_outputs(self, request: ActionRequest, view: OutputView, result: ActionResult) -> None:
        outputs = [*request.spec.outputs, *request.spec.output_dirs]
        execroot_fd = os.open(request.execroot, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            missing = collect_outputs(outputs, view, execroot_fd)
        finally:
            os.close(execroot_fd)
        if missing:
            result.exit_code = 1
            result.output += f"treemat: error: the tool did not create declared output(s): {', '.join(missing)}\n"

    def _check_integrity(
        self,
        staged: StagedBlobs | None,
        pooled: PooledDir | None,
        exec_dir: Path,
        mark: GuardMark,
        result: ActionResult,
    ) -> None:
        """Fail the action if any blob it had staged was written to (from anywhere) while it ran.

        With a live watch on every blob since before staging, that is one poll. Otherwise (the guard's mark
        moved: unwatched blobs, lost watches, a queue overflow) every staged blob the guard does not trust now is
        hashed again first; a blob that cannot be found to hash fails the action too.
        """
        hit = self.guard.poll()
        if hit:
            self.inputs.forget(hit)
        if self.guard.mark() == mark:
            return  # no taint, and every staged blob was under a live watch throughout
        blobs: StagedBlobs = dict(staged or {})
        if pooled is not None:
            blobs.update((f.identity, (path, f.key())) for path, f in pooled.files.items() if f.identity != NO_BLOB)
        if result.exit_code == 0 and not result.cancelled:
            unverified = self.guard.recheck(blobs, str(exec_dir))
            if unverified:
                result.exit_code = 1
                result.output += (
                    f"treemat: error: input(s) {', '.join(repr(name) for name in sorted(unverified)[:5])} lost their "
                    "write watch and could not be hashed again after the action ran; failing rather than return a "
                    f"result built from unverified bytes (guard: {self.guard.describe()['write_watch_detail']})\n"
                )
            hit = self.guard.poll()
            if hit:
                self.inputs.forget(hit)
        if not blobs or not self.guard.tainted(set(blobs)):
            return
        hits = sorted((path, identity) for identity, (path, _key) in blobs.items() if self.guard.tainted({identity}))
        names = [path for path, _identity in hits]
        result.quarantined.extend(names)
        result.exit_code = result.exit_code or 1
        result.output += (
            f"treemat: error: input(s) {', '.join(repr(name) for name in names[:5])} were modified in the CAS while "
            "the action ran; the blobs were quarantined and the action failed rather than return a result built "
            f"from unknown bytes (rerun the build); {self.guard.taint_reasons.get(hits[0][1], '')}\n"
        )

    def _finish(
        self, exec_dir: Path, pooled: PooledDir | None, relinked: list[tuple[str, bool]], run_dir: RunDir | None
    ) -> None:
        """After an action: return a reusable exec dir to the pool (dropping the tool's writes), else remove it.

        Our links moved the ctime of the blobs they touched: the ledger is brought up to date in the background.
        """
        self._later(self._upkeep)
        if relinked:
            self._later(lambda: self.guard.refresh(relinked))
        if self.keep_exec_dirs:
            return
        if run_dir is not None:
            self._dispose_path(run_dir.path)
        if pooled is None or self.pool is None:
            self._dispose_path(exec_dir, relinked)
            return
        if pooled.dirty:  # changed behind our back during the action: not worth keeping
            self._later(functools.partial(self._retire, pooled))
            return
        for evicted in self.pool.release(pooled):
            self._later(functools.partial(self._retire, evicted))

    def _retire(self, entry: PooledDir) -> None:
        """A dir leaving the pool (background): stop watching its directories (one syscall each), remove it."""
        assert self.pool is not None
        self.pool.forget(entry)
        self._dispose_path(entry.path, entry.keys())

    def _upkeep(self) -> None:
        """LRU atimes and the size budget."""
        self.cas.flush_touches()
        if self.budget is not None:
            self.budget.maybe_collect()

    def _later(self, job: Callable[[], object]) -> None:
        """Run `job` on the background thread (inline when there is none, as in tests)."""
        if self._background is None:
            job()
        else:
            self._background.put(job)

    def _dispose_path(self, path: Path, blobs: Iterable[tuple[str, bool]] = ()) -> None:
        """Remove a directory tree in the background; `blobs` it linked get their new state recorded after."""
        if not (path.exists() or path.is_symlink()):
            return
        keys = list(blobs)
        graveyard = self.exec_base / f".trash-{path.name}-{secrets.token_hex(3)}"
        try:
            os.rename(path, graveyard)
        except OSError:
            graveyard = path

        def remove() -> None:
            remove_tree(graveyard)
            if keys:
                self.guard.refresh(keys)

        self._later(remove)
