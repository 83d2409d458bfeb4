"""The thin worker: Bazel's `treemat --persistent_worker` process when the stager service is on (service.py).

It imports no protobuf and no click: it frames the WorkRequests on stdin, reads each one's request id and cancel
flag by hand, and forwards the bytes over a Unix socket in the root's `service/` dir (ours alone, no symlink;
served by our uid, SO_PEERCRED) to the root's long-lived service, which stages and runs the actions; responses
go to stdout untouched. The hello passes an O_DIRECTORY descriptor of the relay's cwd (Bazel's execroot) and
the relay's environment: the service copies outputs into that descriptor. The socket's name digests all that
must match for a service to stand in for this process: the wire version, the package's content hash, the
isolation, the credentials its tools inherit, the namespaces and the root directory. A relay that finds no
service starts one under the root's service lock; two racing relays start exactly one. At stdin's end it
half-closes the socket: the service answers what it has, then closes. The service's death fails the requests
in flight with one line; where no service can be had, `relay` returns None (after one line on stderr).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

# The socket module's C core: `socket` adds enums, selectors and a file wrapper this relay never uses (its import
# was a fifth of the relay's); a service whose relay finds it running imports neither it nor pathlib.
from _socket import AF_UNIX, SCM_RIGHTS, SHUT_RDWR, SHUT_WR, SO_PEERCRED, SOCK_CLOEXEC, SOCK_STREAM, SOL_SOCKET
from _socket import socket as Socket
from collections.abc import Callable, Mapping

from treemat.errors import CasError, TreematError
from treemat.layout import check_private_dir, root_text, service_file_text
from treemat.relaywire import (
    FrameTooBig,
    encode_varint,
    failure_frame,
    frame_fields,
    payload_of,
    read_frame,
    request_id_of,
)
from treemat.serviceid import ServeHere, ServiceUnavailable, own_package_hash, wait_seconds

WIRE_VERSION = 1
HELLO_MAGIC = b"treemat-relay"
SUN_PATH_MAX = 107
# /proc/self/status lines a tool inherits: its rights, its mitigations, its CPUs and memory nodes (taskset)
INHERITED = ("Uid:", "Gid:", "Groups:", "Cap", "NoNewPrivs:", "Seccomp", "Speculation", "Cpus_allowed:", "Mems_allowed")
DEFAULT_IDLE_MINUTES = 15.0
DIED = "treemat: error: the stager service ended while this request ran ({}); the next request starts a new one\n"
TOO_BIG = "treemat: error: this work request did not run: {} (the worker's address space is limited)\n"
UNREACHED = (
    "treemat: error: the stager service could not be reached ({}): this request did not run; the next tries again\n"
)


def service_version() -> str:
    """What relay and service must agree on: the wire version and the package's content hash (read once)."""
    return f"{WIRE_VERSION}-{own_package_hash()}"


def service_name(version: str, isolation: str) -> str:
    """The socket's file name: a digest of the version, isolation, namespaces, root directory and what the service's
    tools inherit (uid, gid, groups, capabilities, no_new_privs, seccomp, resource limits, cgroups, CPUs,
    priority, OOM score, personality, the LSM's label; not the I/O priority: reading it takes ctypes)."""
    from _blake2 import blake2b

    facts = [version, isolation, str(os.geteuid()), str(os.getegid()), *map(str, sorted(os.getgroups()))]
    with contextlib.suppress(OSError):  # a relay lacking a group or confined otherwise never shares its tools' rights
        facts += [line for line in _read("/proc/self/status").splitlines() if line.startswith(INHERITED)]
        facts.append(_read("/proc/self/limits"))  # file size, memory, processes, descriptors...
        facts.append(_read("/proc/self/cgroup"))  # the cgroups' limits (Bazel's per-worker memory limit)
        facts.append(_read("/proc/self/personality"))  # `setarch i686`: what uname says, ASLR
        facts.append(_read("/proc/self/oom_score_adj"))  # `choom`: whose tools the OOM killer takes first
        facts.append(f"nice:{os.getpriority(os.PRIO_PROCESS, 0)}:{os.sched_getscheduler(0)}")  # `nice bazel build`
        facts.append(_read("/proc/self/attr/current"))
    for name in ("mnt", "net", "user", "uts", "ipc", "pid", "cgroup", "time"):  # a tool is in the service's
        with contextlib.suppress(OSError):
            facts.append(f"{name}:{os.stat(f'/proc/self/ns/{name}').st_ino}")
        facts.append(name)  # a namespace that cannot be read leaves its name alone
    facts.append("root:{0.st_dev}:{0.st_ino}".format(os.stat("/")))
    return blake2b("\0".join(facts).encode(), digest_size=8).hexdigest()


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def socket_address(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(address, dir fd or -1): the path, or `/proc/self/fd/N/<name>` when it is too long for sun_path."""
    text = os.fspath(path)
    if len(os.fsencode(text)) <= SUN_PATH_MAX:
        return text, -1
    fd = os.open(os.path.dirname(text), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{os.path.basename(text)}", fd


def hello_payload(version: str, max_workers: int, env: Mapping[str, str]) -> bytes:
    """The relay's hello: magic, version, its pool size and its environment (the tools' base environment)."""
    fields = [HELLO_MAGIC, version.encode(), str(max_workers).encode(), *(f"{k}={v}".encode() for k, v in env.items())]
    return encode_varint(len(body := b"\0".join(fields))) + body


def connect(socket_path: str | os.PathLike[str], hello: bytes) -> tuple[Socket, str]:
    """Connect, send the hello with the cwd's descriptor, read the answer; (socket, the service's pid)."""
    address, dir_fd = socket_address(socket_path)
    sock = Socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)
    sock.settimeout(wait_seconds())  # a service stopped or hung never holds the relay: TimeoutError, then in-process
    try:
        try:
            sock.connect(address)
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
        uid = int.from_bytes(sock.getsockopt(SOL_SOCKET, SO_PEERCRED, 12)[4:8], sys.byteorder)
        if uid != os.geteuid():  # the hello carries the environment and the execroot: only to our own service
            raise ServiceUnavailable(f"the socket {socket_path} is served by uid {uid}, not by this relay's")
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:  # refused before the hello was read (out of descriptors or threads): its answer says why
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendmsg([hello], [(SOL_SOCKET, SCM_RIGHTS, cwd.to_bytes(4, sys.byteorder))])
        finally:
            os.close(cwd)
        if (frame := read_frame(sock)) is None:
            raise ConnectionResetError("the service closed the connection")
        answer = payload_of(frame).split(b"\0", 1)
        text = answer[-1].decode(errors="replace") if len(answer) > 1 else ""
        if answer[0] != b"ok":
            raise ServiceUnavailable(f"the service refused this relay: {text}")
        sock.settimeout(None)
        return sock, text
    except BaseException:
        sock.close()
        raise


def reach_service(
    root: str, name: str, hello: bytes, isolation: str, idle_minutes: float, serve_here: ServeHere | None = None
) -> Socket:
    """A connection to the root's service (`root`: root_text's), starting it (under the service lock) if none
    answers. Where one answers, only its dir is checked (ours alone) and nothing else is imported: the root is made
    and checked whole, and servicespawn imported, when a service must be started."""
    path = service_file_text(root, name, "sock")
    try:
        check_private_dir(os.path.dirname(path))
        return connect(path, hello)[0]
    except (CasError, FileNotFoundError, ConnectionError):
        pass  # no service dir of ours yet, no socket, a stale one: as a first relay would
    from treemat.layout import Root
    from treemat.locking import LockBusy, file_lock
    from treemat.servicespawn import start_service

    layout = Root(root)
    layout.check_service()
    for _attempt in range(3):  # a service that exits while we connect is replaced on the next attempt
        try:
            with file_lock(layout.service_file(name, "lock"), timeout=wait_seconds()):  # its holder may hang
                with contextlib.suppress(FileNotFoundError, ConnectionError):
                    return connect(path, hello)[0]
                start_service(layout, name, service_version(), isolation, idle_minutes, serve_here)
                with contextlib.suppress(FileNotFoundError, ConnectionError):
                    return connect(path, hello)[0]
        except LockBusy:
            raise ServiceUnavailable(f"another relay held the service lock for {wait_seconds():g} s") from None
    raise ServiceUnavailable("the service kept closing its socket")


class Relay:
    """Forwards stdin's requests to the service and its responses to stdout; fails in-flight ones if it dies."""

    def __init__(self, connect_service: Callable[[], Socket], stdout_fd: int = 1) -> None:
        self._connect = connect_service
        self._stdout = stdout_fd
        self._lock = threading.Condition()
        self._write_lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # request id -> how many (singleplex requests all have id 0)
        self._early: dict[int, int] = {}  # request id -> answers that came before the relay read the request's id
        self._sock: Socket | None = None

    def run(self) -> int:
        """Relay until stdin ends and every request is answered; the exit status."""
        while True:
            try:
                if (frame := read_frame(0)) is None:
                    break
            except FrameTooBig as exc:  # read through: the next request is framed
                if not exc.fields.get(4):
                    self._write(failure_frame(request_id_of(exc.fields), TOO_BIG.format(exc)))
                continue
            except EOFError as exc:  # cut or garbled framing: no later request can be framed; answer, then end
                self._write(failure_frame(0, f"treemat: malformed work request: {exc}\n"))
                break
            self._forward(frame)
        with self._lock:
            sock = self._sock
        if sock is not None:  # no more requests: the service answers what it has, then closes
            self._end(sock, SHUT_WR)
        return 0

    def _forward(self, frame: bytes) -> None:
        """Send one request to the service, connecting first where there is none (the last one died: its failures
        are written, under the lock, before it is dropped). A send that fails reached no service: the connection
        ends once its reader has relayed what the dead service sent (`_end`), and one new service gets this request."""
        for attempt in range(2):
            with self._lock:
                sock = self._sock
            if sock is None:
                try:
                    sock = self._attach()
                except (ServiceUnavailable, TreematError, OSError, EOFError, FrameTooBig) as exc:  # its dir unusable
                    self._answer(frame, UNREACHED.format(exc))
                    return
            try:  # sent first, its id read after: the scan of a big request (10,000 inputs: 3-5 ms) runs meanwhile
                sock.sendall(frame)
            except OSError as exc:
                self._end(sock, SHUT_RDWR)
                if attempt:
                    self._answer(frame, DIED.format(f"sending failed: {exc.strerror or exc}"))
                continue
            self._register(sock, frame)
            return

    def _answer(self, frame: bytes, text: str) -> None:
        """Fail a request that never reached the service (a cancel gets no answer)."""
        fields = frame_fields(frame, (3, 4))
        if not fields.get(4):
            self._write(failure_frame(request_id_of(fields), text))

    def _register(self, sock: Socket, frame: bytes) -> None:
        """A request sent on `sock` is in flight until answered; answered already if its answer came first; failed
        here if the service died before the request was registered (its _fail_all did not know it)."""
        fields = frame_fields(frame, (3, 4))
        if fields.get(4):
            return  # a cancel: no answer of its own
        request_id = request_id_of(fields)
        with self._lock:
            if early := self._early.pop(request_id, 0):
                if early > 1:
                    self._early[request_id] = early - 1
                return
            if self._sock is sock:
                self._inflight[request_id] = self._inflight.get(request_id, 0) + 1
                return
        self._write(failure_frame(request_id, DIED.format("the connection closed")))

    def _attach(self) -> Socket:
        """Connect (or start) a service and read its answers on a thread of their own."""
        sock = self._connect()
        with self._lock:
            self._sock = sock
        try:
            threading.Thread(target=self._pump, args=(sock,), name="treemat-relay", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had (RLIMIT_NPROC): this request fails, the next tries again
            self._fail_all(sock, str(exc))
            sock.close()
            raise ServiceUnavailable(f"no thread to read its answers: {exc}") from None
        return sock

    def _pump(self, sock: Socket) -> None:
        """Responses from the service to stdout, until it closes the connection."""
        reason = "the connection closed"
        try:
            while True:
                try:
                    frame = read_frame(sock)
                except FrameTooBig as exc:  # an answer this relay cannot hold: that request fails, the others go on
                    frame = failure_frame(request_id_of(exc.fields), TOO_BIG.format(f"its answer: {exc}"))
                if frame is None:
                    break
                request_id = request_id_of(frame_fields(frame, (3,)))
                with self._lock:
                    count = self._inflight.pop(request_id, 0)
                    if count > 1:
                        self._inflight[request_id] = count - 1
                    elif not count:  # answered before the relay read its id (_register)
                        self._early[request_id] = self._early.get(request_id, 0) + 1
                    self._lock.notify_all()
                self._write(frame)
        except (OSError, EOFError) as exc:
            reason = str(exc)
        self._fail_all(sock, reason)
        sock.close()  # only here: a descriptor closed under a reading thread could be reused for the next service's

    def _end(self, sock: Socket, how: int) -> None:
        """Shut a connection down (`how`: SHUT_WR at stdin's end, SHUT_RDWR after a failed send) and wait until its
        reader let it go: it reads what the service sent before (a Unix socket shut down still yields what it
        holds), then fails the rest (failing them elsewhere raced it: an answer read after its request's failure
        was a second answer to one id)."""
        with contextlib.suppress(OSError):
            sock.shutdown(how)
        with self._lock:
            while self._sock is sock:
                self._lock.wait()

    def _fail_all(self, sock: Socket, reason: str) -> None:
        """The service is gone: answer every request in flight with one line; the next request reconnects."""
        with self._lock:  # written before `_sock` changes: `run` returns (the process exits) once it has
            if self._sock is not sock:
                return
            for request_id, count in self._inflight.items():
                for _ in range(count):
                    self._write(failure_frame(request_id, DIED.format(reason)))
            self._inflight, self._sock = {}, None
            self._lock.notify_all()
        with contextlib.suppress(OSError):
            sock.shutdown(SHUT_RDWR)  # wakes its reader, which closes it

    def _write(self, data: bytes) -> None:
        with self._write_lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._stdout, view) :]


def relay(options: Mapping[str, str], env: Mapping[str, str], serve_here: ServeHere | None = None) -> int | None:
    """Serve Bazel through the root's service; None (after one line on stderr) where it cannot be used.
    `serve_here` runs a service in this process: a relay that must start one forks into it (servicespawn.py)."""
    try:
        root = root_text(options["root"])
        isolation, max_workers = options["isolation"], int(options["max_workers"] or max(2, os.cpu_count() or 2))
        idle = float(env.get("TREEMAT_SERVICE_IDLE_MINUTES") or DEFAULT_IDLE_MINUTES)
        version = service_version()
        name = service_name(version, isolation)
        hello = hello_payload(version, max_workers, env)
        first = reach_service(root, name, hello, isolation, idle, serve_here)
    except Exception as exc:  # whatever it is, the in-process worker still serves (and says so)
        print(f"treemat worker: the stager service is unavailable ({exc}): serving in this process", file=sys.stderr)
        return None
    pending = [first]

    def connect_service() -> Socket:
        return pending.pop() if pending else reach_service(root, name, hello, isolation, idle)

    return Relay(connect_service).run()
