"""The blob guard: per-use checks, write watches, and the verified ledger shared between processes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from treemat.blobguard import BlobGuard
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.digest import Digest
from treemat.layout import Root
from treemat.ledger import VerifiedLedger
from treemat.writewatch import WriteWatch


def _guard(root: Path) -> tuple[ContentStore, BlobGuard]:
    counters = Counters()
    layout = Root(root)
    cas = ContentStore(layout, counters=counters)
    guard = BlobGuard(cas, WriteWatch(), counters=counters, ledger=VerifiedLedger(layout.verified))
    if not guard.watching:
        pytest.skip("needs inotify")
    return cas, guard


def test_a_new_process_trusts_recorded_states_and_hashes_the_rest(tmp_path: Path) -> None:
    cas, first = _guard(tmp_path / "root")
    digests = [cas.ingest_bytes(f"blob {i}\n".encode() * 100, executable=False) for i in range(20)]
    for digest in digests:
        assert first.admit(digest.hash, False, digest.size) is not None  # hashed once, recorded
    linked = tmp_path / "linked"
    os.link(cas.blob_path(digests[0].hash, False), linked)  # our own link moves the ctime...
    first.refresh([(digests[0].hash, False)])  # ... and is recorded again
    first.close()
    os.link(cas.blob_path(digests[1].hash, False), tmp_path / "unrecorded")  # a link nobody recorded
    _, second = _guard(tmp_path / "root")
    for digest in digests:
        assert second.admit(digest.hash, False, digest.size) is not None
    assert second.counters.get("guard_ledger_trusted") == 19
    assert second.counters.get("guard_hashed_blobs") == 1, "only the blob whose state was not recorded"
    second.close()


def test_a_write_while_no_process_runs_is_caught_by_a_new_process(tmp_path: Path) -> None:
    cas, first = _guard(tmp_path / "root")
    digest = cas.ingest_bytes(b"pristine bytes\n", executable=False)
    assert first.admit(digest.hash, False, digest.size) is not None
    first.close()
    path = cas.blob_path(digest.hash, False)
    info = path.stat()
    os.chmod(path, 0o640)
    path.write_bytes(b"poisoned bytes\n")
    os.chmod(path, info.st_mode & 0o777)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))  # mode, size and mtime as before; ctime moved
    _, second = _guard(tmp_path / "root")
    assert second.admit(digest.hash, False, digest.size) is None, "rejected (and quarantined), not trusted"
    assert not path.exists()
    second.close()


def test_torn_lines_are_ignored_and_many_logs_are_compacted(tmp_path: Path) -> None:
    cas, guard = _guard(tmp_path / "root")
    digest = cas.ingest_bytes(b"x" * 100, executable=True)
    assert guard.admit(digest.hash, True, digest.size) is not None
    guard.close()
    ledger_dir = tmp_path / "root" / "verified"
    (ledger_dir / "999999-torn.log").write_text(f"{digest.hash}+x 12 not-a-number\ngarbage\n")
    for index in range(VerifiedLedger.COMPACT_AFTER_FILES + 2):
        (ledger_dir / f"{index}-old.log").write_text("")
    _, again = _guard(tmp_path / "root")
    assert again.admit(digest.hash, True, digest.size) is not None
    assert again.counters.get("guard_ledger_trusted") == 1
    assert len(list(ledger_dir.glob("*.log"))) <= 3, "dead logs merged into one compact log"
    again.close()


def test_publishing_is_not_a_write_event_for_a_guard_already_watching(tmp_path: Path) -> None:
    """The ingest's own writable descriptor is closed before the blob is published, never after."""
    cas, guard = _guard(tmp_path / "root")
    data = b"published while someone watches\n"
    target = Digest(hashlib.sha256(data).hexdigest(), len(data))
    with cas._temp_blob() as temp:
        os.write(temp.fd, data)
        cas._publish(temp, target, False)
        assert guard.admit(target.hash, False, target.size) is not None  # another thread's action stages it now
    assert guard.poll() == [], "closing the ingest's descriptor must not look like a write"
    assert guard.admit(target.hash, False, target.size) is not None


def test_a_replaced_blob_is_not_a_tainted_inode(tmp_path: Path) -> None:
    cas, guard = _guard(tmp_path / "root")
    digest = cas.ingest_bytes(b"original inode\n", executable=False)
    identity = guard.admit(digest.hash, False, digest.size)
    assert identity is not None
    path = cas.blob_path(digest.hash, False)
    twin = path.with_name("twin")
    twin.write_bytes(b"original inode\n")
    info = path.stat()
    os.chmod(twin, info.st_mode & 0o777)
    os.utime(twin, ns=(info.st_atime_ns, info.st_mtime_ns))
    os.replace(twin, path)
    assert guard.admit(digest.hash, False, digest.size) is None, "replaced: taken out of service"
    assert not guard.tainted({identity}), "but the inode an action staged still holds the right bytes"


def test_concurrent_polls_never_block(tmp_path: Path) -> None:
    """Two threads draining the event queue at once: the loser must see 'nothing', not wait for a next event."""
    import threading

    cas, guard = _guard(tmp_path / "root")
    digests = [cas.ingest_bytes(f"blob {i}\n".encode(), executable=False) for i in range(400)]
    for digest in digests:
        assert guard.admit(digest.hash, False, digest.size) is not None
    done = threading.Event()

    def writer() -> None:
        for digest in digests:  # each write is an event (and a taint) the pollers race to read
            path = cas.blob_path(digest.hash, False)
            if path.exists():
                os.chmod(path, 0o640)
                with open(path, "ab") as handle:
                    handle.write(b"!")
        done.set()

    finished: list[int] = []

    def poller() -> None:
        while not done.is_set():
            guard.poll()
        guard.poll()
        finished.append(1)

    threads = [threading.Thread(target=poller, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    writer()
    for thread in threads:
        thread.join(20)
    assert len(finished) == 4, "a poller blocked in read(2) on the inotify descriptor"


@pytest.mark.parametrize("executable", [False, True])
def test_a_blob_of_an_older_version_is_upgraded_in_place_and_hashed(tmp_path: Path, executable: bool) -> None:
    """Blobs written before 0.1 carry 0o444/0o555: they get today's mode, their bytes are hashed, and they are
    served (not quarantined and ingested again), unless their bytes are wrong."""
    cas, guard = _guard(tmp_path / "root")
    good = cas.ingest_bytes(b"an old blob\n" * 50, executable=executable)
    bad = cas.ingest_bytes(b"another old blob\n" * 50, executable=executable)
    for digest in (good, bad):
        os.chmod(cas.blob_path(digest.hash, executable), 0o555 if executable else 0o444)
    path = cas.blob_path(bad.hash, executable)
    info = path.stat()
    os.chmod(path, 0o644)
    path.write_bytes(b"Another old blob\n" * 50)  # same size, sentinel mtime restored: only the hash can tell
    os.chmod(path, info.st_mode & 0o777)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert guard.admit(good.hash, executable, good.size) is not None
    assert cas.blob_path(good.hash, executable).stat().st_mode & 0o777 == (0o550 if executable else 0o440)
    assert guard.counters.get("guard_hashed_blobs") == 1
    assert guard.admit(bad.hash, executable, bad.size) is None, "upgraded, hashed, found wrong: rejected"
    assert not path.exists()
    assert cas.lookup(good.hash, executable) == good
    guard.close()


def test_a_compaction_that_cannot_be_written_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (or a file-size limit) cut the compacted log short: its temp file stayed, never loaded and never
    removed. The logs stay as they were and the records are still read."""
    cas, guard = _guard(tmp_path / "root")
    digest = cas.ingest_bytes(b"y" * 100, executable=False)
    assert guard.admit(digest.hash, False, digest.size) is not None
    guard.close()
    ledger_dir = tmp_path / "root" / "verified"
    for index in range(VerifiedLedger.COMPACT_AFTER_FILES + 2):
        (ledger_dir / f"{index}-old.log").write_text("")
    write_text = Path.write_text

    def disk_full(path: Path, data: str) -> int:
        if path.name.startswith(".compact-"):
            write_text(path, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return write_text(path, data)

    monkeypatch.setattr(Path, "write_text", disk_full)
    _, again = _guard(tmp_path / "root")
    assert again.admit(digest.hash, False, digest.size) is not None
    assert again.counters.get("guard_ledger_trusted") == 1
    assert not [path.name for path in ledger_dir.iterdir() if path.name.startswith(".compact-")]
    assert len(list(ledger_dir.glob("*-old.log"))) == VerifiedLedger.COMPACT_AFTER_FILES + 2, "no log was removed"
    again.close()
