"""The service's side of a relay's hello (service.py): reading it and its descriptor, checking the peer, and
naming the execroot the descriptor is."""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
from pathlib import Path

from treemat.relaywire import encode_varint

MAX_HELLO_FDS = 4
MAX_HELLO_BYTES = 16 << 20  # magic, version, pool size and the relay's environment
SO_PEERPIDFD = 77  # Linux 6.5: a pidfd of the process that connected (socket.SO_PEERPIDFD from Python 3.13)


def answer(text: str, *, ok: bool) -> bytes:
    """The service's answer to a hello: `ok\\0<detail>` or `refused\\0<reason>`."""
    body = (b"ok\0" if ok else b"refused\0") + text.encode()
    return encode_varint(len(body)) + body


def foreign_namespace(pid: int, conn: socket.socket | None = None) -> str | None:
    """The first namespace the peer `pid` does not share with the service ("mount namespace", ...), or None.

    A relay shares them all (they are in the socket's name). A sandboxed tool of another root of the same uid
    can reach this socket (only its own root is masked in its view); its namespaces are the sandbox's. `pid` is
    SO_PEERCRED's: once the process that connected exits, another may hold it (a peer hands its connection to a
    child and exits): with `conn`, a peer that exited is refused, where the kernel can tell (Linux 6.5).
    """
    for kind in ("mnt", "user", "net"):
        try:
            theirs, ours = os.stat(f"/proc/{pid}/ns/{kind}"), os.stat(f"/proc/self/ns/{kind}")
        except OSError:
            return f"{kind} namespace (unreadable)"
        if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
            return {"mnt": "mount", "user": "user", "net": "network"}[kind] + " namespace"
    if conn is not None and peer_exited(conn):  # read after that: the namespaces read were its own
        return "namespaces (it exited after it connected: its pid may be another process's)"
    return None


def peer_exited(conn: socket.socket) -> bool:
    """True if the process that connected to `conn` has exited; False where the kernel cannot tell."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
    except OSError as exc:  # ENOPROTOOPT before Linux 6.5; ESRCH or EINVAL: no such process any more
        return exc.errno in (errno.ESRCH, errno.EINVAL)
    pidfd = int.from_bytes(raw, sys.byteorder, signed=True)
    try:
        signal.pidfd_send_signal(pidfd, 0)  # a pidfd holds its process, never a later one of the same pid
    except ProcessLookupError:
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)
    return False


def spare_descriptor() -> int:
    """A descriptor held in reserve (-1 if none can be had now)."""
    try:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def execroot_path(fd: int) -> Path:
    """The relay's execroot as a path: the one its descriptor names where that path still is that directory.

    The in-process worker stages relative to its cwd's path; the same path here keeps the execroot watch and the
    input memo working across relays (a `/proc/self/fd/N` path crosses a link, so the watch would check every
    input, and the number is reused by the next relay). A directory moved or removed since the relay sent it is
    served through the descriptor itself.
    """
    by_descriptor = Path(f"/proc/self/fd/{fd}")
    try:
        path = os.readlink(by_descriptor)
        named, held = os.stat(path), os.fstat(fd)
    except OSError:
        return by_descriptor
    if path.startswith("/") and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
        return Path(path)
    return by_descriptor


def receive_hello(conn: socket.socket, seconds: float) -> tuple[bytes, list[int]]:
    """The hello's payload and the descriptors that came with it (close-on-exec: no tool inherits them).

    The whole hello must arrive within `seconds` (TimeoutError), however it is cut: a peer trickling it a byte at a
    time would otherwise hold the session (and keep an idle service alive) for as long as it likes.
    """
    deadline = time.monotonic() + seconds
    conn.settimeout(seconds)
    space = socket.CMSG_SPACE(MAX_HELLO_FDS * 4)
    data, ancillary, _flags, _address = conn.recvmsg(1 << 16, space, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += [int.from_bytes(payload[i : i + 4], sys.byteorder) for i in range(0, usable, 4)]
    size = shift = pos = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        size |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    body = data[pos:]
    try:
        if size > MAX_HELLO_BYTES:
            raise ValueError(f"a hello of {size} bytes (at most {MAX_HELLO_BYTES})")
        while len(body) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no whole hello within {seconds:.0f} s")
            conn.settimeout(left)
            chunk = conn.recv(size - len(body))
            if not chunk:
                break
            body += chunk
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return body, fds
