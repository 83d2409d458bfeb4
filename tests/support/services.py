"""The stager services (treemat/service.py) running on this machine, found from /proc: they outlive the workers
and tests that started them, so tests find and end them here.

A service names itself `treemat-service` (/proc/PID/comm). One started with `--service` has its root in its
command line; one a relay forked into keeps the relay's command line and environment, so its root is the
relay's: `--root=`, else `$TREEMAT_ROOT`, else `<$XDG_CACHE_HOME or $HOME/.cache>/treemat`.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

PROCESS_NAME = b"treemat-service"  # = treemat.servicespawn.PROCESS_NAME (a test checks)


def stager_services() -> dict[int, str]:
    """{pid: root} of every live (not zombie) stager service."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if Path(f"/proc/{entry}/comm").read_bytes().strip() != PROCESS_NAME:
                continue
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            root = _root_of(argv, entry)
        except OSError:
            continue
        if state != b"Z" and root:
            found[int(entry)] = root
    return found


def _root_of(argv: list[bytes], pid: str) -> str:
    roots = [arg[len(b"--root=") :] for arg in argv if arg.startswith(b"--root=")]
    if roots:
        return os.fsdecode(roots[-1])
    env = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
    if env.get(b"TREEMAT_ROOT"):
        return os.fsdecode(env[b"TREEMAT_ROOT"])
    cache = env.get(b"XDG_CACHE_HOME") or (env.get(b"HOME", b"/") + b"/.cache")
    return os.fsdecode(cache + b"/treemat")


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
