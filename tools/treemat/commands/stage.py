"""`treemat stage MANIFEST DEST`: materialize an input tree by hand."""

from __future__ import annotations

from pathlib import Path

import click

from treemat.commands._common import RootedContext, emit_json, pass_rooted, progress_bar
from treemat.commands.stats import format_counters
from treemat.counters import Counters, StatsStore
from treemat.errors import TreematError


@click.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dest", type=click.Path(path_type=Path))
@click.option(
    "--prefer",
    "prefer",
    multiple=True,
    type=click.Choice(["clonefile", "reflink", "hardlink", "copy"]),
    help="Force a backend order (repeat to list several). Default: fastest safe method the filesystems allow.",
)
@click.option("--no-dircache", is_flag=True, help="Materialize file by file; skip the subtree cache.")
@click.option("--concurrency", type=click.IntRange(min=1), default=None, help="Threads (default: sized to CPUs).")
@click.option("--json", "as_json", is_flag=True, help="Print the stage report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@pass_rooted
def stage(
    rooted: RootedContext,
    manifest: Path,
    dest: Path,
    prefer: tuple[str, ...],
    no_dircache: bool,
    concurrency: int | None,
    as_json: bool,
    quiet: bool,
) -> int:
    """Materialize the input tree described by MANIFEST into the new directory DEST.

    MANIFEST is JSON: a list of entries (or {"inputs": [...]}), each one of

    \b
      {"path": "src/a.swift", "digest": "<sha256>/<size>", "executable": false,
       "source": "/file/to/ingest/if/the/CAS/lacks/it"}
      {"path": "lib/current", "symlink": "v2"}        relative, must stay inside the tree
      {"path": "out/objs", "directory": true}         an empty directory

    Blobs missing from the CAS are ingested from "source" (and verified against "digest").
    DEST must not exist. Files come out read-only; directories writable.
    """
    from treemat.backends import Method
    from treemat.stack import DEFAULT_DIRCACHE_MIN_FILES, open_stack
    from treemat.tree import load_manifest

    if dest.exists() or dest.is_symlink():
        raise TreematError(f"destination already exists: {dest}")
    tree = load_manifest(manifest)
    counters = Counters()
    with open_stack(
        rooted.layout,
        counters=counters,
        prefer=[Method(name) for name in prefer] or None,
        concurrency=concurrency,
        dircache_min_files=DEFAULT_DIRCACHE_MIN_FILES if not no_dircache else None,
    ) as stack:
        for path, node in tree.iter_files():
            found = stack.cas.lookup(node.digest.hash, node.executable)
            if found is not None and found.size != node.digest.size:
                raise TreematError(f"{path}: the manifest declares {node.digest.size} bytes, the blob has {found.size}")
        total = tree.count_files()
        with progress_bar(total, "staging", enabled=not quiet and not as_json and total >= 500) as advance:
            report = stack.dircache.stage(tree, dest.absolute(), progress=advance)
        StatsStore(stack.layout.stats).publish(counters, role="cli-stage", extra=stack.describe())
    if as_json:
        emit_json({"dest": str(dest), "report": report, "counters": counters.snapshot()})
    else:
        click.echo(f"staged {total} files into {dest}")
        click.echo(format_counters(counters.snapshot()))
    return 0
