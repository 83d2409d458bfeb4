"""Tests for treemat.tree: validation, escapes, manifests, canonical Merkle digests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from treemat import protos
from treemat.digest import Digest, digest_bytes
from treemat.errors import ManifestError
from treemat.merkle import MerkleIndex
from treemat.tree import FileNode, InputTree, check_symlinks, load_manifest, normalize_path

D1 = digest_bytes(b"one")
D2 = digest_bytes(b"two")


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a/..", "nul\0byte", "..", "."])
def test_unsafe_paths_refused(bad: str) -> None:
    with pytest.raises(ManifestError):
        normalize_path(bad)


def test_paths_normalised() -> None:
    assert normalize_path("a//b/") == "a/b"


@pytest.mark.parametrize(
    ("link", "target"),
    [("a", "/etc"), ("a", ".."), ("d/a", "../../x"), ("d/e/a", "../../../etc/passwd"), ("a", "")],
)
def test_escaping_symlinks_refused(link: str, target: str) -> None:
    with pytest.raises(ManifestError):
        InputTree().add_symlink(link, target)


def test_symlink_chain_escape_refused() -> None:
    tree = InputTree()
    tree.add_directory("sub")
    tree.add_symlink("x", "sub/..")  # lexically fine: the tree root
    tree.add_symlink("sub/y", "../x/..")  # lexically fine too, but x/.. is the root's parent
    with pytest.raises(ManifestError, match="outside"):
        check_symlinks(tree)


def test_symlink_loop_refused() -> None:
    tree = InputTree()
    tree.add_symlink("a", "b")
    tree.add_symlink("b", "a")
    with pytest.raises(ManifestError, match="loop"):
        check_symlinks(tree)


def test_inner_symlinks_allowed() -> None:
    tree = InputTree()
    tree.add_file("lib/v2/x.so", FileNode(D1))
    tree.add_symlink("lib/current", "v2")
    tree.add_symlink("top", "lib/current/x.so")
    check_symlinks(tree)


def test_conflicts_refused() -> None:
    tree = InputTree()
    tree.add_file("a/b", FileNode(D1))
    with pytest.raises(ManifestError):
        tree.add_file("a/b", FileNode(D2))
    with pytest.raises(ManifestError):
        tree.add_file("a/b/c", FileNode(D1))
    with pytest.raises(ManifestError):
        tree.add_directory("a/b")
    tree.add_file("a/b", FileNode(D1))  # an identical duplicate is fine
    tree.add_symlink("s", "a")
    with pytest.raises(ManifestError):
        tree.add_file("s/inside", FileNode(D1))  # a path that traverses a symlink


def _tree(entries: list[tuple[str, Digest, bool]]) -> InputTree:
    tree = InputTree()
    for path, digest, executable in entries:
        tree.add_file(path, FileNode(digest, executable))
    return tree


ENTRY = st.tuples(st.sampled_from(["a", "b", "a/x", "b/y", "c/d/e", "c/f"]), st.sampled_from([D1, D2]), st.booleans())


@settings(max_examples=60, deadline=None)
@given(st.lists(ENTRY, min_size=1, max_size=6, unique_by=lambda e: e[0]), st.randoms())
def test_merkle_digest_independent_of_insertion_order(
    entries: list[tuple[str, Digest, bool]], rnd: random.Random
) -> None:
    try:
        first = _tree(entries)
        shuffled = list(entries)
        rnd.shuffle(shuffled)
        second = _tree(shuffled)
    except ManifestError:
        return  # e.g. "a" as a file and "a/x" beneath it: refused either way
    assert MerkleIndex().digest_of(first.root) == MerkleIndex().digest_of(second.root)


def test_merkle_digest_changes_with_content_mode_and_name() -> None:
    base = MerkleIndex().digest_of(_tree([("a/x", D1, False)]).root)
    assert MerkleIndex().digest_of(_tree([("a/x", D2, False)]).root) != base
    assert MerkleIndex().digest_of(_tree([("a/x", D1, True)]).root) != base
    assert MerkleIndex().digest_of(_tree([("a/y", D1, False)]).root) != base
    assert MerkleIndex().digest_of(_tree([("b/x", D1, False)]).root) != base


def test_merkle_digest_is_canonical_reapi_encoding() -> None:
    tree = _tree([("sub/f", D1, True)])
    index = MerkleIndex()
    sub = protos.Directory()
    node = sub.files.add(name="f", is_executable=True)
    node.digest.hash, node.digest.size_bytes = D1.hash, D1.size
    sub_digest = digest_bytes(sub.SerializeToString(deterministic=True))
    assert index.digest_of(tree.root.dirs["sub"]) == sub_digest
    root = protos.Directory()
    dnode = root.directories.add(name="sub")
    dnode.digest.hash, dnode.digest.size_bytes = sub_digest.hash, sub_digest.size
    assert index.digest_of(tree.root) == digest_bytes(root.SerializeToString(deterministic=True))


def test_manifest_round_trip(tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text(
        json.dumps(
            {
                "inputs": [
                    {"path": "src/a.swift", "digest": str(D1)},
                    {"path": "bin/tool", "digest": {"hash": D2.hash, "sizeBytes": D2.size}, "executable": True},
                    {"path": "src/link", "symlink": "a.swift"},
                    {"path": "out", "directory": True},
                ]
            }
        )
    )
    tree = load_manifest(manifest)
    assert dict(tree.iter_files()) == {"bin/tool": FileNode(D2, True), "src/a.swift": FileNode(D1, False)}
    assert tree.root.dirs["src"].symlinks["link"].target == "a.swift"
    assert "out" in tree.root.dirs


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"not": "a list"}, "list"),
        ([{"path": 3}], "#0"),
        ([{"path": "a"}], "needs a 'digest'"),
        ([{"path": "a", "digest": "zz/1"}], "#0 \\('a'\\)"),
        ([{"path": "../a", "digest": str(D1)}], "'\\.\\.'"),
        ([{"path": "a", "symlink": "/etc/passwd"}], "absolute"),
    ],
)
def test_bad_manifests_name_the_entry(entries: object, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        load_manifest(entries)  # type: ignore[arg-type]


def test_manifest_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(bad)


@pytest.mark.parametrize(
    "entry",
    [
        {"path": "a", "digest": f"{'0' * 64}/1", "executable": "false"},
        {"path": "a", "digest": f"{'0' * 64}/1", "executable": 1},
        {"path": "a", "digest": {"hash": "0" * 64, "sizeBytes": "1"}},
        {"path": "a", "digest": {"hash": "0" * 64, "sizeBytes": True}},
        {"path": "a", "digest": {"hash": "0" * 64}},
        {"path": "a", "symlink": 5},
        {"path": "a", "directory": "yes"},
        {"path": "a", "digest": f"{'0' * 64}/1", "excutable": True},
    ],
)
def test_manifest_wrong_json_types_are_errors(entry: dict[str, object]) -> None:
    with pytest.raises(ManifestError):
        load_manifest([entry])


def test_manifest_executable_false_is_false() -> None:
    tree = load_manifest([{"path": "a", "digest": f"{'0' * 64}/1", "executable": False}])
    assert [node.executable for _path, node in tree.iter_files()] == [False]
