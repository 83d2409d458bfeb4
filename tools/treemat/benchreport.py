"""`treemat bench`'s results: samples, min / median over rounds, treemat's ratios, the table and the chart.

A sample's `shape` is the generated workload's size: inputs per SwiftCompile for the shape modules, modules for
the chain workload (`unit`). Strategies are reported in STRATEGY_FLAGS' order.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

TREEMAT_MNEMONICS = ("SwiftCompile", "SwiftLink", "TreematRun")
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
    # treemat's other worker mode (`--no-service` / `--service`, whichever is not the default): only when asked for
    "treemat-inprocess": ["--config=treemat", *(f"--worker_extra_flag={m}=--no-service" for m in TREEMAT_MNEMONICS)],
    "treemat-service": ["--config=treemat", *(f"--worker_extra_flag={m}=--service" for m in TREEMAT_MNEMONICS)],
}
ON_REQUEST = ("treemat-inprocess", "treemat-service")  # not among the default strategies
# treemat's wall time is compared with each of these that was measured, in this order.
BASELINES = ("sandboxed", "sandboxed-reuse", "local")
GOALS = "goals: treemat <= 0.5x sandboxed, <= 1.05x local"


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
    metric: str = "SwiftCompile wall time per action"  # what walltime_ms measures
    unit: str = "inputs"  # what `shape` counts
    mode: str = "warm"  # "warm": `bazel clean`, one server; "ci": a new output base and server per build
    order: list[str] = field(default_factory=lambda: list(STRATEGY_FLAGS))  # the strategies, in table order
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))  # what treemat is compared with
    goals: str = GOALS

    def strategies(self) -> list[str]:
        """The strategies measured (clean builds or edit rebuilds), in table order."""
        measured = {s.strategy.removesuffix("+edit") for s in self.samples}
        return [name for name in self.order if name in measured]

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
            "mode": self.mode,
            "metric": self.metric,
            "unit": self.unit,
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
        for other in (name for name in self.baselines if name in measured):
            theirs = self.median(other + suffix, shape)
            out[f"treemat_vs_{other}"] = round(ours / theirs, 2) if ours and theirs else None
        return out

    def to_table(self) -> str:
        """Human table: min / median per strategy, treemat's staging, ratios; clean builds then edit rebuilds."""

        def fmt(value: float | None, width: int, places: int = 1) -> str:
            return f"{value:>{width}.{places}f}" if value is not None else f"{'-':>{width}}"

        strategies = self.strategies()
        others = [name for name in self.baselines if name in strategies]
        lines: list[str] = []
        if self.bazel:
            lines.append(
                f"Bazel {self.bazel}" + (", CI-shaped: a new output base and server per build" * (self.mode == "ci"))
            )
        for suffix, title in (("", "clean build"), ("+edit", "rebuild after editing one source")):
            if suffix and not any(s.strategy.endswith(suffix) for s in self.samples):
                continue  # no edit rebuilds (--ci)
            lines.append(f"{self.metric}, {title}, min / median over rounds (ms):")
            header = f"{self.unit:>7}" + "".join(f" {name:>15}" for name in strategies) + f" {'(staging)':>10}"
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
        lines.append(self.goals)
        return "\n".join(lines)

    def write_chart(self, path: Path) -> bool:
        """A grouped bar chart (PNG) when matplotlib is installed; False otherwise."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        edits = any(s.strategy.endswith("+edit") for s in self.samples)
        groups = [(shape, suffix) for shape in self.shapes() for suffix in ("", "+edit")[: 1 + edits]]
        strategies = self.strategies()
        fig, axis = plt.subplots(figsize=(7 + 2 * edits, 4))
        width = 0.8 / max(len(strategies), 1)
        for offset, strategy in enumerate(strategies):
            values = [self.median(strategy + suffix, shape) or 0.0 for shape, suffix in groups]
            axis.bar([i + offset * width for i in range(len(groups))], values, width, label=strategy)
        center = width * (len(strategies) - 1) / 2
        labels = [f"{shape} {self.unit}" + (", edit" if suffix else ", clean") * edits for shape, suffix in groups]
        axis.set_xticks([i + center for i in range(len(groups))], labels)
        axis.set_ylabel(f"{self.metric} (ms, median)")
        axis.set_title(f"treemat vs Bazel {self.bazel} strategies" if self.bazel else "treemat vs Bazel strategies")
        axis.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return True
