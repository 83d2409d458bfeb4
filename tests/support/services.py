"""The stager services (treemat/service.py) running on this machine, found from /proc: they outlive the workers
and tests that started them, so tests find and end them here."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def stager_services() -> dict[int, str]:
    """{pid: root} of every live (not zombie) `treemat --service` process."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if b"--service" in argv and state != b"Z":
            roots = [arg[len(b"--root=") :] for arg in argv if arg.startswith(b"--root=")]
            if roots:
                found[int(entry)] = os.fsdecode(roots[0])
    return found


def services_of(root: Path) -> list[int]:
    """Pids of the live services of `root`."""
    return [pid for pid, path in stager_services().items() if path == str(root)]


def end_services_under(directory: Path) -> None:
    """SIGKILL every service whose root is `directory` or below it."""
    prefix = str(directory).rstrip("/") + "/"
    for pid, root in stager_services().items():
        if root == str(directory) or root.startswith(prefix):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
