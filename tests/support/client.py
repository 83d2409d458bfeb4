"""A minimal REAPI client: upload an input root, Command and Action, Execute, read results back.

Enough to push hand-built actions through BuildGrid and the bots (tests, smoke checks) without Bazel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from treemat.bot.rpc import code_pb2, re_grpc, re_pb2

Entry = bytes | tuple[bytes, bool] | str | None  # file bytes, (bytes, executable), symlink target, empty dir


def digest_of(data: bytes) -> Any:
    """REAPI Digest of `data`."""
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


@dataclass
class Executed:
    """The outcome of one Execute call."""

    status_code: int
    status_message: str
    cached: bool
    result: Any  # re_pb2.ActionResult


class Client:
    """REAPI Execution + CAS + ActionCache calls against one instance."""

    def __init__(self, channel: grpc.Channel, instance: str = "", *, timeout: float = 60.0) -> None:
        self.channel = channel
        self.instance = instance
        self.timeout = timeout
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._execution = re_grpc.ExecutionStub(channel)
        self._cache = re_grpc.ActionCacheStub(channel)

    def upload(self, blobs: Mapping[str, bytes]) -> None:
        """Put blobs (hash -> bytes) into the server CAS."""
        requests = [re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(b), data=b) for b in blobs.values()]
        response = self._cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(instance_name=self.instance, requests=requests), timeout=self.timeout
        )
        bad = [r for r in response.responses if r.status.code != code_pb2.OK]
        if bad:
            raise RuntimeError(f"upload refused: {bad[0].status.message}")

    def read(self, digest: Any) -> bytes:
        """One blob from the server CAS."""
        response = self._cas.BatchReadBlobs(
            re_pb2.BatchReadBlobsRequest(instance_name=self.instance, digests=[digest]), timeout=self.timeout
        )
        item = response.responses[0]
        if item.status.code != code_pb2.OK:
            raise KeyError(f"{digest.hash}: {item.status.message}")
        return bytes(item.data)

    def build_action(
        self,
        files: Mapping[str, Entry],
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        outputs: Sequence[str] = (),
        output_dirs: Sequence[str] = (),
        workdir: str = "",
        timeout_s: float | None = None,
        salt: bytes = b"",
    ) -> Any:
        """Upload an input root built from `files` (path -> entry), its Command and Action; return the Action digest."""
        blobs: dict[str, bytes] = {}
        root_digest = _directory(_nest(files), blobs)
        command = re_pb2.Command(
            arguments=argv,
            environment_variables=[
                re_pb2.Command.EnvironmentVariable(name=k, value=v) for k, v in sorted((env or {}).items())
            ],
            output_files=sorted(outputs),
            output_directories=sorted(output_dirs),
            working_directory=workdir,
        )
        command_bytes = command.SerializeToString(deterministic=True)
        blobs[digest_of(command_bytes).hash] = command_bytes
        action = re_pb2.Action(command_digest=digest_of(command_bytes), input_root_digest=root_digest, salt=salt)
        if timeout_s is not None:
            action.timeout.CopyFrom(Duration(seconds=int(timeout_s)))
        action_bytes = action.SerializeToString(deterministic=True)
        blobs[digest_of(action_bytes).hash] = action_bytes
        self.upload(blobs)
        return digest_of(action_bytes)

    def execute(self, action_digest: Any, *, skip_cache: bool = False, timeout: float | None = None) -> Executed:
        """Execute and wait for the final Operation."""
        request = re_pb2.ExecuteRequest(
            instance_name=self.instance, action_digest=action_digest, skip_cache_lookup=skip_cache
        )
        final = None
        for operation in self._execution.Execute(request, timeout=timeout or self.timeout):
            if operation.done:
                final = operation
                break
        if final is None:
            raise RuntimeError("Execute stream ended without a finished Operation")
        if final.HasField("error"):
            return Executed(final.error.code, final.error.message, False, re_pb2.ActionResult())
        response = re_pb2.ExecuteResponse()
        final.response.Unpack(response)
        return Executed(response.status.code, response.status.message, response.cached_result, response.result)

    def operations(self, action_digest: Any, *, skip_cache: bool = True) -> Any:
        """Start an Execute call and return its stream of Operations (iterable; `.cancel()` ends it)."""
        request = re_pb2.ExecuteRequest(
            instance_name=self.instance, action_digest=action_digest, skip_cache_lookup=skip_cache
        )
        return self._execution.Execute(request, timeout=self.timeout)

    def cached(self, action_digest: Any) -> Any:
        """The action cache's ActionResult, or None."""
        try:
            return self._cache.GetActionResult(
                re_pb2.GetActionResultRequest(instance_name=self.instance, action_digest=action_digest),
                timeout=self.timeout,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise


def _nest(files: Mapping[str, Entry]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path, entry in files.items():
        *parents, leaf = path.split("/")
        node = root
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = {} if entry is None else entry
    return root


def _directory(node: Mapping[str, Any], blobs: dict[str, bytes]) -> Any:
    directory = re_pb2.Directory()
    for name in sorted(node):
        entry = node[name]
        if isinstance(entry, dict):
            directory.directories.add(name=name, digest=_directory(entry, blobs))
        elif isinstance(entry, str):
            directory.symlinks.add(name=name, target=entry)
        else:
            data, executable = entry if isinstance(entry, tuple) else (entry, False)
            blobs[digest_of(data).hash] = data
            directory.files.add(name=name, digest=digest_of(data), is_executable=executable)
    data = directory.SerializeToString(deterministic=True)
    blobs[digest_of(data).hash] = data
    return digest_of(data)
