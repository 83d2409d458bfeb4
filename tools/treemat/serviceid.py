"""What a relay needs before it knows whether the root's service runs: the package's identity (its content hash),
how long to wait for a service, and the error that sends the relay to serve in-process.

Cheap to import (os and functools): a relay whose service answers imports nothing of
servicespawn.py, which starts one (and imports pathlib, the root's layout and the locks to do it).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

ServeHere = Callable[[list[str]], int]  # runs the service in this process (__main__.run_forked_service); its status
WAIT_SECONDS = 60.0  # for a service to start, or to answer a hello (TREEMAT_SERVICE_WAIT_SECONDS)
PACKAGE_FOLDERS = ("", "bot", "commands")  # every module of the package is in one of these


class ServiceUnavailable(Exception):
    """No service could be reached or started: the caller serves in-process."""


def wait_seconds() -> float:
    """How long a relay waits for a service to start or to answer its hello: one stopped or hung (a hung
    filesystem) must not hold the relay, and every relay of the root queued on the service lock behind it."""
    return float(os.environ.get("TREEMAT_SERVICE_WAIT_SECONDS") or WAIT_SECONDS)


def package_hash(package: str | None = None) -> str:
    """A content hash of every module of a treemat package (this one by default): a changed file means another
    service, and a copy whose hash is not its version's is not imported from."""
    from _blake2 import blake2b  # CPython's builtin: 1 ms to import, hashlib's OpenSSL binding 3 ms

    digest = blake2b(digest_size=16)
    package = package or os.path.dirname(os.path.abspath(__file__))
    for folder in PACKAGE_FOLDERS:
        base = os.path.join(package, folder)
        try:
            names = sorted(name for name in os.listdir(base) if name.endswith(".py"))
        except OSError:
            continue
        for name in names:
            with open(os.path.join(base, name), "rb") as handle:
                digest.update(f"{folder}/{name}\0".encode() + handle.read())
    return digest.hexdigest()


@functools.cache
def own_package_hash() -> str:
    """This package's content hash, read once per process (the relay's version and the copy's check share it)."""
    return package_hash()
