"""stack.py, the composition root: what a serving process sets for itself."""

from __future__ import annotations

import subprocess
import sys

import pytest
from treemat.stack import GIL_SWITCH_SECONDS, favour_syscall_threads

from ..support.harness import worker_env


def test_serving_processes_switch_threads_often_enough_for_syscall_heavy_staging() -> None:
    """Python's 5 ms switch interval made every syscall of a staging request (each releases the GIL) wait up to
    5 ms behind a thread doing Python work: a new execroot's 64-input first check went from ~1 ms to 170-290."""
    before = sys.getswitchinterval()
    try:
        favour_syscall_threads()
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_SECONDS) and GIL_SWITCH_SECONDS <= 0.001
    finally:
        sys.setswitchinterval(before)


def test_the_in_process_worker_serves_with_the_short_switch_interval() -> None:
    """The in-process worker (and the service, through service.main) sets it before serving."""
    probe = (
        "import sys, treemat.worker as w\n"
        "w.open_stack = lambda *a, **k: (_ for _ in ()).throw(OSError('probe'))\n"
        "try:\n    w.serve_stdio('/nonexistent', protocol=None, max_workers=1)\n"
        "except Exception:\n    pass\n"
        "sys.stderr.write(repr(sys.getswitchinterval()))\n"
    )
    ran = subprocess.run([sys.executable, "-c", probe], env=worker_env(), capture_output=True, text=True, timeout=60)
    assert float(ran.stderr.strip().splitlines()[-1]) == pytest.approx(GIL_SWITCH_SECONDS), ran.stderr
