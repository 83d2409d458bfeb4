"""Hosts made of network namespaces: a private bridge, one namespace per host, one filesystem per bot.

Test and dev tooling (`tools/cluster.sh --netns`, tests/bot/test_netns_cluster.py). Every link and address lives
in namespaces this module creates: the bridge sits in a hub namespace, each host namespace gets a veth pair
whose one end is created in the hub (never in the host's namespace) and whose other end becomes the host's
`eth0`. The host's own interfaces, routes and sysctls are never touched. Each bot's treemat root is an ext4
loop image under /var/tmp. `close()` (also on failure) deletes the namespaces (and with them every veth and the
bridge), unmounts the images and removes them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

SUBNET = "10.213.0"
SERVER_HOST = "server"
CLIENT_HOST = "client"
CLONE_NEWNET = 0x40000000
IMAGE_BYTES = 1 << 30


class NetnsUnavailable(RuntimeError):
    """This machine cannot make network namespaces (not root, no `ip netns`, no veth/bridge)."""


def netns_unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here, or None if they can (probed by making one)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns) and mount loop images"
    if shutil.which("ip") is None or shutil.which("mkfs.ext4") is None:
        return "needs iproute2 (ip) and e2fsprogs (mkfs.ext4)"
    name = f"tmprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", name)
        _ip("-n", name, "link", "add", "br0", "type", "bridge")
        _ip("-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    except NetnsUnavailable as error:
        return f"network namespaces do not work here: {error}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Host:
    """One namespace on the bridge: its name (for `ip netns exec`), its address, the hub end of its veth."""

    label: str
    netns: str
    address: str
    hub_link: str

    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a command in this host's network namespace."""
        return ["ip", "netns", "exec", self.netns]


@dataclass
class NetnsNetwork:
    """A bridge in a hub namespace plus hosts; bot filesystems as loop images in `workdir`."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="treemat-netns-", dir="/var/tmp")))
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: dict[str, Host] = field(default_factory=dict)
    _namespaces: list[str] = field(default_factory=list)
    _mounts: list[Path] = field(default_factory=list)

    @classmethod
    def from_env(cls) -> NetnsNetwork:
        """Tag and directory from TREEMAT_NETNS_TAG / TREEMAT_NETNS_DIR when set: tools/cluster.sh picks them, so
        its trap can remove what is left even after this process was SIGKILLed."""
        tag, workdir = os.environ.get("TREEMAT_NETNS_TAG"), os.environ.get("TREEMAT_NETNS_DIR")
        network = cls(workdir=Path(workdir)) if workdir else cls()
        if tag:
            network.tag = tag
        return network

    @property
    def hub(self) -> str:
        """The hub namespace's name (holds the bridge)."""
        return f"tm{self.tag}-hub"

    def __enter__(self) -> NetnsNetwork:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> None:
        """Make the hub and its bridge."""
        os.chmod(self.workdir, 0o755)
        self._add_namespace(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, label: str) -> Host:
        """A namespace with `eth0` on the bridge at the next address (server .1, client .2, bots .10 up)."""
        number = {SERVER_HOST: 1, CLIENT_HOST: 2}.get(label, 10 + len([h for h in self.hosts if h.startswith("bot")]))
        host = Host(label, f"tm{self.tag}-{label}", f"{SUBNET}.{number}", f"v{self.tag}{label}"[:15])
        self._add_namespace(host.netns)
        _ip("-n", self.hub, "link", "add", host.hub_link, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip("-n", self.hub, "link", "set", host.hub_link, "master", "br0", "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        self.hosts[label] = host
        return host

    def bot_filesystem(self, label: str) -> Path:
        """A fresh ext4 loop image mounted at workdir/label: the bot's own disk."""
        image, mountpoint = self.workdir / f"{label}.img", self.workdir / label
        with image.open("wb") as handle:
            handle.truncate(IMAGE_BYTES)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, check=True, timeout=60)
        mountpoint.mkdir()
        subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], capture_output=True, check=True)
        self._mounts.append(mountpoint)
        return mountpoint

    def cut(self, label: str) -> None:
        """Take the host's link down at the bridge (the host sees carrier loss; nothing crosses)."""
        _ip("-n", self.hub, "link", "set", self.hosts[label].hub_link, "down")

    def restore(self, label: str) -> None:
        """Bring the host's link back up."""
        _ip("-n", self.hub, "link", "set", self.hosts[label].hub_link, "up")

    def can_connect(self, label: str, address: str, port: int) -> bool:
        """Whether a TCP connect from host `label` to address:port succeeds (probed from a thread in its netns)."""
        answer: list[bool] = []
        thread = threading.Thread(target=_connect_in, args=(self.hosts[label].netns, address, port, answer))
        thread.start()
        thread.join()
        return bool(answer and answer[0])

    def close(self) -> None:
        """Unmount and delete the images, delete every namespace (its veths and the bridge go with it)."""
        for mountpoint in reversed(self._mounts):
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
        self._mounts.clear()
        for name in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self._namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _connect_in(netns: str, address: str, port: int, answer: list[bool]) -> None:
    """Runs in its own thread: setns(2) moves only this thread into `netns`, then one connect."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{netns}", "rb") as handle:
        if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
            answer.append(False)
            return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock, contextlib.suppress(OSError):
        sock.settimeout(0.5)
        answer.append(sock.connect_ex((address, port)) == 0)
