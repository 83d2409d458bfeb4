"""Tests for treemat.worker and treemat.protocol: a real worker process driven like Bazel (JSON stream, proto,
multiplex, cancel), and the JSON stream decoder on its own."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from treemat import framing, protos
from treemat.errors import ProtocolError
from treemat.protocol import JsonRequestDecoder, item_from_json
from treemat.sandbox import EXEC_ROOT

from ..support.harness import Worker, request, worker_env
from ..support.waiting import processes_below, running_below, wait_for

HELLO_HASH = hashlib.sha256(b"hello input\n").hexdigest()


@pytest.fixture()
def execroot(tmp_path: Path) -> Path:
    root = tmp_path / "execroot"
    (root / "src").mkdir(parents=True)
    (root / "src/in.txt").write_text("hello input\n")
    (root / "src/copy.sh").write_text(
        '#!/bin/sh\nset -e\nmkdir -p "$(dirname "$2")"\ncat "$1" > "$2"\necho "ran in $PWD"\n'
    )
    os.chmod(root / "src/copy.sh", 0o755)
    return root


def _copy(execroot: Path, out: str, rid: int = 0) -> dict[str, object]:
    return request(execroot, ["src/in.txt", "src/copy.sh"], [out], ["sh", "src/copy.sh", "src/in.txt", out], rid)


def test_back_to_back_json_requests(execroot: Path, tmp_path: Path) -> None:
    worker = Worker(execroot, tmp_path / "root")
    worker.send(_copy(execroot, "out/a.txt"), _copy(execroot, "out/b.txt"))
    first, second = worker.read(), worker.read()
    assert first["exitCode"] == 0 and second["exitCode"] == 0, (first, second)
    assert "requestId" not in first, "requestId is omitted when 0"
    assert f"ran in {EXEC_ROOT}\n" in first["output"], "the tool ran in its private exec dir, at the sandbox's path"
    assert (execroot / "out/a.txt").read_text() == "hello input\n"
    assert (execroot / "out/b.txt").read_text() == "hello input\n"
    assert worker.close() == 0


def test_multiplex_requests_run_concurrently(execroot: Path, tmp_path: Path) -> None:
    """All four tools run at one moment (seen from outside, whatever the machine's load: each sleeps until the
    test ends its sleep, then writes its output); serialized execution would never have two at once."""
    worker = Worker(execroot, tmp_path / "root", extra=["--max-workers=4"])
    sleep_then_write = 'sleep "41.${1}5"; echo "$1" > "out/s$1"'
    sleepers = [
        request(execroot, ["src/in.txt"], [f"out/s{i}"], ["sh", "-c", sleep_then_write, "sh", str(i)], i + 1)
        for i in range(4)
    ]
    worker.send(*sleepers)

    def all_sleeping() -> list[int]:  # each tool's sleep, once all four run
        found = [processes_below(worker.proc.pid, ["sleep", f"41.{i}5"]) for i in range(4)]
        return [pid for pids in found for pid in pids] if all(found) else []

    for pid in wait_for(all_sleeping, what="all four tools to run at once"):
        os.kill(pid, signal.SIGTERM)
    replies = {r["requestId"]: r for r in (worker.read() for _ in sleepers)}
    assert sorted(replies) == [1, 2, 3, 4]
    assert all(r["exitCode"] == 0 for r in replies.values()), replies
    assert [(execroot / f"out/s{i}").read_text() for i in range(4)] == ["0\n", "1\n", "2\n", "3\n"]
    worker.close()


def test_cancellation_kills_the_tool(execroot: Path, tmp_path: Path) -> None:
    worker = Worker(execroot, tmp_path / "root")
    worker.send(request(execroot, ["src/in.txt"], ["out/never"], ["sh", "-c", "sleep 30; touch out/never"], 9))
    wait_for(lambda: running_below(worker.proc.pid, ["sleep", "30"]), what="the tool to start")
    worker.send({"requestId": 9, "cancel": True})
    reply = worker.read()
    assert reply["requestId"] == 9 and reply.get("wasCancelled") is True
    assert not (execroot / "out/never").exists()
    worker.send(_copy(execroot, "out/after-cancel.txt"))
    assert worker.read()["exitCode"] == 0
    worker.close()


@pytest.mark.parametrize(
    ("raw", "expect"),
    [
        (b"garbage!", "undecodable bytes"),
        (b'{"arguments": [1, 2]}', "arguments must be a list of strings"),
        (b'{"arguments": ["--", "true"], "inputs": [{"path": "src/in.txt", "digest": "%%%"}]}', "base64"),
        (b'{"arguments": ["--", "true"], "inputs": [{"path": "../etc/passwd"}]}', "not allowed"),
        (b'{"arguments": ["--", "true"], "inputs": [{"path": "/etc/passwd"}]}', "absolute"),
        (b'{"arguments": ["--", "true"], "inputs": [{"path": "src/missing"}]}', "does not exist"),
        (b'{"arguments": ["true"]}', "unexpected request argument"),
        (b'{"requestId": "seven", "arguments": []}', "requestId"),
        (b'{"arguments": ["--", "true"], "inputs": {"a": 1}}', "inputs must be a list"),
        (b'{"arguments": ["--", "true"], "requestId": 99999999999999999999}', "requestId"),
    ],
)
def test_malformed_requests_are_answered_and_worker_survives(
    execroot: Path, tmp_path: Path, raw: bytes, expect: str
) -> None:
    worker = Worker(execroot, tmp_path / "root")
    worker.send_raw(raw)
    reply = worker.read()
    assert reply["exitCode"] != 0 and expect in reply["output"], reply
    worker.send(_copy(execroot, "out/ok.txt"))
    assert worker.read()["exitCode"] == 0
    assert worker.close() == 0


def test_digest_mismatch_is_reported(execroot: Path, tmp_path: Path) -> None:
    worker = Worker(execroot, tmp_path / "root")
    wrong = base64.b64encode(hashlib.sha256(b"something else").hexdigest().encode()).decode()
    worker.send({"arguments": ["--", "true"], "inputs": [{"path": "src/in.txt", "digest": wrong}]})
    reply = worker.read()
    assert reply["exitCode"] == 1 and "expected" in reply["output"]
    worker.close()


def test_failing_tool_and_missing_output(execroot: Path, tmp_path: Path) -> None:
    worker = Worker(execroot, tmp_path / "root")
    worker.send(request(execroot, [], ["out/x"], ["sh", "-c", "echo boom; exit 3"]))
    failing = worker.read()
    assert failing["exitCode"] == 3 and "boom" in failing["output"]
    worker.send(request(execroot, [], ["out/declared"], ["true"]))
    missing = worker.read()
    assert missing["exitCode"] == 1 and "out/declared" in missing["output"]
    worker.send(request(execroot, [], ["out/x"], ["/no/such/tool"]))
    assert worker.read()["exitCode"] == 127
    worker.close()


def test_proto_protocol(execroot: Path, tmp_path: Path) -> None:
    worker = Worker(execroot, tmp_path / "root", protocol="proto")
    message = protos.WorkRequest(arguments=["--output=out/p.txt", "--", "sh", "src/copy.sh", "src/in.txt", "out/p.txt"])
    for path in ("src/in.txt", "src/copy.sh"):
        message.inputs.add(path=path, digest=hashlib.sha256((execroot / path).read_bytes()).hexdigest().encode())
    framing.write_delimited(worker.stdin, message)
    worker.stdin.flush()
    reply = framing.read_delimited(worker.stdout, protos.WorkResponse)
    assert reply is not None and reply.exit_code == 0, reply
    assert (execroot / "out/p.txt").read_text() == "hello input\n"
    assert worker.close() == 0


def test_auto_protocol_detects_json(execroot: Path, tmp_path: Path) -> None:
    worker = Worker(execroot, tmp_path / "root", protocol="auto")
    worker.send(_copy(execroot, "out/auto.txt"))
    assert worker.read()["exitCode"] == 0
    worker.close()


def test_inputs_are_read_only_and_outputs_symlinks_handled(execroot: Path, tmp_path: Path) -> None:
    script = (
        "import os, stat, sys\n"
        "m = stat.S_IMODE(os.stat('src/in.txt').st_mode)\n"
        "d = stat.S_IMODE(os.stat('src').st_mode)\n"
        "open('out/modes', 'w').write(f'{m:o} {d:o}')\n"
        "os.symlink('modes', 'out/rel')\n"
        "os.symlink(os.path.abspath('src/in.txt'), 'out/abs')\n"
    )
    (execroot / "src/probe.py").write_text(script)
    worker = Worker(execroot, tmp_path / "root")
    worker.send(
        request(
            execroot,
            ["src/in.txt", "src/probe.py"],
            ["out/modes", "out/rel", "out/abs"],
            [sys.executable, "src/probe.py"],
        )
    )
    reply = worker.read()
    assert reply["exitCode"] == 0, reply
    assert (execroot / "out/modes").read_text() == "440 755"
    assert os.readlink(execroot / "out/rel") == "modes", "relative symlink outputs are kept"
    abs_out = execroot / "out/abs"
    assert not abs_out.is_symlink() and abs_out.read_text() == "hello input\n", "absolute symlinks are resolved"
    worker.close()


def test_write_through_hardlinked_input_never_reaches_the_cas(execroot: Path, tmp_path: Path) -> None:
    """chmod + write (even with the mtime restored) lands in the tool's private overlay copy, not the blob."""
    evil = (
        "chmod 644 src/in.txt && echo POISON > src/in.txt && touch -d 2000-01-01Z src/in.txt && cp src/in.txt out/seen"
    )
    worker = Worker(execroot, tmp_path / "root")
    worker.send(request(execroot, ["src/in.txt"], ["out/seen"], ["sh", "-c", evil]))
    reply = worker.read()
    assert reply["exitCode"] == 0, reply
    assert (execroot / "out/seen").read_text() == "POISON\n", "the tool saw its own write"
    blob = tmp_path / "root" / "cas" / HELLO_HASH[:2] / HELLO_HASH
    assert blob.read_text() == "hello input\n" and stat.S_IMODE(blob.stat().st_mode) == 0o440
    worker.send(_copy(execroot, "out/clean.txt"))
    assert worker.read()["exitCode"] == 0
    assert (execroot / "out/clean.txt").read_text() == "hello input\n", "later actions see pristine content"
    assert (execroot / "src/in.txt").read_text() == "hello input\n", "the execroot source is untouched"
    worker.close()
    stats = json.loads(
        subprocess.run(
            [sys.executable, "-m", "treemat", "--root", str(tmp_path / "root"), "stats", "--json"],
            capture_output=True,
            env=worker_env(),
            check=True,
        ).stdout
    )
    assert stats["totals"]["actions_isolation_overlay"] >= 2


def test_json_decoder_handles_split_reads_and_strings() -> None:
    text = '{"a": "x}{\\"y"}' + ' \n{"b": [1, {"c": 2}]}' + "junk" + '{"d": 1}'
    pieces: list[object] = []
    decoder = JsonRequestDecoder()
    for i in range(0, len(text), 3):
        pieces.extend(decoder.feed(text[i : i + 3].encode()))
    objects = [p for p in pieces if not isinstance(p, ProtocolError)]
    errors = [p for p in pieces if isinstance(p, ProtocolError)]
    assert objects == [{"a": 'x}{"y'}, {"b": [1, {"c": 2}]}, {"d": 1}]
    assert len(errors) >= 1 and not decoder.pending


def test_item_from_json_decodes_bazel_digest_forms() -> None:
    hex_digest = hashlib.sha256(b"x").hexdigest()
    item = item_from_json(
        {
            "requestId": 3,
            "arguments": ["--", "true"],
            "inputs": [
                {"path": "a", "digest": base64.b64encode(hex_digest.encode()).decode()},
                {"path": "b", "digest": ""},
                {"path": "c"},
            ],
        }
    )
    assert item.inputs == [("a", hex_digest), ("b", None), ("c", None)]
    assert item.request_id == 3


def test_undeclared_inputs_are_invisible(execroot: Path, tmp_path: Path) -> None:
    (execroot / "src/undeclared.txt").write_text("not an input\n")
    worker = Worker(execroot, tmp_path / "root")
    worker.send(request(execroot, ["src/in.txt"], ["out/u"], ["sh", "-c", "cat src/undeclared.txt > out/u"]))
    reply = worker.read()
    assert reply["exitCode"] != 0 and "undeclared.txt" in reply["output"], "hermetic: only declared inputs exist"
    worker.close()


def test_the_reply_goes_out_before_the_stats_file_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewriting `<root>/stats/<pid>.json` (~0.5 ms of JSON and a rename per request) is nothing Bazel waits for."""
    import threading

    from treemat.counters import StatsStore
    from treemat.layout import Root
    from treemat.manifest import InputManifest
    from treemat.protocol import WorkItem
    from treemat.stack import open_stack
    from treemat.worker import WorkerServer, make_handler

    release, published = threading.Event(), threading.Event()
    real_publish = StatsStore.publish

    def slow_publish(self: StatsStore, *args: object, **kwargs: object) -> Path:
        release.wait(10)
        path = real_publish(self, *args, **kwargs)  # type: ignore[arg-type]
        published.set()
        return path

    monkeypatch.setattr(StatsStore, "publish", slow_publish)
    read_end, write_end = os.pipe()
    with open_stack(Root(tmp_path / "root"), isolation="none") as stack, os.fdopen(write_end, "wb") as out:
        handler, canceller = make_handler(stack, tmp_path)
        server = WorkerServer(out, handler, protocol="proto", on_cancel=canceller)
        item = WorkItem(0, ["--", "true"], InputManifest.of([]))
        running = threading.Thread(target=server.dispatch, args=(item,))
        running.start()
        with os.fdopen(read_end, "rb") as replies:
            reply = framing.read_delimited(replies, protos.WorkResponse)
            assert reply is not None and reply.exit_code == 0, reply
            assert not published.is_set()  # the reply came while the stats were still being written
            release.set()
            running.join()
    assert published.is_set() and (tmp_path / "root/stats" / f"{os.getpid()}.json").is_file()
