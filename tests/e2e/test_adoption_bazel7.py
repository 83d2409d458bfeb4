"""The adoption end-to-end test (test_adoption_e2e.py) and the C interop one (test_cinterop_e2e.py, WORKSPACE
mode) on Bazel 7.7.1, from the host.

Each leg runs that test module inside the Debian sid chroot of tools/bazel7.sh, where `bazel` is Debian's
bazel-bootstrap 7.7.1: `bazel7-workspace` (WORKSPACE + `treemat_dependencies()`, `--noenable_bzlmod`) and
`bazel7-bzlmod` (MODULE.bazel with `bazel_dep` + `local_path_override`, `--noenable_workspace`). The whole
module runs in one chroot session, so each flavor keeps one Bazel server across its tests.

Skipped unless the chroot exists (`sudo tools/bazel7.sh setup` creates it: about 2 minutes, 1.7 GB); these
tests never create it (they do bring an existing one up to the script's current recipe). `tools/bazel7.sh
test` creates it if needed and runs the legs with per-test output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "bazel7.sh"
SWIFTC = Path(os.environ.get("TREEMAT_SWIFT_DIR", "/opt/swift")) / "usr" / "bin" / "swiftc"


def _chroot_root() -> Path:
    run = subprocess.run([str(SCRIPT), "root"], capture_output=True, text=True, check=True)
    return Path(run.stdout.strip())


def _skip_reason() -> str | None:
    if os.environ.get("TREEMAT_BAZEL7_CHROOT"):
        return "already inside the Bazel 7 chroot (test_adoption_e2e.py runs the Bazel 7 flavors here)"
    if os.geteuid() != 0:
        return "the Bazel 7 chroot needs root (chroot, mount namespaces)"
    if not SWIFTC.exists():
        return f"no swiftc at {SWIFTC} (bind-mounted into the chroot)"
    root = _chroot_root()
    if not (root / ".treemat-bazel7-ready").exists():
        return f"no Bazel 7.7.1 chroot at {root}: create it with `sudo tools/bazel7.sh setup` (see README.md)"
    return None


SKIP = _skip_reason()

pytestmark = [
    pytest.mark.bazel,
    pytest.mark.bazel7,
    pytest.mark.swift,
    pytest.mark.skipif(SKIP is not None, reason=SKIP or ""),
]


@pytest.fixture
def scratch() -> Iterator[Path]:
    """The directory bound into the chroot, under /var/tmp like `tools/bazel7.sh test`'s, never under /tmp: a
    mount below the chroot's /tmp leaves each tool an empty private /tmp (the sandbox cannot overlay a /tmp with
    submounts), and the adoption test's swiftc wrapper lives in its basetemp."""
    path = Path(tempfile.mkdtemp(prefix="treemat-bazel7-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("flavor", ["bazel7-workspace", "bazel7-bzlmod"])
def test_adoption_on_bazel7(flavor: str, scratch: Path) -> None:
    # The bind point must outlive the inner pytest's cleanup of its basetemp: bind scratch, use a child.
    tmp_path = scratch
    run = subprocess.run(
        [
            str(SCRIPT),
            "run",
            "--bind",
            str(tmp_path),
            "--",
            "python3",
            "-m",
            "pytest",
            "-q",
            "-ra",
            "-p",
            "no:cacheprovider",
            str(REPO / "tests" / "e2e" / "test_adoption_e2e.py"),
            "-k",
            flavor,
            f"--basetemp={tmp_path / 'inner'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    output = run.stdout[-8000:] + run.stderr[-4000:]
    assert run.returncode == 0, f"adoption e2e on Bazel 7.7.1 ({flavor}) failed:\n{output}"
    assert " passed" in run.stdout and "skipped" not in run.stdout, output


def test_c_interop_on_bazel7(scratch: Path) -> None:
    """tests/e2e/test_cinterop_e2e.py (C modules across three repositories, outputs identical across
    strategies) on Bazel 7.7.1 in WORKSPACE mode."""
    tmp_path = scratch
    run = subprocess.run(
        [str(SCRIPT), "run", "--bind", str(tmp_path), "--", "python3", "-m", "pytest", "-q", "-ra", "-p",
         "no:cacheprovider", str(REPO / "tests" / "e2e" / "test_cinterop_e2e.py"), f"--basetemp={tmp_path / 'inner'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )  # fmt: skip
    output = run.stdout[-8000:] + run.stderr[-4000:]
    assert run.returncode == 0, f"C interop e2e on Bazel 7.7.1 failed:\n{output}"
    assert " passed" in run.stdout and "skipped" not in run.stdout, output
