"""Adoption end to end: a fresh workspace outside this repository consumes treemat exactly as docs/bazel.md says
(`local_repository` + `treemat_dependencies()` in WORKSPACE, the documented .bazelrc block), and builds and tests
a multi-module Swift package with real Bazel and swiftc, offline:

- an `@main` executable in two files, a library using another's `package` declarations, a define, an
  experimental feature, a Swift 6 language-mode module, all under `-c opt`;
- `swift_test`s with one passing and one deliberately failing case, in XCTest and in Swift Testing: `bazel
  test` fails, and the logs show which case passed and which failed; `--test_filter` to the passing case passes;
- builds without `--config=treemat` (Bazel's default order: the worker), with it, and with an explicit
  `--spawn_strategy=local` (honoured: no worker) are byte-identical; toggling the config or the worker's root
  on a warm output base runs nothing;
- a compiler replaced in place (then `bazel sync --configure` on 4.2.3; Bazel 7 notices by itself) re-runs
  every compile.

The same tests run on Bazel 7.7.1 in the Debian sid chroot of tools/bazel7.sh, in WORKSPACE mode
(`--noenable_bzlmod`) and with Bzlmod (the fresh workspace's MODULE.bazel is docs/bazel.md's `bazel_dep` +
`local_path_override`, with `--noenable_workspace`): inside the chroot (TREEMAT_BAZEL7_CHROOT set) the flavors
are `bazel7-workspace` and `bazel7-bzlmod`, elsewhere `bazel4`. tests/e2e/test_adoption_bazel7.py runs them
from the host.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..support.adoption_workspace import BUILD, SOURCES
from ..support.bazel import run_bazel
from ..support.swift import NO_SWIFTC, SWIFTC

REPO = Path(__file__).resolve().parents[2]
MNEMONICS = ("SwiftCompile", "SwiftLink", "TreematRun")
EXECUTABLES = {"greet", "XCTestCases", "SwiftTestingCases"}
SWIFT_MNEMONICS = {"SwiftCompile", "SwiftLink"}
# Inside tools/bazel7.sh's chroot `bazel` is 7.7.1; both of its modes are tested there.
IN_BAZEL7_CHROOT = bool(os.environ.get("TREEMAT_BAZEL7_CHROOT"))
FLAVORS = ["bazel7-workspace", "bazel7-bzlmod"] if IN_BAZEL7_CHROOT else ["bazel4"]
# What each flavor adds to the fresh workspace's .bazelrc (the documented block itself serves 4.2.3 and 7).
FLAVOR_RC = {
    "bazel4": "",
    "bazel7-workspace": "common --noenable_bzlmod\n",
    "bazel7-bzlmod": "common --enable_bzlmod\n",  # plus docs/bazel.md's Bzlmod .bazelrc lines
}

pytestmark = [
    pytest.mark.bazel,
    pytest.mark.swift,
    pytest.mark.skipif(shutil.which("bazel") is None, reason="bazel is not installed (tools/setup.sh installs it)"),
    pytest.mark.skipif(SWIFTC is None, reason=NO_SWIFTC),
]

WRAPPER = '#!/bin/sh\n# compiler build {build}\nexec {swiftc} "$@"\n'


def _doc_block(heading: str) -> str:
    """The first fenced code block after `### heading` in docs/bazel.md."""
    text = (REPO / "docs" / "bazel.md").read_text()
    match = re.search(rf"^### {re.escape(heading)}\n.*?^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    assert match, f"docs/bazel.md has no code block under '### {heading}'"
    return match.group(1)


@dataclass
class Workspace:
    """The fresh workspace and how to drive Bazel in it."""

    path: Path
    output_base: Path
    root: Path
    wrapper: Path
    logs: Path
    env: dict[str, str]
    flavor: str

    def bazel(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_bazel(self.path, self.output_base, *args, env=self.env, timeout=1200, check=check)

    def build(self, name: str, *flags: str) -> list[tuple[str, str]]:
        """`bazel build -c opt //...` with an execution log; returns (mnemonic, runner) of every spawn run."""
        from treemat.execlog import read_exec_log

        log = self.logs / f"{name}.json"
        self.bazel("build", "-c", "opt", f"--execution_log_json_file={log}", *flags, "//...")
        return [(spawn.mnemonic, spawn.runner) for spawn in read_exec_log(log)]

    def outputs(self) -> dict[str, str]:
        bin_dir = Path(self.bazel("info", "-c", "opt", "bazel-bin").stdout.strip())
        digests = {}
        for path in sorted(bin_dir.rglob("*")):
            wanted = path.suffix in (".o", ".swiftmodule") or path.name in EXECUTABLES or path.name == "main.swift"
            if wanted and path.is_file() and not any(part.endswith(".runfiles") for part in path.parts):
                digests[str(path.relative_to(bin_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
        return digests


def _doc_blocks(heading: str) -> list[str]:
    """Every fenced code block under `### heading` in docs/bazel.md (up to the next heading)."""
    text = (REPO / "docs" / "bazel.md").read_text()
    match = re.search(rf"^### {re.escape(heading)}\n(.*?)(?=^##|\Z)", text, re.S | re.M)
    assert match, f"docs/bazel.md has no section '### {heading}'"
    return re.findall(r"^```[a-z]*\n(.*?)^```", match.group(1), re.S | re.M)


@pytest.fixture(scope="module", params=FLAVORS)
def workspace(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    flavor: str = request.param
    base = tmp_path_factory.mktemp(f"adoption-{flavor}")
    path = base / "consumer"
    path.mkdir()
    wrapper = base / "toolchain" / "swiftc"
    wrapper.parent.mkdir()
    wrapper.write_text(WRAPPER.format(build=1, swiftc=SWIFTC))
    wrapper.chmod(0o755)
    root = base / "treemat-root"
    flavor_rc = FLAVOR_RC[flavor]
    if flavor == "bazel7-bzlmod":
        module, bazelrc = _doc_blocks("Bzlmod (Bazel 7)")
        (path / "MODULE.bazel").write_text(
            'module(name = "consumer")\n\n' + module.replace("/path/to/treemat", str(REPO))
        )
        flavor_rc += bazelrc
    else:
        (path / "WORKSPACE").write_text(
            'workspace(name = "consumer")\n\n' + _doc_block("WORKSPACE").replace("/path/to/treemat", str(REPO))
        )
    roots = "".join(f"build --worker_extra_flag={m}=--root={root}\n" for m in MNEMONICS)
    (path / ".bazelrc").write_text("build --nosandbox_debug\n" + _doc_block(".bazelrc") + roots + flavor_rc)
    (path / "BUILD.bazel").write_text(BUILD)
    for name, content in SOURCES.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(textwrap.dedent(content))
    (path / "upper.sh").chmod(0o755)
    logs = base / "logs"
    logs.mkdir()
    env = dict(os.environ, SWIFTC=str(wrapper))
    ws = Workspace(path, base / "output_base", root, wrapper, logs, env, flavor)
    try:
        yield ws
    finally:
        ws.bazel("shutdown", check=False)


@pytest.fixture(scope="module")
def default_build(workspace: Workspace) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The first build: no --config, -c opt."""
    spawns = workspace.build("default")
    return spawns, workspace.outputs()


def _swift_runners(spawns: list[tuple[str, str]]) -> set[str]:
    # Bazel 4.2.3 logs multiplexed worker spawns as "worker", Bazel 7 as "multiplex-worker".
    swift = [runner for mnemonic, runner in spawns if mnemonic in SWIFT_MNEMONICS]
    return {"worker" if runner.endswith("worker") else runner for runner in swift}


def test_default_build_runs_on_the_worker_and_the_app_works(
    workspace: Workspace, default_build: tuple[list[tuple[str, str]], dict[str, str]]
) -> None:
    spawns, outputs = default_build
    compiles = [m for m, _ in spawns if m == "SwiftCompile"]
    assert len(compiles) == 7, spawns  # 3 modules + 2 test modules + 2 test runners
    assert _swift_runners(spawns) == {"worker"}, "Bazel's default order tries the worker first"
    # 3 executables, 7 objects, 4 .swiftmodules, 2 generated test runners
    assert set(outputs) >= EXECUTABLES and len(outputs) == 3 + 7 + 4 + 2, sorted(outputs)
    bin_dir = Path(workspace.bazel("info", "-c", "opt", "bazel-bin").stdout.strip())
    run = subprocess.run([str(bin_dir / "greet"), "bazel"], capture_output=True, text=True, check=True)
    assert run.stdout == "=============\nHELLO, BAZEL!\n=============\n"
    assert [m for m, _ in spawns if m == "TreematRun"] == ["TreematRun"] * 2
    assert (bin_dir / "shout.txt").read_text() == "STAGED BY TREEMAT\n", "treemat_run with $(location)"
    assert (bin_dir / "count.txt").read_text().strip() == "3", "a user's rule through treemat_action"
    stats = subprocess.run(
        ["python3", "-m", "treemat", "--root", str(workspace.root), "stats", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PYTHONPATH=str(REPO / "tools")),
    )
    assert '"actions"' in stats.stdout, "the worker used the root given by --worker_extra_flag"


def test_tests_fail_exactly_where_they_should(
    workspace: Workspace, default_build: tuple[list[tuple[str, str]], dict[str, str]]
) -> None:
    run = workspace.bazel("test", "-c", "opt", "//...", check=False)
    assert run.returncode == 3, f"bazel test must report the deliberate failures:\n{run.stderr[-3000:]}"
    testlogs = Path(workspace.bazel("info", "-c", "opt", "bazel-testlogs").stdout.strip())
    xctest = (testlogs / "XCTestCases" / "test.log").read_text()
    assert "Test Case 'GreetingXCTests.testPasses' passed" in xctest
    assert "Test Case 'GreetingXCTests.testFailsOnPurpose' failed" in xctest
    assert "deliberate failure" in xctest
    swift_testing = (testlogs / "SwiftTestingCases" / "test.log").read_text()
    assert re.search(r"Test bannerPasses\(\) passed", swift_testing), swift_testing
    assert re.search(r"Test bannerFailsOnPurpose\(\) failed", swift_testing), swift_testing
    assert "//:XCTestCases" in run.stdout + run.stderr and "FAILED" in run.stdout + run.stderr

    passing = workspace.bazel(
        "test", "-c", "opt", "--test_filter=GreetingXCTests/testPasses", "//:XCTestCases", check=False
    )
    assert passing.returncode == 0, passing.stderr[-3000:]
    filtered = (testlogs / "XCTestCases" / "test.log").read_text()
    assert "Test Case 'GreetingXCTests.testFailsOnPurpose'" not in filtered
    assert "Test Case 'GreetingXCTests.testPasses' passed" in filtered, "the filter selects it (not: nothing ran)"


def test_config_toggle_and_root_change_are_served_from_cache(
    workspace: Workspace, default_build: tuple[list[tuple[str, str]], dict[str, str]]
) -> None:
    toggled = workspace.build("toggle", "--config=treemat")
    assert toggled == [], f"--config=treemat must not change any action key: {toggled}"
    elsewhere = [f"--worker_extra_flag={m}=--root={workspace.root}-other" for m in MNEMONICS]
    moved = workspace.build("moved-root", "--config=treemat", *elsewhere)
    assert moved == [], f"the worker's root must not be part of any action key: {moved}"
    back = workspace.build("back")
    assert back == []


def test_outputs_identical_with_config_and_with_explicit_local(
    workspace: Workspace, default_build: tuple[list[tuple[str, str]], dict[str, str]]
) -> None:
    _, reference = default_build
    workspace.bazel("clean")
    treemat = workspace.build("treemat", "--config=treemat")
    assert _swift_runners(treemat) == {"worker"}
    assert workspace.outputs() == reference, "--config=treemat outputs differ from the default build"
    workspace.bazel("clean")
    local = workspace.build("local", "--spawn_strategy=local")
    assert _swift_runners(local) == {"local"}, "an explicit --spawn_strategy must not be overridden"
    assert workspace.outputs() == reference, "--spawn_strategy=local outputs differ from the default build"


def test_replacing_the_compiler_reruns_every_compile(
    workspace: Workspace, default_build: tuple[list[tuple[str, str]], dict[str, str]]
) -> None:
    assert workspace.build("same-compiler") == []
    workspace.wrapper.write_text(WRAPPER.format(build=2, swiftc=SWIFTC))  # an in-place upgrade
    if workspace.flavor == "bazel4":
        workspace.bazel("sync", "--configure")
    # Bazel 7 watches the compiler's files (repository_ctx.watch) and re-runs treemat_swift_configure itself.
    spawns = workspace.build("new-compiler")
    assert sorted(m for m, _ in spawns if m == "SwiftCompile") == ["SwiftCompile"] * 7
    assert len([m for m, _ in spawns if m == "SwiftLink"]) == 3
