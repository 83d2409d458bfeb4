"""Protobuf messages treemat speaks, built at import time from descriptors (no protoc, no generated code).

The file descriptors are encoded here by hand (a few dozen bytes each): importing protobuf's descriptor_pb2 to
build them took 15-40 ms of every worker's start. The execution-log messages (SpawnExec, which needs the
well-known Duration: another 15 ms) are built on first use.

Field names and numbers match upstream exactly, so encodings are wire-compatible:
REAPI `build.bazel.remote.execution.v2` (Directory & friends; canonical Merkle encoding), Bazel's
`blaze.worker` worker protocol, and Bazel's `tools.protos` execution log (SpawnExec). Length-delimited framing
is in protocol.py; tests/treemat/test_schemas.py holds these declarations against the upstream .proto files.
"""

from __future__ import annotations

import os
from typing import Any

from google.protobuf.message import Message

try:  # protobuf's C core (upb, protobuf >= 4.21): its pool and classes without descriptor_pool / message_factory,
    # which import the pure-Python implementation and text_format whatever runs (~15-35 ms of a worker's start)
    from google._upb import _message as _upb_found

    _upb_message: Any = _upb_found
except ImportError:  # pragma: no cover - a protobuf without upb: the public API
    _upb_message = None

# FieldDescriptorProto's Type and Label values (descriptor.proto)
TYPE_MESSAGE = 11
_SCALARS = {"string": 9, "bytes": 12, "bool": 8, "int32": 5, "int64": 3}
LABEL_OPTIONAL, LABEL_REPEATED = 1, 3

# (message name, [(field name, number, type or ".pkg.Message", repeated)])
FieldSpec = tuple[str, int, str, bool]
MessageSpec = tuple[str, list[FieldSpec]]

_REAPI = "build.bazel.remote.execution.v2"
_REAPI_MESSAGES: list[MessageSpec] = [
    ("Digest", [("hash", 1, "string", False), ("size_bytes", 2, "int64", False)]),
    (
        "FileNode",
        [("name", 1, "string", False), ("digest", 2, f".{_REAPI}.Digest", False), ("is_executable", 4, "bool", False)],
    ),
    ("DirectoryNode", [("name", 1, "string", False), ("digest", 2, f".{_REAPI}.Digest", False)]),
    ("SymlinkNode", [("name", 1, "string", False), ("target", 2, "string", False)]),
    (
        "Directory",
        [
            ("files", 1, f".{_REAPI}.FileNode", True),
            ("directories", 2, f".{_REAPI}.DirectoryNode", True),
            ("symlinks", 3, f".{_REAPI}.SymlinkNode", True),
        ],
    ),
]

_WORKER = "blaze.worker"
_WORKER_MESSAGES: list[MessageSpec] = [
    ("Input", [("path", 1, "string", False), ("digest", 2, "bytes", False)]),
    (
        "WorkRequest",
        [
            ("arguments", 1, "string", True),
            ("inputs", 2, f".{_WORKER}.Input", True),
            ("request_id", 3, "int32", False),
            ("cancel", 4, "bool", False),
            ("verbosity", 5, "int32", False),
            ("sandbox_dir", 6, "string", False),
        ],
    ),
    (
        "WorkResponse",
        [
            ("exit_code", 1, "int32", False),
            ("output", 2, "string", False),
            ("request_id", 3, "int32", False),
            ("was_cancelled", 4, "bool", False),
        ],
    ),
]

_SPAWN = "tools.protos"
_SPAWN_MESSAGES: list[MessageSpec] = [
    (
        "Digest",
        [("hash", 1, "string", False), ("size_bytes", 2, "int64", False), ("hash_function_name", 3, "string", False)],
    ),
    (
        "File",
        [
            ("path", 1, "string", False),
            ("digest", 2, f".{_SPAWN}.Digest", False),
            ("is_tool", 3, "bool", False),
            ("symlink_target_path", 4, "string", False),
        ],
    ),
    ("EnvironmentVariable", [("name", 1, "string", False), ("value", 2, "string", False)]),
    (
        "SpawnMetrics",
        [
            ("total_time", 1, ".google.protobuf.Duration", False),
            ("parse_time", 2, ".google.protobuf.Duration", False),
            ("fetch_time", 4, ".google.protobuf.Duration", False),
            ("queue_time", 5, ".google.protobuf.Duration", False),
            ("setup_time", 6, ".google.protobuf.Duration", False),
            ("execution_wall_time", 8, ".google.protobuf.Duration", False),
            ("input_bytes", 11, "int64", False),
            ("input_files", 12, "int64", False),
        ],
    ),
    (
        "SpawnExec",
        [
            ("command_args", 1, "string", True),
            ("environment_variables", 2, f".{_SPAWN}.EnvironmentVariable", True),
            ("inputs", 4, f".{_SPAWN}.File", True),
            ("listed_outputs", 5, "string", True),
            ("remotable", 6, "bool", False),
            ("cacheable", 7, "bool", False),
            ("timeout_millis", 8, "int64", False),
            ("mnemonic", 10, "string", False),
            ("actual_outputs", 11, f".{_SPAWN}.File", True),
            ("runner", 12, "string", False),
            ("cache_hit", 13, "bool", False),
            ("status", 14, "string", False),
            ("exit_code", 15, "int32", False),
            ("remote_cacheable", 16, "bool", False),
            ("walltime", 17, ".google.protobuf.Duration", False),  # Bazel <= 6; reserved later
            ("target_label", 18, "string", False),
            ("digest", 19, f".{_SPAWN}.Digest", False),
            ("metrics", 20, f".{_SPAWN}.SpawnMetrics", False),
        ],
    ),
]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, value: str | bytes | int) -> bytes:
    """One field of a descriptor message: a varint, or length-delimited bytes / text."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def file_descriptor(name: str, package: str, messages: list[MessageSpec], dependencies: tuple[str, ...] = ()) -> bytes:
    """A serialized proto3 FileDescriptorProto for `messages` in `package` (fields in number order, as protobuf
    itself writes them: tests/treemat/test_protos.py compares with descriptor_pb2's bytes)."""
    out = _field(1, name) + _field(2, package) + b"".join(_field(3, dependency) for dependency in dependencies)
    for message_name, fields in messages:
        body = _field(1, message_name)
        for field_name, number, kind, repeated in fields:
            label = LABEL_REPEATED if repeated else LABEL_OPTIONAL
            typed = _field(5, _SCALARS[kind]) if kind in _SCALARS else _field(5, TYPE_MESSAGE) + _field(6, kind)
            body += _field(2, _field(1, field_name) + _field(3, number) + _field(4, label) + typed)
        out += _field(4, body)
    return out + _field(12, "proto3")


def upb_direct() -> bool:
    """Whether classes are made by upb's own metaclass: upb is there and no other implementation was asked for
    (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION, or one protobuf chose already in this process)."""
    import sys

    chosen = sys.modules.get("google.protobuf.internal.api_implementation")
    if chosen is not None and chosen.Type() != "upb":
        return False
    return _upb_message is not None and os.environ.get("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "upb") == "upb"


def build_messages(
    serialized: bytes, package: str, messages: list[MessageSpec], *, duration: bool = False
) -> dict[str, type[Message]]:
    """Message classes for every message of a serialized file descriptor, in a private descriptor pool."""
    if upb_direct() and not duration:  # what message_factory does for upb, minus its imports
        pool = _upb_message.DescriptorPool()
        pool.AddSerializedFile(serialized)
        return {
            name: _upb_message.MessageMeta(
                name, (Message,), {"DESCRIPTOR": pool.FindMessageTypeByName(f"{package}.{name}"), "__module__": None}
            )
            for name, _ in messages
        }
    from google.protobuf import descriptor_pool, message_factory

    public_pool = descriptor_pool.DescriptorPool()
    if duration:  # the well-known Duration type (its JSON helpers), so proto3 JSON reads Bazel's "1.5s" strings
        from google.protobuf import duration_pb2

        public_pool.AddSerializedFile(duration_pb2.DESCRIPTOR.serialized_pb)
    public_pool.AddSerializedFile(serialized)
    return {
        name: message_factory.GetMessageClass(public_pool.FindMessageTypeByName(f"{package}.{name}"))
        for name, _ in messages
    }


_reapi = build_messages(file_descriptor("treemat/reapi.proto", _REAPI, _REAPI_MESSAGES), _REAPI, _REAPI_MESSAGES)
_worker = build_messages(
    file_descriptor("treemat/worker_protocol.proto", _WORKER, _WORKER_MESSAGES), _WORKER, _WORKER_MESSAGES
)
_DURATION = "google/protobuf/duration.proto"


def __getattr__(name: str) -> Any:
    """SpawnExec, built on first use (only `treemat replay` and the execution log need it)."""
    if name != "SpawnExec":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    serialized = file_descriptor("treemat/spawn.proto", _SPAWN, _SPAWN_MESSAGES, dependencies=(_DURATION,))
    spawn_exec = build_messages(serialized, _SPAWN, _SPAWN_MESSAGES, duration=True)["SpawnExec"]
    globals()["SpawnExec"] = spawn_exec
    return spawn_exec


# Module-level message *classes* (immutable types, not mutable state).
Digest: Any = _reapi["Digest"]
FileNode: Any = _reapi["FileNode"]
DirectoryNode: Any = _reapi["DirectoryNode"]
SymlinkNode: Any = _reapi["SymlinkNode"]
Directory: Any = _reapi["Directory"]
Input: Any = _worker["Input"]
WorkRequest: Any = _worker["WorkRequest"]
WorkResponse: Any = _worker["WorkResponse"]
