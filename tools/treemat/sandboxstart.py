"""Starting the sandbox helper (sandboxd.py), and the paths every tool's view masks (Linux).

Kept apart from sandbox.py and light to import: a worker spawns the helper first thing (`prestart_helper`), so
that the helper boots while the worker imports the rest; sandbox.py's `start_helper` then takes it and waits for
its handshake.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import socket
import subprocess
import sys
from pathlib import Path

from treemat.errors import ExecutionError

_HELPER = Path(__file__).with_name("sandboxd.py")
START_TIMEOUT_SECONDS = 30


class SandboxUnavailable(ExecutionError):
    """The kernel refused what the sandbox needs; the message names the feature."""


_prestarted: list[tuple[subprocess.Popen[bytes], socket.socket]] = []


def prestart_helper() -> None:
    """Start the helper now, without waiting for it (a worker's first step: it boots while the worker imports);
    the next start_helper takes it. A failure is left for start_helper to report."""
    if sys.platform == "linux" and not _prestarted:
        with contextlib.suppress(SandboxUnavailable):
            _prestarted.append(_spawn_helper())


def _spawn_helper() -> tuple[subprocess.Popen[bytes], socket.socket]:
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        helper = subprocess.Popen(
            [sys.executable, "-I", "-S", str(_HELPER), str(there.fileno())],
            pass_fds=[there.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=2,  # never the worker's fd 1 (Bazel's protocol pipe, when started before the worker moved it)
            close_fds=True,
        )
    except OSError as exc:
        here.close()
        raise SandboxUnavailable(f"cannot start the sandbox helper: {exc.strerror}") from None
    finally:
        there.close()
    return helper, here


def start_helper() -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start sandboxd.py and wait for it to be in its namespaces; SandboxUnavailable with the kernel's reason."""
    try:
        helper, here = _prestarted.pop()
    except IndexError:
        helper, here = _spawn_helper()
    here.settimeout(START_TIMEOUT_SECONDS)
    try:
        message = here.recv(65536)
    except OSError:
        message = b""
    here.settimeout(None)
    reply = marshal.loads(message) if message else {"error": "the sandbox helper exited at start"}
    if "error" in reply:
        here.close()
        helper.wait()
        raise SandboxUnavailable(str(reply["error"]))
    return helper, here


def hidden_paths(root: Path) -> list[str]:
    """Every path that reaches the treemat root (the root itself plus other mounts of the same directory).

    A filesystem can be mounted twice (or bind-mounted): a tool could reach the CAS through any of them, so
    each one is hidden in the tool's view.
    """
    real = os.path.realpath(root)
    aliases = [real]
    try:
        info = os.stat(real)
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return aliases
    device = f"{os.major(info.st_dev)}:{os.minor(info.st_dev)}"
    mounts = [line.split() for line in mountinfo.splitlines()]
    own = [fields for fields in mounts if len(fields) > 4 and real.startswith(fields[4].rstrip("/") + "/")]
    if not own:
        return aliases
    mount_point_of_root = max((fields[4] for fields in own), key=len)
    own_fields = next(fields for fields in own if fields[4] == mount_point_of_root)
    inside_fs = os.path.join(own_fields[3], os.path.relpath(real, mount_point_of_root))
    for fields in mounts:
        if len(fields) < 5 or fields[2] != device or fields[4] == mount_point_of_root:
            continue
        fs_root, mount_point = fields[3], fields[4]
        relative = os.path.relpath(inside_fs, fs_root)
        if relative == "." or not relative.startswith(".."):
            candidate = _decode_mountinfo(os.path.normpath(os.path.join(mount_point, relative)))
            if os.path.isdir(candidate) and candidate not in aliases:
                aliases.append(candidate)
    return aliases


def _decode_mountinfo(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path
