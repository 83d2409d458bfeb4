"""Tests for treemat.cas: layout, atomic ingest, verification, integrity fingerprints, GC, disk full."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat
import threading
from pathlib import Path

import pytest
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.digest import EMPTY_DIGEST, digest_bytes
from treemat.errors import CasError, CorruptBlobError, MissingBlobError
from treemat.fsprims import BLOB_MTIME_NS
from treemat.layout import Root


def test_layout_modes_and_mtime(store: ContentStore, tmp_path: Path) -> None:
    source = tmp_path / "tool.sh"
    source.write_bytes(b"#!/bin/sh\necho hi\n")
    plain = store.ingest_file(source, executable=False)
    exe = store.ingest_file(source, executable=True)
    assert plain == exe == digest_bytes(source.read_bytes())
    plain_path = store.blob_path(plain.hash, False)
    exe_path = store.blob_path(plain.hash, True)
    assert plain_path == store.root / "cas" / plain.hash[:2] / plain.hash
    assert exe_path.name == plain.hash + "+x"
    assert stat.S_IMODE(plain_path.stat().st_mode) == 0o440
    assert stat.S_IMODE(exe_path.stat().st_mode) == 0o550
    assert plain_path.stat().st_ino != exe_path.stat().st_ino, "exec and non-exec blobs must not share an inode"
    assert plain_path.stat().st_mtime_ns == BLOB_MTIME_NS
    assert not list((store.root / "tmp").iterdir()), "temp files must be cleaned up"


def test_expected_digest_mismatch_is_refused(store: ContentStore, tmp_path: Path) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"actual content")
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(CorruptBlobError, match="expected"):
        store.ingest_file(source, executable=False, expected=wrong)
    assert store.lookup(wrong, False) is None
    assert store.stats().blobs == 0
    assert not list((store.root / "tmp").iterdir())


def test_zero_byte_never_touches_cas(store: ContentStore, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert store.ingest_file(empty, executable=False) == EMPTY_DIGEST
    assert store.ingest_bytes(b"", executable=True) == EMPTY_DIGEST
    assert store.lookup(EMPTY_DIGEST.hash, False) == EMPTY_DIGEST
    assert store.stats().blobs == 0


def test_missing_source(store: ContentStore, tmp_path: Path) -> None:
    with pytest.raises(MissingBlobError):
        store.ingest_file(tmp_path / "nope", executable=False)


def test_tampered_hardlinked_blob_is_detected_and_repaired(store: ContentStore, tmp_path: Path) -> None:
    source = tmp_path / "input.txt"
    source.write_bytes(b"pristine input\n")
    digest = store.ingest_file(source, executable=False)
    # an action got a hardlink to the blob, chmods it and writes through it
    linked = tmp_path / "exec" / "input.txt"
    linked.parent.mkdir()
    os.link(store.blob_path(digest.hash, False), linked)
    os.chmod(linked, 0o644)
    linked.write_bytes(b"poisoned!\n")
    assert not store.check_fingerprint(digest.hash, False)
    assert store.lookup(digest.hash, False) is None, "a tampered blob must never be served"
    assert store.counters.get("integrity_quarantined") == 1
    assert list((store.root / "quarantine").iterdir())
    # re-ingest from the pristine source repairs the CAS
    again = store.ingest_file(source, executable=False, expected=digest.hash)
    assert again == digest
    assert store.blob_path(digest.hash, False).read_bytes() == b"pristine input\n"
    assert store.verify(digest.hash, False)


def test_write_restoring_mode_is_still_detected(store: ContentStore) -> None:
    digest = store.ingest_bytes(b"abc", executable=True)
    path = store.blob_path(digest.hash, True)
    os.chmod(path, 0o755)
    path.write_bytes(b"xyz")
    os.chmod(path, 0o550)  # mode restored, but the write moved mtime off the sentinel
    assert not store.check_fingerprint(digest.hash, True)


def test_verify_all_quarantines_silent_corruption(store: ContentStore) -> None:
    good = store.ingest_bytes(b"good", executable=False)
    bad = store.ingest_bytes(b"bad blob", executable=False)
    path = store.blob_path(bad.hash, False)
    os.chmod(path, 0o644)
    path.write_bytes(b"BAD BLOB")  # same size
    os.chmod(path, 0o440)
    os.utime(path, ns=(BLOB_MTIME_NS, BLOB_MTIME_NS))  # adversarially restore the fingerprint
    assert store.check_fingerprint(bad.hash, False), "fingerprint restored: only a rehash can tell"
    report = store.verify_all()
    assert (report.checked, report.ok, report.corrupt) == (2, 1, 1)
    assert store.lookup(bad.hash, False) is None
    assert store.lookup(good.hash, False) == good


def test_gc_deletes_lru_and_keeps_linked_blobs(store: ContentStore, tmp_path: Path) -> None:
    digests = [store.ingest_bytes(bytes([i]) * 1000, executable=False) for i in range(10)]
    for age, digest in enumerate(digests):  # digests[0] oldest
        os.utime(store.blob_path(digest.hash, False), ns=(1_000_000_000 * (age + 1), BLOB_MTIME_NS))
    os.link(store.blob_path(digests[0].hash, False), tmp_path / "in-use")
    report = store.gc(max_bytes=5000)
    assert report.kept_in_use == 1
    assert report.after_bytes <= 5000
    assert store.lookup(digests[0].hash, False) is not None, "a blob linked into an exec dir is in use"
    survivors = {d.hash for d in digests if store.lookup(d.hash, False) is not None}
    assert digests[-1].hash in survivors and digests[1].hash not in survivors
    assert report.deleted_blobs == 10 - len(survivors)


def test_concurrent_threads_ingest_same_blobs(store: ContentStore) -> None:
    payloads = [os.urandom(4096) for _ in range(20)]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for data in payloads:
                assert store.ingest_bytes(data, executable=False) == digest_bytes(data)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert store.stats().blobs == 20
    assert store.verify_all().corrupt == 0


def _ingest_many(root: str, seed: int) -> None:
    cas = ContentStore(Root(Path(root)), counters=Counters())
    for i in range(50):
        cas.ingest_bytes(f"shared {i}".encode() * 100, executable=bool(i % 2))
        cas.ingest_bytes(f"private {seed} {i}".encode(), executable=False)


def test_concurrent_processes_share_one_cas(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_ingest_many, args=(str(tmp_path / "root"), seed)) for seed in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    cas = ContentStore(Root(tmp_path / "root"), counters=Counters())
    assert cas.stats().blobs == 50 + 4 * 50
    assert cas.verify_all().corrupt == 0
    assert not list((tmp_path / "root" / "tmp").iterdir())


def test_disk_full_is_a_clear_error_and_leaves_nothing(tiny_tmpfs: Path, tmp_path: Path) -> None:
    cas = ContentStore(Root(tiny_tmpfs / "root"), counters=Counters())
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 << 20))
    with pytest.raises(CasError, match="disk full"):
        cas.ingest_file(big, executable=False)
    assert cas.stats().blobs == 0
    assert not list((tiny_tmpfs / "root" / "tmp").iterdir())
    small = tmp_path / "small"
    small.write_bytes(b"still works")
    assert cas.ingest_file(small, executable=False) == digest_bytes(b"still works")
