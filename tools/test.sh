#!/usr/bin/env bash
# Runs every check: lint + types, the pytest suites (unit, property, fault, end-to-end through real Bazel and
# swiftc), then `bazel test //tests/...`. Exits non-zero if anything fails. This is what CI runs; the long suites
# (pytest marker `heavy`: Bazel on BuildGrid + bots, the network-namespace cluster, BuildGrid and PostgreSQL
# restarted mid-action) run with `tools/test.sh --heavy` instead (CI keeps their fast slice, tests/bot's others).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") ;;
  --heavy)
    tools/setup.sh
    echo "== pytest, the heavy suites (marker heavy)"
    exec python3 -m pytest -q -ra --durations=10 -m heavy tests ;;
  *) echo "usage: tools/test.sh [--heavy]" >&2; exit 2 ;;
esac
tools/setup.sh

echo "== ruff + mypy + import contract"
python3 -m ruff check tools tests benchmarks
python3 -m ruff format --check tools tests benchmarks
python3 -m mypy
python3 -m mypy benchmarks  # the benchmarks, held to the same strictness
# the layer order of docs/architecture.md (pyproject.toml [tool.importlinter]), on this tree's package
PYTHONPATH="tools${PYTHONPATH:+:$PYTHONPATH}" lint-imports --no-cache

echo "== pytest (unit, property, faults, e2e; the heavy suites: tools/test.sh --heavy)"
python3 -m pytest -q -ra --durations=20 -m "not heavy" tests

# CI runs as root; users do not. The isolation, cleanup and permission suites run again as an ordinary user (uid
# 1000 in a user namespace of their own: no capability, owning the files), then with no inotify instance left
# (the limit lowered inside a user namespace of the test's own, never on the host): the guard must fail closed.
AS_USER=(unshare --user --map-user=1000 --map-group=1000)
ISOLATION_SUITES=(tests/faults tests/treemat/test_executor.py tests/treemat/test_worker.py tests/treemat/test_service.py tests/treemat/test_servicespawn.py tests/treemat/test_execpool.py
  tests/treemat/test_blobguard.py tests/treemat/test_cli.py tests/treemat/test_layout.py tests/treemat/test_rswift.py
  tests/treemat/test_bytecode.py tests/treemat/test_execrootwatch.py)
echo "== pytest as an unprivileged user: ${ISOLATION_SUITES[*]}"
"${AS_USER[@]}" python3 -m pytest -q -ra -p no:cacheprovider "${ISOLATION_SUITES[@]}"
echo "== pytest as an unprivileged user with no inotify instance left: faults"
unshare --user --map-root-user sh -c 'echo 0 > /proc/sys/user/max_inotify_instances && exec "$@"' sh \
  "${AS_USER[@]}" python3 -m pytest -q -ra -p no:cacheprovider tests/faults

echo "== bazel test //tests/..."
bazel test //tests/... --test_output=errors
