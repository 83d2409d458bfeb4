"""One action end to end: its exec dir prepared (pooled and patched, or staged afresh from inputs.py's tree) ->
run (toolrun.py, in sandbox.py) -> outputs (outputs.py).

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
import functools
import os
import time
from pathlib import Path

from treemat.action import ActionRequest, ActionResult, RequestInput
from treemat.blobguard import BlobGuard
from treemat.blobstate import NO_BLOB, BlobKey, GuardMark, StagedBlobs, StagedFile
from treemat.budget import StoreBudget
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.dircache import DirectoryCache
from treemat.errors import ExecutionError, MissingBlobError, TreematError
from treemat.execpool import ExecDirPool
from treemat.fsprims import remove_tree
from treemat.housekeeping import Housekeeper
from treemat.inputs import InputStager
from treemat.layout import Root
from treemat.outputs import OutputView, collect_outputs
from treemat.pooleddir import PooledDir
from treemat.sandbox import EXEC_ROOT, TOOL_CACHE, RunDir, Sandbox, ToolPlan, environment
from treemat.staging import StageReport
from treemat.toolcache import ToolCaches
from treemat.toolrun import ToolRunner
from treemat.tree import normalize_path

__all__ = ["ActionExecutor", "ActionRequest", "ActionResult", "PreparedDir", "RequestInput"]


class PreparedDir:
    """An exec dir ready for the tool: where it is, what it links, how it was staged.

    `staged` are the blob inodes staged afresh (identity -> (a path, its key)); `pooled` is its pool entry
    (reused, or adopted after a fresh staging), whose files are blob inodes too; `mark` is the guard's mark
    from before staging (a different mark later: check what it links).
    """

    __slots__ = ("mark", "path", "pooled", "report", "seconds", "staged")

    def __init__(
        self,
        path: Path,
        report: StageReport,
        mark: GuardMark,
        staged: StagedBlobs | None = None,
        pooled: PooledDir | None = None,
    ) -> None:
        self.path = path
        self.report = report
        self.mark = mark
        self.staged: StagedBlobs = {} if staged is None else staged
        self.pooled = pooled
        self.seconds = 0.0

    def blobs(self) -> StagedBlobs:
        """Every blob inode the dir links."""
        blobs = dict(self.staged)
        if self.pooled is not None:
            blobs.update(
                (f.identity, (path, f.key())) for path, f in self.pooled.files.items() if f.identity != NO_BLOB
            )
        return blobs


class ActionExecutor:
    """Runs actions in private exec dirs under `<root>/exec`; safe to call from several threads.

    Every collaborator comes from `open_stack` (stack.py), the one place that wires them.
    """

    def __init__(
        self,
        *,
        layout: Root,
        cas: ContentStore,
        guard: BlobGuard,
        inputs: InputStager,
        dircache: DirectoryCache,
        pool: ExecDirPool | None,
        sandbox: Sandbox,
        runner: ToolRunner,
        tool_caches: ToolCaches,
        housekeeper: Housekeeper,
        budget: StoreBudget,
        counters: Counters,
        keep_exec_dirs: bool = False,
    ) -> None:
        self.layout = layout
        self.cas = cas
        self.guard = guard
        self.inputs = inputs
        self.dircache = dircache
        self.pool = pool  # exec-dir reuse: only under the overlay, where the tool's writes leave the dir as staged
        self.sandbox = sandbox
        self.runner = runner
        self.tool_caches = tool_caches
        self.housekeeper = housekeeper
        self.budget = budget
        self.counters = counters
        self.keep_exec_dirs = keep_exec_dirs
        self.exec_base = layout.exec
        self.recent: collections.deque[dict[str, object]] = collections.deque(maxlen=20)

    # ----------------------------------------------------------------------------- public

    def execute(self, request: ActionRequest) -> ActionResult:
        """Run one action: prepare -> run -> check -> collect -> finish.

        Errors a user can cause come back as a failed ActionResult, never an exception.
        """
        prepared: PreparedDir | None = None
        run_dir: RunDir | None = None
        result: ActionResult
        try:
            prepared = self._prepare(request)
            run_dir = self._run_dir(prepared.path)
            result = self._run_and_collect(request, prepared.path, run_dir)
            result.stage, result.stage_seconds = prepared.report, prepared.seconds
            self._check_integrity(prepared, result)
        except TreematError as exc:
            result = ActionResult(exit_code=1, output=f"treemat: error: {exc}\n")
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            result = ActionResult(exit_code=1, output=f"treemat: error: {exc.strerror or exc}{where}\n")
        finally:
            self._finish(prepared, run_dir)
        self.counters.add("actions")
        if result.exit_code != 0:
            self.counters.add("action_failures")
        self.recent.append(result.summary(request.spec.argv[0] if request.spec.argv else "?", len(request.inputs)))
        return result

    def close(self) -> None:
        """Let queued removals finish, then remove the pooled exec dirs (they pin their blobs against gc)."""
        self.housekeeper.flush()  # before the guard closes: a removal refreshes the ledger through it
        if self.pool is not None:
            self.pool.close()
        self.inputs.close()

    def cancel(self, request_id: int) -> bool:
        """Kill the running tool of `request_id` (or make it never start). True if it was in flight."""
        return self.runner.cancel(request_id)

    # ----------------------------------------------------------------------------- prepare

    def _prepare(self, request: ActionRequest) -> PreparedDir:
        """The exec dir for `request`: a pooled dir patched (O(changed inputs)), else a new dir under the root's
        `exec/` staged afresh (and adopted by the pool where it can be reused), declared output directories made.
        Once more if a user deleted part of the root under us (`rm -rf .../cas`). On an error the dir is removed
        (or retired from the pool) before it is raised."""
        for attempt in range(2):
            try:
                return self._prepare_once(request)
            except (TreematError, OSError):
                if attempt or not self.cas.layout.repair():
                    raise
        raise AssertionError("unreachable")

    def _prepare_once(self, request: ActionRequest) -> PreparedDir:
        """Reuse a pooled dir, else stage a fresh one and offer it to the pool; timed."""
        started = time.perf_counter()
        key, outputs = pool_key(request), output_dirs(request)
        self.guard.poll()
        mark = self.guard.mark()
        with self.cas.in_use():
            prepared = self._reuse(request, key, outputs, mark)
            if prepared is None:
                prepared, files = self._stage_fresh(request, outputs, mark)
                prepared.pooled = self._adopt(request, prepared, key, files, outputs)
        prepared.seconds = time.perf_counter() - started
        return prepared

    def _reuse(self, request: ActionRequest, key: str, outputs: list[str], mark: GuardMark) -> PreparedDir | None:
        """Patch the pooled exec dir of a similar earlier action (same `key`) into this one's inputs, if any: the
        delta read from the request (inputs.py), applied by the pool. A dir that cannot be patched is retired
        (never back to the pool) and None returned: fresh staging follows."""
        if self.pool is None or not request.inputs:
            return None
        entry = self.pool.acquire(key)
        if entry is None:
            return None
        started = time.perf_counter()
        try:
            changes, removed = self.inputs.delta(request, entry)
            execroot = str(request.execroot)
            report = self.pool.patch(
                entry, changes, removed, outputs, execroot=execroot, manifest=request.inputs, mark=mark
            )
        except BaseException as exc:
            self.pool.retire(entry, intact=False)  # leased and half patched: never back to the pool
            if not isinstance(exc, (OSError, TreematError)):
                raise
            self.counters.add("execpool_patch_failed")
            return None
        unchanged = len(request.inputs) - report.linked
        self.counters.add("execpool_reused")
        self.counters.add("hardlink", report.linked)
        stage = StageReport(files=len(request.inputs), methods={"reused": unchanged, "hardlink": report.linked})
        stage.hardlinked = report.relinked
        stage.seconds = time.perf_counter() - started
        return PreparedDir(entry.path, stage, mark, pooled=entry)

    def _stage_fresh(
        self, request: ActionRequest, outputs: list[str], mark: GuardMark
    ) -> tuple[PreparedDir, dict[str, StagedFile] | None]:
        """Build the input tree and stage it into a new dir under `exec/` (once more if the stager's memo was
        stale), output dirs made; on an error the dir is removed before it is raised."""
        exec_dir = self.exec_base / f"{os.getpid()}-{request.request_id}-{os.urandom(4).hex()}"
        relinked: list[BlobKey] = []  # blobs whose link count (and ctime) the staging changed: ledger refresh
        try:
            for attempt in range(2):
                try:
                    tree, staged, files = self.inputs.build_tree(request)
                    report = self.dircache.stage(tree, exec_dir)
                    relinked = report.hardlinked
                    break
                except MissingBlobError:
                    if attempt:
                        raise
                    self.inputs.forget()  # a blob was GC'd or quarantined elsewhere: forget what we knew, retry once
                    remove_tree(exec_dir)
            if report.hardlinked and not self.sandbox.overlay:
                raise ExecutionError(
                    f"{len(report.hardlinked)} input(s) were hardlinked but the sandbox has no overlay: refusing "
                    "to let the tool reach CAS inodes (this is a wiring bug: use treemat.stack.open_stack)"
                )
            for rel in outputs:
                os.makedirs(f"{exec_dir}/{rel}", exist_ok=True)
        except BaseException:
            self.housekeeper.dispose(exec_dir, relinked)
            raise
        return PreparedDir(exec_dir, report, mark, staged), files

    def _adopt(
        self,
        request: ActionRequest,
        prepared: PreparedDir,
        key: str,
        files: dict[str, StagedFile] | None,
        outputs: list[str],
    ) -> PooledDir | None:
        """Offer a freshly staged dir to the pool, which adopts what it can patch later."""
        if self.pool is None:
            return None
        return self.pool.adopt(prepared.path, key, files, prepared.report, outputs, request.inputs, prepared.mark)

    # ----------------------------------------------------------------------------- run, collect, check, finish

    def _run_dir(self, exec_dir: Path) -> RunDir | None:
        """Without a mount namespace the tool's /tmp and cache are dirs on disk, beside its exec dir."""
        self.counters.add(f"actions_isolation_{self.sandbox.mode}")
        if not self.sandbox.in_place:
            return None
        run_dir = RunDir(self.exec_base / f"{exec_dir.name}.run-{os.urandom(3).hex()}")
        run_dir.create()
        return run_dir

    def _run_and_collect(self, request: ActionRequest, exec_dir: Path, run_dir: RunDir | None) -> ActionResult:
        """Run the tool in the sandbox, then (if it succeeded) copy its outputs out of its view."""
        spec = request.spec
        base_env = os.environ if request.base_env is None else request.base_env
        path = spec.env.get("PATH", base_env.get("PATH")) or os.defpath  # the tool's (a service's is its first relay's)
        cache = self.tool_caches.for_argv(spec.argv, self.sandbox, path)
        if run_dir is not None:
            argv = spec.argv_in(str(exec_dir), str(run_dir.cache))
            env = environment(base_env, spec.env, exec_root=str(exec_dir), tmp=str(run_dir.tmp))
        else:
            argv = spec.argv_in(EXEC_ROOT, TOOL_CACHE)
            env = environment(base_env, spec.env)
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

    def _collect_outputs(self, request: ActionRequest, view: OutputView, result: ActionResult) -> None:
        outputs = [*request.spec.outputs, *request.spec.output_dirs]
        execroot_fd = os.open(request.output_root or request.execroot, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            missing = collect_outputs(outputs, view, execroot_fd, request.spec.output_dirs)
        finally:
            os.close(execroot_fd)
        if missing:
            result.exit_code = 1
            result.output += f"treemat: error: the tool did not create declared output(s): {', '.join(missing)}\n"

    def _check_integrity(self, prepared: PreparedDir, result: ActionResult) -> None:
        """Fail the action if any blob it had staged was written to (from anywhere) while it ran.

        With a live watch on every blob since before staging, that is one poll. Otherwise (the guard's mark
        moved: unwatched blobs, lost watches, a queue overflow) every staged blob the guard does not trust now is
        hashed again first; a blob that cannot be found to hash fails the action too.
        """
        hit = self.guard.poll()
        if hit:
            self.inputs.forget(hit)
        if self.guard.mark() == prepared.mark:
            return  # no taint, and every staged blob was under a live watch throughout
        blobs, rehash = prepared.blobs(), result.exit_code == 0 and not result.cancelled
        found = self.guard.recheck(blobs, str(prepared.path), rehash=rehash)
        if found.hit:
            self.inputs.forget(found.hit)
        if found.missing:
            result.exit_code = 1
            result.output += (
                f"treemat: error: input(s) {', '.join(repr(name) for name in sorted(found.missing)[:5])} lost their "
                "write watch and could not be hashed again after the action ran; failing rather than return a "
                f"result built from unverified bytes (guard: {self.guard.describe()['write_watch_detail']})\n"
            )
        if not found.tainted:
            return
        names = [path for path, _reason in found.tainted]
        result.quarantined.extend(names)
        result.exit_code = result.exit_code or 1
        result.output += (
            f"treemat: error: input(s) {', '.join(repr(name) for name in names[:5])} were modified in the CAS while "
            "the action ran; the blobs were quarantined and the action failed rather than return a result built "
            f"from unknown bytes (rerun the build); {found.tainted[0][1]}\n"
        )

    def _finish(self, prepared: PreparedDir | None, run_dir: RunDir | None) -> None:
        """After an action: return a reusable exec dir to the pool (dropping the tool's writes), else remove it.

        Our links moved the ctime of the blobs they touched: the ledger is brought up to date in the background.
        """
        later = self.housekeeper.later
        later(self._upkeep)
        relinked = list(prepared.report.hardlinked) if prepared is not None else []
        if relinked:
            later(lambda: self.guard.refresh(relinked))
        if self.keep_exec_dirs:
            return
        if run_dir is not None:
            self.housekeeper.dispose(run_dir.path)
        if prepared is None:
            return
        pooled, pool = prepared.pooled, self.pool
        if pooled is None or pool is None:
            self.housekeeper.dispose(prepared.path, relinked)
        elif pooled.dirty:  # changed behind our back during the action: not worth keeping
            later(functools.partial(pool.retire, pooled))
        else:
            for evicted in pool.release(pooled):
                later(functools.partial(pool.retire, evicted))

    def _upkeep(self) -> None:
        """LRU atimes and the size budget."""
        self.cas.flush_touches()
        self.budget.maybe_collect()


def output_dirs(request: ActionRequest) -> list[str]:
    """Directories the exec dir holds for outputs: each output's parent and each declared output directory."""
    spec = request.spec
    parents = [normalize_path(output).rpartition("/")[0] for output in spec.outputs]
    return [parent for parent in parents if parent] + [normalize_path(d) for d in spec.output_dirs]


def pool_key(request: ActionRequest) -> str:
    """Actions with the same declared outputs (the same target, rebuilt) share a pooled exec dir."""
    spec = request.spec
    return "\0".join([*spec.outputs, "\1", *spec.output_dirs])
