"""Runs (issue 12, part 3): a reader walking forward from the middle of a blob (a loader
copying a tensor out of a mapping, the kernel's read-ahead of it) gets read-ahead that grows
with the walk and never exceeds what it walked, while page faults at random offsets still
fetch only their chunk, in their own thread. Counted at the fetch function."""

from __future__ import annotations

import random
import threading
from pathlib import Path

from ocifs import deadline
from ocifs.errors import RequestTimeout
from ocifs.store import BlobStore

from .helpers import wait_until
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


def test_a_run_reads_its_bytes_in_its_own_thread_while_the_pool_is_busy(root: Path, stores: list[BlobStore]) -> None:
    """The pool's one worker is held by another blob's read-ahead that stalls. A run walking 16
    MiB queues its read-ahead segments there, and they never start: its reads must not wait for
    them (each has a 2 s deadline) but fetch their own bytes in the reading thread; so must a
    page fault into the middle of such a segment."""
    store = BlobStore(root, workers=1)
    stores.append(store)
    held, release = threading.Event(), threading.Event()
    other = PatternBlob(64 * MiB, seed=2)

    def stall(offset: int, length: int, sent: int) -> None:
        if offset > 0:  # its read-ahead, in the pool
            held.set()
            release.wait(30)

    other.hook = stall
    errors: list[BaseException] = []

    def sequential() -> None:
        try:
            with store.open(other.digest, other.size, other.fetch) as h:
                for offset in (0, CHUNK):  # entering chunk 1 sends its stream to the pool
                    assert h.read(offset, READ) == other.span(offset, READ)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=sequential)
    thread.start()
    try:
        assert held.wait(10), "the other blob's read-ahead never reached the pool"
        blob = PatternBlob(128 * MiB)
        me = threading.get_ident()
        with store.open(blob.digest, blob.size, blob.fetch) as handle:
            for offset in range(32 * MiB, 48 * MiB, READ):
                with deadline.limit(2):
                    assert handle.read(offset, READ) == blob.span(offset, READ), offset
            # A page fault in the middle of a segment that still waits: no wait either.
            partial = handle._partial
            assert partial is not None
            with partial._lock:
                queued = [s for s in partial._streams if s.pooled and s.limit - s.pos > 2 * CHUNK]
            assert queued, "no read-ahead waits in the pool"
            fault = queued[0].pos + CHUNK + 100 * KiB
            with store.open(blob.digest, blob.size, blob.fetch) as faulting, deadline.limit(2):
                assert faulting.read(fault, 4 * KiB) == blob.span(fault, 4 * KiB)
        assert set(blob.threads) == {me}  # the worker was held all along
    finally:
        release.set()
        thread.join(30)
    assert not errors, errors


def test_a_run_read_gets_no_error_of_its_read_ahead(root: Path, stores: list[BlobStore]) -> None:
    """Read-ahead segments fail at once (their background deadline). A run's read waits for its
    chunk, which a page fault in another thread fetches; meanwhile the read's own read-ahead
    fails, then the page fault's fetch times out. The run's read must fetch the chunk itself,
    not report the read-ahead's timeout."""
    store = BlobStore(root)
    stores.append(store)
    blob = PatternBlob(128 * MiB)
    faults: list[threading.Thread] = []  # the page fault's thread
    in_fault, fail_fault = threading.Event(), threading.Event()
    pool_failures = [0]

    def hook(offset: int, length: int, sent: int) -> None:
        thread = threading.current_thread()
        if thread.name.startswith("ocifs-store"):
            with blob._lock:
                pool_failures[0] += 1
            raise RequestTimeout("read-ahead: timed out (the background deadline)")
        if thread in faults and not in_fault.is_set():
            in_fault.set()
            fail_fault.wait(10)
            raise RequestTimeout("page fault: timed out")  # not retried: the chunk is given back

    blob.hook = hook
    walk = 35 * MiB
    fault_offset = walk + CHUNK // 2  # in the chunk the run reads next, too far on to join it
    with store.open(blob.digest, blob.size, blob.fetch) as handle:
        for offset in range(32 * MiB, walk, READ):
            assert handle.read(offset, READ) == blob.span(offset, READ), offset
        partial = handle._partial
        assert partial is not None
        assert wait_until(lambda: not partial._streams)  # the walk's read-ahead failed
        assert partial._state[walk // CHUNK] == 0  # MISSING: the run's next chunk
        got: list[object] = []

        def page_fault() -> None:
            with store.open(blob.digest, blob.size, blob.fetch) as h:
                try:
                    got.append(h.read(fault_offset, 4 * KiB))
                except BaseException as exc:
                    got.append(exc)

        fault_thread = threading.Thread(target=page_fault)
        faults.append(fault_thread)
        fault_thread.start()
        assert in_fault.wait(10)
        failures = pool_failures[0]

        def break_the_fault() -> None:
            # Once the run's read queued its read-ahead and that failed and ended, the fault's
            # fetch breaks off and gives its chunk back.
            wait_until(lambda: pool_failures[0] > failures and len(partial._streams) == 1)
            fail_fault.set()

        breaker = threading.Thread(target=break_the_fault)
        breaker.start()
        try:
            with deadline.limit(10):
                assert handle.read(walk, READ) == blob.span(walk, READ)
        finally:
            fail_fault.set()
            breaker.join(10)
            fault_thread.join(10)
        # The fault gets its own fetch's error, or its bytes when the run's read fetched the
        # chunk before the fault's reader looked again: never the run's read-ahead's error.
        assert len(got) == 1, got
        assert isinstance(got[0], RequestTimeout) or got[0] == blob.span(fault_offset, 4 * KiB), got
