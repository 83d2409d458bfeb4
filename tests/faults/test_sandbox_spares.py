"""A tool's namespace cloned ahead of its request (a spare, sandboxd.py) is used only while nothing can differ from
a namespace made at the request: what appeared or was mounted after the spare was made is seen as it is now.

Each test first waits until the spare is really prepared (its TREEMAT_ROOT mask mounted, no exec dir yet), so
the change lands after it: without the checks, the tool would see the state of when the spare was made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from treemat.layout import Root
from treemat.sandbox import EXEC_ROOT, ISOLATION_OVERLAY, Sandbox, ToolPlan, open_sandbox
from treemat.toolrun import read_bounded

SPARE_DEADLINE_S = 30
REPO = Path(__file__).resolve().parents[2]


def run_tool(sandbox: Sandbox, exec_dir: Path, script: str) -> tuple[int, str]:
    """One tool run: (exit code, output)."""
    plan = ToolPlan(["/bin/sh", "-c", script], {"PATH": "/usr/bin:/bin"}, exec_dir, None, sandbox.overlay)
    process = sandbox.start(plan)
    try:
        output = read_bounded(process.output_fd)
        return process.wait(), output
    finally:
        os.close(process.output_fd)
        os.close(process.view_fd)


def _mount_points(pid: str) -> list[str]:
    try:
        lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return []
    return [line.split()[4] for line in lines]


def wait_for_spare(sandbox: Sandbox, masked: Path) -> None:
    """Poll (bounded) until a child of the helper has `masked` covered and no exec dir mounted: the spare."""
    assert sandbox._helper is not None
    helper = sandbox._helper.pid
    deadline = time.monotonic() + SPARE_DEADLINE_S
    while time.monotonic() < deadline:
        children = Path(f"/proc/{helper}/task/{helper}/children").read_text().split()
        for child in children:
            points = _mount_points(child)
            if str(masked) in points and EXEC_ROOT not in points:
                return
        time.sleep(0.001)
    raise AssertionError(f"no spare namespace of the helper {helper} within {SPARE_DEADLINE_S}s")


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """A directory outside /tmp (below /tmp, tools see the host's /tmp through an overlay, which keeps a removed
    directory's mask in its cache: the case below would pass for that reason alone)."""
    base = Path(tempfile.mkdtemp(prefix="treemat-spares-", dir="/var/tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_treemat_root_made_again_after_the_spare_is_masked(outside_tmp: Path) -> None:
    """The spare masked the old directory; the kernel drops that mask when the directory is removed."""
    root, exec_dir = outside_tmp / "root", outside_tmp / "exec"
    sandbox = open_sandbox(Root(root), ISOLATION_OVERLAY)
    try:
        _remade_root_is_masked(sandbox, root, exec_dir)
    finally:
        sandbox.close()


def _remade_root_is_masked(sandbox: Sandbox, root: Path, exec_dir: Path) -> None:
    exec_dir.mkdir()
    assert run_tool(sandbox, exec_dir, "true") == (0, "")
    wait_for_spare(sandbox, root)
    shutil.rmtree(root)
    root.mkdir()
    (root / "secret").write_text("cas bytes\n")
    code, output = run_tool(sandbox, exec_dir, f"cat {root}/secret")
    assert "cas bytes" not in output and code != 0, (code, output)


def mounted_after_the_spare(base: Path) -> int:
    """In a mount namespace of our own (see the test below): a tmpfs mounted after the spare was prepared must
    show in the next tool's view, as in a namespace cloned at the request. Exit 0 if it does. (On /mnt, of this
    namespace only: below /tmp the tool sees the host's /tmp through an overlay, which shows no mounts.)"""
    subprocess.run(["mount", "--make-rshared", "/"], check=True)
    sandbox = open_sandbox(Root(base / "root"), ISOLATION_OVERLAY)
    try:
        exec_dir, late = base / "exec", Path("/mnt")
        exec_dir.mkdir()
        assert run_tool(sandbox, exec_dir, "true") == (0, "")
        wait_for_spare(sandbox, base / "root")
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(late)], check=True)
        (late / "data").write_text("mounted late\n")
        code, output = run_tool(sandbox, exec_dir, f"cat {late}/data")
    finally:
        sandbox.close()
    print(code, output)
    return 0 if (code, output) == (0, "mounted late\n") else 1


def test_a_mount_made_after_the_spare_is_seen(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.fail("this test needs unshare(1) and mount(8)")
    code = (
        "import sys; from pathlib import Path; from tests.faults.test_sandbox_spares import mounted_after_the_spare; "
        f"sys.exit(mounted_after_the_spare(Path({str(tmp_path)!r})))"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tools'}:{REPO}"}
    command = ["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
