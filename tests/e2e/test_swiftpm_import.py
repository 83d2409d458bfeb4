"""`treemat import` on the fixture packages in tests/swiftpm/packages through the real CLI and the real
`swift package dump-package` (offline: geometry's dependency is a URL that is never fetched; `--dep` points at
the fastmath checkout). The BUILD files must equal tests/swiftpm/expected/*.BUILD.bazel (reviewed by hand; SwiftPM
itself builds and tests the fixture: `swift build` / `swift test` in a copy with the URL made a path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "swiftpm"
SWIFT = shutil.which("swift") or ("/opt/swift/usr/bin/swift" if Path("/opt/swift/usr/bin/swift").exists() else None)
EXPECTED_STDERR = [
    "treemat import: not translated: geometry/CShapes: cSettings define CSHAPES_APPLE: only for macos, ios "
    "(not linux): dropped",
    "treemat import: not translated: geometry/Geometry: swiftSettings define GEOMETRY_APPLE: only for macos "
    "(not linux): dropped",
]

pytestmark = [pytest.mark.swift, pytest.mark.skipif(SWIFT is None, reason="no swift on PATH or under /opt/swift")]


def import_packages(packages: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`treemat import --dep fastmath=... geometry` through the CLI, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "treemat", "import", "--dep", f"fastmath={packages / 'fastmath'}", *extra],
        cwd=packages / "geometry",
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO / "tools")),
        check=False,
    )


def copy_fixture(destination: Path) -> Path:
    shutil.copytree(FIXTURE / "packages", destination)
    return destination


def test_real_dump_package_gives_the_reviewed_build_files(tmp_path: Path) -> None:
    packages = copy_fixture(tmp_path / "packages")
    run = import_packages(packages, ".")
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == EXPECTED_STDERR
    for package in ("geometry", "fastmath"):
        expected = (FIXTURE / "expected" / f"{package}.BUILD.bazel").read_text()
        assert (packages / package / "BUILD.bazel").read_text() == expected, package
    assert (packages / "fastmath" / "WORKSPACE.bazel").read_text().endswith('workspace(name = "swiftpkg_fastmath")\n')
    assert f'path = "{packages / "fastmath"}",' in run.stdout
    assert not (packages / "geometry" / ".build").exists(), "dump-package resolves and builds nothing"

    again = import_packages(packages, ".")
    assert again.returncode == 0 and again.stderr.splitlines() == EXPECTED_STDERR
    statuses = [line.split(":")[0] for line in again.stdout.splitlines() if line.startswith(("written", "unchanged"))]
    assert statuses == ["unchanged"] * 4, again.stdout


def test_a_broken_manifest_is_one_error_line(tmp_path: Path) -> None:
    packages = copy_fixture(tmp_path / "packages")
    manifest = packages / "geometry" / "Package.swift"
    manifest.write_text(manifest.read_text().replace("targets: [", "targets: [oops", 1))
    run = import_packages(packages, ".")
    assert run.returncode == 1
    (line,) = run.stderr.splitlines()
    assert (
        line.startswith("treemat: error: ")
        and "dump-package failed" in line
        and "Package.swift:" in line
        and "error:" in line[16:]
    )
    assert not (packages / "geometry" / "BUILD.bazel").exists()
