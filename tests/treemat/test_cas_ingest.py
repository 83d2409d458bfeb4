"""Tests for ContentStore's cold ingest: one-pass copy-and-hash, reflink-then-hash, and publishing."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
from treemat import blobio
from treemat.blobio import copy_and_hash
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.digest import Digest
from treemat.errors import CasError, CorruptBlobError
from treemat.fsprims import copy_fd, is_btrfs
from treemat.layout import Root


def _big(tmp_path: Path, size: int = 3 * blobio._INGEST_CHUNK + 12345) -> tuple[Path, bytes]:
    data = random.Random(size).randbytes(size)
    source = tmp_path / "big.swiftmodule"
    source.write_bytes(data)
    return source, data


def test_the_strategy_follows_the_filesystem(tmp_path: Path) -> None:
    store = ContentStore(Root(tmp_path / "root"), counters=Counters())
    assert store.ingest_reflinks == is_btrfs(tmp_path), "reflink-then-hash on btrfs only, one pass elsewhere"


@pytest.mark.parametrize("reflinks", [False, True])
def test_multi_chunk_ingest_stores_exactly_the_bytes_and_verifies(
    store: ContentStore, tmp_path: Path, reflinks: bool
) -> None:
    source, data = _big(tmp_path)
    store.ingest_reflinks = reflinks  # where reflinks are unsupported this takes the one-pass fallback
    expected = hashlib.sha256(data).hexdigest()
    digest = store.ingest_file(source, executable=False, expected=expected)
    assert digest == Digest(expected, len(data))
    assert store.blob_path(expected, False).read_bytes() == data
    assert store.verify(expected, False)
    assert not list((store.root / "tmp").iterdir())


@pytest.mark.parametrize("reflinks", [False, True])
def test_a_wrong_digest_is_refused_on_either_path(store: ContentStore, tmp_path: Path, reflinks: bool) -> None:
    source, data = _big(tmp_path)
    store.ingest_reflinks = reflinks
    wrong = hashlib.sha256(data[:-1] + b"!").hexdigest()
    with pytest.raises(CorruptBlobError, match="expected"):
        store.ingest_file(source, executable=False, expected=wrong)
    with pytest.raises(CorruptBlobError, match="declares"):
        store.ingest_file(source, executable=False, expected=Digest(hashlib.sha256(data).hexdigest(), len(data) + 1))
    assert store.stats().blobs == 0
    assert not list((store.root / "tmp").iterdir())


def test_one_pass_hashes_exactly_what_it_writes(tmp_path: Path) -> None:
    source, data = _big(tmp_path)
    src = os.open(source, os.O_RDONLY)
    dst = os.open(tmp_path, os.O_RDWR | os.O_TMPFILE, 0o600)
    try:
        digest = copy_and_hash(src, dst, source)
        os.lseek(dst, 0, os.SEEK_SET)
        written = b"".join(iter(lambda: os.read(dst, 1 << 20), b""))
    finally:
        os.close(src)
        os.close(dst)
    assert written == data
    assert digest == Digest(hashlib.sha256(written).hexdigest(), len(written))


def test_reflink_path_hashes_what_landed_in_the_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a reflink, the digest is of the copy read back, not of the source."""
    source, data = _big(tmp_path)

    def fake_reflink(src_fd: int, dst_fd: int) -> None:  # a "reflink" whose copy differs from its source
        copy_fd(src_fd, dst_fd)
        os.pwrite(dst_fd, b"X", 0)
        os.lseek(dst_fd, 0, os.SEEK_SET)

    monkeypatch.setattr(blobio, "reflink_fd", fake_reflink)
    src = os.open(source, os.O_RDONLY)
    dst = os.open(tmp_path, os.O_RDWR | os.O_TMPFILE, 0o600)
    try:
        digest = copy_and_hash(src, dst, source, reflink=True)
    finally:
        os.close(src)
        os.close(dst)
    assert digest.hash == hashlib.sha256(b"X" + data[1:]).hexdigest()


def test_a_failed_reflink_falls_back_to_one_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, data = _big(tmp_path)

    def refuse(src_fd: int, dst_fd: int) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(blobio, "reflink_fd", refuse)
    store = ContentStore(Root(tmp_path / "root"), counters=Counters())
    store.ingest_reflinks = True
    digest = store.ingest_file(source, executable=True, expected=hashlib.sha256(data).hexdigest())
    assert store.blob_path(digest.hash, True).read_bytes() == data


def test_a_write_error_is_a_cas_error_and_leaves_nothing(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, data = _big(tmp_path)
    store.ingest_reflinks = False
    real_write = os.write
    calls = []

    def failing_write(fd: int, payload: bytes | memoryview) -> int:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(fd, payload)

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(CasError, match="disk full"):
        store.ingest_file(source, executable=False, expected=hashlib.sha256(data).hexdigest())
    monkeypatch.undo()
    assert store.stats().blobs == 0
    assert not list((store.root / "tmp").iterdir())


def test_publish_recreates_a_missing_shard_directory(store: ContentStore, tmp_path: Path) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"some input\n")
    digest = store.ingest_file(source, executable=False)
    shard = store.blob_path(digest.hash, False).parent
    os.unlink(store.blob_path(digest.hash, False))
    os.rmdir(shard)
    assert store.ingest_file(source, executable=False, expected=digest.hash) == digest
    assert store.blob_path(digest.hash, False).read_bytes() == b"some input\n"
    assert (shard.stat().st_mode & 0o777) == store.dir_mode


def test_ingest_leaves_no_descriptor_behind(store: ContentStore, tmp_path: Path) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    sources = []
    for index in range(40):
        path = tmp_path / f"in{index}"
        path.write_bytes(b"input %d\n" % index)
        sources.append(path)
    store.ingest_file(sources[0], executable=False)  # the first publish opens the process's one "/" descriptor
    before = open_fds()
    for path in sources[1:]:
        store.ingest_file(path, executable=False)
    assert open_fds() == before
