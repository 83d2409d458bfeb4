"""The verified ledger: blob states known good, shared by every treemat process of one root.

Where it lives, and who can reach it: `<root>/verified/` (layout.py), one append-only log per process. Tools
cannot reach it: every sandbox masks TREEMAT_ROOT with an empty tmpfs (sandbox.py), so the ledger sits outside
every sandbox's view and no tool can forge a record. Another program of the same user can; that is why a record
only ever spares a hash when the reading process also holds a live inotify write watch on the blob, placed
*before* it compared the blob's state with the record (blobguard.py). A blob this process cannot watch (no
inotify instance, out of watches, past the watch budget, after a queue overflow) is hashed on every use,
whatever the ledger says.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path


class VerifiedLedger:
    """Blob states known good, shared by every treemat process of one root: (inode, ctime, size) per blob.

    A process that hashed a blob, or that holds an inotify watch on it and saw no write, appends the blob's
    current (inode, ctime, size) to its own log under `<root>/verified/`. A new process trusts a blob without
    hashing it when, *after* putting its own watch on it, the blob still has exactly a recorded state: ctime
    moves on every write, chmod or link, and nobody can set it back. Our own links and unlinks move it too, so
    workers re-record after staging and removal (in the background). A state that is not recorded is hashed.
    What the ledger does not stop: someone who forges the ledger itself (same user, on purpose).
    """

    COMPACT_AFTER_FILES = 16

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._records = self._load()
        self._pending: list[str] = []
        path = self.directory / f"{os.getpid()}-{os.urandom(4).hex()}.log"
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # held for our whole life: compaction never removes a live log

    def matches(self, key: tuple[str, bool], info: os.stat_result) -> bool:
        """True if `info` is exactly a recorded good state of the blob."""
        record = self._records.get(key)
        return record is not None and record == (info.st_ino, info.st_ctime_ns, info.st_size)

    def record(self, key: tuple[str, bool], info: os.stat_result) -> None:
        """Note a good state (written out by `flush`)."""
        state = (info.st_ino, info.st_ctime_ns, info.st_size)
        hash_hex, executable = key
        with self._lock:
            self._records[key] = state
            self._pending.append(f"{hash_hex}{'+x' if executable else ''} {state[0]} {state[1]} {state[2]}\n")
            full = len(self._pending) >= 4096
        if full:
            self.flush()

    def flush(self) -> None:
        """Append the noted states to this process's log."""
        with self._lock:
            pending, self._pending = self._pending, []
            fd = self._fd
        if pending and fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, "".join(pending).encode())

    def close(self) -> None:
        """Flush and close this process's log."""
        self.flush()
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _load(self) -> dict[tuple[str, bool], tuple[int, int, int]]:
        records: dict[tuple[str, bool], tuple[int, int, int]] = {}
        logs = sorted(self.directory.glob("*.log"))
        for log in logs:
            try:
                text = log.read_text()
            except OSError:
                continue
            for line in text.splitlines():
                fields = line.split()
                if len(fields) != 4 or not all(part.isdigit() for part in fields[1:]):
                    continue  # a torn or foreign line: ignored, the blob is hashed instead
                name = fields[0]
                key = (name[:-2], True) if name.endswith("+x") else (name, False)
                state = (int(fields[1]), int(fields[2]), int(fields[3]))
                if key not in records or state[1] >= records[key][1]:
                    records[key] = state
        if len(logs) > self.COMPACT_AFTER_FILES:
            self._compact(records, logs)
        return records

    def _compact(self, records: dict[tuple[str, bool], tuple[int, int, int]], logs: list[Path]) -> None:
        """Write the merged records to one log, then remove the logs no live process holds."""
        lines = [f"{h}{'+x' if x else ''} {ino} {ctime} {size}\n" for (h, x), (ino, ctime, size) in records.items()]
        temp = self.directory / f".compact-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            temp.write_text("".join(lines))
            os.chmod(temp, 0o600)
            os.replace(temp, self.directory / f"0-compact-{os.urandom(4).hex()}.log")
        except OSError:  # a full disk, a file-size limit: the logs stay as they were, no partial file is left
            with contextlib.suppress(OSError):
                temp.unlink()
            return
        for log in logs:
            with contextlib.suppress(OSError):
                fd = os.open(log, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    log.unlink()
                except OSError:
                    pass  # a live writer's log
                finally:
                    os.close(fd)
