"""Tests for treemat.digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from treemat.digest import EMPTY_DIGEST, EMPTY_SHA256, Digest, check_hash, digest_bytes, digest_file
from treemat.errors import DigestError


def test_empty_digest_is_sha256_of_nothing() -> None:
    assert hashlib.sha256(b"").hexdigest() == EMPTY_SHA256
    assert EMPTY_DIGEST.is_empty
    assert digest_bytes(b"") == EMPTY_DIGEST
    assert not digest_bytes(b"x").is_empty


@given(st.binary(max_size=4096))
def test_parse_round_trips_str(data: bytes) -> None:
    digest = digest_bytes(data)
    assert Digest.parse(str(digest)) == digest
    assert digest.size == len(data)


@given(st.binary(max_size=3 << 20))
def test_digest_file_matches_digest_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("d") / "blob"
    path.write_bytes(data)
    assert digest_file(path) == digest_bytes(data)


def test_uppercase_hash_is_normalised() -> None:
    upper = hashlib.sha256(b"a").hexdigest().upper()
    assert Digest.parse(f"{upper}/1").hash == upper.lower()
    assert check_hash(f"  {upper}\n") == upper.lower()


@pytest.mark.parametrize(
    "text",
    ["", "abc/1", f"{'0' * 64}", f"{'0' * 64}/", f"{'0' * 64}/-1", f"{'g' * 64}/1", f"{'0' * 63}/1", f"{'0' * 64}/1.5"],
)
def test_malformed_digests_are_refused(text: str) -> None:
    with pytest.raises(DigestError):
        Digest.parse(text)


def test_constructor_validates() -> None:
    with pytest.raises(DigestError):
        Digest("0" * 64, -1)
    with pytest.raises(DigestError):
        Digest("XYZ", 1)


def test_digest_file_streams_large_file(tmp_path: Path) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    path = tmp_path / "big"
    with path.open("wb") as handle:
        for _ in range(5):
            handle.write(chunk)
        handle.write(b"tail")
    expected = hashlib.sha256(chunk * 5 + b"tail").hexdigest()
    assert digest_file(path) == Digest(expected, 5 * len(chunk) + 4)
