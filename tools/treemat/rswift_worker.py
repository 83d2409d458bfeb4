"""treemat in place of rules_swift's worker: `worker swiftc [--persistent_worker]`, as rules_swift runs it.

Started with `--persistent_worker` (Bazel's worker strategy), it serves rules_swift's JSON requests (singleplex,
no request id) with treemat's worker loop and executor: each request's inputs are staged from the CAS into a
private exec dir, rules_swift's real worker runs there once, sandboxed (`real_worker swiftc ARGS`, no
`--persistent_worker`: one compile, then it exits), and the outputs found by rswift.py are copied back by
descriptor. Started without it (the `sandboxed` and `local` strategies, and the actions rules_swift never runs
as a worker: SwiftModuleWrap, SwiftAutolinkExtract), it becomes the real worker (exec), in Bazel's own sandbox.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from treemat.errors import ProtocolError, TreematError, describe_error
from treemat.layout import Root, default_root_path
from treemat.protocol import WorkItem, WorkReply, read_requests
from treemat.rswift import PERSISTENT_FLAG, action_spec, outputs_over_inputs
from treemat.stack import Stack, favour_syscall_threads, open_stack
from treemat.worker import Handler, WorkerServer, stats_publisher

EXEC_ROOT_PREFIX = "{EXEC_ROOT}/"


def tool_path(real_worker: str, execroot: Path, staged: set[str]) -> str:
    """How the sandboxed tool names the real worker: by its exec path under `{EXEC_ROOT}` when that is one of
    the request's staged inputs (Bazel lists the worker's files), else by its absolute path (read-only there)."""
    resolved = os.path.realpath(real_worker)
    rel = os.path.relpath(resolved, os.path.realpath(execroot))
    return EXEC_ROOT_PREFIX + rel if rel in staged else resolved


def make_rswift_handler(stack: Stack, execroot: Path, real_worker: str, startup: Sequence[str]) -> Handler:
    """A handler running each rules_swift request as one treemat action on the stack's executor."""
    from treemat.action import ActionRequest

    executor = stack.executor
    verbose = bool(os.environ.get("TREEMAT_VERBOSE"))
    publish = stats_publisher(stack, "rules_swift worker")

    def handle(item: WorkItem) -> WorkReply:
        staged = {entry.path for entry in item.inputs}
        tool = tool_path(real_worker, execroot, staged)
        try:
            spec = action_spec(tool, startup, item.arguments, execroot)
            if clashes := outputs_over_inputs(spec, staged):
                raise ProtocolError(f"its outputs would overwrite its inputs: {', '.join(clashes[:5])}")
        except ProtocolError as exc:
            return WorkReply(item.request_id, 1, f"treemat: cannot read this rules_swift request: {exc}\n")
        started = time.perf_counter()
        result = executor.execute(ActionRequest(spec=spec, inputs=item.inputs, execroot=execroot))
        if verbose:
            print(
                f"treemat rules_swift worker: {len(item.inputs)} inputs, {len(spec.outputs)} outputs, "
                f"{1000 * (time.perf_counter() - started):.1f} ms (stage {1000 * result.stage_seconds:.1f}, tool "
                f"{1000 * result.tool_seconds:.1f})",
                file=sys.stderr,
                flush=True,
            )
        return WorkReply(item.request_id, result.exit_code, result.output, result.cancelled, then=publish)

    return handle


def serve(real_worker: str, startup: Sequence[str], root: Path, isolation: str = "auto") -> int:
    """Serve rules_swift's JSON requests on stdin/stdout until EOF (stdout carries protocol bytes only)."""
    favour_syscall_threads()
    protocol_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        stack = open_stack(Root(root), isolation=isolation)
    except (TreematError, OSError) as exc:
        print(f"treemat: error: the worker cannot start: {describe_error(exc)}", file=sys.stderr)
        return 1
    with stack:
        if stack.isolation in ("none", "unavailable"):
            print(f"treemat worker: WARNING: isolation {stack.isolation}: {stack.isolation_detail}", file=sys.stderr)
        handler = make_rswift_handler(stack, Path.cwd(), real_worker, startup)
        server = WorkerServer(protocol_out, handler, protocol="json", max_workers=1)
        server.serve(read_requests(sys.stdin.buffer, "json"))
    return 0


def main(argv: Sequence[str], real_worker: str) -> int:
    """`worker swiftc ... [--persistent_worker]` as Bazel runs rules_swift's worker."""
    if PERSISTENT_FLAG not in argv:
        os.execv(real_worker, [real_worker, *argv])
    startup = [arg for arg in argv if arg != PERSISTENT_FLAG]
    return serve(real_worker, startup, default_root_path(), os.environ.get("TREEMAT_ISOLATION", "auto"))
