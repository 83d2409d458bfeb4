"""Kernel paths for placing files and whole trees, and a probe that picks the fastest one that works.

Per file: APFS clonefile(2) (macOS), FICLONE reflink (Linux xfs/btrfs), hardlink (same filesystem), copy.
Whole trees: one clonefile(2) call on a directory (macOS) or one btrfs subvolume snapshot (Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import errno
import fcntl
import os
import shutil
import stat
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from treemat.cas import blob_mode

_FICLONE = 0x40049409
_CLONE_NOFOLLOW = 0x0001
_BTRFS_SUPER_MAGIC = 0x9123683E
_BTRFS_IOC_SNAP_CREATE_V2 = 0x50009417
_BTRFS_IOC_SUBVOL_CREATE = 0x5000940E
_BTRFS_IOC_SNAP_DESTROY = 0x5000940F
_BTRFS_VOL_NAME_MAX = 255
_BTRFS_PATH_NAME_MAX = 4087
_UNSUPPORTED = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EPERM, errno.ENOSYS, errno.ENOTTY}


class Method(enum.Enum):
    """How one file gets from the CAS into an exec dir, fastest first."""

    CLONEFILE = "clonefile"
    REFLINK = "reflink"
    HARDLINK = "hardlink"
    COPY = "copy"


StrPath = str | os.PathLike[str]

DEFAULT_ORDER = (Method.CLONEFILE, Method.REFLINK, Method.HARDLINK, Method.COPY)


def _libc() -> ctypes.CDLL | None:
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


@contextlib.contextmanager
def _new_file_from(src: StrPath, dst: StrPath, mode: int) -> Iterator[tuple[int, int]]:
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
    """FICLONE: share src's extents in a new file dst (copy-on-write; writes to dst never reach src)."""
    with _new_file_from(src, dst, mode) as (src_fd, dst_fd):
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)


def copy(src: StrPath, dst: StrPath, mode: int) -> None:
    """Byte copy into a new file (in-kernel where possible)."""
    with _new_file_from(src, dst, mode) as (src_fd, dst_fd):
        size = os.fstat(src_fd).st_size
        copied = 0
        if hasattr(os, "copy_file_range"):
            with contextlib.suppress(OSError):
                while copied < size:
                    step = os.copy_file_range(src_fd, dst_fd, size - copied)
                    if not step:
                        break
                    copied += step
        if copied < size:
            os.lseek(src_fd, copied, os.SEEK_SET)
            os.lseek(dst_fd, copied, os.SEEK_SET)
            while chunk := os.read(src_fd, 1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst_fd, view) :]


def place_file(method: Method, src: StrPath, dst: StrPath, *, executable: bool) -> None:
    """Create dst (which must not exist) with src's content and mode 0o444/0o555 using `method`."""
    mode = blob_mode(executable)
    if method is Method.HARDLINK:
        os.link(src, dst)  # the CAS blob already carries the right mode
    elif method is Method.REFLINK:
        reflink(src, dst, mode)
    elif method is Method.CLONEFILE:
        clonefile(src, dst)  # keeps the blob's mode
    else:
        copy(src, dst, mode)


class BackendProbe:
    """Which methods work between two filesystems, learnt once per (src st_dev, dst st_dev) by trying them.

    With `measure=True` the working methods are also timed there (placing a few 64 KiB files each) and
    ordered cheapest first, copy always last: the choice is the measurement, not a fixed rank.
    """

    def __init__(self, prefer: Sequence[Method] | None = None, *, measure: bool = False) -> None:
        self.order: tuple[Method, ...] = tuple(prefer) if prefer else DEFAULT_ORDER
        if Method.COPY not in self.order:
            self.order = (*self.order, Method.COPY)
        self.measure = measure
        self.timings: dict[str, dict[str, float]] = {}  # "src_dev:dst_dev" -> method -> µs per file
        self._cache: dict[tuple[int, int], list[Method]] = {}
        self._lock = threading.Lock()

    def methods_for(self, src_dir: Path, dst_dir: Path) -> list[Method]:
        """Usable methods from files in src_dir to files in dst_dir, in preference order (COPY always last)."""
        key = (os.stat(src_dir).st_dev, os.stat(dst_dir).st_dev)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        usable = [m for m in self.order if m is Method.COPY or _try_method(m, src_dir, dst_dir)]
        if self.measure and len(usable) > 2:
            costs = {m: _time_method(m, src_dir, dst_dir) for m in usable if m is not Method.COPY}
            usable = [*sorted(costs, key=lambda m: costs[m]), Method.COPY]
            with self._lock:
                self.timings[f"{key[0]}:{key[1]}"] = {m.value: round(c * 1e6, 1) for m, c in costs.items()}
        with self._lock:
            self._cache[key] = usable
        return usable


def _time_method(method: Method, src_dir: Path, dst_dir: Path, files: int = 16) -> float:
    """Median seconds per file to place a 64 KiB file with `method` from src_dir into dst_dir."""
    token = f".treemat-time-{os.getpid()}-{threading.get_ident()}"
    src = src_dir / token
    scratch = dst_dir / (token + ".d")
    samples: list[float] = []
    try:
        src.write_bytes(os.urandom(64 << 10))
        os.chmod(src, blob_mode(False))
        scratch.mkdir()
        for index in range(files):
            started = time.perf_counter()
            place_file(method, src, scratch / str(index), executable=False)
            samples.append(time.perf_counter() - started)
    except OSError:
        return float("inf")
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)
        with contextlib.suppress(OSError):
            src.unlink()
    return statistics.median(samples)


def _try_method(method: Method, src_dir: Path, dst_dir: Path) -> bool:
    token = f".treemat-probe-{os.getpid()}-{threading.get_ident()}"
    src, dst = src_dir / token, dst_dir / (token + ".out")
    try:
        src.write_bytes(b"treemat probe\n")
        os.chmod(src, 0o444)
        place_file(method, src, dst, executable=False)
        return dst.read_bytes() == b"treemat probe\n"
    except OSError:
        return False
    finally:
        for path in (dst, src):
            with contextlib.suppress(OSError):
                path.unlink()


# ---------------------------------------------------------------------------- whole trees


def is_btrfs(path: Path) -> bool:
    """True if `path` lives on btrfs (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        out = subprocess.run(["stat", "-f", "-c", "%t", str(path)], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return int(out.stdout.strip() or "0", 16) == _BTRFS_SUPER_MAGIC


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


def create_subvolume(path: Path) -> None:
    """Create an empty btrfs subvolume at `path` (which must not exist)."""
    parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(parent_fd, _BTRFS_IOC_SUBVOL_CREATE, bytearray(_vol_args(0, path.name)))
    finally:
        os.close(parent_fd)


def snapshot_subvolume(src: Path, dst: Path) -> None:
    """Writable O(1) snapshot of subvolume `src` at `dst` (which must not exist; same btrfs filesystem)."""
    src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent_fd = os.open(dst.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(parent_fd, _BTRFS_IOC_SNAP_CREATE_V2, bytearray(_vol_args_v2(src_fd, dst.name)))
        finally:
            os.close(parent_fd)
    finally:
        os.close(src_fd)


def delete_subvolume(path: Path) -> None:
    """Delete btrfs subvolume `path` and everything in it."""
    parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(parent_fd, _BTRFS_IOC_SNAP_DESTROY, bytearray(_vol_args(0, path.name)))
    finally:
        os.close(parent_fd)


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
        if exc.errno in _UNSUPPORTED or exc.errno == errno.ENOTDIR:
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
    """Directories 0o555 (files already carry 0o444/0o555), bottom-up so the walk can still descend."""
    for dirpath, _dirnames, _files in os.walk(root, topdown=False):
        os.chmod(dirpath, 0o555)


def remove_tree(path: Path) -> None:
    """rm -rf for read-only trees, deleting btrfs subvolumes found inside (snapshots of cached subtrees)."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    for dirpath, dirnames, _files in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o755)
        for name in list(dirnames):
            child = Path(dirpath) / name
            if is_subvolume(child) and not (Path(dirpath) / name).is_symlink():
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
