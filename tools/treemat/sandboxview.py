"""The tool's side of the sandbox (Linux, stdlib only): the syscalls, the view a tool sees, and its init.

Imported by sandboxd.py (the helper program, which never imports the rest of treemat); sandboxd.py's doc has the
design. Each tool's namespace is made in two steps: `prepare_view` (everything that does not depend on the request:
done by a spare namespace while the helper waits for work) and `finish_view` (the exec dir and the tool cache
of one request), then `run_init` starts the tool as pid 2 and is its namespace's init.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import marshal
import os
import signal
import socket
import sys

TYPE_CHECKING = False  # (typing costs the helper 3 ms to import)
if TYPE_CHECKING:
    from typing import Any

EXEC_ROOT = "/tmp/treemat/exec"
TOOL_CACHE = "/tmp/treemat/cache"
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x08000000, 0x10000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE, MS_SLAVE = 0x20, 0x1000, 0x4000, 0x40000, 0x80000
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = -100, 0x8000, 0x1, 0x2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 28, 38, 47
PR_SET_DUMPABLE, PR_CAP_AMBIENT_CLEAR_ALL = 4, 4
# NOROOT, NO_SETUID_FIXUP and NO_CAP_AMBIENT_RAISE, each locked; KEEP_CAPS off and locked
SECUREBITS_NO_PRIVILEGE = 0xEF
LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYSCALLS = {  # (clone, mount_setattr, capset, open_tree) per architecture: the interpreter's (uname follows the
    "x86_64": (56, 442, 126, 428),  # personality: under `setarch i686` it says i686, and no number was known)
    "aarch64": (220, 442, 91, 428),
}
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC, AT_EMPTY_PATH = 0x1, 0o2000000, 0x1000
MAX_MESSAGE = 1 << 20


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class SandboxSetupError(Exception):
    """A namespace or mount step failed; the message names the step and the kernel feature behind it."""


class Kernel:
    """The syscalls the sandbox needs, through libc (ctypes)."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        machine = getattr(sys.implementation, "_multiarch", "").partition("-")[0]  # x86_64-linux-gnu
        self.numbers = _SYSCALLS.get(machine or os.uname().machine)

    def _check(self, result: int, what: str) -> None:
        if result < 0 or (result != 0 and what not in ("clone", "open_tree")):
            code = ctypes.get_errno()
            raise SandboxSetupError(f"{what}: {os.strerror(code)}{_hint(what, code)}")

    def unshare(self, flags: int, what: str) -> None:
        self._check(self.libc.unshare(flags), what)

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        self._check(
            self.libc.mount(
                source.encode() if source else None,
                target.encode(),
                fstype.encode() if fstype else None,
                flags,
                data.encode() if data else None,
            ),
            f"mount {fstype or 'bind'} on {target}",
        )

    def set_mount_attrs(self, path: str, *, set_bits: int = 0, clear_bits: int = 0, recursive: bool) -> bool:
        """mount_setattr(2); False where the kernel lacks it (before 5.12), so the caller remounts one by one."""
        if self.numbers is None:
            return False
        attrs = _MountAttr(set_bits, clear_bits, 0, 0)
        flags = AT_RECURSIVE if recursive else 0
        result = self.libc.syscall(
            self.numbers[1], AT_FDCWD, path.encode(), flags, ctypes.byref(attrs), ctypes.sizeof(attrs)
        )
        if result != 0 and ctypes.get_errno() == errno.ENOSYS:
            return False
        self._check(int(result), f"mount_setattr {path}")
        return True

    def detached_copy(self, fd: int) -> int:
        """open_tree(OPEN_TREE_CLONE): a mount of its own whose root is the directory `fd`, in no namespace: an
        overlay made in another mount namespace may take it as a layer (Linux >= 6.15); -1 where unknown."""
        if self.numbers is None:
            return -1
        result = int(self.libc.syscall(self.numbers[3], fd, b"", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH))
        self._check(result, "open_tree")
        return result

    def clone(self, flags: int) -> int:
        """clone(2) with `flags` into a child that goes on like fork()'s; -1 where the raw syscall is unknown."""
        if self.numbers is None:
            return -1
        pid = int(self.libc.syscall(self.numbers[0], flags | signal.SIGCHLD, 0, 0, 0, 0))
        self._check(pid, "clone")
        return pid

    def prctl(self, option: int, arg: int, what: str) -> None:
        self._check(self.libc.prctl(option, arg, 0, 0, 0), what)

    def lock_privileges(self) -> None:
        """Once, in the helper: no capability can be gained by any later exec, in any namespace, whatever the uid
        (root included): an empty bounding set, no ambient set, securebits locked, no_new_privs. Every process
        the helper clones inherits all four; the capabilities it holds now (to mount) are not touched."""
        last = int(_read("/proc/sys/kernel/cap_last_cap") or "40")
        for cap in range(last + 1):
            self.prctl(PR_CAPBSET_DROP, cap, "drop the capability bounding set")
        self.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")
        self.prctl(PR_SET_SECUREBITS, SECUREBITS_NO_PRIVILEGE, "set securebits")
        self.prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")

    def drop_capabilities(self) -> None:
        """Per tool, in its init once the view is built: no effective, permitted or inheritable capability left
        (with lock_privileges: none now or after exec)."""
        header, data = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
        capset = self.numbers[2] if self.numbers else 126
        self._check(int(self.libc.syscall(capset, ctypes.byref(header), ctypes.byref(data))), "capset")


def _hint(what: str, code: int) -> str:
    if what.startswith("unshare") and code in (errno.EPERM, errno.EACCES, errno.EINVAL):
        return (
            " (unprivileged user namespaces are disabled here: sysctl kernel.unprivileged_userns_clone, "
            "user.max_user_namespaces or an AppArmor/SELinux policy)"
        )
    if code == errno.ENOSPC and (what.startswith("unshare") or what == "clone"):
        return " (a namespace limit is reached: user.max_user_namespaces / max_mnt_namespaces / max_pid_namespaces)"
    if "overlay" in what and code in (errno.ENODEV, errno.EINVAL, errno.EPERM):
        return " (overlayfs in a user namespace needs Linux >= 5.11)"
    return ""


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _write(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def enter_namespaces(kernel: Kernel) -> None:
    """Once, in the helper: a user namespace (mapped to our own ids) and a private mount namespace."""
    uid, gid = os.getuid(), os.getgid()
    kernel.unshare(CLONE_NEWUSER | CLONE_NEWNS, "unshare(user, mount)")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    # a slave of the host's mounts: a filesystem mounted later (where a later exec dir lives) shows up here too
    kernel.mount(None, "/", None, MS_REC | MS_SLAVE)


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _mount_table() -> list[str]:
    points = []
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.append(fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\"))
    return points


def open_dirs(plan: dict[str, Any]) -> dict[str, int]:
    """Open the plan's directories in the tool's mount namespace (a bind mount takes only a source of its own
    namespace), each checked to be the very (device, inode) the client prepared: a path swapped in is refused."""
    fds: dict[str, int] = {}
    try:
        for name, (path, device, inode) in plan["dirs"].items():
            fds[name] = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            info = os.fstat(fds[name])
            if (info.st_dev, info.st_ino) != (device, inode):
                raise SandboxSetupError(f"{path} was replaced while the sandbox was set up")
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def prepare_view(kernel: Kernel, key: dict[str, Any], masked: dict[str, int]) -> int:
    """In a new mount namespace, before any request: all of the view but the exec dir and the tool cache (see
    sandboxd.py); `key` holds what it depends on (exec mode, masks, tmp size). Returns a descriptor of the
    layers' directory (the only way to it: run_init closes it); `masked` gets the masks made."""
    kernel.mount(None, "/", None, MS_REC | MS_PRIVATE)  # frozen: nothing mounted outside from now on shows up
    # Every layer the tool writes lives in one tmpfs of its own, first mounted at /tmp.
    host_tmp = os.open("/tmp", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    kernel.mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0700,size={key.get('tmp_size') or '50%'}")
    layers_root = os.open("/tmp", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    layers = "/tmp/layers"
    os.mkdir(layers, 0o700)
    for name in ("upper", "work", "cache-upper", "cache-work", "tmp-upper", "tmp-work", "shm"):
        os.mkdir(f"{layers}/{name}", 0o755)
    os.chmod(f"{layers}/tmp-upper", 0o1777)
    os.chmod(f"{layers}/shm", 0o1777)
    # the mount points, made in the upper layer: whatever the host's /tmp has at these paths (a symlink, a dir
    # of another user) is shadowed by them, so no mount below follows a link someone planted
    for path in ("treemat", "treemat/exec", "treemat/cache"):
        os.mkdir(f"{layers}/tmp-upper/{path}", 0o755)
    layers_fd = os.open(layers, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)  # kept open until the view is done
    layers = _fd_path(layers_fd)
    try:  # the tool's /tmp: the host's below (tools and toolchains kept in /tmp stay runnable), writes private
        if key["exec"] != "overlay":
            raise SandboxSetupError("no overlayfs")
        options = f"lowerdir={_fd_path(host_tmp)},upperdir={layers}/tmp-upper,workdir={layers}/tmp-work,userxattr"
        kernel.mount("overlay", "/tmp", "overlay", MS_NOSUID | MS_NODEV, options)
    except SandboxSetupError:  # no overlayfs, or the host's /tmp has mounts of another namespace below it
        kernel.mount(f"{layers}/tmp-upper", "/tmp", None, MS_BIND)  # (which the kernel refuses to clone): an
    os.close(host_tmp)  # empty private /tmp, as Bazel's hermetic tmp
    writable = ["/tmp"]
    if os.path.isdir("/dev/shm"):  # a dir of the layers' tmpfs: its size bounds all the tool writes, /dev/shm too
        kernel.mount(f"{layers}/shm", "/dev/shm", None, MS_BIND)
        writable.append("/dev/shm")
    readonly = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
    if kernel.set_mount_attrs("/", set_bits=readonly, recursive=True):
        # (and the layers' tmpfs, under /tmp: finish_view's overlays need their upper layers writable)
        for path in [*writable, _fd_path(layers_root)]:
            kernel.set_mount_attrs(path, clear_bits=MOUNT_ATTR_RDONLY, recursive=False)
    else:  # no mount_setattr: remount every other mount read-only, one by one
        for point in _mount_table():
            if point in writable or point.startswith(("/proc/", "/sys/")) or point in ("/proc", "/sys"):
                continue
            try:
                kernel.mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
            except SandboxSetupError:
                kernel.mount(point, point, None, MS_BIND)  # a locked mount: bind it, then remount the bind
                kernel.mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
    os.close(layers_root)
    mask_paths(kernel, key.get("mask", []), masked)
    kernel.mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return layers_fd


def mask_paths(kernel: Kernel, paths: list[str], masked: dict[str, int]) -> None:
    """An empty read-only tmpfs over each path that is a directory and not yet masked: `masked` maps a path to
    its mask's device. Run again when a request arrives, since a spare namespace may have been made before the
    directory (re)appeared: what is there now gets masked, as in a namespace made then."""
    for path in map(str, paths):
        try:
            if os.stat(path).st_dev == masked.get(path):
                continue
        except OSError:
            continue  # nothing there: nothing to hide
        kernel.mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
        masked[path] = os.stat(path).st_dev


def finish_view(
    kernel: Kernel, plan: dict[str, Any], fds: dict[str, int], layers_fd: int, masked: dict[str, int]
) -> None:
    """The request's part of the view: EXEC_ROOT and TOOL_CACHE (mounted after the rest went read-only: an overlay
    is a new writable mount; a bind copies its source's read-only flag, cleared on the bind alone)."""
    mask_paths(kernel, plan.get("mask", []), masked)
    layers = _fd_path(layers_fd)
    binds = []
    if plan["exec"] == "overlay":
        options = f"lowerdir={_fd_path(fds['lower'])},upperdir={layers}/upper,workdir={layers}/work,userxattr"
        kernel.mount("overlay", EXEC_ROOT, "overlay", MS_NOSUID | MS_NODEV, options)
    else:
        kernel.mount(_fd_path(fds["lower"]), EXEC_ROOT, None, MS_BIND)
        binds.append(EXEC_ROOT)
    cache = plan.get("cache")
    if cache == "overlay":
        options = (
            f"lowerdir={_fd_path(fds['cache_lower'])},upperdir={layers}/cache-upper,"
            f"workdir={layers}/cache-work,userxattr"
        )
        kernel.mount("overlay", TOOL_CACHE, "overlay", MS_NOSUID | MS_NODEV, options)
    elif cache == "bind":
        kernel.mount(_fd_path(fds["cache_lower"]), TOOL_CACHE, None, MS_BIND)
        binds.append(TOOL_CACHE)
    # (cache "private": TOOL_CACHE stays an empty directory of the tool's /tmp)
    for path in binds:
        if not kernel.set_mount_attrs(path, clear_bits=MOUNT_ATTR_RDONLY, recursive=False):
            kernel.mount(None, path, None, MS_BIND | MS_REMOUNT | MS_NOSUID)


def run_init(kernel: Kernel, plan: dict[str, Any], fds: dict[str, int], layers_fd: int, masked: dict[str, int]) -> int:
    """In pid 1 of the tool's namespaces: finish the view, report ready, start the tool as pid 2, be its init.

    The tool runs as pid 2, so signals reach it as anywhere else (pid 1 ignores the ones it has no handler for:
    a tool's `kill -9 $$` would be lost). Once the tool ends, init kills and reaps every process left in the
    namespace, then reports the tool's status (128+N for signal N) on the status socket: when the client hears
    it, nothing of the tool runs any more. Returns that status (init's own exit code).
    """
    status = fds["status"]
    try:
        finish_view(kernel, plan, fds, layers_fd, masked)
        os.close(layers_fd)  # the layers tmpfs is now reachable only through the mounts made of it
        os.chdir(os.path.join(EXEC_ROOT, str(plan.get("cwd") or "")))
        view = os.open(EXEC_ROOT, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        argv = [str(arg) for arg in plan["argv"]]
        env = {str(k): str(v) for k, v in plan["env"].items()}
        socket.send_fds(socket.socket(fileno=os.dup(status)), [marshal.dumps({"ready": True})], [view])
        _stdio(fds["stdout"], fds.get("stderr", fds["stdout"]))
        os.closerange(3, status)  # init keeps nothing of the helper's but its status socket (close-on-exec)
        os.closerange(status + 1, 65536)
        os.set_inheritable(status, False)
        kernel.drop_capabilities()
        # undumpable: the tool (same uid) cannot ptrace init or pidfd_getfd its status socket (dumpable after exec)
        kernel.prctl(PR_SET_DUMPABLE, 0, "make init undumpable")
    except BaseException as exc:
        report(status, {"error": str(exc) or type(exc).__name__})
        return 126
    tool = _spawn(argv, env)
    for fd in (0, 1, 2):  # the output pipe ends with the tool's processes, not with init
        os.close(fd)
    code = _reap_all(tool) if tool > 0 else -tool
    report(status, {"exit": code})
    return code


def _stdio(stdout: int, stderr: int) -> None:
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)


def _spawn(argv: list[str], env: dict[str, str]) -> int:
    """posix_spawn (a vfork: no copy of the interpreter's memory) of argv[0] looked up in env's PATH, as execvpe
    does; every signal at its default in the tool. The tool's pid, or -(exit code) with a message on stderr."""
    if "/" in argv[0]:
        candidates = [argv[0]]
    else:
        candidates = [os.path.join(d, argv[0]) for d in env.get("PATH", os.defpath).split(os.pathsep)]
    defaults = [sig for sig in signal.valid_signals() if sig not in (signal.SIGKILL, signal.SIGSTOP)]
    failure: OSError | None = None
    for path in candidates:
        try:
            os.stat(path)  # (a spawn that fails would still use up a pid: the tool would not be pid 2)
            return os.posix_spawn(path, argv, env, setsigdef=defaults, setsigmask=())
        except OSError as exc:  # the first error that is not "no such file", as execvpe reports
            if failure is None or failure.errno in (errno.ENOENT, errno.ENOTDIR):
                failure = exc
    assert failure is not None
    with contextlib.suppress(OSError):
        os.write(2, f"treemat: error: cannot run {argv[0]!r}: {failure.strerror}\n".encode())
    return -(126 if failure.errno in (errno.EACCES, errno.ENOEXEC, errno.EPERM) else 127)


def _reap_all(tool: int) -> int:
    """Reap until the tool ends, then kill every process left in the namespace (pid 1 is spared by kill(-1))
    and reap them all; the tool's exit status, shell style. What is left is killed before the tool is reaped: while
    it is a zombie (`kill -0`, /proc still find it), nothing it left can see it end and write an output first."""
    code = 126
    while True:
        try:
            if (waited := os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)) is None:  # ended, not reaped yet
                continue
            ended = waited.si_pid
            if ended == tool or tool == 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(-1, signal.SIGKILL)
            status = os.waitpid(ended, 0)[1]
        except ChildProcessError:
            return code
        if ended == tool:
            exited = os.waitstatus_to_exitcode(status)
            code, tool = (128 - exited if exited < 0 else exited), 0


def report(status: int, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        os.write(status, marshal.dumps(message))
