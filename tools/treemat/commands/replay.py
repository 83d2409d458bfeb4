"""`treemat replay EXEC_LOG`: what staging would cost with each backend on a recorded build."""

from __future__ import annotations

from pathlib import Path

import click

from treemat.commands._common import RootedContext, emit_json, pass_rooted, progress_bar


@click.command()
@click.argument("exec_log", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--execroot",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Take blob content from this execroot (`bazel info execution_root`); otherwise same-size blobs are made.",
)
@click.option("--mnemonic", "mnemonics", multiple=True, help="Only spawns with this mnemonic (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), help="Replay at most this many spawns.")
@click.option("--json", "as_json", is_flag=True)
@pass_rooted
def replay(
    rooted: RootedContext,
    exec_log: Path,
    execroot: Path | None,
    mnemonics: tuple[str, ...],
    limit: int | None,
    as_json: bool,
) -> int:
    """Replay a Bazel execution log: what would staging cost with each backend on YOUR build?

    Record one with `bazel build --execution_log_json_file=log.json ...` (or
    --execution_log_binary_file). Every spawn's input tree is materialized with every backend that
    works here (and through the directory cache where it applies), timed, and summed per mnemonic.
    """
    from treemat.execlog import read_exec_log
    from treemat.replay import replay as run_replay

    wanted = set(mnemonics) or None
    total = sum(1 for s in read_exec_log(exec_log) if not wanted or s.mnemonic in wanted)
    total = min(total, limit) if limit else total
    with progress_bar(total, "replaying", enabled=not as_json) as advance:
        report = run_replay(
            exec_log, layout=rooted.layout, execroot=execroot, limit=limit, mnemonics=wanted, progress=advance
        )
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(report.to_table())
    return 0
