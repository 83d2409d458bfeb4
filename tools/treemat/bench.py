"""`treemat bench`: the same Swift compiles under Bazel's local and sandboxed strategies and under treemat.

For each round the strategies run in rotated order; every run starts from `bazel clean` (the output base,
server, CAS and directory cache survive, so treemat's CAS is warm as it would be on a developer machine),
builds the generated SwiftCompile-shaped modules, and reads each SwiftCompile action's wall time from Bazel's
JSON trace profile (`--profile`; Bazel 4's execution log carries no timings). Round 0 is a warm-up and is not
counted. treemat's own staging time comes from its stats.

The strategies offered depend on the `bazel` on PATH (`bazel --version`; an unlabelled build, like bookworm's
4.2.3, counts as old). Bazel >= 7 (7.7.1 in tools/bazel7.sh's chroot) adds `sandboxed-reuse`: Bazel's sandbox
with `--reuse_sandbox_directories` and `--experimental_inmemory_sandbox_stashes`, the strongest sandbox it has.
7.x turns `--reuse_sandbox_directories` on by default, so there `sandboxed` pins it off and stays what it is on
4.2.3, a fresh sandbox per action. Bazel 7 builds in WORKSPACE mode (`--noenable_bzlmod`), from the same
WORKSPACE as 4.2.3. The spawn runner each strategy used (linux-sandbox, processwrapper-sandbox, worker, ...) is
taken from Bazel's "INFO: N processes: ..." line and reported.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from treemat.counters import StatsStore
from treemat.errors import TreematError
from treemat.fsprims import remove_tree
from treemat.layout import Root

STRATEGY_FLAGS = {
    "local": ["--strategy=SwiftCompile=local", "--strategy=SwiftLink=local", "--spawn_strategy=local"],
    "sandboxed": ["--strategy=SwiftCompile=sandboxed", "--strategy=SwiftLink=sandboxed"],
    "sandboxed-reuse": [
        "--strategy=SwiftCompile=sandboxed",
        "--strategy=SwiftLink=sandboxed",
        "--reuse_sandbox_directories",
        "--experimental_inmemory_sandbox_stashes",
    ],
    "treemat": ["--config=treemat"],
}
# The oldest Bazel major version with a strategy's flags (--experimental_inmemory_sandbox_stashes: 7.x).
MIN_BAZEL_MAJOR = {"sandboxed-reuse": 7}
# Flags added from a Bazel major version on, per strategy ("*": every strategy).
VERSION_FLAGS: dict[str, list[tuple[int, list[str]]]] = {
    # WORKSPACE mode: the same WORKSPACE, and so the same build graph, as on Bazel 4.2.3.
    "*": [(7, ["--noenable_bzlmod"])],
    # 7.x reuses sandbox directories by default; `sandboxed` stays a fresh sandbox per action, as on 4.2.3.
    "sandboxed": [(7, ["--noreuse_sandbox_directories"])],
}
# treemat's wall time is compared with each of these that was measured, in this order.
BASELINES = ("sandboxed", "sandboxed-reuse", "local")
GOALS = "goals: treemat <= 0.5x sandboxed, <= 1.05x local"


def parse_bazel_version(text: str) -> tuple[int, str]:
    """`bazel --version` output -> (major, release): "bazel 7.7.1" -> (7, "7.7.1").

    A Bazel built without a release label (bookworm's bazel-bootstrap 4.2.3 prints "bazel no_version") is
    major 0: no version-dependent flags, no strategy that needs a newer Bazel.
    """
    match = re.search(r"\bbazel\s+(\S+)", text)
    if not match:
        raise TreematError(f"cannot read a Bazel version from {text.strip()[:200]!r}")
    release = match.group(1)
    major = re.match(r"(\d+)\.", release)
    return (int(major.group(1)) if major else 0), release


def bazel_version(workspace: Path) -> tuple[int, str]:
    """The major version and release of the `bazel` on PATH, run in `workspace`."""
    try:
        run = subprocess.run(["bazel", "--version"], cwd=workspace, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TreematError(f"cannot run `bazel --version`: {exc}") from None
    if run.returncode:
        raise TreematError(f"`bazel --version` failed: {(run.stderr or run.stdout).strip()[-300:]}")
    return parse_bazel_version(run.stdout)


def available_strategies(bazel_major: int) -> tuple[str, ...]:
    """The strategies this Bazel major version can run, in table order."""
    return tuple(name for name in STRATEGY_FLAGS if bazel_major >= MIN_BAZEL_MAJOR.get(name, 0))


def check_strategies(strategies: Sequence[str], bazel_major: int) -> None:
    """Raise TreematError naming the first strategy that is unknown or needs a newer Bazel."""
    if not strategies:
        raise TreematError("no strategy to benchmark")
    for name in strategies:
        if name not in STRATEGY_FLAGS:
            raise TreematError(f"unknown strategy {name!r}: choose from {', '.join(STRATEGY_FLAGS)}")
        if bazel_major < MIN_BAZEL_MAJOR.get(name, 0):
            this = f"this is Bazel {bazel_major}" if bazel_major else "this Bazel has no release label"
            raise TreematError(
                f"strategy {name!r} needs Bazel >= {MIN_BAZEL_MAJOR[name]} and {this}: "
                "run the bench on Bazel 7 (`treemat bench --bazel7`, see docs/bazel.md)"
            )


def strategy_flags(strategy: str, bazel_major: int) -> list[str]:
    """The `bazel build` flags of one strategy on one Bazel major version."""
    flags = list(STRATEGY_FLAGS[strategy])
    for key in ("*", strategy):
        for since, extra in VERSION_FLAGS.get(key, []):
            if bazel_major >= since:
                flags += extra
    return flags


def spawn_runners(stderr: str) -> str:
    """The spawn runners of Bazel's last "INFO: N processes: ..." line, without "internal" ("" if none).

    "INFO: 70 processes: 69 internal, 1 linux-sandbox." -> "linux-sandbox".
    """
    lines = [line for line in stderr.splitlines() if re.search(r"\b\d+ process(es)?: ", line)]
    if not lines:
        return ""
    runners = []
    for part in lines[-1].split(":", 2)[-1].split(","):
        count, _, name = part.strip().rstrip(".").partition(" ")
        if count.isdigit() and name and name != "internal":
            runners.append(name)
    return ", ".join(runners)


def bazel7_command(script: Path, argv: Sequence[str], binds: Sequence[Path]) -> list[str]:
    """The command that runs `treemat ARGV` in tools/bazel7.sh's chroot, with `binds` mounted there."""
    command = [str(script), "run"]
    for path in binds:
        command += ["--bind", str(path)]
    return [*command, "--", "python3", "-m", "treemat", *argv]


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
    """All samples plus medians and ratios, and which Bazel and spawn runners produced them."""

    samples: list[BenchSample] = field(default_factory=list)
    bazel: str = ""
    runners: dict[str, str] = field(default_factory=dict)

    def strategies(self) -> list[str]:
        """The strategies measured (clean builds or edit rebuilds), in table order."""
        measured = {s.strategy.removesuffix("+edit") for s in self.samples}
        return [name for name in STRATEGY_FLAGS if name in measured]

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
                for strategy in self.strategies():
                    row[f"{strategy}{suffix}_ms"] = self.median(strategy + suffix, shape)
                    row[f"{strategy}{suffix}_min_ms"] = self.minimum(strategy + suffix, shape)
                row[f"treemat{suffix}_stage_ms"] = self.median("treemat" + suffix, shape, "stage_ms")
                row.update({f"{key}{suffix}": value for key, value in self.ratios(shape, suffix).items()})
            summary.append(row)
        return {
            "bazel": self.bazel,
            "runners": self.runners,
            "samples": [asdict(s) for s in self.samples],
            "summary": summary,
        }

    def ratios(self, shape: int, suffix: str = "") -> dict[str, float | None]:
        """treemat's median wall time over each other measured strategy's (BASELINES), e.g. treemat/sandboxed.

        Goals: <= 0.5 against sandboxed, <= 1.05 against local; none against sandboxed-reuse (Bazel >= 7).
        """
        ours = self.median("treemat" + suffix, shape)
        measured = self.strategies()
        out: dict[str, float | None] = {}
        for other in (name for name in BASELINES if name in measured):
            theirs = self.median(other + suffix, shape)
            out[f"treemat_vs_{other}"] = round(ours / theirs, 2) if ours and theirs else None
        return out

    def to_table(self) -> str:
        """Human table: min / median per strategy, treemat's staging, ratios; clean builds then edit rebuilds."""

        def fmt(value: float | None, width: int, places: int = 1) -> str:
            return f"{value:>{width}.{places}f}" if value is not None else f"{'-':>{width}}"

        strategies = self.strategies()
        others = [name for name in BASELINES if name in strategies]
        lines: list[str] = []
        if self.bazel:
            lines.append(f"Bazel {self.bazel}")
        for suffix, title in (("", "clean build"), ("+edit", "rebuild after editing one source")):
            lines.append(f"SwiftCompile wall time per action, {title}, min / median over rounds (ms):")
            header = f"{'inputs':>7}" + "".join(f" {name:>15}" for name in strategies) + f" {'(staging)':>10}"
            lines.append(header + "".join(f" {'vs ' + name:>{max(len(name) + 3, 9)}}" for name in others))
            for shape in self.shapes():
                ratios = self.ratios(shape, suffix)
                cells = "".join(
                    f" {fmt(self.minimum(name + suffix, shape), 7)}/{fmt(self.median(name + suffix, shape), 7)}"
                    for name in strategies
                )
                stage = fmt(self.median("treemat" + suffix, shape, "stage_ms"), 10)
                ratio_cells = "".join(
                    f" {fmt(ratios[f'treemat_vs_{name}'], max(len(name) + 2, 8), 2)}x" for name in others
                )
                lines.append(f"{shape:>7}{cells} {stage}{ratio_cells}")
        if self.runners:
            lines.append("spawn runners: " + ", ".join(f"{k}={v or '?'}" for k, v in self.runners.items()))
        lines.append(GOALS)
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
        strategies = self.strategies()
        fig, axis = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(len(strategies), 1)
        for offset, strategy in enumerate(strategies):
            values = [self.median(strategy, shape) or 0.0 for shape in shapes]
            axis.bar([i + offset * width for i in range(len(shapes))], values, width, label=strategy)
        center = width * (len(strategies) - 1) / 2
        axis.set_xticks([i + center for i in range(len(shapes))], [f"{s} inputs" for s in shapes])
        axis.set_ylabel("SwiftCompile wall time (ms, median)")
        axis.set_title(f"treemat vs Bazel {self.bazel} strategies" if self.bazel else "treemat vs Bazel strategies")
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
    strategies: Sequence[str] | None = None,
    bazel: tuple[int, str] | None = None,
    root: Path | None = None,
    output_base: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Run the strategy benchmark; see the module docstring for the method.

    `bazel` is (major, release) of the `bazel` on PATH (asked when None); `strategies` defaults to every
    strategy that version offers.
    """
    major, release = bazel or bazel_version(workspace)
    strategies = tuple(strategies) if strategies is not None else available_strategies(major)
    check_strategies(strategies, major)
    scratch = Path(tempfile.mkdtemp(prefix="treemat-bench-"))
    root = root or scratch / "treemat-root"
    output_base = output_base or scratch / "output_base"
    targets = [f"//examples/generated:Shape{shape}" for shape in shapes]
    report = BenchReport(bazel=release)
    stats = StatsStore(Root(root).stats)

    def build(strategy: str, profile: Path, *extra: str) -> str:
        stats.reset()
        run = _bazel(
            workspace,
            output_base,
            "build",
            # the worker's root as a startup flag: the compiles get no shell environment (no --action_env)
            *[f"--worker_extra_flag={m}=--root={root}" for m in ("SwiftCompile", "SwiftLink", "TreematRun")],
            f"--profile={profile}",
            *extra,
            *strategy_flags(strategy, major),
            *targets,
        )
        if run.returncode:
            what = "incremental build" if extra else "build"
            raise TreematError(f"{strategy} {what} failed: {run.stderr.strip()[-500:]}")
        return run.stderr

    def record(strategy: str, label: str, profile: Path, round_index: int) -> None:
        staged = _stage_ms_by_inputs(stats) if strategy == "treemat" else {}
        for shape, wall_ms in _compile_times(profile, shapes).items():
            stage = next((ms for inputs, ms in sorted(staged.items()) if shape <= inputs <= shape + 16), None)
            report.samples.append(BenchSample(label, shape, round_index, wall_ms, stage))

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
                profile = scratch / f"{strategy}-{round_index}.profile.json"
                stderr = build(strategy, profile)
                report.runners.setdefault(strategy, spawn_runners(stderr))
                if round_index == 0:
                    continue  # warm-up: Bazel server, worker, CAS
                record(strategy, strategy, profile, round_index)
                # incremental: edit one source of every shape and rebuild (same server, warm worker)
                edited = scratch / f"{strategy}-{round_index}-edit.profile.json"
                build(strategy, edited, f"--define=treemat_bench_edit={strategy}{round_index}")
                record(strategy, f"{strategy}+edit", edited, round_index)
    finally:
        _bazel(workspace, output_base, "shutdown")
        with contextlib.suppress(OSError):
            remove_tree(scratch)  # output base, profiles, the default treemat root: hundreds of MB per run
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
