"""Whether a directory's whole path is ours: imports nothing of treemat, so that __main__ may use it before it sets
the compiled-module cache (which it must not put where another user could plant compiled modules)."""

from __future__ import annotations

import os
import stat


def trusted_owners() -> set[int]:
    """Who may own a directory above one of ours: we and root; in a user namespace that does not map root, also
    the overflow uid its unmapped owners show as (/, /home: a namespaced process cannot tell them apart)."""
    owners = {os.geteuid(), 0}
    try:
        with open("/proc/self/uid_map") as uid_map:
            if not any(line.split()[:2] == ["0", "0"] for line in uid_map):
                with open("/proc/sys/kernel/overflowuid") as overflow:
                    owners.add(int(overflow.read()))
    except (OSError, ValueError):
        pass
    return owners


def trusted_path(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(`path`'s real path, "" or why it is refused): refused unless it and every directory above it is owned by us
    or root and writable by no one else (by group or others only with the sticky bit, as /tmp). Whoever can rename
    one of them can put a tree of theirs where we then look (the modules a service imports, compiled modules),
    after any check of the leaf; the caller uses the real path from then on (no symlink is followed again)."""
    real = os.path.realpath(path)
    owners = trusted_owners()
    directory = real
    while True:
        try:
            info = os.lstat(directory)
        except OSError as exc:
            return real, f"cannot use {directory}: {exc.strerror}"
        writable_by_others = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX
        if info.st_uid not in owners or writable_by_others:
            return real, (
                f"{directory} (on the way to {path}) is uid {info.st_uid}'s, mode {stat.S_IMODE(info.st_mode):o}: "
                f"refused (another user could swap what is under it)"
            )
        if directory == os.path.dirname(directory):
            return real, ""
        directory = os.path.dirname(directory)
