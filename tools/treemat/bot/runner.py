"""One REAPI Action end to end on a bot: fetch, stage with treemat, run, upload outputs, build the ActionResult.

The input root is read Directory by Directory (batched, level by level) through the local CAS, so a bot that
has seen a subtree before reads nothing for it; files are fetched only if the local CAS lacks them. Staging,
running and reading outputs are the worker's (bot/stager.py): the command runs in the worker's sandbox with
only the Command's environment (killed at the Action's timeout: DEADLINE_EXCEEDED; nothing it started outlives
it), and its outputs are walked out of its view by the worker's rules (bot/outputs.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from treemat.bot.outputs import Blobs, collect
from treemat.bot.remote_cas import LocalBlobChanged, RemoteCas, RemoteCasError, TransferStats, to_digest, to_proto
from treemat.bot.rpc import code_pb2, re_pb2
from treemat.bot.stager import (
    Digest,
    ExecutionError,
    FileNode,
    InputTree,
    LocalStager,
    StagedAction,
    TreematError,
    check_symlinks,
    digest_bytes,
)


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
        if not command.arguments:
            raise ActionFailed(code_pb2.INVALID_ARGUMENT, "Command has no arguments")
        workdir = _relative(command.working_directory)
        outputs = [_relative(rel) for rel in _declared_outputs(command)]
        tree = self._input_tree(to_digest(action.input_root_digest), transfer)
        self.remote.fetch(((node.digest, node.executable) for _, node in tree.iter_files()), transfer)
        fetch_done = time.perf_counter()
        parents = {workdir, *(_join(workdir, rel.rpartition("/")[0]) for rel in outputs)}
        with self.stager.action(tree, self._next_tag(), workdirs=sorted(parents)) as staged:
            _stamp(meta.input_fetch_completed_timestamp)
            timeout = action.timeout.ToTimedelta().total_seconds() if action.HasField("timeout") else None
            env = {var.name: var.value for var in command.environment_variables}
            _stamp(meta.execution_start_timestamp)
            run = staged.run(list(command.arguments), env, workdir, timeout, cancel)
            _stamp(meta.execution_completed_timestamp)
            if run.cancelled:
                return Outcome(code=code_pb2.CANCELLED, message="lease cancelled", cancelled=True)
            _stamp(meta.output_upload_start_timestamp)
            result = self._collect_and_upload(staged, command, run.exit_code, run.stdout, run.stderr, transfer)
            _stamp(meta.output_upload_completed_timestamp)
        _stamp(meta.worker_completed_timestamp)
        result.execution_metadata.CopyFrom(meta)
        code = code_pb2.DEADLINE_EXCEEDED if run.timed_out else code_pb2.OK
        record: dict[str, object] = {
            "exit_code": result.exit_code,
            "inputs": staged.report.files,
            "methods": dict(staged.report.methods),
            "subtree_hits": staged.report.subtree_hits,
            "subtree_misses": staged.report.subtree_misses,
            "fetched_blobs": transfer.blobs_read,
            "fetched_bytes": transfer.bytes_read,
            "uploaded_blobs": transfer.blobs_written,
            "fetch_ms": round(1000 * (fetch_done - fetch_start), 2),
            "stage_ms": round(1000 * staged.stage_seconds, 2),
            "tool_ms": round(1000 * run.seconds, 2),
        }
        counters = self.stager.counters
        counters.add("remote_blobs_read", transfer.blobs_read)
        counters.add("remote_bytes_read", transfer.bytes_read)
        counters.add("remote_blobs_written", transfer.blobs_written)
        counters.add("remote_bytes_written", transfer.bytes_written)
        counters.add("local_cas_hits", transfer.local_hits)
        counters.add("stage_us", int(1e6 * staged.stage_seconds))
        message = f"action timed out after {timeout} s" if run.timed_out else ""
        return Outcome(code=code, message=message, result=result, record=record)

    def _collect_and_upload(
        self, staged: StagedAction, command: Any, exit_code: int, stdout: bytes, stderr: bytes, transfer: TransferStats
    ) -> Any:
        """The ActionResult of the outputs walked out of the command's view, its blobs uploaded.

        An output blob found changed in the local CAS at upload (LocalBlobChanged: written since it was ingested,
        or a damaged copy the ingest found in place) is quarantined and the outputs are walked and ingested once
        more from the command's view; a second change fails the lease (INTERNAL: BuildGrid runs it again).
        """
        for attempt in range(2):
            result = re_pb2.ActionResult(exit_code=exit_code)
            blobs: Blobs = {}
            errors = stderr
            try:
                collect(staged, command, result, blobs)
            except ExecutionError as exc:  # refused outputs: none is reported, the action fails (as on the worker)
                for name in ("output_files", "output_directories", "output_symlinks"):
                    del getattr(result, name)[:]
                del result.output_file_symlinks[:]
                del result.output_directory_symlinks[:]
                result.exit_code = result.exit_code or 1
                errors += f"treemat: error: {exc}\n".encode()
                self.stager.counters.add("bot_refused_outputs")
            for name, data in (("stdout", stdout), ("stderr", errors)):
                digest = digest_bytes(data)
                blobs[digest.hash] = (digest, data)
                getattr(result, f"{name}_digest").CopyFrom(to_proto(digest))
            try:
                self.remote.upload(blobs, transfer)
            except LocalBlobChanged as exc:
                self.stager.discard_blob(exc.digest, exc.path, str(exc))
                self.stager.counters.add("bot_changed_output_blobs")
                if attempt:
                    raise ActionFailed(code_pb2.INTERNAL, f"treemat bot: {exc}, again after a re-ingest") from None
                continue
            return result
        raise AssertionError("unreachable")

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


def _declared_outputs(command: Any) -> list[str]:
    if command.output_paths:
        return list(command.output_paths)
    return [*command.output_files, *command.output_directories]


def _relative(rel: str) -> str:
    """`rel` without empty and `.` components, refusing absolute paths and `..` (they must stay in the root)."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if rel.startswith("/") or ".." in parts or "\0" in rel:
        raise ActionFailed(code_pb2.INVALID_ARGUMENT, f"path {rel!r} leaves the input root")
    return "/".join(parts)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _stamp(field_value: Timestamp) -> None:
    field_value.GetCurrentTime()
