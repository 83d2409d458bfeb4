#!/usr/bin/env python3
"""Staging cost of each backend on the p95 SwiftCompile shape vs. a C syscall loop, measured side by side.

    python benchmarks/bench_backends.py [--fs DIR] [--runs N] [--json]

Generates 1,978 files / 466 MB (skewed sizes), ingests them into a CAS, then for every method that works on
the filesystem times `Materializer.build` and a C program doing the same syscalls (mkdir per directory, then
link / FICLONE+fchmod / copy_file_range+fchmod per file) over the same blobs. Prints medians and the ratio
(target: treemat <= 1.3x the C floor). Without --fs it loop-mounts an xfs image (reflink + hardlink +
copy); root ext4 timings on these machines are too erratic to compare.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from bench_staging import build_c_program, mount_image, release
from treemat.backends import BackendProbe, Method
from treemat.cas import ContentStore
from treemat.fsprims import remove_tree
from treemat.layout import Root
from treemat.stack import Store, open_store
from treemat.tree import FileNode, InputTree

C_LOOP = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/fs.h>
/* usage: loop METHOD LISTFILE ; list lines: "D path" (mkdir) or "F mode src dst" */
int main(int argc, char **argv) {
  const char *method = argv[1];
  FILE *list = fopen(argv[2], "r");
  char line[8192], src[4096], dst[4096];
  int mode;
  while (fgets(line, sizeof line, list)) {
    line[strcspn(line, "\n")] = 0;
    if (line[0] == 'D') { if (mkdir(line + 2, 0755)) { perror(line + 2); return 1; } continue; }
    if (sscanf(line, "F %o %4095s %4095s", &mode, src, dst) != 3) return 2;
    if (!strcmp(method, "hardlink")) { if (link(src, dst)) { perror(dst); return 1; } continue; }
    int in = open(src, O_RDONLY), out = open(dst, O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (in < 0 || out < 0) { perror(dst); return 1; }
    if (!strcmp(method, "reflink")) { if (ioctl(out, FICLONE, in)) { perror("FICLONE"); return 1; } }
    else {
      struct stat st; fstat(in, &st); off_t left = st.st_size;
      while (left > 0) {
        ssize_t n = copy_file_range(in, NULL, out, NULL, left, 0);
        if (n <= 0) return 1;
        left -= n;
      }
    }
    fchmod(out, mode); close(in); close(out);
  }
  return 0;
}
"""


def p95_sizes(count: int, total: int, rng: random.Random) -> list[int]:
    """Skewed sizes: most files small (headers, sources), a few very large (swiftmodules, SDK blobs)."""
    weights = [rng.paretovariate(0.9) for _ in range(count)]
    scale = total / sum(weights)
    return [max(1, int(w * scale)) for w in weights]


def build_tree(cas: ContentStore, files: int, total: int, seed: int) -> InputTree:
    rng = random.Random(seed)
    tree = InputTree()
    for index, size in enumerate(p95_sizes(files, total, rng)):
        executable = index % 97 == 0
        digest = cas.ingest_bytes(
            rng.randbytes(min(size, 4096)) * (size // 4096) + rng.randbytes(size % 4096), executable=executable
        )
        tree.add_file(f"bazel-out/k8/bin/mod{index % 40}/sub{index % 7}/f{index}.dat", FileNode(digest, executable))
        if index % 200 == 0:
            print(f"  generated {index}/{files} files", file=sys.stderr)
    return tree


def write_c_list(tree: InputTree, cas: ContentStore, dest: Path, list_path: Path) -> None:
    lines = [f"D {dest}"]
    for dir_path, _node in tree.root.walk():
        if dir_path:
            lines.append(f"D {dest / dir_path}")
    for path, file in tree.iter_files():
        mode = 0o550 if file.executable else 0o440
        lines.append(f"F {mode:o} {cas.blob_path(file.digest.hash, file.executable)} {dest / path}")
    list_path.write_text("\n".join(lines) + "\n")


def measure_methods(
    store: Store, args: argparse.Namespace, base: Path, work: Path, binary: Path
) -> list[dict[str, object]]:
    """Each placement method here against the C loop doing the same syscalls, alternating, same blobs."""
    cas = store.cas
    print(f"generating {args.files} files / {args.mb} MB under {base} ...", file=sys.stderr)
    tree = build_tree(cas, args.files, args.mb << 20, seed=1978)
    methods = BackendProbe().methods_for(cas.cas_dir, base)
    results: list[dict[str, object]] = []
    for method in [m for m in methods if m is not Method.CLONEFILE]:
        _probe, materializer = store.materializer([method], measure=False)
        ours, floor = [], []
        list_path = work / f"{method.value}.list"
        for run in range(args.runs):  # alternate treemat and C each run, same blobs, same fs
            dest = base / f"out-{method.value}-{run}"
            started = time.perf_counter()
            materializer.build(tree.root, dest)
            ours.append(time.perf_counter() - started)
            remove_tree(dest)
            write_c_list(tree, cas, dest, list_path)
            started = time.perf_counter()
            subprocess.run([str(binary), method.value, str(list_path)], check=True)
            floor.append(time.perf_counter() - started)
            remove_tree(dest)
            print(f"  {method.value} run {run + 1}/{args.runs}", file=sys.stderr)
        ours_ms, floor_ms = statistics.median(ours) * 1000, statistics.median(floor) * 1000
        results.append(
            {
                "method": method.value,
                "treemat_ms": round(ours_ms, 1),
                "c_floor_ms": round(floor_ms, 1),
                "ratio": round(ours_ms / floor_ms, 2),
            }
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fs", type=Path, help="directory on the filesystem to measure (default: loop xfs)")
    parser.add_argument("--files", type=int, default=1978)
    parser.add_argument("--mb", type=int, default=466)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="treemat-bench-"))
    mounted = None
    try:
        base = args.fs
        if base is None:
            mounted = mount_image(work, "xfs")
            base = mounted or work
        base = base / "treemat-bench"
        base.mkdir(parents=True, exist_ok=True)
        binary = build_c_program(work, C_LOOP, "loop")
        if binary is None:
            print("no C compiler: cannot measure the syscall floor", file=sys.stderr)
            return 1
        with open_store(Root(base / "root")) as store:
            results = measure_methods(store, args, base, work, binary)
        where = f"{base} ({'loop-mounted xfs' if mounted else 'given directory'})"
        if args.json:
            print(json.dumps({"where": where, "files": args.files, "mb": args.mb, "results": results}, indent=2))
        else:
            print(f"p95 SwiftCompile shape: {args.files} files / {args.mb} MB on {where}; median of {args.runs}")
            print(f"{'method':<10} {'treemat ms':>11} {'C floor ms':>11} {'ratio':>6}  (target <= 1.3x)")
            for row in results:
                print(f"{row['method']:<10} {row['treemat_ms']:>11} {row['c_floor_ms']:>11} {row['ratio']:>6}")
        return 0
    finally:
        release([mounted] if mounted is not None else [], work)


if __name__ == "__main__":
    sys.exit(main())
