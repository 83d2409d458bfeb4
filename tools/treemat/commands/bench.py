"""`treemat bench`: treemat against Bazel's local and sandboxed strategies on SwiftCompile-shaped actions."""

from __future__ import annotations

from pathlib import Path

import click

from treemat.commands._common import emit_json, progress_bar


@click.command()
@click.option(
    "--workspace",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=".",
    help="The treemat workspace (with //examples/generated).",
)
@click.option("--shape", "shapes", multiple=True, type=click.Choice(["64", "635", "1978"]), help="Repeatable.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--quick", is_flag=True, help="One shape (635 inputs), one round.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench(workspace: Path, shapes: tuple[str, ...], rounds: int, quick: bool, out: Path, as_json: bool) -> int:
    """Compare treemat with Bazel's local and sandboxed strategies on SwiftCompile-shaped actions.

    Builds //examples/generated:Shape{64,635,1978} from `bazel clean` with each strategy, alternating
    the order every round (round 0 warms up), and reads per-action wall time from Bazel's execution
    log. Writes OUT/bench.json and, with matplotlib installed, OUT/bench.png. Takes minutes.
    """
    from treemat.bench import run_bench, save_report

    chosen = (635,) if quick else tuple(int(s) for s in shapes) or (64, 635, 1978)
    steps = (1 if quick else rounds) + 1
    with progress_bar(steps * 3, "benchmarking", enabled=not as_json) as advance:
        report = run_bench(
            workspace.absolute(), shapes=chosen, rounds=1 if quick else rounds, progress=lambda _msg: advance(1)
        )
    out.mkdir(parents=True, exist_ok=True)
    written = save_report(report, out / "bench.json", out / "bench.png")
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(report.to_table())
        click.echo("wrote " + ", ".join(str(p) for p in written))
    return 0
