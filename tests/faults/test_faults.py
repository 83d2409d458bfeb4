"""Fault suite: hostile tools, killed ingests, concurrent workers, fuzzed requests, full disks.

Each test prints its figures (run with `pytest -s tests/faults` to see them) and asserts on them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.digest import digest_file
from treemat.executor import ActionRequest, RequestInput
from treemat.flagfile import ActionSpec
from treemat.layout import Root

from ..support.harness import Worker, request, worker_env
from ..support.stacks import make_executor


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_actions_writing_through_hardlinked_inputs_corrupt_nothing(tmp_path: Path) -> None:
    execroot = tmp_path / "execroot"
    (execroot / "in").mkdir(parents=True)
    inputs = []
    for i in range(20):
        path = execroot / "in" / f"f{i}.txt"
        path.write_text(f"pristine {i}\n")
        inputs.append(RequestInput(f"in/f{i}.txt", _sha(path)))
    executor = make_executor(tmp_path / "root")
    attacks = 60
    for n in range(attacks):
        victim = f"in/f{n % 20}.txt"
        evil = f"chmod 644 {victim} && echo POISON-{n} > {victim} && chmod 444 {victim}"
        executor.execute(ActionRequest(ActionSpec(argv=["sh", "-c", evil]), inputs, execroot))
    check = ActionSpec(argv=["sh", "-c", "cat in/*.txt > out/all"], outputs=["out/all"])
    result = executor.execute(ActionRequest(check, inputs, execroot))
    report = executor.cas.verify_all()
    quarantined = executor.counters.get("integrity_quarantined")
    print(
        f"\n[hostile tools] {attacks} write-through attacks: quarantined {quarantined} blobs, "
        f"verify: {report.checked} checked / {report.corrupt} corrupt"
    )
    assert result.exit_code == 0, result.output
    assert "POISON" not in (execroot / "out/all").read_text()
    assert report.corrupt == 0
    assert quarantined == 0, "prevented, not detected: the writes landed in each tool's overlay copy"
    assert all((execroot / "in" / f"f{i}.txt").read_text() == f"pristine {i}\n" for i in range(20))


_INGEST_LOOP = """
import os, sys
sys.path.insert(0, {tools!r})
from pathlib import Path
from treemat.cas import ContentStore
from treemat.layout import Root
from treemat.counters import Counters
cas = ContentStore(Root(Path({root!r})), counters=Counters())
i = 0
while True:
    data = os.urandom(1 << 20) * 8 + str(i).encode()
    cas.ingest_bytes(data, executable=bool(i % 2))
    src = Path({root!r}).parent / f"src-{{os.getpid()}}"
    src.write_bytes(data[::-1])
    cas.ingest_file(src, executable=False)
    print(i, flush=True)  # one line per round: the test kills after a (seeded) random number of them
    i += 1
"""


def test_kill_9_during_ingest_never_leaves_a_partial_blob(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tools = str(Path(__file__).resolve().parents[2] / "tools")
    rng = random.Random(9)
    kills = 12
    for _ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", _INGEST_LOOP.format(tools=tools, root=str(root))], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        for _round in range(rng.randint(1, 3)):  # the writer keeps ingesting while we read: killed mid-round
            assert proc.stdout.readline(), "the ingest loop died on its own"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    debris_before = len(list((root / "tmp").iterdir()))
    cas = ContentStore(Root(root), counters=Counters())  # a new store sweeps temp files of dead writers
    report = cas.verify_all()
    debris = len(list((root / "tmp").iterdir()))
    print(
        f"\n[kill -9] {kills} kills mid-ingest: {report.checked} blobs, {report.corrupt} corrupt, "
        f"{debris_before} temp files left by killed writers (never visible as blobs), {debris} after restart"
    )
    assert report.checked > 0, "the loop should have published some blobs"
    assert report.corrupt == 0
    assert debris == 0
    for hash_hex, executable, path in cas.iter_blobs():
        assert digest_file(path).hash == hash_hex and path.stat().st_mode & 0o777 == (0o550 if executable else 0o440)


def test_eight_concurrent_workers_on_one_cas(tmp_path: Path) -> None:
    execroot = tmp_path / "execroot"
    (execroot / "src").mkdir(parents=True)
    for i in range(10):
        (execroot / "src" / f"s{i}.txt").write_text(f"shared input {i}\n" * 50)
    shared = [f"src/s{i}.txt" for i in range(10)]
    workers = [Worker(execroot, tmp_path / "root", extra=["--max-workers=2"]) for _ in range(8)]
    per_worker = 150
    started = time.monotonic()
    for w, worker in enumerate(workers):
        worker.send(
            *[
                request(execroot, shared, [f"out/w{w}/a{n}"], ["sh", "-c", f"cat src/s{n % 10}.txt > out/w{w}/a{n}"])
                for n in range(per_worker)
            ]
        )
    errors = 0
    for worker in workers:
        for _ in range(per_worker):
            errors += worker.read()["exitCode"] != 0
        assert worker.close() == 0
    elapsed = time.monotonic() - started
    wrong = sum(
        (execroot / f"out/w{w}/a{n}").read_text() != f"shared input {n % 10}\n" * 50
        for w in range(8)
        for n in range(per_worker)
    )
    report = ContentStore(Root(tmp_path / "root"), counters=Counters()).verify_all()
    total = 8 * per_worker
    print(
        f"\n[8 workers] {total} actions in {elapsed:.1f}s ({total / elapsed:.0f}/s): {errors} errors, "
        f"{wrong} wrong outputs, CAS {report.checked} blobs / {report.corrupt} corrupt"
    )
    assert errors == 0 and wrong == 0 and report.corrupt == 0


def _fuzz_objects(rng: random.Random, good: dict[str, object]) -> list[bytes]:
    digest = base64.b64encode(b"0" * 64).decode()
    cases: list[object] = [
        [],
        7,
        "text",
        None,
        {"arguments": "not a list"},
        {"arguments": [None]},
        {"inputs": "x"},
        {"inputs": [{"path": 5}]},
        {"inputs": [{"path": "a", "digest": 12}]},
        {"requestId": -1},
        {"requestId": 1e400},
        {"requestId": 2**70},
        {"requestId": True, "arguments": ["--", "true"]},
        {"arguments": ["--", "true"], "inputs": [{"path": "a", "digest": "!!!!"}]},
        {"arguments": ["--", "true"], "inputs": [{"path": "a", "digest": base64.b64encode(b"short").decode()}]},
        {"arguments": ["--", "true"], "inputs": [{"path": "/abs", "digest": digest}]},
        {"arguments": ["--", "true"], "inputs": [{"path": "a/../../x", "digest": digest}]},
        {"arguments": ["--", "true"], "inputs": [{"path": "nul\u0000byte", "digest": digest}]},
        {"arguments": ["--output=../escape", "--", "true"]},
        {"arguments": ["--output=/etc/passwd", "--", "true"]},
        {"arguments": ["--env=", "--", "true"]},
        {"arguments": ["--"]},
        {"nested": json.loads("[" * 20 + "]" * 20)},
    ]
    for _ in range(150):  # mutate the good request's values
        mutated = json.loads(json.dumps(good))
        key = rng.choice(["arguments", "inputs", "requestId"])
        mutated[key] = rng.choice([rng.random(), "x" * rng.randint(0, 5000), [rng.randint(-5, 5)], {"k": "v"}, None])
        cases.append(mutated)
    encoded = [json.dumps(case).encode() for case in cases]
    encoded.append(b"[" * 100_000 + b"]" * 100_000)  # deep nesting: not an object, answered as garbage
    encoded.append(b'{"deep": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")  # recursion bomb inside an object
    encoded.append(b"\xff\xfe\x00garbage\x01")
    return encoded


def test_fuzzed_requests_are_all_answered(tmp_path: Path) -> None:
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    (execroot / "in.txt").write_text("ok\n")
    good = request(execroot, ["in.txt"], ["out/good"], ["cp", "in.txt", "out/good"])
    cases = _fuzz_objects(random.Random(4), good)
    worker = Worker(execroot, tmp_path / "root")
    unanswered = errors = good_ok = 0
    for number, case in enumerate(cases, start=1):
        probe = dict(good, requestId=number)  # a good multiplex request right behind each bad one
        worker.send_raw(case + json.dumps(probe).encode())
        replies = []
        while True:
            reply = worker.read()
            if reply.get("requestId") == number:
                good_ok += reply["exitCode"] == 0
                break
            replies.append(reply)
        unanswered += not replies
        errors += sum(r["exitCode"] != 0 for r in replies)
    print(
        f"\n[fuzz] {len(cases)} malformed requests: {len(cases) - unanswered} answered ({errors} error replies); "
        f"{good_ok}/{len(cases)} good requests interleaved with them succeeded"
    )
    assert unanswered == 0
    assert errors >= len(cases)
    assert good_ok == len(cases)
    assert (execroot / "out/good").read_text() == "ok\n"
    assert not (tmp_path / "escape").exists()
    assert worker.close() == 0


def test_truncated_streams_are_answered_at_eof(tmp_path: Path) -> None:
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    outcomes = []
    for payload in (b'{"arguments": ["--", "tr', b'{"arguments": [', b'{"a": "\\'):
        result = subprocess.run(
            [sys.executable, "-m", "treemat", "--persistent_worker", "--protocol=json", f"--root={tmp_path / 'r'}"],
            input=payload,
            cwd=execroot,
            capture_output=True,
            env=worker_env(),
            timeout=60,
        )
        reply = json.loads(result.stdout.decode().strip().splitlines()[-1])
        outcomes.append((result.returncode, reply["exitCode"]))
    print(f"\n[truncated] {len(outcomes)} truncated streams -> (worker exit, reply exit): {outcomes}")
    assert all(code == 0 and reply != 0 for code, reply in outcomes)


def test_disk_full_gives_clear_errors_and_worker_keeps_serving(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting tmpfs needs root")
    root = tmp_path / "tiny-root"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,nr_inodes=200,mode=0700", "tmpfs", str(root)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        execroot = tmp_path / "execroot"
        (execroot / "deep").mkdir(parents=True)
        (execroot / "big.bin").write_bytes(os.urandom(6 << 20))
        (execroot / "small.txt").write_text("small\n")
        deep_inputs = []
        for i in range(300):  # more directories than the tmpfs has inodes
            path = execroot / "deep" / f"d{i}" / "f.txt"
            path.parent.mkdir()
            path.write_text("same content everywhere\n")
            deep_inputs.append(f"deep/d{i}/f.txt")
        worker = Worker(execroot, root)
        worker.send(request(execroot, ["big.bin"], ["out/x"], ["true"]))
        too_big = worker.read()
        worker.send(request(execroot, deep_inputs, ["out/y"], ["true"]))
        too_many = worker.read()
        worker.send(request(execroot, ["small.txt"], ["out/ok"], ["cp", "small.txt", "out/ok"]))
        fine = worker.read()
        cas = ContentStore(Root(root), counters=Counters())
        report = cas.verify_all()
        exec_base = root / "exec"
        leftovers = [p.name for p in exec_base.iterdir()] if exec_base.exists() else []
        # the successful action's exec dir may be kept for reuse (overlay isolation); the failed ones are gone
        pooled = [name for name in leftovers if (exec_base / name / "small.txt").exists()]
        print(
            f"\n[ENOSPC] big ingest -> {too_big['output'].strip()!r}; deep tree -> {too_many['output'].strip()!r}; "
            f"then small action exit {fine['exitCode']}; CAS {report.checked} blobs / {report.corrupt} corrupt; "
            f"exec dirs left: {len(leftovers)}; tmp files: {len(list((root / 'tmp').iterdir()))}"
        )
        assert too_big["exitCode"] == 1 and "disk full" in too_big["output"]
        assert too_many["exitCode"] == 1 and "disk full" in too_many["output"]
        assert fine["exitCode"] == 0 and (execroot / "out/ok").read_text() == "small\n", fine
        assert report.corrupt == 0
        assert not list((root / "tmp").iterdir())
        assert not [name for name in leftovers if not name.startswith(".trash") and name not in pooled]
        assert len(pooled) <= 1
        assert worker.close() == 0
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
