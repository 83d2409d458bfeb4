"""`treemat stats`: what every treemat process did, summed (files per backend, cache hits, ingests)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping

import click

from treemat.commands._common import RootedContext, human_bytes, pass_rooted
from treemat.counters import FILE_METHOD_COUNTERS, StatsStore
from treemat.errors import TreematError
from treemat.layout import Root

_SUMMARIZED = frozenset(
    {
        "subtree_hits",
        "subtree_misses",
        "evictions",
        "dircache_eviction_passes",
        "dircache_evicted_bytes",
        "actions",
        "action_failures",
        "ingested_blobs",
        "ingested_bytes",
        "integrity_quarantined",
        "guard_unwatched_hashed_blobs",
        "guard_unwatched_hashed_bytes",
        "guard_rechecked_blobs",
    }
)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable totals, per-process records included.")
@click.option("--reset", is_flag=True, help="Forget all recorded counters.")
@click.option("--watch", is_flag=True, help="Redraw whenever a treemat process publishes counters (Ctrl-C stops).")
@click.option("--max-updates", type=click.IntRange(min=1), default=None, help="With --watch: stop after N redraws.")
@pass_rooted
def stats(rooted: RootedContext, as_json: bool, reset: bool, watch: bool, max_updates: int | None) -> int:
    """Show what treemat did: files per backend, subtree cache hits, ingests, quarantines.

    Every treemat process (persistent workers included) publishes its counters under ROOT/stats;
    this sums them. A silent fallback to `copy` shows up here, loudly. `--watch` follows a running
    build live (filesystem events through the optional `watchdog` package: pip install 'treemat[watch]').
    """
    store = StatsStore(rooted.layout.stats)
    if reset:
        click.echo(f"removed {store.reset()} stats records")
    elif watch:
        watch_stats(store, rooted.layout, as_json=as_json, max_updates=max_updates)
    else:
        show_stats(store, rooted.layout, as_json=as_json)
    return 0


def format_counters(values: Mapping[str, int]) -> str:
    """Human summary of counters, with a loud line when files silently fell back to copying."""
    placed = {name: values.get(name, 0) for name in FILE_METHOD_COUNTERS}
    total = sum(placed.values())
    lines = ["files by backend:"]
    for name, count in placed.items():
        share = f"{100 * count / total:5.1f}%" if total else "    -"
        lines.append(f"  {name:<10} {count:>10}  {share}")
    hits, misses = values.get("subtree_hits", 0), values.get("subtree_misses", 0)
    lines.append(
        f"subtree cache: {hits} hits, {misses} misses, {values.get('evictions', 0)} evictions "
        f"({human_bytes(values.get('dircache_evicted_bytes', 0))} in "
        f"{values.get('dircache_eviction_passes', 0)} eviction passes)"
    )
    lines.append(
        f"actions: {values.get('actions', 0)} ({values.get('action_failures', 0)} failed), "
        f"ingested {values.get('ingested_blobs', 0)} blobs / {human_bytes(values.get('ingested_bytes', 0))}, "
        f"quarantined {values.get('integrity_quarantined', 0)}"
    )
    others = sorted(k for k in values if k not in FILE_METHOD_COUNTERS and k not in _SUMMARIZED)
    for name in others:
        lines.append(f"  {name}: {values[name]}")
    fast = placed["clonefile"] + placed["reflink"] + placed["hardlink"]
    if placed["copy"] and placed["copy"] >= fast:
        lines.append(
            "WARNING: most files were COPIED — the CAS and exec dirs are probably on different filesystems "
            "or the filesystem supports neither reflinks nor hardlinks (see `treemat probe`)."
        )
    return "\n".join(lines)


def show_stats(store: StatsStore, layout: Root, *, as_json: bool) -> None:
    """Print the summed counters (and recent actions) once."""
    records = store.load_all()
    totals = store.totals()
    dircache = dircache_state(layout, records)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "root": str(layout.path),
                    "totals": totals,
                    "dircache": dircache,
                    "bots": bot_staging(records),
                    "processes": records,
                },
                sort_keys=True,
            )
        )
        return
    click.echo(f"treemat root: {layout.path}  ({len(records)} process records)")
    modes = sorted({f"{r.get('isolation')} ({r.get('write_watch')})" for r in records if r.get("isolation")})
    if modes:
        click.echo(f"isolation: {', '.join(modes)}")
    click.echo(format_write_watch(records, totals))
    click.echo(format_dircache(dircache))
    click.echo(format_counters(totals))
    bots = bot_staging(records)
    if bots:
        click.echo("bots (files staged per method, isolation):")
        for bot in bots:
            methods = ", ".join(f"{name} {count}" for name, count in _as_dict(bot["methods"]).items())
            click.echo(f"  {bot['bot_id']} (pid {bot['pid']}): {bot['actions']} actions, {methods}; {bot['isolation']}")
    recent = [a for r in records for a in _as_list(r.get("recent_actions"))]
    if recent:
        click.echo("recent actions:")
        for action in recent[-10:]:
            click.echo(f"  {json.dumps(action, sort_keys=True)}")


def bot_staging(records: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per bot process: its id, isolation mode, actions and files staged per method (hardlink/reflink/copy/...)."""
    bots = []
    for record in records:
        if record.get("role") != "bot":
            continue
        counters = _as_dict(record.get("counters"))
        methods = {name: _as_int(counters.get(name)) or 0 for name in FILE_METHOD_COUNTERS}
        bots.append(
            {
                "bot_id": str(record.get("bot_id", "?")),
                "pid": record.get("pid"),
                "isolation": str(record.get("isolation", "unknown")),
                "actions": _as_int(counters.get("actions")) or 0,
                "methods": methods,
            }
        )
    return sorted(bots, key=lambda bot: (bot["bot_id"], str(bot["pid"])))


def format_write_watch(records: list[dict[str, object]], totals: Mapping[str, int]) -> str:
    """One line: the blob guard's mode per process (inotify / degraded, with why / none) and the hashes it cost."""
    modes: dict[str, int] = {}
    for record in records:
        mode = record.get("write_watch")
        if isinstance(mode, str):
            detail = record.get("write_watch_detail")
            label = mode if mode == "inotify" or not isinstance(detail, str) else f"{mode.upper()} ({detail})"
            modes[label] = modes.get(label, 0) + 1
    how = ", ".join(f"{label} in {count} process(es)" for label, count in sorted(modes.items()))
    return (
        f"write watch: {how or 'no process has reported it'}; "
        f"{totals.get('guard_unwatched_hashed_blobs', 0)} blobs "
        f"({human_bytes(totals.get('guard_unwatched_hashed_bytes', 0))}) hashed on use because they had no watch, "
        f"{totals.get('guard_rechecked_blobs', 0)} hashed again after their action"
    )


def dircache_state(layout: Root, records: list[dict[str, object]]) -> dict[str, object]:
    """The subtree cache's choices (as the processes that published them made them) and its recorded size."""
    choices = sorted(
        {
            (str(r.get("dircache")), _as_int(r.get("dircache_min_files")), _as_int(r.get("dircache_budget_bytes")))
            for r in records
            if "dircache" in r
        },
        key=repr,
    )
    from treemat.dircache import recorded_usage  # here: `treemat stats` stays light (dircache pulls in protobuf)

    usage = recorded_usage(layout.dircache)
    return {
        "choices": [{"mode": mode, "min_files": files, "budget_bytes": budget} for mode, files, budget in choices],
        "entries": usage[0] if usage else 0,
        "bytes": usage[1] if usage else 0,
    }


def format_dircache(state: Mapping[str, object]) -> str:
    """One line: how the subtree cache runs (per distinct process choice) and how full it is."""
    parts = []
    budgets = []
    for choice in _as_list(state.get("choices")):
        if not isinstance(choice, dict):
            continue
        if choice.get("mode") == "off":
            parts.append("off")
            continue
        parts.append(f"{choice.get('mode')} of subtrees with >= {choice.get('min_files')} files")
        if isinstance(choice.get("budget_bytes"), int):
            budgets.append(int(choice["budget_bytes"]))
    size = human_bytes(_as_int(state.get("bytes")) or 0)
    budget = f" of {human_bytes(min(budgets))}" if budgets else ""
    how = ", ".join(parts) if parts else "no process has reported its choice"
    return f"dircache: {how}; {size}{budget} in {state.get('entries', 0)} entries"


def _as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def watch_stats(store: StatsStore, layout: Root, *, as_json: bool, max_updates: int | None) -> None:
    """Redraw the stats each time a stats record changes (needs the optional `watchdog` package)."""
    try:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        raise TreematError(
            "`stats --watch` needs the watchdog package: pip install 'treemat[watch]' (or run `treemat stats`)"
        ) from None

    changed = threading.Event()

    class _Changed(FileSystemEventHandler):  # type: ignore[misc]
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
            show_stats(store, layout, as_json=as_json)
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


def _as_dict(value: object) -> dict[str, object]:
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []
