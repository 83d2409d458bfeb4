"""The sandbox probe's verdict, kept per root and machine so that a fresh process need not probe again.

The probe (sandbox.py) runs a real tool twice-over in the sandbox (~30 ms of a fresh worker's start). Its verdict
depends only on facts about this machine and process: the kernel and this boot, the uid and gid, the user, mount
and pid namespaces, the mount that holds the root, the knobs that allow user namespaces, the interpreter and the
sandbox's own code. Those facts are the key; the verdict is kept next to it in `<root>/sandbox.verdict` (0600 in
the 0700 root). Fail closed: a file that is missing, unreadable, not ours, writable by others, malformed or keyed
by other facts is no verdict at all (the caller probes again); only a working mode is ever kept, and a kept mode
only ever chooses between two sandboxes (the helper still enters its namespaces at every start).
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from pathlib import Path

VERDICT_FORMAT = "treemat-sandbox-verdict-1"
VERDICT_FILE = "sandbox.verdict"
KEPT_MODES = ("overlay", "copy-on-write")
_CODE = ("sandbox.py", "sandboxd.py", "sandboxstart.py", "sandboxview.py", "sandboxverdict.py")
_KNOBS = (
    "/proc/sys/kernel/unprivileged_userns_clone",
    "/proc/sys/user/max_user_namespaces",
    "/proc/sys/user/max_mnt_namespaces",
    "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
)


def machine_key(root: Path, want: str) -> str:
    """A digest of every fact the probe's verdict for `want` depends on (see the module's docstring)."""
    from _blake2 import blake2b  # CPython's builtin: no hashlib/OpenSSL import at start-up

    facts = [VERDICT_FORMAT, want, " ".join(os.uname()), _read("/proc/sys/kernel/random/boot_id")]
    facts += [f"uid:{os.geteuid()}", f"gid:{os.getegid()}", f"exe:{sys.executable}", f"py:{sys.version}"]
    for name in ("user", "mnt", "pid"):
        try:
            info = os.stat(f"/proc/self/ns/{name}")
            facts.append(f"{name}:{info.st_dev}:{info.st_ino}")
        except OSError:
            facts.append(f"{name}:?")
    facts += [f"{knob}={_read(knob)}" for knob in _KNOBS]
    facts.append(f"mount:{root_mount(root)}")
    digest = blake2b(digest_size=16)
    for fact in facts:
        digest.update(fact.encode(errors="surrogateescape") + b"\0")
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _CODE:
        try:
            with open(os.path.join(here, name), "rb") as handle:
                digest.update(handle.read())
        except OSError:
            digest.update(b"missing:" + name.encode())
    return digest.hexdigest()


def root_mount(root: Path) -> str:
    """The mountinfo line of the mount that holds `root` (its filesystem, options and place), or '?'."""
    real = os.path.realpath(root)
    best, best_point = "?", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) < 5:
                continue
            point = fields[4]
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best_point):
                best, best_point = line, point
    return best


def kept_verdict(root: Path, key: str) -> str | None:
    """The mode kept for `key` in `root`, or None (no file, not ours, writable by others, malformed, other key)."""
    path = root / VERDICT_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            return None
        text = os.read(fd, 4096).decode("ascii", errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    lines = text.split("\n")
    if len(lines) != 4 or lines[0] != VERDICT_FORMAT or lines[1] != key or lines[3] != "":
        return None
    return lines[2] if lines[2] in KEPT_MODES else None


def usable_modes(want: str) -> tuple[str, ...]:
    """The kept modes that may stand for the probe of `want` (what the probe itself could have found)."""
    return {"auto": KEPT_MODES, "overlay": ("overlay",), "copy-on-write": ("copy-on-write",)}.get(want, ())


def keep_verdict(root: Path, key: str, mode: str) -> None:
    """Keep `mode` (a working one) for `key` in `root`, atomically; a failure to write only costs a probe later."""
    if mode not in KEPT_MODES:
        return
    temp = root / f".{VERDICT_FILE}.{os.getpid()}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{VERDICT_FORMAT}\n{key}\n{mode}\n".encode())
        finally:
            os.close(fd)
        os.rename(temp, root / VERDICT_FILE)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def forget_verdict(root: Path) -> None:
    """Drop the kept verdict (a tool start failed in a kept mode: the next process probes again)."""
    with contextlib.suppress(OSError):
        os.unlink(root / VERDICT_FILE)


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return "-"
