"""The manifest's file table (FolderDigests): sha256 in large blocks and threads, a file read again
only when it changed (the build writes its manifest twice around verify)."""
from __future__ import annotations

import hashlib
import os

import pytest

from dsv4_compile import manifest
from dsv4_compile.manifest import ArtifactError, FolderDigests, sha256_file, sha256_files


def _write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize("size", [0, 1, 4095, 3 * 4096 + 5])
def test_sha256_file_equals_hashlib_across_block_edges(tmp_path, size):
    data = os.urandom(size)
    _write(tmp_path / "f", data)
    assert sha256_file(str(tmp_path / "f"), chunk=4096) == hashlib.sha256(data).hexdigest()


def test_sha256_files_in_threads_equals_one_by_one(tmp_path):
    rels = [f"d{i % 2}/f{i}" for i in range(5)]
    for i, rel in enumerate(rels):
        _write(tmp_path / rel, os.urandom(1000 + i))
    assert sha256_files(str(tmp_path), rels) == {rel: sha256_file(str(tmp_path / rel)) for rel in rels}


def test_folder_digests_hash_again_only_what_changed(tmp_path, monkeypatch):
    _write(tmp_path / "a", b"a" * 100)
    _write(tmp_path / "w/weights", b"w" * 5000)
    hashed = []
    real = manifest.sha256_files
    monkeypatch.setattr(manifest, "sha256_files", lambda root, rels: hashed.append(sorted(rels)) or real(root, rels))
    digests = FolderDigests(str(tmp_path))
    first = digests.table()
    assert digests.table() == first and hashed == [["a", "w/weights"], []]
    # replaced (a new inode, same size: what an atomic write does), resized in place, added, removed
    _write(tmp_path / "a.tmp", b"b" * 100)
    os.replace(tmp_path / "a.tmp", tmp_path / "a")
    with open(tmp_path / "w/weights", "ab") as f:
        f.write(b"x")
    _write(tmp_path / "new", b"n")
    third = digests.table()
    assert sorted(hashed[2]) == ["a", "new", "w/weights"]
    assert third == FolderDigests(str(tmp_path)).table() != first
    os.remove(tmp_path / "new")
    before = len(hashed)
    assert set(digests.table()) == {"a", "w/weights"} and hashed[before:] == [[]]


def test_check_files_names_the_first_changed_file(tmp_path):
    for rel in ("a", "b", "c"):
        _write(tmp_path / rel, rel.encode() * 10)
    table = FolderDigests(str(tmp_path)).table()
    _write(tmp_path / "c", b"z" * 10)
    _write(tmp_path / "b", b"y" * 10)
    fake = type("M", (), {"files": table, "mesh": None, "files_checked_by": manifest.Manifest.files_checked_by})()
    with pytest.raises(ArtifactError, match=r"checksum mismatch for b \("):
        manifest.check_files(str(tmp_path), fake)
