"""protos.py declares its protobuf schemas by hand; this holds them against the real ones.

Bazel's `worker_protocol.proto` and `spawn.proto` (its embedded tools; Debian installs them under
/usr/share/bazel) are compiled with grpcio-tools' protoc; REAPI comes from the generated modules BuildGrid
ships. Every message treemat declares must exist upstream, and every field must agree in name, number, type,
label and message type. Upstream fields treemat leaves out, and treemat fields only some Bazel versions have,
are listed below with the reason: anything else is drift and fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from treemat import protos

EMBEDDED_PROTOS = [
    Path(os.environ["TREEMAT_BAZEL_PROTOS"]) if os.environ.get("TREEMAT_BAZEL_PROTOS") else None,
    Path("/usr/share/bazel/embedded_tools/src/main/protobuf"),  # Debian's bazel-bootstrap
]

# Upstream fields treemat does not declare (parsing skips them as unknown fields; treemat never writes them).
OMITTED: dict[str, set[str]] = {
    "blaze.worker.WorkRequest": set(),
    "blaze.worker.WorkResponse": set(),
    "blaze.worker.Input": set(),
    "tools.protos.SpawnExec": {"platform", "progress_message"},  # not used by `treemat replay`
    "tools.protos.SpawnMetrics": {
        "network_time",
        "process_outputs_time",
        "upload_time",
        "retry_time",
        "memory_estimate_bytes",
        "input_bytes_limit",
        "input_files_limit",
        "output_bytes",
        "output_files",
        "output_bytes_limit",
        "output_files_limit",
        "temporary_disk_bytes_limit",
        "start_time",
        "execution_wall_time_ms",
    },
    "build.bazel.remote.execution.v2.FileNode": {"node_properties"},  # treemat's Merkle trees carry none
    "build.bazel.remote.execution.v2.SymlinkNode": {"node_properties"},
    "build.bazel.remote.execution.v2.Directory": {"node_properties"},
}
# treemat fields that only some Bazel versions declare: (message, field number) -> the names it has had.
VERSION_DEPENDENT: dict[tuple[str, int], set[str]] = {
    ("blaze.worker.WorkRequest", 5): {"verbosity"},  # Bazel >= 5
    ("blaze.worker.WorkRequest", 6): {"sandbox_dir"},  # Bazel >= 5
    ("tools.protos.File", 3): {"is_tool"},  # Bazel >= 5
    ("tools.protos.File", 4): {"symlink_target_path"},  # Bazel >= 6
    ("tools.protos.SpawnExec", 13): {"cache_hit", "remote_cache_hit"},  # renamed in Bazel 5
    ("tools.protos.SpawnExec", 17): {"walltime"},  # Bazel 5..6; reserved since 7
    ("tools.protos.SpawnExec", 18): {"target_label"},  # Bazel >= 5
    ("tools.protos.SpawnExec", 19): {"digest"},  # Bazel >= 5
    ("tools.protos.SpawnExec", 20): {"metrics"},  # Bazel >= 5
}
# treemat messages only some Bazel versions declare.
VERSION_DEPENDENT_MESSAGES = {"tools.protos.SpawnMetrics"}  # Bazel >= 5


def _messages(files: list[descriptor_pb2.FileDescriptorProto]) -> dict[str, descriptor_pb2.DescriptorProto]:
    found: dict[str, descriptor_pb2.DescriptorProto] = {}
    for file in files:
        for message in file.message_type:
            found[f"{file.package}.{message.name}"] = message
    return found


def _treemat(*classes: object) -> dict[str, descriptor_pb2.DescriptorProto]:
    files = []
    for cls in classes:
        proto = descriptor_pb2.FileDescriptorProto()
        cls.DESCRIPTOR.file.CopyToProto(proto)  # type: ignore[attr-defined]
        files.append(proto)
    return _messages(files)


def _compile(tmp_path: Path, *names: str) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Upstream .proto files -> descriptors, with grpcio-tools' protoc."""
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (the dev extra) compiles the protos")
    source = next((d for d in EMBEDDED_PROTOS if d is not None and (d / names[0]).is_file()), None)
    if source is None:
        pytest.skip("Bazel's embedded protos not found (set TREEMAT_BAZEL_PROTOS to .../src/main/protobuf)")
    well_known = Path(protoc.__file__).parent / "_proto"
    out = tmp_path / "descriptors.pb"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{source}",
            f"-I{well_known}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            *names,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return _messages([f for f in files if f.name in names])


def _drift(
    ours: dict[str, descriptor_pb2.DescriptorProto], upstream: dict[str, descriptor_pb2.DescriptorProto]
) -> list[str]:
    problems = []
    for name, message in sorted(ours.items()):
        if name not in upstream:
            if name not in VERSION_DEPENDENT_MESSAGES:
                problems.append(f"{name}: no such message upstream")
            continue
        theirs = {field.number: field for field in upstream[name].field}
        mine = {field.number: field for field in message.field}
        for number, field in sorted(mine.items()):
            other = theirs.get(number)
            allowed = VERSION_DEPENDENT.get((name, number))
            if other is None:
                if allowed is None or field.name not in allowed:
                    problems.append(f"{name}.{field.name} = {number}: not upstream")
                continue
            if other.name != field.name and (allowed is None or {field.name, other.name} - allowed):
                problems.append(f"{name} field {number}: treemat calls it {field.name}, upstream {other.name}")
            for attribute in ("type", "label", "type_name"):
                if getattr(field, attribute) != getattr(other, attribute):
                    problems.append(
                        f"{name}.{field.name}: {attribute} {getattr(field, attribute)!r} "
                        f"!= upstream {getattr(other, attribute)!r}"
                    )
        missing = {theirs[n].name for n in theirs.keys() - mine.keys()} - OMITTED.get(name, set())
        problems.extend(f"{name}.{field}: upstream field treemat does not declare" for field in sorted(missing))
    return problems


def test_worker_protocol_matches_bazel(tmp_path: Path) -> None:
    upstream = _compile(tmp_path, "worker_protocol.proto")
    ours = _treemat(protos.WorkRequest)
    assert set(ours) == {"blaze.worker.Input", "blaze.worker.WorkRequest", "blaze.worker.WorkResponse"}
    assert _drift(ours, upstream) == []


def test_execution_log_schema_matches_bazel(tmp_path: Path) -> None:
    upstream = _compile(tmp_path, "spawn.proto")
    ours = _treemat(protos.SpawnExec)
    assert "tools.protos.SpawnExec" in ours
    assert _drift(ours, upstream) == []


def test_reapi_directory_schema_matches_buildgrid() -> None:
    remote_execution_pb2 = pytest.importorskip(
        "buildgrid._protos.build.bazel.remote.execution.v2.remote_execution_pb2", reason="the `bot` extra"
    )
    upstream_file = descriptor_pb2.FileDescriptorProto()
    remote_execution_pb2.DESCRIPTOR.CopyToProto(upstream_file)
    ours = _treemat(protos.Directory)
    assert set(ours) == {
        f"build.bazel.remote.execution.v2.{n}"
        for n in ("Digest", "FileNode", "DirectoryNode", "SymlinkNode", "Directory")
    }
    assert _drift(ours, _messages([upstream_file])) == []


def test_drift_is_detected() -> None:
    """The comparison itself can fail: a renumbered, retyped or unknown field is reported."""
    ours = _treemat(protos.WorkRequest)
    upstream = {name: descriptor_pb2.DescriptorProto() for name in ours}
    for name, message in ours.items():
        upstream[name].CopyFrom(message)
    upstream["blaze.worker.WorkResponse"].field[0].number = 9
    upstream["blaze.worker.Input"].field[1].type = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    upstream["blaze.worker.WorkRequest"].field.add(name="new_field", number=7, type=9, label=1)
    problems = _drift(ours, upstream)
    assert any("WorkResponse.exit_code = 1: not upstream" in p for p in problems), problems
    assert any("upstream field treemat does not declare" in p and "exit_code" in p for p in problems), problems
    assert any("Input.digest: type" in p for p in problems), problems
    assert any("WorkRequest.new_field" in p for p in problems), problems
