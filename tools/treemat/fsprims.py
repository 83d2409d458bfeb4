"""Filesystem primitives every other layer builds on: no policy, no treemat state, only the kernel.

- file modes: `blob_mode` (0o440 / 0o550), the bits every blob and every materialized input file carries;
- per file: FICLONE reflink, copy_file_range with a read/write fallback, macOS clonefile(2) through ctypes;
- whole trees: clonefile(2) of a directory, btrfs subvolume create / snapshot / delete / detection;
- tree upkeep: make directories writable or read-only, `remove_tree` (read-only trees, nested subvolumes);
- dead writers: sweep files no live process holds an flock on, sweep entries named after dead pids.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

StrPath = str | os.PathLike[str]

PLAIN_MODE = 0o440
EXEC_MODE = 0o550
BLOB_MTIME_NS = 946_684_800 * 1_000_000_000  # 2000-01-01T00:00:00Z: a blob whose mtime differs was written to
LEGACY_MODES = {False: 0o444, True: 0o555}  # what blobs carried before 0.1 (read for everyone): upgraded in place
UNSUPPORTED_ERRNOS = frozenset(
    {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EPERM, errno.ENOSYS, errno.ENOTTY}
)
_FICLONE = 0x40049409
_CLONE_NOFOLLOW = 0x0001
_BTRFS_SUPER_MAGIC = 0x9123683E
_BTRFS_IOC_SNAP_CREATE_V2 = 0x50009417
_BTRFS_IOC_SUBVOL_CREATE = 0x5000940E
_BTRFS_IOC_SNAP_DESTROY = 0x5000940F
_BTRFS_PATH_NAME_MAX = 4087
_CHUNK = 1 << 20


def blob_mode(executable: bool) -> int:
    """The permission bits every blob (and every materialized input file) carries."""
    return EXEC_MODE if executable else PLAIN_MODE


def file_kind(mode: int) -> str:
    """A word for a file type, for error messages."""
    for test, word in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return word
    return "regular file" if stat.S_ISREG(mode) else "special file"


# ---------------------------------------------------------------------------- one file, by descriptor


def reflink_fd(src_fd: int, dst_fd: int) -> None:
    """FICLONE: make dst share all of src's extents (copy-on-write); OSError where unsupported."""
    fcntl.ioctl(dst_fd, _FICLONE, src_fd)


def copy_fd(src_fd: int, dst_fd: int) -> None:
    """Copy all of src (from its start) into the empty dst.

    copy_file_range first (in-kernel; shares extents on xfs/btrfs); where it fails or stops short of the size
    src had, the rest is read and written from the offset it reached (to src's end), so a real error (ENOSPC,
    EIO) surfaces from the plain write.
    """
    size = os.fstat(src_fd).st_size
    os.lseek(src_fd, 0, os.SEEK_SET)
    copied = 0
    if hasattr(os, "copy_file_range"):  # Linux
        with contextlib.suppress(OSError):
            while copied < size and (step := os.copy_file_range(src_fd, dst_fd, size - copied)):
                copied += step
        if copied == size:
            return
    os.lseek(src_fd, copied, os.SEEK_SET)
    os.lseek(dst_fd, copied, os.SEEK_SET)
    os.ftruncate(dst_fd, copied)
    while chunk := os.read(src_fd, _CHUNK):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst_fd, view) :]


# ---------------------------------------------------------------------------- one file, by path


@contextlib.contextmanager
def new_file_from(src: StrPath, dst: StrPath, mode: int) -> Iterator[tuple[int, int]]:
    """Open src and a new dst (O_EXCL); yield (src_fd, dst_fd); chmod dst to `mode`, or remove it on error."""
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            yield src_fd, dst_fd
            os.fchmod(dst_fd, mode)
        except BaseException:
            os.close(dst_fd)
            os.unlink(dst)
            raise
        os.close(dst_fd)
    finally:
        os.close(src_fd)


def reflink(src: StrPath, dst: StrPath, mode: int) -> None:
    """A new file dst sharing src's extents (copy-on-write: writes to dst never reach src)."""
    with new_file_from(src, dst, mode) as (src_fd, dst_fd):
        reflink_fd(src_fd, dst_fd)


def copy(src: StrPath, dst: StrPath, mode: int) -> None:
    """A new file dst holding a copy of src's bytes (in-kernel where possible)."""
    with new_file_from(src, dst, mode) as (src_fd, dst_fd):
        copy_fd(src_fd, dst_fd)


def filesystem_type(path: StrPath) -> int | None:
    """statfs(2)'s f_type (the filesystem's magic number) for `path` on Linux; None elsewhere or on error.

    Through the process's own libc symbols (no subprocess, no library search: cheap enough for a store's start).
    """
    statfs = _statfs()
    if statfs is None:
        return None
    buf = ctypes.create_string_buffer(512)  # struct statfs is 120 bytes on 64-bit Linux; f_type comes first
    if statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


@functools.cache
def _statfs() -> Callable[..., int] | None:
    """The process's own libc's statfs on Linux, looked up once (a CDLL and its symbol per call cost ~50 us: a
    new execroot's watch asks for every directory it watches); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function: Callable[..., int] = ctypes.CDLL(None, use_errno=True).statfs
    except (OSError, AttributeError):
        return None
    return function


def is_btrfs(path: StrPath) -> bool:
    """True if `path` is on btrfs, by statfs (no subprocess); False where that cannot be told."""
    return filesystem_type(path) == _BTRFS_SUPER_MAGIC


def _libc() -> ctypes.CDLL | None:
    import ctypes.util  # macOS only: it imports subprocess, tempfile and shutil (2-4 ms of every start)

    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def clonefile(src: StrPath, dst: StrPath) -> None:
    """macOS clonefile(2): copy-on-write clone of a file or a whole directory tree in one call."""
    if sys.platform != "darwin":
        raise OSError(errno.ENOTSUP, "clonefile(2) exists only on macOS", str(dst))
    libc = _libc()
    if libc is None:
        raise OSError(errno.ENOSYS, "libc not found", str(dst))
    result = libc.clonefile(os.fsencode(src), os.fsencode(dst), ctypes.c_int(_CLONE_NOFOLLOW))
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(dst))


# ---------------------------------------------------------------------------- whole trees


def _vol_args_v2(fd: int, name: str) -> bytes:
    """struct btrfs_ioctl_vol_args_v2: fd, transid, flags, unused[4], name[BTRFS_SUBVOL_NAME_MAX + 1]."""
    encoded = os.fsencode(name)
    if len(encoded) > _BTRFS_PATH_NAME_MAX - 32:
        raise OSError(errno.ENAMETOOLONG, "subvolume name too long", name)
    header = fd.to_bytes(8, sys.byteorder, signed=True) + bytes(8) + bytes(8) + bytes(32)
    return header + encoded.ljust(4040, b"\0")


def _vol_args(fd: int, name: str) -> bytes:
    """struct btrfs_ioctl_vol_args: fd, name[BTRFS_PATH_NAME_MAX + 1]."""
    return fd.to_bytes(8, sys.byteorder, signed=True) + os.fsencode(name).ljust(_BTRFS_PATH_NAME_MAX + 1, b"\0")


def _ioctl_on_parent(path: Path, request: int, args: bytes) -> None:
    """A btrfs subvolume ioctl: issued on `path`'s parent directory, naming `path` in `args`."""
    parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(parent_fd, request, bytearray(args))
    finally:
        os.close(parent_fd)


def create_subvolume(path: Path) -> None:
    """Create an empty btrfs subvolume at `path` (which must not exist)."""
    _ioctl_on_parent(path, _BTRFS_IOC_SUBVOL_CREATE, _vol_args(0, path.name))


def snapshot_subvolume(src: Path, dst: Path) -> None:
    """Writable O(1) snapshot of subvolume `src` at `dst` (which must not exist; same btrfs filesystem)."""
    src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _ioctl_on_parent(dst, _BTRFS_IOC_SNAP_CREATE_V2, _vol_args_v2(src_fd, dst.name))
    finally:
        os.close(src_fd)


def delete_subvolume(path: Path) -> None:
    """Delete btrfs subvolume `path` and everything in it."""
    _ioctl_on_parent(path, _BTRFS_IOC_SNAP_DESTROY, _vol_args(0, path.name))


def is_subvolume(path: Path) -> bool:
    """btrfs subvolume roots have inode number 256."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_ino == 256


def clone_tree(src_dir: Path, dst_dir: Path) -> bool:
    """Materialize a whole directory in one kernel call when the platform allows; False if it can't.

    macOS: clonefile(2) of the directory. btrfs: snapshot when src_dir is a subvolume. The clone keeps the
    source's (read-only) modes; callers make directories writable afterwards with make_dirs_writable.
    """
    try:
        if sys.platform == "darwin":
            clonefile(src_dir, dst_dir)
            return True
        if is_subvolume(src_dir):
            snapshot_subvolume(src_dir, dst_dir)
            return True
    except OSError as exc:
        if exc.errno in UNSUPPORTED_ERRNOS or exc.errno == errno.ENOTDIR:
            return False
        raise
    return False


def make_dirs_writable(root: Path) -> int:
    """chmod 0o755 every directory under (and including) root — never files: they may be shared inodes."""
    count = 0
    for dirpath, _dirnames, _files in os.walk(root):
        os.chmod(dirpath, 0o755)
        count += 1
    return count


def make_tree_readonly(root: Path) -> None:
    """Directories 0o555 (files already carry 0o440/0o550), bottom-up so the walk can still descend."""
    for dirpath, _dirnames, _files in os.walk(root, topdown=False):
        os.chmod(dirpath, 0o555)


def remove_tree(path: Path) -> None:
    """rm -rf for read-only trees, deleting btrfs subvolumes found inside (snapshots of cached subtrees)."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    try:
        _remove_tree_recursively(path)
    except RecursionError:  # a tree nested deeper than the walk recurses (a tool's, left in its exec dir)
        remove_deep_tree(path)


def remove_deep_tree(path: Path) -> None:
    """rm -rf of a tree of any depth, without recursion: one descriptor at a time, a stack of names."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    fd = os.open(path, flags)
    names: list[str] = []
    try:
        while True:
            child = None
            for name in os.listdir(fd):
                if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    child = name
                    break
                os.unlink(name, dir_fd=fd)
            if child is not None:
                with contextlib.suppress(OSError):
                    os.chmod(child, 0o700, dir_fd=fd)  # a mode-000 dir of a tool's
                inner = os.open(child, flags, dir_fd=fd)
                os.close(fd)
                fd = inner
                names.append(child)
            elif names:
                parent = os.open("..", flags, dir_fd=fd)
                os.close(fd)
                fd = parent
                os.rmdir(names.pop(), dir_fd=fd)
            else:
                break
    finally:
        os.close(fd)
    os.rmdir(path)


def _remove_tree_recursively(path: Path) -> None:
    for dirpath, dirnames, _files in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o755)
        for name in list(dirnames):
            child = Path(dirpath) / name
            if child.is_symlink():
                continue  # os.walk does not enter it; rmtree unlinks it
            with contextlib.suppress(OSError):  # before os.walk lists it: a mode-000 dir (overlayfs's
                os.chmod(child, 0o755)  # work/work, a tool's) is removable as non-root
            if is_subvolume(child):
                make_dirs_writable(child)
                try:
                    delete_subvolume(child)
                    dirnames.remove(name)
                except OSError:
                    pass  # not deletable as a subvolume: rmtree below handles it (or reports)
    if is_subvolume(path):
        with contextlib.suppress(OSError):
            delete_subvolume(path)
            return
    shutil.rmtree(path)


# ---------------------------------------------------------------------------- dead writers


def pid_alive(pid: int) -> bool:
    """True if a process `pid` exists (even one we may not signal) and is no zombie: a killed stager service left
    to an init that reaps late (or never) is dead, and its exec dirs are swept by the service that replaces it."""
    # no procfs (macOS): the kernel's answer alone
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/stat", "rb") as handle:
        if handle.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_unlocked_files(directory: Path, *, grace_ns: int, wanted: Callable[[str], bool]) -> int:
    """Remove the files in `directory` whose writer died: no flock held, ctime older than `grace_ns`.

    Writers hold an exclusive flock on their file for its whole life; the grace period covers the instant
    between creating a file and locking it. Only names `wanted` accepts are considered. Returns how many.
    """
    removed = 0
    now = time.time_ns()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if not wanted(entry.name):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if now - os.fstat(fd).st_ctime_ns < grace_ns:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer holds it
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
        finally:
            os.close(fd)
    return removed


def sweep_dead_owners(base: Path) -> int:
    """Remove the entries of `base` named `<pid>-...` (or `.trash-<pid>-...`) whose process is gone."""
    removed = 0
    for entry in base.iterdir():
        pid_text = entry.name.removeprefix(".trash-").split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not pid_alive(int(pid_text)):
            with contextlib.suppress(OSError):
                remove_tree(entry)
                removed += 1
    return removed
