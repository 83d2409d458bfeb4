"""Input immutability for hardlinked exec dirs: the tool runs over an overlayfs in its own namespaces.

A hardlinked input *is* the CAS blob's inode: a tool running as the same user could `chmod u+w` it and write
through it. Where placement is copy-on-write (reflink, clonefile, btrfs snapshot) or a copy, the tool's files are
separate inodes and nothing needs doing. Where it is a hardlink, the tool runs like this:

    worker ── fork ─▶ child: unshare(user+mount) as the caller's own uid, then
                        - bind every path that reaches TREEMAT_ROOT read-only (the CAS, other exec dirs);
                        - mount an overlay on the exec dir: lower = the staged hardlinks, upper = a private dir,
                          so a chmod or a write copies the file up and never touches the CAS inode;
                        - keep the tool cache writable;
                      ── exec unshare(1) --user --mount --pid --fork --mount-proc ─▶ the tool
    The tool ends up in a nested user namespace: the mounts above are locked there (it cannot remount them
    writable or unmount them), it holds no capability over them, and its /proc shows only its own processes
    (so /proc/<pid>/root of a process outside cannot lead back to a writable CAS).

The declared outputs are then read from the overlay's upper dir. `probe()` tries the whole path once; if the
kernel refuses (no unprivileged user namespaces, no overlayfs), hardlinks are not used at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
UPPER_SUFFIX = ".upper"
WORK_SUFFIX = ".work"


@dataclass(frozen=True, slots=True)
class OverlayPlan:
    """Everything the child needs to set up the tool's view, computed before fork (no work in the child)."""

    exec_dir: str
    upper_dir: str
    work_dir: str
    readonly_paths: tuple[str, ...]
    writable_paths: tuple[str, ...]


class OverlaySandbox:
    """Runs tools over an overlay of their staged exec dir, with TREEMAT_ROOT read-only (see module doc)."""

    def __init__(self, root: Path, unshare_binary: str) -> None:
        self.root = Path(root)
        self.unshare_binary = unshare_binary
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._root_aliases = tuple(root_aliases(self.root))

    # ---------------------------------------------------------------------------------------- per action

    def plan(self, exec_dir: Path, writable: Sequence[Path]) -> OverlayPlan:
        """Prepare upper/work dirs beside `exec_dir`; the returned plan is what the child mounts."""
        upper, work = upper_dir(exec_dir), work_dir(exec_dir)
        upper.mkdir(mode=0o755)
        work.mkdir(mode=0o700)
        return OverlayPlan(
            exec_dir=str(exec_dir),
            upper_dir=str(upper),
            work_dir=str(work),
            readonly_paths=self._root_aliases,
            writable_paths=tuple(str(path) for path in writable if path.is_dir()),
        )

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The command that puts the tool in its nested user, mount and pid namespaces."""
        return [
            self.unshare_binary,
            "--user",
            "--map-current-user",
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--",
            *argv,
        ]

    def preexec(self, plan: OverlayPlan) -> Callable[[], None]:
        """The function the forked child runs before exec: namespaces and mounts (raises OSError on failure)."""
        libc = self._libc
        uid_map = f"{self._uid} {self._uid} 1".encode()
        gid_map = f"{self._gid} {self._gid} 1".encode()
        overlay_options = f"lowerdir={plan.exec_dir},upperdir={plan.upper_dir},workdir={plan.work_dir},userxattr"
        options = overlay_options.encode()
        exec_dir = plan.exec_dir.encode()
        readonly = [path.encode() for path in plan.readonly_paths]
        writable = [path.encode() for path in plan.writable_paths]

        def check(result: int, what: str) -> None:
            if result != 0:
                errno_value = ctypes.get_errno()
                raise OSError(errno_value, f"sandbox: {what}: {os.strerror(errno_value)}")

        def write_file(path: str, data: bytes) -> None:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)

        def setup() -> None:
            check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare(user, mount)")
            write_file("/proc/self/setgroups", b"deny")
            write_file("/proc/self/uid_map", uid_map)
            write_file("/proc/self/gid_map", gid_map)
            check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
            for path in readonly:
                check(libc.mount(path, path, None, MS_BIND | MS_REC, None), "bind the treemat root")
            check(libc.mount(b"overlay", exec_dir, b"overlay", MS_NOSUID | MS_NODEV, options), "mount the overlay")
            for path in writable:
                check(libc.mount(path, path, None, MS_BIND, None), "bind the tool cache")
            for path in readonly:
                flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
                check(libc.mount(None, path, None, flags, None), "make the treemat root read-only")
            os.chdir(exec_dir)  # subprocess chdir'd before the overlay existed: enter the merged view

        return setup


def upper_dir(exec_dir: Path) -> Path:
    """Where the tool's writes land (beside the exec dir, inside the same treemat root)."""
    return exec_dir.with_name(exec_dir.name + UPPER_SUFFIX)


def work_dir(exec_dir: Path) -> Path:
    """overlayfs's scratch directory for `exec_dir`."""
    return exec_dir.with_name(exec_dir.name + WORK_SUFFIX)


def root_aliases(root: Path) -> list[str]:
    """Every mount point path that reaches `root` (the root itself plus other mounts of the same directory).

    A filesystem can be mounted twice (or bind-mounted): a tool could reach the CAS through any of them, so
    each one is made read-only in the tool's view.
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
            candidate = os.path.normpath(os.path.join(mount_point, relative))
            if os.path.isdir(candidate) and candidate not in aliases:
                aliases.append(_decode_mountinfo(candidate))
    return aliases


def _decode_mountinfo(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


class SandboxProbe:
    """The whole sandbox path tried for real, in two halves: started here, judged by `result()`.

    Starting it forks the probe tool and returns; the tool (unshare, a shell, chmod, cat, namespace teardown:
    tens of milliseconds, all in child processes) then runs while the caller does other work, e.g. imports.
    No thread: the caller's own `result()` waits for it, so nothing can use the answer before it exists.
    """

    SCRIPT = "chmod u+w input && echo changed > input && echo out > output && cat input"
    TIMEOUT_SECONDS = 20

    def __init__(self, root: Path) -> None:
        self._failure: str | None = None
        self._sandbox: OverlaySandbox | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        binary = shutil.which("unshare")
        if binary is None:
            self._failure = "no unshare(1) on PATH (util-linux)"
            return
        try:
            self._sandbox = OverlaySandbox(root, binary)
        except OSError as exc:
            self._failure = f"cannot load libc: {exc}"
            return
        scratch = root / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix=".sandbox-probe-", dir=scratch)
        self._exec_dir = Path(self._tmp.name) / "exec"
        try:
            self._exec_dir.mkdir()
            (self._exec_dir / "input").write_bytes(b"pristine\n")
            os.chmod(self._exec_dir / "input", 0o444)
            plan = self._sandbox.plan(self._exec_dir, [])
            self._proc = subprocess.Popen(
                self._sandbox.wrap(["/bin/sh", "-c", self.SCRIPT]),
                cwd=self._exec_dir,
                preexec_fn=self._sandbox.preexec(plan),  # namespaces are entered in the child
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            self._failure = f"user+mount namespaces or overlayfs unavailable ({exc})"
            self._cleanup()
        except BaseException:
            self._cleanup()
            raise

    def result(self) -> tuple[OverlaySandbox | None, str]:
        """An OverlaySandbox if the whole path worked, else None and the reason; waits for the probe tool."""
        if self._failure is not None:
            return None, self._failure
        assert self._sandbox is not None and self._proc is not None
        try:
            try:
                stdout, stderr = self._proc.communicate(timeout=self.TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired as exc:
                self._proc.kill()
                self._proc.communicate()
                return None, f"user+mount namespaces or overlayfs unavailable ({exc})"
            pristine = (self._exec_dir / "input").read_bytes() == b"pristine\n"
            copied_up = (upper_dir(self._exec_dir) / "output").is_file() and stdout == b"changed\n"
        finally:
            self._cleanup()
        if self._proc.returncode != 0 or not pristine or not copied_up:
            detail = stderr.decode(errors="replace").strip().splitlines()
            last = detail[-1] if detail else ""
            return None, f"overlay sandbox did not behave (exit {self._proc.returncode}: {last})"
        return self._sandbox, "user+mount+pid namespaces over an overlayfs"

    def _cleanup(self) -> None:
        if self._tmp is None:
            return
        with contextlib.suppress(OSError):
            os.chmod(work_dir(self._exec_dir) / "work", 0o700)  # overlayfs leaves it 000
        self._tmp.cleanup()
        self._tmp = None


def probe(root: Path) -> tuple[OverlaySandbox | None, str]:
    """An OverlaySandbox if the whole path works here (tried for real), else None and the reason."""
    return SandboxProbe(root).result()
