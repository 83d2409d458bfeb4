"""Tests for treemat.execlog and treemat.replay on logs in Bazel's JSON and binary formats."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from google.protobuf import json_format
from treemat import framing, protos
from treemat.digest import digest_bytes
from treemat.errors import ProtocolError
from treemat.execlog import read_exec_log
from treemat.layout import Root
from treemat.replay import replay


def _spawn(execroot: Path, mnemonic: str, files: dict[str, bytes]) -> object:
    message = protos.SpawnExec(mnemonic=mnemonic, target_label="//pkg:t", runner="linux-sandbox")
    for path, data in files.items():
        (execroot / path).parent.mkdir(parents=True, exist_ok=True)
        (execroot / path).write_bytes(data)
        entry = message.inputs.add(path=path)
        if data:  # Bazel omits the digest of empty files
            digest = digest_bytes(data)
            entry.digest.hash, entry.digest.size_bytes = digest.hash, digest.size
            entry.digest.hash_function_name = "SHA-256"
    message.listed_outputs.append("bazel-out/out.o")
    message.walltime.seconds, message.walltime.nanos = 1, 500_000_000
    return message


@pytest.fixture()
def logs(tmp_path: Path) -> tuple[Path, Path, Path]:
    execroot = tmp_path / "execroot"
    spawns = [
        _spawn(execroot, "SwiftCompile", {f"src/f{i}.swift": b"let x = %d\n" % i for i in range(20)} | {"e": b""}),
        _spawn(execroot, "SwiftCompile", {"src/f0.swift": b"let x = 0\n", "gone/g.bin": b"vanished" * 100}),
        _spawn(execroot, "CppLink", {"lib/a.o": b"\x7fELF" * 64}),
    ]
    (execroot / "gone/g.bin").unlink()  # content no longer in the execroot: must be synthesized
    json_log = tmp_path / "log.json"
    # Bazel writes pretty-printed proto3 JSON objects back to back
    json_log.write_text("".join(json_format.MessageToJson(s) for s in spawns))  # type: ignore[arg-type]
    binary_log = tmp_path / "log.bin"
    stream = io.BytesIO()
    for spawn in spawns:
        framing.write_delimited(stream, spawn)  # type: ignore[arg-type]
    binary_log.write_bytes(stream.getvalue())
    return json_log, binary_log, execroot


def test_json_and_binary_logs_read_the_same(logs: tuple[Path, Path, Path]) -> None:
    json_log, binary_log, _ = logs
    from_json, from_binary = list(read_exec_log(json_log)), list(read_exec_log(binary_log))
    assert from_json == from_binary
    assert [s.mnemonic for s in from_json] == ["SwiftCompile", "SwiftCompile", "CppLink"]
    first = from_json[0]
    assert len(first.inputs) == 21 and first.walltime_s == 1.5 and first.outputs == ["bazel-out/out.o"]
    assert next(i for i in first.inputs if i.path == "e").digest.is_empty


def test_bad_logs_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"mnemonic": "X"} {not json')
    with pytest.raises(ProtocolError, match="invalid JSON"):
        list(read_exec_log(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"inputs": "not a list"}))
    with pytest.raises(ProtocolError, match="SpawnExec"):
        list(read_exec_log(wrong))


def test_replay_reports_every_backend(logs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    json_log, _, execroot = logs
    report = replay(json_log, layout=Root(tmp_path / "root"), execroot=execroot)
    assert report.spawns == 3
    assert report.blobs_synthesized == 1 and report.blobs_from_execroot == 21
    swift = report.rows["SwiftCompile"]
    assert swift.spawns == 2 and swift.files == 23 and swift.log_walltime_s == 3.0
    assert {"hardlink", "copy"} <= set(swift.staging_ms)
    table = report.to_table()
    assert "SwiftCompile" in table and "saved vs copy" in table
    assert json.loads(json.dumps(report.to_json()))["spawns"] == 3
    limited = replay(json_log, layout=Root(tmp_path / "root2"), limit=1, mnemonics={"CppLink"})
    assert limited.spawns == 1 and list(limited.rows) == ["CppLink"]


def test_json_durations_in_bazel_string_form(tmp_path: Path) -> None:
    log = tmp_path / "modern.json"
    log.write_text(
        json.dumps({"mnemonic": "SwiftCompile", "walltime": "1.500s", "metrics": {"setupTime": "0.250s"}})
        + "\n"
        + json.dumps({"mnemonic": "CppLink", "metrics": {"totalTime": "2s", "fetchTime": "0.1s"}})
    )
    first, second = read_exec_log(log)
    assert (first.walltime_s, first.setup_s) == (1.5, 0.25)
    assert (second.walltime_s, second.fetch_s) == (2.0, 0.1)
