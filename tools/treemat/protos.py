"""Protobuf messages treemat speaks, built at import time from descriptors (no protoc, no generated code).

Field names and numbers match upstream exactly, so encodings are wire-compatible:
REAPI `build.bazel.remote.execution.v2` (Directory & friends; canonical Merkle encoding), Bazel's
`blaze.worker` worker protocol, and Bazel's `tools.protos` execution log (SpawnExec). Length-delimited framing
is in protocol.py; tests/treemat/test_schemas.py holds these declarations against the upstream .proto files.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, message_factory
from google.protobuf.message import Message

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
    "bool": _F.TYPE_BOOL,
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
}

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


def file_proto(
    name: str, package: str, messages: list[MessageSpec], dependencies: tuple[str, ...] = ()
) -> descriptor_pb2.FileDescriptorProto:
    """A proto3 FileDescriptorProto for `messages` in `package`."""
    proto = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto3")
    proto.dependency.extend(dependencies)
    for message_name, fields in messages:
        message = proto.message_type.add(name=message_name)
        for field_name, number, kind, repeated in fields:
            field = message.field.add(name=field_name, number=number)
            field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
            if kind in _SCALARS:
                field.type = _SCALARS[kind]  # type: ignore[assignment]
            else:
                field.type = _F.TYPE_MESSAGE
                field.type_name = kind
    return proto


def build_messages(proto: descriptor_pb2.FileDescriptorProto) -> dict[str, type[Message]]:
    """Message classes for every top-level message of `proto`, in a private descriptor pool."""
    pool = descriptor_pool.DescriptorPool()
    if "google/protobuf/duration.proto" in proto.dependency:
        # the well-known Duration type, so proto3 JSON reads Bazel's "1.5s" strings
        pool.AddSerializedFile(duration_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(proto)
    classes: dict[str, type[Message]] = {}
    for message in proto.message_type:
        descriptor = pool.FindMessageTypeByName(f"{proto.package}.{message.name}")
        classes[message.name] = message_factory.GetMessageClass(descriptor)
    return classes


_reapi = build_messages(file_proto("treemat/reapi.proto", _REAPI, _REAPI_MESSAGES))
_worker = build_messages(file_proto("treemat/worker_protocol.proto", _WORKER, _WORKER_MESSAGES))
_spawn = build_messages(
    file_proto("treemat/spawn.proto", _SPAWN, _SPAWN_MESSAGES, dependencies=("google/protobuf/duration.proto",))
)

# Module-level message *classes* (immutable types, not mutable state).
Digest: Any = _reapi["Digest"]
FileNode: Any = _reapi["FileNode"]
DirectoryNode: Any = _reapi["DirectoryNode"]
SymlinkNode: Any = _reapi["SymlinkNode"]
Directory: Any = _reapi["Directory"]
Input: Any = _worker["Input"]
WorkRequest: Any = _worker["WorkRequest"]
WorkResponse: Any = _worker["WorkResponse"]
SpawnExec: Any = _spawn["SpawnExec"]
