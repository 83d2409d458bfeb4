"""__main__.py, the py_binary's entry point: what it does before dispatching."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def test_the_workers_fast_flags_read_as_clicks_worker_command_reads_them(tmp_path: Path) -> None:
    """__main__ reads Bazel's usual worker flags without click (20 ms of a worker's start); whatever it takes, it
    reads as `treemat worker` does, and it hands anything else to click."""
    from treemat import cli
    from treemat.__main__ import ISOLATIONS, PROTOCOLS, SERVICE_DEFAULT, worker_options
    from treemat.commands.worker import worker

    assert ISOLATIONS == cli.ISOLATION_CHOICES
    protocol_option = next(param for param in worker.params if param.name == "protocol")
    assert tuple(protocol_option.type.choices) == PROTOCOLS  # type: ignore[attr-defined]
    taken = [
        ["--persistent_worker"],
        ["--persistent_worker", "--protocol=proto", f"--root={tmp_path}", "--max-workers=3", "@flags"],
        ["--protocol=json", "--persistent_worker", "--max-workers=1"],
    ]
    for args in taken:
        options = worker_options(args, {})
        assert options is not None, args
        params = worker.make_context("worker", list(args)).params
        assert options["protocol"] == params["protocol"]
        assert (options["root"] or None) == (str(params["worker_root"]) if params["worker_root"] else None)
        assert options["max_workers"] in ("", str(params["max_workers"]))
        assert options["isolation"] == "auto"
    for args in (
        ["--persistent_worker", "--protocol", "proto"],  # a separate value: click's to pair
        ["--persistent_worker", "--protocol=xml"],  # a bad value: click says why
        ["--persistent_worker", "--max-workers=0"],
        ["--persistent_worker", "--bogus=1"],
        ["--persistent_worker", "--help"],
    ):
        assert worker_options(args, {}) is None, args
    assert worker_options(["--persistent_worker"], {"TREEMAT_ISOLATION": "nonsense"}) is None
    assert worker_options(["--persistent_worker"], {"TREEMAT_ISOLATION": "none"}) == {
        "protocol": "auto",
        "root": "",
        "max_workers": "",
        "isolation": "none",
        "service": SERVICE_DEFAULT,
    }
    assert worker_options(["--persistent_worker", "--no-service"], {"TREEMAT_SERVICE": "1"})["service"] == "0"  # type: ignore[index]
    assert worker_options(["--persistent_worker"], {"TREEMAT_SERVICE": "0"})["service"] == "0"  # type: ignore[index]
    assert worker_options(["--persistent_worker"], {"TREEMAT_SERVICE": "1"})["service"] == "1"  # type: ignore[index]
    assert worker_options(["--persistent_worker", "--service"], {"TREEMAT_SERVICE": "0"})["service"] == "1"  # type: ignore[index]


def test_no_compiled_modules_are_read_from_a_cache_dir_another_user_could_swap(tmp_path: Path) -> None:
    """XDG_CACHE_HOME pointing at a dir others can write: whoever can rename `treemat` in it can plant compiled
    modules (their code) that every later worker runs; the prefix is not used there."""
    copy = tmp_path / "runfiles"
    shutil.copytree(TOOLS / "treemat", copy / "treemat", ignore=shutil.ignore_patterns("__pycache__"))
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    env.update(XDG_CACHE_HOME=str(cache), PYTHONPATH=str(copy))
    done = subprocess.run(
        [sys.executable, str(copy / "treemat" / "__main__.py"), "--help"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert not list(cache.rglob("*.pyc"))
