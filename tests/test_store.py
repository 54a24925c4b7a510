"""Tests of ocifs.store: lazy chunked downloads into a verified, shared, bounded cache.

Real temporary directories throughout (flock, pwrite and sparse files are the point), real
processes where processes matter, pyfakefs for the pure bookkeeping of usage and LRU order.
"""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import random
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ocifs.digest import Digest
from ocifs.errors import (
    IntegrityError,
    NetworkError,
    OcifsError,
    RangeError,
    RequestTimeout,
    StoreError,
)
from ocifs.store import BlobHandle, BlobStore

from .helpers import wait_until

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB  # small chunks keep most tests fast and multi-chunk

SPAWN = multiprocessing.get_context("spawn")  # no fork of a process with threads


# --------------------------------------------------------------------------- helpers


class PatternBlob:
    """Deterministic content of any size, generated on demand, and a fetch that records calls.

    Block k (1 MiB) is a seeded random block with k written into its first 8 bytes, so every
    block differs and a 256 MiB blob never needs to be held in memory.
    """

    BLOCK = 1 * MiB

    def __init__(self, size: int, *, seed: int = 1, piece: int = 16 * KiB) -> None:
        self.size = size
        self.piece = piece
        self._base = random.Random(seed).randbytes(self.BLOCK)
        self.calls: list[tuple[int, int]] = []
        self.threads: list[int] = []
        self._lock = threading.Lock()
        self._digest: Digest | None = None
        self.tamper: set[int] = set()  # offsets whose byte is flipped in fetched data
        self.delay = 0.0  # seconds per piece
        # Hook called with (offset, length, bytes already yielded in this call) before each
        # piece; it may sleep, block or raise.
        self.hook: Callable[[int, int, int], None] | None = None

    def _block(self, k: int) -> bytes:
        return k.to_bytes(8, "big") + self._base[8:]

    def span(self, offset: int, length: int) -> bytes:
        return b"".join(self._pieces(offset, length, self.BLOCK))

    def _pieces(self, offset: int, length: int, piece: int) -> Iterator[bytes]:
        end = min(self.size, offset + length)
        pos = offset
        while pos < end:
            k = pos // self.BLOCK
            block = self._block(k)
            block_end = min(end, (k + 1) * self.BLOCK)
            while pos < block_end:
                stop = min(block_end, pos + piece)
                yield block[pos - k * self.BLOCK: stop - k * self.BLOCK]
                pos = stop

    @property
    def data(self) -> bytes:
        return self.span(0, self.size)

    @property
    def digest(self) -> Digest:
        if self._digest is None:
            h = hashlib.sha256()
            for part in self._pieces(0, self.size, self.BLOCK):
                h.update(part)
            self._digest = Digest("sha256", h.hexdigest())
        return self._digest

    def fetch(self, offset: int, length: int) -> Iterator[bytes]:
        with self._lock:
            self.calls.append((offset, length))
            self.threads.append(threading.get_ident())  # which thread asked, call by call
        return self._serve(offset, length)

    def _serve(self, offset: int, length: int) -> Iterator[bytes]:
        sent = 0
        for part in self._pieces(offset, length, self.piece):
            if self.hook is not None:
                self.hook(offset, length, sent)
            if self.delay:
                time.sleep(self.delay)
            flips = [o for o in self.tamper if offset + sent <= o < offset + sent + len(part)]
            if flips:
                changed = bytearray(part)
                for o in flips:
                    changed[o - offset - sent] ^= 0xFF
                part = bytes(changed)
            sent += len(part)
            yield part

    @property
    def fetched(self) -> int:
        with self._lock:
            return sum(n for _, n in self.calls)

    def chunk_counts(self, chunk: int) -> dict[int, int]:
        """How many times each chunk was asked for."""
        counts: dict[int, int] = {}
        with self._lock:
            for offset, length in self.calls:
                for c in range(offset // chunk, (offset + length - 1) // chunk + 1):
                    counts[c] = counts.get(c, 0) + 1
        return counts


def read_sequentially(handle: BlobHandle, block: int = 128 * KiB) -> bytes:
    out = bytearray()
    while True:
        part = handle.read(len(out), block)
        if not part:
            return bytes(out)
        out += part


def read_sequentially_until(handle: BlobHandle, stop: int, block: int = 100 * KiB) -> bytes:
    out = bytearray()
    while len(out) < stop:
        out += handle.read(len(out), min(block, stop - len(out)))
    return bytes(out)


def hash_sequentially(handle: BlobHandle, block: int = 128 * KiB) -> tuple[str, int]:
    """sha256 and length of a sequential read, without keeping the bytes."""
    h = hashlib.sha256()
    offset = 0
    while True:
        part = handle.read(offset, block)
        if not part:
            return h.hexdigest(), offset
        h.update(part)
        offset += len(part)


def small_store(root: Path, **kw: object) -> BlobStore:
    options: dict[str, object] = dict(chunk_size=CHUNK, readahead=8 * CHUNK, max_request=4 * CHUNK)
    options.update(kw)
    return BlobStore(root, **options)  # type: ignore[arg-type]


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs").rglob("*") if p.is_file())


def partial_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "partial").rglob("*") if p.is_file())


def chunk_map(root: Path, digest: Digest) -> bytes:
    """The per-chunk bytes of a partial's map (after its 24-byte header)."""
    return (root / "partial" / digest.algorithm / f"{digest.hex}.map").read_bytes()[24:]


def store_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ocifs-store")]


# --------------------------------------------------------------------------- layout


def test_cache_directories_are_private_even_if_they_existed(root: Path, stores: list[BlobStore]) -> None:
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    (root / "blobs").mkdir(mode=0o755)
    os.chmod(root / "blobs", 0o755)
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(3 * CHUNK)
    with store.open(blob.digest, blob.size, blob.fetch) as handle:
        handle.read(CHUNK, 10)  # leaves a partial
        for path in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
        assert {p.name for p in root.iterdir()} == {"blobs", "partial", "tmp"}
        for path in partial_files(root):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        read_sequentially(handle)
    (complete,) = blob_files(root)
    assert stat.S_IMODE(complete.stat().st_mode) == 0o600


def test_no_thread_starts_before_it_is_needed(root: Path, stores: list[BlobStore]) -> None:
    before = len(store_threads())
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(20 * CHUNK)
    handle = store.open(blob.digest, blob.size, blob.fetch)
    handle.read(5 * CHUNK, 100)  # a random read fetches in the caller's thread
    assert len(store_threads()) == before
    handle.read(0, 100)  # sequential: the prefetch pool starts now
    assert len(store_threads()) > before
    handle.close()
    store.close()
    assert wait_until(lambda: len(store_threads()) == before)


# --------------------------------------------------------------------------- lazy reads


def test_small_read_of_a_large_blob_fetches_about_one_chunk(root: Path, stores: list[BlobStore]) -> None:
    store = BlobStore(root)  # the default 1 MiB chunks
    stores.append(store)
    blob = PatternBlob(64 * MiB)
    handle = store.open(blob.digest, blob.size, blob.fetch)
    assert blob.calls == []  # open does no network I/O
    offset = 20 * MiB + 12345
    assert handle.read(offset, 4096) == blob.span(offset, 4096)
    time.sleep(0.2)  # a prefetch, if one were (wrongly) started, would show up
    assert blob.calls == [(20 * MiB, 1 * MiB)]
    assert handle.read(offset + 4096, 4096) == blob.span(offset + 4096, 4096)
    assert blob.fetched == 1 * MiB  # already on disk: no second fetch
    (data_file,) = [p for p in partial_files(root) if not p.name.endswith(".map")]
    assert data_file.stat().st_size == 64 * MiB
    assert data_file.stat().st_blocks * 512 <= 2 * MiB  # sparse: only what was fetched
    assert blob_files(root) == []
    handle.close()


def test_random_reads_fetch_only_their_chunks(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(40 * CHUNK)
    with store.open(blob.digest, blob.size, blob.fetch) as handle:
        for offset, size in [(7 * CHUNK + 5, 100), (30 * CHUNK - 50, 100), (3 * CHUNK, 1)]:
            assert handle.read(offset, size) == blob.span(offset, size)
        time.sleep(0.2)
        assert blob.chunk_counts(CHUNK) == {7: 1, 29: 1, 30: 1, 3: 1}
        assert chunk_map(root, blob.digest).count(1) == 4


def test_read_past_the_end_and_empty_reads(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(2 * CHUNK + 10)
    with store.open(blob.digest, blob.size, blob.fetch) as handle:
        assert handle.read(blob.size, 100) == b""
        assert handle.read(blob.size + 5, 100) == b""
        assert handle.read(10, 0) == b""
        assert blob.calls == []
        assert handle.read(2 * CHUNK, 1000) == blob.span(2 * CHUNK, 10)
        with pytest.raises(ValueError):
            handle.read(-1, 10)


def test_empty_blob_needs_no_fetch(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    empty = Digest.of(b"")
    with store.open(empty, 0, lambda o, n: pytest.fail("fetched")) as handle:
        assert handle.read(0, 10) == b""
    assert store.has(empty)
    with pytest.raises(IntegrityError):
        store.open(Digest.of(b"x"), 0, lambda o, n: iter(()))


# --------------------------------------------------------------------------- sequential reads


def test_sequential_read_returns_the_blob_and_completes_it(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(37 * CHUNK + 1234)  # not a multiple of the chunk size
    with store.open(blob.digest, blob.size, blob.fetch) as handle:
        assert read_sequentially(handle, 100 * KiB) == blob.data
        assert store.has(blob.digest)
    assert blob_files(root) == [root / "blobs" / "sha256" / blob.digest.hex]
    assert store.complete_path(blob.digest) == root / "blobs" / "sha256" / blob.digest.hex
    assert partial_files(root) == []
    assert set(blob.chunk_counts(CHUNK).values()) == {1}  # every chunk fetched exactly once
    assert blob.fetched == blob.size
    assert all(length <= 4 * CHUNK for _, length in blob.calls)  # max_request respected
    calls = len(blob.calls)
    with store.open(blob.digest, blob.size, blob.fetch) as handle:  # from the cache now
        assert handle.read(5, 10) == blob.span(5, 10)
    assert len(blob.calls) == calls


def test_read_ahead_grows_while_reading_stays_sequential(root: Path, stores: list[BlobStore]) -> None:
    """Like the kernel's: a 4 KiB read at 0 fetches its chunk and nothing more (`head -c`
    of a big file costs one chunk); a reader that goes on makes the read-ahead grow to the
    whole window (8 chunks here), fetched by the pool on its own."""
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(64 * CHUNK)
    with store.open(blob.digest, blob.size, blob.fetch) as handle:
        assert handle.read(0, 4 * KiB) == blob.span(0, 4 * KiB)
        assert not wait_until(lambda: blob.fetched > CHUNK, 0.5)
        assert blob.chunk_counts(CHUNK) == {0: 1}
        offset = 4 * KiB
        while offset < 6 * CHUNK:  # on through chunks 1..5: the window doubles with each
            assert handle.read(offset, 16 * KiB) == blob.span(offset, 16 * KiB)
            offset += 16 * KiB
        # Without further reads, the pool keeps the whole window (8 chunks) ahead.
        assert wait_until(lambda: chunk_map(root, blob.digest).count(1) >= 6 + 8)
        counts = blob.chunk_counts(CHUNK)
        assert set(counts) <= set(range(0, 6 + 8 + 4 + 1))  # about one window, not the blob
        assert set(counts.values()) == {1}

def test_reader_is_served_as_soon_as_its_chunk_is_written(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(16 * CHUNK)
    gate = threading.Event()

    def hold_after_first_chunk(offset: int, length: int, sent: int) -> None:
        if offset > 0 and sent >= CHUNK:
            assert gate.wait(10)

    blob.hook = hold_after_first_chunk
    try:
        with store.open(blob.digest, blob.size, blob.fetch) as handle:
            handle.read(0, 4096)  # chunk 0 in this thread; chunks 1.. prefetched, held after 1
            result: list[bytes] = []
            reader = threading.Thread(target=lambda: result.append(handle.read(CHUNK + 10, 100)))
            reader.start()
            reader.join(5)
            assert not reader.is_alive(), "the read waited for more than its chunk"
            assert result == [blob.span(CHUNK + 10, 100)]
            gate.set()
            assert read_sequentially(handle) == blob.data
    finally:
        gate.set()


def test_concurrent_sequential_readers_share_one_download(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(48 * CHUNK + 7)
    blob.delay = 0.0005  # keep the readers overlapping
    barrier = threading.Barrier(6)
    results: list[bytes] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            with store.open(blob.digest, blob.size, blob.fetch) as handle:
                barrier.wait()
                results.append(read_sequentially(handle, 64 * KiB + 100))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(results) == 6 and all(r == blob.data for r in results)
    assert set(blob.chunk_counts(CHUNK).values()) == {1}
    assert blob.fetched == blob.size
    assert len(blob_files(root)) == 1 and partial_files(root) == []


def test_concurrent_random_readers_of_one_chunk_fetch_it_once(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(10 * CHUNK)
    blob.delay = 0.005
    handles = [store.open(blob.digest, blob.size, blob.fetch) for _ in range(8)]
    barrier = threading.Barrier(8)
    results: list[bytes] = []

    def reader(handle: BlobHandle, i: int) -> None:
        barrier.wait()
        results.append(handle.read(5 * CHUNK + i, 1000))

    threads = [threading.Thread(target=reader, args=(h, i)) for i, h in enumerate(handles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted(blob.span(5 * CHUNK + i, 1000) for i in range(8))
    assert blob.calls == [(5 * CHUNK, CHUNK)]
    for h in handles:
        h.close()


# --------------------------------------------------------------------------- verification


def test_tampered_blob_fails_at_eof_and_is_discarded(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(20 * CHUNK + 99)
    blob.tamper = {7 * CHUNK + 3}
    last = 20 * CHUNK
    gate = threading.Event()

    def hold_the_last_chunk(offset: int, length: int, sent: int) -> None:
        if offset + sent >= last:
            assert gate.wait(10)

    blob.hook = hold_the_last_chunk
    handle = store.open(blob.digest, blob.size, blob.fetch)
    try:
        served = read_sequentially_until(handle, last)  # unverified, like any stream
        assert len(served) == last and served != blob.span(0, last)
        outcome: list[object] = []

        def read_eof() -> None:
            try:
                outcome.append(handle.read(last, 100 * KiB))
            except BaseException as exc:
                outcome.append(exc)

        reader = threading.Thread(target=read_eof)
        reader.start()
        reader.join(0.3)
        assert reader.is_alive() and outcome == []  # the read reaching EOF waits...
        gate.set()
        reader.join(10)
        (error,) = outcome  # ...for the digest, which does not match
        assert isinstance(error, IntegrityError) and error.errno == errno.EIO
    finally:
        gate.set()
    assert blob_files(root) == [] and partial_files(root) == []
    assert not store.has(blob.digest)
    with pytest.raises(IntegrityError):  # the bad bytes are never served again
        handle.read(0, 10)
    handle.close()

    good = PatternBlob(blob.size)
    with store.open(good.digest, good.size, good.fetch) as handle:
        assert good.calls == []
        assert read_sequentially(handle) == good.data
    assert good.fetched == good.size  # started afresh
    assert store.has(good.digest)


def test_tampered_blob_never_reaches_a_clean_eof(root: Path, stores: list[BlobStore]) -> None:
    """Free-running: the mismatch shows at EOF, or earlier if the download finished first."""
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(20 * CHUNK + 99)
    blob.tamper = {blob.size - 5}
    with store.open(blob.digest, blob.size, blob.fetch) as handle, pytest.raises(IntegrityError):
        read_sequentially(handle)
    assert blob_files(root) == [] and partial_files(root) == []


def test_random_read_of_the_tail_is_served_unverified(root: Path, stores: list[BlobStore]) -> None:
    """The documented choice: random access does not wait for the whole blob."""
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(30 * CHUNK)
    blob.tamper = {blob.size - 1}
    with store.open(blob.digest, blob.size, blob.fetch) as handle:
        tail = handle.read(blob.size - 100, 100)
        assert tail[:-1] == blob.span(blob.size - 100, 99)
        assert tail[-1] != blob.span(blob.size - 1, 1)[0]  # tampered, and not verified yet
        assert blob.calls == [(29 * CHUNK, CHUNK)]


def test_two_stores_on_one_root_never_publish_bad_bytes(root: Path, stores: list[BlobStore]) -> None:
    good = PatternBlob(24 * CHUNK)
    bad = PatternBlob(24 * CHUNK)
    bad.tamper = {3 * CHUNK, 17 * CHUNK + 5}
    good.delay = bad.delay = 0.0005
    store_a, store_b = small_store(root), small_store(root)
    stores += [store_a, store_b]
    outcomes: dict[str, object] = {}

    def run(name: str, store: BlobStore, blob: PatternBlob) -> None:
        try:
            with store.open(good.digest, good.size, blob.fetch) as handle:
                outcomes[name] = read_sequentially(handle) == good.data
        except IntegrityError as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=run, args=("good", store_a, good)),
               threading.Thread(target=run, args=("bad", store_b, bad))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(outcomes) == {"good", "bad"}
    # Either reader may lose the race for a chunk to the other (and then read its bytes), but
    # a clean EOF always means the right bytes; anything else is an IntegrityError.
    for outcome in outcomes.values():
        assert outcome is True or isinstance(outcome, IntegrityError), outcome
    for path in blob_files(root):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == good.digest.hex
    third = small_store(root)
    stores.append(third)
    with third.open(good.digest, good.size, PatternBlob(good.size).fetch) as handle:
        assert read_sequentially(handle) == good.data


# --------------------------------------------------------------------------- failing fetches


def test_short_fetch_fails_the_reader_marks_nothing_and_is_retried(
        root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(10 * CHUNK)
    calls = 0

    def short_once(offset: int, length: int) -> Iterator[bytes]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return iter([blob.span(offset, length // 2)])
        return blob.fetch(offset, length)

    with store.open(blob.digest, blob.size, short_once) as handle:
        with pytest.raises(RangeError) as info:
            handle.read(4 * CHUNK + 10, 100)
        assert info.value.errno == errno.EIO
        assert chunk_map(root, blob.digest).count(1) == 0
        assert handle.read(4 * CHUNK + 10, 100) == blob.span(4 * CHUNK + 10, 100)
        assert read_sequentially(handle) == blob.data
    assert store.has(blob.digest)


def test_short_multi_chunk_fetch_keeps_the_whole_chunks(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(10 * CHUNK)

    def cut(offset: int, length: int) -> Iterator[bytes]:
        return iter([blob.span(offset, CHUNK + CHUNK // 2)])  # one and a half chunks

    with store.open(blob.digest, blob.size, cut) as handle, pytest.raises(RangeError):
        handle.read(2 * CHUNK, 2 * CHUNK)
    assert list(chunk_map(root, blob.digest)) == [0, 0, 1] + [0] * 7  # only the whole chunk


@pytest.mark.parametrize("error", [NetworkError("registry unreachable"),
                                   RequestTimeout("read timed out")])
def test_fetch_error_reaches_the_reader_with_its_errno(
        root: Path, stores: list[BlobStore], error: OcifsError) -> None:
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(10 * CHUNK)
    broken = True

    def fetch(offset: int, length: int) -> Iterator[bytes]:
        if broken:
            raise error
        return blob.fetch(offset, length)

    with store.open(blob.digest, blob.size, fetch) as handle:
        with pytest.raises(type(error)) as info:
            handle.read(3 * CHUNK, 10)
        assert info.value.errno == error.errno
        broken = False
        assert handle.read(3 * CHUNK, 10) == blob.span(3 * CHUNK, 10)


def test_prefetch_error_reaches_the_waiting_reader(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(20 * CHUNK)
    failing = True

    def fail_ahead(offset: int, length: int, sent: int) -> None:
        if failing and offset > 0:
            raise NetworkError("connection reset")

    blob.hook = fail_ahead
    with store.open(blob.digest, blob.size, blob.fetch) as handle:
        assert handle.read(0, CHUNK) == blob.span(0, CHUNK)  # chunk 0: the reader's own fetch
        with pytest.raises(NetworkError) as info:
            handle.read(CHUNK, CHUNK)  # waits for the prefetch of chunk 1, which failed
        assert info.value.errno == errno.EHOSTUNREACH
        failing = False
        assert read_sequentially(handle) == blob.data
    assert store.has(blob.digest)


def test_a_full_disk_serves_from_the_registry_and_keeps_no_corrupt_entry(
        root: Path, stores: list[BlobStore], monkeypatch: pytest.MonkeyPatch) -> None:
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(12 * CHUNK)
    real_pwrite = os.pwrite

    def full(fd: int, data: bytes, offset: int) -> int:
        if len(data) > 1:  # chunk data; the one-byte map marks would fit
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    with store.open(blob.digest, blob.size, blob.fetch) as handle:
        monkeypatch.setattr(os, "pwrite", full)
        # The cache cannot take it: served from the registry, verified, nothing half-kept.
        assert handle.read(2 * CHUNK, 10) == blob.span(2 * CHUNK, 10)
        assert read_sequentially(handle) == blob.data
        assert not (root / "partial" / "sha256" / blob.digest.hex).exists()
        assert blob_files(root) == []
        monkeypatch.undo()  # space again
    with store.open(blob.digest, blob.size, blob.fetch) as handle:
        assert read_sequentially(handle) == blob.data
    assert store.has(blob.digest)


# --------------------------------------------------------------------------- restarts, processes


def _read_some_then_die(root: str, size: int, chunks: list[int]) -> None:
    blob = PatternBlob(size)
    store = small_store(Path(root))
    handle = store.open(blob.digest, size, blob.fetch)
    for c in chunks:
        handle.read(c * CHUNK + 1, 10)  # never at offset 0: no prefetch, a known state
    os.kill(os.getpid(), signal.SIGKILL)


def test_partial_is_resumed_after_the_process_was_killed(root: Path, stores: list[BlobStore]) -> None:
    blob = PatternBlob(16 * CHUNK + 5)
    done = [0, 1, 2, 9]
    child = SPAWN.Process(target=_read_some_then_die, args=(str(root), blob.size, done))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert [i for i, b in enumerate(chunk_map(root, blob.digest)) if b == 1] == done

    store = small_store(root)  # a new process's view: nothing in memory
    stores.append(store)
    with store.open(blob.digest, blob.size, blob.fetch) as handle:
        assert read_sequentially(handle) == blob.data
    assert set(blob.chunk_counts(CHUNK)) == set(range(17)) - set(done)
    assert blob.fetched == blob.size - len(done) * CHUNK
    assert store.has(blob.digest)


def test_resumed_partial_with_wrong_bytes_is_caught_by_the_digest(
        root: Path, stores: list[BlobStore]) -> None:
    blob = PatternBlob(8 * CHUNK)
    first = small_store(root)
    stores.append(first)
    with first.open(blob.digest, blob.size, blob.fetch) as handle:
        handle.read(3 * CHUNK, 10)
    data_file = root / "partial" / "sha256" / blob.digest.hex
    with open(data_file, "r+b") as f:  # the trusted map now lies about chunk 3
        f.seek(3 * CHUNK)
        f.write(b"garbage")
    second = small_store(root)
    stores.append(second)
    with second.open(blob.digest, blob.size, blob.fetch) as handle, pytest.raises(IntegrityError):
        read_sequentially(handle)
    assert blob_files(root) == [] and partial_files(root) == []
    with second.open(blob.digest, blob.size, blob.fetch) as handle:
        assert read_sequentially(handle) == blob.data


def test_chunks_another_store_wrote_are_not_fetched_again(root: Path, stores: list[BlobStore]) -> None:
    """The map on disk is re-read before fetching a chunk missing in memory."""
    store_a, store_b = small_store(root), small_store(root)
    stores += [store_a, store_b]
    blob_a, blob_b = PatternBlob(10 * CHUNK), PatternBlob(10 * CHUNK)
    handle_a = store_a.open(blob_a.digest, blob_a.size, blob_a.fetch)  # map read now: empty
    with store_b.open(blob_b.digest, blob_b.size, blob_b.fetch) as handle_b:
        for c in (2, 3, 4):
            handle_b.read(c * CHUNK + 1, 10)
    assert handle_a.read(2 * CHUNK + 7, 2 * CHUNK) == blob_a.span(2 * CHUNK + 7, 2 * CHUNK)
    assert blob_a.calls == []
    assert handle_a.read(6 * CHUNK + 1, 10) == blob_a.span(6 * CHUNK + 1, 10)
    assert blob_a.calls == [(6 * CHUNK, CHUNK)]
    handle_a.close()


def test_a_late_writer_cannot_touch_a_published_blob(root: Path, stores: list[BlobStore]) -> None:
    """A chunk marked on disk is never written again: a slow (here, lying) fetch of another
    store that finishes after the blob was verified and published changes nothing."""
    store_a, store_b = small_store(root), small_store(root)
    stores += [store_a, store_b]
    good, late = PatternBlob(6 * CHUNK), PatternBlob(6 * CHUNK)
    late.tamper = {CHUNK + 10}
    late.piece = 4 * KiB
    gate, held = threading.Event(), threading.Event()

    def hold_before_the_last_piece(offset: int, length: int, sent: int) -> None:
        if sent == CHUNK - late.piece:
            held.set()
            assert gate.wait(10)

    late.hook = hold_before_the_last_piece
    handle_b = store_b.open(good.digest, good.size, late.fetch)
    result: list[object] = []
    slow = threading.Thread(target=lambda: result.append(handle_b.read(CHUNK, 100)))
    slow.start()
    try:
        assert held.wait(10)  # B has fetched (bad) bytes of chunk 1 and is about to write them
        with store_a.open(good.digest, good.size, good.fetch) as handle_a:
            assert read_sequentially(handle_a) == good.data
        assert store_a.has(good.digest)
    finally:
        gate.set()
    slow.join(10)
    assert result == [good.span(CHUNK, 100)]  # B got the published bytes, not its own
    (complete,) = blob_files(root)
    assert hashlib.sha256(complete.read_bytes()).hexdigest() == good.digest.hex
    handle_b.close()


def test_download_survives_another_store_evicting_its_partial(
        root: Path, stores: list[BlobStore]) -> None:
    """The partial is unlinked under a reader (another process's eviction): the reader keeps
    its private copy, finishes, and the verified blob still lands in blobs/ (by copy)."""
    reader_store, evicting = small_store(root), small_store(root, max_bytes=0)
    stores += [reader_store, evicting]
    blob = PatternBlob(12 * CHUNK + 3)
    newcomer = small_store(root)
    stores.append(newcomer)
    with reader_store.open(blob.digest, blob.size, blob.fetch) as handle:
        handle.read(5 * CHUNK, 10)
        evicting.evict()
        assert partial_files(root) == []
        # A new partial of the same blob appears at the same paths, nearly empty: it must not
        # be mistaken for ours when ours is published.
        other = newcomer.open(blob.digest, blob.size, blob.fetch)
        other.read(CHUNK, 10)
        assert read_sequentially(handle) == blob.data
    (complete,) = blob_files(root)
    assert hashlib.sha256(complete.read_bytes()).hexdigest() == blob.digest.hex
    assert list((root / "tmp").iterdir()) == []
    assert read_sequentially(other) == blob.data
    other.close()
    assert hashlib.sha256(complete.read_bytes()).hexdigest() == blob.digest.hex
    assert partial_files(root) == []


def _read_whole(root: str, size: int, barrier: object, results: object) -> None:
    blob = PatternBlob(size)
    blob.delay = 0.0003
    store = small_store(Path(root))
    try:
        with store.open(blob.digest, size, blob.fetch) as handle:
            barrier.wait()  # type: ignore[attr-defined]
            digest, length = hash_sequentially(handle, 100 * KiB)
        results.put((digest, length, blob.fetched))  # type: ignore[attr-defined]
    except BaseException as exc:
        results.put(("error", repr(exc), 0))  # type: ignore[attr-defined]
    finally:
        store.close()


def test_two_processes_share_the_cache_directory(root: Path) -> None:
    blob = PatternBlob(64 * CHUNK + 11)
    barrier = SPAWN.Barrier(2)
    results = SPAWN.Queue()
    procs = [SPAWN.Process(target=_read_whole, args=(str(root), blob.size, barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    outcome = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert [o[:2] for o in outcome] == [(blob.digest.hex, blob.size)] * 2
    assert blob_files(root) == [root / "blobs" / "sha256" / blob.digest.hex]
    assert hashlib.sha256(blob_files(root)[0].read_bytes()).hexdigest() == blob.digest.hex
    assert partial_files(root) == []
    # Each may have fetched some chunks twice, never less than... one whole copy between them.
    assert sum(o[2] for o in outcome) >= blob.size


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_child(root: str, size: int, hexdigest: str, keep: bool, results: object) -> None:
    # ru_maxrss would not do: Linux carries the parent's high-water mark across exec. So a
    # thread samples the resident set while the blob streams through.
    blob = PatternBlob(size, piece=256 * KiB)
    blob._digest = Digest("sha256", hexdigest)
    store = BlobStore(Path(root))  # defaults: 4 MiB chunks, 64 MiB readahead
    before = _rss()
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.002):
            peak = max(peak, _rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    with store.open(blob.digest, size, blob.fetch) as handle:
        if keep:  # the control: what holding the blob in memory would look like
            data = read_sequentially(handle)
            digest, length = hashlib.sha256(data).hexdigest(), len(data)
        else:
            digest, length = hash_sequentially(handle, 128 * KiB)
    seconds = time.monotonic() - started
    stop.set()
    sampler.join()
    results.put((digest, length, peak - before, store.has(blob.digest), seconds))  # type: ignore[attr-defined]
    store.close()


def _measure_rss(root: Path, size: int, *, keep: bool) -> tuple[int, float]:
    blob = PatternBlob(size, piece=256 * KiB)
    results = SPAWN.Queue()
    child = SPAWN.Process(target=_rss_child, args=(str(root), size, blob.digest.hex, keep, results))
    child.start()
    digest, length, growth, complete, seconds = results.get(timeout=120)
    child.join(30)
    assert (digest, length, complete) == (blob.digest.hex, size, True)
    return growth, seconds


def test_memory_stays_flat_for_a_256_mib_blob(tmp_path: Path) -> None:
    growth, seconds = _measure_rss(tmp_path / "a", 256 * MiB, keep=False)
    print(f"256 MiB sequential read: {seconds:.2f} s, peak RSS growth {growth / MiB:.1f} MiB")
    assert growth < 64 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB"
    # The measurement itself can fail: a reader that keeps the bytes shows them.
    control, _ = _measure_rss(tmp_path / "b", 96 * MiB, keep=True)
    assert control > 80 * MiB


# --------------------------------------------------------------------------- small blobs, adding


def test_read_all_fetches_verifies_and_caches(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(3000)
    assert store.read_all(blob.digest, blob.size, blob.fetch) == blob.data
    assert store.has(blob.digest)
    assert store.read_all(blob.digest, blob.size, blob.fetch) == blob.data
    assert len(blob.calls) == 1

    bad = PatternBlob(3000, seed=2)
    bad.tamper = {10}
    with pytest.raises(IntegrityError):
        store.read_all(bad.digest, bad.size, bad.fetch)
    assert not store.has(bad.digest)
    short = PatternBlob(3000, seed=3)
    with pytest.raises(RangeError):
        store.read_all(short.digest, short.size, lambda o, n: iter([short.span(0, 100)]))


def test_add_bytes_checks_the_digest(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    store.add_bytes(Digest.of(b"config"), b"config")
    assert store.complete_path(Digest.of(b"config")).read_bytes() == b"config"  # type: ignore[union-attr]
    with pytest.raises(IntegrityError):
        store.add_bytes(Digest.of(b"config"), b"other")
    assert not store.has(Digest.of(b"other"))


def test_add_file_moves_a_verified_file_in(root: Path, tmp_path: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    staged = tmp_path / "staged"
    payload = os.urandom(300 * KiB)
    staged.write_bytes(payload)
    wrong = Digest.of(b"something else")
    with pytest.raises(IntegrityError):
        store.add_file(wrong, staged)
    assert staged.read_bytes() == payload  # refused: left where it was
    assert not store.has(wrong)
    store.add_file(Digest.of(payload), staged)
    assert not staged.exists()
    assert store.complete_path(Digest.of(payload)).read_bytes() == payload  # type: ignore[union-attr]
    assert list((root / "tmp").iterdir()) == []


# --------------------------------------------------------------------------- eviction


def _age(path: Path, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    os.utime(path, (when, when))


def test_eviction_is_lru_and_spares_open_handles(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root, max_bytes=250_000)
    stores.append(store)
    a, b, c = (os.urandom(100_000) for _ in range(3))
    da, db, dc = Digest.of(a), Digest.of(b), Digest.of(c)
    store.add_bytes(da, a)
    store.add_bytes(db, b)
    held = store.open(da, len(a), lambda o, n: pytest.fail("fetched"))
    _age(root / "blobs/sha256" / da.hex, 400)  # the least recently used, but open
    _age(root / "blobs/sha256" / db.hex, 200)
    store.add_bytes(dc, c)  # 300 000 > 250 000
    assert (store.has(da), store.has(db), store.has(dc)) == (True, False, True)
    assert store.usage() == 200_000
    assert held.read(0, 100) == a[:100]
    held.close()
    store.max_bytes = 150_000
    store.evict()
    assert (store.has(da), store.has(dc)) == (False, True)
    store.max_bytes = 0
    store.evict()
    assert blob_files(root) == [] and store.usage() == 0


def test_completed_download_triggers_eviction(root: Path, stores: list[BlobStore]) -> None:
    blob = PatternBlob(8 * CHUNK)
    store = small_store(root, max_bytes=blob.size + 1000)
    stores.append(store)
    old = os.urandom(100_000)
    store.add_bytes(Digest.of(old), old)
    with store.open(blob.digest, blob.size, blob.fetch) as handle:
        assert read_sequentially(handle) == blob.data
        assert store.has(blob.digest)  # held: kept although alone it nearly fills the cache
    # Eviction runs in the thread that verified the blob, maybe just after the reader woke.
    assert wait_until(lambda: not store.has(Digest.of(old)))
    assert store.usage() <= store.max_bytes  # type: ignore[operator]


def test_partials_are_evicted_only_when_unused(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root, max_bytes=0)
    stores.append(store)
    used, stale = PatternBlob(8 * CHUNK, seed=1), PatternBlob(8 * CHUNK, seed=2)
    other = small_store(root)
    stores.append(other)
    with other.open(stale.digest, stale.size, stale.fetch) as h:
        h.read(CHUNK, 10)  # a partial nobody holds after this
    handle = store.open(used.digest, used.size, used.fetch)
    handle.read(2 * CHUNK, 10)
    assert store.usage() >= 2 * CHUNK
    store.evict()
    names = {p.name for p in partial_files(root)}
    assert names == {used.digest.hex, used.digest.hex + ".map"}
    assert handle.read(2 * CHUNK, 10) == used.span(2 * CHUNK, 10)
    handle.close()
    store.evict()
    assert partial_files(root) == []


def test_usage_and_lru_order_on_a_fake_filesystem(fs: object) -> None:
    """Pure bookkeeping (sizes, mtimes, order, modes) on pyfakefs."""
    store = BlobStore("/cache", max_bytes=10_000)
    blobs = [bytes([i]) * 3000 for i in range(4)]
    for i, data in enumerate(blobs[:3]):
        store.add_bytes(Digest.of(data), data)
        _age(Path("/cache/blobs/sha256") / Digest.of(data).hex, 1000 - i * 100)
    assert store.usage() == 9000
    _age(Path("/cache/blobs/sha256") / Digest.of(blobs[0]).hex, 10)  # recently used again
    store.add_bytes(Digest.of(blobs[3]), blobs[3])  # 12 000 > 10 000: the LRU one goes
    assert [store.has(Digest.of(d)) for d in blobs] == [True, False, True, True]
    assert store.usage() == 9000
    store.max_bytes = 6000
    store.evict()  # blob 2 is now the least recently used
    assert [store.has(Digest.of(d)) for d in blobs] == [True, False, False, True]
    assert stat.S_IMODE(os.stat("/cache").st_mode) == 0o700
    store.close()


# --------------------------------------------------------------------------- handles and closing


def test_closed_handle_refuses_reads(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    blob = PatternBlob(2 * CHUNK)
    handle = store.open(blob.digest, blob.size, blob.fetch)
    handle.close()
    handle.close()  # idempotent
    with pytest.raises(StoreError) as info:
        handle.read(0, 1)
    assert info.value.errno == errno.EBADF


def test_open_with_a_size_that_contradicts_the_cache(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    stores.append(store)
    store.add_bytes(Digest.of(b"abc"), b"abc")
    with pytest.raises(IntegrityError):
        store.open(Digest.of(b"abc"), 4, lambda o, n: iter(()))


def test_close_stops_workers_and_handles_still_read(root: Path, stores: list[BlobStore]) -> None:
    store = small_store(root)
    blob = PatternBlob(40 * CHUNK)
    blob.delay = 0.002
    handle = store.open(blob.digest, blob.size, blob.fetch)
    handle.read(0, 100)  # starts prefetching
    started = time.monotonic()
    store.close()
    assert time.monotonic() - started < 5
    assert store_threads() == []
    assert read_sequentially(handle) == blob.data  # fetched in this thread now
    handle.close()
    assert store.has(blob.digest)


def test_filling_a_big_cache_does_not_rescan_it_for_every_blob(root: Path, stores: list[BlobStore],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A walk adds thousands of small manifests: a scan of the whole cache per add made it
    quadratic. The store keeps a running total and scans when that total goes over its bound."""
    store = small_store(root, max_bytes=40 * KiB)
    stores.append(store)
    scans = 0
    real_scan = store._scan

    def counting_scan(**kw: bool) -> tuple[list[object], int]:
        nonlocal scans
        scans += 1
        return real_scan(**kw)  # type: ignore[return-value]

    monkeypatch.setattr(store, "_scan", counting_scan)
    blobs = [os.urandom(100) + bytes([i]) for i in range(200)]  # 20 KiB: under the bound
    for data in blobs:
        store.add_bytes(Digest.of(data), data)
    assert scans <= 2, f"{scans} scans for 200 small adds"
    more = [os.urandom(1000) + bytes([i]) for i in range(40)]  # 40 KiB more: over the bound
    for data in more:
        store.add_bytes(Digest.of(data), data)
    assert store.usage() <= 40 * KiB  # still evicted down to the bound
    assert store.has(Digest.of(more[-1]))
