"""Archive indexes without a mount (ocifs/archive.py): building, safety rules, the cache."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ocifs.archive import DIR, FILE, SYMLINK, ArchiveError, ArchiveIndex, Archives, index_tar, member_parts
from ocifs.digest import Digest
from ocifs.store import BlobStore

Spec = tuple[str, bytes | str | None, str]  # name, data or link target, kind


def make_tar(members: list[Spec]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "file":
                assert isinstance(data, bytes)
                info.size, info.mode = len(data), 0o640
                tar.addfile(info, io.BytesIO(data))
                continue
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o750
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, str(data)
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info)
    return raw.getvalue()


def fetch_of(data: bytes):  # type: ignore[no-untyped-def]
    def fetch(offset: int, length: int) -> Iterator[bytes]:
        yield data[offset:offset + length]
    return fetch


def build(tmp_path: Path, blob: bytes) -> tuple[Archives, Digest, ArchiveIndex, BlobStore]:
    store = BlobStore(tmp_path / "cache")
    archives = Archives(store)
    digest = Digest.of(blob)
    index = archives.index(digest, lambda: store.open(digest, len(blob), fetch_of(blob)), len(blob))
    return archives, digest, index, store


def read_member(archives: Archives, digest: Digest, index: ArchiveIndex, *path: str) -> bytes:
    reader = archives.open_member(digest, index.entries[path])
    try:
        return reader.read(0, 1 << 30)
    finally:
        reader.close()


def test_a_directory_as_oras_packs_it(tmp_path: Path) -> None:
    big = bytes(range(256)) * 10_000
    blob = gzip.compress(make_tar([("mydir", None, "dir"), ("mydir/a.txt", b"alpha", "file"),
                                   ("mydir/sub/b.bin", big, "file"), ("mydir/link", "sub/b.bin", "symlink"),
                                   ("mydir/empty", b"", "file")]))
    archives, digest, index, store = build(tmp_path, blob)
    assert index.root_for("mydir") == ("mydir",) and index.root_for("other") == ()
    assert index.children[("mydir",)] == ["a.txt", "empty", "link", "sub"]
    assert read_member(archives, digest, index, "mydir", "a.txt") == b"alpha"
    assert read_member(archives, digest, index, "mydir", "sub", "b.bin") == big
    assert read_member(archives, digest, index, "mydir", "empty") == b""
    link = index.entries[("mydir", "link")]
    assert link.kind == SYMLINK and link.target == "sub/b.bin"
    a = index.entries[("mydir", "a.txt")]
    assert (a.kind, a.mode, a.size, a.mtime) == (FILE, 0o640, 5, 1_700_000_000)
    assert index.entries[("mydir", "sub")].kind == DIR  # implied
    # kept next to the blob, and found again by a new process without the blob being read
    assert store.derived_path(digest, ".index").is_file() and store.derived_path(digest, ".tar").is_file()
    again = Archives(BlobStore(tmp_path / "cache")).index(digest, lambda: pytest.fail("rebuilt"), len(blob))  # type: ignore[arg-type, return-value]
    assert again.entries == index.entries


def test_partial_reads_and_several_gzip_members(tmp_path: Path) -> None:
    tar = make_tar([("f", b"0123456789" * 1000, "file")])
    blob = gzip.compress(tar[:3000]) + gzip.compress(tar[3000:])  # concatenated gzip members
    archives, digest, index, _ = build(tmp_path, blob)
    reader = archives.open_member(digest, index.entries[("f",)])
    assert reader.read(5, 10) == b"5678901234" and reader.read(9_995, 100) == b"56789"
    assert reader.read(10_000, 10) == b""
    reader.close()


@pytest.mark.parametrize("name", ["/etc/passwd", "../escape", "a/../../b", "a/\x1bname", "x" * 256])
def test_unsafe_names_are_not_shown(tmp_path: Path, name: str) -> None:
    blob = gzip.compress(make_tar([(name, b"evil", "file"), ("ok", b"fine", "file")]))
    _, _, index, _ = build(tmp_path, blob)
    assert set(index.entries) == {(), ("ok",)}


def test_names_are_normalised() -> None:
    assert member_parts("./a//b/") == ("a", "b")
    assert member_parts("./") == ()
    assert member_parts("a/./..") is None


def test_device_nodes_and_fifos_are_not_shown(tmp_path: Path) -> None:
    blob = gzip.compress(make_tar([("null", None, "chr"), ("pipe", None, "fifo"), ("ok", b"1", "file")]))
    _, _, index, _ = build(tmp_path, blob)
    assert set(index.entries) == {(), ("ok",)}


def test_links_never_lead_outside(tmp_path: Path) -> None:
    blob = gzip.compress(make_tar([
        ("out", "/etc", "symlink"),           # shown as stored: ocifs never resolves it
        ("out/passwd", b"through the link", "file"),  # below a symlink: not shown
        ("up", "../../..", "symlink"),
        ("data", b"shared bytes", "file"),
        ("hard", "data", "hardlink"),          # a hard link to a file shown before: its bytes
        ("hard-abs", "/etc/shadow", "hardlink"),  # hard links that lead outside or nowhere: not shown
        ("hard-up", "../x", "hardlink"),
        ("hard-missing", "nowhere", "hardlink"),
    ]))
    archives, digest, index, _ = build(tmp_path, blob)
    assert set(index.entries) == {(), ("out",), ("up",), ("data",), ("hard",)}
    assert index.entries[("out",)].target == "/etc" and index.entries[("up",)].target == "../../.."
    assert read_member(archives, digest, index, "hard") == b"shared bytes"


def test_duplicates_the_last_wins_but_never_over_a_directory(tmp_path: Path) -> None:
    blob = gzip.compress(make_tar([
        ("f", b"first", "file"), ("f", b"second", "file"),
        ("d", None, "dir"), ("d/x", b"x", "file"), ("d", b"a file over a directory", "file"),
        ("s", "f", "symlink"), ("s", b"now a file", "file"),
    ]))
    archives, digest, index, _ = build(tmp_path, blob)
    assert read_member(archives, digest, index, "f") == b"second"
    assert index.entries[("d",)].kind == DIR and read_member(archives, digest, index, "d", "x") == b"x"
    assert read_member(archives, digest, index, "s") == b"now a file"


def test_setuid_bits_are_dropped(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("suid")
        info.mode, info.size = 0o4755, 1
        tar.addfile(info, io.BytesIO(b"x"))
    _, _, index, _ = build(tmp_path, gzip.compress(raw.getvalue()))
    assert index.entries[("suid",)].mode == 0o755


@pytest.mark.parametrize("blob", [b"not gzip at all", gzip.compress(b"not a tar" * 100),
                                  gzip.compress(make_tar([("f", b"x" * 5000, "file")]))[:-20]])
def test_what_is_no_archive_is_an_error(tmp_path: Path, blob: bytes) -> None:
    with pytest.raises(ArchiveError):
        build(tmp_path, blob)
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # nothing left behind


def test_evicted_with_its_blob(tmp_path: Path) -> None:
    blob = gzip.compress(make_tar([("f", b"y" * 100_000, "file")]))
    _, digest, index, store = build(tmp_path, blob)
    store.close()  # the blob's publication may still be finishing in a worker
    store = BlobStore(tmp_path / "cache")
    assert store.has(digest)
    assert store.usage() >= len(blob) + index.tar_size
    store.prune(0)
    assert not store.has(digest)
    assert not store.derived_path(digest, ".tar").exists() and not store.derived_path(digest, ".index").exists()


def test_index_of_a_big_tar_walks_headers_only(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    path.write_bytes(make_tar([(f"d{i // 100}/f{i}", b"z" * 10, "file") for i in range(2000)]))
    index = index_tar(path)
    assert len(index.children[()]) == 20 and len(index.entries) == 2021
