"""The relay's hand framing (relay.py): varint-delimited protobuf messages read, scanned for a few varint fields and
answered with a failure, without importing protobuf (the relay stays import-light)."""

from __future__ import annotations

import os
from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (and re): the relay imports this
if TYPE_CHECKING:
    from _socket import socket

MAX_FRAME = 256 << 20


def encode_varint(value: int) -> bytes:
    """Protobuf base-128 varint (framing's too: this module imports no protobuf); a negative int32 as protobuf
    writes it, in ten bytes (its 64-bit two's complement)."""
    if value < 0:
        value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it (IndexError if it is cut short)."""
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def as_int32(value: int) -> int:
    """A varint read as an int32 field, as protobuf reads it: its low 32 bits, signed."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def request_id_of(fields: dict[int, int]) -> int:
    """The request id of a message's scanned fields (`scan_fields`, `skim`), as protobuf reads field 3."""
    return as_int32(fields.get(3, 0))


def scan_fields(payload: bytes | memoryview, wanted: tuple[int, ...]) -> dict[int, int]:
    """The varint fields `wanted` of a protobuf message, as sent (WorkRequest: 3 request_id, read it with
    `as_int32`; 4 cancel, true if not 0; WorkResponse: 3), the last of each as protobuf keeps it."""
    found: dict[int, int] = {}
    groups: list[int] = []  # the open groups' field numbers: what is inside one is not the message's own
    pos, end = 0, len(payload)
    try:
        while pos < end:
            key = payload[pos]
            if key & 7 == 2 and not key & 0x80:  # length-delimited, 1-byte key: a request's inputs, inlined (3x)
                size = payload[pos + 1]
                if not size & 0x80:
                    pos += 2 + size
                elif not (high := payload[pos + 2]) & 0x80:  # 128 bytes to 16 KiB: an input with a long path
                    pos += 3 + (size & 0x7F | high << 7)
                else:
                    size, pos = read_varint(payload, pos + 1)
                    pos += size
                continue
            key, pos = read_varint(payload, pos)
            field, kind = key >> 3, key & 7
            if kind == 0:
                value, pos = read_varint(payload, pos)
                if field in wanted and not groups:
                    found[field] = value
            elif kind == 2:
                size, pos = read_varint(payload, pos)
                pos += size
            elif kind in (1, 5):
                pos += 8 if kind == 1 else 4
            elif kind == 3:  # an unknown field's group, which protobuf reads through (to the fields after it)
                groups.append(field)
            elif kind == 4 and groups and groups[-1] == field:
                groups.pop()
            else:
                break  # garbage: the service answers it as malformed
    except IndexError:
        pass  # truncated: what was found so far
    return found


def failure_frame(request_id: int, text: str) -> bytes:
    """A delimited WorkResponse with exit code 1 and `text` (hand-encoded, as protobuf would)."""
    output = text.encode()
    body = b"\x08\x01\x12" + encode_varint(len(output)) + output
    if request_id:
        body += b"\x18" + encode_varint(request_id)
    return encode_varint(len(body)) + body


def read_frame(fd_or_sock: int | socket) -> bytes | None:
    """One varint-delimited frame (prefix included) from a descriptor or socket; None at EOF."""
    receive = (lambda n: os.read(fd_or_sock, n)) if isinstance(fd_or_sock, int) else fd_or_sock.recv
    prefix = bytearray()
    size = shift = 0
    while True:
        byte = receive(1)
        if not byte:
            if prefix:
                raise EOFError("the stream ended inside a length prefix")
            return None
        prefix += byte
        size |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            break
        if len(prefix) == 10:  # what a varint can be (else a stream of 0x80 grows the prefix until EOF)
            raise EOFError("a length prefix longer than 10 bytes")
        shift += 7
    if size > MAX_FRAME:
        raise EOFError(f"a message of {size} bytes")
    chunks, left = [bytes(prefix)], size
    try:
        while left:
            chunk = receive(min(left, 1 << 20))
            if not chunk:
                raise EOFError("the stream ended inside a message")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except MemoryError:  # out of address space: read the rest once, holding none of it; the stream stays framed
        del chunks[0]
        raise FrameTooBig(size, skim(chunks, receive, left)) from None


class FrameTooBig(Exception):
    """A frame this process cannot hold (MemoryError), read through: its size and its varint fields 3 and 4."""

    def __init__(self, size: int, fields: dict[int, int]) -> None:
        super().__init__(f"a message of {size} bytes does not fit in memory")
        self.size, self.fields = size, fields


def skim(held: list[bytes], receive: Callable[[int], bytes], left: int) -> dict[int, int]:
    """The varint fields 3 and 4 of a message whose first bytes are `held` (dropped as read) and whose other
    `left` bytes are still to be received; every byte is consumed, none kept."""
    buffer, pos, found = b"", 0, {}
    groups: list[int] = []  # as scan_fields keeps them

    def fill() -> bool:  # the next piece of the message; False at its end
        nonlocal buffer, pos, left
        if held:
            buffer = held.pop(0)
        elif left:
            buffer = receive(min(left, 1 << 16))
            if not buffer:
                raise EOFError("the stream ended inside a message")
            left -= len(buffer)
        else:
            return False
        pos = 0
        return True

    def skip(count: int) -> bool:  # False if the message ended first
        nonlocal pos
        while count:
            while pos == len(buffer):
                if not fill():
                    return False
            step = min(count, len(buffer) - pos)
            pos, count = pos + step, count - step
        return True

    def varint() -> int | None:
        nonlocal pos
        result = shift = 0
        while True:
            while pos == len(buffer):
                if not fill():
                    return None
            byte = buffer[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while (key := varint()) is not None:
        field, kind = key >> 3, key & 7
        if kind == 0:
            if (value := varint()) is None:
                break
            if field in (3, 4) and not groups:
                found[field] = value
        elif kind == 2:
            if (length := varint()) is None or not skip(length):
                break
        elif kind == 3:  # a group, read through as scan_fields does
            groups.append(field)
        elif kind == 4 and groups and groups[-1] == field:
            groups.pop()
        elif kind not in (1, 5) or not skip(8 if kind == 1 else 4):
            break  # garbage: what follows is consumed all the same
    skip(MAX_FRAME)
    return found


def payload_of(frame: bytes) -> bytes:
    """A frame's message, without its length prefix."""
    return frame[read_varint(frame, 0)[1] :]


def frame_fields(frame: bytes, wanted: tuple[int, ...]) -> dict[int, int]:
    """scan_fields of a frame's message, read in place (a copy of a big one may not fit in memory)."""
    return scan_fields(memoryview(frame)[read_varint(frame, 0)[1] :], wanted)
