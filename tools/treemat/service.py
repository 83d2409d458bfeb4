"""The per-root stager service: one process holds the stack (guard watches, verified blobs, exec-dir pools, tool
caches) for every relay (relay.py), across Bazel servers, `bazel clean`, mnemonics and output bases.

    python3 -m treemat --service --root=R --name=N --isolation=I --idle-minutes=M --ready-fd=FD

A relay starts it (under the root's service lock) and waits on FD for `ok <pid>` or the reason it failed. It forks
itself away at once (the relay reaps the first process), listens on `<root>/service/N.sock` (0600 in the 0700 dir),
refuses a peer of another uid (SO_PEERCRED) or of another version, and serves each relay's requests relative to the
directory descriptor the relay passed (its execroot), with the relay's environment as the tools' base environment.
Request ids are mapped to ids unique in the service, so relays' multiplex ids never meet; a relay that goes away has
its requests in flight cancelled. With no relay connected for M minutes the service removes its socket (under the
lock, so a relay starting meanwhile starts a new one) and exits; one whose socket went (its root deleted) exits
within ORPHAN_CHECK_SECONDS.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from treemat.errors import TreematError, describe_error
from treemat.layout import Root
from treemat.locking import file_lock
from treemat.protocol import Malformed, WorkItem, WorkReply, encode_reply, read_requests
from treemat.relay import HELLO_MAGIC, service_version, socket_address
from treemat.servicepeer import answer, execroot_path, foreign_namespace, receive_hello, spare_descriptor
from treemat.servicespawn import PROCESS_NAME, name_process
from treemat.stack import Stack, favour_syscall_threads, open_stack
from treemat.worker import DUPLICATE_REFUSED, SANDBOX_DIR_REFUSED, Canceller, Handler, make_handler

HELLO_SECONDS = 10.0  # a peer that has not said hello by then is dropped (it would pin the service)
RUNNER = "treemat-service"  # the name of a request's thread
ORPHAN_CHECK_SECONDS = 2.0  # how often an idle-waiting service checks its socket is still the one it bound


class Session:
    """One relay's connection: its requests (ids mapped to service-wide ones) and their responses."""

    def __init__(
        self, conn: socket.socket, handler: Handler, canceller: Canceller, ids: Iterator[int], max_workers: int
    ) -> None:
        self.conn = conn
        self.handler = handler
        self.canceller = canceller
        self.ids = ids
        self._slots = threading.BoundedSemaphore(max(1, max_workers))  # a thread per request, this many running
        self._threads: list[threading.Thread] = []  # (a pool: concurrent.futures, ~6 ms of a cold service's start)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # the relay's request id -> the service's (0: its singleplex one)
        self._wake = -1  # a pipe's write end while the session waits for its last requests (_finish_or_cancel)

    def run(self) -> None:
        """Serve until the relay closes the connection (or dies); cancel whatever is then still in flight."""
        reader = self.conn.makefile("rb")
        try:
            for request in read_requests(reader, "proto"):
                if isinstance(request, Malformed):
                    malformed = f"treemat: malformed work request: {request.error}\n"
                    self.respond(WorkReply(request.request_id, 1, malformed))
                else:
                    self.dispatch(request)
        except (OSError, ValueError):
            pass  # the relay went away mid-message
        finally:
            self._finish_or_cancel()
            for thread in self._threads:
                thread.join()
            reader.close()

    def _finish_or_cancel(self) -> None:
        """No more requests (the relay's half-close, or its end): wait for those in flight, and cancel them all the
        moment the relay is gone, also after a half-close (else a relay killed while it waited for its last
        answers left its tools running to their end, however long, and its session holding the service)."""
        try:
            wake_read, wake = os.pipe()  # written as each request ends (_run_and_respond)
            os.set_blocking(wake, False)
        except OSError:  # out of descriptors: look again every tenth of a second
            wake_read = wake = -1
        with self._lock:
            self._wake = wake
        poller = select.poll()
        poller.register(self.conn, select.POLLHUP)  # a close both ways (its exit or death), never its SHUT_WR
        if wake_read >= 0:
            poller.register(wake_read, select.POLLIN)
        try:
            while True:
                with self._lock:
                    orphans = list(self._inflight.values())
                if not orphans:
                    return
                events = poller.poll(-1 if wake_read >= 0 else 100)
                if any(fd == self.conn.fileno() for fd, _events in events):
                    for service_id in orphans:
                        self.canceller(service_id)
                    return
                if wake_read >= 0:
                    os.read(wake_read, 4096)
        finally:
            with self._lock:
                self._wake = -1
            for fd in (wake_read, wake):
                if fd >= 0:
                    os.close(fd)

    def dispatch(self, item: WorkItem) -> None:
        """Run or cancel one request."""
        local = item.request_id
        if item.cancel:
            with self._lock:
                service_id = self._inflight.get(local) if local else None
            if service_id is not None:
                self.canceller(service_id)
            return
        if item.sandbox_dir:
            self.respond(WorkReply(local, 1, SANDBOX_DIR_REFUSED.format(item.sandbox_dir)))
            return
        service_id = next(self.ids)
        with self._lock:
            duplicate = local != 0 and local in self._inflight
            if not duplicate:
                self._inflight[local] = service_id
        if duplicate:
            self.respond(WorkReply(local, 1, DUPLICATE_REFUSED.format(local)))
            return
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        thread = threading.Thread(target=self._run_and_respond, args=(item.with_id(service_id), local), name=RUNNER)
        try:
            thread.start()
            self._threads.append(thread)
        except RuntimeError as exc:  # no thread to be had (RLIMIT_NPROC): answered now, never run
            with self._lock:
                if self._inflight.get(local) == service_id:
                    del self._inflight[local]
            self.respond(WorkReply(local, 1, f"treemat: error: the service cannot start a thread to run it ({exc})\n"))

    def _run_and_respond(self, item: WorkItem, local: int) -> None:
        try:
            with self._slots:
                reply = self.handler(item)
        except (TreematError, OSError) as exc:
            reply = WorkReply(item.request_id, 1, f"treemat: error: {describe_error(exc)}\n")
        except Exception as exc:  # the service must keep serving whatever one request does
            reply = WorkReply(item.request_id, 1, f"treemat: internal error: {type(exc).__name__}: {exc}\n")
        with self._lock:
            if self._inflight.get(local) == item.request_id:
                del self._inflight[local]
            if self._wake >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._wake, b".")
        self.respond(reply._replace(request_id=local))

    def respond(self, reply: WorkReply) -> None:
        """Send one response, then its follow-up; a relay that went away is not an error (its session ends)."""
        with self._write_lock, contextlib.suppress(OSError):
            self.conn.sendall(encode_reply(reply, "proto"))
        if reply.then is not None:
            reply.then()


class Service:
    """Accepts relays until idle; one Session thread per relay."""

    def __init__(self, stack: Stack, listener: socket.socket, name: str, idle_seconds: float) -> None:
        self.stack = stack
        self.listener = listener
        self.name = name
        self.idle_seconds = idle_seconds
        self.version = service_version()
        self.ids = itertools.count(1)
        self._lock = threading.Lock()
        self._clients = 0
        self._last_active = time.monotonic()
        self._spare = spare_descriptor()  # given up to accept-and-refuse a relay when RLIMIT_NOFILE is reached
        self._freed = threading.Event()  # a session ended (its descriptors are free)

    def serve(self) -> None:
        """Accept relays; return once idle for `idle_seconds` with the socket removed, or once the socket is no
        longer ours (the root was deleted, or the name taken over): no relay can reach this service then."""
        socket_path = self.stack.layout.service_file(self.name, "sock")
        ours = os.stat(socket_path).st_ino
        while True:
            with self._lock:
                idle_for = time.monotonic() - self._last_active if not self._clients else 0.0
            wait = self.idle_seconds - idle_for if not self._clients else self.idle_seconds
            ready, _w, _x = select.select([self.listener], [], [], min(max(wait, 0.0), ORPHAN_CHECK_SECONDS))
            if ready:
                self._accept()
                continue
            try:
                orphaned = os.stat(socket_path).st_ino != ours
            except OSError:
                orphaned = True
            with self._lock:
                orphaned = orphaned and not self._clients  # the relays still connected are served to their end
            if orphaned:
                print(f"treemat service {os.getpid()}: {socket_path} is gone or not ours: exiting", file=sys.stderr)
                self.listener.close()
                return
            with self._lock:
                idle = not self._clients and time.monotonic() - self._last_active >= self.idle_seconds
            if idle and self._retire():
                return

    def _accept(self) -> None:
        try:
            conn, _address = self.listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self._refuse_one(exc)
            return
        conn.setblocking(True)
        with self._lock:
            self._clients += 1
        try:
            threading.Thread(target=self._client, args=(conn,), name="treemat-session", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had (RLIMIT_NPROC): refuse this relay and serve on
            with self._lock:
                self._clients -= 1
            with conn, contextlib.suppress(OSError):
                conn.sendall(answer(f"the service cannot start a thread ({exc})", ok=False))

    def _refuse_one(self, exc: OSError) -> None:
        """Out of descriptors: accept the next relay on the spare one and refuse it with the reason (it serves
        in-process); with no spare, wait for a session to end rather than spin on the ready listener."""
        if self._spare < 0:
            self._spare = spare_descriptor()
        if self._spare < 0:
            self._freed.wait(0.1)
            self._freed.clear()
            return
        os.close(self._spare)
        self._spare = -1
        try:
            conn, _address = self.listener.accept()
        except OSError:
            return
        with conn, contextlib.suppress(OSError):
            conn.sendall(answer(f"the service is out of file descriptors ({exc.strerror})", ok=False))
        self._spare = spare_descriptor()
        print(f"treemat service {os.getpid()}: refused a relay: {exc.strerror}", file=sys.stderr)

    def _retire(self) -> bool:
        """Remove the socket under the lock unless a relay connected meanwhile; True if retired."""
        layout = self.stack.layout
        with file_lock(layout.service_file(self.name, "lock")):
            self.listener.setblocking(False)
            try:
                ready, _w, _x = select.select([self.listener], [], [], 0)
                if ready:
                    self._accept()
                    return False
            finally:
                self.listener.setblocking(True)
            for kind in ("sock", "pid"):
                with contextlib.suppress(OSError):
                    os.unlink(layout.service_file(self.name, kind))
            self.listener.close()
        print(f"treemat service {os.getpid()}: idle for {self.idle_seconds:.0f} s: exiting", file=sys.stderr)
        return True

    def _client(self, conn: socket.socket) -> None:
        try:
            self._session(conn)
        except Exception as exc:  # one relay's trouble never ends the service
            print(f"treemat service: a relay's session failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            conn.close()
            with self._lock:
                self._clients -= 1
                self._last_active = time.monotonic()
            self._freed.set()

    def _session(self, conn: socket.socket) -> None:
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.geteuid():
            conn.sendall(answer(f"uid {uid} is not the service's (uid {os.geteuid()}): refused", ok=False))
            return
        early = foreign_namespace(pid)  # now, while the process that connected most surely holds `pid`
        try:
            hello, fds = receive_hello(conn, min(HELLO_SECONDS, max(self.idle_seconds, 2.0)))
        except (TimeoutError, ValueError) as exc:
            print(f"treemat service: dropped a peer (pid {pid}): {exc or 'no hello in time'}", file=sys.stderr)
            return
        conn.settimeout(None)
        try:
            if (stranger := early or foreign_namespace(pid, conn)) is not None:  # after the hello: it reads why
                conn.sendall(answer(f"the peer (pid {pid}) is not in the service's {stranger}: refused", ok=False))
                return
            fields = hello.split(b"\0")
            if len(fields) < 3 or fields[0] != HELLO_MAGIC or fields[1].decode(errors="replace") != self.version:
                seen = fields[1].decode(errors="replace") if len(fields) > 1 else "none"
                conn.sendall(answer(f"version {seen} is not the service's {self.version}", ok=False))
                return
            if len(fds) != 1 or not stat.S_ISDIR(os.fstat(fds[0]).st_mode):
                conn.sendall(answer("the hello carries no directory descriptor (the relay's execroot)", ok=False))
                return
            env = dict(entry.decode(errors="surrogateescape").split("=", 1) for entry in fields[3:] if b"=" in entry)
            max_workers = int(fields[2]) if fields[2].isdigit() else 2
            conn.sendall(answer(str(os.getpid()), ok=True))
            self._serve_relay(conn, fds[0], env, max_workers)
        finally:
            for fd in fds:
                os.close(fd)

    def _serve_relay(self, conn: socket.socket, execroot_fd: int, env: Mapping[str, str], max_workers: int) -> None:
        execroot = execroot_path(execroot_fd)
        handler, canceller = make_handler(self.stack, execroot, env=env, role="service", execroot_fd=execroot_fd)
        Session(conn, handler, canceller, self.ids, max_workers).run()


def listen(layout: Root, name: str) -> socket.socket:
    """Bind `<root>/service/<name>.sock` (a stale one removed: the starter holds the lock) and listen."""
    path = layout.service_file(name, "sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    address, dir_fd = socket_address(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(address)
        os.chmod(path, 0o600)
        listener.listen(64)
    except BaseException:
        listener.close()
        raise
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)
    return listener


def parse_args(argv: list[str]) -> dict[str, str]:
    """`--name=value` flags (the relay writes them)."""
    options = {"root": "", "name": "", "isolation": "auto", "idle-minutes": "15", "ready-fd": "-1"}
    for arg in argv:
        key, _equals, value = arg.removeprefix("--").partition("=")
        if key in options:
            options[key] = value
    return options


def main(argv: list[str], *, forked: bool = False) -> int:
    """Run the service (see the module's docstring); the exit status. `forked`: __main__ has detached already."""
    options = parse_args(argv)
    ready_fd = int(options["ready-fd"])
    if not forked and os.fork():
        os._exit(0)  # the starting relay reaps this; the service is no child of any relay
    os.umask(0o077)
    name_process(PROCESS_NAME)
    favour_syscall_threads()
    try:
        layout = Root(Path(options["root"]))
        import_first_request()  # while the sandbox opens in its thread (__main__.start_service)
        stack = open_stack(layout, isolation=options["isolation"])
        stack.executor  # noqa: B018 - built now, not on the first request
    except (TreematError, OSError, ValueError) as exc:
        _ready(ready_fd, f"error: {describe_error(exc) if isinstance(exc, TreematError | OSError) else exc}")
        return 1
    with stack:
        try:
            listener = listen(layout, options["name"])
            layout.service_file(options["name"], "pid").write_text(f"{os.getpid()}\n")
        except OSError as exc:
            _ready(ready_fd, f"error: cannot listen: {describe_error(exc)}")
            return 1
        _ready(ready_fd, f"ok {os.getpid()}")
        print(f"treemat service {os.getpid()}: serving {layout.path} ({stack.isolation})", file=sys.stderr, flush=True)
        Service(stack, listener, options["name"], float(options["idle-minutes"]) * 60).serve()
    return 0


def import_first_request() -> None:
    """Import what the stack builds its executor from and what a first request runs through (else imported on the
    first request, after the service said it is ready)."""
    import treemat.execpool
    import treemat.executor
    import treemat.inputs
    import treemat.toolcache  # noqa: F401


def _ready(fd: int, text: str) -> None:
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        os.write(fd, text.encode() + b"\n")
    os.close(fd)
