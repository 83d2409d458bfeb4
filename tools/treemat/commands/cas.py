"""`treemat cas ingest|verify|gc|stats`: inspect and maintain the content-addressable store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from treemat.commands._common import RootedContext, describe_report, emit_json, pass_rooted, progress_bar

if TYPE_CHECKING:
    from treemat.stack import Store


def parse_size(text: str) -> int:
    """Parse sizes like `500M`, `10G`, `1234` (bytes) for a click option (budget.parse_size does the work)."""
    from treemat.budget import parse_size as parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise click.BadParameter(f"not a size: {text!r} (examples: 500M, 10G, 1048576)") from exc


def _open_store(rooted: RootedContext) -> AbstractContextManager[Store]:
    """The root's CAS alone (`stack.open_store`: no sandbox helper): these commands stage nothing and run no tool."""
    from treemat.stack import open_store

    return open_store(rooted.layout)


@click.group()
def cas() -> None:
    """Inspect and maintain the content-addressable store (ROOT/cas, Bazel disk-cache layout)."""


@cas.command("ingest")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print path -> digest as JSON.")
@pass_rooted
def ingest(rooted: RootedContext, paths: tuple[Path, ...], as_json: bool) -> int:
    """Add files (directories are walked) to the CAS; prints each file's digest.

    The exec bit of each file is kept: executables and plain files are stored as separate blobs.
    """
    files = list(_walk_files(paths))
    result: dict[str, str] = {}
    with (
        _open_store(rooted) as store,
        progress_bar(len(files), "ingesting", enabled=not as_json and len(files) >= 200) as advance,
    ):
        for path in files:
            executable = os.access(path, os.X_OK)
            result[str(path)] = str(store.cas.ingest_file(path, executable=executable))
            advance(1)
    if as_json:
        emit_json(result)
    else:
        for path_text, digest in result.items():
            click.echo(f"{digest}  {path_text}")
    return 0


def _walk_files(paths: tuple[Path, ...]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for dirpath, _dirs, names in os.walk(path):
                for name in sorted(names):
                    candidate = Path(dirpath) / name
                    if candidate.is_file() and not candidate.is_symlink():
                        yield candidate
        else:
            yield path


@cas.command("verify")
@click.option("--json", "as_json", is_flag=True)
@pass_rooted
def verify(rooted: RootedContext, as_json: bool) -> int:
    """Rehash every blob; corrupt blobs are moved to ROOT/quarantine and never served again.

    Exit status 1 if anything was corrupt.
    """
    with _open_store(rooted) as store:
        total = store.cas.stats().blobs
        with progress_bar(total, "verifying", enabled=not as_json and total >= 200) as advance:
            report = store.cas.verify_all(progress=advance)
    if as_json:
        emit_json(report)
    else:
        click.echo(describe_report(report))
    return 1 if report.corrupt else 0


@cas.command("gc")
@click.option("--max-size", required=True, help="Target CAS size, e.g. 20G. Least recently used blobs go first.")
@click.option("--json", "as_json", is_flag=True)
@pass_rooted
def gc(rooted: RootedContext, max_size: str, as_json: bool) -> int:
    """Delete least-recently-used blobs until the CAS fits in --max-size.

    Blobs in use (hardlinked into a live exec dir or the directory cache) are never deleted; GC waits
    for running stagers to release the CAS.
    """
    limit = parse_size(max_size)
    with _open_store(rooted) as store:
        report = store.cas.gc(limit)
    if as_json:
        emit_json(report)
    else:
        click.echo(describe_report(report))
    return 0


@cas.command("stats")
@click.option("--json", "as_json", is_flag=True)
@pass_rooted
def stats(rooted: RootedContext, as_json: bool) -> int:
    """Blob count and bytes in the CAS."""
    with _open_store(rooted) as store:
        report = store.cas.stats()
    if as_json:
        emit_json(report)
    else:
        click.echo(describe_report(report))
    return 0
