"""Replay a Bazel execution log: stage every spawn's inputs with each backend and report the savings.

Content comes from the workspace's execroot when the file there still has the logged digest; otherwise a
blob of the same size is synthesized (same sizes and sharing structure, different bytes) — the report says
how many of each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from treemat.backends import BackendProbe, Method
from treemat.cas import ContentStore
from treemat.digest import Digest
from treemat.errors import CorruptBlobError, MissingBlobError
from treemat.execlog import Spawn, read_exec_log
from treemat.fsprims import remove_tree
from treemat.layout import Root
from treemat.stack import Stack, open_stack
from treemat.tree import FileNode, InputTree


@dataclass(slots=True)
class MnemonicRow:
    """Totals for one mnemonic."""

    mnemonic: str
    spawns: int = 0
    files: int = 0
    bytes: int = 0
    log_walltime_s: float = 0.0
    log_setup_s: float = 0.0
    staging_ms: dict[str, float] = field(default_factory=dict)

    def best(self) -> tuple[str, float]:
        """The fastest way found, and its total milliseconds."""
        name = min(self.staging_ms, key=lambda key: self.staging_ms[key])
        return name, self.staging_ms[name]


@dataclass(slots=True)
class ReplayReport:
    """What treemat would cost (and save) on this build."""

    log: str
    spawns: int = 0
    blobs_from_execroot: int = 0
    blobs_synthesized: int = 0
    rows: dict[str, MnemonicRow] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """Plain JSON."""
        return {
            "log": self.log,
            "spawns": self.spawns,
            "blobs_from_execroot": self.blobs_from_execroot,
            "blobs_synthesized": self.blobs_synthesized,
            "mnemonics": [asdict(row) for row in self.rows.values()],
        }

    def to_table(self) -> str:
        """Human table: per mnemonic, staging ms per backend and the saving vs. copying every file."""
        methods = sorted({name for row in self.rows.values() for name in row.staging_ms})
        head = f"{'mnemonic':<18} {'spawns':>6} {'files':>8} {'MiB':>8} " + " ".join(f"{m:>10}" for m in methods)
        lines = [
            f"replayed {self.spawns} spawns from {self.log} "
            f"({self.blobs_from_execroot} blobs from the execroot, {self.blobs_synthesized} synthesized)",
            "staging time in ms, summed over spawns:",
            head + f" {'best':>10} {'saved vs copy':>14}",
        ]
        for row in sorted(self.rows.values(), key=lambda r: -r.files):
            best_name, best_ms = row.best()
            copy_ms = row.staging_ms.get("copy", best_ms)
            lines.append(
                f"{row.mnemonic:<18} {row.spawns:>6} {row.files:>8} {row.bytes / 2**20:>8.1f} "
                + " ".join(f"{row.staging_ms.get(m, float('nan')):>10.1f}" for m in methods)
                + f" {best_name:>10} {copy_ms - best_ms:>13.1f}"
            )
        return "\n".join(lines)


def _tree_for(
    spawn: Spawn, cas: ContentStore, execroot: Path | None, report: ReplayReport, synthesized: dict[str, Digest]
) -> InputTree:
    tree = InputTree()
    for item in spawn.inputs:
        digest = item.digest
        if not digest.is_empty:
            source = execroot / item.path if execroot else None
            stored = cas.lookup(digest.hash, False)
            if stored is None and digest.hash not in synthesized:
                if source is not None and source.is_file():
                    try:
                        cas.ingest_file(source, executable=False, expected=digest.hash)
                        report.blobs_from_execroot += 1
                        stored = digest
                    except (CorruptBlobError, MissingBlobError):
                        stored = None
                if stored is None:
                    synthesized[digest.hash] = cas.ingest_bytes(_synthetic(digest), executable=False)
                    report.blobs_synthesized += 1
            digest = synthesized.get(digest.hash, digest)
        try:
            tree.add_file(item.path, FileNode(digest, False))
        except Exception:  # a path the log lists twice with different content: keep the first
            continue
    return tree


def _synthetic(digest: Digest) -> bytes:
    seed = bytes.fromhex(digest.hash)
    return (seed * (digest.size // len(seed) + 1))[: digest.size]


def replay(
    log: Path,
    *,
    layout: Root,
    execroot: Path | None = None,
    methods: list[Method] | None = None,
    limit: int | None = None,
    mnemonics: set[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReplayReport:
    """Materialize each logged spawn's inputs with every available backend (and the dircache) and time it."""
    # no tool runs here: no sandbox (so the stack's own placement never hardlinks)
    with open_stack(layout, isolation="none", background_cleanup=False) as stack:
        return _replay(log, stack, execroot, methods, limit, mnemonics, progress)


def _replay(
    log: Path,
    stack: Stack,
    execroot: Path | None,
    methods: list[Method] | None,
    limit: int | None,
    mnemonics: set[str] | None,
    progress: Callable[[int], None] | None,
) -> ReplayReport:
    report = ReplayReport(log=str(log))
    cas, caches = stack.cas, stack.dircache
    scratch = stack.layout.replay
    scratch.mkdir(parents=True, exist_ok=True)
    available = methods or [m for m in BackendProbe().methods_for(cas.cas_dir, scratch) if m is not Method.CLONEFILE]
    synthesized: dict[str, Digest] = {}
    for spawn in read_exec_log(log):
        if mnemonics and spawn.mnemonic not in mnemonics:
            continue
        if limit is not None and report.spawns >= limit:
            break
        tree = _tree_for(spawn, cas, execroot, report, synthesized)
        row = report.rows.setdefault(spawn.mnemonic, MnemonicRow(spawn.mnemonic))
        row.spawns += 1
        row.files += tree.count_files()
        row.bytes += tree.root.total_bytes()
        row.log_walltime_s += spawn.walltime_s
        row.log_setup_s += spawn.setup_s
        ways = [m.value for m in available] + (["dircache-cold", "dircache-warm"] if caches.mode != "off" else [])
        for name in ways:
            dest = scratch / f"{name}-{report.spawns}"
            started = time.perf_counter()
            if name.startswith("dircache"):
                caches.stage(tree, dest)
            else:
                _probe, materializer = stack.store.materializer([Method(name)], measure=False)
                materializer.build(tree.root, dest)
            row.staging_ms[name] = row.staging_ms.get(name, 0.0) + (time.perf_counter() - started) * 1000
            remove_tree(dest)
        report.spawns += 1
        if progress is not None:
            progress(1)
    remove_tree(scratch)
    return report
