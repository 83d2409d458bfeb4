"""The `treemat` command line: stage trees, inspect telemetry, manage the CAS, benchmark.

Every failure a user can cause is reported as one line on stderr (`treemat: error: ...`), exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from treemat.counters import FILE_METHOD_COUNTERS, Counters, StatsStore
from treemat.errors import TreematError

F = TypeVar("F", bound=Callable[..., Any])

_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def default_root() -> Path:
    """`$TREEMAT_ROOT`, else `$XDG_CACHE_HOME/treemat`, else `~/.cache/treemat` (shared with the worker)."""
    from treemat.stack import default_root as stack_default_root

    return stack_default_root()


def parse_size(text: str) -> int:
    """Parse sizes like `500M`, `10G`, `1234` (bytes)."""
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in _SIZE_UNITS:
        number, unit = cleaned[:-1], cleaned[-1]
    try:
        return int(float(number) * _SIZE_UNITS[unit])
    except ValueError as exc:
        raise click.BadParameter(f"not a size: {text!r} (examples: 500M, 10G, 1048576)") from exc


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def to_jsonable(value: Any) -> Any:
    """Dataclasses, enums, paths and mappings -> plain JSON types."""
    if hasattr(value, "to_json") and callable(value.to_json):
        return value.to_json()
    if is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and hasattr(value, "name"):  # enum
        return value.value
    return value


def emit_json(value: Any) -> None:
    """Print `value` as indented JSON on stdout."""
    click.echo(json.dumps(to_jsonable(value), indent=2, sort_keys=True))


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn TreematError / OSError into a one-line message and exit status 1 (no traceback)."""
    try:
        yield
    except TreematError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise click.ClickException(f"{exc.strerror or exc}{where}") from None


@contextmanager
def progress_bar(total: int, label: str, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A click progress bar on stderr; yields an `advance(n)` callback (a no-op when disabled)."""
    if not enabled or total <= 0:
        yield lambda _n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True) as bar:
        yield bar.update


class RootedContext:
    """Objects every subcommand shares: the treemat root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root


pass_rooted = click.make_pass_decorator(RootedContext)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TREEMAT_ROOT",
    default=None,
    help="treemat state directory (CAS, directory cache, exec dirs, stats). "
    "Default: $TREEMAT_ROOT, else $XDG_CACHE_HOME/treemat, else ~/.cache/treemat.",
)
@click.version_option(package_name="treemat", message="treemat %(version)s")
@click.pass_context
def cli(ctx: click.Context, root: Path | None) -> None:
    """Fast, hermetic input materialization for Bazel actions.

    treemat keeps every input blob once in an on-disk CAS and builds each action's input tree in a
    private directory with the cheapest kernel path the filesystems allow: APFS clonefile (whole
    cached subtrees in one call), btrfs snapshots, FICLONE reflinks, hardlinks, and copy last.
    Inputs come out read-only (0o444, 0o555 for executables) in writable directories, so an action
    can create outputs anywhere but cannot change its inputs.

    \b
    Typical use:
      bazel build --config=treemat //...     Bazel runs treemat as a persistent worker
      treemat stats                          which backend files took; subtree cache hits
      treemat stage manifest.json out/       materialize a tree by hand
      treemat cas verify                     rehash every blob, quarantine corrupt ones
    """
    ctx.obj = RootedContext((root or default_root()).expanduser().absolute())


# --------------------------------------------------------------------------- stage


@cli.command()
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
) -> None:
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
    from treemat.tree import load_manifest

    with user_errors():
        if dest.exists() or dest.is_symlink():
            raise click.ClickException(f"destination already exists: {dest}")
        tree = load_manifest(manifest)
        counters = Counters()
        cache = build_stack(rooted.root, counters, prefer=prefer, concurrency=concurrency, dircache=not no_dircache)
        for path, node in tree.iter_files():
            found = cache.materializer.cas.lookup(node.digest.hash, node.executable)
            if found is not None and found.size != node.digest.size:
                raise click.ClickException(
                    f"{path}: the manifest declares {node.digest.size} bytes, the blob has {found.size}"
                )
        total = tree.count_files()
        with progress_bar(total, "staging", enabled=not quiet and not as_json and total >= 500) as advance:
            report = cache.stage(tree, dest.absolute(), progress=advance)
        StatsStore(rooted.root).publish(counters, role="cli-stage")
    if as_json:
        emit_json({"dest": str(dest), "report": report, "counters": counters.snapshot()})
    else:
        click.echo(f"staged {total} files into {dest}")
        click.echo(format_counters(counters.snapshot()))


def build_stack(
    root: Path,
    counters: Counters,
    *,
    prefer: tuple[str, ...] = (),
    concurrency: int | None = None,
    dircache: bool = True,
) -> Any:
    """The directory cache of the stack (stack.open_stack), for a CLI command that stages trees."""
    from treemat.backends import Method
    from treemat.stack import open_stack

    stack = open_stack(
        root,
        counters=counters,
        prefer=[Method(name) for name in prefer] or None,
        concurrency=concurrency,
        dircache_min_files=32 if dircache else None,
    )
    return stack.dircache


# --------------------------------------------------------------------------- stats


def format_counters(values: Mapping[str, int]) -> str:
    """Human summary of counters, with a loud line when files silently fell back to copying."""
    placed = {name: values.get(name, 0) for name in FILE_METHOD_COUNTERS}
    total = sum(placed.values())
    lines = ["files by backend:"]
    for name, count in placed.items():
        share = f"{100 * count / total:5.1f}%" if total else "    -"
        lines.append(f"  {name:<10} {count:>10}  {share}")
    hits, misses = values.get("subtree_hits", 0), values.get("subtree_misses", 0)
    lines.append(f"subtree cache: {hits} hits, {misses} misses, {values.get('evictions', 0)} evictions")
    lines.append(
        f"actions: {values.get('actions', 0)} ({values.get('action_failures', 0)} failed), "
        f"ingested {values.get('ingested_blobs', 0)} blobs / {human_bytes(values.get('ingested_bytes', 0))}, "
        f"quarantined {values.get('integrity_quarantined', 0)}"
    )
    others = sorted(k for k in values if k not in FILE_METHOD_COUNTERS and not _is_summarized(k))
    for name in others:
        lines.append(f"  {name}: {values[name]}")
    fast = placed["clonefile"] + placed["reflink"] + placed["hardlink"]
    if placed["copy"] and placed["copy"] >= fast:
        lines.append(
            "WARNING: most files were COPIED — the CAS and exec dirs are probably on different filesystems "
            "or the filesystem supports neither reflinks nor hardlinks (see `treemat probe`)."
        )
    return "\n".join(lines)


def _is_summarized(name: str) -> bool:
    return name in {
        "subtree_hits",
        "subtree_misses",
        "evictions",
        "actions",
        "action_failures",
        "ingested_blobs",
        "ingested_bytes",
        "integrity_quarantined",
    }


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable totals, per-process records included.")
@click.option("--reset", is_flag=True, help="Forget all recorded counters.")
@click.option("--watch", is_flag=True, help="Redraw whenever a treemat process publishes counters (Ctrl-C stops).")
@click.option("--max-updates", type=click.IntRange(min=1), default=None, help="With --watch: stop after N redraws.")
@pass_rooted
def stats(rooted: RootedContext, as_json: bool, reset: bool, watch: bool, max_updates: int | None) -> None:
    """Show what treemat did: files per backend, subtree cache hits, ingests, quarantines.

    Every treemat process (persistent workers included) publishes its counters under ROOT/stats;
    this sums them. A silent fallback to `copy` shows up here, loudly. `--watch` follows a running
    build live (filesystem events via watchdog, no polling).
    """
    store = StatsStore(rooted.root)
    if reset:
        click.echo(f"removed {store.reset()} stats records")
        return
    if watch:
        watch_stats(store, rooted.root, as_json=as_json, max_updates=max_updates)
        return
    show_stats(store, rooted.root, as_json=as_json)


def watch_stats(store: StatsStore, root: Path, *, as_json: bool, max_updates: int | None) -> None:
    """Redraw the stats each time a stats record changes."""
    import threading
    import time

    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    changed = threading.Event()

    class _Changed(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            changed.set()

    store.directory.mkdir(parents=True, exist_ok=True)
    observer = Observer()
    observer.schedule(_Changed(), str(store.directory))
    observer.start()
    updates = 0
    try:
        while max_updates is None or updates < max_updates:
            if not as_json:
                click.clear()
            show_stats(store, root, as_json=as_json)
            updates += 1
            if max_updates is not None and updates >= max_updates:
                break
            changed.wait()
            time.sleep(0.2)  # coalesce a burst of publishes into one redraw
            changed.clear()
    except KeyboardInterrupt:
        pass
    finally:
        observer.stop()
        observer.join()


def show_stats(store: StatsStore, root: Path, *, as_json: bool) -> None:
    """Print the summed counters (and recent actions) once."""
    records = store.load_all()
    totals = store.totals()
    if as_json:
        click.echo(json.dumps({"root": str(root), "totals": totals, "processes": records}, sort_keys=True))
        return
    click.echo(f"treemat root: {root}  ({len(records)} process records)")
    modes = sorted({f"{r.get('isolation')} ({r.get('write_watch')})" for r in records if r.get("isolation")})
    if modes:
        click.echo(f"isolation: {', '.join(modes)}")
    click.echo(format_counters(totals))
    recent = [a for r in records for a in _as_list(r.get("recent_actions"))]
    if recent:
        click.echo("recent actions:")
        for action in recent[-10:]:
            click.echo(f"  {json.dumps(action, sort_keys=True)}")


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []


# --------------------------------------------------------------------------- probe


@cli.command()
@click.argument("dest_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=".")
@click.option("--json", "as_json", is_flag=True)
@pass_rooted
def probe(rooted: RootedContext, dest_dir: Path, as_json: bool) -> None:
    """Show how inputs would be protected and placed from the CAS to DEST_DIR's filesystem, fastest first.

    `isolation: overlay` means hardlinks are used and each tool runs in its own user+mount+pid namespaces
    over an overlayfs (the CAS is read-only there); `copy-on-write` means hardlinks are never used.
    """
    from treemat.stack import open_stack

    with user_errors():
        stack = open_stack(rooted.root)
        methods = stack.probe.methods_for(stack.cas.cas_dir, dest_dir.absolute())
        described = stack.describe()
        stack.close()
    names = [m.value for m in methods]
    if as_json:
        emit_json({"cas": str(stack.cas.cas_dir), "dest": str(dest_dir), "methods": names, **described})
    else:
        click.echo(f"{stack.cas.cas_dir} -> {dest_dir}: {' > '.join(names)}")
        click.echo(f"isolation: {described['isolation']} ({described['isolation_detail']})")
        click.echo(f"write watch: {described['write_watch']}")


# --------------------------------------------------------------------------- cas


@cli.group()
def cas() -> None:
    """Inspect and maintain the content-addressable store (ROOT/cas, Bazel disk-cache layout)."""


@cas.command("ingest")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print path -> digest as JSON.")
@pass_rooted
def cas_ingest(rooted: RootedContext, paths: tuple[Path, ...], as_json: bool) -> None:
    """Add files (directories are walked) to the CAS; prints each file's digest.

    The exec bit of each file is kept: executables and plain files are stored as separate blobs.
    """
    from treemat.cas import ContentStore

    files = list(_walk_files(paths))
    result: dict[str, str] = {}
    with user_errors():
        store = ContentStore(rooted.root)
        with progress_bar(len(files), "ingesting", enabled=not as_json and len(files) >= 200) as advance:
            for path in files:
                executable = os.access(path, os.X_OK)
                result[str(path)] = str(store.ingest_file(path, executable=executable))
                advance(1)
    if as_json:
        emit_json(result)
    else:
        for path_text, digest in result.items():
            click.echo(f"{digest}  {path_text}")


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
def cas_verify(rooted: RootedContext, as_json: bool) -> None:
    """Rehash every blob; corrupt blobs are moved to ROOT/quarantine and never served again.

    Exit status 1 if anything was corrupt.
    """
    from treemat.cas import ContentStore

    with user_errors():
        store = ContentStore(rooted.root)
        total = store.stats().blobs
        with progress_bar(total, "verifying", enabled=not as_json and total >= 200) as advance:
            report = store.verify_all(progress=advance)
    if as_json:
        emit_json(report)
    else:
        click.echo(_describe(report))
    if getattr(report, "corrupt", 0):
        sys.exit(1)


@cas.command("gc")
@click.option("--max-size", required=True, help="Target CAS size, e.g. 20G. Least recently used blobs go first.")
@click.option("--json", "as_json", is_flag=True)
@pass_rooted
def cas_gc(rooted: RootedContext, max_size: str, as_json: bool) -> None:
    """Delete least-recently-used blobs until the CAS fits in --max-size.

    Blobs in use (hardlinked into a live exec dir or the directory cache) are never deleted; GC waits
    for running stagers to release the CAS.
    """
    from treemat.cas import ContentStore

    with user_errors():
        report = ContentStore(rooted.root).gc(parse_size(max_size))
    if as_json:
        emit_json(report)
    else:
        click.echo(_describe(report))


@cas.command("stats")
@click.option("--json", "as_json", is_flag=True)
@pass_rooted
def cas_stats(rooted: RootedContext, as_json: bool) -> None:
    """Blob count and bytes in the CAS."""
    from treemat.cas import ContentStore

    with user_errors():
        report = ContentStore(rooted.root).stats()
    if as_json:
        emit_json(report)
    else:
        click.echo(_describe(report))


def _describe(report: Any) -> str:
    """`key: value` lines for a dataclass report, sizes made human."""
    data = to_jsonable(report)
    if not isinstance(data, dict):
        return str(data)
    parts = []
    for key, value in data.items():
        shown = human_bytes(value) if key.endswith("bytes") and isinstance(value, int) else value
        parts.append(f"{key}: {shown}")
    return "\n".join(parts)


# --------------------------------------------------------------------------- bench


@cli.command()
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
def bench(workspace: Path, shapes: tuple[str, ...], rounds: int, quick: bool, out: Path, as_json: bool) -> None:
    """Compare treemat with Bazel's local and sandboxed strategies on SwiftCompile-shaped actions.

    Builds //examples/generated:Shape{64,635,1978} from `bazel clean` with each strategy, alternating
    the order every round (round 0 warms up), and reads per-action wall time from Bazel's execution
    log. Writes OUT/bench.json and, with matplotlib installed, OUT/bench.png. Takes minutes.
    """
    from treemat.bench import run_bench, save_report

    chosen = (635,) if quick else tuple(int(s) for s in shapes) or (64, 635, 1978)
    with user_errors():
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


# --------------------------------------------------------------------------- replay


@cli.command()
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
) -> None:
    """Replay a Bazel execution log: what would staging cost with each backend on YOUR build?

    Record one with `bazel build --execution_log_json_file=log.json ...` (or
    --execution_log_binary_file). Every spawn's input tree is materialized with every backend that
    works here (and through the directory cache where it applies), timed, and summed per mnemonic.
    """
    from treemat.execlog import read_exec_log
    from treemat.replay import replay as run_replay

    with user_errors():
        wanted = set(mnemonics) or None
        total = sum(1 for s in read_exec_log(exec_log) if not wanted or s.mnemonic in wanted)
        total = min(total, limit) if limit else total
        with progress_bar(total, "replaying", enabled=not as_json) as advance:
            report = run_replay(
                exec_log, root=rooted.root, execroot=execroot, limit=limit, mnemonics=wanted, progress=advance
            )
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(report.to_table())


# --------------------------------------------------------------------------- worker


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def worker(args: tuple[str, ...]) -> None:
    """Serve Bazel's persistent-worker protocol on stdin/stdout (what Bazel runs).

    Same as `treemat --persistent_worker ARGS`. Options: --protocol=json|proto|auto, --root=DIR,
    --max-workers=N.
    """
    from treemat.__main__ import main as entry

    sys.exit(entry(["--persistent_worker", *args]))


# --------------------------------------------------------------------------- remote-execution bot


@cli.command()
@click.option("--server", required=True, help="BuildGrid endpoint, e.g. grpc://127.0.0.1:50051.")
@click.option("--instance", default="", show_default=True, help="REAPI instance name.")
@click.option("--root", "bot_root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="This bot's treemat root (default: the global --root).")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True, help="Leases at once.")
@click.option("--bot-id", default=None, help="Bot id (default: treemat-<host>-<pid>).")
@pass_rooted
def bot(rooted: RootedContext, server: str, instance: str, bot_root: Path | None, concurrency: int,
        bot_id: str | None) -> None:
    """Run a Remote Workers API bot for BuildGrid: lease actions, stage inputs with treemat, run, upload.

    Needs the `bot` extra (pip install -e '.[bot]'). Stops on SIGTERM/SIGINT, killing running commands.
    """
    from treemat.bot.session import run_bot

    root = (bot_root or rooted.root).expanduser().absolute()
    with user_errors():
        sys.exit(run_bot(server, instance, root, concurrency=concurrency, bot_id=bot_id))


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="treemat", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
