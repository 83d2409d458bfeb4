"""The relay's hand framing (relay.py): varint-delimited protobuf messages read, scanned for a few varint fields and
answered with a failure, without importing protobuf (the relay stays import-light)."""

from __future__ import annotations

import os
import socket

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


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
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


def scan_fields(payload: bytes, wanted: tuple[int, ...]) -> dict[int, int]:
    """The varint fields `wanted` of a protobuf message, as sent (WorkRequest: 3 request_id, read it with
    `as_int32`; 4 cancel, true if not 0; WorkResponse: 3), the last of each as protobuf keeps it."""
    found: dict[int, int] = {}
    pos, end = 0, len(payload)
    try:
        while pos < end:
            key, pos = read_varint(payload, pos)
            field, kind = key >> 3, key & 7
            if kind == 0:
                value, pos = read_varint(payload, pos)
                if field in wanted:
                    found[field] = value
            elif kind == 2:
                size, pos = read_varint(payload, pos)
                pos += size
            elif kind in (1, 5):
                pos += 8 if kind == 1 else 4
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


def read_frame(fd_or_sock: int | socket.socket) -> bytes | None:
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
    chunks = [bytes(prefix)]
    while size:
        chunk = receive(min(size, 1 << 20))
        if not chunk:
            raise EOFError("the stream ended inside a message")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def payload_of(frame: bytes) -> bytes:
    """A frame's message, without its length prefix."""
    return frame[read_varint(frame, 0)[1] :]
