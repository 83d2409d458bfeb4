"""`wait_for`: poll a condition until it holds or a deadline passes (never a bare sleep in a test)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_SECONDS = 0.01


def wait_for(condition: Callable[[], T], timeout: float = 30.0, what: str = "the condition") -> T:
    """`condition()`'s first truthy value, polled every POLL_SECONDS; AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_SECONDS)


def running_below(ancestor: int, argv: list[str]) -> bool:
    """True if a process with exactly `argv` runs anywhere below process `ancestor` (read from /proc)."""
    return bool(processes_below(ancestor, argv))


def processes_below(ancestor: int, argv: list[str]) -> list[int]:
    """The pids of the processes with exactly `argv` anywhere below process `ancestor` (read from /proc)."""
    wanted = "\0".join(argv).encode() + b"\0"
    parents: dict[int, int] = {}
    matches: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue  # gone meanwhile
        parents[int(entry)] = int(fields[1])
        if cmdline == wanted:
            matches.append(int(entry))
    below = []
    for match in matches:
        pid, seen = match, set()
        while pid in parents and pid not in seen:
            seen.add(pid)
            pid = parents[pid]
            if pid == ancestor:
                below.append(match)
                break
    return below
