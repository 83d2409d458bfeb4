"""The `treemat` command line: the click group; each command lives in its own module under commands/."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from treemat.commands import bench, bot, cas, import_, probe, replay, stage, stats, worker
from treemat.commands._common import RootedContext, TreematGroup

ISOLATION_CHOICES = ("auto", "overlay", "copy-on-write", "none")  # = stack.ISOLATION_CHOICES (a test checks)


@click.group(cls=TreematGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TREEMAT_ROOT",
    default=None,
    help="treemat state directory (CAS, directory cache, exec dirs, stats). "
    "Default: $TREEMAT_ROOT, else $XDG_CACHE_HOME/treemat, else ~/.cache/treemat.",
)
@click.option(
    "--isolation",
    type=click.Choice(ISOLATION_CHOICES),
    envvar="TREEMAT_ISOLATION",
    default="auto",
    show_default=True,
    help="How tools are sandboxed. `auto`: overlay where overlayfs works in a user namespace, else copy-on-write; "
    "where no sandbox works, every action fails with the kernel's reason. `none` runs tools UNSANDBOXED "
    "(asked for only; shown by probe, stats and every action's counters).",
)
@click.version_option(package_name="treemat", message="treemat %(version)s")
@click.pass_context
def cli(ctx: click.Context, root: Path | None, isolation: str) -> None:
    """Fast, hermetic input materialization for Bazel actions.

    treemat keeps every input blob once in an on-disk CAS and builds each action's input tree in a
    private directory with the cheapest kernel path the filesystems allow: APFS clonefile (whole
    cached subtrees in one call), btrfs snapshots, FICLONE reflinks, hardlinks, and copy last.
    Inputs come out read-only (0o440, 0o550 for executables) in writable directories, so an action
    can create outputs anywhere but cannot change its inputs.

    \b
    Typical use:
      bazel build --config=treemat //...     Bazel runs treemat as a persistent worker
      treemat stats                          which backend files took; subtree cache hits
      treemat stage manifest.json out/       materialize a tree by hand
      treemat cas verify                     rehash every blob, quarantine corrupt ones
    """
    from treemat.layout import default_root_path

    ctx.obj = RootedContext((root or default_root_path()).expanduser().absolute(), isolation)


for _command in (
    stage.stage,
    stats.stats,
    probe.probe,
    cas.cas,
    bench.bench,
    replay.replay,
    worker.worker,
    bot.bot,
    import_.import_,
):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: runs the group, returns the exit status."""
    try:
        cli.main(args=argv, prog_name="treemat", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
