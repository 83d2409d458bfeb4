#!/usr/bin/env python3
"""Cold ingest (copy + verify against Bazel's digest) vs a one-pass copy-and-hash floor, on ext4 / xfs / btrfs.

    sudo python3 benchmarks/bench_ingest.py [--fs ext4,xfs,btrfs] [--files 1978] [--mb 466] [--rounds 5]
    sudo python3 benchmarks/bench_ingest.py --small            # 400 files / 64 MB, for a quick look
    sudo python3 benchmarks/bench_ingest.py --reference        # also `cp -r` + `sha256sum`

For each filesystem (a fresh loop-mounted image, bench_staging.mount_image) it writes a SwiftCompile-like
execroot: by default the p95 shape of issue #10, 1,978 files / 466 MB (skewed sizes, bench_backends.p95_sizes)
in ~315 directories (the issue measured 323), about 1 in 97 executable. Then, side by side in one run,
alternating which goes first:

- treemat: a fresh store (`open_store`: a new root each round, so every file is unknown: cold) ingests every file
  with its expected sha256, as the worker does (`ingest_file(path, executable=..., expected=hash)`): copy into
  an unnamed temp file, hash, verify against the digest, publish by linking it into place;
- floor: a C program (OpenSSL libcrypto's SHA-256, the same implementation Python's hashlib uses here) doing a
  one-pass copy-and-hash of the same files to the same filesystem: per file open, read a 1 MiB chunk, hash it,
  write it, compare the digest with the expected one; 256 shard directories made first.
- with --reference: `cp -r` of the execroot, then `sha256sum` of every copy (coreutils; cp may reflink).

Page cache: kept warm, the same for both sides. Before every timed pass the written trees of the previous
pass are removed, everything is synced (`sync`), and every source file is read once, so each pass starts with
hot sources (as after Bazel wrote or digested them) and no dirty pages. Nothing is fsynced by either side.

Prints per filesystem min and median (ms) of each side and the ratio of the medians (target: <= 1.5x).
Needs root (loop mounts) and a C compiler with OpenSSL headers (libssl-dev).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_backends import p95_sizes
from bench_staging import build_c_program, min_median, mount_image, release
from treemat.fsprims import remove_tree
from treemat.layout import Root
from treemat.stack import open_store

C_FLOOR = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <openssl/evp.h>
/* usage: floor DEST LIST ; lines "HEXDIGEST MODE SRC DST": copy SRC to DST in one pass, hashing every chunk */
#define CHUNK (1 << 20)
int main(int argc, char **argv) {
  static unsigned char buf[CHUNK];
  char line[8192], hex[65], src[4096], dst[4096], got[65];
  unsigned char md[32];
  unsigned int mdlen, mode;
  if (mkdir(argv[1], 0700)) { perror(argv[1]); return 1; }
  for (int i = 0; i < 256; i++) {
    snprintf(dst, sizeof dst, "%s/%02x", argv[1], i);
    if (mkdir(dst, 0700)) { perror(dst); return 1; }
  }
  FILE *list = fopen(argv[2], "r");
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  while (fgets(line, sizeof line, list)) {
    if (sscanf(line, "%64s %o %4095s %4095s", hex, &mode, src, dst) != 4) return 2;
    int in = open(src, O_RDONLY | O_CLOEXEC);
    int out = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (in < 0 || out < 0) { perror(dst); return 1; }
    EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
    ssize_t n;
    while ((n = read(in, buf, CHUNK)) > 0) {
      EVP_DigestUpdate(ctx, buf, n);
      for (ssize_t done = 0; done < n;) {
        ssize_t w = write(out, buf + done, n - done);
        if (w <= 0) { perror(dst); return 1; }
        done += w;
      }
    }
    if (n < 0) { perror(src); return 1; }
    EVP_DigestFinal_ex(ctx, md, &mdlen);
    for (int i = 0; i < 32; i++) sprintf(got + 2 * i, "%02x", md[i]);
    if (strcmp(got, hex)) { fprintf(stderr, "%s: digest mismatch\n", src); return 3; }
    fchmod(out, mode);
    close(in);
    close(out);
  }
  EVP_MD_CTX_free(ctx);
  return 0;
}
"""


def make_execroot(execroot: Path, files: int, total: int, seed: int) -> list[tuple[str, str, bool]]:
    """The p95 SwiftCompile shape: (path, sha256, executable) per file, ~1 directory per 6 files."""
    rng = random.Random(seed)
    mods = max(1, files // 50) | 1  # odd, so with 7 subdirectories each: ~1 leaf directory per 7 files
    inputs = []
    for index, size in enumerate(p95_sizes(files, total, rng)):
        data = rng.randbytes(min(size, 4096)) * (size // 4096) + rng.randbytes(size % 4096)
        path = execroot / f"bazel-out/k8/bin/mod{index % mods}/sub{index % 7}/f{index}.swiftmodule"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        executable = index % 97 == 0
        if executable:
            path.chmod(0o755)
        inputs.append((str(path), hashlib.sha256(data).hexdigest(), executable))
    return inputs


def settle(inputs: list[tuple[str, str, bool]], *trees: Path) -> None:
    """Remove the last pass's output, write back dirty pages, and read every source (warm page cache)."""
    for tree in trees:
        if tree.exists():
            remove_tree(tree)
    os.sync()
    for path, _hash, _executable in inputs:
        fd = os.open(path, os.O_RDONLY)
        try:
            while os.read(fd, 1 << 20):
                pass
        finally:
            os.close(fd)


def treemat_ingest(root: Path, inputs: list[tuple[str, str, bool]], mode: str) -> float:
    started = time.perf_counter()
    with open_store(Root(root)) as store:
        if mode != "auto":
            store.cas.ingest_reflinks = mode == "reflink"
        for path, hash_hex, executable in inputs:
            store.cas.ingest_file(path, executable=executable, expected=hash_hex)
    return time.perf_counter() - started


def floor_ingest(binary: Path, listing: Path, dest: Path) -> float:
    started = time.perf_counter()
    subprocess.run([str(binary), str(dest), str(listing)], check=True)
    return time.perf_counter() - started


def reference_ingest(execroot: Path, dest: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(execroot), str(dest)], check=True)
    subprocess.run(f"find {dest} -type f -print0 | xargs -0 sha256sum > /dev/null", shell=True, check=True)
    return time.perf_counter() - started


def fmt(values: list[float]) -> str:
    return min_median(values, 8, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fs", default="ext4,xfs,btrfs")
    parser.add_argument("--files", type=int, default=1978)
    parser.add_argument("--mb", type=int, default=466, help="total bytes of the execroot files, in MiB")
    parser.add_argument("--small", action="store_true", help="400 files / 64 MiB instead")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reference", action="store_true", help="also time `cp -r` + `sha256sum`")
    parser.add_argument(
        "--mode",
        choices=["auto", "reflink", "onepass"],
        default="auto",
        help="treemat's ingest strategy: its own choice for the filesystem (auto), or forced",
    )
    parser.add_argument("--work", type=Path, help="where the images go (default: a new temp dir)")
    args = parser.parse_args()
    if args.small:
        args.files, args.mb = 400, 64
    work = Path(tempfile.mkdtemp(prefix="treemat-ingest-", dir=args.work))
    binary = build_c_program(work, C_FLOOR, "floor", "-lcrypto")
    if binary is None:
        print("cannot build the C floor (needs cc and OpenSSL headers: apt-get install libssl-dev)", file=sys.stderr)
        return 1
    image_gb = max(2, (args.mb * 5) // 1024 + 1)
    print(
        f"cold ingest of {args.files} files / {args.mb} MiB; page cache warm (sources read, synced) before every "
        f"pass; {args.rounds} rounds, min / median ms"
    )
    header = f"{'fs':<6} {'treemat min':>11} {'med':>8} {'floor min':>9} {'med':>8} {'ratio(med)':>10}"
    print(header + (f" {'cp+sha256sum min':>16} {'med':>8}" if args.reference else ""))
    mounts: list[Path] = []
    try:
        for fs in args.fs.split(","):
            base = mount_image(work, fs, size_gb=image_gb)
            if base is None:
                print(f"{fs:<6} skipped: cannot mount a {fs} image here (needs root and mkfs.{fs})")
                continue
            mounts.append(base)
            inputs = make_execroot(base / "execroot", args.files, args.mb << 20, seed=1978)
            listing = work / f"{fs}.list"
            listing.write_text(
                "".join(
                    f"{h} {0o550 if x else 0o440:o} {p} {base / 'floor' / h[:2] / h}{'+x' if x else ''}\n"
                    for p, h, x in inputs
                )
            )
            ours: list[float] = []
            floor: list[float] = []
            reference: list[float] = []
            outputs = [base / "root", base / "floor", base / "reference"]
            for round_ in range(args.rounds):
                sides = ["treemat", "floor"] + (["reference"] if args.reference else [])
                if round_ % 2:
                    sides.reverse()
                for side in sides:
                    settle(inputs, *outputs)
                    if side == "treemat":
                        ours.append(treemat_ingest(base / "root", inputs, args.mode))
                    elif side == "floor":
                        floor.append(floor_ingest(binary, listing, base / "floor"))
                    else:
                        reference.append(reference_ingest(base / "execroot", base / "reference"))
                print(f"  {fs} round {round_ + 1}/{args.rounds}", file=sys.stderr)
            ratio = statistics.median(ours) / statistics.median(floor)
            line = f"{fs:<6} {fmt(ours):>20} {fmt(floor):>18} {ratio:>10.2f}"
            print(line + (f" {fmt(reference):>25}" if reference else ""))
            sys.stdout.flush()
            settle([], *outputs)
        return 0
    finally:
        release(mounts, work)


if __name__ == "__main__":
    sys.exit(main())
