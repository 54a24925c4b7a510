"""Runs (issue 12, part 3): a reader walking forward from the middle of a blob (a loader
copying a tensor out of a mapping, the kernel's read-ahead of it) gets read-ahead that grows
with the walk and never exceeds what it walked, while page faults at random offsets still
fetch only their chunk, in their own thread. Counted at the fetch function."""

from __future__ import annotations

import random
import threading
from pathlib import Path

from ocifs.store import BlobStore

from .test_store import KiB, MiB, PatternBlob

CHUNK = 1 * MiB  # BlobStore's default, as a mount uses it
READ = 128 * KiB  # what the kernel asks of FUSE per read-ahead request (read_ahead_kb 128)


def calls_in(blob: PatternBlob, start: int, end: int) -> list[tuple[int, int]]:
    with blob._lock:
        return [(o, n) for o, n in blob.calls if start <= o < end]


def test_a_reader_walking_forward_from_the_middle_gets_read_ahead(root: Path, stores: list[BlobStore]) -> None:
    """64 MiB read in 128 KiB pieces from 32 MiB on, each pair arriving swapped (the kernel's
    read-aheads run side by side): every byte right; after the walk's first chunks, the chunks
    come in background requests bigger than a chunk, so far fewer requests than chunks; and
    what was asked stays within the walk plus as much again (the read-ahead never exceeds what
    the run read)."""
    store = BlobStore(root)
    stores.append(store)
    blob = PatternBlob(192 * MiB)
    start, length = 32 * MiB, 64 * MiB
    me = threading.get_ident()
    with store.open(blob.digest, blob.size, blob.fetch) as handle:
        offsets = list(range(start, start + length, READ))
        for k in range(0, len(offsets), 2):
            for offset in reversed(offsets[k:k + 2]):
                assert handle.read(offset, READ) == blob.span(offset, READ), offset
    store.close()  # running requests end; what was asked is in blob.calls
    calls = calls_in(blob, 0, blob.size)
    asked = sum(n for _, n in calls)
    assert all(o >= start for o, _ in calls), calls  # nothing behind the walk
    assert asked <= 2 * length, f"{asked / MiB} MiB asked for a 64 MiB walk"
    assert len(calls) <= length // CHUNK // 2, f"{len(calls)} requests: {calls}"  # one a chunk without runs
    assert any(n > CHUNK for _, n in calls), calls
    assert any(t != me for t in blob.threads), "no read-ahead in the background"
    counts = blob.chunk_counts(CHUNK)
    assert max(counts.values()) == 1, {c: n for c, n in counts.items() if n > 1}


def test_page_faults_at_random_offsets_fetch_their_chunk_each(root: Path, stores: list[BlobStore]) -> None:
    """Faults at seeded offsets, each read around its page (128 KiB, sometimes as two requests
    back to back, or swapped): each fetches only the chunks its read-around covers, in the
    reading thread; none starts a read-ahead."""
    store = BlobStore(root)
    stores.append(store)
    blob = PatternBlob(256 * MiB)
    rng = random.Random(3)
    me = threading.get_ident()
    expected: set[int] = set()
    with store.open(blob.digest, blob.size, blob.fetch) as handle:
        for n in range(60):
            page = rng.randrange(READ, blob.size - READ) & ~4095
            first = page - READ // 2
            halves = [(first, READ // 2), (first + READ // 2, READ // 2)]
            reads = [(first, READ)] if n % 3 == 0 else (halves if n % 3 == 1 else halves[::-1])
            for offset, size in reads:
                assert handle.read(offset, size) == blob.span(offset, size)
            expected.update(range(first // CHUNK, (first + READ - 1) // CHUNK + 1))
    counts = blob.chunk_counts(CHUNK)
    assert set(counts) == expected
    assert max(counts.values()) == 1
    assert set(blob.threads) == {me}


def test_a_walk_to_the_end_of_the_blob_fetches_no_more_than_it_walks(root: Path, stores: list[BlobStore]) -> None:
    """A run that reaches the end of the blob is no sequential reader (it did not start at 0):
    it gets no verification wait and so no download of the whole blob."""
    store = BlobStore(root)
    stores.append(store)
    blob = PatternBlob(96 * MiB)
    with store.open(blob.digest, blob.size, blob.fetch) as handle:
        for offset in range(blob.size - 8 * MiB, blob.size, READ):
            assert handle.read(offset, READ) == blob.span(offset, READ)
    store.close()
    asked = sum(n for _, n in calls_in(blob, 0, blob.size))
    assert asked <= 8 * MiB
