#!/usr/bin/env python3
"""When is a directory-cache hit (one btrfs snapshot) cheaper than placing the same files one by one?

    sudo python3 benchmarks/bench_dircache.py [--sizes 1,4,16,64,256,1024,4096] [--rounds 5] [--settle]

On a fresh loop-mounted btrfs image (bench_staging's `mount_image`), for subtrees of N files (1 directory per
8 files, SwiftCompile-like sizes of 10-200 KB), it times, side by side in one run and in alternating order:

- hit: `DirectoryCache.stage` of a tree whose subtree is already cached: the real hit path (Merkle digest of the
  subtree, shared pin, `KernelTreeCloner.clone` = one BTRFS_IOC_SNAP_CREATE_V2, LRU stamp, directories made
  writable), and, within it, the snapshot ioctl alone (`snap`);
- per-file: the same tree placed by the materializer the stack builds under copy-on-write isolation on btrfs
  (`open_stack(isolation="copy-on-write")`: its measured probe picks FICLONE), mkdir of every directory included;
- rm: removing each result afterwards (`remove_tree`: one subvolume delete vs an unlink per file; in a build this
  happens off the critical path, on the background thread).

By default every timed operation follows the previous one without a sync, as in a build (a snapshot commits the
transaction, so it pays for the metadata dirtied before it); `--settle` syncs first (the snapshot's best case).
Prints min and median per N and the ratio of medians (hit / per-file): the threshold is the smallest N from
which the hit is cheaper. Needs root (loop mount) and mkfs.btrfs.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_staging import min_median, mount_image
from treemat.fsprims import remove_tree
from treemat.layout import Root
from treemat.stack import ISOLATION_COW, Stack, open_stack, open_store
from treemat.tree import FileNode, InputTree
from treemat.treeclone import KernelTreeCloner

FILES_PER_DIR = 8


def make_tree(count: int, rng: random.Random, blobs: list[FileNode]) -> InputTree:
    """`count` files under `sub/`, in max(1, count // 8) directories, drawn from the pre-ingested blobs."""
    tree = InputTree()
    dirs = max(1, count // FILES_PER_DIR)
    for index in range(count):
        tree.add_file(f"sub/d{index % dirs}/f{index}.swiftmodule", blobs[rng.randrange(len(blobs))])
    return tree


class TimedCloner(KernelTreeCloner):
    """The real cloner, recording how long the snapshot ioctl itself took."""

    def __init__(self) -> None:
        self.last = 0.0

    def clone(self, entry: Path, dest: Path) -> bool:
        started = time.perf_counter()
        done = super().clone(entry, dest)
        self.last = time.perf_counter() - started
        return done


def fmt(values: list[float]) -> str:
    return min_median(values, 7, 2)


def measure_size(
    stack: Stack, cloner: TimedCloner, tree: InputTree, count: int, outdir: Path, args: argparse.Namespace
) -> str:
    """One table row: a dircache hit (the stack's cache, `min_files=count`) against per-file staging."""
    cache = stack.dircache
    warm = cache.stage(tree, outdir / "warm")  # builds the entry (a miss)
    assert warm.subtree_misses == 1, warm
    remove_tree(outdir / "warm")
    hit: list[float] = []
    snap: list[float] = []
    perfile: list[float] = []
    rm_hit: list[float] = []
    rm_file: list[float] = []
    for round_ in range(args.rounds):
        order = ("hit", "perfile") if round_ % 2 == 0 else ("perfile", "hit")
        for kind in order:
            dest = outdir / f"{kind}-{count}-{round_}"
            if args.settle:
                os.sync()
            started = time.perf_counter()
            if kind == "hit":
                report = cache.stage(tree, dest)
                hit.append(time.perf_counter() - started)
                snap.append(cloner.last)
                assert report.subtree_hits == 1, report
            else:
                report = stack.materializer.stage(tree, dest)
                perfile.append(time.perf_counter() - started)
                assert report.subtree_hits == 0 and report.files == count, report
            started = time.perf_counter()
            remove_tree(dest)
            (rm_hit if kind == "hit" else rm_file).append(time.perf_counter() - started)
    cache.evict(0)
    ratio = statistics.median(hit) / statistics.median(perfile)
    return (
        f"{count:>5} {max(1, count // FILES_PER_DIR):>4} | {fmt(hit)} | {fmt(snap)}  | {fmt(perfile)}     | "
        f"{ratio:>11.2f} | {statistics.median(rm_hit) * 1000:>10.2f} "
        f"{statistics.median(rm_file) * 1000:>11.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,4,16,64,256,1024,4096")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--blobs", type=int, default=512, help="distinct blobs the files are drawn from")
    parser.add_argument("--settle", action="store_true", help="sync before every timed operation")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="treemat-dircache-"))
    base = mount_image(work, "btrfs")
    if base is None:
        print("cannot mount a btrfs image here (needs root and mkfs.btrfs)", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        return 1
    try:
        layout = Root(base / "root")
        rng = random.Random(10)
        blobs = []
        with open_store(layout) as store:
            for index in range(args.blobs):
                size = rng.randint(10 << 10, 200 << 10)
                executable = index % 97 == 0
                blobs.append(FileNode(store.cas.ingest_bytes(rng.randbytes(size), executable=executable), executable))
        outdir = base / "out"
        outdir.mkdir()
        with open_stack(layout, isolation=ISOLATION_COW, dircache_min_files=None) as stack:
            methods = stack.probe.methods_for(stack.cas.cas_dir, outdir)
        print(
            f"btrfs loop image; per-file method the copy-on-write stack picks: {methods[0].value} "
            f"(order {[m.value for m in methods]}); {args.rounds} rounds, {'settled' if args.settle else 'no sync'}"
        )
        print(
            f"{'N':>5} {'dirs':>4} | {'hit min':>7} {'med':>7} | {'snap min':>8} {'med':>7} | "
            f"{'perfile min':>11} {'med':>7} | {'hit/perfile':>11} | {'rm hit med':>10} {'rm file med':>11}"
        )
        for count in sizes:
            tree = make_tree(count, rng, blobs)
            cloner = TimedCloner()
            with open_stack(layout, isolation=ISOLATION_COW, dircache_min_files=count, cloner=cloner) as stack:
                print(measure_size(stack, cloner, tree, count, outdir, args))
            sys.stdout.flush()
        return 0
    finally:
        subprocess.run(["umount", "-l", str(base)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
