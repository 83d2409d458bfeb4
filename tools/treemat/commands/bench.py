"""`treemat bench`: treemat against Bazel's local and sandboxed strategies on SwiftCompile-shaped actions."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import click

from treemat.commands._common import emit_json, progress_bar
from treemat.errors import TreematError

# tools/bazel7.sh of the checkout this package runs from (tools/treemat/commands/bench.py -> tools/).
BAZEL7_SCRIPT = Path(__file__).resolve().parents[2] / "bazel7.sh"
STRATEGIES = ("local", "sandboxed", "sandboxed-reuse", "treemat")  # treemat.bench.STRATEGY_FLAGS, import-free


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
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench(
    workspace: Path,
    shapes: tuple[str, ...],
    strategies: tuple[str, ...],
    rounds: int,
    quick: bool,
    bazel7: bool,
    out: Path,
    as_json: bool,
) -> int:
    """Compare treemat with Bazel's local and sandboxed strategies on SwiftCompile-shaped actions.

    Builds //examples/generated:Shape{64,635,1978} from `bazel clean` with each strategy, alternating
    the order every round (round 0 warms up), and reads per-action wall time from Bazel's JSON trace
    profile. On Bazel >= 7 (`--bazel7`) it also measures `sandboxed-reuse` (--reuse_sandbox_directories
    --experimental_inmemory_sandbox_stashes). Writes OUT/bench.json and, with matplotlib installed,
    OUT/bench.png. Takes minutes.
    """
    from treemat.bench import available_strategies, bazel_version, check_strategies, run_bench, save_report

    workspace, out = workspace.absolute(), out.absolute()
    if bazel7 and not os.environ.get("TREEMAT_BAZEL7_CHROOT"):
        argv = ["bench", f"--workspace={workspace}", f"--rounds={rounds}", f"--out={out}"]
        argv += [f"--shape={s}" for s in shapes] + [f"--strategy={s}" for s in strategies]
        argv += ["--quick"] * quick + ["--json"] * as_json
        return _run_in_bazel7_chroot(argv, workspace, out)
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
        )
    out.mkdir(parents=True, exist_ok=True)
    written = save_report(report, out / "bench.json", out / "bench.png")
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(report.to_table())
        click.echo("wrote " + ", ".join(str(p) for p in written))
    return 0


def _run_in_bazel7_chroot(argv: list[str], workspace: Path, out: Path) -> int:
    """`treemat ARGV` inside tools/bazel7.sh's chroot (this checkout mounted, plus workspace and out)."""
    from treemat.bench import bazel7_command

    if not BAZEL7_SCRIPT.is_file():
        raise TreematError(f"--bazel7 needs tools/bazel7.sh of a treemat checkout; not found at {BAZEL7_SCRIPT}")
    if os.geteuid() != 0:
        raise TreematError("--bazel7 needs root (tools/bazel7.sh mounts and pivots into a chroot): use sudo")
    out.mkdir(parents=True, exist_ok=True)
    checkout = BAZEL7_SCRIPT.parents[1]
    binds = [path for path in (workspace, out) if not path.resolve().is_relative_to(checkout)]
    return subprocess.run(bazel7_command(BAZEL7_SCRIPT, argv, binds), check=False).returncode
