#!/usr/bin/env bash
# Start a remote-execution cluster: PostgreSQL, a BuildGrid 0.4.4 server (config: tests/support/buildgrid.yml)
# and N treemat bots, each with its own treemat root. Ctrl-C stops everything.
#   tools/cluster.sh [--dir DIR] [--bots N] [--concurrency N] [--port PORT] [--netns]
# then, in another shell:
#   bazel build --config=remote --remote_executor=grpc://127.0.0.1:PORT //examples/...
# --netns (root): the server + PostgreSQL, each bot (on its own ext4 loop image) and a client namespace for
# Bazel, joined by a private bridge (tests/support/netns.py); the command to run Bazel there is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${TMPDIR:-/tmp}/treemat-cluster"
args=()
netns=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --netns) netns=1; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
export PYTHONPATH="$PWD/tools${PYTHONPATH:+:$PYTHONPATH}"
if [ "$netns" -eq 0 ]; then
  exec "${PYTHON:-python3}" -m tests.support.cluster up --dir "$dir" "${args[@]}"
fi
# The Python side removes its namespaces, mounts and images on any exit it sees (Ctrl-C, SIGTERM, SIGHUP, an
# error). This trap covers the rest (it was SIGKILLed): it picks the namespace tag and the scratch directory, so it
# knows exactly what to remove: the processes in and the namespaces named tm<tag>-*, the mounts under the scratch
# directory, the directory. Nothing else is touched.
[ "$(id -u)" -eq 0 ] || { echo "cluster.sh --netns needs root (ip netns, loop mounts)" >&2; exit 1; }
tag="$(od -An -N2 -tx1 /dev/urandom | tr -d ' \n')"
scratch="$(mktemp -d /var/tmp/treemat-netns-XXXXXXXX)"
child=""
cleanup() {
  if [ -n "$child" ]; then
    kill -TERM "$child" 2>/dev/null || true
    while kill -0 "$child" 2>/dev/null; do wait "$child" 2>/dev/null || true; done
  fi
  local name mountpoint
  for name in $(ip netns list | awk '{print $1}' | grep "^tm$tag-" || true); do
    ip netns pids "$name" | xargs -r kill -KILL 2>/dev/null || true  # orphans of a SIGKILLed run: ours alone
    ip netns del "$name" || true
  done
  for mountpoint in $(findmnt -rno TARGET | grep "^$scratch/" || true); do umount -l "$mountpoint" || true; done
  rm -rf "$scratch"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
TREEMAT_NETNS_TAG="$tag" TREEMAT_NETNS_DIR="$scratch" "${PYTHON:-python3}" -m tests.support.cluster up \
  --dir "$dir" "${args[@]}" &
child=$!
wait "$child"
