"""The blob guard fails closed: when its write signal is lost, blobs are hashed again, never trusted.

Each loss of signal (no inotify instance, a watch the kernel refuses, the watch budget, a queue overflow) is
followed by an outsider's same-size in-place write to a CAS blob with mode and mtime restored (only ctime and
inotify can tell). The next action must see the pristine bytes (the blob hashed, quarantined, ingested again
from the execroot) or fail with a clear message: never exit 0 with the wrong bytes. Real kernel limits are
lowered only inside a user namespace of the test's own (per-user-namespace inotify limits), never on the host.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from treemat import writewatch
from treemat.executor import ActionExecutor, ActionRequest, ActionResult, RequestInput
from treemat.flagfile import ActionSpec
from treemat.layout import Root
from treemat.sandbox import ToolPlan
from treemat.stack import Stack, open_stack
from treemat.toolrun import ToolOutcome

from ..support.harness import TOOLS_DIR, request
from .tampering import tamper_in_place

PRISTINE = b"pristine input bytes\n" * 20
POISONED = PRISTINE.replace(b"pristine", b"poisoned")
OTHER = b"other bytes entirely\n" * 20
TIMEOUT_S = 120


@pytest.fixture
def execroot(tmp_path: Path) -> Path:
    root = tmp_path / "execroot"
    (root / "in").mkdir(parents=True)
    (root / "in/a.txt").write_bytes(PRISTINE)
    (root / "in/b.txt").write_bytes(OTHER)
    return root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _blob(root: Path, data: bytes = PRISTINE) -> Path:
    digest = _sha(data)
    return root / "cas" / digest[:2] / digest


def _tamper_in_place(path: Path, data: bytes = POISONED) -> None:
    tamper_in_place(path, data)


def _stack(root: Path) -> Stack:
    stack = open_stack(Root(root), background_cleanup=False)
    if stack.isolation not in ("overlay", "copy-on-write"):
        stack.close()
        pytest.skip(f"no sandbox here ({stack.isolation_detail})")
    return stack


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    opened = _stack(tmp_path / "root")
    yield opened
    opened.close()


def _act(executor: ActionExecutor, execroot: Path, out: str, *inputs: str) -> ActionResult:
    """`cat` the inputs into `out`."""
    names = inputs or ("in/a.txt",)
    spec = ActionSpec(argv=["sh", "-c", f"cat {' '.join(names)} > {out}"], outputs=[out])
    listed = [RequestInput(p, _sha((execroot / p).read_bytes())) for p in names]
    return executor.execute(ActionRequest(spec, listed, execroot))


def _served(result: ActionResult, execroot: Path, out: str, expected: bytes = PRISTINE) -> str:
    """'pristine' (exit 0, right bytes), 'failed' (a clear error) or 'WRONG' (exit 0, other bytes)."""
    if result.exit_code != 0:
        assert "treemat: error:" in result.output, result.output
        return "failed"
    return "pristine" if (execroot / out).read_bytes() == expected else "WRONG"


def _during_the_run(executor: ActionExecutor, before_tool: Callable[[], None]) -> None:
    """Run `before_tool` after the inputs were staged and checked, right before the tool starts (once)."""
    real = executor.runner.run
    pending = [before_tool]

    def run(request_id: int, plan: ToolPlan) -> ToolOutcome:
        while pending:
            pending.pop()()
        return real(request_id, plan)

    executor.runner.run = run  # type: ignore[method-assign]


# ------------------------------------------------------------------------------ no inotify instance (simulated)


@pytest.fixture
def no_inotify(monkeypatch: pytest.MonkeyPatch) -> None:
    """INotify() fails as it does when the user's inotify instances are used up (editors hold them)."""

    def refuse(*_args: object, **_kwargs: object) -> object:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(writewatch, "INotify", refuse)


@pytest.mark.parametrize("same_outputs", [False, True], ids=["fresh-dir", "pooled-dir"])
def test_without_an_inotify_instance_every_use_hashes(
    no_inotify: None, same_outputs: bool, execroot: Path, tmp_path: Path
) -> None:
    stack = _stack(tmp_path / "root")
    try:
        assert stack.guard.describe()["write_watch"] == "none" and "EMFILE" in str(
            stack.describe()["write_watch_detail"]
        )
        first = _act(stack.executor, execroot, "out/first")
        assert _served(first, execroot, "out/first") == "pristine"
        _tamper_in_place(_blob(stack.root))
        out = "out/first" if same_outputs else "out/second"
        second = _act(stack.executor, execroot, out)
        assert _served(second, execroot, out) in ("pristine", "failed")
        assert stack.counters.get("guard_unwatched_hashed_blobs") >= 2, "hashed on every use, not once per process"
        assert _served(_act(stack.executor, execroot, "out/third"), execroot, "out/third") == "pristine"
    finally:
        stack.close()


def test_without_an_inotify_instance_a_write_during_the_run_fails_the_action(
    no_inotify: None, execroot: Path, tmp_path: Path
) -> None:
    stack = _stack(tmp_path / "root")
    try:
        assert _served(_act(stack.executor, execroot, "out/warm"), execroot, "out/warm") == "pristine"
        _during_the_run(stack.executor, lambda: _tamper_in_place(_blob(stack.root)))
        during = _act(stack.executor, execroot, "out/during")
        assert _served(during, execroot, "out/during") == "failed"
        assert "modified in the CAS while the action ran" in during.output and "in/a.txt" in during.output
        assert not _blob(stack.root).exists() or _blob(stack.root).read_bytes() == PRISTINE, "quarantined"
        assert _served(_act(stack.executor, execroot, "out/next"), execroot, "out/next") == "pristine"
    finally:
        stack.close()


# ------------------------------------------------------------------------------ the watch budget


def test_a_blob_dropped_by_the_watch_budget_is_hashed_before_its_pooled_dir_is_reused(
    stack: Stack, execroot: Path
) -> None:
    if not stack.guard.watching or stack.executor.pool is None:
        pytest.skip("needs inotify and the overlay (exec-dir pool)")
    stack.guard.max_watches = 1
    assert _served(_act(stack.executor, execroot, "out/a", "in/a.txt"), execroot, "out/a") == "pristine"
    other = _act(stack.executor, execroot, "out/b", "in/b.txt")  # in/b.txt's watch pushes in/a.txt's out
    assert _served(other, execroot, "out/b", OTHER) == "pristine"
    assert stack.counters.get("guard_watch_budget_drops") >= 1
    _tamper_in_place(_blob(stack.root))  # no watch on it any more: no event
    again = _act(stack.executor, execroot, "out/a", "in/a.txt")  # the pooled dir of the first action, reused
    assert _served(again, execroot, "out/a") in ("pristine", "failed")
    assert stack.guard.describe()["write_watch"] == "degraded" and "budget" in str(
        stack.guard.describe()["write_watch_detail"]
    )


def test_a_blob_dropped_by_the_watch_budget_during_the_run_is_hashed_again(stack: Stack, execroot: Path) -> None:
    if not stack.guard.watching:
        pytest.skip("needs inotify")
    stack.guard.max_watches = 1
    assert _served(_act(stack.executor, execroot, "out/warm"), execroot, "out/warm") == "pristine"

    def push_out_and_tamper() -> None:
        digest = stack.cas.ingest_bytes(OTHER + b"!", executable=False)
        assert stack.guard.admit(digest.hash, False, digest.size) is not None  # takes the only watch
        _tamper_in_place(_blob(stack.root))

    _during_the_run(stack.executor, push_out_and_tamper)
    during = _act(stack.executor, execroot, "out/during")
    assert _served(during, execroot, "out/during") == "failed"
    assert "modified in the CAS while the action ran" in during.output


# ------------------------------------------------------------------------------ a real queue overflow


def _flood_until_overflow(stack: Stack, scratch: Path) -> None:
    """Fill the guard's inotify queue with real directory events until the kernel flags an overflow."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 1 << 17:
        pytest.skip(f"max_queued_events is {limit}: too many events to provoke an overflow")
    scratch.mkdir()
    assert stack.watch.watch_directory(str(scratch), lambda *_lost: None) is not None
    fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for index in range(limit // 2 + 2):  # two events (create, delete) each, no two alike: none coalesce
            name = f"f{index}"
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
            os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)


def test_a_write_lost_in_a_queue_overflow_during_the_run_fails_the_action(
    stack: Stack, execroot: Path, tmp_path: Path
) -> None:
    if not stack.guard.watching:
        pytest.skip("needs inotify")
    assert _served(_act(stack.executor, execroot, "out/warm"), execroot, "out/warm") == "pristine"

    def overflow_then_tamper() -> None:
        _flood_until_overflow(stack, tmp_path / "flood")
        _tamper_in_place(_blob(stack.root))  # its events are dropped: the queue is full

    _during_the_run(stack.executor, overflow_then_tamper)
    during = _act(stack.executor, execroot, "out/during")
    assert stack.counters.get("guard_queue_overflows") >= 1, "the kernel reported the overflow"
    assert _served(during, execroot, "out/during") == "failed"
    assert "modified in the CAS while the action ran" in during.output
    assert stack.guard.describe()["write_watch"] == "degraded" and "overflow" in str(
        stack.guard.describe()["write_watch_detail"]
    )
    assert _served(_act(stack.executor, execroot, "out/during"), execroot, "out/during") == "pristine"


# ------------------------------------------------------------------------------ real limits, in a user namespace


def _limited_worker(execroot: Path, root: Path, sysctl: str, value: int) -> subprocess.Popen[bytes]:
    """A worker in a user namespace of its own whose inotify `sysctl` (per user namespace) is `value`."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1)")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here: {probe.stderr.decode().strip()}")
    script = f'echo {value} > /proc/sys/user/{sysctl} && exec unshare --user --map-user=1000 --map-group=1000 "$@"'
    worker = [sys.executable, "-m", "treemat", "--persistent_worker", "--protocol=json", f"--root={root}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TOOLS_DIR), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh", *worker],
        cwd=execroot,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def _ask(proc: subprocess.Popen[bytes], body: dict[str, Any]) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(body).encode())
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        assert proc.stderr is not None
        raise AssertionError(f"the worker died: {proc.stderr.read().decode(errors='replace')}")
    reply = json.loads(line)
    assert isinstance(reply, dict)
    return reply


def _stats(root: Path) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TOOLS_DIR), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "treemat", f"--root={root}", "stats"],
        capture_output=True,
        env=env,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def _inotify_instance_available() -> bool:
    """False where this process cannot get an inotify instance (its user namespace's limit is reached)."""
    from inotify_simple import INotify

    try:
        INotify().close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("sysctl", "mode", "why"),
    [("max_inotify_instances", "NONE", "EMFILE"), ("max_inotify_watches", "DEGRADED", "ENOSPC")],
    ids=["no-instance", "watch-ENOSPC"],
)
@pytest.mark.parametrize("same_outputs", [False, True], ids=["fresh-dir", "pooled-dir"])
def test_a_worker_out_of_inotify_hashes_every_use(
    sysctl: str, mode: str, why: str, same_outputs: bool, execroot: Path, tmp_path: Path
) -> None:
    if sysctl == "max_inotify_watches" and not _inotify_instance_available():
        mode, why = "NONE", "EMFILE"  # run where no instance is left at all (tools/test.sh's last pass)
    root = tmp_path / "root"
    proc = _limited_worker(execroot, root, sysctl, 0)
    try:
        first = _ask(proc, request(execroot, ["in/a.txt"], ["out/first"], ["sh", "-c", "cat in/a.txt > out/first"]))
        if first["exitCode"] != 0 and "sandbox" in first.get("output", ""):
            pytest.skip(f"no sandbox in a nested user namespace here: {first['output']}")
        assert first["exitCode"] == 0, first
        assert (execroot / "out/first").read_bytes() == PRISTINE
        _tamper_in_place(_blob(root))
        out = "out/first" if same_outputs else "out/second"
        second = _ask(proc, request(execroot, ["in/a.txt"], [out], ["sh", "-c", f"cat in/a.txt > {out}"]))
        if second["exitCode"] == 0:
            assert (execroot / out).read_bytes() == PRISTINE, "exit 0 with the tampered bytes"
        else:
            assert "treemat: error:" in second.get("output", ""), second
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(TIMEOUT_S)
    shown = _stats(root)
    assert f"write watch: {mode} (" in shown and why in shown, shown
    hashed = re.search(r"; (\d+) blobs \([^)]*\) hashed on use because they had no watch", shown)
    assert hashed and int(hashed.group(1)) >= 2, f"hashed on every use, not once per process:\n{shown}"


@pytest.mark.parametrize("sysctl", ["max_inotify_instances", "max_inotify_watches"], ids=["no-instance", "no-watch"])
def test_a_worker_out_of_inotify_reads_every_exec_bit(sysctl: str, execroot: Path, tmp_path: Path) -> None:
    """Without the execroot watch (execrootwatch.py) a reused dir checks every input's exec bit on every request:
    a `chmod +x` between two reuses reaches the tool."""
    proc = _limited_worker(execroot, tmp_path / "root", sysctl, 0)
    argv = ["sh", "-c", "if test -x in/a.txt; then echo x > out/x; else echo - > out/x; fi"]
    try:
        for expected in (b"-\n", b"-\n", b"x\n"):  # fresh, the first reuse, then a reuse after the chmod
            if expected == b"x\n":
                os.chmod(execroot / "in/a.txt", 0o755)
            reply = _ask(proc, request(execroot, ["in/a.txt"], ["out/x"], argv))
            if reply["exitCode"] != 0 and "sandbox" in reply.get("output", ""):
                pytest.skip(f"no sandbox in a nested user namespace here: {reply['output']}")
            assert reply["exitCode"] == 0, reply
            assert (execroot / "out/x").read_bytes() == expected
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(TIMEOUT_S)
