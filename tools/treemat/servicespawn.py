"""Starting the root's stager service (service.py) for a relay (relay.py) that found none.

Two ways, the first where it can be had:

- **forked**: the relay forks itself; the child detaches (new session, a second fork, fds 0-2 to /dev/null and
  the service's log, every other descriptor closed) and becomes the service in place, through the `serve_here`
  callable that the composition root (`__main__`) hands down. No second interpreter starts and nothing the relay
  imported is imported again. Only while the relay runs a single thread (its first connect): a fork of a
  process with threads could inherit a lock held by one of them.
- **spawned**: `python -S -m treemat --service ...` (a relay whose service died while it relayed).

Either way the service imports its modules from a copy of the package keyed by its content hash, made once per
user in the user's cache (so its compiled modules are shared by every root of the user; the root's `service/`
when that cache cannot be used): `bazel clean` deletes the runfiles of the relay that started it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import threading
import time
from pathlib import Path

from treemat.errors import CasError
from treemat.layout import Root, check_private_dir, check_trusted_path
from treemat.locking import LockBusy, file_lock
from treemat.serviceid import ServeHere, ServiceUnavailable, own_package_hash, package_hash, wait_seconds

STALE_COPY_DAYS = 14  # a package copy no service started from for this long is removed when another is made
LEFTOVER_SECONDS = 600.0  # a temp dir of a copy this old is a killed relay's (an older version copies unlocked)
PROCESS_NAME = "treemat-service"  # /proc/PID/comm of every service (at most 15 bytes)
OLD_BYTECODE_DIR = "pycache"  # the user cache's path-keyed compiled modules of versions before bytecode.py


def name_process(name: str) -> None:
    """What `ps`, `top` and /proc/PID/comm show (a service forked from a relay keeps the relay's command line)."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name)


def package_copy(layout: Root, version: str) -> str:
    """The directory holding this version's copy of the treemat package (made once, atomically)."""
    for wanted in layout.service_package_parents():
        with contextlib.suppress(OSError, CasError, LockBusy):  # not ours alone (its modules would run), held: the next
            _make_private(wanted)
            parent = check_trusted_path(wanted)  # by its real path from now on: no symlink above it is followed again
            check_private_dir(parent)
            with file_lock(parent / ".lock", timeout=wait_seconds()):  # one relay checks, replaces, removes at a time
                made = _copy_into(parent, f"pkg-{version}")
                old_bytecode = parent.parent / OLD_BYTECODE_DIR
                if parent.name == "service-packages" and os.path.lexists(old_bytecode):  # the user cache's
                    with contextlib.suppress(OSError):
                        _remove(old_bytecode)
                return made
    raise ServiceUnavailable("no directory of ours to copy the treemat package into")


def _make_private(directory: Path) -> None:
    """mkdir -p, each directory made 0700 (Path.mkdir makes the parents with the umask's mode: 0775 under 002)."""
    missing: list[Path] = []
    while not os.path.lexists(directory) and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)


def _copy_into(parent: Path, name: str) -> str:
    target = parent / name
    for leftover in [*parent.glob(".pkg-*"), *parent.glob(".old-*")]:  # of a relay killed while it copied
        with contextlib.suppress(OSError):
            if leftover.lstat().st_mtime < time.time() - LEFTOVER_SECONDS:  # (not one an older version copies now)
                _remove(leftover)
    if os.path.lexists(target):
        if not target.is_symlink() and target.is_dir() and _same_modules(str(target / "treemat")):
            with contextlib.suppress(OSError):
                os.utime(target)  # in use: not stale
            return str(target)
        _remove(target)  # a copy cut short, emptied or edited, a symlink: its modules are not this version's
    import shutil  # here, not above: a relay starting a service from a good copy needs neither (~3 ms)
    import tempfile

    temp = tempfile.mkdtemp(prefix=".pkg-", dir=parent)
    package = os.path.dirname(os.path.abspath(__file__))
    try:
        shutil.copytree(package, os.path.join(temp, "treemat"), ignore=shutil.ignore_patterns("__pycache__"))
        for folder, _dirs, files in os.walk(temp):  # the package's modes (0664 under umask 002): ours alone
            for path in (folder, *(os.path.join(folder, name) for name in files)):
                os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) & ~0o022)
        os.rename(temp, target)
    except OSError:
        shutil.rmtree(temp, ignore_errors=True)
        raise  # a full disk, say: the next place is tried
    cutoff = time.time() - STALE_COPY_DAYS * 86400
    for old in parent.glob("pkg-*"):
        with contextlib.suppress(OSError):
            if old != target and old.lstat().st_mtime < cutoff:
                _remove(old)
    return str(target)


def _same_modules(copy: str) -> bool:
    """The copy holds this version's modules, in files and dirs only we can change: ours, written by no one else,
    no symlink and no file with another link (whoever holds a link to a module could edit it after this check)."""
    try:
        for folder, dirs, files in os.walk(copy):
            for name in (folder, *(os.path.join(folder, entry) for entry in (*dirs, *files))):
                info = os.lstat(name)
                if not (stat.S_ISDIR(info.st_mode) or (stat.S_ISREG(info.st_mode) and info.st_nlink == 1)):
                    return False
                if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                    return False
        return package_hash(copy) == own_package_hash()
    except OSError:
        return False


def _remove(entry: Path) -> None:
    """Renamed aside first, then deleted: a removal cut short never leaves part of a copy under a `pkg-` name."""
    import shutil

    aside = entry if entry.name.startswith(".") else entry.with_name(f".old-{entry.name}")
    os.rename(entry, aside)
    if aside.is_symlink() or not aside.is_dir():
        aside.unlink()
    else:
        shutil.rmtree(aside, ignore_errors=True)


SERVED_FROM_SITE = ("google.protobuf", "inotify_simple") if sys.platform == "linux" else ("google.protobuf",)


def add_site_packages(*, pth_files: bool = True) -> None:
    """Make the site-packages importable now if the interpreter started without `site` (`-S`, as treemat's
    launcher starts a relay, whose start `site` can double): what follows needs protobuf (and click).

    `pth_files=False` (a service, an in-process worker): only the directories `site` would add, their .pth files
    not run. Those hold whatever other software hooks into every interpreter (an editable install's finder, a CA
    bundle patch: 10 ms of a service's start on a test machine) and the stager imports nothing through them;
    where protobuf or inotify_simple is then not found (installed through a .pth file), `site` runs in full."""
    if not sys.flags.no_site:
        return
    import site

    if site.ENABLE_USER_SITE is not None:  # site.main() ran already (it decides this first)
        return
    if not pth_files and not _in_venv():
        directories = site.getsitepackages()
        if site.check_enableusersite():
            directories.insert(0, site.getusersitepackages())  # the user's site first, as site.main() orders them
        sys.path.extend(d for d in directories if d not in sys.path and os.path.isdir(d))
        if all(_found(name) for name in SERVED_FROM_SITE):
            return
    site.main()


def _in_venv() -> bool:
    """A venv's interpreter (pyvenv.cfg next to or above it, as site.venv() looks): until site.main() reads that
    file, sys.prefix is the base install's, so getsitepackages() names its site-packages, not the venv's, and a
    user site the venv leaves out; `site` then runs in full."""
    launcher = os.environ.get("__PYVENV_LAUNCHER__") if sys.platform == "darwin" else None
    exe_dir = os.path.dirname(os.path.abspath(launcher or sys.executable))
    return any(os.path.isfile(os.path.join(d, "pyvenv.cfg")) for d in (exe_dir, os.path.dirname(exe_dir)))


def _found(name: str) -> bool:
    """Whether a module is found on sys.path; find_spec raises (not None) where its parent package is not found
    (`google` of google.protobuf installed through a .pth file)."""
    from importlib.util import find_spec

    try:
        return find_spec(name) is not None
    except ImportError:
        return False


def start_service(
    layout: Root, name: str, version: str, isolation: str, idle_minutes: float, serve_here: ServeHere | None
) -> None:
    """Start the service (detached) and wait until it listens or fails; ServiceUnavailable with its reason."""
    package_parent = package_copy(layout, version)
    args = [f"--root={layout.path}", f"--name={name}", f"--isolation={isolation}", f"--idle-minutes={idle_minutes}"]
    log = layout.service_file(name, "log")
    read_end, write_end = os.pipe()
    try:
        if serve_here is not None and threading.active_count() == 1:
            _fork(package_parent, args, log, read_end, write_end, serve_here)
        else:
            _spawn(package_parent, args, log, write_end)
        os.close(write_end)
        write_end = -1
        ready = read_until_closed(read_end, wait_seconds(), log)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if not ready.startswith(b"ok"):
        reason = ready.decode(errors="replace").strip() or f"it exited; see {log}"
        raise ServiceUnavailable(f"the service did not start: {reason}")


def read_until_closed(fd: int, seconds: float, log: Path) -> bytes:
    """What the service writes on its start-up pipe until it closes it; ServiceUnavailable past `seconds` (the
    relay then serves in-process instead of waiting on a service that never comes)."""
    import select

    deadline = time.monotonic() + seconds
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServiceUnavailable(f"the service did not start within {seconds:g} s; see {log}")
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def _spawn(package_parent: str, args: list[str], log: Path, write_end: int) -> None:
    """`python -S -m treemat --service`: its path the package's copy, then this relay's path as `site` made it
    (no .pth file runs again), the directories that exist, never the cwd (Bazel's execroot, first with -m)."""
    import subprocess

    add_site_packages(pth_files=False)  # it imports protobuf from there; it gets this process's sys.path (no .pth)
    path = [package_parent] + [entry for entry in sys.path if entry != os.getcwd() and os.path.isdir(entry)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(path))}
    with open(log, "ab") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-S", "-m", "treemat", "--service", *args, f"--ready-fd={write_end}"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(write_end,),
            start_new_session=True,
            cwd="/",
        )
    try:
        child.wait(wait_seconds())  # the service forks itself away at once: this reaps the first process
    except subprocess.TimeoutExpired:
        raise ServiceUnavailable(f"the service did not start within {wait_seconds():g} s") from None


def _fork(
    package_parent: str, args: list[str], log: Path, read_end: int, write_end: int, serve_here: ServeHere
) -> None:
    """Fork; the grandchild becomes the service and never returns here (os._exit)."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)  # the child exits as soon as it forked the service: no child of any relay
        return
    status, pipe = 1, os.fstat(write_end).st_ino
    try:
        os.close(read_end)
        os.setsid()
        if os.fork():
            os._exit(0)
        relay_cwd = os.getcwd()
        _detach(log, keep=write_end)
        _import_from_copy(package_parent, relay_cwd)
        status = serve_here([*args, f"--ready-fd={write_end}"])
    except BaseException as exc:  # a line in the log, and the reason the relay gives (it reads no "ok")
        with contextlib.suppress(Exception):
            print(f"treemat service: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            if os.fstat(write_end).st_ino == pipe:  # not yet closed by the service's ready (nor the number reused)
                os.write(write_end, f"{type(exc).__name__}: {exc}".encode(errors="replace"))
    finally:
        os._exit(status)


def _detach(log: Path, *, keep: int) -> None:
    """stdin from /dev/null, stdout and stderr to the log, the cwd /, and no other inherited descriptor (the
    relay's pipes to Bazel and the service lock's flock above all)."""
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 20)
    os.chdir("/")
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the relay's buffers stay unflushed
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def _import_from_copy(package_parent: str, relay_cwd: str) -> None:
    """Every treemat module imported from now on comes from the package's copy (what the relay imported stays);
    nothing from the relay's cwd (Bazel's execroot, first on the path with -m)."""
    import treemat

    treemat.__path__[:] = [os.path.join(package_parent, "treemat")]
    kept = [entry for entry in sys.path if entry not in ("", relay_cwd) and os.path.isdir(entry)]
    sys.path[:] = [package_parent, *kept]
