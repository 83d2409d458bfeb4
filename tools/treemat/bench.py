"""`treemat bench`: the same Swift compiles under Bazel's local and sandboxed strategies and under treemat.

For each round the strategies run in rotated order; every run starts from `bazel clean` (the output base,
server, CAS and directory cache survive, so treemat's CAS is warm as it would be on a developer machine),
builds the generated SwiftCompile-shaped modules, and reads each SwiftCompile action's wall time from Bazel's
JSON trace profile (`--profile`; Bazel 4's execution log carries no timings). Round 0 is a warm-up and is not
counted. treemat's own staging time comes from its stats.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from treemat.counters import StatsStore
from treemat.errors import TreematError

STRATEGY_FLAGS = {
    "local": ["--strategy=SwiftCompile=local", "--strategy=SwiftLink=local", "--spawn_strategy=local"],
    "sandboxed": ["--strategy=SwiftCompile=sandboxed", "--strategy=SwiftLink=sandboxed"],
    "treemat": ["--config=treemat"],
}


@dataclass(slots=True)
class BenchSample:
    """One SwiftCompile spawn of one shape under one strategy in one round."""

    strategy: str
    shape: int
    round: int
    walltime_ms: float
    stage_ms: float | None = None


@dataclass(slots=True)
class BenchReport:
    """All samples plus medians and ratios."""

    samples: list[BenchSample] = field(default_factory=list)

    def values(self, strategy: str, shape: int, attr: str = "walltime_ms") -> list[float]:
        """Every round's `attr` for one strategy (e.g. "treemat" or "treemat+edit") and shape."""
        return [
            getattr(s, attr)
            for s in self.samples
            if s.strategy == strategy and s.shape == shape and getattr(s, attr) is not None
        ]

    def median(self, strategy: str, shape: int, attr: str = "walltime_ms") -> float | None:
        """Median of `attr` over rounds, or None when there are no samples."""
        values = self.values(strategy, shape, attr)
        return statistics.median(values) if values else None

    def minimum(self, strategy: str, shape: int, attr: str = "walltime_ms") -> float | None:
        """Minimum of `attr` over rounds, or None when there are no samples."""
        values = self.values(strategy, shape, attr)
        return min(values) if values else None

    def shapes(self) -> list[int]:
        """Shapes measured."""
        return sorted({s.shape for s in self.samples})

    def to_json(self) -> dict[str, object]:
        """Samples and per-shape medians/ratios, clean builds and the edit-one-source rebuilds."""
        summary = []
        for shape in self.shapes():
            row: dict[str, object] = {"shape": shape}
            for suffix in ("", "+edit"):
                for strategy in STRATEGY_FLAGS:
                    row[f"{strategy}{suffix}_ms"] = self.median(strategy + suffix, shape)
                    row[f"{strategy}{suffix}_min_ms"] = self.minimum(strategy + suffix, shape)
                row[f"treemat{suffix}_stage_ms"] = self.median("treemat" + suffix, shape, "stage_ms")
                row.update({f"{key}{suffix}": value for key, value in self.ratios(shape, suffix).items()})
            summary.append(row)
        return {"samples": [asdict(s) for s in self.samples], "summary": summary}

    def ratios(self, shape: int, suffix: str = "") -> dict[str, float | None]:
        """treemat/sandboxed (goal <= 0.5) and treemat/local (goal <= 1.05) median wall-time ratios."""
        ours = self.median("treemat" + suffix, shape)
        out: dict[str, float | None] = {}
        for other in ("sandboxed", "local"):
            theirs = self.median(other + suffix, shape)
            out[f"treemat_vs_{other}"] = round(ours / theirs, 2) if ours and theirs else None
        return out

    def to_table(self) -> str:
        """Human table: min / median per strategy, treemat's staging, ratios; clean builds then edit rebuilds."""

        def fmt(value: float | None, width: int, places: int = 1) -> str:
            return f"{value:>{width}.{places}f}" if value is not None else f"{'-':>{width}}"

        lines: list[str] = []
        for suffix, title in (("", "clean build"), ("+edit", "rebuild after editing one source")):
            lines.append(f"SwiftCompile wall time per action, {title}, min / median over rounds (ms):")
            lines.append(
                f"{'inputs':>7} {'local':>15} {'sandboxed':>15} {'treemat':>15} {'(staging)':>10} "
                f"{'vs sandboxed':>13} {'vs local':>9}"
            )
            for shape in self.shapes():
                ratios = self.ratios(shape, suffix)
                cells = [
                    f"{fmt(self.minimum(name + suffix, shape), 7)}/{fmt(self.median(name + suffix, shape), 7)}"
                    for name in ("local", "sandboxed", "treemat")
                ]
                lines.append(
                    f"{shape:>7} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
                    f"{fmt(self.median('treemat' + suffix, shape, 'stage_ms'), 10)} "
                    f"{fmt(ratios['treemat_vs_sandboxed'], 12, 2)}x {fmt(ratios['treemat_vs_local'], 8, 2)}x"
                )
        lines.append("goals: treemat <= 0.5x sandboxed, <= 1.05x local")
        return "\n".join(lines)

    def write_chart(self, path: Path) -> bool:
        """A grouped bar chart (PNG) when matplotlib is installed; False otherwise."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        shapes = self.shapes()
        fig, axis = plt.subplots(figsize=(7, 4))
        width = 0.25
        for offset, strategy in enumerate(STRATEGY_FLAGS):
            values = [self.median(strategy, shape) or 0.0 for shape in shapes]
            axis.bar([i + offset * width for i in range(len(shapes))], values, width, label=strategy)
        axis.set_xticks([i + width for i in range(len(shapes))], [f"{s} inputs" for s in shapes])
        axis.set_ylabel("SwiftCompile wall time (ms, median)")
        axis.set_title("treemat vs Bazel strategies")
        axis.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return True


def _bazel(workspace: Path, output_base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bazel", f"--output_base={output_base}", *args], cwd=workspace, capture_output=True, text=True
    )


def run_bench(
    workspace: Path,
    *,
    shapes: Sequence[int] = (64, 635, 1978),
    rounds: int = 3,
    strategies: Sequence[str] = ("local", "sandboxed", "treemat"),
    root: Path | None = None,
    output_base: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Run the strategy benchmark; see the module docstring for the method."""
    unknown = [s for s in strategies if s not in STRATEGY_FLAGS]
    if unknown:
        raise TreematError(f"unknown strategy {unknown[0]!r}: choose from {', '.join(STRATEGY_FLAGS)}")
    scratch = Path(tempfile.mkdtemp(prefix="treemat-bench-"))
    root = root or scratch / "treemat-root"
    output_base = output_base or scratch / "output_base"
    targets = [f"//examples/generated:Shape{shape}" for shape in shapes]
    report = BenchReport()
    stats = StatsStore(root)
    try:
        for round_index in range(rounds + 1):
            order = list(strategies[round_index % len(strategies) :]) + list(
                strategies[: round_index % len(strategies)]
            )
            for strategy in order:
                if progress:
                    progress(f"round {round_index}/{rounds} {strategy}")
                cleaned = _bazel(workspace, output_base, "clean")
                if cleaned.returncode:
                    raise TreematError(f"bazel clean failed: {cleaned.stderr.strip()[-300:]}")
                stats.reset()
                profile = scratch / f"{strategy}-{round_index}.profile.json"
                build = _bazel(
                    workspace,
                    output_base,
                    "build",
                    f"--action_env=TREEMAT_ROOT={root}",
                    f"--profile={profile}",
                    *STRATEGY_FLAGS[strategy],
                    *targets,
                )
                if build.returncode:
                    raise TreematError(f"{strategy} build failed: {build.stderr.strip()[-500:]}")
                if round_index == 0:
                    continue  # warm-up: Bazel server, worker, CAS
                staged = _stage_ms_by_inputs(stats) if strategy == "treemat" else {}
                for shape, wall_ms in _compile_times(profile, shapes).items():
                    stage = next((ms for inputs, ms in sorted(staged.items()) if shape <= inputs <= shape + 16), None)
                    report.samples.append(BenchSample(strategy, shape, round_index, wall_ms, stage))
                # incremental: edit one source of every shape and rebuild (same server, warm worker)
                stats.reset()
                edited = scratch / f"{strategy}-{round_index}-edit.profile.json"
                rebuild = _bazel(
                    workspace,
                    output_base,
                    "build",
                    f"--action_env=TREEMAT_ROOT={root}",
                    f"--profile={edited}",
                    f"--define=treemat_bench_edit={strategy}{round_index}",
                    *STRATEGY_FLAGS[strategy],
                    *targets,
                )
                if rebuild.returncode:
                    raise TreematError(f"{strategy} incremental build failed: {rebuild.stderr.strip()[-500:]}")
                staged = _stage_ms_by_inputs(stats) if strategy == "treemat" else {}
                for shape, wall_ms in _compile_times(edited, shapes).items():
                    stage = next((ms for inputs, ms in sorted(staged.items()) if shape <= inputs <= shape + 16), None)
                    report.samples.append(BenchSample(f"{strategy}+edit", shape, round_index, wall_ms, stage))
    finally:
        _bazel(workspace, output_base, "shutdown")
    return report


def _compile_times(profile: Path, shapes: Sequence[int]) -> dict[int, float]:
    """Wall time (ms) of each ShapeN SwiftCompile action, from a Bazel JSON trace profile."""
    try:
        events = json.loads(profile.read_text()).get("traceEvents", [])
    except (OSError, ValueError) as exc:
        raise TreematError(f"cannot read Bazel profile {profile}: {exc}") from None
    times: dict[int, float] = {}
    for event in events:
        if not isinstance(event, dict) or event.get("cat") != "action processing":
            continue
        name = str(event.get("name", ""))
        for shape in shapes:
            if name.startswith(f"Compiling Swift module Shape{shape} "):
                times[shape] = float(event.get("dur", 0)) / 1000.0
    return times


def _stage_ms_by_inputs(stats: StatsStore) -> dict[int, float]:
    staged: dict[int, float] = {}
    for record in stats.load_all():
        actions = record.get("recent_actions")
        for action in actions if isinstance(actions, list) else []:
            if isinstance(action, dict) and isinstance(action.get("inputs"), int):
                staged[int(action["inputs"])] = float(action.get("stage_ms", 0.0))
    return staged


def save_report(report: BenchReport, json_path: Path, chart_path: Path | None) -> list[Path]:
    """Write the JSON result (and the PNG chart when possible); returns the files written."""
    json_path.write_text(json.dumps(report.to_json(), indent=2))
    written = [json_path]
    if chart_path is not None and report.write_chart(chart_path):
        written.append(chart_path)
    return written
