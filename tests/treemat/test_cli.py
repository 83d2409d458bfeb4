"""Tests for the treemat CLI: stage, stats, probe, cas subcommands, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from treemat.cli import cli
from treemat.commands.cas import parse_size
from treemat.counters import Counters
from treemat.digest import digest_bytes
from treemat.layout import Root

from ..support.harness import worker_env


def _run(root: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--root", str(root), *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_stage_manifest_with_sources_then_stats(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    files = {f"lib/f{i}.swift": f"let v{i} = {i}\n".encode() for i in range(5)}
    manifest = []
    for rel, data in files.items():
        (src / rel.replace("/", "_")).write_bytes(data)
        manifest.append({"path": rel, "digest": str(digest_bytes(data)), "source": str(src / rel.replace("/", "_"))})
    manifest.append({"path": "lib/current", "symlink": "f0.swift"})
    manifest.append({"path": "out", "directory": True})
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    code, output = _run(tmp_path / "root", "stage", str(tmp_path / "m.json"), str(tmp_path / "dest"), "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["report"]["files"] == 5
    assert (tmp_path / "dest/lib/f3.swift").read_bytes() == b"let v3 = 3\n"
    assert os.readlink(tmp_path / "dest/lib/current") == "f0.swift"
    code, output = _run(tmp_path / "root", "stats", "--json")
    totals = json.loads(output)["totals"]
    assert sum(totals.get(k, 0) for k in ("hardlink", "reflink", "copy", "clonefile")) == 5
    code, text = _run(tmp_path / "root", "stats")
    assert "files by backend" in text and "hardlink" in text


def test_stage_refuses_existing_destination_and_bad_manifest(tmp_path: Path) -> None:
    (tmp_path / "dest").mkdir()
    (tmp_path / "m.json").write_text("[]")
    code, output = _run(tmp_path / "root", "stage", str(tmp_path / "m.json"), str(tmp_path / "dest"))
    assert code == 1 and "already exists" in output
    (tmp_path / "bad.json").write_text(json.dumps([{"path": "../escape", "digest": str(digest_bytes(b"x"))}]))
    code, output = _run(tmp_path / "root", "stage", str(tmp_path / "bad.json"), str(tmp_path / "d2"))
    assert code == 1 and "'..'" in output and "Traceback" not in output


def test_cas_ingest_verify_stats_gc(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"b{i}").write_bytes(os.urandom(1000))
    code, output = _run(tmp_path / "root", "cas", "ingest", str(data), "--json")
    assert code == 0
    ingested = json.loads(output)
    assert len(ingested) == 3
    code, output = _run(tmp_path / "root", "cas", "stats", "--json")
    assert json.loads(output)["blobs"] == 3
    code, output = _run(tmp_path / "root", "cas", "verify", "--json")
    assert code == 0 and json.loads(output)["corrupt"] == 0
    code, output = _run(tmp_path / "root", "cas", "gc", "--max-size", "1K", "--json")
    assert code == 0 and json.loads(output)["after_bytes"] <= 1024


def test_probe_lists_methods(tmp_path: Path) -> None:
    code, output = _run(tmp_path / "root", "probe", str(tmp_path), "--json")
    assert code == 0
    methods = json.loads(output)["methods"]
    assert methods[-1] == "copy" and "hardlink" in methods


def test_parse_size() -> None:
    assert parse_size("10G") == 10 << 30
    assert parse_size("500M") == 500 << 20
    assert parse_size("1.5K") == 1536
    assert parse_size("123") == 123


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    missing = subprocess.run(
        [sys.executable, "-m", "treemat", "--root", str(tmp_path / "r"), "cas", "ingest", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env=worker_env(),
    )
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "treemat", "--help"], capture_output=True, text=True, env=worker_env(), check=True
    ).stdout
    for command in ("stage", "stats", "cas", "probe", "worker"):
        assert command in help_text


def test_stats_watch_redraws_when_a_worker_publishes(tmp_path: Path) -> None:
    import pytest
    from treemat.counters import StatsStore

    pytest.importorskip("watchdog", reason="the optional `watch` extra")

    root = tmp_path / "root"
    (root / "stats").mkdir(parents=True)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "treemat", "--root", str(root), "stats", "--watch", "--json", "--max-updates", "2"],
        stdout=subprocess.PIPE,
        text=True,
        env=worker_env(),
    )
    assert watcher.stdout is not None
    first = json.loads(watcher.stdout.readline())
    assert first["totals"] == {}
    counters = Counters()
    counters.add("reflink", 42)
    StatsStore(Root(root).stats).publish(counters, role="worker")  # a worker finishing a request
    second = json.loads(watcher.stdout.readline())
    assert second["totals"] == {"reflink": 42}
    assert watcher.wait(30) == 0


def test_stage_refuses_a_declared_size_that_disagrees_with_the_bytes(tmp_path: Path) -> None:
    source = tmp_path / "a.txt"
    source.write_bytes(b"twelve bytes")
    digest = digest_bytes(b"twelve bytes")
    wrong = [{"path": "a.txt", "digest": f"{digest.hash}/{digest.size + 5}", "source": str(source)}]
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    code, text = _run(tmp_path / "root", "stage", str(tmp_path / "wrong.json"), str(tmp_path / "d1"))
    assert code != 0 and "declares" in text, text
    right = [{"path": "a.txt", "digest": f"{digest.hash}/{digest.size}", "source": str(source)}]
    (tmp_path / "right.json").write_text(json.dumps(right))
    assert _run(tmp_path / "root", "stage", str(tmp_path / "right.json"), str(tmp_path / "d2"))[0] == 0
    code, text = _run(tmp_path / "root", "stage", str(tmp_path / "wrong.json"), str(tmp_path / "d3"))
    assert code != 0 and "declares" in text, "a blob already in the CAS is checked too"


def test_probe_shows_the_isolation_mode(tmp_path: Path) -> None:
    code, text = _run(tmp_path / "root", "probe", "--json", str(tmp_path))
    assert code == 0, text
    shown = json.loads(text)
    assert shown["isolation"] in ("overlay", "copy-on-write") and shown["write_watch"]
    if shown["isolation"] == "copy-on-write":
        assert "hardlink" not in shown["methods"], "no hardlinks without the overlay sandbox"


def test_one_error_handler_for_every_command(tmp_path: Path) -> None:
    """TreematError/OSError -> one line and exit 1; disk full says what to do; a bug -> traceback and exit 3."""
    import errno

    import click
    import pytest
    from treemat.commands._common import EXIT_INTERNAL, error_handler
    from treemat.errors import CasError

    def exit_code(exc: BaseException) -> tuple[int, str]:
        runner = CliRunner()

        @click.command()
        def failing() -> None:
            with error_handler():
                raise exc

        result = runner.invoke(failing, [], catch_exceptions=False)
        return result.exit_code, result.output

    assert exit_code(CasError("blob gone")) == (1, "treemat: error: blob gone\n")
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    assert exit_code(full) == (1, f"treemat: error: disk full ({tmp_path / 'x'}): free space or run `treemat cas gc`\n")
    code, output = exit_code(ValueError("oops"))
    assert code == EXIT_INTERNAL and "Traceback" in output and "internal error: ValueError: oops" in output
    with pytest.raises(SystemExit) as raised, error_handler():
        raise KeyboardInterrupt
    assert raised.value.code == 130
    code, output = _run(tmp_path / "root", "stage", str(tmp_path / "no-such.json"), str(tmp_path / "d"))
    assert code == 2 and "does not exist" in output, "click's usage errors pass through the handler"


def test_worker_command_and_persistent_worker_flag_share_one_parser(tmp_path: Path) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "treemat", "worker", "--protocol=xml"],
        capture_output=True,
        text=True,
        env=worker_env(),
        stdin=subprocess.DEVNULL,
    )
    assert bad.returncode == 2 and "treemat worker" in bad.stderr and "'xml' is not one of" in bad.stderr
    startup = ["--protocol=json", f"--root={tmp_path / 'r'}", "--bogus=1", "@x", "--persistent_worker"]
    served = subprocess.run(
        [sys.executable, "-m", "treemat", *startup],
        capture_output=True,
        input=b'{"arguments": ["--", "true"]}',
        env=worker_env(),
        cwd=tmp_path,
        timeout=60,
    )
    assert served.returncode == 0, served.stderr
    assert json.loads(served.stdout) == {"exitCode": 0, "output": ""}
    assert (tmp_path / "r" / "cas").is_dir(), "--root after the subcommand is the worker's root"


def test_stats_watch_without_watchdog_says_how_to_get_it(tmp_path: Path) -> None:
    blocker = tmp_path / "block" / "watchdog"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('watchdog is not installed')\n")
    env = worker_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "block"), env["PYTHONPATH"]])
    watch = subprocess.run(
        [sys.executable, "-m", "treemat", "--root", str(tmp_path / "root"), "stats", "--watch"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert watch.returncode == 1 and "Traceback" not in watch.stderr
    assert watch.stderr.strip().splitlines() == [
        "treemat: error: `stats --watch` needs the watchdog package: pip install 'treemat[watch]' "
        "(or run `treemat stats`)"
    ]
    plain = subprocess.run(
        [sys.executable, "-m", "treemat", "--root", str(tmp_path / "root"), "stats"], env=env, capture_output=True
    )
    assert plain.returncode == 0, "only --watch needs watchdog"


def _sdk_manifest(directory: Path, files: int) -> Path:
    src = directory / "src"
    src.mkdir(parents=True)
    manifest = []
    for i in range(files):
        data = f"header {i:02}\n".encode()
        (src / f"h{i}.h").write_bytes(data)
        path = f"sdk/include/h{i}.h"
        manifest.append({"path": path, "digest": str(digest_bytes(data)), "source": str(src / f"h{i}.h")})
    (directory / "m.json").write_text(json.dumps(manifest))
    return directory / "m.json"


def test_stats_show_the_dircache_choice_and_size(btrfs_dir: Path) -> None:
    """Under copy-on-write isolation on btrfs subtrees of >= 64 files are snapshotted: stats says so, with hits,
    misses and the recorded size against the budget (what a worker or bot publishes)."""
    from treemat.counters import StatsStore
    from treemat.stack import ISOLATION_COW, open_stack
    from treemat.tree import load_manifest

    base = btrfs_dir / "cli-stats"
    base.mkdir()
    root = base / "root"
    tree = load_manifest(_sdk_manifest(base, 64))
    stack = open_stack(Root(root), isolation=ISOLATION_COW)
    for dest in ("d1", "d2"):
        stack.dircache.stage(tree, base / dest)
    StatsStore(Root(root).stats).publish(stack.counters, role="test", extra=stack.describe())
    stack.close()
    code, text = _run(root, "stats")
    assert code == 0, text
    assert "dircache: snapshot of subtrees with >= 64 files; 640 B of 8.0 GiB in 1 entries" in text, text
    assert "subtree cache: 1 hits, 1 misses, 0 evictions" in text, text
    code, output = _run(root, "stats", "--json")
    state = json.loads(output)["dircache"]
    assert state["entries"] == 1 and state["bytes"] == 640
    assert state["choices"] == [{"mode": "snapshot", "min_files": 64, "budget_bytes": 8 << 30}]


def test_stats_show_a_dircache_that_is_off(tmp_path: Path) -> None:
    manifest = _sdk_manifest(tmp_path, 3)
    code, output = _run(tmp_path / "root", "stage", str(manifest), str(tmp_path / "dest"), "--no-dircache")
    assert code == 0, output
    code, text = _run(tmp_path / "root", "stats")
    assert "dircache: off; 0 B in 0 entries" in text, text


def test_isolation_none_is_asked_for_and_loud(tmp_path: Path) -> None:
    from treemat.cli import ISOLATION_CHOICES
    from treemat.stack import ISOLATION_CHOICES as STACK_CHOICES

    assert ISOLATION_CHOICES == STACK_CHOICES
    code, output = _run(tmp_path / "root", "--isolation", "none", "probe", str(tmp_path))
    assert code == 0, output
    assert "isolation: none" in output and "UNSANDBOXED" in output
    code, output = _run(tmp_path / "root", "probe", str(tmp_path))
    assert code == 0 and "isolation: none" not in output, "none is never chosen unless asked for"


def test_a_worker_asked_for_no_isolation_says_so_and_counts_it(tmp_path: Path) -> None:
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    env = {**worker_env(), "TREEMAT_ISOLATION": "none"}
    body = json.dumps({"arguments": ["--output=out/x", "--", "sh", "-c", "echo hi > out/x"], "inputs": []})
    done = subprocess.run(
        [sys.executable, "-m", "treemat", "--persistent_worker", f"--root={tmp_path / 'root'}"],
        input=body.encode(),
        cwd=execroot,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert json.loads(done.stdout)["exitCode"] == 0, done.stderr
    assert b"WARNING: isolation none" in done.stderr
    records = [json.loads(p.read_text()) for p in (tmp_path / "root/stats").glob("*.json")]
    assert any(r.get("counters", {}).get("actions_isolation_none") == 1 for r in records), records


_COUNT_HELPERS = """
import sys
started = []
def spy(event, args):
    if event == "subprocess.Popen" and any("sandboxd" in str(arg) for arg in args[1]):
        started.append(args[1])
sys.addaudithook(spy)
from treemat.cli import main
try:
    main(sys.argv[1:])
finally:
    print("HELPERS", len(started), file=sys.stderr)
"""


def _helpers_started(root: Path, *args: str) -> int:
    """How many sandbox helpers `treemat --root ROOT ARGS...` spawns (seen by a Python audit hook)."""
    done = subprocess.run(
        [sys.executable, "-c", _COUNT_HELPERS, "--root", str(root), *args],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    counts = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("HELPERS ")]
    assert counts, done.stderr
    return int(counts[0])


def test_cas_commands_start_no_sandbox_helper(tmp_path: Path) -> None:
    data = tmp_path / "blob"
    data.write_bytes(b"cas only\n")
    root = tmp_path / "root"
    assert _helpers_started(root, "probe") == 1, "the spy must see the helper a full stack starts"
    for args in (["ingest", str(data)], ["stats"], ["verify"], ["gc", "--max-size", "1G"]):
        assert _helpers_started(root, "cas", *args) == 0, args
