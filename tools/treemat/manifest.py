"""A request's input list as Bazel sent it: decoded lazily, and diffed against an earlier one in O(changed).

A proto WorkRequest lists its inputs as consecutive `inputs` records (field 2) between the arguments and the
request id; Bazel sends them in the same (sorted) order every time. A manifest keeps those bytes (the span)
and a sparse index of record boundaries. Two requests of one action shape (a target rebuilt after an edit)
share nearly all of their span, so `delta` finds the common prefix and suffix by comparing bytes (memcmp
speed) and decodes only the records in between: reusing an exec dir costs O(changed inputs), not O(inputs).
Anything else (staging afresh) decodes the whole list once, and caches it.

Where the span cannot be trusted to be exactly the input records (another sender's field order, unknown
fields), or for manifests built from a list (JSON requests, tests, other callers), `delta` compares decoded
lists instead: still C-speed slice comparisons, then a dict diff of the differing middle.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, overload

from google.protobuf.message import DecodeError

from treemat import protos
from treemat.errors import DigestError, ProtocolError

_INPUTS_TAG = 0x12  # field 2, wire type 2 (length-delimited)
_STRIDE = 64  # a boundary is indexed every this many records
_CHUNK = 1 << 12  # bytes compared per step while looking for the first difference
_HEX64 = re.compile(rb"[0-9a-fA-F]{64}")
_HEX_RUN = re.compile(rb"[0-9a-fA-F]*")


class RequestInput(NamedTuple):
    """One input as Bazel lists it: execroot-relative path and (usually) its sha256 hex."""

    path: str
    hash: str | None = None


class InputDelta(NamedTuple):
    """Two input lists agree but for one run: `earlier` (of the old list) is replaced by `later` (in the new)."""

    earlier: list[RequestInput]
    later: list[RequestInput]


def decode_digest(raw: bytes) -> str | None:
    """Bazel's digest bytes -> lowercase hex; None when empty. Accepts hex text or a raw 32-byte sha256."""
    if not raw:
        return None
    if _HEX64.fullmatch(raw):
        return raw.decode("ascii").lower()
    if len(raw) == 32:
        return raw.hex()
    raise DigestError(f"unrecognised input digest ({len(raw)} bytes)")


class InputManifest(Sequence[RequestInput]):
    """An immutable list of request inputs, decoded on first full use."""

    __slots__ = ("_count", "_entries", "_index", "_message", "_span")

    def __init__(
        self, entries: list[RequestInput] | None, count: int, message: Any = None, span: bytes | None = None
    ) -> None:
        self._entries = entries
        self._count = count
        self._message = message  # the parsed WorkRequest, until the entries are decoded
        self._span = span  # the raw `inputs` records, when they are known to be exactly that
        self._index: list[tuple[int, int]] | None = None  # sparse (byte offset, record number) boundaries

    @classmethod
    def of(cls, entries: Iterable[RequestInput | tuple[str, str | None]]) -> InputManifest:
        """A manifest of already decoded entries."""
        if isinstance(entries, InputManifest):
            return entries
        listed = [entry if isinstance(entry, RequestInput) else RequestInput(*entry) for entry in entries]
        return cls(listed, len(listed))

    @classmethod
    def from_proto(cls, message: Any, payload: bytes) -> InputManifest:
        """The inputs of a parsed WorkRequest; `payload` is its serialized form (the span is cut out of it)."""
        return cls(None, len(message.inputs), message, _inputs_span(message, payload))

    # ------------------------------------------------------------------------------ the sequence

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> RequestInput: ...

    @overload
    def __getitem__(self, index: slice) -> list[RequestInput]: ...

    def __getitem__(self, index: int | slice) -> RequestInput | list[RequestInput]:
        return self.entries()[index]

    def __iter__(self) -> Iterator[RequestInput]:
        return iter(self.entries())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, InputManifest):
            return self.entries() == other.entries()
        if isinstance(other, list):
            return self.entries() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"InputManifest({self._count} inputs)"

    def entries(self) -> list[RequestInput]:
        """Every entry, decoded (once); ProtocolError for an undecodable digest."""
        if self._entries is None:
            self._entries = _decode_all(self._message)
            self._message = None
        return self._entries

    # ------------------------------------------------------------------------------ diffing

    def delta(self, earlier: InputManifest) -> InputDelta:
        """The difference from `earlier` to this list; ProtocolError for an undecodable digest in it."""
        if self._span is not None and earlier._span is not None:
            found = self._span_delta(earlier)
            if found is not None:
                return found
        return _list_delta(earlier.entries(), self.entries())

    def _span_delta(self, earlier: InputManifest) -> InputDelta | None:
        old, new = earlier._span, self._span
        assert old is not None and new is not None
        if earlier._index is None and not earlier._build_index():
            return None
        if old == new:
            self._index = earlier._index
            return InputDelta([], [])
        index = earlier._index
        assert index is not None
        prefix = _common_prefix(old, new)
        suffix = _common_suffix(old, new, min(len(old), len(new)) - prefix)
        # start at the last indexed boundary at or before the first differing byte: the same in both spans
        at = bisect.bisect_right(index, (prefix, self._count + earlier._count)) - 1
        start, record = index[at]
        try:
            # records that end inside the common prefix are the same in both: step over them
            while start < len(old):
                end = _record_end(old, start)[1]
                if end > prefix:
                    break
                start, record = end, record + 1
            old_at = new_at = start
            old_records: list[tuple[int, int]] = []
            new_records: list[tuple[int, int]] = []
            while True:
                old_left, new_left = len(old) - old_at, len(new) - new_at
                if old_left == new_left and old_left <= suffix:
                    break  # aligned inside the common suffix: every later record is the same in both
                if old_left >= new_left:
                    payload, end = _record_end(old, old_at)
                    old_records.append((payload, end))
                    old_at = end
                else:
                    payload, end = _record_end(new, new_at)
                    new_records.append((payload, end))
                    new_at = end
        except _NotInputRecord:
            return None
        if self._count - earlier._count != len(new_records) - len(old_records):
            return None  # the spans do not hold what the parsed messages do: do not trust them
        earlier_run = [_decode_record(old, payload, end) for payload, end in old_records]
        later_run = [_decode_record(new, payload, end) for payload, end in new_records]
        self._index = _shifted_index(index, start, record, (old_at, new_at), (len(old_records), len(new_records)))
        return InputDelta(earlier_run, later_run)

    def _build_index(self) -> bool:
        """Index every `_STRIDE`-th record boundary of the span; False if it is not all `inputs` records."""
        span = self._span
        assert span is not None
        index: list[tuple[int, int]] = []
        at = record = 0
        try:
            while at < len(span):
                if record % _STRIDE == 0:
                    index.append((at, record))
                at = _record_end(span, at)[1]
                record += 1
        except _NotInputRecord:
            self._span = None
            return False
        if record != self._count:
            self._span = None
            return False
        index.append((at, record))
        self._index = index
        return True


class _NotInputRecord(Exception):
    """The bytes at a position are not an `inputs` record."""


def _record_end(span: bytes, at: int) -> tuple[int, int]:
    """(payload start, end) of the `inputs` record at `at`."""
    if at >= len(span) or span[at] != _INPUTS_TAG:
        raise _NotInputRecord
    size = shift = 0
    pos = at + 1
    while True:
        if pos >= len(span) or shift > 28:
            raise _NotInputRecord
        byte = span[pos]
        pos += 1
        size |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    if pos + size > len(span):
        raise _NotInputRecord
    return pos, pos + size


def _decode_record(span: bytes, payload: int, end: int) -> RequestInput:
    try:
        message = protos.Input.FromString(span[payload:end])
    except DecodeError as exc:
        raise ProtocolError(f"undecodable input record: {exc}") from None
    return RequestInput(message.path, _digest_of(message))


def _digest_of(message: Any) -> str | None:
    try:
        return decode_digest(bytes(message.digest))
    except DigestError as exc:
        raise ProtocolError(f"input {message.path!r}: {exc}") from None


def _decode_all(message: Any) -> list[RequestInput]:
    """Every input of a parsed WorkRequest; the common case (all 64-char hex digests) checked in one pass."""
    pairs = [(record.path, record.digest) for record in message.inputs]
    if not pairs:
        return []
    paths, digests = zip(*pairs, strict=True)
    joined = b"".join(digests)
    if len(joined) == 64 * len(pairs) and _HEX_RUN.fullmatch(joined):
        text = joined.decode("ascii").lower()
        hexes = [text[at : at + 64] for at in range(0, len(text), 64)]
        make = tuple.__new__  # RequestInput(...) without its Python-level __new__: a third of the cost
        return [make(RequestInput, entry) for entry in zip(paths, hexes, strict=True)]
    return [RequestInput(record.path, _digest_of(record)) for record in message.inputs]


def _inputs_span(message: Any, payload: bytes) -> bytes | None:
    """The bytes of the `inputs` records, when the payload is exactly: arguments, inputs, the other fields.

    That is how Bazel (protobuf-java, fields in number order) writes a WorkRequest. Anything else (fields
    interleaved, unknown fields) gives None: diffs then compare decoded lists.
    """
    head = protos.WorkRequest(arguments=message.arguments).SerializeToString()
    tail = protos.WorkRequest(
        request_id=message.request_id,
        cancel=message.cancel,
        verbosity=message.verbosity,
        sandbox_dir=message.sandbox_dir,
    ).SerializeToString()
    if len(head) + len(tail) > len(payload) or not payload.startswith(head) or not payload.endswith(tail):
        return None
    return payload[len(head) : len(payload) - len(tail)]


def _common_prefix(old: Sequence[Any], new: Sequence[Any]) -> int:
    """Length of the longest common prefix (of two byte strings or two lists)."""
    limit = min(len(old), len(new))
    return _agreeing_length(lambda start, stop: old[start:stop] == new[start:stop], limit)


def _common_suffix(old: Sequence[Any], new: Sequence[Any], limit: int) -> int:
    """Length of the longest common suffix, at most `limit` (of two byte strings or two lists)."""
    end_old, end_new = len(old), len(new)
    return _agreeing_length(
        lambda start, stop: old[end_old - stop : end_old - start] == new[end_new - stop : end_new - start], limit
    )


def _agreeing_length(same: Callable[[int, int], bool], limit: int) -> int:
    """The largest n <= limit with same(0, n), given same(a, b) says whether items a..b (from one end) agree.

    Galloping: steps of growing size while they agree (few Python steps, memcmp inside), then bisection of
    the last step. Costs O(n) byte comparisons and O(log n) calls.
    """
    low, step = 0, _CHUNK
    while low < limit:
        high = min(low + step, limit)
        if not same(low, high):
            break
        low, step = high, step * 2
    else:
        return limit
    # bytes before `low` agree; some byte in low..high does not
    while high - low > 1:
        middle = (low + high) // 2
        if same(low, middle):
            low = middle
        else:
            high = middle
    return low


def _shifted_index(
    index: list[tuple[int, int]], start: int, record: int, ends: tuple[int, int], counts: tuple[int, int]
) -> list[tuple[int, int]]:
    """The new span's boundary index: the old one up to the window, (window end), the old one shifted after.

    The window starts at byte `start` (record `record`) in both spans and ends at `ends` (old, new) after
    `counts` (old, new) records.
    """
    (old_end, new_end), (old_count, new_count) = ends, counts
    shift, count_change = new_end - old_end, new_count - old_count
    before = [entry for entry in index if entry[0] < start]
    after = [(at + shift, number + count_change) for at, number in index if at > old_end]
    return (
        [*before, (start, record), (new_end, record + new_count), *after]
        if new_end > start
        else [*before, (start, record), *after]
    )


def _list_delta(old: Sequence[RequestInput], new: Sequence[RequestInput]) -> InputDelta:
    """Delta of two decoded lists: the common prefix and suffix found as for spans, by slice comparisons."""
    prefix = _common_prefix(old, new)
    suffix = _common_suffix(old, new, min(len(old), len(new)) - prefix)
    return InputDelta(list(old[prefix : len(old) - suffix]), list(new[prefix : len(new) - suffix]))
