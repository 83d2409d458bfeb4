"""Read Bazel execution logs (`--execution_log_json_file` or `--execution_log_binary_file`).

JSON logs are SpawnExec messages in proto3 JSON, pretty-printed and concatenated; binary logs are
varint-delimited SpawnExec protos. The format is detected from the first byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treemat.digest import EMPTY_DIGEST, Digest
from treemat.errors import DigestError, ProtocolError, TreematError


@dataclass(frozen=True, slots=True)
class SpawnInput:
    """One input of a spawn as the log records it."""

    path: str
    digest: Digest
    is_tool: bool = False


@dataclass(slots=True)
class Spawn:
    """One executed spawn: what it read, where it ran, how long it took."""

    mnemonic: str
    target: str
    runner: str
    inputs: list[SpawnInput] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    walltime_s: float = 0.0
    setup_s: float = 0.0
    fetch_s: float = 0.0


def _seconds(duration: Any) -> float:
    return float(duration.seconds) + float(duration.nanos) / 1e9


def _to_spawn(message: Any) -> Spawn:
    inputs = []
    for entry in message.inputs:
        if entry.symlink_target_path:
            continue
        hash_hex = entry.digest.hash
        try:
            digest = Digest(hash_hex.lower(), int(entry.digest.size_bytes)) if hash_hex else EMPTY_DIGEST
        except DigestError as exc:
            raise ProtocolError(f"execution log input {entry.path!r}: {exc}") from None
        inputs.append(SpawnInput(entry.path, digest, bool(entry.is_tool)))
    walltime = _seconds(message.walltime) if message.HasField("walltime") else 0.0
    if not walltime and message.HasField("metrics"):
        walltime = _seconds(message.metrics.total_time)
    metrics = message.metrics
    return Spawn(
        mnemonic=message.mnemonic or "(none)",
        target=message.target_label,
        runner=message.runner,
        inputs=inputs,
        outputs=list(message.listed_outputs),
        walltime_s=walltime,
        setup_s=_seconds(metrics.setup_time) if message.HasField("metrics") else 0.0,
        fetch_s=_seconds(metrics.fetch_time) if message.HasField("metrics") else 0.0,
    )


def read_exec_log(path: Path) -> Iterator[Spawn]:
    """Every spawn in a JSON or binary execution log."""
    from google.protobuf import json_format

    from treemat import protos
    from treemat.framing import read_delimited

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TreematError(f"cannot read execution log {path}: {exc.strerror}") from None
    if data.lstrip()[:1] == b"{":
        text = data.decode("utf-8", "replace")
        decoder = json.JSONDecoder()
        index = 0
        while True:
            while index < len(text) and text[index].isspace():
                index += 1
            if index >= len(text):
                return
            try:
                obj, index = decoder.raw_decode(text, index)
            except ValueError as exc:
                raise ProtocolError(f"{path}: invalid JSON execution log near byte {index}: {exc}") from None
            message = protos.SpawnExec()
            try:
                json_format.ParseDict(obj, message, ignore_unknown_fields=True)
            except json_format.ParseError as exc:
                raise ProtocolError(f"{path}: not a SpawnExec: {exc}") from None
            yield _to_spawn(message)
    else:
        import io

        stream = io.BytesIO(data)
        while True:
            message = read_delimited(stream, protos.SpawnExec)
            if message is None:
                return
            yield _to_spawn(message)
