"""The stager service and its relay (service.py, relay.py): real relay processes started as Bazel starts a worker
(`python3 -m treemat --persistent_worker --protocol=proto`, cwd = the execroot), real services, real tools."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from itertools import count
from pathlib import Path
from typing import cast

import pytest
from treemat import protos
from treemat.framing import encode_delimited, read_delimited
from treemat.layout import Root
from treemat.manifest import InputManifest
from treemat.protocol import WorkItem, WorkReply
from treemat.relay import ServiceUnavailable, connect, hello_payload, service_name, service_version
from treemat.relaywire import read_varint
from treemat.service import Service, Session
from treemat.stack import Stack

from ..support.harness import TOOLS_DIR, worker_env
from ..support.relays import (
    READ_TIMEOUT,
    RelayProcess,
    answered_within,
    execroot,
    root,
    services,
    the_service,
    tool_running,
)
from ..support.waiting import wait_for

__all__ = ["execroot", "root"]  # fixtures


def test_relays_share_one_service_that_outlives_them_in_a_private_root(execroot: Path, root: Path) -> None:
    first = RelayProcess(execroot, root)
    assert first.touch("out/one", 1).exit_code == 0
    assert first.close() == 0
    service = the_service(root)
    second = RelayProcess(execroot, root)
    reply = second.touch("out/two", 7)
    assert (reply.exit_code, reply.request_id) == (0, 7), reply.output
    assert second.close() == 0
    assert the_service(root) == service  # the second relay found the first one's service
    assert (execroot / "out/one").exists() and (execroot / "out/two").exists()
    assert "unavailable" not in first.stderr + second.stderr
    layout = Root(root)
    for directory in (root, layout.service):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    (sock,) = layout.service.glob("*.sock")
    assert stat.S_ISSOCK(os.stat(sock).st_mode) and stat.S_IMODE(os.stat(sock).st_mode) == 0o600


def test_a_requests_flagfile_is_read_in_the_relays_execroot(execroot: Path, root: Path) -> None:
    """Bazel sends treemat's arguments as one `@params` file, relative to the execroot (the service's cwd is /)."""
    (execroot / "action.params").write_text("--output=out/from-params\n--\ntouch\nout/from-params\n")
    relay = RelayProcess(execroot, root)
    message = protos.WorkRequest(arguments=["@action.params"], request_id=1)
    message.inputs.add(path="in/a", digest=hashlib.sha256((execroot / "in/a").read_bytes()).hexdigest().encode())
    relay.send_message(message)
    reply = relay.read()
    assert reply.exit_code == 0, reply.output
    assert (execroot / "out/from-params").exists()
    relay.close()


def test_a_service_whose_socket_went_exits(execroot: Path, root: Path) -> None:
    """`rm -rf` of the root (or a test's scratch) leaves no service behind for its idle time."""
    relay = RelayProcess(execroot, root)
    assert relay.touch().exit_code == 0
    relay.close()
    assert services(root)
    for sock in Root(root).service.glob("*.sock"):
        sock.unlink()
    wait_for(lambda: not services(root), what="the orphaned service to exit")


def test_stdin_closing_after_an_undecodable_request_ends_the_relay(execroot: Path, root: Path) -> None:
    """The relay cannot read a request id out of garbage; it still exits once stdin ends (never a hang)."""
    relay = RelayProcess(execroot, root)
    assert relay.proc.stdin is not None
    # request_id 5 by the wire, but no WorkRequest (an argument of invalid UTF-8): the service answers id 0
    relay.proc.stdin.write(b"\x05\x18\x05\x0a\x01\xff")
    relay.proc.stdin.flush()
    reply = relay.read()
    assert reply.exit_code == 1 and "malformed work request" in reply.output, reply
    assert relay.close() == 0  # (it answers id 5 too, with the one-line failure, when the service closes)


def test_two_racing_relays_start_exactly_one_service(execroot: Path, root: Path) -> None:
    relays = [RelayProcess(execroot, root) for _ in range(2)]
    for number, relay in enumerate(relays):
        relay.send(["touch", f"out/{number}"], [f"out/{number}"], ["in/a"], number + 1)
    assert [relay.read().exit_code for relay in relays] == [0, 0]
    assert len(services(root)) == 1
    assert [relay.close() for relay in relays] == [0, 0]


def test_an_idle_service_exits_and_the_next_relay_starts_another(execroot: Path, root: Path) -> None:
    quick = {"TREEMAT_SERVICE_IDLE_MINUTES": "0.005"}  # 0.3 s
    relay = RelayProcess(execroot, root, env=quick)
    assert relay.touch().exit_code == 0
    service = the_service(root)
    assert relay.close() == 0
    wait_for(lambda: not services(root), what="the idle service to exit")
    assert not list(Root(root).service.glob("*.sock"))
    again = RelayProcess(execroot, root, env=quick)
    assert again.touch().exit_code == 0
    assert services(root) and services(root) != [service]
    again.close()


def test_the_services_death_fails_in_flight_requests_with_one_line_and_the_next_starts_it_again(
    execroot: Path, root: Path
) -> None:
    relay = RelayProcess(execroot, root)
    assert relay.touch().exit_code == 0
    service = the_service(root)
    relay.send(["sh", "-c", "exec sleep 41.25"], [], ["in/a"], 3)
    wait_for(lambda: tool_running("41.25"), what="the tool to start")
    os.kill(service, signal.SIGKILL)
    reply = relay.read()
    assert (reply.exit_code, reply.request_id) == (1, 3)
    assert reply.output.count("\n") == 1 and "stager service ended" in reply.output, reply.output
    assert relay.touch("out/after", 4).exit_code == 0
    assert the_service(root) != service
    assert relay.close() == 0


@pytest.mark.parametrize("service", ["1", "0"])
def test_a_relay_started_without_site_as_the_launcher_starts_it_serves(
    execroot: Path, root: Path, service: str
) -> None:
    """The launcher runs `python -S` (site-packages and .pth files skipped for the relay's start): the service it
    forks, the one it spawns once that one died, and an in-process worker add the site-packages protobuf is in,
    and none runs a .pth file's hook (10 ms of a service's start on a test machine)."""
    user_base = execroot.parent / "user-base"
    site_dir = user_base / f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    site_dir.mkdir(parents=True)
    hooked = execroot.parent / "hook-ran"
    (site_dir / "hook.pth").write_text(f"import os; open({str(hooked)!r}, 'a').write(str(os.getpid()) + chr(10))\n")
    env = {"TREEMAT_SERVICE": service, "PYTHONUSERBASE": str(user_base)}
    relay = RelayProcess(execroot, root, env=env, python_flags=("-S",))
    assert relay.touch().exit_code == 0, relay.stderr
    if service == "1":
        first = the_service(root)
        relay.send(["sh", "-c", "exec sleep 44.75"], [], ["in/a"], 3)
        wait_for(lambda: tool_running("44.75"), what="the tool to start")
        os.kill(first, signal.SIGKILL)
        assert "stager service ended" in relay.read().output
        assert relay.touch("out/after", 4).exit_code == 0, relay.stderr  # a spawned service, its threads running
        assert the_service(root) != first
    assert relay.close() == 0, relay.stderr
    assert "Traceback" not in relay.stderr and "serving in this process" not in relay.stderr, relay.stderr
    assert not hooked.exists()


def test_a_relay_whose_service_answers_imports_no_more_than_it_needs(execroot: Path, root: Path) -> None:
    """Every fresh worker is a relay: one whose service runs imports neither the code that starts a service
    (servicespawn, locking, the root's layout as paths) nor pathlib, socket or typing (with the enums and regular
    expressions they bring: a third of its start)."""
    assert RelayProcess(execroot, root).close() == 0  # a service runs
    probe = (
        "import os, sys\n"
        "from treemat.relay import relay\n"
        "status = relay({'root': sys.argv[1], 'isolation': 'auto', 'max_workers': ''}, os.environ)\n"
        "print(status, sorted(set(sys.argv[2:]) & set(sys.modules)))\n"
    )
    heavy = ["pathlib", "socket", "typing", "re", "enum", "treemat.servicespawn", "treemat.locking"]
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe, str(root), *heavy],
        cwd=execroot,
        env=worker_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=READ_TIMEOUT,
        check=False,
    )
    assert done.stdout == "0 []\n", (done.stdout, done.stderr)


def test_a_relay_forwards_a_request_before_reading_its_id_and_answers_it_once() -> None:
    """The relay sends a request on, then scans it for its id (a 10,000-input request: ~1-3 ms the service need
    not wait for). An answer that comes before that scan is not counted in flight: when the service then dies,
    the relay fails nothing twice (a second answer to one id)."""
    script = """
import socket, sys, threading
from treemat import protos
from treemat.framing import encode_delimited
from treemat.relay import Relay
from treemat.relaywire import read_frame
ours, theirs = socket.socketpair()
answered, registered = threading.Event(), threading.Event()
write, register = Relay._write, Relay._register
def write_then_mark(self, data):
    write(self, data)
    answered.set()
def register_once_answered(self, sock, frame):
    answered.wait(30)
    register(self, sock, frame)
    registered.set()
Relay._write, Relay._register = write_then_mark, register_once_answered
def service():
    read_frame(theirs)
    theirs.sendall(encode_delimited(protos.WorkResponse(request_id=5, output="done")))
    registered.wait(30)
    theirs.close()  # the service dies after the relay registered the request it answered
threading.Thread(target=service, daemon=True).start()
sys.exit(Relay(lambda: ours).run())
"""
    replies = _relay_answers(script, encode_delimited(protos.WorkRequest(arguments=["--", "true"], request_id=5)))
    assert [(reply.request_id, reply.output) for reply in replies] == [(5, "done")]  # no second answer


def _relay_answers(script: str, stdin: bytes) -> list[protos.WorkResponse]:
    """Every answer a Relay that `script` runs (against a service it fakes) writes for `stdin`'s requests."""
    done = subprocess.run(
        [sys.executable, "-c", script], input=stdin, env=worker_env(), capture_output=True, timeout=READ_TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    replies, answers = io.BytesIO(done.stdout), []
    while (reply := read_delimited(replies, protos.WorkResponse)) is not None:
        answers.append(reply)
    return answers


def test_a_request_whose_id_follows_a_group_is_answered_once_under_its_id_when_the_service_dies() -> None:
    """A group (an unknown field's, which protobuf reads through) once stopped the relay's scan: it counted request
    7 as id 0, the service's answer to 7 as one that came early, and so left the next request 7 out of those in
    flight: the service's death failed an id 0 Bazel never sent, and request 7 was never answered."""
    script = """
import socket, sys, threading
from treemat.framing import encode_delimited
from treemat import protos
from treemat.relay import Relay
from treemat.relaywire import read_frame
ours, theirs = socket.socketpair()
def service():
    read_frame(theirs)
    theirs.sendall(encode_delimited(protos.WorkResponse(request_id=7, output="done")))
    read_frame(theirs)
    theirs.close()  # the service dies with the second request 7 in flight
threading.Thread(target=service, daemon=True).start()
sys.exit(Relay(lambda: ours).run())
"""
    grouped = b"\x0a\x04true" + b"\x2b\x2c" + b"\x18\x07"  # arguments, a group of field 5, request_id 7
    request = encode_delimited(protos.WorkRequest(arguments=["--", "true"], request_id=7))
    replies = _relay_answers(script, bytes([len(grouped)]) + grouped + request)
    assert [(reply.request_id, reply.exit_code) for reply in replies] == [(7, 0), (7, 1)]


def test_a_service_that_dies_after_stdin_ended_has_its_requests_failed_before_the_relay_exits() -> None:
    """At stdin's end the relay waits for the service to answer what it has; the service's death then fails what
    is in flight, and those failures are written before the relay exits (it once exited as the connection was
    dropped, its reader thread still to write them: requests never answered)."""
    script = """
import socket, sys, time
from treemat.relay import Relay
from treemat.relaywire import read_frame
ours, theirs = socket.socketpair()
write = Relay._write
def slow_write(self, data):
    time.sleep(0.5)  # a pipe Bazel drains slowly
    write(self, data)
Relay._write = slow_write
def service():
    read_frame(theirs)
    theirs.recv(1)  # the relay's half-close at stdin's end
    theirs.close()  # the service dies with request 5 in flight
import threading
threading.Thread(target=service, daemon=True).start()
sys.exit(Relay(lambda: ours).run())
"""
    (reply,) = _relay_answers(script, encode_delimited(protos.WorkRequest(arguments=["--", "true"], request_id=5)))
    assert (reply.request_id, reply.exit_code) == (5, 1), reply
    assert reply.output.startswith("treemat: error: the stager service ended"), reply.output


def test_a_request_read_while_the_dead_services_failures_are_written_goes_to_a_new_service() -> None:
    """The relay writes the dead service's failures before it drops the connection: a request read meanwhile
    (Bazel sends the next once it has the failure) waited for that and then failed too ("the service ended while
    this request ran") though no service ever had it; it goes to a new service."""
    script = """
import socket, sys, threading, time
from treemat import protos
from treemat.framing import encode_delimited
from treemat.relay import Relay
from treemat.relaywire import read_frame
first, first_theirs = socket.socketpair()
second, second_theirs = socket.socketpair()
failing = threading.Event()
write = Relay._write
def slow_failure(self, data):
    if not failing.is_set() and b"stager service ended" in data:
        failing.set()
        time.sleep(0.5)  # a pipe Bazel drains slowly: the next request is read meanwhile
    write(self, data)
Relay._write = slow_failure
def died():
    read_frame(first_theirs)
    first_theirs.close()
def serves():
    read_frame(second_theirs)
    second_theirs.sendall(encode_delimited(protos.WorkResponse(request_id=2, output="served")))
    second_theirs.close()
"""
    replies = _two_services_answer(script + _second_request_read_after("failing"), "died, serves")
    assert [(reply.request_id, reply.exit_code, reply.output[:29]) for reply in replies] == [
        (1, 1, "treemat: error: the stager se"),
        (2, 0, "served"),
    ]


def _second_request_read_after(event: str) -> str:
    """Script lines making the relay read its second request from stdin only once `event` (a threading.Event of
    the script's) is set."""
    return f"""
import treemat.relay as relay_module
read, reads = relay_module.read_frame, []
def staged_read(source):
    if source == 0:
        reads.append(source)
        if len(reads) == 2:
            {event}.wait(30)
    return read(source)
relay_module.read_frame = staged_read
"""


def _two_services_answer(script: str, threads: str) -> list[protos.WorkResponse]:
    """What a Relay answers for requests 1 and 2 when `script` fakes a `first` and a `second` service (connected to
    in that order) and starts `threads` (its fakes' functions) before the relay runs."""
    tail = f"""
for target in ({threads}):
    threading.Thread(target=target, daemon=True).start()
services = [second, first]
sys.exit(Relay(services.pop).run())
"""
    requests = [protos.WorkRequest(arguments=["--", "true"], request_id=n) for n in (1, 2)]
    return _relay_answers(script + tail, b"".join(map(encode_delimited, requests)))


def test_a_request_the_dead_service_could_not_take_goes_to_a_new_service() -> None:
    """A service that died before the relay's reader saw it: sending the next request fails (EPIPE). That request
    reached no service, so it is sent to a new one, not failed as one the service ended while it ran."""
    script = """
import socket, sys, threading
from treemat import protos
from treemat.framing import encode_delimited
from treemat.relay import Relay
from treemat.relaywire import read_frame
first, first_theirs = socket.socketpair()
second, second_theirs = socket.socketpair()
first_theirs.close()  # dead before the first request
sent = threading.Event()
pump = Relay._pump
def late_pump(self, sock):
    if sock is first:
        sent.wait(30)  # the reader has not yet seen the connection close
    pump(self, sock)
Relay._pump = late_pump
end = Relay._end
def mark(self, sock, how):
    sent.set()  # its send failed
    end(self, sock, how)
Relay._end = mark
def serves():
    read_frame(second_theirs)
    second_theirs.sendall(encode_delimited(protos.WorkResponse(request_id=3, output="served")))
    second_theirs.close()
threading.Thread(target=serves, daemon=True).start()
services = [second, first]
sys.exit(Relay(services.pop).run())
"""
    request = encode_delimited(protos.WorkRequest(arguments=["--", "true"], request_id=3))
    assert [(reply.request_id, reply.exit_code, reply.output) for reply in _relay_answers(script, request)] == [
        (3, 0, "served")
    ]


def test_an_answer_the_dead_service_sent_before_a_send_failed_is_relayed_once() -> None:
    """A service that answered request 1 and died before the relay's reader read that answer: sending request 2
    fails (EPIPE). The relay failed request 1 then, as in flight, and its reader then relayed the real answer
    too: two answers to one id (the first one wrong). The relay lets its reader read what the service sent
    before it ends the connection."""
    script = """
import socket, sys, threading
from treemat import protos
from treemat.framing import encode_delimited
from treemat.relay import Relay
from treemat.relaywire import read_frame
send_failed, closed = threading.Event(), threading.Event()
class Watched(socket.socket):
    def sendall(self, data):
        try:
            return super().sendall(data)
        except OSError:
            send_failed.set()
            raise
first_plain, first_theirs = socket.socketpair()
first = Watched(fileno=first_plain.detach())
second, second_theirs = socket.socketpair()
pump = Relay._pump
def late_pump(self, sock):
    if sock is first:
        send_failed.wait(30)  # the reader has not yet read the answer when request 2's send fails
    pump(self, sock)
Relay._pump = late_pump
def answers_then_dies():
    read_frame(first_theirs)
    first_theirs.sendall(encode_delimited(protos.WorkResponse(request_id=1, output="done")))
    first_theirs.close()
    closed.set()
def serves():
    read_frame(second_theirs)
    second_theirs.sendall(encode_delimited(protos.WorkResponse(request_id=2, output="served")))
    second_theirs.close()
"""
    replies = _two_services_answer(script + _second_request_read_after("closed"), "answers_then_dies, serves")
    assert sorted((reply.request_id, reply.exit_code, reply.output) for reply in replies) == [
        (1, 0, "done"),
        (2, 0, "served"),
    ]


def test_a_relays_death_cancels_its_requests_and_the_service_serves_others(execroot: Path, root: Path) -> None:
    doomed = RelayProcess(execroot, root)
    doomed.send(["sh", "-c", "exec sleep 42.25"], [], ["in/a"], 5)
    wait_for(lambda: tool_running("42.25"), what="the tool to start")
    service = the_service(root)
    doomed.proc.kill()
    doomed.proc.wait()
    wait_for(lambda: not tool_running("42.25"), what="the dead relay's tool to be cancelled")
    other = RelayProcess(execroot, root)
    assert other.touch(request_id=5).exit_code == 0  # the same multiplex id: each relay's ids are its own
    assert the_service(root) == service
    other.close()


def test_cancel_and_multiplex_ids_pass_through_and_relays_ids_never_meet(execroot: Path, root: Path) -> None:
    first, second = RelayProcess(execroot, root), RelayProcess(execroot, root)
    first.send(["sh", "-c", "exec sleep 43.25"], ["out/never"], ["in/a"], 9)
    wait_for(lambda: tool_running("43.25"), what="the tool to start")
    second.cancel(9)  # another relay's id 9: not this one's to cancel
    assert second.touch("out/nine", 9).exit_code == 0
    assert tool_running("43.25")
    first.cancel(9)
    reply = first.read()
    assert reply.request_id == 9 and reply.was_cancelled
    assert not (execroot / "out/never").exists()
    assert first.close() == 0 and second.close() == 0


def test_each_relay_is_served_in_its_own_execroot_and_environment(tmp_path: Path, root: Path) -> None:
    relays = []
    for name in ("base-a", "base-b"):
        directory = tmp_path / name / "execroot"
        (directory / "in").mkdir(parents=True)
        (directory / "in/a").write_text(f"content of {name}\n")
        relays.append(RelayProcess(directory, root, env={"RELAY_NAME": name}))
    script = 'mkdir -p out; cat in/a > out/copy; echo "$RELAY_NAME" > out/env; ls "$ROOT" > out/root 2>&1 || true'
    for relay in relays:
        relay.send(["env", f"ROOT={root}", "sh", "-c", script], ["out/copy", "out/env", "out/root"], ["in/a"], 1)
    for relay, name in zip(relays, ("base-a", "base-b"), strict=True):
        reply = relay.read()
        assert reply.exit_code == 0, reply.output
        assert (relay.execroot / "out/copy").read_text() == f"content of {name}\n"
        assert (relay.execroot / "out/env").read_text() == f"{name}\n"
        assert "cas" not in (relay.execroot / "out/root").read_text()  # the root (and its socket) is hidden
        relay.close()
    assert len(services(root)) == 1


def test_a_relay_in_another_mount_namespace_gets_a_service_of_its_own(execroot: Path, root: Path) -> None:
    """A relay never hands its tool to a service that sees another filesystem: a mount only the relay's namespace
    has is visible to its tool, and never to the tool of a relay outside it."""
    if not os.access("/var/tmp", os.W_OK):  # `bazel test`: read-only
        pytest.skip("no scratch outside /tmp (a mount below /tmp gives tools an empty private /tmp)")
    private = Path(tempfile.mkdtemp(dir="/var/tmp"))
    (private / "only-here").write_text("host\n")
    probe = ["sh", "-c", f"mkdir -p out; cat {private}/only-here > out/seen 2>/dev/null || echo unseen > out/seen"]
    mounted = f'mount -t tmpfs none {private} && echo mounted > {private}/only-here && exec "$@"'
    outside = RelayProcess(execroot, root)
    outside.send(probe, ["out/seen"], ["in/a"], 1)
    assert outside.read().exit_code == 0
    if (execroot / "out/seen").read_text() != "host\n":
        pytest.skip(f"tools do not see {private} here (a private mount over it)")
    unshare = ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]
    inside = RelayProcess(execroot, root, wrapper=[*unshare, "sh", "-c", mounted, "-"])
    inside.send(probe, ["out/seen"], ["in/a"], 1)
    try:
        reply = inside.read()
    except AssertionError:
        if "unshare:" in inside.stderr or "mount:" in inside.stderr:
            pytest.skip(f"cannot make a mount namespace here: {inside.stderr.strip()[:200]}")
        raise
    assert reply.exit_code == 0, reply.output
    assert (execroot / "out/seen").read_text() == "mounted\n"
    assert len(services(root)) == 2  # one per mount namespace
    outside.send(probe, ["out/seen"], ["in/a"], 2)
    assert outside.read().exit_code == 0
    assert (execroot / "out/seen").read_text() == "host\n"
    inside.close()
    outside.close()
    shutil.rmtree(private)


def test_a_client_of_another_uid_is_refused(execroot: Path, root: Path) -> None:
    mapped = any(
        int(inside) <= 65534 < int(inside) + int(count)
        for inside, _outside, count in (line.split() for line in Path("/proc/self/uid_map").read_text().splitlines())
    )
    if os.geteuid() != 0 or not mapped:
        pytest.skip("acting as another uid needs root and a uid 65534 (the unprivileged leg maps one uid only)")
    relay = RelayProcess(execroot, root)
    assert relay.touch().exit_code == 0
    layout = Root(root)
    (sock,) = layout.service.glob("*.sock")
    public = Path(tempfile.mkdtemp(dir=Path(tempfile.gettempdir())))  # traversable by anyone, like /tmp
    try:
        os.chmod(public, 0o755)
        os.link(sock, public / "s")
        os.chmod(sock, 0o666)  # past the 0700 dir and the 0600 socket (the outer fences): SO_PEERCRED still refuses
        code = (
            "import os, socket, sys\n"
            "os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.connect(sys.argv[1])\n"
            "print(s.recv(4096)[1:].decode())\n"
        )
        result = subprocess.run([sys.executable, "-c", code, str(public / "s")], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("refused\0uid 65534 is not the service's"), result.stdout
    finally:
        shutil.rmtree(public)
    assert relay.touch("out/still", 2).exit_code == 0
    relay.close()


def test_a_version_mismatch_is_detected_and_another_version_gets_its_own_service(
    execroot: Path, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = RelayProcess(execroot, root)
    assert relay.touch().exit_code == 0
    layout = Root(root)
    name = service_name(service_version(), "auto")
    monkeypatch.chdir(execroot)  # the hello passes the cwd
    with pytest.raises(Exception, match="version 1-stale is not the service's"):
        connect(layout.service_file(name, "sock"), hello_payload("1-stale", 1, {}))
    changed = tmp_path / "changed-tools"
    shutil.copytree(TOOLS_DIR / "treemat", changed / "treemat", ignore=shutil.ignore_patterns("__pycache__"))
    with open(changed / "treemat/relay.py", "a") as handle:
        handle.write("# another version\n")
    other = RelayProcess(execroot, root, env={"PYTHONPATH": str(changed)})
    assert other.touch("out/other", 1).exit_code == 0
    assert len(services(root)) == 2 and len(list(layout.service.glob("*.sock"))) == 2
    assert relay.touch("out/old", 2).exit_code == 0  # the old version's relays keep their service
    relay.close()
    other.close()


def test_treemat_stats_reads_the_services_counters(execroot: Path, root: Path) -> None:
    relay = RelayProcess(execroot, root)
    assert relay.touch().exit_code == 0
    relay.close()
    service = the_service(root)
    result = subprocess.run(
        [sys.executable, "-m", "treemat", f"--root={root}", "stats", "--json"],
        capture_output=True,
        text=True,
        env=worker_env(),
        check=True,
    )
    records = [r for r in json.loads(result.stdout)["processes"] if r["pid"] == service]
    assert records and records[0]["role"] == "service" and records[0]["counters"]["actions"] >= 1, result.stdout


def test_an_unreachable_service_falls_back_in_process_with_one_line(execroot: Path, root: Path) -> None:
    Root(root)
    os.rmdir(root / "service")
    (root / "service").write_text("not a directory\n")
    relay = RelayProcess(execroot, root)
    assert relay.touch().exit_code == 0
    assert relay.close() == 0
    lines = relay.stderr.splitlines()
    assert [line for line in lines if "stager service" in line] == [
        next(line for line in lines if "unavailable" in line)
    ]
    assert "serving in this process" in relay.stderr
    assert not services(root)


@pytest.mark.parametrize("switch", ["env", "flag"])
def test_the_service_can_be_turned_off(execroot: Path, root: Path, switch: str) -> None:
    env, extra = ({"TREEMAT_SERVICE": "0"}, ()) if switch == "env" else ({}, ("--no-service",))
    relay = RelayProcess(execroot, root, env=env, extra=extra)
    assert relay.touch().exit_code == 0
    assert relay.close() == 0
    assert not services(root) and "stager service" not in relay.stderr


def test_a_long_root_path_still_reaches_its_service(tmp_path: Path, execroot: Path) -> None:
    root = tmp_path / ("r" * 120)
    try:
        relay = RelayProcess(execroot, root)
        assert relay.touch().exit_code == 0
        assert "unavailable" not in relay.stderr
        relay.close()
        assert len(services(root)) == 1
    finally:
        for pid in services(root):
            os.kill(pid, signal.SIGKILL)


def test_the_socket_name_depends_on_the_version_and_isolation() -> None:
    version = service_version()
    assert service_name(version, "auto") == service_name(version, "auto")
    assert len({service_name(version, "auto"), service_name(version, "none"), service_name("0-x", "auto")}) == 3
    assert socket.AF_UNIX  # (the platform has Unix sockets: the relay's only requirement)


def test_a_relay_in_another_cgroup_gets_a_service_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool runs in the service's cgroup, which is the first relay's: a relay Bazel put in a cgroup of its own
    (a per-worker memory limit) had its tools escape that limit in a service outside it, as a lower rlimit did."""
    from treemat import relay

    version = service_version()
    ours = service_name(version, "auto")
    real_read = relay._read

    def in_another_cgroup(path: str) -> str:
        return "0::/bazel-worker-7\n" if path == "/proc/self/cgroup" else real_read(path)

    monkeypatch.setattr(relay, "_read", in_another_cgroup)
    assert service_name(version, "auto") != ours


def test_a_relay_under_another_personality_gets_a_service_of_its_own(execroot: Path, root: Path) -> None:
    """A tool inherits the personality of the service (`setarch i686`: uname says i686, a 32-bit build's
    configure sees it; `setarch -R`: no address randomization): a relay under another one got its tools run under
    the first relay's."""
    if not shutil.which("setarch"):
        pytest.skip("needs setarch(8)")
    first = RelayProcess(execroot, root)
    assert first.touch().exit_code == 0
    narrow = RelayProcess(execroot, root, wrapper=["setarch", "i686"])
    narrow.send(["sh", "-c", "uname -m > out/arch"], ["out/arch"], ["in/a"], 1)
    reply = narrow.read()
    assert reply.exit_code == 0, reply.output
    assert (execroot / "out/arch").read_text() == "i686\n"
    assert narrow.close() == 0 and first.close() == 0


def test_a_relay_pinned_to_fewer_cpus_gets_a_service_of_its_own(execroot: Path, root: Path) -> None:
    """A tool inherits the service's CPU affinity: `taskset -c 0 bazel build` (to leave the other cores free) had
    its tools run on every core of the relay that started the service."""
    if not shutil.which("taskset") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs taskset(1) and two CPUs")
    first = RelayProcess(execroot, root)
    assert first.touch().exit_code == 0
    cpu = min(os.sched_getaffinity(0))
    pinned = RelayProcess(execroot, root, wrapper=["taskset", "-c", str(cpu)])
    probe = "grep Cpus_allowed_list /proc/self/status | cut -f2 > out/cpus"
    pinned.send(["sh", "-c", probe], ["out/cpus"], ["in/a"], 1)
    reply = pinned.read()
    assert reply.exit_code == 0, reply.output
    assert (execroot / "out/cpus").read_text() == f"{cpu}\n"
    assert pinned.close() == 0 and first.close() == 0


@pytest.mark.parametrize(
    ("wrapper", "probe", "expected"),
    [
        (["nice", "-n", "7"], "nice", "7"),
        (["choom", "-n", "900", "--"], "cat /proc/self/oom_score_adj", "900"),
    ],
    ids=["nice", "oom_score_adj"],
)
def test_a_relay_of_lower_priority_gets_a_service_of_its_own(
    execroot: Path, root: Path, wrapper: list[str], probe: str, expected: str
) -> None:
    """A tool inherits the service's CPU priority and OOM score: `nice bazel build` (to keep the machine
    responsive) had its tools run at the priority of the relay that started the service."""
    if not shutil.which(wrapper[0]):
        pytest.skip(f"needs {wrapper[0]}(1)")
    first = RelayProcess(execroot, root)
    assert first.touch().exit_code == 0
    lowered = RelayProcess(execroot, root, wrapper=wrapper)
    lowered.send(["sh", "-c", f"{probe} > out/seen"], ["out/seen"], ["in/a"], 1)
    reply = lowered.read()
    assert reply.exit_code == 0, reply.output
    assert (execroot / "out/seen").read_text().strip() == expected
    assert lowered.close() == 0 and first.close() == 0


def test_a_relay_in_another_uts_namespace_gets_a_service_of_its_own(execroot: Path, root: Path) -> None:
    """A tool is in the service's UTS (and IPC, time, cgroup) namespace: a relay in a UTS namespace of its own
    (a container's hostname) had its tools see the hostname of the relay that started the service."""
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs the right to make a UTS namespace")
    first = RelayProcess(execroot, root)
    assert first.touch().exit_code == 0
    renamed = ["unshare", "--uts", "sh", "-c", 'hostname treemat-elsewhere && exec "$@"', "sh"]
    other = RelayProcess(execroot, root, wrapper=renamed)
    other.send(["sh", "-c", "hostname > out/host"], ["out/host"], ["in/a"], 1)
    reply = other.read()
    assert reply.exit_code == 0, reply.output
    assert (execroot / "out/host").read_text() == "treemat-elsewhere\n"
    assert other.close() == 0 and first.close() == 0


def test_a_request_too_big_for_the_relays_memory_fails_with_one_line_and_the_relay_serves_on(
    execroot: Path, root: Path
) -> None:
    """A relay under an address-space limit (Bazel's worker memory limit, a ulimit -v) given a request it cannot
    hold (a huge argument list): it died with a MemoryError traceback, and every request in flight with it."""
    if not shutil.which("prlimit"):
        pytest.skip("needs prlimit(1)")
    relay = RelayProcess(execroot, root, wrapper=["prlimit", f"--as={300 << 20}", "--"])
    assert relay.touch().exit_code == 0, relay.stderr
    message = protos.WorkRequest(request_id=0)
    message.arguments.extend(["--output=out/big", "--", "true", "x" * (250 << 20)])
    relay.send_message(message)
    del message
    reply = answered_within(relay, READ_TIMEOUT)
    assert reply.exit_code == 1 and reply.output.count("\n") == 1, reply.output[:300]
    assert "memory" in reply.output and "did not run" in reply.output, reply.output
    assert relay.touch("out/after").exit_code == 0, relay.stderr[-2000:]
    assert relay.close() == 0


@pytest.mark.parametrize("held", [0, 1, 5, 1000])
def test_a_frame_too_big_to_hold_is_read_through_for_its_id_and_cancel_flag(held: int) -> None:
    """relaywire's MemoryError path: the fields are found and every byte of the frame consumed (the next one is
    framed), however much of it was held when memory ran out, even past garbage."""
    import io

    from treemat.relaywire import skim

    for message, fields in [
        (protos.WorkRequest(arguments=["a" * 70000, "b"], request_id=7), {3: 7}),
        (protos.WorkRequest(request_id=9, cancel=True), {3: 9, 4: 1}),
        (protos.WorkRequest(arguments=["x"]).SerializeToString() + b"\x1f\xff" * 40, {}),
    ]:
        body = message if isinstance(message, bytes) else message.SerializeToString()
        cut = min(held, len(body))
        stream = io.BytesIO(body[cut:] + b"NEXT")
        chunks = [body[i : min(i + 3, cut)] for i in range(0, cut, 3)]
        assert skim(chunks, stream.read, len(body) - cut) == fields
        assert stream.read() == b"NEXT"


def test_the_service_stages_in_the_relays_execroot_by_its_path_so_the_execroot_watch_serves_it(
    execroot: Path, root: Path
) -> None:
    relay = RelayProcess(execroot, root)
    for request_id in (1, 2, 3):  # one action again and again: its pooled exec dir is reused
        reply = relay.touch("out/x", request_id)
        assert reply.exit_code == 0, reply.output
    (execroot / "in/a").chmod(0o755)
    relay.send(["sh", "-c", "test -x in/a && touch out/x"], ["out/x"], ["in/a"], 4)
    reply = relay.read()
    assert reply.exit_code == 0, reply.output  # the chmod is seen through the watch
    relay.close()
    result = subprocess.run(
        [sys.executable, "-m", "treemat", f"--root={root}", "stats", "--json"],
        capture_output=True,
        text=True,
        env=worker_env(),
        check=True,
    )
    (record,) = [r for r in json.loads(result.stdout)["processes"] if r["pid"] == the_service(root)]
    # a /proc/self/fd/N execroot crosses a link: the watch could vouch for nothing and every reuse read every bit
    assert record["counters"].get("execbit_checks_marked", 0) >= 1, record["counters"]


@pytest.mark.parametrize("swap", ["symlink", "directory"])
def test_outputs_never_land_outside_the_relays_execroot_when_its_path_is_swapped(
    tmp_path: Path, execroot: Path, root: Path, swap: str
) -> None:
    """The relay's execroot renamed and its path replaced between requests (a symlink to a directory elsewhere,
    or another directory): the outputs still land in the relay's own directory (its descriptor), never at the
    path's new target."""
    relay = RelayProcess(execroot, root)
    assert relay.touch("out/x", 1).exit_code == 0
    moved = tmp_path / "moved"
    execroot.rename(moved)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(moved, elsewhere)
    (elsewhere / "out/x").unlink()
    if swap == "symlink":
        execroot.symlink_to(elsewhere)
    else:
        elsewhere.rename(execroot)
        elsewhere = execroot
    relay.execroot = moved  # the digests of its inputs: the relay's own files
    reply = relay.touch("out/y", 2)
    assert reply.exit_code == 0, reply.output
    assert (moved / "out/y").is_file()
    assert not (elsewhere / "out/y").exists()
    assert relay.close() == 0


def test_a_service_out_of_descriptors_refuses_the_next_relay_with_one_line_and_keeps_serving(
    execroot: Path, root: Path
) -> None:
    """RLIMIT_NOFILE reached in the service (idle connections hold its descriptors): a relay that connects then is
    refused with the reason, the service lives on and serves again once descriptors are free."""
    relay = RelayProcess(execroot, root)
    assert relay.touch("out/x", 1).exit_code == 0
    pid = the_service(root)
    path = Root(root).service_file(service_name(service_version(), "auto"), "sock")
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 4, hard))
    idle = []
    for _ in range(8):  # each accepted one holds a descriptor, waiting for its hello
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        idle.append(sock)
    with pytest.raises(ServiceUnavailable, match="file descriptors"):
        connect(path, hello_payload(service_version(), 1, {}))
    for sock in idle:
        sock.close()
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert relay.touch("out/y", 2).exit_code == 0
    assert the_service(root) == pid
    assert relay.close() == 0


def test_a_tool_cannot_use_another_roots_service(tmp_path: Path) -> None:
    """A tool sees the host read-only, with its own root masked but not another root of the same uid: it can
    connect to that root's service socket. Its hello is refused (the peer is not in the service's mount
    namespace), so it cannot have that service read or write past its own sandbox."""
    if not os.access("/var/tmp", os.W_OK):  # `bazel test`: read-only
        pytest.skip("no scratch outside /tmp (below /tmp, a tool's view is a private /tmp)")
    scratch = Path(tempfile.mkdtemp(dir="/var/tmp"))
    execroot, root, other_root = scratch / "execroot", scratch / "root", scratch / "other-root"
    (execroot / "in").mkdir(parents=True)
    (execroot / "out").mkdir()
    (execroot / "in/a").write_text("input a\n")
    relay = RelayProcess(execroot, root)
    assert relay.touch().exit_code == 0
    (sock,) = Root(root).service.glob("*.sock")
    other = RelayProcess(execroot, other_root)
    code = (
        "import sys\n"
        "from pathlib import Path\nfrom treemat.relay import connect, hello_payload\n"
        "try:\n"
        "    connect(Path(sys.argv[1]), hello_payload(sys.argv[2], 1, {}))\n"
        "    print('accepted')\n"
        "except Exception as exc:\n"
        "    print(exc)\n"
    )
    try:
        other.send(
            ["sh", "-c", f'{sys.executable} -c "$0" "$@" > out/said', code, str(sock), service_version()],
            ["out/said"],
            ["in/a"],
        )
        reply = other.read()
        assert reply.exit_code == 0, reply.output
        said = (execroot / "out/said").read_text()
        assert "accepted" not in said and "mount namespace" in said, said
        assert other.close() == 0
        assert relay.touch("out/still", 2).exit_code == 0
        assert relay.close() == 0
    finally:
        for pid in services(other_root) + services(root):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)


def test_a_peer_that_never_says_hello_does_not_keep_an_idle_service_alive(execroot: Path, root: Path) -> None:
    """A connection that sends nothing (or half a hello) is dropped after a while: the service still retires.
    The peers connect while the relay is served: once it closes, the service may retire 0.3 s later."""
    relay = RelayProcess(execroot, root, env={"TREEMAT_SERVICE_IDLE_MINUTES": "0.005"})  # 0.3 s
    assert relay.touch().exit_code == 0
    path = Root(root).service_file(service_name(service_version(), "auto"), "sock")
    silent, partial = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    silent.connect(str(path))
    partial.connect(str(path))
    partial.sendall(b"\xff\xff\xff\x7f" + b"x" * 100)  # a hello announcing 256 MiB, then silence
    assert relay.close() == 0
    wait_for(lambda: not services(root), what="the idle service to exit")
    assert silent.recv(1) == b"" and partial.recv(1) == b""
    silent.close()
    partial.close()


def test_a_peer_trickling_its_hello_is_dropped_once_the_whole_hello_is_late(execroot: Path, root: Path) -> None:
    """A byte every half second never trips a per-read timeout: the deadline is for the whole hello. The peer
    connects while the relay is served: once it closes, the service may retire 0.3 s later."""
    relay = RelayProcess(execroot, root, env={"TREEMAT_SERVICE_IDLE_MINUTES": "0.005"})  # hello within 2 s
    assert relay.touch().exit_code == 0
    path = Root(root).service_file(service_name(service_version(), "auto"), "sock")
    peer = socket.socket(socket.AF_UNIX)
    peer.connect(str(path))
    stop = threading.Event()

    def trickle() -> None:
        with contextlib.suppress(OSError):
            peer.sendall(b"\xe8\x07")  # a hello of 1,000 bytes, then one byte at a time
            while not stop.wait(0.5):  # the pace of the trickle, not a wait for anything
                peer.sendall(b"x")

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    assert relay.close() == 0
    try:
        wait_for(lambda: not services(root), what="the idle service to drop the trickling peer and exit")
    finally:
        stop.set()
        sender.join()
        peer.close()


@pytest.mark.parametrize("change", ["symlink", "group-writable", "other-writable"])
def test_a_service_dir_replaced_by_a_symlink_or_opened_to_others_is_not_used(
    tmp_path: Path, execroot: Path, root: Path, change: str
) -> None:
    """Someone who could plant a socket there would get the relay's hello (its environment, a descriptor of its
    execroot) and answer for the service: the relay says why in one line and serves in-process instead."""
    relay = RelayProcess(execroot, root)
    assert relay.touch().exit_code == 0
    assert relay.close() == 0
    service_dir = Root(root).service
    if change == "symlink":
        elsewhere = tmp_path / "elsewhere"
        service_dir.rename(elsewhere)
        service_dir.symlink_to(elsewhere)
    else:
        service_dir.chmod(0o770 if change == "group-writable" else 0o707)
    again = RelayProcess(execroot, root)
    assert again.touch("out/y", 1).exit_code == 0
    assert again.close() == 0
    said = wait_for(lambda: again.stderr, what="the relay's line on stderr")
    assert "the stager service is unavailable" in said and str(service_dir) in said, said


def test_a_relay_sends_no_hello_to_a_socket_served_by_another_uid(
    tmp_path: Path, execroot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay's side of SO_PEERCRED: a listener of another uid (a planted socket) gets no hello."""
    mapped = any(
        int(inside) <= 65534 < int(inside) + int(count)
        for inside, _outside, count in (line.split() for line in Path("/proc/self/uid_map").read_text().splitlines())
    )
    if os.geteuid() != 0 or not mapped:
        pytest.skip("listening as another uid needs root and a uid 65534 (the unprivileged leg maps one uid only)")
    path = tmp_path / "planted.sock"
    code = (
        "import os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.bind(sys.argv[1])\n"
        "os.setuid(65534)\n"
        "s.listen(1)\n"
        "print('listening', flush=True)\n"
        "conn, _ = s.accept()\n"
        "print('got', len(conn.recv(1 << 16)), flush=True)\n"
    )
    planted = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert planted.stdout is not None and planted.stdout.readline() == "listening\n"
        monkeypatch.chdir(execroot)  # the hello passes the cwd
        with pytest.raises(ServiceUnavailable, match="served by uid 65534"):
            connect(path, hello_payload(service_version(), 1, {"SECRET": "x"}))
        assert planted.stdout.readline() == "got 0\n"  # the connection closed, no byte of the hello sent
    finally:
        planted.kill()
        planted.wait()


@pytest.mark.parametrize(
    "attack", ["garbage", "long-garbage", "no-fd", "file-fd", "five-fds", "forged-version", "huge-workers"]
)
def test_a_malformed_hello_is_refused_with_its_reason_and_the_service_keeps_serving(
    execroot: Path, root: Path, attack: str
) -> None:
    relay = RelayProcess(execroot, root)
    assert relay.touch().exit_code == 0
    pid = the_service(root)
    path = Root(root).service_file(service_name(service_version(), "auto"), "sock")
    version = service_version()
    hello = hello_payload("1-forged" if attack == "forged-version" else version, 1, {})
    if attack == "garbage":
        hello = b"\x20" + os.urandom(32)
    if attack == "long-garbage":  # its "version" comes back as 30 U+FFFD: an answer of more than 127 bytes
        hello = b"\x20" + b"x\0" + b"\xff" * 30
    if attack == "huge-workers":
        hello = hello_payload(version, 10**12, {})
    directory = os.open(execroot, os.O_RDONLY | os.O_DIRECTORY)
    file = os.open(execroot / "in/a", os.O_RDONLY)
    fds = {"no-fd": [], "file-fd": [file], "five-fds": [directory] * 5}.get(attack, [directory])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))]
        sock.sendmsg([hello], rights if fds else [])
        answer = sock.recv(1 << 16)
        said = answer[read_varint(answer, 0)[1] :].decode(errors="replace")  # 2 bytes of length past 127 bytes
    finally:
        sock.close()
        os.close(directory)
        os.close(file)
    if attack == "huge-workers":
        assert said.startswith("ok\0"), said  # the pool is bounded by the requests it gets, not by the number
    else:
        assert said.startswith("refused\0"), said
    assert relay.touch("out/y", 2).exit_code == 0
    assert the_service(root) == pid
    assert relay.close() == 0


def test_outputs_land_in_the_relays_execroot_when_its_path_is_swapped_while_the_tool_runs(tmp_path: Path) -> None:
    """The swap between staging and the copy-out: the outputs follow the relay's descriptor, not the path."""
    if not os.access("/var/tmp", os.W_OK):  # `bazel test`: read-only
        pytest.skip("no scratch outside /tmp (below /tmp, a tool's view is a private /tmp)")
    scratch = Path(tempfile.mkdtemp(dir="/var/tmp"))
    execroot, root, go = scratch / "execroot", scratch / "root", scratch / "go"
    (execroot / "in").mkdir(parents=True)
    (execroot / "out").mkdir()
    (execroot / "in/a").write_text("input a\n")
    try:
        relay = RelayProcess(execroot, root)
        marker = f"swap-marker-{os.getpid()}"
        relay.send(["sh", "-c", f"while [ ! -e {go} ]; do :; done; touch out/y", marker], ["out/y"], ["in/a"], 1)
        wait_for(lambda: tool_running(marker), what="the tool to start")
        moved, elsewhere = scratch / "moved", scratch / "elsewhere"
        execroot.rename(moved)
        (elsewhere / "out").mkdir(parents=True)
        execroot.symlink_to(elsewhere)
        go.touch()
        reply = relay.read()
        assert reply.exit_code == 0, reply.output
        assert (moved / "out/y").is_file()
        assert not (elsewhere / "out/y").exists()
        assert relay.close() == 0
    finally:
        for pid in services(root):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.parametrize(
    "tail",
    [b"\x20\x0a\x05abc", b"\xff\xff\xff\xff\xff\xff\x01", b"\x80" * 40],
    ids=["cut-message", "giant-size", "endless-varint"],
)
def test_stdin_ending_inside_a_frame_is_answered_and_the_request_in_flight_still_is(
    execroot: Path, root: Path, tail: bytes
) -> None:
    """The relay frames stdin by hand: a frame it cannot read (cut short, a size past the limit, a length prefix
    that never ends) is answered with one line, as the in-process worker answers it, and the request in flight
    is still answered; the relay ends with status 0 (it once died with a traceback and lost the request)."""
    relay = RelayProcess(execroot, root)
    assert relay.touch().exit_code == 0
    relay.send(["touch", "out/late"], ["out/late"], ["in/a"], 5)
    assert relay.proc.stdin is not None and relay.proc.stdout is not None
    relay.proc.stdin.write(tail)
    relay.proc.stdin.close()
    replies = []
    while (reply := read_delimited(relay.proc.stdout, protos.WorkResponse)) is not None:
        replies.append((reply.request_id, reply.exit_code, reply.output))
    assert relay.proc.wait(timeout=READ_TIMEOUT) == 0, relay.stderr
    assert (5, 0, "") in replies, replies
    (malformed,) = [reply for reply in replies if reply[0] == 0]
    assert malformed[1] == 1 and malformed[2].startswith("treemat: malformed work request: "), malformed
    assert malformed[2].count("\n") == 1 and (execroot / "out/late").exists()


def syscall_of(pid: int, tid: int) -> list[int]:
    """The syscall thread `tid` of `pid` waits in and its arguments (/proc/<pid>/task/<tid>/syscall), or []."""
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
    except OSError:
        return []
    return [int(fields[0])] + [int(field, 16) for field in fields[1:7]] if fields[0].isdigit() else []


def parked(call: list[int]) -> bool:
    """True for a wait with no timeout (x86-64): a futex wait (a join, a lock) or a poll, not the GIL's 5 ms."""
    forever = {2**32 - 1, 2**64 - 1}
    return bool(call) and ((call[0] == 202 and call[4] == 0) or (call[0] == 7 and call[3] in forever))


def test_a_relay_killed_while_it_waits_for_its_last_answers_has_its_requests_cancelled(
    execroot: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay whose stdin ended half-closes its connection and waits for what is in flight; killed then, its tool
    is cancelled (it was once left to run to its end, however long, its session holding the service)."""
    if os.uname().machine != "x86_64":
        pytest.skip("reads x86-64 syscall numbers from /proc/<pid>/task/<tid>/syscall")
    relay = RelayProcess(execroot, root)
    assert relay.touch().exit_code == 0
    assert relay.close() == 0
    pid = the_service(root)
    before = set(os.listdir(f"/proc/{pid}/fd"))
    monkeypatch.chdir(execroot)  # the hello passes the cwd
    path = Root(root).service_file(service_name(service_version(), "auto"), "sock")
    sock, _pid = connect(path, hello_payload(service_version(), 2, dict(os.environ)))
    fds = [int(fd) for fd in set(os.listdir(f"/proc/{pid}/fd")) - before]
    (conn,) = [fd for fd in fds if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")]
    message = protos.WorkRequest(arguments=["--", "sh", "-c", "exec sleep 45.25"], request_id=5)
    message.inputs.add(path="in/a", digest=hashlib.sha256((execroot / "in/a").read_bytes()).hexdigest().encode())
    sock.sendall(encode_delimited(message))
    wait_for(lambda: tool_running("45.25"), what="the tool to start")
    tids = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    reading = wait_for(
        lambda: [tid for tid in tids if syscall_of(pid, tid)[:2] == [45, conn]], what="the session to read requests"
    )
    sock.shutdown(socket.SHUT_WR)  # what the relay does at stdin's end
    wait_for(lambda: parked(syscall_of(pid, reading[0])), what="the session to read the half-close and wait")
    sock.close()  # the relay killed
    wait_for(lambda: not tool_running("45.25"), timeout=20, what="the dead relay's tool to be cancelled")
    again = RelayProcess(execroot, root)
    assert again.touch("out/y", 1).exit_code == 0 and the_service(root) == pid
    assert again.close() == 0


def refuse_threads(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    """`threading.Thread.start` fails for threads named `prefix...`, as every start does at RLIMIT_NPROC (a thread
    counts as a process) or a cgroup's pids limit."""
    start = threading.Thread.start

    def refuse(thread: threading.Thread) -> None:
        if thread.name.startswith(prefix):
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse)


def test_a_relay_that_cannot_start_a_thread_answers_each_request_with_one_line(execroot: Path, root: Path) -> None:
    """The relay reads the service's answers in a thread of its own: with none to be had, each request fails with
    one line and the relay serves on to stdin's end (it once died with a traceback, no request answered)."""
    code = (
        "import sys, threading\n"
        "start = threading.Thread.start\n"
        "def refuse(thread):\n"
        "    if thread.name.startswith('treemat-relay'):\n"
        '        raise RuntimeError("can\'t start new thread")\n'
        "    start(thread)\n"
        "threading.Thread.start = refuse\n"
        "from treemat.__main__ import main\n"
        "sys.exit(main(sys.argv[4:]))\n"
    )
    relay = RelayProcess(execroot, root, wrapper=[sys.executable, "-c", code])
    for request_id in (1, 2):
        reply = relay.touch(f"out/{request_id}", request_id)
        assert (reply.request_id, reply.exit_code) == (request_id, 1), reply
        assert reply.output.count("\n") == 1 and "can't start new thread" in reply.output, reply.output
    assert relay.close() == 0, relay.stderr
    assert "Traceback" not in relay.stderr, relay.stderr


def test_a_service_that_cannot_start_a_thread_refuses_the_relay_with_its_reason_and_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session's thread refused: that relay is told why (it serves in-process); the service did not die with
    every other relay's requests in flight."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s"))
    listener.listen(1)
    service = Service(cast(Stack, None), listener, "name", 60.0)  # accepting needs no stack
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(str(tmp_path / "s"))
    refuse_threads(monkeypatch, "treemat-session")
    service._accept()
    said = peer.recv(1 << 16)[1:].decode()
    assert said.startswith("refused\0the service cannot start a thread (can't start new thread)"), said
    assert service._clients == 0
    peer.close()
    listener.close()


def test_a_request_no_thread_can_be_started_for_is_answered_once_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The request's thread refused: the request is answered at once, and never run (nor answered again) by the
    thread started for a later request (a pool's would pick it from the queue)."""
    ours, theirs = socket.socketpair()
    ran: list[int] = []

    def handler(item: WorkItem) -> WorkReply:
        ran.append(item.request_id)
        return WorkReply(item.request_id, 0, "")

    session = Session(ours, handler, lambda _service_id: True, count(1), 1)
    refuse_threads(monkeypatch, "treemat-service")
    session.dispatch(WorkItem(7, ["--", "true"], InputManifest.of([])))
    replies = theirs.makefile("rb")
    reply = read_delimited(replies, protos.WorkResponse)
    assert reply is not None and (reply.request_id, reply.exit_code) == (7, 1), reply
    assert reply.output.count("\n") == 1 and "cannot start a thread" in reply.output, reply.output
    monkeypatch.undo()
    session.dispatch(WorkItem(8, ["--", "true"], InputManifest.of([])))
    reply = read_delimited(replies, protos.WorkResponse)
    assert reply is not None and (reply.request_id, reply.exit_code) == (8, 0), reply
    theirs.shutdown(socket.SHUT_WR)
    session.run()  # reads the end at once, waits for the pool
    ours.close()
    assert ran == [2]  # request 8's service id; 7 (service id 1) never ran
    assert read_delimited(replies, protos.WorkResponse) is None  # nor was it answered twice
    replies.close()
    theirs.close()


def test_a_session_runs_at_most_its_relays_pool_size_at_once_and_answers_every_request() -> None:
    ours, theirs = socket.socketpair()
    lock, release = threading.Lock(), threading.Event()
    running, most = [0], [0]

    def handler(item: WorkItem) -> WorkReply:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        release.wait(READ_TIMEOUT)
        with lock:
            running[0] -= 1
        return WorkReply(item.request_id, 0, "")

    session = Session(ours, handler, lambda _service_id: True, count(1), 2)
    for request_id in range(1, 5):
        session.dispatch(WorkItem(request_id, ["--", "true"], InputManifest.of([])))
    wait_for(lambda: running[0] == 2, what="two requests to run")
    release.set()
    theirs.shutdown(socket.SHUT_WR)
    session.run()
    ours.close()
    replies = theirs.makefile("rb")
    answered = [read_delimited(replies, protos.WorkResponse) for _ in range(4)]
    assert sorted(reply.request_id for reply in answered if reply is not None) == [1, 2, 3, 4]
    assert most[0] == 2
    replies.close()
    theirs.close()


def test_a_service_imports_no_thread_pool_module() -> None:
    """concurrent.futures brings logging, traceback and tokenize: ~6 ms of a cold service's start (a fresh CI
    machine's first action); a session runs a thread per request instead."""
    probe = (
        "import sys, treemat.servicespawn as spawn; spawn.add_site_packages(pth_files=False); import treemat.service;"
        " print(sorted({'concurrent.futures', 'logging'} & set(sys.modules)))"
    )
    command = [sys.executable, "-S", "-c", probe]  # as a service starts (no .pth file's hook imports anything)
    done = subprocess.run(command, env=worker_env(), capture_output=True, text=True, check=False)
    assert done.stdout == "[]\n", (done.stdout, done.stderr)


def test_a_peer_whose_pid_another_process_took_after_it_connected_is_refused(
    execroot: Path, root: Path, tmp_path: Path
) -> None:
    """SO_PEERCRED's pid names the process that connected only while it lives. A peer outside the service's mount
    namespace (a tool of another root) connects, hands the connection to a child, exits; once a process of the
    service's namespaces holds its pid, the child sends the rest of the hello: the peer is still refused (it was
    served, as if it were a relay of the service's namespaces)."""
    if os.geteuid() != 0 or not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("choosing the next pid (ns_last_pid) needs root")
    relay = RelayProcess(execroot, root)
    assert relay.touch().exit_code == 0
    path = Root(root).service_file(service_name(service_version(), "auto"), "sock")
    code = (
        "import os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "hello, top = bytes.fromhex(sys.argv[2]), os.open('/', os.O_RDONLY | os.O_DIRECTORY)\n"
        "s.sendmsg([hello[:4]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, top.to_bytes(4, sys.byteorder))])\n"
        "if os.fork() == 0:\n"
        "    sys.stdin.readline()\n"
        "    s.sendall(hello[4:])\n"
        "    said = s.recv(1 << 16)\n"
        "    print(said[next(n for n, byte in enumerate(said) if byte < 128) + 1 :].decode(), flush=True)\n"
        "os._exit(0)\n"
    )
    hello = hello_payload(service_version(), 1, {"PATH": "/usr/bin:/bin"}).hex()
    peer = subprocess.Popen(
        ["unshare", "--mount", sys.executable, "-c", code, str(path), hello],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert peer.wait(timeout=READ_TIMEOUT) == 0  # the process that connected is gone: its pid is free
    taker = None
    try:
        Path("/proc/sys/kernel/ns_last_pid").write_text(f"{peer.pid - 1}\n")
        taker = subprocess.Popen(["sleep", "60"])  # in the service's namespaces
        if taker.pid != peer.pid:
            pytest.skip(f"another process took pid {peer.pid} first")
        assert peer.stdin is not None and peer.stdout is not None
        peer.stdin.write("go\n")
        peer.stdin.flush()
        said = peer.stdout.readline()
        assert said.startswith("refused\0"), said
    finally:
        if taker is not None:
            taker.kill()
            taker.wait()
        for pipe in (peer.stdin, peer.stdout):
            if pipe is not None:
                pipe.close()
    assert relay.touch("out/y", 2).exit_code == 0
    assert relay.close() == 0


def test_a_relay_with_fewer_groups_gets_no_service_that_has_more(tmp_path: Path) -> None:
    """The tools run with the service's credentials: a relay of the same uid without one of the groups of the relay
    that started the service gets a service of its own, whose tools cannot read what only that group can (they
    once could: the socket's name told uids apart, not groups)."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.access("/var/tmp", os.W_OK):
        pytest.skip("acting as another uid with chosen groups needs root, setpriv(1) and /var/tmp")
    scratch = Path(tempfile.mkdtemp(dir="/var/tmp"))  # below /tmp, a tool's view is a private /tmp
    execroot, root, secret = scratch / "execroot", scratch / "root", scratch / "secret"
    (execroot / "in").mkdir(parents=True)
    (execroot / "out").mkdir()
    (execroot / "in/a").write_text("input a\n")
    secret.write_text("for group 4242 only\n")
    os.chown(secret, 0, 4242)
    secret.chmod(0o640)
    for path in (scratch, execroot, execroot / "in", execroot / "out", execroot / "in/a"):
        os.chown(path, 1000, 1000)
    scratch.chmod(0o755)
    as_user = ["setpriv", "--reuid=1000", "--regid=1000", "--inh-caps=+dac_read_search"]
    as_user += ["--ambient-caps=+dac_read_search"]  # only to reach this interpreter (tools get no capability)
    env = {"HOME": str(scratch), "PATH": "/usr/bin:/bin"}
    probe = ["sh", "-c", f"cat {secret} > out/seen 2>/dev/null || echo denied > out/seen"]
    try:
        member = RelayProcess(execroot, root, env=env, wrapper=[*as_user, "--groups=1000,4242"])
        member.send(probe, ["out/seen"], ["in/a"], 1)
        reply = member.read()
        if reply.exit_code != 0:
            pytest.skip(f"no sandbox as uid 1000 here: {reply.output.strip()[:200]}")
        assert (execroot / "out/seen").read_text() == "for group 4242 only\n"
        other = RelayProcess(execroot, root, env=env, wrapper=[*as_user, "--groups=1000"])
        other.send(probe, ["out/seen"], ["in/a"], 1)
        reply = other.read()
        assert reply.exit_code == 0, reply.output
        assert (execroot / "out/seen").read_text() == "denied\n"
        assert other.close() == 0 and member.close() == 0
        assert len(services(root)) == 2
    finally:
        for pid in services(root):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)


def test_a_relay_under_lower_resource_limits_gets_no_service_without_them(execroot: Path, root: Path) -> None:
    """A tool inherits the service's resource limits: a relay whose file-size limit is lower than the relay's that
    started the service gets a service of its own, under which its tool meets that limit as it would in-process
    (it once wrote past it)."""
    if not shutil.which("prlimit"):
        pytest.skip("needs prlimit(1)")
    first = RelayProcess(execroot, root)
    assert first.touch().exit_code == 0
    limited = RelayProcess(execroot, root, wrapper=["prlimit", f"--fsize={1 << 20}"])
    limited.send(["sh", "-c", "head -c 2000000 /dev/zero > out/big"], ["out/big"], ["in/a"], 1)
    reply = limited.read()
    assert reply.exit_code != 0, "a 2 MB output written under a 1 MiB file-size limit"
    assert limited.close() == 0 and first.close() == 0
    assert len(services(root)) == 2


@pytest.mark.parametrize("when", ["starting", "serving"])
def test_a_stopped_service_never_hangs_a_relay(execroot: Path, root: Path, when: str) -> None:
    """A service stopped (SIGSTOP, a debugger, a hang) while it starts or while it serves: a relay waits for its
    readiness or its answer to the hello a bounded time, says why in one line and serves in-process (it waited for
    good, and every relay of the root queued on the service lock behind it)."""
    quick = {"TREEMAT_SERVICE_WAIT_SECONDS": "1"}
    if when == "serving":
        first = RelayProcess(execroot, root)
        assert first.touch().exit_code == 0
        assert first.close() == 0
        os.kill(the_service(root), signal.SIGSTOP)
        relay = RelayProcess(execroot, root, env=quick)
    else:  # stopped before it says it is ready: it binds its socket, writes its pid file, then says so; a FIFO
        # no one reads as that file holds it there (it was stopped once found, if found in time: ~50 ms)
        os.mkfifo(Root(root).service_file(service_name(service_version(), "auto"), "pid"), 0o600)
        relay = RelayProcess(execroot, root, env=quick)
        os.kill(wait_for(lambda: services(root), what="the service to be started")[0], signal.SIGSTOP)
    relay.send(["touch", "out/x"], ["out/x"], ["in/a"], 1)
    reply = answered_within(relay, 30)
    assert reply.exit_code == 0, reply.output
    said = [line for line in relay.stderr.splitlines() if "stager service" in line]
    assert len(said) == 1 and "serving in this process" in said[0], relay.stderr
    assert relay.close() == 0


def test_a_request_no_service_can_be_reached_for_fails_with_one_line_and_the_relay_serves_on(
    execroot: Path, root: Path
) -> None:
    """The service died and its dir became unusable (opened to others, say): that request fails with one line
    saying it did not run (the relay raised out of its loop: a traceback, every later request lost)."""
    relay = RelayProcess(execroot, root)
    assert relay.touch().exit_code == 0
    os.kill(the_service(root), signal.SIGKILL)

    def relay_sockets() -> list[str]:
        links = []
        for fd in os.listdir(f"/proc/{relay.proc.pid}/fd"):
            with contextlib.suppress(FileNotFoundError):  # closed since the listing
                links.append(os.readlink(f"/proc/{relay.proc.pid}/fd/{fd}"))
        return [link for link in links if link.startswith("socket:")]

    wait_for(lambda: not relay_sockets(), what="the relay to see its service gone")
    service_dir = root / "service"
    service_dir.chmod(0o777)
    reply = relay.touch("out/unreached", 9)
    assert (reply.exit_code, reply.request_id) == (1, 9), reply
    assert reply.output.count("\n") == 1 and "could not be reached" in reply.output, reply.output
    assert "did not run" in reply.output and "writable by you alone" in reply.output, reply.output
    assert not (execroot / "out/unreached").exists()
    service_dir.chmod(0o700)
    assert relay.touch("out/after", 10).exit_code == 0  # the next request gets a new service
    assert relay.close() == 0


def test_a_relays_tools_are_seeded_by_the_compiler_on_its_own_path_not_the_first_relays(
    tmp_path: Path, root: Path
) -> None:
    """The service's environment is the relay's that started it; each relay's tools run with its own (the hello).
    The tool-cache seed of a bare `swiftc` was keyed and built by the `swiftc` on the service's PATH: a second
    relay whose PATH finds another compiler got a module cache seeded by the first one's."""
    fake = (
        '#!/bin/sh\ncache=""; prev=""\n'
        'for a in "$@"; do [ "$prev" = -module-cache-path ] && cache="$a"; prev="$a"; done\n'
        'case " $* " in *" -typecheck "*) mkdir -p "$cache"; echo {who} > "$cache/seeded-by"; exit 0;; esac\n'
        'cat "$cache/seeded-by" > out/who 2>/dev/null || echo unseeded > out/who\n'
    )
    execroot = tmp_path / "execroot"
    (execroot / "in").mkdir(parents=True)
    (execroot / "out").mkdir()
    (execroot / "in/a").write_text("input a\n")
    seen = []
    for who in ("first", "second"):
        compilers = tmp_path / who
        compilers.mkdir()
        (compilers / "swiftc").write_text(fake.format(who=who))
        (compilers / "swiftc").chmod(0o755)
        relay = RelayProcess(execroot, root, env={"PATH": f"{compilers}:{os.environ['PATH']}"})
        argv = ["swiftc", "-module-cache-path", "{TOOL_CACHE}/swift-module-cache", "-Onone", "in/a"]
        relay.send(argv, ["out/who"], ["in/a"])
        reply = relay.read()
        assert reply.exit_code == 0, reply.output + relay.stderr
        seen.append((execroot / "out/who").read_text().strip())
        (execroot / "out/who").unlink()
        assert relay.close() == 0
    assert len(services(root)) == 1  # both served by the one service
    assert seen[1] in ("second", "unseeded"), seen
