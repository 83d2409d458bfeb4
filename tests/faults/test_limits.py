"""Exhausted limits and filesystem faults on the output and staging paths: a full execroot, a blob at the
filesystem's link limit, odd paths. Each asserts the one-line error, what is left behind, and that the worker
serves the next request."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import tempfile
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path

import pytest
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.layout import Root

from ..support.harness import Worker, request
from ..support.mounts import mount_image


@pytest.fixture
def full_execroot(tmp_path: Path) -> Iterator[Path]:
    """An execroot on a 2 MiB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting tmpfs needs root")
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(execroot)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        yield execroot
    finally:
        subprocess.run(["umount", "-l", str(execroot)], check=False)


@pytest.mark.parametrize("shape", ["file", "directory"])
def test_an_output_that_fills_the_execroot_leaves_no_partial_copy(
    full_execroot: Path, tmp_path: Path, shape: str
) -> None:
    execroot = full_execroot
    (execroot / "small.txt").write_text("small\n")
    root = tmp_path / "root"
    worker = Worker(execroot, root)
    body = request(execroot, ["small.txt"], ["out/big"], ["sh", "-c", "head -c 5000000 /dev/urandom > out/big"])
    if shape == "directory":
        write = "echo a > out/big/a && head -c 5000000 /dev/urandom > out/big/b"
        body["arguments"] = ["--output-dir=out/big", "--", "sh", "-c", write]
    worker.send(body)
    full = worker.read()
    left = sorted(os.listdir(execroot / "out")) if (execroot / "out").exists() else []
    worker.send(request(execroot, ["small.txt"], ["out/ok"], ["cp", "small.txt", "out/ok"]))
    fine = worker.read()
    report = ContentStore(Root(root), counters=Counters()).verify_all()
    print(f"\n[execroot full] {full['output'].strip()!r}; left in out/: {left}; next exit {fine['exitCode']}")
    assert full["exitCode"] == 1
    assert full["output"].count("\n") == 1 and "'out/big'" in full["output"], full
    assert "No space left" in full["output"], full
    assert "big" not in left, "a partial output was left in the execroot"
    assert fine["exitCode"] == 0 and (execroot / "out/ok").read_text() == "small\n", fine
    assert report.corrupt == 0
    assert worker.close() == 0


def _deep_file(execroot: Path, levels: int) -> str:
    """A file `levels` directories deep in the execroot (made by descriptor: its path is past PATH_MAX)."""
    fd = os.open(execroot, os.O_RDONLY | os.O_DIRECTORY)
    for _level in range(levels):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    out = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(out, b"deep\n")
    os.close(out)
    os.close(fd)
    return "/".join(["d"] * levels + ["f"])


def test_paths_too_deep_or_long_are_one_line_refusals_and_the_worker_serves_on(tmp_path: Path) -> None:
    """An input 1,500 directories deep (3,002 bytes: under PATH_MAX) or an output of 10,000 components came back
    as `internal error: RecursionError` (the input tree's walk, os.makedirs of the output's parent)."""
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    (execroot / "small.txt").write_text("small\n")
    deep = _deep_file(execroot, 1500)
    digest = b64encode(hashlib.sha256(b"deep\n").hexdigest().encode()).decode()
    worker = Worker(execroot, tmp_path / "root")
    deep_input = {"arguments": ["--output=out/x", "--", "true"], "inputs": [{"path": deep, "digest": digest}]}
    cases = {
        "input 1,500 deep": deep_input,
        "output of 10,000 components": request(execroot, [], ["/".join(["o"] * 10000)], ["true"]),
        "output 1,500 deep, 3,000 bytes": request(execroot, [], ["/".join(["o"] * 1500)], ["true"]),
        "output of 5,000 bytes": request(execroot, [], ["/".join(["o" * 200] * 25)], ["true"]),
    }
    try:
        for what, body in cases.items():
            worker.send(body)
            reply = worker.read()
            print(f"\n[{what}] {reply['output'][:120]!r}")
            assert reply["exitCode"] == 1, (what, reply)
            assert reply["output"].count("\n") == 1 and len(reply["output"]) < 1000, (what, reply["output"][:300])
            assert "internal error" not in reply["output"] and "refused" in reply["output"], (what, reply)
        worker.send(request(execroot, ["small.txt"], ["out/ok"], ["cp", "small.txt", "out/ok"]))
        fine = worker.read()
        assert fine["exitCode"] == 0 and (execroot / "out/ok").read_text() == "small\n", fine
        assert worker.close() == 0
    finally:
        subprocess.run(["rm", "-rf", str(execroot / "d")], check=True)  # (pytest's own removal recurses)


def test_an_output_of_the_wrong_kind_is_refused(tmp_path: Path) -> None:
    """A directory where a file was declared (and a file where a directory was) was copied back as it was: the
    action succeeded and Bazel, which only warns about a directory file artifact, went on with it."""
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    (execroot / "small.txt").write_text("small\n")
    worker = Worker(execroot, tmp_path / "root")
    as_dir = request(execroot, ["small.txt"], ["out/x"], ["sh", "-c", "mkdir out/x && echo hi > out/x/y"])
    as_file = {"arguments": ["--output-dir=out/d", "--", "sh", "-c", "rmdir out/d && echo f > out/d"], "inputs": []}
    linked = 'mkdir out/real && echo hi > out/real/y && ln -s "$PWD/out/real" out/x'
    as_link = request(execroot, ["small.txt"], ["out/x"], ["sh", "-c", linked])
    for body, word in (
        (as_dir, "is a directory, declared a file"),
        (as_file, "is a regular file, declared a directory"),
        (as_link, "'out/x' is a directory, declared a file"),
    ):
        worker.send(body)
        reply = worker.read()
        assert reply["exitCode"] == 1 and word in reply["output"], reply
        assert reply["output"].count("\n") == 1, reply
    assert not (execroot / "out/x").exists() and not (execroot / "out/d").exists()
    worker.send(request(execroot, ["small.txt"], ["out/ok"], ["cp", "small.txt", "out/ok"]))
    assert worker.read()["exitCode"] == 0
    assert worker.close() == 0


@pytest.mark.parametrize("link", ["ln out/d/a", 'ln -s "$PWD/out/d/a"'])
def test_outputs_linked_by_the_tool_are_not_multiplied_in_the_execroot(tmp_path: Path, link: str) -> None:
    """10 MB linked 100 times by the tool (hard, or by absolute symlinks, resolved to their content; no cost
    in its view) became 1 GB in the execroot, one copy a link: a tool could fill Bazel's disk. Now one copy,
    the other names linked to it."""
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    worker = Worker(execroot, tmp_path / "root")
    script = (
        f"head -c 1000000 /dev/urandom > out/d/a && i=0; while [ $i -lt 100 ]; do {link} out/d/l$i; "
        f"i=$((i+1)); done; {link} out/f; echo other > out/d/b"
    )
    worker.send({"arguments": ["--output=out/f", "--output-dir=out/d", "--", "sh", "-c", script], "inputs": []})
    reply = worker.read()
    assert reply["exitCode"] == 0, reply
    names = [execroot / "out/f", *sorted((execroot / "out/d").iterdir())]
    data = (execroot / "out/d/a").read_bytes()
    inodes = {path.stat().st_ino for path in names if path.name != "b"}
    blocks = sum(path.stat().st_blocks for path in names)
    print(f"\n[{link} outputs] {len(names)} names, {len(inodes)} inode(s), {blocks * 512 >> 20} MiB summed")
    assert len(data) == 1000000 and all(p.read_bytes() == data for p in names if p.name != "b")
    assert (execroot / "out/d/b").read_text() == "other\n"
    assert len(inodes) == 1, "each link was copied on its own"
    assert worker.close() == 0


def test_symlinks_fanning_out_level_after_level_do_not_copy_exponentially(tmp_path: Path) -> None:
    """Each level holding two absolute links to the next, resolved to their content: 40 entries made by the tool
    were 2**14 copies of the last level at 14 levels (7 s), and never ended at 40."""
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    worker = Worker(execroot, tmp_path / "root")
    script = (
        "cd out/d && mkdir l40 && echo leaf > l40/f && i=40; while [ $i -gt 0 ]; do j=$((i-1)); mkdir l$j; "
        'ln -s "$PWD/l$i" l$j/a; ln -s "$PWD/l$i" l$j/b; i=$j; done'
    )
    worker.send({"arguments": ["--output-dir=out/d", "--", "sh", "-c", script], "inputs": []})
    reply = worker.read(timeout=60)
    assert reply["exitCode"] == 1 and "reaches a directory copied 16 times already: refused" in reply["output"], reply
    assert reply["output"].count("\n") == 1 and not (execroot / "out/d").exists()
    once = 'mkdir out/d/real && echo x > out/d/real/f && ln -s "$PWD/out/d/real" out/d/alias'  # twice is fine
    worker.send({"arguments": ["--output-dir=out/d", "--", "sh", "-c", once], "inputs": []})
    assert worker.read()["exitCode"] == 0
    assert (execroot / "out/d/alias/f").read_text() == "x\n" and not (execroot / "out/d/alias").is_symlink()
    assert worker.close() == 0


def test_a_blob_at_the_filesystems_link_limit_is_staged_by_copy(tmp_path_factory: pytest.TempPathFactory) -> None:
    """ext4 allows 65,000 links to an inode: a blob there (a popular header) can be linked into neither a pooled
    exec dir (its patch fails: retired) nor a fresh one (the materializer falls back to a copy). (Held.)"""
    base = Path(tempfile.mkdtemp(prefix="treemat-test-emlink-", dir="/var/tmp"))  # no mount below the host's /tmp
    try:
        mnt = mount_image(base, "ext4", 64)
        try:
            execroot = base / "execroot"
            execroot.mkdir()
            (execroot / "a.txt").write_text("AAA\n")
            (execroot / "b.txt").write_text("BBB\n")
            worker = Worker(execroot, mnt / "root")
            for name in ("a.txt", "b.txt"):  # a pooled dir holding a.txt's blob, and b.txt's blob in the CAS
                worker.send(request(execroot, [name], ["out/x"], ["cp", name, "out/x"]))
                assert worker.read()["exitCode"] == 0
            blob = next((mnt / "root" / "cas").glob(f"*/{hashlib.sha256(b'BBB' + bytes([10])).hexdigest()}"))
            links = mnt / "links"
            links.mkdir()
            with pytest.raises(OSError) as full:
                for n in range(70000):
                    os.link(blob, links / str(n))
            assert full.value.errno == errno.EMLINK
            (execroot / "a.txt").write_text("BBB\n")  # the pooled dir's shape, now needing the full blob
            for name in ("a.txt", "b.txt"):
                worker.send(request(execroot, [name], ["out/x"], ["cp", name, "out/x"]))
                reply = worker.read()
                assert reply["exitCode"] == 0 and (execroot / "out/x").read_text() == "BBB\n", reply
            assert ContentStore(Root(mnt / "root"), counters=Counters()).verify_all().corrupt == 0
            assert worker.close() == 0
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)
