"""`treemat import`, then Bazel: the fixture packages of tests/swiftpm (a C module with a generated module map,
one with its own, Swift 5 and 6 modules, an executable, XCTest tests reaching a C module, a second package given
with `--dep`) are imported and built through the public rules only, in a fresh workspace set up as
docs/bazel.md says plus the WORKSPACE snippet the import printed. The app prints what SwiftPM's build of the same
fixture prints; `bazel test` passes both packages' tests; the default build (worker), `--config=treemat` and
`--spawn_strategy=sandboxed` give byte-identical outputs.

Needs the rules' C interop (cc_library in swift deps, swift_c_module), which lands separately on main.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SWIFT = shutil.which("swift") or ("/opt/swift/usr/bin/swift" if Path("/opt/swift/usr/bin/swift").exists() else None)
# `swift build && .build/debug/shapes` on the same fixture (its URL dependency made a path) prints exactly this.
EXPECTED_APP_OUTPUT = "distance: 5.0\nscaled area: 30\nratio: 2:3\ntotal area: 7.0\nabsolute: 7\nplatform: linux\n"
TESTS = ("//:GeometryTests", "@swiftpkg_fastmath//:FastMathTests")

pytestmark = [
    pytest.mark.bazel,
    pytest.mark.swift,
    pytest.mark.skipif(shutil.which("bazel") is None, reason="bazel is not installed (tools/setup.sh installs it)"),
    pytest.mark.skipif(SWIFT is None, reason="no swift on PATH or under /opt/swift"),
]


def _doc_block(heading: str) -> str:
    """The first fenced code block after `### heading` in docs/bazel.md."""
    text = (REPO / "docs" / "bazel.md").read_text()
    match = re.search(rf"^### {re.escape(heading)}\n.*?^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    assert match, f"docs/bazel.md has no code block under '### {heading}'"
    return match.group(1)


@dataclass
class Imported:
    """The imported workspace (geometry) and how to drive Bazel in it."""

    path: Path
    output_base: Path

    def bazel(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        run = subprocess.run(
            ["bazel", f"--output_base={self.output_base}", *args],
            cwd=self.path,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if check:
            assert run.returncode == 0, f"bazel {' '.join(args)} failed:\n{run.stderr[-6000:]}"
        return run

    def outputs(self) -> dict[str, str]:
        """sha256 of every object, module, archive and executable under bazel-bin and the external repo's."""
        bin_dir = Path(self.bazel("info", "bazel-bin").stdout.strip())
        digests = {}
        for path in sorted(bin_dir.rglob("*")):
            if any(part.endswith(".runfiles") for part in path.parts) or not path.is_file():
                continue
            if path.suffix in (".o", ".a", ".swiftmodule", ".swiftdoc") or os.access(path, os.X_OK):
                digests[str(path.relative_to(bin_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
        return digests


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Imported]:
    base = tmp_path_factory.mktemp("import-e2e")
    packages = base / "packages"
    shutil.copytree(REPO / "tests" / "swiftpm" / "packages", packages)
    run = subprocess.run(
        [sys.executable, "-m", "treemat", "import", "--dep", f"fastmath={packages / 'fastmath'}", "geometry"],
        cwd=packages,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO / "tools")),
        check=True,
    )
    snippet = run.stdout[run.stdout.index("# WORKSPACE") : run.stdout.index("# MODULE.bazel")]
    workspace = packages / "geometry"
    (workspace / "WORKSPACE").write_text(
        'workspace(name = "geometry")\n\n'
        + _doc_block("WORKSPACE").replace("/path/to/treemat", str(REPO))
        + "\n"
        + snippet
    )
    (workspace / ".bazelrc").write_text("build --nosandbox_debug\n" + _doc_block(".bazelrc"))
    ws = Imported(workspace, base / "output_base")
    try:
        yield ws
    finally:
        ws.bazel("shutdown", check=False)


@pytest.fixture(scope="module")
def reference(imported: Imported) -> dict[str, str]:
    """The default build (Bazel's order: the worker first) of everything, both repositories."""
    imported.bazel("build", "//...", "@swiftpkg_fastmath//...")
    return imported.outputs()


def test_the_imported_app_runs_like_swiftpms(imported: Imported, reference: dict[str, str]) -> None:
    assert {"shapes", "GeometryTests", "libCShapes.a", "external/swiftpkg_fastmath/libCFastMath_cc.a"} <= set(reference)
    assert len(reference) >= 20, sorted(reference)  # objects, archives, modules, docs, executables of both repos
    bin_dir = Path(imported.bazel("info", "bazel-bin").stdout.strip())
    run = subprocess.run([str(bin_dir / "shapes")], capture_output=True, text=True, check=True)
    assert run.stdout == EXPECTED_APP_OUTPUT


def test_bazel_test_passes_both_packages_tests(imported: Imported, reference: dict[str, str]) -> None:
    run = imported.bazel("test", "--test_output=errors", *TESTS, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    testlogs = Path(imported.bazel("info", "bazel-testlogs").stdout.strip())
    log = (testlogs / "GeometryTests" / "test.log").read_text()
    assert "Test Case 'GeometryTests.testCModuleDirectly' passed" in log
    assert "Test Case 'GeometryTests.testLinuxSettingKept' passed" in log
    assert "Executed 4 tests, with 0 failures" in log


def test_outputs_identical_with_config_treemat_and_sandboxed(imported: Imported, reference: dict[str, str]) -> None:
    for flags in (["--config=treemat"], ["--spawn_strategy=sandboxed"]):
        imported.bazel("clean")
        imported.bazel("build", *flags, "//...", "@swiftpkg_fastmath//...")
        assert imported.outputs() == reference, f"{flags} outputs differ from the default build"
