"""Wire formats: Bazel's WorkRequest/WorkResponse as a JSON stream or varint-delimited protos.

Facts this relies on (measured with Bazel 4.2.3): JSON requests arrive back to back with no separator (`}{`);
an input's digest is base64 of the 64-character hex sha256 text (proto: the hex text as bytes); `requestId`
is omitted when 0. This module only decodes and encodes; worker.py decides what to do with a request.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

from treemat import protos
from treemat.errors import DigestError, ProtocolError
from treemat.framing import (
    MessageTooBig,
    Readable,
    TruncatedStream,
    encode_delimited,
    parse_message,
    read_delimited_payload,
)
from treemat.manifest import InputManifest, decode_digest
from treemat.relaywire import request_id_of, scan_fields

Wire = Literal["json", "proto"]

_HEX64 = re.compile(rb"[0-9a-fA-F]{64}")
# A `}` that may close a top-level object: followed (after whitespace) by the end of the text or by something
# that cannot follow a nested `}` (`,` `]` `}`). Decoding is only tried where one appears, so a request split
# over many reads is parsed once, not once per read.
_MAYBE_END = re.compile(r"\}\s*(?:[^\s,\]}]|$)")
# Where a new request starts after an undecodable one: Bazel writes requests back to back (`}{`, `}\n{`).
_BOUNDARY = re.compile(r"\}\s*\{")
# What can follow an error position when the text merely stops early (a number, literal or escape cut short).
_CUT_TOKEN = re.compile(r"[0-9A-Za-z.+\-\\]*")
_WHITESPACE = re.compile(r"\s*")
_READ_SIZE = 1 << 16


class WorkItem:
    """A decoded WorkRequest (its inputs are decoded when first used: see manifest.py)."""

    __slots__ = ("arguments", "cancel", "inputs", "request_id", "sandbox_dir")

    def __init__(
        self, request_id: int, arguments: list[str], inputs: InputManifest, cancel: bool = False, sandbox_dir: str = ""
    ) -> None:
        self.request_id = request_id
        self.arguments = arguments
        self.inputs = inputs
        self.cancel = cancel
        self.sandbox_dir = sandbox_dir  # Bazel 7's multiplex sandboxing; refused (treemat sandboxes itself)

    def with_id(self, request_id: int) -> WorkItem:
        """The same request under another id (the service's own, across relays)."""
        return WorkItem(request_id, self.arguments, self.inputs, self.cancel, self.sandbox_dir)


class WorkReply(NamedTuple):
    """What goes back to Bazel; `then`: what the worker does once it is sent (the stats file: Bazel does not wait)."""

    request_id: int
    exit_code: int
    output: str
    was_cancelled: bool = False
    then: Callable[[], None] | None = None


class Malformed(NamedTuple):
    """A request that could not be decoded; answered with exit code 1 and the reason."""

    error: ProtocolError
    request_id: int = 0


# ----------------------------------------------------------------------------------- digests


def decode_json_digest(text: str, path: str) -> str | None:
    """A JSON input digest (base64 of the digest bytes, or bare hex) -> lowercase hex; None when empty."""
    try:
        return decode_digest(base64.b64decode(text, validate=True) if text else b"")
    except (binascii.Error, ValueError, DigestError):
        if _HEX64.fullmatch(text.encode()):
            return text.lower()
        raise ProtocolError(f"digest of {path!r} is not base64 of a sha256 hex string") from None


# ----------------------------------------------------------------------------------- requests


def item_from_json(obj: Any) -> WorkItem:
    """Validate a decoded JSON WorkRequest; ProtocolError with a one-line reason otherwise."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"a work request must be a JSON object, got {type(obj).__name__}")
    request_id = obj.get("requestId", 0)
    if not valid_request_id(request_id):
        raise ProtocolError(f"requestId must be a non-negative 32-bit integer, got {request_id!r:.80}")
    arguments = obj.get("arguments", [])
    if not isinstance(arguments, list) or not all(isinstance(a, str) for a in arguments):
        raise ProtocolError("arguments must be a list of strings")
    raw_inputs = obj.get("inputs", [])
    if not isinstance(raw_inputs, list):
        raise ProtocolError("inputs must be a list")
    inputs: list[tuple[str, str | None]] = []
    for entry in raw_inputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ProtocolError(f"each input needs a string path, got {entry!r:.120}")
        digest_text = entry.get("digest", "")
        if not isinstance(digest_text, str):
            raise ProtocolError(f"digest of {entry['path']!r} must be a base64 string")
        inputs.append((entry["path"], decode_json_digest(digest_text, entry["path"])))
    sandbox_dir = obj.get("sandboxDir", "")
    if not isinstance(sandbox_dir, str):
        raise ProtocolError("sandboxDir must be a string")
    cancel = bool(obj.get("cancel", False))
    return WorkItem(request_id, list(arguments), InputManifest.of(inputs), cancel, sandbox_dir)


def valid_request_id(value: object) -> bool:
    """A JSON requestId Bazel could have sent: a non-negative int32."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31


def item_from_proto(message: Any, payload: bytes) -> WorkItem:
    """A protobuf WorkRequest (and its serialized `payload`) -> WorkItem."""
    inputs = InputManifest.from_proto(message, payload)
    return WorkItem(
        int(message.request_id), list(message.arguments), inputs, bool(message.cancel), str(message.sandbox_dir)
    )


class JsonRequestDecoder:
    """Turns a byte stream of back-to-back JSON objects into decoded objects (`json.JSONDecoder.raw_decode`).

    `feed` yields each complete object, or a ProtocolError for garbage between objects (once per run of
    garbage) and for an object that is not valid JSON (decoding then resumes at the next `}{` boundary).
    """

    def __init__(self) -> None:
        self._json = json.JSONDecoder()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._scanned = 0  # where the next `_MAYBE_END` search starts: nothing before it can end an object
        self._resync = False
        self._garbage_reported = False

    def feed(self, data: bytes) -> Iterator[Any | ProtocolError]:
        """Add bytes; yield every object (or error) now complete."""
        buf = self._buffer + self._utf8.decode(data)
        pos, scanned = 0, self._scanned
        while True:
            if self._resync:
                boundary = _BOUNDARY.search(buf, pos)
                if boundary is None:
                    closing = buf.rfind("}", pos)  # a boundary may straddle two reads: keep a trailing `}`
                    pos = closing if closing >= 0 and not buf[closing + 1 :].strip() else len(buf)
                    break
                pos, self._resync = boundary.end() - 1, False
            pos = _match_end(_WHITESPACE, buf, pos)
            if pos == len(buf):
                break
            if buf[pos] != "{":
                brace = buf.find("{", pos)
                if not self._garbage_reported:
                    self._garbage_reported = True
                    garbage = buf[pos : brace if brace >= 0 else len(buf)].strip()
                    yield ProtocolError(f"undecodable bytes between requests: {garbage[:60]!r}")
                if brace < 0:
                    pos = len(buf)
                    break
                pos = brace
            self._garbage_reported = False
            if _MAYBE_END.search(buf, max(pos, scanned)) is None:
                scanned = _rescan_from(buf, pos)
                break
            try:
                obj, end = self._json.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if _cut_short(buf, exc):
                    scanned = _rescan_from(buf, pos)
                    break
                yield ProtocolError(f"invalid JSON: {str(exc)[:200]}")
                pos, self._resync = exc.pos, True
                continue
            except RecursionError:
                yield ProtocolError("invalid JSON: nested too deeply")
                pos, self._resync = pos + 1, True
                continue
            yield obj
            pos = end
        self._buffer = buf[pos:]
        self._scanned = max(0, scanned - pos)

    @property
    def pending(self) -> bool:
        """True when part of an object is buffered (EOF now means a truncated request)."""
        return not self._resync and self._buffer.lstrip().startswith("{")


def _rescan_from(buf: str, pos: int) -> int:
    """Where the next `_MAYBE_END` search must start once more text is appended to `buf`."""
    end = len(buf)
    while end > pos and buf[end - 1].isspace():
        end -= 1
    return max(pos, end - 1)


def _cut_short(buf: str, exc: json.JSONDecodeError) -> bool:
    """True when the decode error only says the text stopped early (more input may complete it)."""
    if exc.msg.startswith("Unterminated string"):
        return True
    return _match_end(_CUT_TOKEN, buf, exc.pos) == len(buf)


def _match_end(pattern: re.Pattern[str], text: str, pos: int) -> int:
    """End of `pattern` (which may match empty) at `pos`."""
    match = pattern.match(text, pos)
    return match.end() if match is not None else pos


def read_json_requests(
    stream: Readable, on_read: Callable[[int], None] | None = None
) -> Iterator[WorkItem | Malformed]:
    """Every request of a JSON stream until EOF; undecodable ones as Malformed."""
    decoder = JsonRequestDecoder()
    while chunk := read_some(stream):
        if on_read is not None:
            on_read(len(chunk))
        for piece in decoder.feed(chunk):
            if isinstance(piece, ProtocolError):
                yield Malformed(piece)
                continue
            try:
                yield item_from_json(piece)
            except ProtocolError as exc:
                rid = piece.get("requestId", 0) if isinstance(piece, dict) else 0
                yield Malformed(exc, rid if valid_request_id(rid) else 0)
    if decoder.pending:
        yield Malformed(ProtocolError("input ended inside a request"))


def read_proto_requests(stream: Readable) -> Iterator[WorkItem | Malformed]:
    """Every varint-delimited WorkRequest until EOF (or a truncated message); undecodable ones as Malformed."""
    while True:
        payload: bytes | None = None
        try:
            payload = read_delimited_payload(stream)
            if payload is None:
                return
            message = parse_message(payload, protos.WorkRequest)
        except TruncatedStream as exc:
            yield Malformed(exc)
            return
        except MessageTooBig as exc:  # read through: the next request is framed
            if not exc.fields.get(4):
                yield Malformed(exc, request_id_of(exc.fields))
            continue
        except ProtocolError as exc:  # answered under its id (a multiplex Bazel waits for that), a cancel not at all
            fields = scan_fields(payload, (3, 4)) if payload is not None else {}
            if not fields.get(4):
                yield Malformed(exc, request_id_of(fields))
            continue
        try:
            item: WorkItem | Malformed = item_from_proto(message, payload)
        except MemoryError:  # the message was read whole: the next one is framed
            item = Malformed(MessageTooBig(len(payload), {}), message.request_id)
        yield item


def read_requests(
    stream: Readable, protocol: Wire, on_read: Callable[[int], None] | None = None
) -> Iterator[WorkItem | Malformed]:
    """Requests of `stream` in `protocol`."""
    return read_json_requests(stream, on_read) if protocol == "json" else read_proto_requests(stream)


# ----------------------------------------------------------------------------------- responses


def encode_reply(reply: WorkReply, protocol: Wire) -> bytes:
    """One response as Bazel reads it: a JSON line, or a delimited WorkResponse."""
    if protocol == "json":
        body: dict[str, object] = {"exitCode": reply.exit_code, "output": reply.output}
        if reply.request_id:
            body["requestId"] = reply.request_id
        if reply.was_cancelled:
            body["wasCancelled"] = True
        return (json.dumps(body) + "\n").encode()
    message = protos.WorkResponse(
        exit_code=reply.exit_code, output=reply.output, request_id=reply.request_id, was_cancelled=reply.was_cancelled
    )
    return encode_delimited(message)


# ----------------------------------------------------------------------------------- the stream


def read_some(stream: Readable) -> bytes:
    """Whatever is available (at most 64 KiB), blocking only until something is; b"" at EOF."""
    fileno = getattr(stream, "fileno", None)
    if fileno is not None:
        try:
            return os.read(fileno(), _READ_SIZE)
        except (OSError, ValueError):
            pass
    read1 = getattr(stream, "read1", None)
    return bytes(read1(_READ_SIZE)) if read1 is not None else bytes(stream.read(_READ_SIZE))


def sniff_protocol(stream: Readable) -> tuple[Wire, Readable]:
    """Peek at the first bytes (`{` then `"`, `}` or whitespace means JSON, anything else proto).

    Returns the protocol and a stream that replays the peeked bytes before the rest.
    """
    head = b""
    while len(head.lstrip()) < 2:
        chunk = read_some(stream)
        if not chunk:
            break
        head += chunk
    stripped = head.lstrip()
    is_json = stripped[:1] == b"{" and stripped[1:2] in (b'"', b"}", b"\n", b" ", b"\r", b"\t")
    return ("json" if is_json else "proto"), _Prefixed(head, stream)


class _Prefixed:
    """A byte stream that replays already-read bytes before the real stream."""

    def __init__(self, prefix: bytes, stream: Readable) -> None:
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
        return read_some(self._stream)
