"""Tests for treemat.executor: inputs, exec bits, directory inputs, stale state recovery, cleanup."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path

import pytest
from treemat.executor import ActionRequest, RequestInput
from treemat.flagfile import ActionSpec
from treemat.locking import ForkGate
from treemat.sandbox import EXEC_ROOT, ISOLATION_NONE, RunDir, Sandbox, ToolPlan
from treemat.toolrun import ToolRunner

from ..support.stacks import make_executor


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def execroot(tmp_path: Path) -> Path:
    root = tmp_path / "execroot"
    (root / "pkg/tree").mkdir(parents=True)
    (root / "pkg/tool.sh").write_text('#!/bin/sh\nls -l pkg > "$1"; echo "$PWD" >> "$1"\n')
    os.chmod(root / "pkg/tool.sh", 0o755)
    (root / "pkg/data.txt").write_text("data\n")
    (root / "pkg/tree/a").write_text("a\n")
    (root / "pkg/tree/b").write_text("b\n")
    return root


def test_exec_bit_comes_from_the_execroot_file(execroot: Path, tmp_path: Path) -> None:
    executor = make_executor(tmp_path / "root")
    spec = ActionSpec(argv=["pkg/tool.sh", "out/listing"], outputs=["out/listing"])
    inputs = [RequestInput("pkg/tool.sh", _sha(execroot / "pkg/tool.sh")), RequestInput("pkg/data.txt", None)]
    result = executor.execute(ActionRequest(spec, inputs, execroot))
    assert result.exit_code == 0, result.output
    listing = (execroot / "out/listing").read_text()
    assert "-r-xr-x---" in listing and "-r--r-----" in listing
    assert result.stage is not None and result.stage.files == 2
    assert not list((tmp_path / "root/exec").iterdir()), "exec dirs are removed after the action"


def test_directory_inputs_are_expanded(execroot: Path, tmp_path: Path) -> None:
    executor = make_executor(tmp_path / "root")
    spec = ActionSpec(argv=["sh", "-c", "cat pkg/tree/a pkg/tree/b > out/cat"], outputs=["out/cat"])
    result = executor.execute(ActionRequest(spec, [RequestInput("pkg/tree")], execroot))
    assert result.exit_code == 0, result.output
    assert (execroot / "out/cat").read_text() == "a\nb\n"


def test_exec_root_placeholder_is_the_private_dir(execroot: Path, tmp_path: Path) -> None:
    executor = make_executor(tmp_path / "root")
    spec = ActionSpec(argv=["sh", "-c", "echo {EXEC_ROOT} > out/where; pwd >> out/where"], outputs=["out/where"])
    assert executor.execute(ActionRequest(spec, [], execroot)).exit_code == 0
    placeholder, pwd = (execroot / "out/where").read_text().split()
    assert placeholder == pwd == EXEC_ROOT, "the tool sees its private exec dir at the sandbox's fixed path"


def test_recovers_when_a_known_blob_disappears(execroot: Path, tmp_path: Path) -> None:
    executor = make_executor(tmp_path / "root")
    spec = ActionSpec(argv=["cp", "pkg/data.txt", "out/copy"], outputs=["out/copy"])
    inputs = [RequestInput("pkg/data.txt", _sha(execroot / "pkg/data.txt"))]
    assert executor.execute(ActionRequest(spec, inputs, execroot)).exit_code == 0
    # another process garbage-collects the blob behind this executor's back
    blob = executor.cas.blob_path(_sha(execroot / "pkg/data.txt"), False)
    blob.unlink()
    other = ActionSpec(argv=["cp", "pkg/data.txt", "out/other"], outputs=["out/other"])  # no pooled dir to reuse
    result = executor.execute(ActionRequest(other, inputs, execroot))
    assert result.exit_code == 0, result.output
    assert blob.exists(), "the blob was re-ingested from the execroot"
    assert (execroot / "out/other").read_bytes() == (execroot / "pkg/data.txt").read_bytes()


def test_changed_file_with_stale_digest_is_refused(execroot: Path, tmp_path: Path) -> None:
    executor = make_executor(tmp_path / "root")
    stale = _sha(execroot / "pkg/data.txt")
    (execroot / "pkg/data.txt").write_text("changed after Bazel digested it\n")
    spec = ActionSpec(argv=["true"])
    result = executor.execute(ActionRequest(spec, [RequestInput("pkg/data.txt", stale)], execroot))
    assert result.exit_code == 1 and "expected" in result.output


def test_cancel_before_start(execroot: Path, tmp_path: Path) -> None:
    executor = make_executor(tmp_path / "root")
    executor.cancel(5)
    marker = execroot / "ran"
    result = executor.execute(ActionRequest(ActionSpec(argv=["touch", str(marker)]), [], execroot, request_id=5))
    assert result.cancelled and "cancelled before start" in result.output
    assert not marker.exists(), "a request cancelled before it started must never run its tool"


def test_stale_exec_dirs_of_dead_processes_are_swept(tmp_path: Path) -> None:
    root = tmp_path / "root"
    dead = root / "exec" / "999999-1-abcd"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "f").write_text("x")
    os.chmod(dead / "sub", 0o555)
    make_executor(root)
    assert not dead.exists()


def test_many_actions_reuse_known_blobs_without_rehash(execroot: Path, tmp_path: Path) -> None:
    executor = make_executor(tmp_path / "root")
    spec = ActionSpec(argv=[sys.executable, "-c", "pass"])
    inputs = [RequestInput("pkg/data.txt", _sha(execroot / "pkg/data.txt"))]
    for _ in range(5):
        assert executor.execute(ActionRequest(spec, inputs, execroot)).exit_code == 0
    assert executor.counters.get("ingested_blobs") == 1
    assert executor.counters.get("actions") == 5


def test_used_blobs_are_recent_for_gc(execroot: Path, tmp_path: Path) -> None:
    executor = make_executor(tmp_path / "root")
    spec = ActionSpec(argv=["true"])
    old = RequestInput("pkg/data.txt", _sha(execroot / "pkg/data.txt"))
    other = RequestInput("pkg/tree/a", _sha(execroot / "pkg/tree/a"))
    assert executor.execute(ActionRequest(spec, [old, other], execroot)).exit_code == 0
    cas = executor.cas
    for age, item in enumerate((old, other), start=1):  # both look ancient, `old` the oldest
        assert item.hash is not None
        blob = cas.blob_path(item.hash, False)
        os.utime(blob, ns=(age * 1_000_000_000, blob.stat().st_mtime_ns))
    executor.close()  # the first worker exits: its pooled exec dir no longer pins the blobs
    later = make_executor(tmp_path / "root")  # a later worker process
    assert later.execute(ActionRequest(spec, [old], execroot)).exit_code == 0  # uses only `old`
    later.close()
    cas.gc(max_bytes=len("data\n"))
    assert old.hash is not None and other.hash is not None
    assert cas.lookup(old.hash, False) is not None, "a blob an action just used is the most recently used"
    assert cas.lookup(other.hash, False) is None


def test_output_hardlinked_to_an_input_never_shares_the_cas_inode(execroot: Path, tmp_path: Path) -> None:
    executor = make_executor(tmp_path / "root")
    data = RequestInput("pkg/data.txt", _sha(execroot / "pkg/data.txt"))
    spec = ActionSpec(argv=["ln", "pkg/data.txt", "out/linked"], outputs=["out/linked"])
    result = executor.execute(ActionRequest(spec, [data], execroot))
    assert result.exit_code == 0, result.output
    assert data.hash is not None
    blob = executor.cas.blob_path(data.hash, False)
    out = execroot / "out/linked"
    assert out.read_text() == "data\n"
    assert out.stat().st_ino != blob.stat().st_ino, "Bazel would chmod the CAS blob through this output"
    os.chmod(out, 0o555)  # what Bazel does to outputs
    assert executor.cas.check_fingerprint(data.hash, False)


def test_no_tool_is_forked_while_an_ingest_holds_a_writable_descriptor(tmp_path: Path) -> None:
    """A child forked then would close the ingest's descriptor after publication: a phantom write event.

    (Sandboxed tools are forked by the sandbox helper, never by this process; `--isolation=none` forks here.)
    """
    gate = ForkGate()
    runner = ToolRunner(Sandbox(ISOLATION_NONE, None, None, ()), gate)
    marker = tmp_path / "started"
    run_dir = RunDir(tmp_path / "run")
    run_dir.create()
    plan = ToolPlan(["touch", str(marker)], dict(os.environ), tmp_path, run_dir, overlay=False)
    done: list[int] = []
    with gate.writing():
        thread = threading.Thread(target=lambda: done.append(runner.run(0, plan).exit_code))
        thread.start()
        thread.join(0.5)
        assert not marker.exists(), "the tool was started while an ingest was writing"
    thread.join(30)
    assert done == [0] and marker.exists()


def test_concurrent_ingests_and_tool_launches_never_fail_an_action(tmp_path: Path) -> None:
    """Regression: actions ingesting new blobs beside actions launching tools (a phantom IN_CLOSE_WRITE tainted
    freshly published blobs and failed the action that had just staged them)."""
    executor = make_executor(tmp_path / "root")
    execroot = tmp_path / "execroot"
    failures: list[str] = []

    def ingesting(worker: int) -> None:
        for round_ in range(15):
            inputs = []
            for index in range(20):
                rel = f"w{worker}/r{round_}/f{index}"
                (execroot / rel).parent.mkdir(parents=True, exist_ok=True)
                (execroot / rel).write_bytes(f"{worker} {round_} {index}\n".encode() * 200)
                inputs.append(RequestInput(rel, _sha(execroot / rel)))
            spec = ActionSpec(argv=["true"], outputs=[])
            result = executor.execute(ActionRequest(spec, inputs, execroot))
            if result.exit_code != 0:
                failures.append(result.output)

    threads = [threading.Thread(target=ingesting, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []


@pytest.mark.parametrize("writes", ["nothing", "a file"])
def test_declared_output_directories_come_back_exactly(execroot: Path, tmp_path: Path, writes: str) -> None:
    """An output directory comes back as the tool left it, empty or not, replacing what the execroot held."""
    executor = make_executor(tmp_path / "root")
    data = RequestInput("pkg/data.txt", _sha(execroot / "pkg/data.txt"))
    script = "cp pkg/data.txt out/tree/copy.txt" if writes == "a file" else "true"
    spec = ActionSpec(argv=["sh", "-c", script], outputs=[])
    spec.output_dirs.append("out/tree")
    (execroot / "out/tree").mkdir(parents=True)
    (execroot / "out/tree/stale.txt").write_text("from an earlier build\n")
    for _round in range(2):  # the second time, the exec dir is reused (where the overlay allows it)
        result = executor.execute(ActionRequest(spec, [data], execroot))
        assert result.exit_code == 0, result.output
        listing = sorted(path.name for path in (execroot / "out/tree").iterdir())
        assert listing == (["copy.txt"] if writes == "a file" else [])


@pytest.mark.parametrize("output", ["pkg/data.txt", "pkg/data.txt/inner", "pkg"])
def test_an_output_that_is_holds_or_lies_below_an_input_is_refused(execroot: Path, tmp_path: Path, output: str) -> None:
    """Collecting it would write over the input in the execroot: refused before the tool runs, staged afresh and
    patched into a pooled exec dir of the same outputs."""
    elsewhere = tmp_path / "elsewhere"  # a first action with the same outputs, in an execroot of its own
    (elsewhere / "lib").mkdir(parents=True)
    (elsewhere / "lib/b").write_text("b\n")
    executor = make_executor(tmp_path / "root")
    data = RequestInput("pkg/data.txt", _sha(execroot / "pkg/data.txt"))
    clobber = ["sh", "-c", f"mkdir -p {output}; echo clobbered > {output}/x; touch ran"]
    first = ActionSpec(argv=["sh", "-c", f"mkdir -p {output}"], outputs=[], output_dirs=[output])
    assert (
        executor.execute(ActionRequest(first, [RequestInput("lib/b", _sha(elsewhere / "lib/b"))], elsewhere)).exit_code
        == 0
    )
    for attempt in ("pooled", "fresh"):
        spec = ActionSpec(argv=clobber, outputs=[], output_dirs=[output])
        result = executor.execute(ActionRequest(spec, [data], execroot))
        assert result.exit_code != 0 and "refused" in result.output, (attempt, result.output)
        assert (execroot / "pkg/data.txt").read_text() == "data\n" and not (execroot / "ran").exists()
    assert executor.counters.snapshot().get("execpool_patch_failed", 0) >= 1  # the pooled path refused it too
