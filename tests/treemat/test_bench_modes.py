"""`treemat bench --ci` and `--workload chain`: the builds they ask of Bazel and what they report.

Bazel itself is replaced by a recorder that writes the trace profile a build would (as in test_bench.py); the
real measurement is `treemat bench` on a real Bazel.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import tempfile
from pathlib import Path

import pytest
import treemat.bench as bench_module
import treemat.commands.bench as bench_command
from click.testing import CliRunner
from treemat.bench import CHAIN_MODULES, CHAIN_TARGET, run_bench
from treemat.cli import cli


class FakeBazel:
    """Records every `bazel` command (with its output base) and writes each build's trace profile."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, list[str]]] = []

    def __call__(self, workspace: Path, output_base: Path, *args: str) -> subprocess.CompletedProcess[str]:
        self.calls.append((output_base, list(args)))
        if args[0] == "build":
            output_base.mkdir(parents=True, exist_ok=True)
            profile = Path(next(a for a in args if a.startswith("--profile=")).split("=", 1)[1])
            events = [
                {
                    "cat": "action processing",
                    "name": "Compiling Swift module Shape64 (16 sources)",
                    "ts": 0,
                    "dur": 2000,
                },
                {
                    "cat": "action processing",
                    "name": "Compiling Swift module Chain (4 sources)",
                    "ts": 3000,
                    "dur": 4000,
                },
                {"cat": "critical path component", "name": "x", "ts": 0, "dur": 99_000},
            ]
            profile.write_text(json.dumps({"traceEvents": events}))
        return subprocess.CompletedProcess(["bazel", *args], 0, "", "INFO: 3 processes: 2 internal, 1 worker.\n")

    def commands(self, verb: str) -> list[tuple[Path, list[str]]]:
        return [(base, args) for base, args in self.calls if args[0] == verb]


@pytest.fixture
def fake_bazel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeBazel:
    fake = FakeBazel()
    monkeypatch.setattr(bench_module, "_bazel", fake)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # run_bench's scratch dirs
    return fake


def test_ci_builds_each_on_a_new_output_base_and_server(tmp_path: Path, fake_bazel: FakeBazel) -> None:
    root = tmp_path / "root"
    report = run_bench(
        tmp_path, shapes=(64,), rounds=2, strategies=("local", "treemat"), bazel=(4, "4.2.3"), root=root, ci=True
    )
    builds = fake_bazel.commands("build")
    assert len(builds) == 6, "a warm-up round and two rounds, one clean build per strategy each, no edit rebuild"
    bases = [base for base, _args in builds]
    assert len(set(bases)) == 6, "every build gets its own output base (so its own server and workers)"
    assert fake_bazel.commands("clean") == []
    assert sorted(base for base, _ in fake_bazel.commands("shutdown")) == sorted(bases), "each server shut down"
    assert all(f"--worker_extra_flag=SwiftCompile=--root={root}" in args for _, args in builds), "one root kept"
    assert not any(base.exists() for base in bases), "each output base is removed after its build"
    assert report.mode == "ci" and report.values("treemat", 64) == [2.0, 2.0]
    assert not any(sample.strategy.endswith("+edit") for sample in report.samples)
    table = report.to_table()
    assert "CI-shaped" in table and "rebuild after editing" not in table
    assert report.to_json()["mode"] == "ci"


def test_warm_mode_still_cleans_one_output_base(tmp_path: Path, fake_bazel: FakeBazel) -> None:
    run_bench(tmp_path, shapes=(64,), rounds=1, strategies=("treemat",), bazel=(4, "4.2.3"), root=tmp_path / "r")
    assert len({base for base, _args in fake_bazel.calls}) == 1
    assert len(fake_bazel.commands("clean")) == 2 and len(fake_bazel.commands("build")) == 3  # + one edit rebuild


def test_chain_workload_times_whole_builds_clean_and_edited(tmp_path: Path, fake_bazel: FakeBazel) -> None:
    report = run_bench(tmp_path, rounds=1, strategies=("sandboxed", "treemat"), bazel=(4, "4.2.3"), workload="chain")
    builds = fake_bazel.commands("build")
    assert all(args[-1] == CHAIN_TARGET for _, args in builds)
    assert sum(any(a.startswith("--define=treemat_bench_edit=") for a in args) for _, args in builds) == 2
    # the execution phase: first action's start to last action's end (0 -> 7 ms); not the critical-path event
    assert report.values("treemat", CHAIN_MODULES) == [7.0]
    assert report.values("treemat+edit", CHAIN_MODULES) == [7.0]
    assert report.unit == "modules" and report.ratios(CHAIN_MODULES, "+edit") == {"treemat_vs_sandboxed": 1.0}
    assert "Execution phase of the whole build, clean build" in report.to_table()
    chart = tmp_path / "charts" / "chain.png"
    chart.parent.mkdir()
    if report.write_chart(chart):  # matplotlib is the [chart] extra
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(bench_module.TreematError, match="unknown workload 'tree'"):
        run_bench(tmp_path, rounds=1, strategies=("treemat",), bazel=(4, "4.2.3"), workload="tree")


def test_cli_documents_and_validates_the_new_options(tmp_path: Path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(cli, ["bench", "--help"]).output
    assert "--ci" in help_text and "--workload [shapes|chain]" in help_text and "--chart FILE" in help_text
    assert bench_command.WORKLOADS == bench_module.WORKLOADS
    result = runner.invoke(cli, ["bench", "--workspace", str(tmp_path), "--workload", "chain", "--shape", "64"])
    assert result.exit_code == 2 and "--shape applies to --workload shapes only" in result.output
    result = runner.invoke(cli, ["bench", "--workspace", str(tmp_path), "--workload", "tree"])
    assert result.exit_code == 2 and "'tree' is not one of" in result.output


def test_cli_runs_chain_ci_and_writes_the_chart_where_asked(
    tmp_path: Path, fake_bazel: FakeBazel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_module, "bazel_version", lambda _workspace: (4, "4.2.3"))
    chart, out = tmp_path / "elsewhere" / "chain.png", tmp_path / "out"
    argv = ["bench", "--workspace", str(tmp_path), "--workload", "chain", "--ci", "--rounds", "1"]
    result = CliRunner().invoke(cli, [*argv, "--strategy", "treemat", "--out", str(out), "--chart", str(chart)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "bench.json").read_text())["unit"] == "modules"
    assert "CI-shaped" in result.output
    assert chart.exists() == (importlib.util.find_spec("matplotlib") is not None)
    assert len({base for base, _args in fake_bazel.commands("build")}) == 2


def test_bazel7_forwards_ci_workload_and_chart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_run(command: list[str], check: bool) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.delenv("TREEMAT_BAZEL7_CHROOT", raising=False)
    monkeypatch.setattr(bench_command.subprocess, "run", fake_run)
    monkeypatch.setattr(bench_command.os, "geteuid", lambda: 0)
    chart = tmp_path / "charts" / "c.png"
    argv = ["bench", "--bazel7", "--workspace", str(tmp_path), "--ci", "--workload", "chain", "--chart", str(chart)]
    assert CliRunner().invoke(cli, argv).exit_code == 0
    (command,) = calls
    forwarded = command[command.index("--") + 1 :]
    assert "--ci" in forwarded and "--workload=chain" in forwarded and f"--chart={chart}" in forwarded
    assert str(chart.parent) in command[: command.index("--")], "the chart's directory is mounted in the chroot"
