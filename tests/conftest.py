"""Per-suite time limits (pytest-timeout): a hung test fails with every thread's stack, within its suite's bound.

A test's own `@pytest.mark.timeout(...)` wins. The bounds are ceilings for a loaded 2-core machine, not
timings: the unit suites take seconds, the end-to-end suites drive real Bazel and BuildGrid for minutes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support.services import end_services_under

SUITE_TIMEOUTS = {"treemat": 300, "faults": 600, "bot": 1800, "e2e": 1800}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each test its suite's timeout unless it names one."""
    here = Path(__file__).parent
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            continue
        suite = Path(item.path).relative_to(here).parts[0] if here in Path(item.path).parents else ""
        if suite in SUITE_TIMEOUTS:
            item.add_marker(pytest.mark.timeout(SUITE_TIMEOUTS[suite]))


@pytest.fixture(scope="session", autouse=True)
def _end_stager_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Stager services outlive the workers (and tests) that started them: the ones on this session's roots end
    with the session, and those the tests start directly go idle after a minute instead of 15."""
    os.environ.setdefault("TREEMAT_SERVICE_IDLE_MINUTES", "1")
    yield
    end_services_under(tmp_path_factory.getbasetemp())
