#!/usr/bin/env bash
# Runs every check: lint + types, the pytest suites (unit, property, fault, end-to-end through real Bazel and
# swiftc), then `bazel test //tests/...`. Exits non-zero if anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh

echo "== ruff + mypy + import contract"
python3 -m ruff check tools tests benchmarks
python3 -m ruff format --check tools tests benchmarks
python3 -m mypy
python3 -m mypy benchmarks  # the benchmarks, held to the same strictness
# the layer order of docs/architecture.md (pyproject.toml [tool.importlinter]), on this tree's package
PYTHONPATH="tools${PYTHONPATH:+:$PYTHONPATH}" lint-imports --no-cache

echo "== pytest (unit, property, faults, e2e)"
python3 -m pytest -q -ra --durations=20 tests

echo "== bazel test //tests/..."
bazel test //tests/... --test_output=errors
