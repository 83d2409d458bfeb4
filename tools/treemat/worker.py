"""Bazel's persistent-worker protocol: JSON (streamed) or length-delimited proto, singleplex or multiplex.

Facts this relies on (measured with Bazel 4.2.3, see DESIGN.md): JSON requests arrive back to back with no
separator (`}{`); an input's digest is base64 of the 64-character hex sha256 text (proto: the hex text as
bytes); `requestId` is omitted when 0; the worker's cwd is the execroot. stdout carries protocol bytes only.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from treemat.errors import DigestError, ProtocolError, TreematError

_HEX64 = re.compile(rb"^[0-9a-fA-F]{64}$")
_STRUCTURAL = re.compile(r'[{}"\\]')


@dataclass(slots=True)
class WorkItem:
    """A decoded WorkRequest."""

    request_id: int
    arguments: list[str]
    inputs: list[tuple[str, str | None]]
    cancel: bool = False


@dataclass(slots=True)
class WorkReply:
    """What goes back to Bazel."""

    request_id: int
    exit_code: int
    output: str
    was_cancelled: bool = False


# ----------------------------------------------------------------------------------- decoding


def decode_digest(raw: bytes) -> str | None:
    """Bazel's digest bytes -> lowercase hex; None when empty. Accepts hex text or raw 32-byte sha256."""
    if not raw:
        return None
    if _HEX64.match(raw):
        return raw.decode("ascii").lower()
    if len(raw) == 32:
        return raw.hex()
    raise DigestError(f"unrecognised input digest ({len(raw)} bytes)")


def item_from_json(obj: Any) -> WorkItem:
    """Validate a decoded JSON WorkRequest; ProtocolError with a one-line reason otherwise."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"a work request must be a JSON object, got {type(obj).__name__}")
    request_id = obj.get("requestId", 0)
    if not isinstance(request_id, int) or isinstance(request_id, bool) or not 0 <= request_id < 2**31:
        raise ProtocolError(f"requestId must be a non-negative 32-bit integer, got {request_id!r:.80}")
    arguments = obj.get("arguments", [])
    if not isinstance(arguments, list) or not all(isinstance(a, str) for a in arguments):
        raise ProtocolError("arguments must be a list of strings")
    inputs: list[tuple[str, str | None]] = []
    raw_inputs = obj.get("inputs", [])
    if not isinstance(raw_inputs, list):
        raise ProtocolError("inputs must be a list")
    for entry in raw_inputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ProtocolError(f"each input needs a string path, got {entry!r:.120}")
        digest_text = entry.get("digest", "")
        if not isinstance(digest_text, str):
            raise ProtocolError(f"digest of {entry['path']!r} must be a base64 string")
        try:
            raw = base64.b64decode(digest_text, validate=True) if digest_text else b""
            hash_hex = decode_digest(raw)
        except (binascii.Error, ValueError, DigestError):
            if _HEX64.match(digest_text.encode()):
                hash_hex = digest_text.lower()
            else:
                raise ProtocolError(f"digest of {entry['path']!r} is not base64 of a sha256 hex string") from None
        inputs.append((entry["path"], hash_hex))
    cancel = obj.get("cancel", False)
    return WorkItem(request_id, list(arguments), inputs, bool(cancel))


def item_from_proto(message: Any) -> WorkItem:
    """A protobuf WorkRequest -> WorkItem."""
    inputs: list[tuple[str, str | None]] = []
    for entry in message.inputs:
        try:
            inputs.append((entry.path, decode_digest(bytes(entry.digest))))
        except DigestError as exc:
            raise ProtocolError(f"input {entry.path!r}: {exc}") from None
    return WorkItem(int(message.request_id), list(message.arguments), inputs, bool(message.cancel))


class JsonObjectSplitter:
    """Splits a byte stream of back-to-back JSON objects into object texts, tolerating whitespace.

    Feeds yield either `str` (one complete top-level object's text) or `ProtocolError` (garbage between
    objects, reported once per run of garbage).
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._scan = 0
        self._depth = 0
        self._in_string = False
        self._start = -1
        self._garbage_reported = False  # one error per run of garbage, however many reads it spans

    def feed(self, text: str) -> Iterator[str | ProtocolError]:
        """Add text; yield every object (or garbage error) now complete."""
        self._buffer += text
        buf = self._buffer
        pos = self._scan
        while pos < len(buf):
            if self._depth == 0 and not self._in_string:
                brace = buf.find("{", pos)
                garbage = (buf[pos:] if brace < 0 else buf[pos:brace]).strip()
                if garbage and not self._garbage_reported:
                    self._garbage_reported = True
                    yield ProtocolError(f"undecodable bytes between requests: {garbage[:60]!r}")
                if brace < 0:
                    pos = len(buf)
                    break
                self._garbage_reported = False
                self._start = brace
                self._depth = 1
                pos = brace + 1
                continue
            match = _STRUCTURAL.search(buf, pos)
            if match is None:
                pos = len(buf)
                break
            char = match.group()
            pos = match.end()
            if self._in_string:
                if char == "\\":
                    if pos >= len(buf):  # escape split across reads: rescan from the backslash
                        pos -= 1
                        break
                    pos += 1
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char == "{":
                self._depth += 1
            elif char == "}":
                self._depth -= 1
                if self._depth == 0:
                    yield buf[self._start : pos]
                    buf = buf[pos:]
                    pos = 0
                    self._start = -1
        if self._start > 0:
            buf = buf[self._start :]
            pos -= self._start
            self._start = 0
        elif self._depth == 0 and not self._in_string:
            buf, pos = buf[pos:], 0
        self._buffer = buf
        self._scan = pos

    @property
    def pending(self) -> bool:
        """True when a partial object is buffered (EOF now means a truncated request)."""
        return self._depth > 0


# ----------------------------------------------------------------------------------- serving

Handler = Callable[[WorkItem], WorkReply]


class WorkerServer:
    """Reads requests, runs them (multiplexed ones concurrently), writes whole responses under a lock."""

    def __init__(
        self,
        stdout: IO[bytes],
        handler: Handler,
        *,
        protocol: str,
        max_workers: int = 4,
        on_cancel: Callable[[int], bool] | None = None,
    ) -> None:
        self.stdout = stdout
        self.handler = handler
        self.protocol = protocol
        self.on_cancel = on_cancel
        self._write_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="treemat-action")
        self._inflight: set[int] = set()
        self._inflight_lock = threading.Lock()

    def respond(self, reply: WorkReply) -> None:
        """Write one response (JSON line or delimited proto) and flush."""
        if self.protocol == "json":
            body: dict[str, object] = {"exitCode": reply.exit_code, "output": reply.output}
            if reply.request_id:
                body["requestId"] = reply.request_id
            if reply.was_cancelled:
                body["wasCancelled"] = True
            data = (json.dumps(body) + "\n").encode()
        else:
            from treemat import protos

            message = protos.WorkResponse(
                exit_code=reply.exit_code,
                output=reply.output,
                request_id=reply.request_id,
                was_cancelled=reply.was_cancelled,
            )
            payload = message.SerializeToString(deterministic=True)
            data = protos.encode_varint(len(payload)) + payload
        with self._write_lock:
            self.stdout.write(data)
            self.stdout.flush()

    def dispatch(self, item: WorkItem) -> None:
        """Run or cancel one request."""
        if item.cancel:
            if item.request_id and self.on_cancel is not None:
                with self._inflight_lock:
                    inflight = item.request_id in self._inflight
                if inflight:
                    self.on_cancel(item.request_id)
            return
        if item.request_id == 0:
            self.respond(self._run(item))
            return
        with self._inflight_lock:
            self._inflight.add(item.request_id)
        self._pool.submit(self._run_and_respond, item)

    def _run_and_respond(self, item: WorkItem) -> None:
        reply = self._run(item)
        with self._inflight_lock:
            self._inflight.discard(item.request_id)
        self.respond(reply)

    def _run(self, item: WorkItem) -> WorkReply:
        try:
            return self.handler(item)
        except TreematError as exc:
            return WorkReply(item.request_id, 1, f"treemat: error: {exc}\n")
        except Exception as exc:  # the worker must keep serving whatever one request does
            return WorkReply(item.request_id, 1, f"treemat: internal error: {type(exc).__name__}: {exc}\n")

    def reject(self, error: ProtocolError, request_id: int = 0) -> None:
        """Answer a request that could not be decoded."""
        print(f"treemat worker: {error}", file=sys.stderr)
        self.respond(WorkReply(request_id, 1, f"treemat: malformed work request: {error}\n"))

    def serve_json(self, stdin: IO[bytes]) -> None:
        """Serve until EOF, decoding a stream of back-to-back JSON objects."""
        splitter = JsonObjectSplitter()
        decoder = _utf8_decoder()
        verbose = bool(os.environ.get("TREEMAT_VERBOSE"))
        while True:
            chunk = _read_some(stdin)
            if not chunk:
                break
            if verbose:
                print(f"treemat worker: {time.time():.3f} read {len(chunk)} bytes", file=sys.stderr, flush=True)
            for piece in splitter.feed(decoder(chunk)):
                if isinstance(piece, ProtocolError):
                    self.reject(piece)
                    continue
                try:
                    obj = json.loads(piece)
                except (ValueError, RecursionError) as exc:
                    self.reject(ProtocolError(f"invalid JSON: {str(exc)[:200]}"))
                    continue
                try:
                    item = item_from_json(obj)
                except ProtocolError as exc:
                    rid = obj.get("requestId", 0) if isinstance(obj, dict) else 0
                    self.reject(exc, rid if isinstance(rid, int) and 0 <= rid < 2**31 else 0)
                    continue
                self.dispatch(item)
        if splitter.pending:
            self.reject(ProtocolError("input ended inside a request"))

    def serve_proto(self, stdin: IO[bytes]) -> None:
        """Serve until EOF, reading varint-delimited WorkRequest messages."""
        from treemat import protos

        while True:
            try:
                message = protos.read_delimited(stdin, protos.WorkRequest)
            except ProtocolError as exc:
                self.reject(exc)
                if "truncated" in str(exc):
                    return
                continue
            if message is None:
                return
            try:
                item = item_from_proto(message)
            except ProtocolError as exc:
                self.reject(exc, int(message.request_id))
                continue
            self.dispatch(item)

    def close(self) -> None:
        """Wait for in-flight multiplex requests to finish and answer."""
        self._pool.shutdown(wait=True)


def _read_some(stream: IO[bytes]) -> bytes:
    fileno = getattr(stream, "fileno", None)
    if fileno is not None:
        try:
            return os.read(fileno(), 1 << 16)
        except (OSError, ValueError):
            pass
    read1 = getattr(stream, "read1", None)
    return bytes(read1(1 << 16)) if read1 is not None else bytes(stream.read(1 << 16))


def _utf8_decoder() -> Callable[[bytes], str]:
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return lambda data: decoder.decode(data)


def sniff_protocol(stdin: IO[bytes]) -> tuple[str, bytes]:
    """Peek at the first bytes: `{` followed by `"` or `}` means JSON, anything else proto."""
    head = b""
    while len(head.lstrip()) < 2:
        chunk = _read_some(stdin)
        if not chunk:
            break
        head += chunk
    stripped = head.lstrip()
    is_json = stripped[:1] == b"{" and stripped[1:2] in (b'"', b"}", b"\n", b" ", b"\r", b"\t")
    return ("json" if is_json else "proto"), head


class _Prefixed:
    """A byte stream that replays already-read bytes before the real stream."""

    def __init__(self, prefix: bytes, stream: IO[bytes]) -> None:
        self._prefix = prefix
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        if self._prefix:
            if size < 0 or size >= len(self._prefix):
                data, self._prefix = self._prefix, b""
                return data + (self._stream.read(size - len(data)) if size > len(data) else b"")
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return self._stream.read(size)

    def read1(self, size: int = -1) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        return _read_some(self._stream)


# ----------------------------------------------------------------------------------- wiring


def make_handler(root: Path, execroot: Path, *, max_workers: int) -> tuple[Handler, Callable[[int], bool], Any]:
    """Open the stack (stack.open_stack) and return (handler, canceller, executor)."""
    from treemat.counters import StatsStore
    from treemat.executor import ActionRequest, RequestInput
    from treemat.flagfile import parse_action_args, request_arguments
    from treemat.stack import open_stack

    stack = open_stack(root)
    counters, executor = stack.counters, stack.executor
    stats = StatsStore(root)
    stats_lock = threading.Lock()
    verbose = bool(os.environ.get("TREEMAT_VERBOSE"))

    def handle(item: WorkItem) -> WorkReply:
        started = time.perf_counter()
        try:
            spec = parse_action_args(request_arguments(item.arguments))
        except ProtocolError as exc:
            counters.add("requests_malformed")
            return WorkReply(item.request_id, 1, f"treemat: malformed work request: {exc}\n")
        request = ActionRequest(
            spec=spec,
            inputs=[RequestInput(path, digest) for path, digest in item.inputs],
            execroot=execroot,
            request_id=item.request_id,
        )
        result = executor.execute(request)
        with stats_lock, contextlib.suppress(OSError):
            stats.publish(counters, role="worker", extra={"recent_actions": list(executor.recent), **stack.describe()})
        if verbose:
            print(
                f"treemat worker: request {item.request_id} handled in {1000 * (time.perf_counter() - started):.1f} ms "
                f"(stage {1000 * result.stage_seconds:.1f}, tool {1000 * result.tool_seconds:.1f})",
                file=sys.stderr,
            )
        return WorkReply(item.request_id, result.exit_code, result.output, result.cancelled)

    return handle, executor.cancel, executor


def worker_main(argv: list[str]) -> int:
    """`treemat --persistent_worker [--protocol=json|proto|auto] [--root=DIR] [--max-workers=N]`."""
    parser = argparse.ArgumentParser(prog="treemat --persistent_worker", add_help=True)
    parser.add_argument("--persistent_worker", action="store_true")
    parser.add_argument("--protocol", choices=("json", "proto", "auto"), default="auto")
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--max-workers", type=int, default=max(2, os.cpu_count() or 2))
    options, _unknown = parser.parse_known_args([a for a in argv if not a.startswith("@")])
    # stdout is the protocol channel: keep a private handle to it and point fd 1 at stderr
    protocol_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    stdin = sys.stdin.buffer
    from treemat.stack import default_root

    root = (options.root or default_root()).expanduser().absolute()
    try:
        handler, canceller, executor = make_handler(root, Path.cwd(), max_workers=options.max_workers)
    except (TreematError, OSError) as exc:
        print(f"treemat worker: cannot start: {exc}", file=sys.stderr)
        return 1
    protocol = options.protocol
    source: IO[bytes] = stdin
    if protocol == "auto":
        protocol, head = sniff_protocol(stdin)
        source = _Prefixed(head, stdin)  # type: ignore[assignment]
    server = WorkerServer(
        protocol_out, handler, protocol=protocol, max_workers=options.max_workers, on_cancel=canceller
    )
    try:
        if protocol == "json":
            server.serve_json(source)
        else:
            server.serve_proto(source)
    finally:
        server.close()
        executor.close()
    return 0
