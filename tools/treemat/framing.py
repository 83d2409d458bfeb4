"""Protobuf's length-delimited framing (Java's writeDelimitedTo): a varint length, then the message.

Bazel's proto worker protocol (protocol.py) and its binary execution log (execlog.py) both use it.
"""

from __future__ import annotations

from typing import IO, Protocol, TypeVar

from google.protobuf.message import DecodeError, Message

from treemat.errors import ProtocolError
from treemat.relaywire import MAX_FRAME, encode_varint, scan_fields, skim

MAX_MESSAGE_BYTES = MAX_FRAME  # one limit for the relay's frames and the worker's messages


M = TypeVar("M", bound=Message)


class Readable(Protocol):
    """A byte stream: a pipe, a file, `io.BytesIO`, or the replaying stream `sniff_protocol` returns."""

    def read(self, size: int = -1, /) -> bytes:
        """Up to `size` bytes (all, when negative); b"" at EOF."""
        ...


class TruncatedStream(ProtocolError):
    """The stream ended inside a message: nothing more can be read from it."""


class MessageTooBig(ProtocolError):
    """A message this process cannot hold or parse (MemoryError), read through: the next one is framed. `fields`:
    its varint fields 3 and 4 (a WorkRequest's id and cancel flag)."""

    def __init__(self, size: int, fields: dict[int, int]) -> None:
        super().__init__(f"a message of {size} bytes does not fit in this process's memory: it did not run")
        self.fields = fields


def encode_delimited(message: Message) -> bytes:
    """`message` prefixed by its varint length (Java's writeDelimitedTo)."""
    payload = message.SerializeToString(deterministic=True)
    return encode_varint(len(payload)) + payload


def write_delimited(stream: IO[bytes], message: Message) -> None:
    """Write `message` with its varint length prefix."""
    stream.write(encode_delimited(message))


def read_varint(stream: Readable) -> int | None:
    """Read a varint; None at clean EOF before the first byte."""
    result = shift = 0
    while True:
        byte = stream.read(1)
        if not byte:
            if shift == 0:
                return None
            raise TruncatedStream("truncated varint length prefix")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ProtocolError("varint length prefix longer than 10 bytes")


def read_delimited(stream: Readable, cls: type[M], *, max_size: int = MAX_MESSAGE_BYTES) -> M | None:
    """Read one length-delimited message; None at clean EOF; ProtocolError on truncation or garbage."""
    payload = read_delimited_payload(stream, max_size=max_size)
    return None if payload is None else parse_message(payload, cls)


def read_delimited_payload(stream: Readable, *, max_size: int = MAX_MESSAGE_BYTES) -> bytes | None:
    """The bytes of one length-delimited message; None at clean EOF; ProtocolError on truncation."""
    size = read_varint(stream)
    if size is None:
        return None
    if size > max_size:
        raise ProtocolError(f"message of {size} bytes exceeds the {max_size}-byte limit")
    chunks: list[bytes] = []
    got = 0
    try:
        while got < size:
            chunk = stream.read(min(size - got, 1 << 20))
            if not chunk:
                raise TruncatedStream(f"truncated message: got {got} of {size} bytes")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    except MemoryError:  # read through, holding none of it
        try:
            fields = skim(chunks, stream.read, size - got)
        except EOFError as exc:
            raise TruncatedStream(str(exc)) from None
        raise MessageTooBig(size, fields) from None


def parse_message(payload: bytes, cls: type[M]) -> M:
    """Parse `payload` as a `cls`; ProtocolError if it is not one."""
    message = cls()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise ProtocolError(f"undecodable {cls.__name__}: {exc}") from None
    except MemoryError:
        del message
        raise MessageTooBig(len(payload), scan_fields(payload, (3, 4))) from None
    return message
