"""Blobs the cache cannot hold (a full or read-only disk) are read from the registry
(store/blobstore.py DirectReader): a sequential reader still never reaches EOF on bytes that
do not match the digest, whatever order its reads complete in."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from ocifs.digest import Digest
from ocifs.errors import IntegrityError, StoreError
from ocifs.store.blobstore import DIRECT_WHOLE_MAX, DirectReader

K = 128 * 1024
GOOD = bytes(range(256)) * ((DIRECT_WHOLE_MAX + 4 * K) // 256)  # above the whole-blob limit
DIGEST = Digest("sha256", hashlib.sha256(GOOD).hexdigest())


def serving(data: bytes) -> tuple[list[tuple[int, int]], object]:
    asked: list[tuple[int, int]] = []

    def fetch(offset: int, length: int | None) -> Iterator[bytes]:
        assert length is not None
        asked.append((offset, length))
        yield data[offset:offset + length]

    return asked, fetch


def read_out_of_order(reader: DirectReader) -> bytes:
    """As the kernel's read-ahead does: the second block completes before the first."""
    parts = {K: reader.read(K, 2 * K, True), 0: reader.read(0, K, True)}
    offset = 2 * K
    while offset < len(GOOD):
        end = min(offset + K, len(GOOD))
        parts[offset] = reader.read(offset, end, True)
        offset = end
    return b"".join(parts[o] for o in sorted(parts))


def test_a_sequential_reader_of_tampered_bytes_gets_eio_at_eof_even_out_of_order() -> None:
    _, fetch = serving(b"X" * len(GOOD))
    reader = DirectReader(DIGEST, len(GOOD), fetch, verify_full=False)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError):
        read_out_of_order(reader)


def test_a_sequential_reader_of_good_bytes_reads_them_out_of_order() -> None:
    asked, fetch = serving(GOOD)
    reader = DirectReader(DIGEST, len(GOOD), fetch, verify_full=False)  # type: ignore[arg-type]
    assert read_out_of_order(reader) == GOOD
    assert asked[-1][0] == K  # at EOF, what out-of-order reads skipped is fetched again and hashed


def test_small_blobs_are_verified_before_the_first_byte() -> None:
    small = GOOD[:DIRECT_WHOLE_MAX]
    _, fetch = serving(b"Y" + small[1:])
    digest = Digest("sha256", hashlib.sha256(small).hexdigest())
    reader = DirectReader(digest, len(small), fetch, verify_full=False)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError):
        reader.read(1000, 2000, False)


def test_verify_full_refuses_a_big_blob_it_cannot_verify() -> None:
    _, fetch = serving(GOOD)
    reader = DirectReader(DIGEST, len(GOOD), fetch, verify_full=True)  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        reader.read(0, K, True)
