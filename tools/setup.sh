#!/usr/bin/env bash
# One-time (idempotent) set-up of a fresh Debian machine for treemat: Bazel 4.2.3 from Debian, filesystem
# tools for the reflink/snapshot tests, and the Python package with its test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v bazel >/dev/null 2>&1 || need_apt+=(bazel-bootstrap bazel-rules-java)
[ -d /usr/share/bazel/rules/java ] || need_apt+=(bazel-rules-java)
command -v mkfs.btrfs >/dev/null 2>&1 || need_apt+=(btrfs-progs)
command -v mkfs.xfs >/dev/null 2>&1 || need_apt+=(xfsprogs)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
# `treemat bot` tests and tools/cluster.sh run BuildGrid on a private PostgreSQL (server binaries only; no service)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import treemat, pytest, pytest_timeout, hypothesis, mypy, ruff, importlinter, grpc_tools, matplotlib' >/dev/null 2>&1 \
   || [ "$("$PYTHON" -c 'import treemat, os; print(os.path.realpath(treemat.__file__))')" != "$(realpath tools/treemat/__init__.py)" ]; then
  echo "setup: pip install -e .[dev,chart]" >&2
  "$PYTHON" -m pip install -q --disable-pip-version-check -e '.[dev,chart]'
fi
if ! "$PYTHON" -c 'import buildgrid, grpc, psycopg2' >/dev/null 2>&1; then
  echo "setup: pip install -e .[bot] (BuildGrid 0.4.4, grpcio, psycopg2)" >&2
  "$PYTHON" -m pip install -q --disable-pip-version-check -e '.[bot]'
fi

if ! command -v swiftc >/dev/null 2>&1 && [ ! -x /opt/swift/usr/bin/swiftc ]; then
  echo "setup: note: no swiftc on PATH or under /opt/swift; Swift targets will be reported incompatible" >&2
fi
echo "setup: ok" >&2
