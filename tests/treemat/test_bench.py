"""Tests for treemat.bench's measurement plumbing (the Bazel runs themselves are `treemat bench`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from treemat.bench import BenchReport, BenchSample, _compile_times, save_report
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
