"""Tests for treemat.bench's measurement plumbing (the Bazel runs themselves are `treemat bench`)."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest
import treemat.bench as bench_module
import treemat.commands.bench as bench_command
from click.testing import CliRunner
from treemat.bench import (
    STRATEGY_FLAGS,
    BenchReport,
    BenchSample,
    _compile_times,
    available_strategies,
    bazel7_command,
    check_strategies,
    parse_bazel_version,
    run_bench,
    save_report,
    spawn_runners,
    strategy_flags,
)
from treemat.cli import cli
from treemat.commands.bench import STRATEGIES
from treemat.errors import TreematError


def test_compile_times_from_a_bazel_trace_profile(tmp_path: Path) -> None:
    profile = tmp_path / "p.json"
    events = [
        {
            "cat": "action processing",
            "name": "Compiling Swift module Shape64 (16 sources, treemat-staged)",
            "ph": "X",
            "ts": 10,
            "dur": 250_000,
        },
        {"cat": "critical path component", "name": "action 'Compiling Swift module Shape64'", "ph": "X", "dur": 9},
        {
            "cat": "action processing",
            "name": "Compiling Swift module Shape635 (48 sources, treemat-staged)",
            "ph": "X",
            "ts": 10,
            "dur": 500_500,
        },
        {"cat": "action processing", "name": "Compiling Swift module Models (1 sources)", "ph": "X", "dur": 1},
    ]
    profile.write_text(json.dumps({"otherData": {}, "traceEvents": events}))
    assert _compile_times(profile, [64, 635, 1978]) == {64: 250.0, 635: 500.5}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TreematError, match="cannot read Bazel profile"):
        _compile_times(tmp_path / "bad.json", [64])


def test_report_medians_ratios_and_files(tmp_path: Path) -> None:
    report = BenchReport()
    for round_index, (local, sandboxed, ours) in enumerate([(100, 300, 120), (110, 280, 130), (90, 320, 110)]):
        report.samples += [
            BenchSample("local", 635, round_index, local),
            BenchSample("sandboxed", 635, round_index, sandboxed),
            BenchSample("treemat", 635, round_index, ours, stage_ms=20.0),
        ]
    assert report.median("treemat", 635) == 120
    assert report.ratios(635) == {"treemat_vs_sandboxed": 0.4, "treemat_vs_local": 1.2}
    table = report.to_table()
    assert "0.40x" in table and "1.20x" in table and "635" in table
    written = save_report(report, tmp_path / "bench.json", tmp_path / "bench.png")
    summary = json.loads((tmp_path / "bench.json").read_text())["summary"][0]
    assert summary["treemat_stage_ms"] == 20.0 and summary["sandboxed_ms"] == 300
    assert written[0] == tmp_path / "bench.json"


def test_edit_rebuilds_are_reported_beside_clean_builds() -> None:
    report = BenchReport()
    for round_index, (local, ours) in enumerate([(100, 90), (120, 95), (80, 110)]):
        report.samples += [
            BenchSample("local+edit", 635, round_index, local),
            BenchSample("sandboxed+edit", 635, round_index, 2 * local),
            BenchSample("treemat+edit", 635, round_index, ours, stage_ms=3.0),
        ]
    assert report.minimum("treemat+edit", 635) == 90 and report.median("treemat+edit", 635) == 95
    assert report.ratios(635, "+edit") == {"treemat_vs_sandboxed": 0.47, "treemat_vs_local": 0.95}
    assert report.ratios(635) == {"treemat_vs_sandboxed": None, "treemat_vs_local": None}
    table = report.to_table()
    assert "rebuild after editing one source" in table and "0.95x" in table and " 90.0/   95.0" in table
    summary = report.to_json()["summary"]
    assert isinstance(summary, list) and summary[0]["treemat+edit_stage_ms"] == 3.0


def test_bazel_version_decides_which_strategies_are_offered() -> None:
    assert parse_bazel_version("bazel 7.7.1\n") == (7, "7.7.1")
    assert parse_bazel_version("bazel 8.0.0rc2\n") == (8, "8.0.0rc2")
    # bookworm's bazel-bootstrap 4.2.3 has no release label: taken as old
    assert parse_bazel_version("bazel no_version\n") == (0, "no_version")
    assert available_strategies(0) == ("local", "sandboxed", "treemat")
    assert strategy_flags("sandboxed", 0) == STRATEGY_FLAGS["sandboxed"]
    with pytest.raises(TreematError, match="no release label"):
        check_strategies(["sandboxed-reuse"], 0)
    with pytest.raises(TreematError, match="cannot read a Bazel version"):
        parse_bazel_version("command not found")
    assert available_strategies(4) == ("local", "sandboxed", "treemat")
    assert available_strategies(7) == ("local", "sandboxed", "sandboxed-reuse", "treemat")
    check_strategies(["sandboxed-reuse", "treemat"], 7)
    with pytest.raises(TreematError, match=r"'sandboxed-reuse' needs Bazel >= 7 and this is Bazel 4"):
        check_strategies(["treemat", "sandboxed-reuse"], 4)
    with pytest.raises(TreematError, match="unknown strategy 'remote'"):
        check_strategies(["remote"], 7)
    # the CLI's choices (kept import-free) are the module's strategies
    assert tuple(STRATEGY_FLAGS) == STRATEGIES


def test_strategy_flags_per_bazel_version() -> None:
    assert strategy_flags("sandboxed", 4) == ["--strategy=SwiftCompile=sandboxed", "--strategy=SwiftLink=sandboxed"]
    assert strategy_flags("treemat", 4) == ["--config=treemat"]
    # 7.x: WORKSPACE mode everywhere; plain sandboxed pins off the sandbox reuse that 7.x turns on by default
    assert strategy_flags("treemat", 7) == ["--config=treemat", "--noenable_bzlmod"]
    sandboxed = strategy_flags("sandboxed", 7)
    assert "--noreuse_sandbox_directories" in sandboxed and "--reuse_sandbox_directories" not in sandboxed
    reuse = strategy_flags("sandboxed-reuse", 7)
    assert reuse == [
        "--strategy=SwiftCompile=sandboxed",
        "--strategy=SwiftLink=sandboxed",
        "--reuse_sandbox_directories",
        "--experimental_inmemory_sandbox_stashes",
        "--noenable_bzlmod",
    ]


def test_spawn_runners_from_bazels_summary_line() -> None:
    stderr = "INFO: Analyzed 3 targets.\nINFO: 70 processes: 69 internal, 1 linux-sandbox.\nINFO: Build completed\n"
    assert spawn_runners(stderr) == "linux-sandbox"
    assert spawn_runners("INFO: 9 processes: 2 internal, 3 processwrapper-sandbox, 4 worker.") == (
        "processwrapper-sandbox, worker"
    )
    assert spawn_runners("INFO: 1 process: 1 internal.") == ""
    assert spawn_runners("no summary") == ""


def test_sandboxed_reuse_gets_its_column_and_ratio() -> None:
    report = BenchReport(bazel="7.7.1", runners={"sandboxed-reuse": "linux-sandbox", "treemat": "worker"})
    for round_index, (local, sandboxed, reuse, ours) in enumerate([(100, 300, 200, 120), (110, 280, 240, 130)]):
        for suffix in ("", "+edit"):
            report.samples += [
                BenchSample("local" + suffix, 635, round_index, local),
                BenchSample("sandboxed" + suffix, 635, round_index, sandboxed),
                BenchSample("sandboxed-reuse" + suffix, 635, round_index, reuse),
                BenchSample("treemat" + suffix, 635, round_index, ours, stage_ms=20.0),
            ]
    assert report.strategies() == ["local", "sandboxed", "sandboxed-reuse", "treemat"]
    assert report.ratios(635) == {
        "treemat_vs_sandboxed": 0.43,
        "treemat_vs_sandboxed-reuse": 0.57,
        "treemat_vs_local": 1.19,
    }
    table = report.to_table().splitlines()
    assert table[0] == "Bazel 7.7.1"
    assert "sandboxed-reuse" in table[2] and "vs sandboxed-reuse" in table[2]
    assert "200.0/  220.0" in table[3] and "0.57x" in table[3]
    assert table[-2] == "spawn runners: sandboxed-reuse=linux-sandbox, treemat=worker"
    data = report.to_json()
    summary = data["summary"]
    assert isinstance(summary, list)
    assert summary[0]["sandboxed-reuse_min_ms"] == 200 and summary[0]["treemat_vs_sandboxed-reuse+edit"] == 0.57
    assert data["bazel"] == "7.7.1"


def test_bazel4_report_has_no_sandboxed_reuse_column() -> None:
    report = BenchReport(samples=[BenchSample("sandboxed", 64, 1, 10.0), BenchSample("treemat", 64, 1, 5.0)])
    assert report.ratios(64) == {"treemat_vs_sandboxed": 0.5}
    assert "reuse" not in report.to_table() and "vs local" not in report.to_table()


def test_run_bench_on_bazel7_measures_sandboxed_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[list[str]] = []

    def fake_bazel(workspace: Path, output_base: Path, *args: str) -> subprocess.CompletedProcess[str]:
        stderr = ""
        if args[0] == "build":
            builds.append(list(args))
            profile = Path(next(a for a in args if a.startswith("--profile=")).split("=", 1)[1])
            event = {"cat": "action processing", "name": "Compiling Swift module Shape64 (16 sources)", "dur": 1000}
            profile.write_text(json.dumps({"traceEvents": [event]}))
            stderr = "INFO: 70 processes: 69 internal, 1 linux-sandbox.\n"
        return subprocess.CompletedProcess(["bazel", *args], 0, "", stderr)

    monkeypatch.setattr(bench_module, "_bazel", fake_bazel)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # run_bench's scratch dirs
    report = run_bench(tmp_path, shapes=(64,), rounds=1, bazel=(7, "7.7.1"), root=tmp_path / "root")
    assert report.strategies() == ["local", "sandboxed", "sandboxed-reuse", "treemat"]
    reuse_builds = [b for b in builds if "--experimental_inmemory_sandbox_stashes" in b]
    # warm-up, then one clean build and one edit rebuild
    assert len(reuse_builds) == 3 and all("--reuse_sandbox_directories" in b for b in reuse_builds)
    assert all("--noenable_bzlmod" in b for b in builds)
    assert report.values("sandboxed-reuse+edit", 64) == [1.0]
    assert report.runners["sandboxed-reuse"] == "linux-sandbox" and report.bazel == "7.7.1"
    with pytest.raises(TreematError, match="needs Bazel >= 7"):
        run_bench(tmp_path, strategies=["sandboxed-reuse"], bazel=(4, "4.2.3"))
    # Bazel 4: the default strategies leave sandboxed-reuse out
    builds.clear()
    report = run_bench(tmp_path, shapes=(64,), rounds=1, bazel=(4, "4.2.3"), root=tmp_path / "root")
    assert report.strategies() == ["local", "sandboxed", "treemat"]
    assert not any("--noenable_bzlmod" in b or "--noreuse_sandbox_directories" in b for b in builds)
    assert not list(tmp_path.glob("treemat-bench-*")), "each run removes its scratch (output base, profiles)"


def test_bench_bazel7_reruns_itself_in_the_chroot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert bazel7_command(Path("/r/tools/bazel7.sh"), ["bench", "--quick"], [Path("/out")]) == [
        "/r/tools/bazel7.sh",
        "run",
        "--bind",
        "/out",
        "--",
        "python3",
        "-m",
        "treemat",
        "bench",
        "--quick",
    ]
    calls: list[list[str]] = []

    def fake_run(command: list[str], check: bool) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        return subprocess.CompletedProcess(command, 7)

    monkeypatch.delenv("TREEMAT_BAZEL7_CHROOT", raising=False)
    monkeypatch.setattr(bench_command.subprocess, "run", fake_run)
    monkeypatch.setattr(bench_command.os, "geteuid", lambda: 0)
    out = tmp_path / "out"
    argv = ["--bazel7", "--workspace", str(tmp_path), "--out", str(out), "--strategy", "sandboxed-reuse"]
    result = CliRunner().invoke(cli, ["bench", *argv, "--shape", "64"])
    assert result.exit_code == 7, result.output  # the chroot run's status
    (command,) = calls
    assert command[:2] == [str(bench_command.BAZEL7_SCRIPT), "run"]
    assert command[2:6] == ["--bind", str(tmp_path), "--bind", str(out)]
    assert command[command.index("--") + 1 :] == [
        "python3",
        "-m",
        "treemat",
        "bench",
        f"--workspace={tmp_path}",
        "--rounds=3",
        f"--out={out}",
        "--shape=64",
        "--strategy=sandboxed-reuse",
    ]
    monkeypatch.setattr(bench_command.os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(cli, ["bench", "--bazel7", "--workspace", str(tmp_path)])
    assert result.exit_code == 1 and "--bazel7 needs root" in result.output


def test_bench_refuses_sandboxed_reuse_on_bazel4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_module, "bazel_version", lambda _workspace: (4, "4.2.3"))
    result = CliRunner().invoke(cli, ["bench", "--workspace", str(tmp_path), "--strategy", "sandboxed-reuse"])
    assert result.exit_code == 1 and "'sandboxed-reuse' needs Bazel >= 7" in result.output
