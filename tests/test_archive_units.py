"""Archive indexes without a mount (ocifs/archive.py): building, safety rules, the cache."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import struct
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from ocifs.archive import DIR, FILE, PIECE, SYMLINK, ArchiveError, ArchiveIndex, Archives, index_tar, member_parts
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


# ---- zstd layers ------------------------------------------------------------------------------


def skippable(payload: bytes, magic: int = 0x184D2A50) -> bytes:
    """A zstd skippable frame (RFC 8878 3.1.2): zstd:chunked keeps its table of contents in one."""
    return struct.pack("<II", magic, len(payload)) + payload


def zstd_streamed(data: bytes, level: int = 3, **params: int) -> bytes:
    """One frame written as a stream: no content size in its header, a checksum at its end."""
    raw = io.BytesIO()
    params = zstandard.ZstdCompressionParameters.from_level(level, write_checksum=1, **params)
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(raw, closefd=False) as writer:
        writer.write(data)
    return raw.getvalue()


def test_a_zstd_layer(tmp_path: Path) -> None:
    big = os.urandom(300_000)  # incompressible: raw blocks
    blob = zstandard.ZstdCompressor().compress(make_tar([
        ("d", None, "dir"), ("d/a.txt", b"alpha", "file"), ("d/big", big, "file"),
        ("d/zeros", b"\0" * 500_000, "file"), ("d/link", "a.txt", "symlink")]))
    archives, digest, index, _ = build(tmp_path, blob)
    assert index.children[("d",)] == ["a.txt", "big", "link", "zeros"]
    assert read_member(archives, digest, index, "d", "a.txt") == b"alpha"
    assert read_member(archives, digest, index, "d", "big") == big
    assert read_member(archives, digest, index, "d", "zeros") == b"\0" * 500_000
    assert index.entries[("d", "link")].target == "a.txt"


def test_several_zstd_frames_and_skippable_frames(tmp_path: Path) -> None:
    data = os.urandom(200_000) + b"z" * 300_000 + bytes(range(256)) * 2000
    tar = make_tar([("f", data, "file"), ("g", b"after the cut", "file")])
    cuts = [0, 1000, 1001, 400_000, len(tar)]  # a frame of one byte, frames cutting members
    frames = [zstd_streamed(tar[a:b], level=level)
              for (a, b), level in zip(itertools.pairwise(cuts), [1, 3, 19, -5], strict=True)]
    blob = (skippable(b"") + frames[0] + skippable(b"x" * 70_000, 0x184D2A5F) + frames[1] + frames[2]
            + skippable(b"table of contents") + frames[3] + skippable(b"footer"))
    archives, digest, index, _ = build(tmp_path, blob)
    assert read_member(archives, digest, index, "f") == data
    assert read_member(archives, digest, index, "g") == b"after the cut"


ZSTD_TAR = zstd_streamed(make_tar([("f", os.urandom(50_000) + b"x" * 100_000, "file"), ("g", b"g", "file")]))


@pytest.mark.parametrize("blob", [
    ZSTD_TAR[:-1],                    # the checksum cut
    ZSTD_TAR[:len(ZSTD_TAR) // 2],    # inside a block
    ZSTD_TAR[:6],                     # inside the frame header
    ZSTD_TAR + ZSTD_TAR[:4],          # a second frame that is only its magic number
    ZSTD_TAR + skippable(b"toc")[:-1],  # inside a skippable frame
    skippable(b"x" * 100)[:50],
], ids=["checksum", "block", "header", "magic", "skippable", "only-skippable"])
def test_truncated_zstd_is_an_error(tmp_path: Path, blob: bytes) -> None:
    with pytest.raises(ArchiveError, match="truncated zstd"):
        build(tmp_path, blob)
    assert not list((tmp_path / "cache" / "tmp").iterdir())


@pytest.mark.parametrize("blob", [
    b"\x28\xb5\x2f\xfd" + os.urandom(5000),  # the magic number, then garbage
    ZSTD_TAR + b"trailing garbage",
    ZSTD_TAR + b"\0" * 1024,               # zeros after the last frame: no zstd frame either
    ZSTD_TAR[:100] + bytes(b ^ 0x55 for b in ZSTD_TAR[100:200]) + ZSTD_TAR[200:],  # corrupted
    zstandard.ZstdCompressor().compress(b"not a tar" * 1000),
], ids=["garbage", "trailing", "zeros", "corrupted", "not-a-tar"])
def test_what_is_no_zstd_tar_is_an_error(tmp_path: Path, blob: bytes) -> None:
    with pytest.raises(ArchiveError):
        build(tmp_path, blob)
    assert not list((tmp_path / "cache" / "tmp").iterdir())


def test_a_zstd_window_beyond_the_decoder_limit_is_an_error(tmp_path: Path) -> None:
    # A frame may ask for a window of up to 2 GiB; above 128 MiB it is refused, not allocated.
    blob = zstd_streamed(make_tar([("f", b"x", "file")]), window_log=28)
    with pytest.raises(ArchiveError, match="too much memory"):
        build(tmp_path, blob)


class Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def test_a_big_zstd_layer_is_indexed_with_flat_memory(tmp_path: Path) -> None:
    """256 MiB of zeros (a few KiB compressed) after 24 MiB that do not compress: memory traced
    while indexing stays within a few pieces, far below the blob's or the tar's size."""
    noise, zeros = os.urandom(24 << 20), 256 << 20
    raw = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(raw, closefd=False) as writer, \
            tarfile.open(fileobj=writer, mode="w|") as tar:
        info = tarfile.TarInfo("noise")
        info.size = len(noise)
        tar.addfile(info, io.BytesIO(noise))
        info = tarfile.TarInfo("zeros")
        info.size = zeros
        tar.addfile(info, Zeros(zeros))
    blob = raw.getvalue()
    assert len(blob) > 24 << 20
    view = memoryview(blob)

    def fetch(offset: int, length: int) -> Iterator[bytes]:  # as the network hands it over
        for at in range(offset, offset + length, 256 << 10):
            yield bytes(view[at:min(at + (256 << 10), offset + length)])

    store = BlobStore(tmp_path / "cache")
    digest = Digest.of(blob)
    tracemalloc.start()
    try:
        index = Archives(store).index(digest, lambda: store.open(digest, len(blob), fetch), len(blob))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert index.entries[("zeros",)].size == zeros and index.tar_size > zeros + len(noise)
    assert peak < 8 * PIECE, f"peak {peak / PIECE:.1f} MiB"
    reader = Archives(store).open_member(digest, index.entries[("zeros",)])
    assert reader.read(zeros - 10, 100) == bytes(10)
    reader.close()
    reader = Archives(store).open_member(digest, index.entries[("noise",)])
    assert reader.read(len(noise) - 10, 100) == noise[-10:]
    reader.close()


class _Zeros(io.RawIOBase):
    def __init__(self, count: int) -> None:
        self.left = count

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


def zero_bomb(size: int, compress: str) -> bytes:
    """A tar of one file of `size` zero bytes, compressed to a few KiB."""
    raw = io.BytesIO()
    if compress == "zstd":
        with zstandard.ZstdCompressor(level=19).stream_writer(raw, closefd=False) as writer, \
                tarfile.open(fileobj=writer, mode="w|") as tar:
            info = tarfile.TarInfo("zeros")
            info.size = size
            tar.addfile(info, _Zeros(size))
    else:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as writer, \
                tarfile.open(fileobj=writer, mode="w|") as tar:
            info = tarfile.TarInfo("zeros")
            info.size = size
            tar.addfile(info, _Zeros(size))
    return raw.getvalue()


@pytest.mark.parametrize("compress", ["zstd", "gzip"])
def test_a_decompression_bomb_stops_at_the_caches_share(tmp_path: Path, compress: str) -> None:
    """A small blob that would expand far beyond the cache: refused with EFBIG once its tar
    passes half the cache's bound, nothing of it kept, the other blobs left alone, and not
    decompressed again by the next look."""
    import errno

    from ocifs.archive import ArchiveTooLarge

    blob = zero_bomb(256 << 20, compress)
    assert len(blob) < 1 << 20
    store = BlobStore(tmp_path / "cache", max_bytes=40 << 20)
    others = []
    for _ in range(3):
        data = os.urandom(4 << 20)
        digest = Digest.of(data)
        store.add_bytes(digest, data)
        others.append(digest)
    digest = Digest.of(blob)
    opened = []

    def open_blob() -> Any:
        opened.append(1)
        return store.open(digest, len(blob), fetch_of(blob))

    archives = Archives(store)
    with pytest.raises(ArchiveTooLarge) as raised:
        archives.index(digest, open_blob, len(blob))
    assert raised.value.errno == errno.EFBIG
    assert all(store.has(other) for other in others)
    assert not store.derived_path(digest, ".tar").exists()
    assert not list((tmp_path / "cache").rglob("archive-*"))
    assert store.usage() < 20 << 20
    with pytest.raises(ArchiveTooLarge):
        archives.index(digest, open_blob, len(blob))
    assert len(opened) == 1
