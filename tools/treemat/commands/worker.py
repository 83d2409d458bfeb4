"""`treemat worker` (also `treemat --persistent_worker`): serve Bazel's persistent-worker protocol."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from treemat.commands._common import RootedContext, pass_rooted

if TYPE_CHECKING:
    from treemat.protocol import Wire


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--persistent_worker", is_flag=True, hidden=True, help="What Bazel passes; implied.")
@click.option(
    "--protocol",
    type=click.Choice(["json", "proto", "auto"]),
    default="auto",
    show_default=True,
    help="Wire format; `auto` sniffs the first bytes.",
)
@click.option(
    "--root",
    "worker_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="treemat root (default: the global --root).",
)
@click.option(
    "--max-workers",
    type=click.IntRange(min=1),
    default=max(2, os.cpu_count() or 2),
    show_default="max(2, CPUs)",
    help="Multiplex requests run at once.",
)
@click.argument("ignored", nargs=-1, type=click.UNPROCESSED)
@pass_rooted
def worker(
    rooted: RootedContext,
    persistent_worker: bool,
    protocol: str,
    worker_root: Path | None,
    max_workers: int,
    ignored: tuple[str, ...],
) -> int:
    """Serve Bazel's persistent-worker protocol on stdin/stdout (what Bazel runs).

    Same as `treemat --persistent_worker ...`. Unknown flags (e.g. from --worker_extra_flag) and `@flagfile`
    arguments are ignored: each request carries its own arguments.
    """
    from treemat.worker import serve_stdio

    root = (worker_root or rooted.root).expanduser().absolute()
    wire: Wire | None = "json" if protocol == "json" else "proto" if protocol == "proto" else None
    return serve_stdio(root, protocol=wire, max_workers=max_workers, isolation=rooted.isolation)
