"""`treemat bench`: treemat against Bazel's local and sandboxed strategies on SwiftCompile-shaped actions."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import click

from treemat.commands._common import emit_json, progress_bar
from treemat.errors import TreematError

# tools/bazel7.sh of the checkout this package runs from (tools/treemat/commands/bench.py -> tools/).
BAZEL7_SCRIPT = Path(__file__).resolve().parents[2] / "bazel7.sh"
STRATEGIES = (
    "local",
    "sandboxed",
    "sandboxed-reuse",
    "treemat",
    "treemat-inprocess",
    "treemat-service",
)  # = STRATEGY_FLAGS
WORKLOADS = ("shapes", "chain")  # treemat.bench.WORKLOADS


@click.command()
@click.option(
    "--workspace",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=".",
    help="The treemat workspace (with //examples/generated).",
)
@click.option("--shape", "shapes", multiple=True, type=click.Choice(["64", "635", "1978"]), help="Repeatable.")
@click.option(
    "--strategy",
    "strategies",
    multiple=True,
    type=click.Choice(STRATEGIES),
    help="Repeatable; default: every strategy the Bazel on PATH offers (sandboxed-reuse needs Bazel >= 7).",
)
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--quick", is_flag=True, help="One shape (635 inputs), one round.")
@click.option(
    "--bazel7",
    is_flag=True,
    help="Run the whole bench on Bazel 7.7.1 in the chroot of tools/bazel7.sh (root; $TREEMAT_BAZEL7_ROOT).",
)
@click.option(
    "--ci",
    is_flag=True,
    help="CI-shaped: a new output base and Bazel server (fresh workers) per build, the treemat root kept "
    "(as a CI cache restore would); clean builds only.",
)
@click.option(
    "--workload",
    type=click.Choice(WORKLOADS),
    default="shapes",
    show_default=True,
    help="shapes: per-compile time of //examples/generated:Shape{64,635,1978}; chain: the execution phase of "
    "building //examples/generated:Chain (32 levels of 3 Swift modules each importing the level below), clean "
    "and after editing one source.",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True)
@click.option(
    "--chart",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where the PNG chart goes (needs matplotlib: the [chart] extra). Default: OUT/bench.png.",
)
@click.option(
    "--rules-swift",
    is_flag=True,
    help="A generated rules_swift 3.6.1 workspace on Bazel 7.7.1 (the chroot of tools/bazel7.sh): rules_swift's own "
    "worker, treemat (treemat_rules_swift) and --strategy=SwiftCompile=sandboxed, clean and after editing one source.",
)
@click.option(
    "--fixtures",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="--rules-swift: the rules_swift 3.6.1 fixture tarballs. Default: ../shared/third_party/rules_swift-3.6.1 "
    "beside the checkout.",
)
@click.option("--json", "as_json", is_flag=True)
def bench(
    workspace: Path,
    shapes: tuple[str, ...],
    strategies: tuple[str, ...],
    rounds: int,
    quick: bool,
    bazel7: bool,
    ci: bool,
    workload: str,
    out: Path,
    chart: Path | None,
    rules_swift: bool,
    fixtures: Path | None,
    as_json: bool,
) -> int:
    """Compare treemat with Bazel's local and sandboxed strategies on SwiftCompile-shaped actions.

    Builds //examples/generated:Shape{64,635,1978} from `bazel clean` with each strategy, alternating
    the order every round (round 0 warms up), and reads per-action wall time from Bazel's JSON trace
    profile. On Bazel >= 7 (`--bazel7`) it also measures `sandboxed-reuse` (--reuse_sandbox_directories
    --experimental_inmemory_sandbox_stashes). `--ci` gives every build a new output base and server instead
    of `bazel clean`; `--workload chain` times whole builds of a 97-module dependency chain. Writes
    OUT/bench.json and, with matplotlib installed, a chart (OUT/bench.png or --chart). Takes minutes.
    """
    from treemat.bench import available_strategies, bazel_version, check_strategies, run_bench, save_report

    workspace, out = workspace.absolute(), out.absolute()
    if rules_swift:
        return _bench_rules_swift(fixtures, out, chart, rounds=1 if quick else rounds, quick=quick, as_json=as_json)
    if workload == "chain" and shapes:
        raise click.UsageError("--shape applies to --workload shapes only")
    if bazel7 and not os.environ.get("TREEMAT_BAZEL7_CHROOT"):
        argv = ["bench", f"--workspace={workspace}", f"--rounds={rounds}", f"--out={out}"]
        argv += [f"--chart={chart.absolute()}"] if chart else []
        argv += [f"--shape={s}" for s in shapes] + [f"--strategy={s}" for s in strategies]
        argv += ["--quick"] * quick + ["--json"] * as_json + ["--ci"] * ci
        argv += [f"--workload={workload}"] * (workload != "shapes")
        return _run_in_bazel7_chroot(argv, workspace, out, chart.absolute().parent if chart else out)
    chart = chart.absolute() if chart else out / "bench.png"
    bazel = bazel_version(workspace)
    chosen_strategies = strategies or available_strategies(bazel[0])
    check_strategies(chosen_strategies, bazel[0])
    chosen = (635,) if quick else tuple(int(s) for s in shapes) or (64, 635, 1978)
    steps = (1 if quick else rounds) + 1
    with progress_bar(steps * len(chosen_strategies), "benchmarking", enabled=not as_json) as advance:
        report = run_bench(
            workspace,
            shapes=chosen,
            rounds=1 if quick else rounds,
            strategies=chosen_strategies,
            bazel=bazel,
            progress=lambda _msg: advance(1),
            ci=ci,
            workload=workload,
        )
    out.mkdir(parents=True, exist_ok=True)
    chart.parent.mkdir(parents=True, exist_ok=True)
    written = save_report(report, out / "bench.json", chart)
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(report.to_table())
        click.echo("wrote " + ", ".join(str(p) for p in written))
    return 0


def _run_in_bazel7_chroot(argv: list[str], workspace: Path, out: Path, chart_dir: Path) -> int:
    """`treemat ARGV` inside tools/bazel7.sh's chroot (this checkout mounted, plus workspace and out)."""
    from treemat.bench import bazel7_command

    if not BAZEL7_SCRIPT.is_file():
        raise TreematError(f"--bazel7 needs tools/bazel7.sh of a treemat checkout; not found at {BAZEL7_SCRIPT}")
    if os.geteuid() != 0:
        raise TreematError("--bazel7 needs root (tools/bazel7.sh mounts and pivots into a chroot): use sudo")
    out.mkdir(parents=True, exist_ok=True)
    chart_dir.mkdir(parents=True, exist_ok=True)
    checkout = BAZEL7_SCRIPT.parents[1]
    binds = [path for path in (workspace, out, chart_dir) if not path.resolve().is_relative_to(checkout)]
    binds = [path for index, path in enumerate(binds) if path not in binds[:index]]
    return subprocess.run(bazel7_command(BAZEL7_SCRIPT, argv, binds), check=False).returncode


def _bench_rules_swift(
    fixtures: Path | None, out: Path, chart: Path | None, *, rounds: int, quick: bool, as_json: bool
) -> int:
    """`treemat bench --rules-swift`: on the host, extract the fixtures and enter the chroot; there, the bench."""
    from treemat.bench import save_report
    from treemat.benchrswift import Shape, bazel, extract_fixtures, run_rules_swift_bench, write_workspace

    checkout = BAZEL7_SCRIPT.parents[1]
    tarballs = fixtures or checkout.parent / "shared" / "third_party" / "rules_swift-3.6.1"
    if not os.environ.get("TREEMAT_BAZEL7_CHROOT"):
        extracted = extract_fixtures(tarballs.absolute(), out / "rules_swift-fixtures")
        argv = ["bench", "--rules-swift", f"--fixtures={extracted}", f"--rounds={rounds}", f"--out={out}"]
        argv += [f"--chart={chart.absolute()}"] if chart else []
        argv += ["--quick"] * quick + ["--json"] * as_json
        code = _run_in_bazel7_chroot(argv, out, out, chart.absolute().parent if chart else out)
        chart_path = chart.absolute() if chart else out / "rules_swift.png"
        if code == 0 and not chart_path.exists():  # no matplotlib in the chroot: drawn here if it is installed
            from treemat.benchrswift import report_from_json

            report_from_json(json.loads((out / "rules_swift.json").read_text())).write_chart(chart_path)
        return code
    workspace = out / "rules_swift-workspace"
    write_workspace(workspace, tarballs.absolute(), checkout, "native", Shape(8, 40) if quick else Shape())
    with progress_bar(rounds * 3, "benchmarking rules_swift", enabled=not as_json) as advance:
        try:
            report = run_rules_swift_bench(workspace, rounds=rounds, progress=lambda _msg: advance(1))
        finally:
            bazel(workspace, "clean", "--expunge")  # the output base is the chroot's, not OUT's
    written = save_report(report, out / "rules_swift.json", chart.absolute() if chart else out / "rules_swift.png")
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(report.to_table())
        click.echo("wrote " + ", ".join(str(p) for p in written))
    return 0
