"""Smaller holes an adversarial review found: each test here failed on the code before its fix."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from treemat import framing, protos
from treemat.executor import ActionExecutor, ActionRequest, ActionResult, RequestInput
from treemat.flagfile import ActionSpec
from treemat.layout import Root
from treemat.sandbox import EXEC_ROOT
from treemat.stack import open_stack

from ..support.harness import Worker, request

IN_BYTES = b"declared input\n"


@pytest.fixture
def execroot(tmp_path: Path) -> Path:
    root = tmp_path / "execroot"
    (root / "in").mkdir(parents=True)
    (root / "in/a.txt").write_bytes(IN_BYTES)
    return root


@pytest.fixture
def worker(execroot: Path, tmp_path: Path) -> Iterator[Worker]:
    live = Worker(execroot, tmp_path / "root", extra=["--max-workers=4"])
    try:
        yield live
    finally:
        live.proc.kill()
        live.proc.wait()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------- the worker protocol


def test_a_request_id_already_in_flight_is_refused_and_its_cancel_reaches_the_first(
    execroot: Path, worker: Worker
) -> None:
    slow = request(execroot, ["in/a.txt"], ["out/slow"], ["sh", "-c", "sleep 60; touch out/slow"], 5)
    worker.send(slow, slow)  # the first is in flight once read: the worker reads requests one by one
    refused = worker.read()
    assert refused["requestId"] == 5 and refused["exitCode"] == 1, refused
    assert "already in flight" in refused["output"] and refused["output"].count("\n") == 1, refused
    worker.send({"requestId": 5, "cancel": True})
    cancelled = worker.read()
    assert cancelled["requestId"] == 5 and cancelled.get("wasCancelled") is True, cancelled
    worker.send(request(execroot, ["in/a.txt"], ["out/after"], ["cp", "in/a.txt", "out/after"], 5))
    after = worker.read()
    assert after["requestId"] == 5 and after["exitCode"] == 0, "the id is free again once its action ended"
    assert (execroot / "out/after").read_bytes() == IN_BYTES
    assert not (execroot / "out/slow").exists()


def test_sandbox_dir_is_refused_naming_the_field(execroot: Path, worker: Worker) -> None:
    body = request(execroot, ["in/a.txt"], ["out/x"], ["cp", "in/a.txt", "out/x"], 3)
    worker.send({**body, "sandboxDir": "__sandbox/3/_main"})
    reply = worker.read()
    assert reply["requestId"] == 3 and reply["exitCode"] == 1, reply
    assert "sandbox_dir" in reply["output"] and reply["output"].count("\n") == 1, reply
    assert "--experimental_worker_multiplex_sandboxing" in reply["output"]
    assert not (execroot / "out/x").exists()
    worker.send(body)
    assert worker.read()["exitCode"] == 0, "the worker keeps serving"


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["sh", "-c", "echo a\0b > out/x"], [], "argument 2"),
        (["s\0h", "-c", "echo hi > out/x"], [], "argument 0"),
        (["sh", "-c", "echo $A > out/x"], ["--env=A=x\0y"], "environment variable 'A'"),
    ],
    ids=["argument", "program", "environment"],
)
def test_a_nul_byte_in_the_tools_command_is_a_one_line_refusal(
    argv: list[str], env: list[str], named: str, execroot: Path, worker: Worker
) -> None:
    """exec takes no NUL byte: the sandbox's init died on it and the reply was exit 126 with no word."""
    body = request(execroot, ["in/a.txt"], ["out/x"], argv, 7)
    body["arguments"] = [*env, *body["arguments"]]
    worker.send(body)
    reply = worker.read()
    assert reply["requestId"] == 7 and reply["exitCode"] == 1, reply
    assert f"{named} contains a NUL byte" in reply["output"] and reply["output"].count("\n") == 1, reply
    worker.send(request(execroot, ["in/a.txt"], ["out/x"], ["cp", "in/a.txt", "out/x"], 8))
    assert worker.read()["exitCode"] == 0, "the worker keeps serving"


def test_sandbox_dir_is_refused_in_proto_requests_too(execroot: Path, tmp_path: Path) -> None:
    live = Worker(execroot, tmp_path / "root", protocol="proto")
    try:
        message = protos.WorkRequest(
            arguments=["--output=out/p", "--", "cp", "in/a.txt", "out/p"], request_id=4, sandbox_dir="sb/4"
        )
        message.inputs.add(path="in/a.txt", digest=_sha(IN_BYTES).encode())
        framing.write_delimited(live.stdin, message)
        live.stdin.flush()
        reply = framing.read_delimited(live.stdout, protos.WorkResponse)
        assert reply is not None and reply.request_id == 4 and reply.exit_code == 1
        assert "sandbox_dir" in reply.output and reply.output.count("\n") == 1, reply.output
        assert not (execroot / "out/p").exists()
    finally:
        live.proc.kill()
        live.proc.wait()


# ----------------------------------------------------------------------------------- input paths


def _executor(root: Path) -> ActionExecutor:
    return open_stack(Root(root), background_cleanup=False).executor


def _execute(executor: ActionExecutor, execroot: Path, script: str, outputs: list[str], *inputs: str) -> ActionResult:
    listed = [RequestInput(p, _sha((execroot / p).read_bytes()) if (execroot / p).exists() else None) for p in inputs]
    spec = ActionSpec(argv=["sh", "-c", script], outputs=outputs)
    return executor.execute(ActionRequest(spec, listed, execroot))


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "reused-exec-dir"])
def test_a_lone_surrogate_in_an_input_path_is_a_one_line_error_leaking_nothing(
    execroot: Path, tmp_path: Path, warm: bool
) -> None:
    root = tmp_path / "root"
    executor = _executor(root)
    if warm:  # a pooled exec dir for these outputs, which the bad request then leases
        assert _execute(executor, execroot, "cp in/a.txt out/x", ["out/x"], "in/a.txt").exit_code == 0
    result = _execute(executor, execroot, "cp in/a.txt out/x", ["out/x"], "in/a.txt", "in/\ud800bad")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "\\ud800" in result.output and "surrogate" in result.output, result.output
    assert _execute(executor, execroot, "cp in/a.txt out/y", ["out/y"], "in/a.txt").exit_code == 0, "still serving"
    executor.close()
    assert os.listdir(root / "exec") == [], "no exec dir is left behind"


def test_a_lone_surrogate_reaches_the_worker_as_a_one_line_reply(execroot: Path, worker: Worker) -> None:
    worker.send_raw(b'{"arguments": ["--", "true"], "inputs": [{"path": "in/\\ud800"}], "requestId": 8}')
    reply = worker.read()
    assert reply["requestId"] == 8 and reply["exitCode"] == 1, reply
    assert "surrogate" in reply["output"] and reply["output"].count("\n") == 1, reply
    assert "'in/\\ud800'" in reply["output"] and "internal error" not in reply["output"], "names the path"


# ----------------------------------------------------------------------------------- exec bits


@pytest.mark.parametrize("isolation", ["overlay", "copy-on-write"], ids=["reused-exec-dir", "warm-restaged"])
def test_an_exec_bit_changed_with_the_same_bytes_is_what_the_tool_sees(
    execroot: Path, tmp_path: Path, isolation: str
) -> None:
    tool = execroot / "in/tool.sh"
    tool.write_bytes(b"#!/bin/sh\necho ran\n")
    executor = open_stack(Root(tmp_path / "root"), isolation=isolation, background_cleanup=False).executor
    probe = "if test -x in/tool.sh; then echo x; else echo -; fi > out/m"

    def seen() -> str:
        result = _execute(executor, execroot, probe, ["out/m"], "in/a.txt", "in/tool.sh")
        assert result.exit_code == 0, result.output
        return (execroot / "out/m").read_text().strip()

    for mode, expected in ((0o644, "-"), (0o755, "x"), (0o644, "-"), (0o755, "x")):
        os.chmod(tool, mode)
        assert seen() == expected, f"after chmod {mode:o} (the same bytes)"
    if isolation == "overlay":
        assert executor.counters.get("execpool_reused") >= 3, "the exec dir was reused"
    executor.close()


# ----------------------------------------------------------------------------------- outputs


def _outputs_run(
    executor: ActionExecutor, execroot: Path, script: str, files: list[str], dirs: list[str]
) -> ActionResult:
    spec = ActionSpec(argv=["sh", "-c", script], outputs=files, output_dirs=dirs)
    return executor.execute(ActionRequest(spec, [RequestInput("in/a.txt", _sha(IN_BYTES))], execroot))


def test_an_absolute_symlink_output_to_a_huge_sparse_file_is_copied_sparse(execroot: Path, tmp_path: Path) -> None:
    executor = _executor(tmp_path / "root")
    script = f"truncate -s 100G out/big && printf tail >> out/big && ln -s {EXEC_ROOT}/out/big out/x"
    result = _outputs_run(executor, execroot, script, ["out/x"], [])
    assert result.exit_code == 0, result.output
    copied = os.lstat(execroot / "out/x")
    assert stat.S_ISREG(copied.st_mode) and copied.st_size == (100 << 30) + 4
    assert copied.st_blocks * 512 < 1 << 20, f"densified: {copied.st_blocks * 512} bytes allocated"
    with open(execroot / "out/x", "rb") as handle:
        handle.seek(100 << 30)
        assert handle.read() == b"tail"
    executor.close()


@pytest.mark.parametrize(
    ("script", "files", "dirs"),
    [
        (f"ln -s {EXEC_ROOT} out/x", ["out/x"], []),
        (f"ln -s {EXEC_ROOT}/out out/x", ["out/x"], []),
        ("ln -s .. out/x", ["out/x"], []),
        ("ln -s . out/x", ["out/x"], []),
        (f"mkdir -p out/d && ln -s {EXEC_ROOT}/out/d out/d/loop", [], ["out/d"]),
        (f"mkdir -p out/d/e && ln -s {EXEC_ROOT}/out out/d/e/loop", [], ["out/d"]),
        (f"mkdir -p out/d other && ln -s {EXEC_ROOT}/other out/d/a && ln -s {EXEC_ROOT}/other other/b", [], ["out/d"]),
    ],
    ids=["exec-root", "parent-abs", "parent-rel", "self-rel", "dir-self", "dir-grandparent", "loop-via-other"],
)
def test_a_symlink_output_to_an_ancestor_directory_is_a_clear_refusal(
    execroot: Path, tmp_path: Path, script: str, files: list[str], dirs: list[str]
) -> None:
    executor = _executor(tmp_path / "root")
    result = _outputs_run(executor, execroot, script, files, dirs)
    assert result.exit_code == 1 and "refused" in result.output, result.output
    assert result.output.count("\n") == 1 and "RecursionError" not in result.output, result.output
    executor.close()


def test_an_unreadable_directory_inside_an_output_dir_is_an_error_not_skipped(execroot: Path, tmp_path: Path) -> None:
    executor = _executor(tmp_path / "root")
    script = "mkdir -p out/d/sub && echo hi > out/d/sub/f && echo top > out/d/g && chmod 000 out/d/sub"
    result = _outputs_run(executor, execroot, script, [], ["out/d"])
    copied = execroot / "out/d/sub/f"
    if result.exit_code == 0:  # the worker could read it anyway (root: chmod 000 does not stop it): all copied
        assert os.geteuid() == 0, "an unprivileged worker cannot have read a mode-000 directory"
        assert copied.read_text() == "hi\n" and (execroot / "out/d/g").read_text() == "top\n"
    else:
        assert "'out/d/sub'" in result.output and result.output.count("\n") == 1, result.output
    executor.close()
    assert os.listdir(tmp_path / "root/exec") == [], "nothing left behind either way"


def test_an_output_dir_nested_too_deep_is_a_clear_refusal_and_the_worker_goes_on(
    execroot: Path, tmp_path: Path
) -> None:
    """A tool's output dir 1500 levels deep used to end in 'internal error: RecursionError' (the walk recursed,
    holding two descriptors a level); now a refusal naming the limit."""
    executor = _executor(tmp_path / "root")
    script = (
        "mkdir -p out/d && cd out/d && i=0; while [ $i -lt 1500 ]; do mkdir a && cd a; i=$((i+1)); done; echo x > f"
    )
    result = _outputs_run(executor, execroot, script, [], ["out/d"])
    assert result.exit_code == 1 and "nested deeper than" in result.output, result.output
    assert result.output.count("\n") == 1, result.output
    after = _outputs_run(executor, execroot, "mkdir -p out/d/a && cat in/a.txt > out/d/a/f", [], ["out/d"])
    assert after.exit_code == 0, after.output
    assert (execroot / "out/d/a/f").read_bytes() == IN_BYTES and os.listdir(execroot / "out/d/a") == ["f"]
    executor.close()


def test_a_directory_input_nested_too_deep_is_a_clear_refusal(execroot: Path, tmp_path: Path) -> None:
    """A tree artifact 1500 levels deep in the execroot raised RecursionError out of the executor (os.walk)."""
    fd = os.open(execroot / "in", os.O_RDONLY | os.O_DIRECTORY)
    for _level in range(1500):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)
    executor = _executor(tmp_path / "root")
    spec = ActionSpec(argv=["sh", "-c", "echo ran > out/x"], outputs=["out/x"])
    try:
        result = executor.execute(ActionRequest(spec, [RequestInput("in/d")], execroot))
    finally:
        subprocess.run(["rm", "-rf", str(execroot / "in/d")], check=True)  # (pytest's own removal recurses)
    assert result.exit_code == 1 and "nested deeper than" in result.output, result.output
    assert result.output.count("\n") == 1 and not (execroot / "out/x").exists(), result.output
    assert _execute(executor, execroot, "cat in/a.txt > out/x", ["out/x"], "in/a.txt").exit_code == 0
    assert (execroot / "out/x").read_bytes() == IN_BYTES
    executor.close()
