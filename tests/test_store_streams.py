"""Streaming reads (issue "Close to the wire"): a reader is served as its bytes arrive, a cut
stream resumes where it was cut, parallel streams reassemble exactly, and concurrent readers in
one or two processes fetch each chunk once. Behaviour, not time."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ocifs import deadline
from ocifs.errors import NetworkError
from ocifs.store import BlobStore
from ocifs.store import partial as partial_module

from .test_store import CHUNK, KiB, MiB, PatternBlob, blob_files, hash_sequentially, small_store

SPAWN = multiprocessing.get_context("spawn")


def test_a_reader_gets_its_bytes_before_its_chunk_is_whole(root: Path, stores: list[BlobStore]) -> None:
    """Time to first byte: the first read of a cold file returns once its bytes are on disk,
    while the rest of the chunk (1 MiB by default) is still on its way."""
    store = BlobStore(root)
    stores.append(store)
    blob = PatternBlob(8 * MiB)
    gate = threading.Event()

    def hold_after_128_kib(offset: int, length: int, sent: int) -> None:
        if sent >= 128 * KiB:
            assert gate.wait(10)

    blob.hook = hold_after_128_kib
    try:
        with store.open(blob.digest, blob.size, blob.fetch) as handle:
            result: list[bytes] = []
            reader = threading.Thread(target=lambda: result.append(handle.read(0, 4096)))
            reader.start()
            reader.join(5)
            assert not reader.is_alive(), "the first read waited for more than its bytes"
            assert result == [blob.span(0, 4096)]
            gate.set()
    finally:
        gate.set()


@pytest.mark.parametrize("cut", [1, CHUNK - 1, CHUNK, 2 * CHUNK + CHUNK // 2, 9 * CHUNK + 5, 12 * CHUNK - 1])
def test_a_stream_cut_at_any_point_resumes_where_it_was_cut(root: Path, stores: list[BlobStore],
                                                             cut: int) -> None:
    """The connection drops once, `cut` bytes into the blob: the sequential read still gets
    every byte, and only the chunk the cut fell in is fetched again (what arrived whole is
    kept)."""
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(12 * CHUNK)
    blob.piece = 4 * KiB
    dropped: list[int] = []

    def drop_once(offset: int, length: int, sent: int) -> None:
        at = offset + sent
        if not dropped and at <= cut < at + blob.piece:
            dropped.append(at)
            raise NetworkError("connection reset by peer")

    blob.hook = drop_once
    delivered = 0
    lock = threading.Lock()

    def counting_fetch(offset: int, length: int) -> Iterator[bytes]:
        nonlocal delivered
        for piece in blob.fetch(offset, length):
            with lock:
                delivered += len(piece)
            yield piece

    with store.open(blob.digest, blob.size, counting_fetch) as handle:
        assert hash_sequentially(handle, 64 * KiB) == (blob.digest.hex, blob.size)
    assert dropped, "the cut never happened"
    # Every byte came once, but for the part of the cut chunk that had arrived before the cut.
    assert blob.size <= delivered <= blob.size + cut % CHUNK
    # After the cut, the blob was asked for again from the start of the chunk it fell in.
    assert any(offset == cut // CHUNK * CHUNK for offset, _ in blob.calls[1:]), blob.calls
    assert store.has(blob.digest)


def test_parallel_streams_reassemble_exactly(root: Path, stores: list[BlobStore],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """When big requests arrive slowly (here: any request counts as slow), a sequential
    reader's read-ahead is split into segments fetched side by side; the reader still gets
    the blob in order, byte for byte, and each chunk is fetched once."""
    monkeypatch.setattr(partial_module, "SLOW_PROBE", 4 * CHUNK)
    monkeypatch.setattr(partial_module, "SLOW_RATE", float("inf"))
    monkeypatch.setattr(partial_module, "PARALLEL_SEGMENT", 4 * CHUNK)
    store = small_store(root, readahead=32 * CHUNK, max_request=8 * CHUNK)
    stores.append(store)
    blob = PatternBlob(96 * CHUNK + 123)
    blob.delay = 0.0005
    in_flight = 0
    most = 0
    lock = threading.Lock()
    real_fetch = blob.fetch

    def counting_fetch(offset: int, length: int) -> Iterator[bytes]:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            yield from real_fetch(offset, length)
        finally:
            with lock:
                in_flight -= 1

    with store.open(blob.digest, blob.size, counting_fetch) as handle:
        assert hash_sequentially(handle, 64 * KiB) == (blob.digest.hex, blob.size)
    assert most > 1, "never more than one stream at a time"
    assert most <= partial_module.PARALLEL_STREAMS + 1  # the segments, and at most one reader's own
    assert set(blob.chunk_counts(CHUNK).values()) == {1}
    assert blob.fetched == blob.size
    assert blob_files(root) == [root / "blobs" / "sha256" / blob.digest.hex]


def _read_in_child(root: str, size: int, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    blob = PatternBlob(size)
    blob.delay = 0.0002  # a download that takes a while, so both processes overlap
    store = small_store(Path(root))
    try:
        with store.open(blob.digest, size, blob.fetch) as handle:
            outcome = hash_sequentially(handle, 64 * KiB)
        results.put((os.getpid(), outcome, blob.calls))
    except BaseException as exc:  # reported to the parent
        results.put((os.getpid(), repr(exc), []))
    finally:
        store.close()


def test_readers_in_two_processes_fetch_each_chunk_once(root: Path) -> None:
    """Two processes (two mounts sharing a cache directory) read one cold blob at the same
    time: each chunk is fetched by one of them (claims on the chunk map), both get every byte."""
    size = 48 * CHUNK + 77
    results = SPAWN.Queue()
    children = [SPAWN.Process(target=_read_in_child, args=(str(root), size, results)) for _ in range(2)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(30)
    expected = PatternBlob(size)
    counts: dict[int, int] = {}
    for _, outcome, calls in outcomes:
        assert outcome == (expected.digest.hex, size), outcome
        for offset, length in calls:
            for c in range(offset // CHUNK, (offset + length - 1) // CHUNK + 1):
                counts[c] = counts.get(c, 0) + 1
    assert sorted(counts) == list(range(49))
    twice = {c: n for c, n in counts.items() if n > 1}
    assert twice == {}, f"chunks fetched by both processes: {twice}"


def test_a_random_read_is_not_made_to_fetch_a_sequential_readers_read_ahead(
        root: Path, stores: list[BlobStore]) -> None:
    """A random read fetches its own chunk in its own thread, with a fixed limit: a sequential
    reader arriving there must not turn it into that reader's read-ahead (found in review: a
    100-byte read ran until the other reader stopped)."""
    store = small_store(root, readahead=8 * CHUNK, max_request=4 * CHUNK)
    stores.append(store)
    blob = PatternBlob(300 * CHUNK)
    blob.delay = 0.002
    target = 40 * CHUNK
    own: list[int] = []

    def slow_start(offset: int, length: int, sent: int) -> None:
        if offset == target and sent == 0:
            own.append(threading.get_ident())
            time.sleep(0.3)  # the random read's request is slow to start: the other catches up

    blob.hook = slow_start
    sequential = store.open(blob.digest, blob.size, blob.fetch)
    random_handle = store.open(blob.digest, blob.size, blob.fetch)
    stop = threading.Event()

    def read_on() -> None:
        offset = 0
        while not stop.is_set() and offset < blob.size:
            offset += len(sequential.read(offset, 32 * KiB))

    reader = threading.Thread(target=read_on)
    reader.start()
    try:
        while blob.fetched < 30 * CHUNK:
            time.sleep(0.01)
        me = threading.get_ident()
        assert random_handle.read(target + 10, 100) == blob.span(target + 10, 100)
        assert own == [me]
        mine = [call for call, thread in zip(blob.calls, blob.threads, strict=False) if thread == me]
        assert mine == [(target, CHUNK)], mine  # its chunk, nothing more
    finally:
        stop.set()
        reader.join(30)
        sequential.close()
        random_handle.close()


def test_slow_readers_do_not_starve_a_new_reader(root: Path, stores: list[BlobStore]) -> None:
    """As many slow sequential readers as the pool has workers: a new reader's first read is
    still served at once (no stream waits in the pool for its reader to read on)."""
    workers = 4
    store = small_store(root, workers=workers)
    stores.append(store)
    blobs = [PatternBlob(400 * CHUNK, seed=i + 1) for i in range(workers + 1)]
    stop = threading.Event()

    def slow_reader(blob: PatternBlob) -> None:
        with store.open(blob.digest, blob.size, blob.fetch) as handle:
            offset = 0
            while not stop.is_set() and offset < blob.size:
                offset += len(handle.read(offset, 16 * KiB))
                time.sleep(0.05)

    threads = [threading.Thread(target=slow_reader, args=(blob,)) for blob in blobs[:workers]]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        fresh = blobs[-1]
        with store.open(fresh.digest, fresh.size, fresh.fetch) as handle, deadline.limit(5):
            assert handle.read(0, 4096) == fresh.span(0, 4096)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
