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

`--ci` (run_bench(ci=True)) is the CI-shaped variant: instead of `bazel clean`, each build gets a new output
base and so a new Bazel server and fresh workers, while the treemat root is kept (as a CI cache restore would);
clean builds only. `--workload chain` builds //examples/generated:Chain (32 levels of 3 Swift modules, each
importing the level below) and reports each build's execution phase, clean and after editing one source.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from treemat.benchreport import BASELINES as BASELINES
from treemat.benchreport import GOALS as GOALS
from treemat.benchreport import ON_REQUEST, TREEMAT_MNEMONICS
from treemat.benchreport import STRATEGY_FLAGS as STRATEGY_FLAGS
from treemat.benchreport import BenchReport as BenchReport
from treemat.benchreport import BenchSample as BenchSample
from treemat.counters import StatsStore
from treemat.errors import TreematError
from treemat.fsprims import remove_tree
from treemat.layout import Root

# The oldest Bazel major version with a strategy's flags (--experimental_inmemory_sandbox_stashes: 7.x).
MIN_BAZEL_MAJOR = {"sandboxed-reuse": 7}
# Flags added from a Bazel major version on, per strategy ("*": every strategy).
VERSION_FLAGS: dict[str, list[tuple[int, list[str]]]] = {
    # WORKSPACE mode: the same WORKSPACE, and so the same build graph, as on Bazel 4.2.3.
    "*": [(7, ["--noenable_bzlmod"])],
    # 7.x reuses sandbox directories by default; `sandboxed` stays a fresh sandbox per action, as on 4.2.3.
    "sandboxed": [(7, ["--noreuse_sandbox_directories"])],
}


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
    return tuple(
        name for name in STRATEGY_FLAGS if bazel_major >= MIN_BAZEL_MAJOR.get(name, 0) and name not in ON_REQUEST
    )


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


def _bazel(workspace: Path, output_base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bazel", f"--output_base={output_base}", *args], cwd=workspace, capture_output=True, text=True
    )


# The chain workload (examples/generated/BUILD.bazel): 32 levels of 3 modules under one top module.
CHAIN_TARGET = "//examples/generated:Chain"
CHAIN_MODULES = 32 * 3 + 1
WORKLOADS = ("shapes", "chain")


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
    ci: bool = False,
    workload: str = "shapes",
) -> BenchReport:
    """Run the strategy benchmark; see the module docstring for the method.

    `bazel` is (major, release) of the `bazel` on PATH (asked when None); `strategies` defaults to every
    strategy that version offers. `ci`: every build gets a new output base and Bazel server (so a fresh
    worker), the treemat root is kept, and there are no edit rebuilds. `workload` "chain" builds the module
    chain and reports each build's execution phase instead of each ShapeN compile.
    """
    major, release = bazel or bazel_version(workspace)
    strategies = tuple(strategies) if strategies is not None else available_strategies(major)
    check_strategies(strategies, major)
    if workload not in WORKLOADS:
        raise TreematError(f"unknown workload {workload!r}: choose from {', '.join(WORKLOADS)}")
    scratch = Path(tempfile.mkdtemp(prefix="treemat-bench-"))
    root = root or scratch / "treemat-root"
    shared_base = output_base or scratch / "output_base"
    chain = workload == "chain"
    targets = [CHAIN_TARGET] if chain else [f"//examples/generated:Shape{shape}" for shape in shapes]
    report = BenchReport(bazel=release, mode="ci" if ci else "warm")
    if chain:
        report.metric, report.unit = "Execution phase of the whole build", "modules"
    stats = StatsStore(Root(root).stats)

    def build(base: Path, strategy: str, profile: Path, *extra: str) -> str:
        stats.reset()
        run = _bazel(
            workspace,
            base,
            "build",
            # the worker's root as a startup flag: the compiles get no shell environment (no --action_env)
            *[f"--worker_extra_flag={m}=--root={root}" for m in TREEMAT_MNEMONICS],
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
        if chain:
            report.samples.append(BenchSample(label, CHAIN_MODULES, round_index, _execution_span_ms(profile)))
            return
        staged = _stage_ms_by_inputs(stats) if strategy == "treemat" else {}
        for shape, wall_ms in _compile_times(profile, shapes).items():
            stage = next((ms for inputs, ms in sorted(staged.items()) if shape <= inputs <= shape + 16), None)
            report.samples.append(BenchSample(label, shape, round_index, wall_ms, stage))

    def one_run(strategy: str, round_index: int) -> None:
        base = scratch / f"output_base-{strategy}-{round_index}" if ci else shared_base
        if not ci:
            cleaned = _bazel(workspace, base, "clean")
            if cleaned.returncode:
                raise TreematError(f"bazel clean failed: {cleaned.stderr.strip()[-300:]}")
        try:
            profile = scratch / f"{strategy}-{round_index}.profile.json"
            stderr = build(base, strategy, profile)
            report.runners.setdefault(strategy, spawn_runners(stderr))
            if round_index == 0:
                return  # warm-up: Bazel server, worker, CAS (under --ci: the root's CAS and ledger only)
            record(strategy, strategy, profile, round_index)
            if ci:
                return  # CI builds once from scratch
            # incremental: edit one source of every shape and rebuild (same server, warm worker)
            edited = scratch / f"{strategy}-{round_index}-edit.profile.json"
            build(base, strategy, edited, f"--define=treemat_bench_edit={strategy}{round_index}")
            record(strategy, f"{strategy}+edit", edited, round_index)
        finally:
            if ci:  # the server goes with its output base, as on a fresh CI machine
                _bazel(workspace, base, "shutdown")
                with contextlib.suppress(OSError):
                    remove_tree(base)

    try:
        for round_index in range(rounds + 1):
            shift = round_index % len(strategies)
            for strategy in list(strategies[shift:]) + list(strategies[:shift]):
                if progress:
                    progress(f"round {round_index}/{rounds} {strategy}")
                one_run(strategy, round_index)
    finally:
        if not ci:
            _bazel(workspace, shared_base, "shutdown")
        end_services(Root(root))  # the stager services outlive Bazel's workers; their root goes now
        with contextlib.suppress(OSError):
            remove_tree(scratch)  # output bases, profiles, the default treemat root: hundreds of MB per run
    return report


def end_services(layout: Root) -> None:
    """Stop the stager services of `layout` (their pid files name them)."""
    for pid_file in layout.service.glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def _execution_span_ms(profile: Path) -> float:
    """From the first action's start to the last action's end (ms), from a Bazel JSON trace profile."""
    spans = [
        (float(event.get("ts", 0)), float(event.get("ts", 0)) + float(event.get("dur", 0)))
        for event in _trace_events(profile)
        if isinstance(event, dict) and event.get("cat") == "action processing"
    ]
    if not spans:
        raise TreematError(f"Bazel profile {profile} has no action")
    return (max(end for _, end in spans) - min(start for start, _ in spans)) / 1000.0


def _trace_events(profile: Path) -> list[object]:
    try:
        events = json.loads(profile.read_text()).get("traceEvents", [])
    except (OSError, ValueError) as exc:
        raise TreematError(f"cannot read Bazel profile {profile}: {exc}") from None
    return events if isinstance(events, list) else []


def _compile_times(profile: Path, shapes: Sequence[int]) -> dict[int, float]:
    """Wall time (ms) of each ShapeN SwiftCompile action, from a Bazel JSON trace profile."""
    times: dict[int, float] = {}
    for event in _trace_events(profile):
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
