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
import functools
import os
import secrets
from pathlib import Path

from treemat.action import ActionRequest, ActionResult, RequestInput
from treemat.blobguard import BlobGuard
from treemat.budget import StoreBudget
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.errors import TreematError
from treemat.execpool import ExecDirPool
from treemat.housekeeping import Housekeeper
from treemat.inputs import InputStager, PreparedDir
from treemat.layout import Root
from treemat.outputs import OutputView, collect_outputs
from treemat.sandbox import EXEC_ROOT, TOOL_CACHE, RunDir, Sandbox, ToolPlan, environment
from treemat.toolcache import ToolCaches
from treemat.toolrun import ToolRunner

__all__ = ["ActionExecutor", "ActionRequest", "ActionResult", "RequestInput"]


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
        self.pool: ExecDirPool | None = inputs.pool
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
            prepared = self.inputs.prepare(request)
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

    # ----------------------------------------------------------------------------- the steps

    def _run_dir(self, exec_dir: Path) -> RunDir | None:
        """Without a mount namespace the tool's /tmp and cache are dirs on disk, beside its exec dir."""
        self.counters.add(f"actions_isolation_{self.sandbox.mode}")
        if not self.sandbox.in_place:
            return None
        run_dir = RunDir(self.exec_base / f"{exec_dir.name}.run-{secrets.token_hex(3)}")
        run_dir.create()
        return run_dir

    def _run_and_collect(self, request: ActionRequest, exec_dir: Path, run_dir: RunDir | None) -> ActionResult:
        """Run the tool in the sandbox, then (if it succeeded) copy its outputs out of its view."""
        spec = request.spec
        base_env = os.environ if request.base_env is None else request.base_env
        path = spec.env.get("PATH", base_env.get("PATH"))  # the tool's (a service's own is its first relay's)
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
            missing = collect_outputs(outputs, view, execroot_fd)
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
