"""Which execroot inputs may have changed type or exec bit since they were last `stat`ed: inotify, failing closed.

Bazel's request carries each input's digest but not its exec bit, so a reused exec dir asks the execroot. Instead
of one `stat` per unchanged input per request, the stager asks this watch what to check (`plan`):

- an input is vouched for once it was `lstat`ed as a regular file after watches were in place on its inode
  (IN_ATTRIB: a chmod through any of its names, a link count change; IN_DELETE_SELF, IN_MOVE_SELF) and on every
  directory its path is resolved through: the execroot's ancestors from `/` (entries created, removed or
  renamed; the directory itself removed or moved) and each directory between the execroot and the file (the
  same, and chmodded).
  A directory on the way may be an absolute symlink to a directory whose path has no symlink in it (Bazel plants
  sources so): its target and the target's ancestors are watched too, and a change of the link starts afresh;
- an event on a file's inode, or on its name in its directory, marks that input; an event on a subdirectory's
  name (but its creation), on a watched directory itself or on the name of the execroot's path in an ancestor,
  a lost directory watch (IN_IGNORED), a queue overflow or a change of the mount table (/proc/self/mountinfo)
  starts afresh: every watch dropped, everything marked, the watches placed again as inputs are checked;
- an input that is a symlink, or lies under any other symlink, or in a directory not on a local filesystem (NFS, FUSE:
  another machine's change raises no event here), or whose watches could not be placed (out of watches) is
  never vouched for: it is checked on every request; so is everything when there is no inotify instance or the
  execroot's own path crosses a symlink.

A caller keeps the generation `plan` returned and passes it back next time: what was marked since is checked
(and watched) again; everything is when a fresh start (or a blanket mark) came since.
"""

from __future__ import annotations

import io
import os
import select
import stat
import threading
from collections.abc import Set as AbstractSet
from typing import NamedTuple

from treemat.fsprims import filesystem_type
from treemat.writewatch import INotify, close_in_background, inotify_flags, open_inotify

# local filesystems whose every change goes through this kernel's inotify (ext2/3/4, xfs, btrfs, tmpfs, f2fs, zfs,
# bcachefs): not NFS, FUSE or a network filesystem, where another machine's change raises no event
LOCAL_FILESYSTEMS = {0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0xF2F52010, 0x2FC12FC1, 0xCA451A4E}
MAX_MARKS = 100_000  # more marked inputs than this: forget them and mark everything


class CheckPlan(NamedTuple):
    """What to `stat` now: every input (`everything`), else `paths` (marked since, or never vouched for)."""

    generation: int
    everything: bool
    paths: AbstractSet[str] = frozenset()


class ExecrootWatch:
    """Inotify on the inputs of one execroot at a time (another execroot starts afresh); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inotify: INotify | None = None
        self._mounts: io.BufferedReader | None = None
        self._mounts_poll: select.poll | None = None
        self._execroot: str | None = None
        self._restart = False  # a lost event or directory watch: start afresh once the queue is read
        self._usable = False  # the execroot resolves without symlinks and it and its ancestors are watched
        self._crosses_symlink = False  # the execroot's path does: never watched (every input checked every time)
        self._generation = 1
        self._epoch = 0  # one per start afresh: a watch placed in an earlier one vouches for nothing now
        self._blanket = 1  # the generation of the last "anything may have changed"
        self._marks: dict[str, int] = {}  # input path -> the generation it was last marked in
        self._unsure: set[str] = set()  # inputs checked but not vouched for: checked on every request
        self._files: dict[int, set[str]] = {}  # file wd -> input paths (hardlinks share an inode, so a wd)
        self._dirs: dict[int, set[str]] = {}  # directory wd -> its paths below the execroot ("" is the execroot)
        self._dir_wds: dict[str, int] = {}  # path below the execroot -> its directory wd (-1: cannot be watched)
        self._ancestors: dict[int, set[str]] = {}  # wd of a directory above a watched one -> the names on the path
        self._links: set[tuple[int, str]] = set()  # (directory wd, name) of a symlink that inputs are reached through

    def plan(self, execroot: str, since: int | None) -> CheckPlan:
        """Read the events so far: what a caller that last checked at generation `since` must check now."""
        with self._lock:
            if execroot != self._execroot or (not self._usable and not self._crosses_symlink):
                self._start(execroot)  # another execroot, or this one could not be watched (whole) last time
            self._drain()
            generation = self._generation
            self._generation += 1  # what is read from here on is newer than what the caller now checks
            if not self._usable or since is None or self._blanket > since:
                return CheckPlan(generation, everything=True)
            marked: set[str] = set()
            for path in reversed(self._marks):  # newest first: only the marks since `since` are read
                if self._marks[path] <= since:
                    break
                marked.add(path)
            return CheckPlan(generation, everything=False, paths=marked | self._unsure)

    def check(self, execroot: str, path: str) -> int:
        """The input's `st_mode` now (0: gone or unreadable), read after its watches were placed (none while
        another execroot is watched)."""
        full = f"{execroot}/{path}"
        epoch = self._watch_input(execroot, path)
        try:
            mode = os.lstat(full).st_mode
        except OSError:
            mode = 0
        sure = epoch is not None and stat.S_ISREG(mode)
        if stat.S_ISLNK(mode):
            try:
                mode = os.stat(full).st_mode
            except OSError:
                mode = 0
        with self._lock:
            if sure and epoch == self._epoch:  # (a start afresh since dropped the watch it was placed in)
                self._unsure.discard(path)
            elif execroot == self._execroot:
                self._unsure.add(path)
        return mode

    def close(self) -> None:
        """Drop every watch."""
        with self._lock:
            self._reset(wait=True)
            self._execroot = None

    # ----------------------------------------------------------------------------------------------- inside

    def _start(self, execroot: str) -> None:
        self._reset()
        self._restart = False
        self._execroot = execroot
        self._crosses_symlink = os.path.realpath(execroot) != execroot
        if self._crosses_symlink:
            return  # never watched: every input is checked every time
        self._inotify, _why_not = open_inotify()
        if self._inotify is None:
            return  # no inotify instance (tried again next time: out of instances while old ones close)
        try:
            self._mounts = open("/proc/self/mountinfo", "rb")  # noqa: SIM115 (kept open: poll tells a change)
            self._mounts.read()
            self._mounts_poll = select.poll()
            self._mounts_poll.register(self._mounts, select.POLLPRI | select.POLLERR)
        except OSError:
            return
        wd = self._watch_real_dir(execroot)
        if wd is not None:
            self._dirs.setdefault(wd, set()).add("")
            self._dir_wds[""] = wd
            self._usable = True

    def _watch_real_dir(self, real: str) -> int | None:
        """Watch a directory whose path has no symlink in it, and the names of that path in each directory above
        it (from `/`); None if any cannot be watched or it is not on a local filesystem."""
        parts = [part for part in real.split("/") if part]
        for depth, name in enumerate(parts):
            wd = self._add_dir_watch("/" + "/".join(parts[:depth]), ancestor=True)
            if wd is None:
                return None
            self._ancestors.setdefault(wd, set()).add(name)
        return self._add_dir_watch(real, local=True)

    def _reset(self, *, wait: bool = False) -> None:
        if self._inotify is not None and wait:
            self._inotify.close()
        elif self._inotify is not None:
            close_in_background(self._inotify)  # a request must not wait for the kernel to free its watches
        if self._mounts is not None:
            self._mounts.close()
        self._inotify, self._mounts, self._mounts_poll, self._usable = None, None, None, False
        for table in (self._marks, self._files, self._dirs, self._dir_wds, self._ancestors):
            table.clear()
        self._unsure.clear()
        self._links.clear()
        self._blanket = self._generation
        self._epoch += 1

    def _add_dir_watch(self, path: str, *, local: bool = False, ancestor: bool = False) -> int | None:
        """A directory watch; None if it cannot be placed (or, with `local`, the directory is not on a local
        filesystem). An `ancestor`'s (a directory above a watched one) leaves out attribute changes: a directory's
        mode or owner changes no input's bytes, type or exec bit, and asking for them makes the kernel mark every
        cached entry of the directory (10 ms for this machine's /tmp, on every new execroot)."""
        assert self._inotify is not None
        if local and filesystem_type(path) not in LOCAL_FILESYSTEMS:
            return None
        mask = (
            inotify_flags.CREATE
            | inotify_flags.DELETE
            | inotify_flags.MOVED_FROM
            | inotify_flags.MOVED_TO
            | inotify_flags.DELETE_SELF
            | inotify_flags.MOVE_SELF
            | inotify_flags.ONLYDIR
            | inotify_flags.DONT_FOLLOW  # a symlink is refused (ENOTDIR): what lies under it is never vouched for
        )
        # an ancestor that is also a watched directory (a source symlink's target below the execroot) keeps the
        # directory's mask: added to, never narrowed
        mask |= inotify_flags.MASK_ADD if ancestor else inotify_flags.ATTRIB
        try:
            wd = int(self._inotify.add_watch(path, mask))
        except OSError:
            return None
        self._files.pop(wd, None)  # a directory first checked as an input (never vouched for): a directory now
        return wd

    def _watch_input(self, execroot: str, path: str) -> int | None:
        """Watch each directory from `execroot` (the watched one, else None) down to `path`, then its inode: the
        epoch they were placed in; None if any cannot be."""
        with self._lock:
            if not self._usable or self._inotify is None or execroot != self._execroot:
                return None
            parent = ""
            for part in path.split("/")[:-1]:
                above, parent = parent, f"{parent}/{part}" if parent else part
                wd = self._dir_wds.get(parent)
                if wd is None:
                    wd = self._watch_dir(parent, part, self._dir_wds[above])
                    self._dir_wds[parent] = -1 if wd is None else wd
                    if wd is not None:
                        self._dirs.setdefault(wd, set()).add(parent)
                if wd == -1 or wd is None:
                    return None
            # its inode: chmod (through any name), link count, utimes; removed; renamed (a symlink: never vouched for);
            # added to: a directory listed as an input keeps its directory watch's mask (else a change below it went
            # unseen) and is never vouched for
            mask = (
                inotify_flags.ATTRIB
                | inotify_flags.DELETE_SELF
                | inotify_flags.MOVE_SELF
                | inotify_flags.DONT_FOLLOW
                | inotify_flags.MASK_ADD
            )
            try:
                wd = int(self._inotify.add_watch(f"{self._execroot}/{path}", mask))
            except OSError:
                return None
            if wd in self._dirs or wd in self._ancestors:
                return None  # a directory watched as one: its events must start afresh, not mark this path
            self._files.setdefault(wd, set()).add(path)
            return self._epoch

    def _watch_dir(self, rel: str, name: str, parent_wd: int) -> int | None:
        """Watch the directory at `rel` (its parent, `parent_wd`, is watched): a directory, or an absolute symlink
        to a directory whose path has no symlink in it (Bazel's source symlinks), watched with that path's
        names above it, whose own name in the parent then starts afresh when it changes. None for anything else
        (a relative or chained symlink, a non-local filesystem, out of watches): never vouched for below."""
        full = f"{self._execroot}/{rel}"
        wd = self._add_dir_watch(full, local=True)
        if wd is not None:
            return wd
        try:
            target = os.readlink(full)
        except OSError:
            return None  # not a symlink (or gone)
        if target != os.path.realpath(full) or not os.path.isdir(target):
            return None
        self._links.add((parent_wd, name))  # from here on a change of the link starts afresh
        return self._watch_real_dir(target)

    def _drain(self) -> None:
        """Read the queued events (and whether the mount table changed) into marks."""
        if self._inotify is None:
            return
        if self._mounts is not None and self._mounts_poll is not None and self._mounts_poll.poll(0):
            self._mounts.seek(0)
            self._mounts.read()
            self._restart = True  # a mount may cover a watched directory: watch everything afresh
        try:
            events = self._inotify.read(timeout=0)
        except BlockingIOError:
            events = []
        for event in events:
            self._on_event(event.wd, event.mask, event.name)
        if self._restart and self._execroot is not None:
            self._start(self._execroot)  # marks everything, clears `_restart`
        elif len(self._marks) > MAX_MARKS:
            self._mark_everything()

    def _on_event(self, wd: int, mask: int, name: str) -> None:
        """A file's event marks its inputs; what may have moved a watched directory starts afresh."""
        flags = inotify_flags
        paths = self._files.pop(wd, None) if mask & flags.IGNORED else self._files.get(wd)
        if paths is not None:
            for path in paths:
                self._mark(path)
        elif mask & (flags.Q_OVERFLOW | flags.IGNORED):
            self._restart = True  # events lost, or a directory watch gone: watch everything afresh
        elif wd in self._ancestors and (not name or name in self._ancestors[wd]):
            self._restart = True  # a watched directory's path changed above it (or its permissions)
        elif wd in self._dirs:
            if (wd, name) in self._links:
                self._restart = True  # a symlink that inputs are reached through changed
            elif mask & flags.ISDIR and mask & flags.CREATE:
                return  # a new directory: no input was found under a name that did not exist
            elif not name or mask & flags.ISDIR:
                self._restart = True  # a watched directory moved, removed, replaced or chmodded
            else:
                for rel in self._dirs[wd]:
                    self._mark(f"{rel}/{name}" if rel else name)

    def _mark(self, path: str) -> None:
        self._marks.pop(path, None)  # kept in the order of their generations (see `plan`)
        self._marks[path] = self._generation

    def _mark_everything(self) -> None:
        self._blanket = self._generation
        self._marks.clear()
