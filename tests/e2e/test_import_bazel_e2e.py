"""`treemat import`, then Bazel: the fixture packages of tests/swiftpm (a C module with a generated module map,
one with its own, Swift 5 and 6 modules, an executable, XCTest tests reaching a C module, a second package given
with `--dep`) are imported and built through the public rules only, in a fresh workspace set up as
docs/bazel.md says plus the WORKSPACE snippet the import printed. The app prints what SwiftPM's build of the same
fixture prints; `bazel test` passes both packages' tests; the default build (worker), `--config=treemat` and
`--spawn_strategy=sandboxed` give byte-identical outputs.

Flavors as in test_adoption_e2e.py: `bazel4` on the host; inside tools/bazel7.sh's chroot (TREEMAT_BAZEL7_CHROOT)
`bazel7-workspace` (the WORKSPACE snippet) and `bazel7-bzlmod` (the MODULE.bazel fragment: `bazel_dep` +
`local_path_override`, and the dependency's generated MODULE.bazel); `test_import_on_bazel7` runs those from the
host when the chroot exists.

Uses the rules' C interop (cc_library in swift deps, swift_c_module) as docs/bazel.md's "C and C++ dependencies"
describes it.
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

from ..support.bazel import run_bazel

REPO = Path(__file__).resolve().parents[2]
SWIFT = shutil.which("swift") or ("/opt/swift/usr/bin/swift" if Path("/opt/swift/usr/bin/swift").exists() else None)
# `swift build && .build/debug/shapes` on the same fixture (its URL dependency made a path) prints exactly this.
EXPECTED_APP_OUTPUT = (
    "distance: 5.0\nscaled area: 30\nratio: 2:3\ntotal area: 7.0\nabsolute: 7\nplatform: linux\nconfiguration: debug\n"
    "unit: unit square: 1\n"  # its resource, through Bundle.module
)
TESTS = ("//:GeometryTests", "@swiftpkg_fastmath//:FastMathTests")
IN_BAZEL7_CHROOT = bool(os.environ.get("TREEMAT_BAZEL7_CHROOT"))
FLAVORS = ["bazel7-workspace", "bazel7-bzlmod"] if IN_BAZEL7_CHROOT else ["bazel4"]

pytestmark = [
    pytest.mark.bazel,
    pytest.mark.swift,
    pytest.mark.skipif(shutil.which("bazel") is None, reason="bazel is not installed (tools/setup.sh installs it)"),
    pytest.mark.skipif(SWIFT is None, reason="no swift on PATH or under /opt/swift"),
]


def _doc_blocks(heading: str) -> list[str]:
    """Every fenced code block under `### heading` in docs/bazel.md (up to the next heading)."""
    text = (REPO / "docs" / "bazel.md").read_text()
    match = re.search(rf"^### {re.escape(heading)}\n(.*?)(?=^##|\Z)", text, re.S | re.M)
    assert match, f"docs/bazel.md has no section '### {heading}'"
    return re.findall(r"^```[a-z]*\n(.*?)^```", match.group(1), re.S | re.M)


@dataclass
class Imported:
    """The imported workspace (geometry) and how to drive Bazel in it."""

    path: Path
    output_base: Path

    def bazel(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_bazel(self.path, self.output_base, *args, timeout=1800, check=check)

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


@pytest.fixture(scope="module", params=FLAVORS)
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Imported]:
    flavor: str = request.param
    base = tmp_path_factory.mktemp(f"import-{flavor}")
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
    workspace_snippet = run.stdout[run.stdout.index("# WORKSPACE") : run.stdout.index("# MODULE.bazel")]
    module_fragment = run.stdout[run.stdout.index("# MODULE.bazel") : run.stdout.index("# .bazelrc")]
    import_bazelrc = run.stdout[run.stdout.index("# .bazelrc") :]  # C targets: CC=clang, as SwiftPM compiles C
    workspace = packages / "geometry"
    bazelrc = "build --nosandbox_debug\n" + _doc_blocks(".bazelrc")[0] + import_bazelrc
    if flavor == "bazel7-bzlmod":
        module, bzlmod_rc = _doc_blocks("Bzlmod (Bazel 7)")
        treemat = module.replace("/path/to/treemat", str(REPO))
        (workspace / "MODULE.bazel").write_text('module(name = "geometry")\n\n' + treemat + "\n" + module_fragment)
        bazelrc += bzlmod_rc + "common --enable_bzlmod\n"
    else:
        treemat = _doc_blocks("WORKSPACE")[0].replace("/path/to/treemat", str(REPO))
        (workspace / "WORKSPACE").write_text('workspace(name = "geometry")\n\n' + treemat + "\n" + workspace_snippet)
        bazelrc += "common --noenable_bzlmod\n" if flavor == "bazel7-workspace" else ""
    (workspace / ".bazelrc").write_text(bazelrc)
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
    assert {"shapes", "GeometryTests", "libCShapes.a"} <= set(reference), sorted(reference)
    # the dependency's repository: external/swiftpkg_fastmath (WORKSPACE) or its canonical name (Bzlmod)
    assert [p for p in reference if re.fullmatch(r"external/swiftpkg_fastmath([~+][0-9.]*)?/libCFastMath_cc\.a", p)]
    assert len(reference) >= 20, sorted(reference)  # objects, archives, modules, docs, executables of both repos
    bin_dir = Path(imported.bazel("info", "bazel-bin").stdout.strip())
    run = subprocess.run([str(bin_dir / "shapes")], capture_output=True, text=True, check=True)
    assert run.stdout == EXPECTED_APP_OUTPUT
    # `.when(configuration: .debug)` holds in fastbuild, not under -c opt (SwiftPM's `-c release` prints this)
    imported.bazel("build", "-c", "opt", "//:shapes")
    opt_bin = Path(imported.bazel("info", "-c", "opt", "bazel-bin").stdout.strip())
    release = subprocess.run([str(opt_bin / "shapes")], capture_output=True, text=True, check=True)
    assert release.stdout == EXPECTED_APP_OUTPUT.replace("configuration: debug", "configuration: release")


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


def _bazel7_skip_reason() -> str | None:
    """Why the Bazel 7 legs cannot run here (the chroot of tools/bazel7.sh, as test_adoption_bazel7.py)."""
    if IN_BAZEL7_CHROOT:
        return "already inside the Bazel 7 chroot (the flavors above run here)"
    if os.geteuid() != 0:
        return "the Bazel 7 chroot needs root (chroot, mount namespaces)"
    root = subprocess.run([str(REPO / "tools" / "bazel7.sh"), "root"], capture_output=True, text=True, check=True)
    if not (Path(root.stdout.strip()) / ".treemat-bazel7-ready").exists():
        return "no Bazel 7.7.1 chroot: create it with `sudo tools/bazel7.sh setup` (see README.md)"
    return None


@pytest.mark.bazel7
@pytest.mark.parametrize("flavor", ["bazel7-workspace", "bazel7-bzlmod"])
def test_import_on_bazel7(flavor: str, tmp_path: Path) -> None:
    reason = _bazel7_skip_reason()
    if reason:
        pytest.skip(reason)
    inner = ["python3", "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}"]
    selection = ["-k", f"{flavor} and not test_import_on_bazel7"]
    run = subprocess.run(
        [str(REPO / "tools" / "bazel7.sh"), "run", "--bind", str(tmp_path), "--", *inner, __file__, *selection],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=2400,
        check=False,
    )
    output = run.stdout[-8000:] + run.stderr[-4000:]
    assert run.returncode == 0, f"import e2e on Bazel 7.7.1 ({flavor}) failed:\n{output}"
    assert " passed" in run.stdout and "skipped" not in run.stdout, output
