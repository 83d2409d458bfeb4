"""Tests for treemat.protos (wire compatibility with upstream field numbers) and protocol.py's delimited framing."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from treemat import framing, protos
from treemat.errors import ProtocolError

from tests.support.harness import worker_env


def test_directory_encoding_matches_hand_computed_bytes() -> None:
    directory = protos.Directory()
    node = directory.files.add(name="a", is_executable=True)
    node.digest.hash, node.digest.size_bytes = "ab", 3
    # files=1 (LEN 13): name=1 "a", digest=2 (LEN 6: hash=1 "ab", size_bytes=2 varint 3), is_executable=4 true
    assert directory.SerializeToString(deterministic=True) == bytes.fromhex("0a0d0a016112060a02616210032001")


def test_work_request_and_response_field_numbers() -> None:
    request = protos.WorkRequest(arguments=["x"], request_id=5)
    request.inputs.add(path="p", digest=b"ff")
    assert request.SerializeToString(deterministic=True) == bytes.fromhex("0a017812070a0170120266661805")
    response = protos.WorkResponse(exit_code=1, output="o", request_id=2, was_cancelled=True)
    assert response.SerializeToString(deterministic=True) == bytes.fromhex("080112016f18022001")


def test_delimited_round_trip_and_eof() -> None:
    stream = io.BytesIO()
    for rid in (1, 300):
        framing.write_delimited(stream, protos.WorkRequest(request_id=rid, arguments=["a" * 200]))
    stream.seek(0)
    first = framing.read_delimited(stream, protos.WorkRequest)
    second = framing.read_delimited(stream, protos.WorkRequest)
    assert first is not None and second is not None
    assert (first.request_id, second.request_id) == (1, 300)
    assert framing.read_delimited(stream, protos.WorkRequest) is None


def test_truncated_message_is_a_protocol_error() -> None:
    stream = io.BytesIO(framing.encode_varint(50) + b"short")
    with pytest.raises(ProtocolError, match="truncated"):
        framing.read_delimited(stream, protos.WorkRequest)


def test_spawn_exec_parses_execution_log_fields() -> None:
    spawn = protos.SpawnExec(mnemonic="SwiftCompile", target_label="//a:b")
    entry = spawn.inputs.add(path="a.swift")
    entry.digest.hash, entry.digest.size_bytes = "00" * 32, 10
    spawn.walltime.seconds = 2
    decoded = protos.SpawnExec.FromString(spawn.SerializeToString())
    assert decoded.inputs[0].digest.size_bytes == 10
    assert decoded.walltime.seconds == 2 and decoded.mnemonic == "SwiftCompile"


def _reference_descriptor(
    name: str, package: str, messages: list[protos.MessageSpec], dependencies: tuple[str, ...]
) -> bytes:
    """The same file descriptor built with protobuf's own descriptor_pb2 (what protos.py did at import)."""
    from google.protobuf import descriptor_pb2

    kinds = {"string": 9, "bytes": 12, "bool": 8, "int32": 5, "int64": 3}
    proto = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto3")
    proto.dependency.extend(dependencies)
    for message_name, fields in messages:
        message = proto.message_type.add(name=message_name)
        for field_name, number, kind, repeated in fields:
            field = message.field.add(name=field_name, number=number, label=3 if repeated else 1)
            if kind in kinds:
                field.type = kinds[kind]  # type: ignore[assignment]
            else:
                field.type, field.type_name = 11, kind  # type: ignore[assignment]
    return proto.SerializeToString()


@pytest.mark.parametrize(
    ("package", "messages", "dependencies"),
    [
        (protos._REAPI, protos._REAPI_MESSAGES, ()),
        (protos._WORKER, protos._WORKER_MESSAGES, ()),
        (protos._SPAWN, protos._SPAWN_MESSAGES, ("google/protobuf/duration.proto",)),
    ],
)
def test_hand_encoded_file_descriptors_are_protobufs_own_bytes(
    package: str, messages: list[protos.MessageSpec], dependencies: tuple[str, ...]
) -> None:
    """protos.py encodes its descriptors itself (descriptor_pb2 cost 15-40 ms of a worker's start)."""
    name = f"treemat/{package}.proto"
    assert protos.file_descriptor(name, package, messages, dependencies) == _reference_descriptor(
        name, package, messages, dependencies
    )


def test_the_workers_messages_import_no_pure_python_protobuf() -> None:
    """The worker's and REAPI's classes are made by upb's own metaclass: descriptor_pool and message_factory import
    the pure-Python implementation and text_format whichever runs (~15-35 ms of every fresh worker's start)."""
    probe = (
        "import sys; import treemat.protos as protos; request = protos.WorkRequest(request_id=3);"
        " request.inputs.add(path='p');"
        " decoded = protos.WorkRequest.FromString(request.SerializeToString());"
        " print(type(decoded.inputs[0]) is protos.Input, decoded.request_id,"
        " sorted({'google.protobuf.descriptor_pool', 'google.protobuf.message_factory',"
        " 'google.protobuf.internal.python_message', 'google.protobuf.text_format'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=worker_env(), capture_output=True, text=True, check=False)
    assert done.stdout == "True 3 []\n", (done.stdout, done.stderr)


@pytest.mark.parametrize("implementation", ["python", "upb"])
def test_messages_keep_their_encoding_under_the_implementation_protobuf_was_asked_for(implementation: str) -> None:
    """PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python: the classes come from protobuf's public API (upb's own
    metaclass only where upb is what protobuf uses), and both encode and decode alike."""
    probe = (
        "from google.protobuf.internal import api_implementation; import treemat.protos as protos;"
        " request = protos.WorkRequest(arguments=['x'], request_id=5); request.inputs.add(path='p', digest=b'ff');"
        " data = request.SerializeToString(deterministic=True);"
        " print(api_implementation.Type(), data.hex(), protos.WorkRequest.FromString(data).inputs[0].path,"
        " type(protos.WorkRequest).__module__)"
    )
    env = {**worker_env(), "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": implementation}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=False)
    kind, data, path, metaclass = done.stdout.split()
    assert (kind, data, path) == (implementation, "0a017812070a0170120266661805", "p"), done.stderr
    assert metaclass.startswith("google.protobuf.internal" if implementation == "python" else "google._upb"), metaclass
