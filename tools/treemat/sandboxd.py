"""The sandbox helper: a small process that starts every tool in fresh mount, pid and IPC namespaces (Linux).

Run as its own program (`python3 -I -S sandboxd.py FD`, stdlib only: it imports sandboxview.py and nothing else
of treemat) by sandbox.py. At start it enters a user namespace and a private mount namespace of its own, once,
and gives up for good every capability a later exec could gain (bounding set, securebits, no_new_privs). A tool
then runs in a namespace cloned ahead of its request (a *spare*: clone(NEWNS | NEWPID) and the view but the exec
dir built once the previous tool ended, between actions), so a request costs two mounts and a spawn:

    clone(NEWNS | NEWPID | NEWIPC) ─▶ init, pid 1 of its namespace (sandboxview.py):
        /tmp            = the host's /tmp under a private upper layer (overlay mode, if the kernel lets us
                          clone it: no foreign mounts below it), else an empty private dir
        /dev/shm        = a private dir of the same tmpfs as every other layer the tool writes
        /               = every other mount read-only (nosuid), Bazel's execroot included
        masks           = an empty read-only tmpfs over TREEMAT_ROOT (and every other path that reaches it)
        /proc           = a fresh procfs of the new pid namespace (read-only)
      ── the request ──
        EXEC_ROOT       = the staged tree: an overlay (lower: the staged hardlinks, upper: private) or a bind
        TOOL_CACHE      = the trusted cache seed under a private overlay, or an empty dir of its /tmp
        (every layer the tool writes is in one tmpfs of the run's own, unreachable by path once mounted)
        then: init's capabilities dropped, stdio = the pipe, posix_spawn of the tool (pid 2), signals at default

A spare is used only while nothing can differ from a namespace made at the request: made for the same exec mode,
masks and /tmp size, no mount added or removed in the helper's namespace since it was cloned (poll on
/proc/self/mountinfo), alive; each mask is checked again at the request (a TREEMAT_ROOT made again after the
spare was made is masked then). Anything else in doubt: the spare is killed and a fresh namespace is cloned.

The tool's writes land only in its exec dir view, its cache view, /tmp and /dev/shm. It cannot unmount or
remount anything (no capabilities in any user namespace that owns these mounts; a user namespace it makes
itself gets locked copies). When it exits, init kills and reaps every process left in its pid namespace before
it reports the exit, so nothing outlives the action: no daemon keeps an output open, no child holds the pipe.

Requests and replies are `marshal`ed dicts (both ends are the same interpreter: no json/re to import at the
helper's start) over a SOCK_SEQPACKET socket, descriptors passed with SCM_RIGHTS. Per run the
client passes a status socket, on which the tool's init reports `{"ready": ...}` (with a descriptor of the exec
view, through which the client collects outputs) or `{"error": ...}`, then `{"exit": code}`; this helper
reports `{"exit": code}` too once it has reaped init (the client takes the first: init killed reports nothing).
"""

from __future__ import annotations

import contextlib
import marshal
import os
import select
import signal
import socket
import sys

TYPE_CHECKING = False  # (typing costs the helper 3 ms to import)
if TYPE_CHECKING:
    from typing import Any

try:
    from treemat import sandboxview as view
except ImportError:  # run as a program (python3 -I -S): the package's parent is not on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from treemat import sandboxview as view

EXEC_ROOT = view.EXEC_ROOT
TOOL_CACHE = view.TOOL_CACHE
MAX_MESSAGE = 1 << 20
NAMESPACES = view.CLONE_NEWNS | view.CLONE_NEWPID | view.CLONE_NEWIPC  # per tool (IPC: no SysV object outlives it)


class Spare:
    """A namespace cloned ahead of a request, its view prepared for `key`, waiting on `channel` for the request."""

    def __init__(self, pid: int, channel: socket.socket, key: dict[str, Any]) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.channel = channel
        self.key = key

    def sound(self) -> bool:
        """Alive and not reporting a failed preparation (either makes its pidfd or its channel readable)."""
        readable, _w, _x = select.select([self.pidfd, self.channel.fileno()], [], [], 0)
        return not readable


def _key(request: dict[str, Any]) -> dict[str, Any]:
    """What a spare's view depends on."""
    return {"exec": request["exec"], "mask": list(request.get("mask", [])), "tmp_size": request.get("tmp_size")}


def _spares_work(release: str) -> bool:
    """An overlay takes a detached mount (open_tree) as a layer from Linux 6.15 on."""
    numbers = [int(part) if part.isdigit() else 0 for part in release.split("-")[0].split(".")[:2]]
    return numbers >= [6, 15]


SPARES = _spares_work(os.uname().release)


def _needs_a_fresh_namespace(request: dict[str, Any]) -> bool:
    """A bind mount takes only a source of the namespace's own: its dirs are opened there, before the view."""
    return not SPARES or request["exec"] != "overlay" or request.get("cache") == "bind"


def _receive(channel: socket.socket) -> tuple[dict[str, Any], dict[str, int]] | None:
    try:
        message, fds, _flags, _addr = socket.recv_fds(channel, MAX_MESSAGE, 16)
    except OSError:
        return None
    if not message:
        return None  # the helper is gone, or discarded this spare
    request = marshal.loads(message)
    return request, dict(zip(list(request["fds"]), fds, strict=True))


def _namespace_main(kernel: view.Kernel, key: dict[str, Any], channel_fd: int, *, ahead: bool) -> int:
    """In the clone (pid 1 of its namespaces): the view, the request, then the tool's init.

    Ahead (a spare): the view is prepared first, then the request comes with its directories opened by the
    helper. Otherwise the request comes first and its directories are opened here, before anything is covered.
    """
    kernel.prctl(view.PR_SET_PDEATHSIG, signal.SIGKILL, "set the parent-death signal")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # pid 1 with no handler: the tool's `kill -INT 1` is lost
    os.closerange(3, channel_fd)  # nothing of the helper's but our channel: its death or a discard reads as EOF
    os.closerange(channel_fd + 1, 65536)
    channel = socket.socket(fileno=channel_fd)
    got = None if ahead else _receive(channel)
    failure, layers_fd = "", -1
    masked: dict[str, int] = {}
    try:
        if got is not None:
            got[1].update(view.open_dirs(got[0]))
        layers_fd = view.prepare_view(kernel, key, masked)
    except (view.SandboxSetupError, OSError) as exc:
        failure = str(exc) or type(exc).__name__
        if ahead:
            with contextlib.suppress(OSError):
                channel.send(b"failed")  # in doubt: the helper clones a fresh namespace instead
    got = got or _receive(channel)
    if got is None:
        return 0
    channel.close()
    request, fds = got
    if failure:
        view.report(fds["status"], {"error": failure})
        return 126
    return view.run_init(kernel, request, fds, layers_fd, masked)


class Helper:
    """The helper's loop: hand requests to spares (cloned ahead), kill on request, report exits."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.kernel = view.Kernel()
        self.children: dict[int, tuple[int, socket.socket, int]] = {}  # pidfd -> (pid, status socket, request id)
        self.by_request: dict[int, int] = {}  # request id -> pid (until reaped)
        self.spare: Spare | None = None
        self.next_key: dict[str, Any] | None = None  # the key of the last request a spare could serve
        self.mount_events = select.poll()
        self.mountinfo = -1

    def start(self) -> None:
        self.kernel.prctl(view.PR_SET_PDEATHSIG, signal.SIGKILL, "set the parent-death signal")
        try:
            view.enter_namespaces(self.kernel)
            self.kernel.lock_privileges()
            self.mountinfo = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        except (view.SandboxSetupError, OSError) as exc:
            self.control.send(marshal.dumps({"error": str(exc)}))
            raise SystemExit(1) from None
        self.mount_events.register(self.mountinfo, select.POLLPRI)
        self.control.send(marshal.dumps({"ready": True, "pid": os.getpid()}))

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
        request = marshal.loads(message)
        if request.get("op") == "kill":
            pid = self.by_request.get(int(request["id"]))
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            return True
        names = list(request["fds"])
        self._run(request, names, fds)
        return True

    def _run(self, request: dict[str, Any], names: list[str], fds: list[int]) -> None:
        status = socket.socket(fileno=os.dup(fds[names.index("status")]))
        key = _key(request)
        spare: Spare | None = None
        try:
            if _needs_a_fresh_namespace(request):
                spare = self._clone(key, ahead=False)
            else:
                spare = self._take_spare(key)
                for name, fd in view.open_dirs(request).items():  # here: the spare's view covers paths
                    try:
                        copy = self.kernel.detached_copy(fd)
                    finally:
                        os.close(fd)
                    request["fds"].append(name)
                    fds.append(copy)
            socket.send_fds(spare.channel, [marshal.dumps(request)], fds)
        except (view.SandboxSetupError, OSError) as exc:
            if spare is not None:
                self._discard(spare)
            status.send(marshal.dumps({"error": str(exc)}))
            status.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        spare.channel.close()
        request_id = int(request.get("id", 0))
        self.children[spare.pidfd] = (spare.pid, status, request_id)
        self.by_request[request_id] = spare.pid
        if not _needs_a_fresh_namespace(request):
            self.next_key = key  # the next spare is cloned once this tool is reaped (see _reap)

    def _take_spare(self, key: dict[str, Any]) -> Spare:
        """The spare if nothing about it is in doubt, else a fresh namespace."""
        spare, self.spare = self.spare, None
        mounts_moved = bool(self.mount_events.poll(0))
        if spare is not None and (spare.key != key or mounts_moved or not spare.sound()):
            self._discard(spare)
            spare = None
        return spare or self._clone(key, ahead=True)

    def _clone(self, key: dict[str, Any], *, ahead: bool) -> Spare:
        if ahead:
            self.mount_events.poll(0)  # from here on, any mount change in our namespace discards this spare
        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = self.kernel.clone(NAMESPACES)
            if pid == -1:  # unknown architecture: fork, unshare, fork
                pid = self._fork_into_namespaces(key, there.fileno(), ahead=ahead)
            elif pid == 0:
                code = 126
                try:
                    code = _namespace_main(self.kernel, key, there.fileno(), ahead=ahead)
                finally:
                    os._exit(code)
        except BaseException:
            here.close()
            raise
        finally:
            there.close()
        return Spare(pid, here, key)

    def _fork_into_namespaces(self, key: dict[str, Any], channel_fd: int, *, ahead: bool) -> int:
        pid = os.fork()
        if pid == 0:
            try:
                self.kernel.unshare(NAMESPACES, "unshare(mount, pid, ipc)")
                inner = os.fork()
                if inner == 0:
                    os._exit(_namespace_main(self.kernel, key, channel_fd, ahead=ahead))
                os.closerange(3, 65536)
                _pid, code = os.waitpid(inner, 0)
                os._exit(os.waitstatus_to_exitcode(code) & 0xFF)
            except BaseException:
                os._exit(126)
        return pid

    def _discard(self, spare: Spare) -> None:
        spare.channel.close()
        try:
            os.kill(spare.pid, signal.SIGKILL)
            os.waitpid(spare.pid, 0)
        except OSError:
            pass
        os.close(spare.pidfd)

    def _reap(self, pidfd: int) -> None:
        pid, status, request_id = self.children.pop(pidfd)
        self.by_request.pop(request_id, None)
        try:
            _pid, code = os.waitpid(pid, 0)
            exit_code = os.waitstatus_to_exitcode(code)
            status.send(marshal.dumps({"exit": 128 - exit_code if exit_code < 0 else exit_code}))
        except OSError:
            pass  # the client went away, or took init's own report; nothing to tell
        finally:
            status.close()
            os.close(pidfd)
        self._prepare_next()

    def _prepare_next(self) -> None:
        """Clone the next request's namespace now that a tool has ended: between actions, not competing for the CPU
        with a tool that runs (docs/hermeticity.md, the cost of the sandbox)."""
        if self.spare is None and self.next_key is not None:
            try:
                self.spare = self._clone(self.next_key, ahead=True)
            except (view.SandboxSetupError, OSError):
                self.spare = None  # the next request clones its own (and reports why that fails)

    def _shutdown(self) -> None:
        if self.spare is not None:
            self._discard(self.spare)
            self.spare = None
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
