"""The sandbox helper: a small process that starts every tool in fresh mount and pid namespaces (Linux).

Run as its own program (`python3 -I -S sandboxd.py FD`, stdlib only, never imports treemat) by sandbox.py. At
start it enters a user namespace and a private mount namespace of its own, once; each `run` request then costs
one clone(2) into new mount + pid namespaces, a few mounts and an exec:

    clone(NEWNS | NEWPID) ─▶ the tool's process, pid 1 of its namespace:
        /tmp            = the host's /tmp under a private upper layer (overlay mode, if the kernel lets us
                          clone it: no foreign mounts below it), else an empty private dir
        EXEC_ROOT       = the staged tree: an overlay (lower: the staged hardlinks, upper: private) or a bind
        TOOL_CACHE      = the trusted cache seed under a private overlay, or an empty dir of its /tmp
        (every layer the tool writes is in one tmpfs of the run's own, unreachable by path once mounted)
        /dev/shm        = a private tmpfs
        /               = every other mount read-only (nosuid), Bazel's execroot included
        masks           = an empty read-only tmpfs over TREEMAT_ROOT (and every other path that reaches it)
        /proc           = a fresh procfs of the new pid namespace (read-only)
        then: every capability dropped for good (bounding set, securebits, no_new_privs), stdio = the pipe, exec

The tool's writes land only in its exec dir view, its cache view, /tmp and /dev/shm. It cannot unmount or
remount anything (no capabilities in any user namespace that owns these mounts; a user namespace it makes
itself gets locked copies). When it exits, the kernel kills every process left in its pid namespace before the
exit is reported, so nothing outlives the action: no daemon keeps an output open, no child holds the pipe.

Requests and replies are JSON over a SOCK_SEQPACKET socket, descriptors passed with SCM_RIGHTS. Per run the
client passes a status socket, on which the tool's process reports `{"ready": ...}` (with a descriptor of the
exec view, through which the client collects outputs after the namespace is gone) or `{"error": ...}`, and this
helper reports `{"exit": code}` once it has reaped the tool.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import platform
import select
import signal
import socket
import sys
from typing import Any

EXEC_ROOT = "/tmp/treemat/exec"
TOOL_CACHE = "/tmp/treemat/cache"
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE, MS_SLAVE = 0x1000, 0x4000, 0x40000, 0x80000
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 28, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# NOROOT, NO_SETUID_FIXUP and NO_CAP_AMBIENT_RAISE, each locked; KEEP_CAPS off and locked
SECUREBITS_NO_PRIVILEGE = 0xEF
LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYSCALLS = {  # (clone, mount_setattr, capset) per architecture
    "x86_64": (56, 442, 126),
    "aarch64": (220, 442, 91),
}
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
        self.numbers = _SYSCALLS.get(platform.machine())

    def _check(self, result: int, what: str) -> None:
        if result < 0 or (result != 0 and what != "clone"):
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

    def clone(self, flags: int) -> int:
        """clone(2) with `flags` into a child that goes on like fork()'s; -1 where the raw syscall is unknown."""
        if self.numbers is None:
            return -1
        pid = int(self.libc.syscall(self.numbers[0], flags | signal.SIGCHLD, 0, 0, 0, 0))
        self._check(pid, "clone")
        return pid

    def prctl(self, option: int, arg: int, what: str) -> None:
        self._check(self.libc.prctl(option, arg, 0, 0, 0), what)

    def drop_capabilities(self) -> None:
        """No capability now or after exec, in any namespace, whatever the uid (root included)."""
        last = int(_read("/proc/sys/kernel/cap_last_cap") or "40")
        for cap in range(last + 1):
            self.prctl(PR_CAPBSET_DROP, cap, "drop the capability bounding set")
        self.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")
        self.prctl(PR_SET_SECUREBITS, SECUREBITS_NO_PRIVILEGE, "set securebits")
        header, data = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
        capset = self.numbers[2] if self.numbers else 126
        self._check(int(self.libc.syscall(capset, ctypes.byref(header), ctypes.byref(data))), "capset")
        self.prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")


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
    """Open the plan's directories here (a bind mount takes only a source of this mount namespace), each checked
    to be the very (device, inode) the client prepared: a path swapped in between is refused."""
    fds: dict[str, int] = {}
    for name, (path, device, inode) in plan["dirs"].items():
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (device, inode):
            raise SandboxSetupError(f"{path} was replaced while the sandbox was set up")
        fds[name] = fd
    return fds


def build_view(kernel: Kernel, plan: dict[str, Any], fds: dict[str, int]) -> None:
    """In the new mount namespace: the tool's whole view of the filesystem (see the module doc)."""
    kernel.mount(None, "/", None, MS_REC | MS_PRIVATE)  # frozen: nothing mounted outside from now on shows up
    # Every layer the tool writes lives in one tmpfs of its own, first mounted at /tmp.
    host_tmp = os.open("/tmp", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    kernel.mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0700,size={plan.get('tmp_size', '50%')}")
    layers = "/tmp/layers"
    os.mkdir(layers, 0o700)
    for name in ("upper", "work", "cache-upper", "cache-work", "tmp-upper", "tmp-work"):
        os.mkdir(f"{layers}/{name}", 0o755)
    os.chmod(f"{layers}/tmp-upper", 0o1777)
    # the mount points, made in the upper layer: whatever the host's /tmp has at these paths (a symlink, a dir
    # of another user) is shadowed by them, so no mount below follows a link someone planted
    for path in ("treemat", "treemat/exec", "treemat/cache"):
        os.mkdir(f"{layers}/tmp-upper/{path}", 0o755)
    layers_fd = os.open(layers, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    layers = _fd_path(layers_fd)
    overlay = plan["exec"] == "overlay"
    try:  # the tool's /tmp: the host's below (tools and toolchains kept in /tmp stay runnable), writes private
        if not overlay:
            raise SandboxSetupError("no overlayfs")
        options = f"lowerdir={_fd_path(host_tmp)},upperdir={layers}/tmp-upper,workdir={layers}/tmp-work,userxattr"
        kernel.mount("overlay", "/tmp", "overlay", MS_NOSUID | MS_NODEV, options)
    except SandboxSetupError:  # no overlayfs, or the host's /tmp has mounts of another namespace below it
        kernel.mount(f"{layers}/tmp-upper", "/tmp", None, MS_BIND)  # (which the kernel refuses to clone): an
    os.close(host_tmp)  # empty private /tmp, as Bazel's hermetic tmp
    writable = ["/tmp", EXEC_ROOT]
    cache = plan.get("cache")
    if overlay:
        options = f"lowerdir={_fd_path(fds['lower'])},upperdir={layers}/upper,workdir={layers}/work,userxattr"
        kernel.mount("overlay", EXEC_ROOT, "overlay", MS_NOSUID | MS_NODEV, options)
    else:
        kernel.mount(_fd_path(fds["lower"]), EXEC_ROOT, None, MS_BIND)
    if cache == "overlay":
        options = (
            f"lowerdir={_fd_path(fds['cache_lower'])},upperdir={layers}/cache-upper,"
            f"workdir={layers}/cache-work,userxattr"
        )
        kernel.mount("overlay", TOOL_CACHE, "overlay", MS_NOSUID | MS_NODEV, options)
        writable.append(TOOL_CACHE)
    elif cache == "bind":
        kernel.mount(_fd_path(fds["cache_lower"]), TOOL_CACHE, None, MS_BIND)
        writable.append(TOOL_CACHE)
    # (cache "private": TOOL_CACHE stays an empty directory of the tool's /tmp)
    os.close(layers_fd)  # the layers tmpfs is now reachable only through the mounts made of it
    if os.path.isdir("/dev/shm"):
        kernel.mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        writable.append("/dev/shm")
    readonly = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
    if kernel.set_mount_attrs("/", set_bits=readonly, recursive=True):
        for path in writable:
            kernel.set_mount_attrs(path, clear_bits=MOUNT_ATTR_RDONLY, recursive=False)
    else:  # no mount_setattr: remount every other mount read-only, one by one
        for point in _mount_table():
            if point in writable or point.startswith(("/proc/", "/sys/")) or point in ("/proc", "/sys"):
                continue
            try:
                kernel.mount(None, point, None, MS_BIND | 0x20 | MS_RDONLY | MS_NOSUID)
            except SandboxSetupError:
                kernel.mount(point, point, None, MS_BIND)  # a locked mount: bind it, then remount the bind
                kernel.mount(None, point, None, MS_BIND | 0x20 | MS_RDONLY | MS_NOSUID)
    for path in plan.get("mask", []):
        if os.path.isdir(str(path)):
            kernel.mount("tmpfs", str(path), "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
    kernel.mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def become_tool(kernel: Kernel, plan: dict[str, Any], fds: dict[str, int]) -> None:
    """In the cloned child (pid 1 of its namespace): build the view, report ready, then be the namespace's init.

    The tool runs as pid 2, so signals reach it as anywhere else (pid 1 ignores the ones it has no handler for:
    a tool's `kill -9 $$` would be lost). This init reaps every orphan, exits with the tool's status (128+N for
    signal N) the moment the tool ends, and its exit makes the kernel kill whatever the tool left behind.
    """
    status = socket.socket(fileno=fds["status"])
    try:
        kernel.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "set the parent-death signal")
        fds.update(open_dirs(plan))
        build_view(kernel, plan, fds)
        os.chdir(os.path.join(EXEC_ROOT, str(plan.get("cwd") or "")))
        view = os.open(EXEC_ROOT, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        argv = [str(arg) for arg in plan["argv"]]
        env = {str(k): str(v) for k, v in plan["env"].items()}
        socket.send_fds(status, [b'{"ready": true}'], [view])
        os.close(view)
        tool = os.fork()
    except BaseException as exc:
        try:
            status.send(json.dumps({"error": str(exc) or type(exc).__name__}).encode())
        finally:
            os._exit(126)
    if tool == 0:
        _exec_tool(kernel, argv, env, fds["stdout"], fds.get("stderr", fds["stdout"]))
    status.close()
    os.closerange(3, 65536)  # init keeps nothing of the helper's: the output pipe ends with the tool's processes
    os._exit(_init_loop(tool))


def _exec_tool(kernel: Kernel, argv: list[str], env: dict[str, str], stdout: int, stderr: int) -> None:
    """In the tool's process: stdio on the pipe (or the caller's files), nothing else of ours open, no capability
    left; then exec."""
    try:
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        os.closerange(3, 65536)  # nothing of ours reaches the tool
        kernel.drop_capabilities()
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(2, f"treemat: error: cannot prepare the tool's process: {exc}\n".encode())
        os._exit(126)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        os.write(2, f"treemat: error: cannot run {argv[0]!r}: {exc.strerror}\n".encode())
        os._exit(126 if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EPERM) else 127)


def _init_loop(tool: int) -> int:
    """Reap children until the tool itself ends; its exit status, shell style."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 126
        except InterruptedError:
            continue
        if pid == tool:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code


class Helper:
    """The helper's loop: run requests (one clone each), kill on request, report exits."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.kernel = Kernel()
        self.children: dict[int, tuple[int, socket.socket, int]] = {}  # pidfd -> (pid, status socket, request id)
        self.by_request: dict[int, int] = {}  # request id -> pid (until reaped)

    def start(self) -> None:
        self.kernel.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "set the parent-death signal")
        try:
            enter_namespaces(self.kernel)
        except (SandboxSetupError, OSError) as exc:
            self.control.send(json.dumps({"error": str(exc)}).encode())
            raise SystemExit(1) from None
        self.control.send(json.dumps({"ready": True, "pid": os.getpid()}).encode())

    def serve(self) -> None:
        while True:
            watched: list[int] = [self.control.fileno(), *self.children]
            readable, _w, _x = select.select(watched, [], [])
            for ready in readable:
                if ready == self.control.fileno():
                    if not self._take_request():
                        self._shutdown()
                        return
                else:
                    self._reap(ready)

    def _take_request(self) -> bool:
        try:
            message, fds, _flags, _addr = socket.recv_fds(self.control, MAX_MESSAGE, 16)
        except OSError:
            return False
        if not message:
            return False
        request = json.loads(message)
        if request.get("op") == "kill":
            pid = self.by_request.get(int(request["id"]))
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            return True
        names = list(request["fds"])
        received = dict(zip(names, fds, strict=True))
        self._run(request, received)
        return True

    def _run(self, request: dict[str, Any], fds: dict[str, int]) -> None:
        status = socket.socket(fileno=os.dup(fds["status"]))
        try:
            pid = self.kernel.clone(CLONE_NEWNS | CLONE_NEWPID)
            if pid == -1:  # unknown architecture: fork, unshare, fork
                pid = self._fork_into_namespaces(request, fds)
            elif pid == 0:
                become_tool(self.kernel, request, fds)
                os._exit(126)
        except (SandboxSetupError, OSError) as exc:
            status.send(json.dumps({"error": str(exc)}).encode())
            status.close()
            return
        finally:
            for fd in fds.values():
                os.close(fd)
        pidfd = os.pidfd_open(pid)
        request_id = int(request.get("id", 0))
        self.children[pidfd] = (pid, status, request_id)
        self.by_request[request_id] = pid

    def _fork_into_namespaces(self, request: dict[str, Any], fds: dict[str, int]) -> int:
        pid = os.fork()
        if pid == 0:
            try:
                self.kernel.unshare(CLONE_NEWNS | CLONE_NEWPID, "unshare(mount, pid)")
                inner = os.fork()
                if inner == 0:
                    become_tool(self.kernel, request, fds)
                _pid, code = os.waitpid(inner, 0)
                os._exit(os.waitstatus_to_exitcode(code) & 0xFF)
            except BaseException:
                os._exit(126)
        return pid

    def _reap(self, pidfd: int) -> None:
        pid, status, request_id = self.children.pop(pidfd)
        self.by_request.pop(request_id, None)
        try:
            _pid, code = os.waitpid(pid, 0)
            exit_code = os.waitstatus_to_exitcode(code)
            status.send(json.dumps({"exit": 128 - exit_code if exit_code < 0 else exit_code}).encode())
        except OSError:
            pass  # the client went away; nothing to tell
        finally:
            status.close()
            os.close(pidfd)

    def _shutdown(self) -> None:
        for pidfd, (pid, status, _request_id) in list(self.children.items()):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
            status.close()
            os.close(pidfd)
        self.children.clear()


def main(argv: list[str]) -> int:
    """`sandboxd.py FD`: serve the control socket FD until the client closes it."""
    control = socket.socket(fileno=int(argv[1]))
    helper = Helper(control)
    helper.start()
    helper.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
