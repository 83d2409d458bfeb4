#!/usr/bin/env bash
# Start a remote-execution cluster on loopback: PostgreSQL, a BuildGrid 0.4.4 server (config:
# tests/support/buildgrid.yml) and N treemat bots, each with its own treemat root. Ctrl-C stops everything.
#   tools/cluster.sh [--dir DIR] [--bots N] [--concurrency N] [--port PORT]
# then, in another shell:
#   bazel build --config=remote --remote_executor=grpc://127.0.0.1:PORT //examples/...
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${TMPDIR:-/tmp}/treemat-cluster"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
export PYTHONPATH="$PWD/tools${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m tests.support.cluster up --dir "$dir" "${args[@]}"
