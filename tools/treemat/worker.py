"""The persistent-worker loop: decoded requests in (protocol.py), each dispatched to the executor, replies out.

Singleplex requests (request id 0) run in order; multiplex ones run concurrently on a bounded pool; a cancel
request kills the tool of an in-flight request. A request reusing the id of one in flight, or asking for Bazel's
multiplex sandboxing (`sandbox_dir`), is refused with a one-line error. stdout carries protocol bytes only; the
cwd is the execroot.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, BinaryIO

from treemat.counters import StatsStore
from treemat.errors import ProtocolError, TreematError, describe_error
from treemat.flagfile import parse_action_args, request_arguments
from treemat.layout import Root
from treemat.protocol import Malformed, Wire, WorkItem, WorkReply, encode_reply, read_requests, sniff_protocol
from treemat.stack import Stack, favour_syscall_threads, open_stack

Handler = Callable[[WorkItem], WorkReply]
SANDBOX_DIR_REFUSED = (
    "treemat: error: the work request sets sandbox_dir ({!r:.200}), which treemat does not support: it stages and "
    "sandboxes each action itself; turn off --experimental_worker_multiplex_sandboxing\n"
)
DUPLICATE_REFUSED = (
    "treemat: error: request id {} is already in flight: refused (a multiplex worker needs one id per action)\n"
)
Canceller = Callable[[int], bool]


class WorkerServer:
    """Runs requests (multiplexed ones concurrently) and writes whole responses under a lock."""

    def __init__(
        self,
        stdout: IO[bytes],
        handler: Handler,
        *,
        protocol: Wire,
        max_workers: int = 4,
        on_cancel: Canceller | None = None,
    ) -> None:
        self.stdout = stdout
        self.handler = handler
        self.protocol: Wire = protocol
        self.on_cancel = on_cancel
        self._write_lock = threading.Lock()
        from concurrent.futures import ThreadPoolExecutor  # here: the service imports this module, not its pool

        self._pool = ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="treemat-action")
        self._inflight: set[int] = set()
        self._inflight_lock = threading.Lock()

    def serve(self, requests: Iterable[WorkItem | Malformed]) -> None:
        """Dispatch every request, answer every undecodable one, then wait for in-flight requests."""
        try:
            for request in requests:
                if isinstance(request, Malformed):
                    self.reject(request)
                else:
                    self.dispatch(request)
        finally:
            self._pool.shutdown(wait=True)

    def respond(self, reply: WorkReply) -> None:
        """Write one response and flush; then its follow-up."""
        data = encode_reply(reply, self.protocol)
        with self._write_lock:
            self.stdout.write(data)
            self.stdout.flush()
        if reply.then is not None:
            reply.then()

    def dispatch(self, item: WorkItem) -> None:
        """Run or cancel one request."""
        if item.cancel:
            if item.request_id and self.on_cancel is not None:
                with self._inflight_lock:
                    inflight = item.request_id in self._inflight
                if inflight:
                    self.on_cancel(item.request_id)
            return
        if item.sandbox_dir:
            self.respond(WorkReply(item.request_id, 1, SANDBOX_DIR_REFUSED.format(item.sandbox_dir)))
            return
        if item.request_id == 0:
            self.respond(self._run(item))
            return
        with self._inflight_lock:
            duplicate = item.request_id in self._inflight
            if not duplicate:
                self._inflight.add(item.request_id)
        if duplicate:
            # running it too would leave one id naming two actions: a cancel could reach only one of them
            self.respond(WorkReply(item.request_id, 1, DUPLICATE_REFUSED.format(item.request_id)))
            return
        self._pool.submit(self._run_and_respond, item)

    def reject(self, malformed: Malformed) -> None:
        """Answer a request that could not be decoded."""
        print(f"treemat worker: {malformed.error}", file=sys.stderr)
        self.respond(WorkReply(malformed.request_id, 1, f"treemat: malformed work request: {malformed.error}\n"))

    def _run_and_respond(self, item: WorkItem) -> None:
        reply = self._run(item)
        with self._inflight_lock:
            self._inflight.discard(item.request_id)
        self.respond(reply)

    def _run(self, item: WorkItem) -> WorkReply:
        try:
            return self.handler(item)
        except (TreematError, OSError) as exc:
            return WorkReply(item.request_id, 1, f"treemat: error: {describe_error(exc)}\n")
        except Exception as exc:  # the worker must keep serving whatever one request does
            return WorkReply(item.request_id, 1, f"treemat: internal error: {type(exc).__name__}: {exc}\n")


def make_handler(
    stack: Stack,
    execroot: Path,
    *,
    env: Mapping[str, str] | None = None,
    role: str = "worker",
    execroot_fd: int | None = None,
) -> tuple[Handler, Canceller]:
    """(handler, canceller) running requests on the stack's executor, relative to `execroot`.

    `env`: the tools' base environment (None: this process's; the service passes each relay's). `execroot_fd`:
    the directory `execroot` named when the relay sent it (the service): outputs are copied into it by its
    descriptor, and a request whose `execroot` path no longer names it (renamed, a symlink swapped in) is
    staged through the descriptor too, so nothing lands outside it."""
    # Imported here, not at the top: `open_stack` imports the layers below the stack while the sandbox probe
    # runs (the worker's start-up cost); by now they are loaded.
    from treemat.action import ActionRequest

    counters, executor = stack.counters, stack.executor
    publish = stats_publisher(stack, role)
    verbose = bool(os.environ.get("TREEMAT_VERBOSE"))

    def handle(item: WorkItem) -> WorkReply:
        started = time.perf_counter()
        here, output_root = execroot, None
        if execroot_fd is not None:
            output_root = Path(f"/proc/self/fd/{execroot_fd}")
            here = execroot if names_directory(execroot, execroot_fd) else output_root
        try:
            spec = parse_action_args(request_arguments(item.arguments, str(here)))
        except ProtocolError as exc:
            counters.add("requests_malformed")
            return WorkReply(item.request_id, 1, f"treemat: malformed work request: {exc}\n")
        request = ActionRequest(
            spec=spec,
            inputs=item.inputs,
            execroot=here,
            request_id=item.request_id,
            base_env=env,
            output_root=output_root,
        )
        result = executor.execute(request)
        if verbose:
            print(
                f"treemat worker: request {item.request_id} handled in {1000 * (time.perf_counter() - started):.1f} ms "
                f"(stage {1000 * result.stage_seconds:.1f}, tool {1000 * result.tool_seconds:.1f})",
                file=sys.stderr,
            )
        return WorkReply(item.request_id, result.exit_code, result.output, result.cancelled, then=publish)

    return handle, executor.cancel


def stats_publisher(stack: Stack, role: str) -> Callable[[], None]:
    """What rewrites the stats file `treemat stats` reads (counters, recent actions), one call at a time: a reply's
    follow-up (`WorkReply.then`), run once the reply is sent (~0.5 ms of JSON and a rename Bazel need not wait for)."""
    stats, lock = StatsStore(stack.layout.stats), threading.Lock()

    def publish() -> None:
        with lock, contextlib.suppress(OSError):
            extra = {"recent_actions": list(stack.executor.recent), **stack.describe()}
            stats.publish(stack.counters, role=role, extra=extra)

    return publish


def names_directory(path: Path, fd: int) -> bool:
    """True if `path` (no symlink followed at its end) is the directory open as `fd`."""
    try:
        named, held = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISDIR(named.st_mode) and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def serve_stdio(root: Path, *, protocol: Wire | None, max_workers: int, isolation: str = "auto") -> int:
    """Serve Bazel on stdin/stdout until EOF (`protocol` None: sniff it); returns the exit status.

    stdout becomes the protocol channel only: fd 1 is pointed at stderr, so a stray print cannot corrupt it.
    Raises TreematError when the stack cannot be opened.
    """
    favour_syscall_threads()
    protocol_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        stack = open_stack(Root(root), isolation=isolation)
    except (TreematError, OSError) as exc:
        raise TreematError(f"the worker cannot start: {describe_error(exc)}") from None
    with stack:
        return _serve(stack, protocol_out, protocol, max_workers)


def _serve(stack: Stack, protocol_out: BinaryIO, protocol: Wire | None, max_workers: int) -> int:
    if stack.isolation in ("none", "unavailable"):
        print(f"treemat worker: WARNING: isolation {stack.isolation}: {stack.isolation_detail}", file=sys.stderr)
    handler, canceller = make_handler(stack, Path.cwd())
    stdin = sys.stdin.buffer
    wire, source = sniff_protocol(stdin) if protocol is None else (protocol, stdin)
    verbose = bool(os.environ.get("TREEMAT_VERBOSE"))

    def log_read(size: int) -> None:
        print(f"treemat worker: {time.time():.3f} read {size} bytes", file=sys.stderr, flush=True)

    server = WorkerServer(protocol_out, handler, protocol=wire, max_workers=max_workers, on_cancel=canceller)
    server.serve(read_requests(source, wire, log_read if verbose else None))
    return 0
