"""The process's one inotify instance, shared by the blob guard and the exec-dir pool, and the record of every
lost signal.

`WriteWatch` owns the instance (none when the user's instances are used up: EMFILE) and reads its queue: each
event goes to its owner, directory events to the callbacks the exec-dir pool registered (execpool.py), every
other event (blob watches, a queue overflow) to the handler the blob guard registered (blobguard.py, which keeps
the blob watches: they decide what is trusted). `SignalLog` keeps the reasons the guard is not (only) on inotify,
which make its mode: `inotify`, `degraded` (some blobs had or lost no watch: those are hashed on every use) or
`none`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import threading
from collections.abc import Callable
from typing import Any

try:  # Linux only
    import inotify_simple
    from inotify_simple import INotify
    from inotify_simple import flags as inotify_flags
except ImportError:  # pragma: no cover - non-Linux
    INotify = None  # type: ignore[assignment,misc]
    inotify_flags = None  # type: ignore[assignment]

__all__ = [
    "DirectoryWatches",
    "INotify",
    "SignalLog",
    "WriteWatch",
    "close_in_background",
    "errno_name",
    "inotify_flags",
    "open_inotify",
]

DirCallback = Callable[[bool], None]  # called with lost=True when the watch itself was lost
EventHandler = Callable[[list[Any]], list[Any]]  # the guard's: events in, what they hit out
LossListener = Callable[[str, str], None]  # (reason, counter): a watch could not be placed


def open_inotify() -> tuple[INotify | None, str | None]:
    """A non-blocking inotify instance, or None and why not."""
    if INotify is None:
        return None, "no inotify on this platform"
    if getattr(inotify_simple, "_libc", False) is None:  # the process's own libc: its find_library('c') runs
        inotify_simple._libc = ctypes.CDLL(None, use_errno=True)  # ldconfig, 3-40 ms of a worker's start
    try:
        # non-blocking: two threads may both see events pending (FIONREAD) and both read; the second must get
        # EAGAIN, not block until some future event (that hung a worker)
        return INotify(nonblocking=True), None
    except OSError as exc:
        return None, f"no inotify instance ({errno_name(exc)})"


def close_in_background(inotify: INotify) -> None:
    """Close an inotify instance on a thread of its own: the kernel frees its watches before close returns, and
    that waits for a grace period (0-20 ms measured, whatever the number of watches), which a request must not
    wait for. Inline when no thread can be started."""
    try:
        threading.Thread(target=inotify.close, name="treemat-inotify-close", daemon=True).start()
    except RuntimeError:  # no thread to be had (RLIMIT_NPROC)
        inotify.close()


def errno_name(exc: OSError) -> str:
    """EMFILE / ENOSPC / ..., with the kernel limit it means for inotify."""
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    hint = {errno.ENOSPC: ": the kernel's inotify watch limit", errno.EMFILE: ": the inotify instance limit"}
    return f"{name}{hint.get(exc.errno or 0, '')}"


class SignalLog:
    """Why the guard is not (only) on inotify: reason -> times. Callers hold their own lock around `lost`."""

    def __init__(self) -> None:
        self.losses: dict[str, int] = {}

    def lost(self, reason: str) -> None:
        """Note one loss of signal."""
        self.losses[reason] = self.losses.get(reason, 0) + 1

    def describe(self, watching: bool) -> dict[str, object]:
        """`write_watch` (the mode) and `write_watch_detail` (the reasons), for `treemat stats` / `probe`."""
        reasons = "; ".join(f"{why} (x{times})" for why, times in list(self.losses.items()))
        mode = "none" if not watching else "degraded" if reasons else "inotify"
        detail = "unwatched blobs are hashed on every use" if reasons else "one lstat per use"
        return {"write_watch": mode, "write_watch_detail": f"{reasons}: {detail}" if reasons else detail}


class DirectoryWatches:
    """Directory watches on the guard's descriptor, each with the callback `poll` calls on its events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: dict[int, DirCallback] = {}

    @staticmethod
    def mask() -> int:
        """Entries created, removed, renamed or chmodded; the directory itself removed or moved."""
        return int(
            inotify_flags.CREATE
            | inotify_flags.DELETE
            | inotify_flags.MOVED_FROM
            | inotify_flags.MOVED_TO
            | inotify_flags.ATTRIB
            | inotify_flags.DELETE_SELF
            | inotify_flags.MOVE_SELF
            | inotify_flags.ONLYDIR
            | inotify_flags.DONT_FOLLOW
        )

    def add(self, inotify: INotify, path: str, on_event: DirCallback) -> int:
        """Watch `path`; OSError if the kernel refuses."""
        wd = int(inotify.add_watch(path, self.mask()))
        with self._lock:
            self._callbacks[wd] = on_event
        return wd

    def remove(self, inotify: INotify | None, wd: int) -> None:
        """Stop watching (gone already is fine)."""
        with self._lock:
            self._callbacks.pop(wd, None)
        if inotify is not None:
            with contextlib.suppress(OSError):
                inotify.rm_watch(wd)

    def on_event(self, wd: int, ignored: bool) -> DirCallback | None:
        """The callback for an event on `wd`, if it is a directory watch (IN_IGNORED: the watch is gone)."""
        with self._lock:
            return self._callbacks.pop(wd, None) if ignored else self._callbacks.get(wd)

    def everyone(self) -> list[DirCallback]:
        """Every callback (a queue overflow: every directory watch lost events)."""
        with self._lock:
            return list(self._callbacks.values())


class WriteWatch:
    """One inotify instance for the process: blob watches (the guard's) and directory watches (the pool's).

    `poll` drains the queue once, whoever calls it: the guard's handler gets the blob events (and a queue
    overflow) first, then each directory callback is told (every one of them on an overflow, with lost=True).
    """

    def __init__(self) -> None:
        self.inotify, self.why_not = open_inotify()
        self._dirs = DirectoryWatches()
        self._poll_lock = threading.Lock()  # one reader of the event queue at a time
        self._handler: EventHandler = lambda _events: []
        self._on_loss: LossListener = lambda _reason, _counter: None

    def serve(self, handler: EventHandler, on_loss: LossListener) -> None:
        """Register the blob guard: its event handler and where a directory watch that failed is reported."""
        self._handler, self._on_loss = handler, on_loss

    def poll(self) -> list[Any]:
        """Read every queued event and hand each to its owner; returns what the guard's handler returned."""
        if self.inotify is None:
            return []
        with self._poll_lock:
            try:
                events = self.inotify.read(timeout=0)
            except BlockingIOError:
                events = []
        others: list[Any] = []
        notify: list[tuple[DirCallback, bool]] = []
        for event in events:
            if event.mask & inotify_flags.Q_OVERFLOW:
                notify.extend((callback, True) for callback in self._dirs.everyone())
                others.append(event)
                continue
            ignored = bool(event.mask & inotify_flags.IGNORED)
            on_dir_event = self._dirs.on_event(event.wd, ignored)
            if on_dir_event is not None:
                notify.append((on_dir_event, ignored))
            else:
                others.append(event)
        hit = self._handler(others)
        for callback, lost in notify:
            callback(lost)
        return hit

    def watch_directory(self, path: str, on_event: DirCallback) -> int | None:
        """Call `on_event(lost)` (from `poll`) whenever an entry of `path` is created, removed, renamed or
        chmodded; `lost` is True when the watch itself was lost (queue overflow, IN_IGNORED).

        None when there is no inotify or the watch cannot be placed (the caller then verifies by `lstat`).
        """
        if self.inotify is None:
            return None
        try:
            return self._dirs.add(self.inotify, path, on_event)
        except OSError as exc:
            self._on_loss(f"a directory watch failed ({errno_name(exc)})", "guard_watch_failures")
            return None

    def unwatch_directory(self, wd: int) -> None:
        """Stop watching a directory (gone already is fine)."""
        self._dirs.remove(self.inotify, wd)

    def close(self) -> None:
        """Release the descriptor."""
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None
