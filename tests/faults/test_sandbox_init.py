"""Attacks on the tool's init (pid 1 of its namespace): the one process of the sandbox a tool can see.

Init holds the status socket on which the client hears the tool's end. A tool of the same uid could once reach
into init (ptrace, pidfd_getfd, /proc/1/fd: init was dumpable), take that socket and report its own end while its
processes went on running: the action replied, collected outputs a live process still changed, and the tool
outlived it. Both sandboxed modes; tools/test.sh runs them as an ordinary user too.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from treemat.executor import ActionRequest, ActionResult
from treemat.flagfile import ActionSpec
from treemat.layout import Root
from treemat.stack import ISOLATION_COW, ISOLATION_OVERLAY, Stack, open_stack

ACTION_TIMEOUT_S = 120

# Steals every descriptor of pid 1 it can (pidfd_getfd, x86_64 and aarch64 share the number), writes a forged
# `{"exit": 0}` on each socket, then leaves a process running that writes out/x after the forged report.
HIJACK = r"""
import ctypes, marshal, os, socket, sys, time
token, = sys.argv[1:]
libc = ctypes.CDLL(None, use_errno=True)
stolen = []
try:
    names = os.listdir("/proc/1/fd")
except OSError as exc:
    names = []
    print("no /proc/1/fd:", exc.strerror, file=sys.stderr)
if names:
    pidfd = os.pidfd_open(1)
    for name in names:
        fd = libc.syscall(438, pidfd, int(name), 0)
        if fd >= 0:
            stolen.append(fd)
with open("out/stolen", "w") as handle:
    handle.write(f"{len(stolen)} stolen, {len(os.listdir('/proc/self/fd'))} of its own")
if os.fork() == 0:  # the survivor: it rewrites the output once the forged report went out
    os.setsid()
    for fd in (0, 1, 2):
        os.close(fd)
    time.sleep(0.2)
    with open("out/x", "w") as handle:
        handle.write("late " + token)
    time.sleep(300)
    os._exit(0)
with open("out/x", "w") as handle:
    handle.write("first")
for fd in stolen:
    try:
        socket.socket(fileno=fd).send(marshal.dumps({"exit": 0}))
    except OSError:
        pass
if stolen:
    for fd in (0, 1, 2):
        os.close(fd)
    time.sleep(300)  # init waits for this one: only the forged report can end the action now
"""


@pytest.fixture(params=[ISOLATION_OVERLAY, ISOLATION_COW])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    opened = open_stack(Root(tmp_path / "root"), isolation=request.param, background_cleanup=False)
    try:
        yield opened
    finally:
        opened.close()


def _execute(stack: Stack, execroot: Path, argv: list[str], outputs: list[str]) -> ActionResult:
    box: list[ActionResult] = []
    request = ActionRequest(ActionSpec(argv=argv, outputs=outputs), [], execroot)
    thread = threading.Thread(target=lambda: box.append(stack.executor.execute(request)), daemon=True)
    thread.start()
    thread.join(ACTION_TIMEOUT_S)
    assert box, f"action hung for {ACTION_TIMEOUT_S}s"
    return box[0]


def _kill_all(token: str) -> list[str]:
    survivors = subprocess.run(["pgrep", "-f", token], capture_output=True, text=True).stdout.split()
    for pid in survivors:
        subprocess.run(["kill", "-9", pid], check=False)
    return survivors


def test_a_tool_cannot_take_inits_status_socket_and_end_its_action_early(stack: Stack, tmp_path: Path) -> None:
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    token = f"treemat-hijack-{secrets.token_hex(6)}"
    try:
        result = _execute(stack, execroot, [sys.executable, "-c", HIJACK, token], ["out/x", "out/stolen"])
    finally:
        survivors = _kill_all(token)
    assert result.exit_code == 0, result.output
    assert not survivors, f"a process of the tool outlived its action: {survivors}"
    stolen, _, own = (execroot / "out/stolen").read_text().partition(" stolen, ")
    assert stolen == "0", "the tool took descriptors of its sandbox's init"
    assert own != "0 of its own", "the tool cannot see its own descriptors (it must stay dumpable after exec)"
    assert (execroot / "out/x").read_text() == "first"


def test_dev_shm_counts_against_the_tools_one_tmpfs(stack: Stack, tmp_path: Path) -> None:
    """/dev/shm was a tmpfs of its own with no size: a tool could pin its /tmp's size in RAM, then as much again
    in /dev/shm (memory no OOM kill frees while the namespace lives). Every layer it writes shares one tmpfs."""
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    script = (
        "df -P -k /tmp | tail -1 > out/df; dd if=/dev/zero of=/dev/shm/fill bs=1M count=16 2>/dev/null; "
        "df -P -k /tmp | tail -1 >> out/df; ls -ld /dev/shm | cut -c1-10 >> out/df"
    )
    result = _execute(stack, execroot, ["sh", "-c", script], ["out/df"])
    assert result.exit_code == 0, result.output
    before, after, mode = (execroot / "out/df").read_text().splitlines()
    used = int(after.split()[2]) - int(before.split()[2])
    assert used >= 16 * 1024, f"16 MiB written to /dev/shm did not count in the tool's tmpfs:\n{before}\n{after}"
    assert mode == "drwxrwxrwt", mode
