"""Execute one hand-built action against a BuildGrid endpoint, from wherever this process runs (a client network
namespace: `ip netns exec NS python3 -m tests.support.remote_run ENDPOINT`), retrying like Bazel does.

Reads a JSON spec on stdin: {"files": {path: text | [text, executable]}, "argv": [...], "outputs": [...],
"salt": str}. Prints one JSON line: status, exit code, stdout, the worker, the output files' sha256, the action
cache's entry for the action (or null), and how many Execute calls it took. An Execute that fails with
UNAVAILABLE (server restarting, connection lost) is retried on the same action digest, as Bazel's
--remote_retries does; every other error is reported as is.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any

import grpc

from .client import Client, Entry

RETRY_DEADLINE = 240.0


def run(endpoint: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Upload and execute `spec`; the outcome as a JSON-ready dict."""
    files: dict[str, Entry] = {
        path: (entry[0].encode(), bool(entry[1])) if isinstance(entry, list) else entry.encode()
        for path, entry in spec["files"].items()
    }
    deadline = time.monotonic() + RETRY_DEADLINE
    attempts = 0
    while True:
        channel = grpc.insecure_channel(endpoint.removeprefix("grpc://"))
        client = Client(channel, timeout=RETRY_DEADLINE)
        try:
            attempts += 1
            digest = client.build_action(
                files, spec["argv"], env={"PATH": "/usr/bin:/bin"}, outputs=spec["outputs"], salt=spec["salt"].encode()
            )
            done = client.execute(digest, skip_cache=attempts == 1)
            outputs = {f.path: f.digest.hash for f in done.result.output_files}
            stdout = client.read(done.result.stdout_digest).decode() if done.result.stdout_digest.hash else ""
            cached = client.cached(digest)
            cached_outputs = None
            if cached is not None:
                cached_outputs = {
                    f.path: hashlib.sha256(client.read(f.digest)).hexdigest() for f in cached.output_files
                }
            return {
                "status": done.status_code,
                "message": done.status_message,
                "exit_code": done.result.exit_code,
                "stdout": stdout,
                "worker": done.result.execution_metadata.worker,
                "outputs": outputs,
                "cached_outputs": cached_outputs,
                "attempts": attempts,
            }
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                return {"status": error.code().value[0], "message": str(error.details()), "attempts": attempts}
            time.sleep(0.5)  # Bazel's retrier backs off too
        finally:
            channel.close()


def main(argv: list[str]) -> int:
    """`remote_run ENDPOINT < spec.json`."""
    print(json.dumps(run(argv[0], json.load(sys.stdin))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
