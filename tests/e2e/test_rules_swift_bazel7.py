"""The rules_swift end-to-end test (test_rules_swift_e2e.py) on Bazel 7.7.1, from the host.

It runs that module inside tools/bazel7.sh's chroot with the rules_swift 3.6.1 fixtures extracted into a
scratch directory bound there. Skipped unless the chroot exists (`sudo tools/bazel7.sh setup`) and the
fixtures are at ../shared/third_party/rules_swift-3.6.1/ beside the checkout (or $TREEMAT_RULES_SWIFT_TARBALLS).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from treemat.benchrswift import FIXTURES, extract_fixtures

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "bazel7.sh"
TARBALLS = Path(
    os.environ.get("TREEMAT_RULES_SWIFT_TARBALLS") or REPO.parent / "shared" / "third_party" / "rules_swift-3.6.1"
)
SWIFTC = Path(os.environ.get("TREEMAT_SWIFT_DIR", "/opt/swift")) / "usr" / "bin" / "swiftc"


def _skip_reason() -> str | None:
    if os.environ.get("TREEMAT_BAZEL7_CHROOT"):
        return "already inside the Bazel 7 chroot (test_rules_swift_e2e.py runs there)"
    if os.geteuid() != 0:
        return "the Bazel 7 chroot needs root (chroot, mount namespaces)"
    if not SWIFTC.exists():
        return f"no swiftc at {SWIFTC} (bind-mounted into the chroot)"
    missing = [stem for stem in FIXTURES if not (TARBALLS / f"{stem}.tar.gz").exists()]
    if missing:
        return f"no rules_swift fixtures ({', '.join(missing)}) in {TARBALLS} (../shared/third_party/rules_swift-3.6.1)"
    root = Path(subprocess.run([str(SCRIPT), "root"], capture_output=True, text=True, check=True).stdout.strip())
    if not (root / ".treemat-bazel7-ready").exists():
        return f"no Bazel 7.7.1 chroot at {root}: create it with `sudo tools/bazel7.sh setup` (see README.md)"
    return None


SKIP = _skip_reason()

pytestmark = [
    pytest.mark.bazel,
    pytest.mark.bazel7,
    pytest.mark.swift,
    pytest.mark.skipif(SKIP is not None, reason=SKIP or ""),
]


@pytest.fixture
def scratch() -> Iterator[Path]:
    """Bound into the chroot; under /var/tmp, never /tmp (a mount below /tmp empties the tools' private /tmp)."""
    path = Path(tempfile.mkdtemp(prefix="treemat-rswift-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_rules_swift_on_bazel7(scratch: Path) -> None:
    fixtures = extract_fixtures(TARBALLS, scratch / "fixtures")
    run = subprocess.run(
        [str(SCRIPT), "run", "--bind", str(scratch), "--", "python3", "-m", "pytest", "-q", "-ra", "-p",
         "no:cacheprovider", str(REPO / "tests" / "e2e" / "test_rules_swift_e2e.py"),
         f"--basetemp={scratch / 'inner'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "TREEMAT_RULES_SWIFT_FIXTURES": str(fixtures)},
    )  # fmt: skip
    output = run.stdout[-8000:] + run.stderr[-4000:]
    assert run.returncode == 0, f"rules_swift e2e on Bazel 7.7.1 failed:\n{output}"
    assert " passed" in run.stdout and "skipped" not in run.stdout, output
