"""One REAPI Action end to end on a bot: fetch, stage with treemat, run, upload outputs, build the ActionResult.

The input root is read Directory by Directory (batched, level by level) through the local CAS, so a bot that
has seen a subtree before reads nothing for it; files are fetched only if the local CAS lacks them. Staging is
treemat's: read-only inputs in writable directories, whole cached subtrees cloned in one call where the
filesystem allows. The command sees only the Command's environment, never the bot's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from treemat.bot.remote_cas import RemoteCas, RemoteCasError, TransferStats, to_digest, to_proto
from treemat.bot.rpc import code_pb2, re_pb2
from treemat.bot.stager import Digest, FileNode, InputTree, LocalStager, check_symlinks
from treemat.digest import digest_bytes
from treemat.errors import TreematError
from treemat.locking import ForkGate

KILL_POLL_SECONDS = 0.05


class ActionFailed(TreematError):
    """The action could not be run; carries the google.rpc code to report in the lease status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Outcome:
    """What running one lease produced: a status for the lease and (if it ran) the ActionResult."""

    code: int
    message: str = ""
    result: Any = None  # re_pb2.ActionResult
    cancelled: bool = False
    record: dict[str, object] = field(default_factory=dict)


class ActionRunner:
    """Runs Actions leased from the server, using `stager` for the local CAS and staging."""

    def __init__(self, stager: LocalStager, remote: RemoteCas, *, worker_name: str) -> None:
        self.stager = stager
        self.remote = remote
        self.worker_name = worker_name
        self._counter_lock = threading.Lock()
        self._sequence = 0

    def run(self, payload: Any, cancel: threading.Event) -> Outcome:
        """Run the Action in a lease payload (an Action or an Action Digest, packed in an Any)."""
        started = time.perf_counter()
        try:
            outcome = self._run(payload, cancel)
        except ActionFailed as exc:
            outcome = Outcome(code=exc.code, message=str(exc))
        except (TreematError, OSError) as exc:
            outcome = Outcome(code=code_pb2.INTERNAL, message=f"treemat bot: {exc}")
        outcome.record.setdefault("total_ms", round(1000 * (time.perf_counter() - started), 2))
        counters = self.stager.counters
        counters.add("bot_leases")
        if outcome.cancelled:
            counters.add("bot_cancelled")
        elif outcome.code != code_pb2.OK or outcome.result is None or outcome.result.exit_code != 0:
            counters.add("action_failures")
        counters.add("actions")
        return outcome

    # --------------------------------------------------------------------------- steps

    def _run(self, payload: Any, cancel: threading.Event) -> Outcome:
        meta = re_pb2.ExecutedActionMetadata(worker=self.worker_name)
        _stamp(meta.worker_start_timestamp)
        transfer = TransferStats()
        self.stager.begin()
        fetch_start = time.perf_counter()
        _stamp(meta.input_fetch_start_timestamp)
        action = self._action(payload, transfer)
        command = re_pb2.Command()
        command.ParseFromString(self._message(to_digest(action.command_digest), transfer))
        tree = self._input_tree(to_digest(action.input_root_digest), transfer)
        self.remote.fetch(((node.digest, node.executable) for _, node in tree.iter_files()), transfer)
        fetch_done = time.perf_counter()
        with self.stager.exec_dir(self._next_tag()) as exec_dir:
            stage_start = time.perf_counter()
            report = self.stager.stage(tree, exec_dir)
            stage_seconds = time.perf_counter() - stage_start
            _stamp(meta.input_fetch_completed_timestamp)
            workdir = _inside(exec_dir, command.working_directory) if command.working_directory else exec_dir
            workdir.mkdir(parents=True, exist_ok=True)
            outputs = _declared_outputs(command)
            for rel in outputs:
                _inside(workdir, rel).parent.mkdir(parents=True, exist_ok=True)
            timeout = action.timeout.ToTimedelta().total_seconds() if action.HasField("timeout") else None
            _stamp(meta.execution_start_timestamp)
            run = _run_command(command, workdir, exec_dir, cancel, timeout, self.stager.cas.fork_gate)
            _stamp(meta.execution_completed_timestamp)
            if run.cancelled:
                return Outcome(code=code_pb2.CANCELLED, message="lease cancelled", cancelled=True)
            _stamp(meta.output_upload_start_timestamp)
            result = re_pb2.ActionResult(exit_code=run.exit_code)
            blobs: dict[str, tuple[Digest, Path | bytes]] = {}
            self._collect_outputs(command, workdir, result, blobs)
            for name, data in (("stdout", run.stdout), ("stderr", run.stderr)):
                digest = digest_bytes(data)
                blobs[digest.hash] = (digest, data)
                getattr(result, f"{name}_digest").CopyFrom(to_proto(digest))
            self.remote.upload(blobs, transfer)
            _stamp(meta.output_upload_completed_timestamp)
        _stamp(meta.worker_completed_timestamp)
        result.execution_metadata.CopyFrom(meta)
        code = code_pb2.DEADLINE_EXCEEDED if run.timed_out else code_pb2.OK
        record: dict[str, object] = {
            "exit_code": run.exit_code,
            "inputs": report.files,
            "methods": dict(report.methods),
            "subtree_hits": report.subtree_hits,
            "subtree_misses": report.subtree_misses,
            "fetched_blobs": transfer.blobs_read,
            "fetched_bytes": transfer.bytes_read,
            "uploaded_blobs": transfer.blobs_written,
            "fetch_ms": round(1000 * (fetch_done - fetch_start), 2),
            "stage_ms": round(1000 * stage_seconds, 2),
            "tool_ms": round(1000 * run.seconds, 2),
        }
        counters = self.stager.counters
        counters.add("remote_blobs_read", transfer.blobs_read)
        counters.add("remote_bytes_read", transfer.bytes_read)
        counters.add("remote_blobs_written", transfer.blobs_written)
        counters.add("remote_bytes_written", transfer.bytes_written)
        counters.add("local_cas_hits", transfer.local_hits)
        counters.add("stage_us", int(1e6 * stage_seconds))
        message = f"action timed out after {timeout} s" if run.timed_out else ""
        return Outcome(code=code, message=message, result=result, record=record)

    def _next_tag(self) -> str:
        with self._counter_lock:
            self._sequence += 1
            return f"bot{self._sequence}"

    def _action(self, payload: Any, transfer: TransferStats) -> Any:
        action = re_pb2.Action()
        if payload.Is(re_pb2.Action.DESCRIPTOR):
            payload.Unpack(action)
            return action
        digest = re_pb2.Digest()
        if not payload.Unpack(digest):
            raise ActionFailed(code_pb2.INVALID_ARGUMENT, f"lease payload is neither an Action nor a Digest: {payload}")
        action.ParseFromString(self._message(to_digest(digest), transfer))
        return action

    def _message(self, digest: Digest, transfer: TransferStats) -> bytes:
        try:
            return self.remote.read_messages([digest], transfer)[digest.hash]
        except RemoteCasError as exc:
            raise ActionFailed(code_pb2.FAILED_PRECONDITION, str(exc)) from None

    def _input_tree(self, root: Digest, transfer: TransferStats) -> InputTree:
        """Read the input root's Directory messages level by level and build a validated InputTree."""
        tree = InputTree()
        level: list[tuple[str, Digest]] = [("", root)]
        try:
            while level:
                data = self.remote.read_messages(list({d.hash: d for _, d in level}.values()), transfer)
                next_level: list[tuple[str, Digest]] = []
                for prefix, digest in level:
                    directory = re_pb2.Directory()
                    directory.ParseFromString(data[digest.hash])
                    if prefix and not (directory.files or directory.symlinks or directory.directories):
                        tree.add_directory(prefix)
                    for file in directory.files:
                        tree.add_file(_join(prefix, file.name), FileNode(to_digest(file.digest), file.is_executable))
                    for link in directory.symlinks:
                        tree.add_symlink(_join(prefix, link.name), link.target)
                    for sub in directory.directories:
                        next_level.append((_join(prefix, sub.name), to_digest(sub.digest)))
                level = next_level
            check_symlinks(tree)
        except RemoteCasError as exc:
            raise ActionFailed(code_pb2.FAILED_PRECONDITION, str(exc)) from None
        except TreematError as exc:
            raise ActionFailed(code_pb2.INVALID_ARGUMENT, f"bad input root: {exc}") from None
        return tree

    # --------------------------------------------------------------------------- outputs

    def _collect_outputs(
        self, command: Any, workdir: Path, result: Any, blobs: dict[str, tuple[Digest, Path | bytes]]
    ) -> None:
        v21 = bool(command.output_paths)
        files = list(command.output_paths) if v21 else list(command.output_files)
        dirs = [] if v21 else list(command.output_directories)
        for rel in [*files, *dirs]:
            path = _inside(workdir, rel)
            if path.is_symlink():
                target = os.readlink(path)
                if not os.path.isabs(target):
                    if v21:
                        result.output_symlinks.add(path=rel, target=target)
                    elif rel in dirs:
                        result.output_directory_symlinks.add(path=rel, target=target)
                    else:
                        result.output_file_symlinks.add(path=rel, target=target)
                    continue
            if path.is_dir():
                tree = self._output_tree(path, blobs)
                data = tree.SerializeToString(deterministic=True)
                digest = digest_bytes(data)
                blobs[digest.hash] = (digest, data)
                result.output_directories.add(path=rel, tree_digest=to_proto(digest))
            elif path.is_file():
                executable = bool(path.stat().st_mode & 0o111)
                digest = self._put_output(path, executable, blobs)
                result.output_files.add(path=rel, digest=to_proto(digest), is_executable=executable)

    def _put_output(self, path: Path, executable: bool, blobs: dict[str, tuple[Digest, Path | bytes]]) -> Digest:
        digest = self.stager.put_file(path, executable=executable)
        if not digest.is_empty:
            blobs[digest.hash] = (digest, self.stager.blob_path(digest, executable))
        else:
            blobs[digest.hash] = (digest, b"")
        return digest

    def _output_tree(self, root: Path, blobs: dict[str, tuple[Digest, Path | bytes]]) -> Any:
        """An output directory as a REAPI Tree (root + every descendant Directory); files go to `blobs`."""
        children: dict[str, Any] = {}

        def visit(path: Path) -> Any:
            directory = re_pb2.Directory()
            for entry in sorted(os.scandir(path), key=lambda e: e.name):
                full = Path(entry.path)
                if entry.is_symlink():
                    target = os.readlink(full)
                    if not os.path.isabs(target):
                        directory.symlinks.add(name=entry.name, target=target)
                        continue
                    full = full.resolve()
                if full.is_dir():
                    child = visit(full)
                    data = child.SerializeToString(deterministic=True)
                    digest = digest_bytes(data)
                    children[digest.hash] = child
                    directory.directories.add(name=entry.name, digest=to_proto(digest))
                elif full.is_file():
                    executable = bool(full.stat().st_mode & stat.S_IXUSR)
                    digest = self._put_output(full, executable, blobs)
                    directory.files.add(name=entry.name, digest=to_proto(digest), is_executable=executable)
            return directory

        tree = re_pb2.Tree(root=visit(root))
        tree.children.extend(children[key] for key in sorted(children))
        return tree


# ------------------------------------------------------------------------------- running the command


@dataclass(slots=True)
class CommandRun:
    """Exit status and captured streams of one command."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    seconds: float
    cancelled: bool = False
    timed_out: bool = False


def _run_command(
    command: Any,
    workdir: Path,
    exec_dir: Path,
    cancel: threading.Event,
    timeout: float | None,
    fork_gate: ForkGate,
) -> CommandRun:
    """Run argv in `workdir` with exactly the Command's environment; kill its process group on cancel/timeout."""
    if not command.arguments:
        raise ActionFailed(code_pb2.INVALID_ARGUMENT, "Command has no arguments")
    env = {var.name: var.value for var in command.environment_variables}
    argv = list(command.arguments)
    out_path, err_path = exec_dir.parent / f".{exec_dir.name}.out", exec_dir.parent / f".{exec_dir.name}.err"
    started = time.perf_counter()
    try:
        with open(out_path, "w+b") as out, open(err_path, "w+b") as err:
            try:
                with fork_gate.forking():  # not while a fetch holds a writable temp blob (locking.ForkGate)
                    proc = subprocess.Popen(
                        argv,
                        cwd=workdir,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        start_new_session=True,
                    )
            except OSError as exc:
                message = f"treemat bot: cannot run {argv[0]!r}: {exc.strerror}\n".encode()
                return CommandRun(127, b"", message, time.perf_counter() - started)
            cancelled = timed_out = False
            while proc.poll() is None:
                if cancel.wait(KILL_POLL_SECONDS):
                    cancelled = True
                elif timeout is not None and time.perf_counter() - started > timeout:
                    timed_out = True
                if cancelled or timed_out:
                    _kill_group(proc)
                    break
            proc.wait()
            seconds = time.perf_counter() - started
            _kill_group(proc)  # stragglers the tool left in its session
            out.seek(0)
            err.seek(0)
            return CommandRun(proc.returncode, out.read(), err.read(), seconds, cancelled, timed_out)
    finally:
        out_path.unlink(missing_ok=True)
        err_path.unlink(missing_ok=True)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _declared_outputs(command: Any) -> list[str]:
    if command.output_paths:
        return list(command.output_paths)
    return [*command.output_files, *command.output_directories]


def _inside(base: Path, rel: str) -> Path:
    """`base/rel`, refusing absolute paths and `..` (outputs and working dirs must stay in the exec dir)."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if rel.startswith("/") or ".." in parts:
        raise ActionFailed(code_pb2.INVALID_ARGUMENT, f"path {rel!r} leaves the input root")
    return base.joinpath(*parts) if parts else base


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _stamp(field_value: Timestamp) -> None:
    field_value.GetCurrentTime()
