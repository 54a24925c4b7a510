"""One blob being downloaded, shared by every handle of this process that reads it.

Per chunk, in memory: MISSING, INFLIGHT (claimed by exactly one fetch in this process, with a
`_Pending` whose event is set when the chunk is written or the fetch gave up) or PRESENT. Claiming
happens under the partial's lock after re-reading the on-disk map (another process may have written
the chunk); fetching and waiting happen with no lock held.

The digest is computed incrementally: whoever makes chunk `_hash_next` present (usually a prefetch
worker) hashes forward over the contiguous present chunks, reading them back from disk, so the hash
always describes the bytes on disk. When it passes the last chunk the partial is verified and
published (or discarded), exactly once, under `_hash_lock`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from .. import deadline
from ..digest import Digest, DigestVerifier
from ..errors import IntegrityError, NetworkError, OcifsError, RangeError, RequestTimeout, StoreError
from .files import PRESENT as DISK_PRESENT
from .files import PartialFiles

log = logging.getLogger(__name__)

Fetch = Callable[[int, int], Iterable[bytes]]

MISSING, INFLIGHT, PRESENT = 0, 1, 2

# Map bytes -> in-memory states: 1 (on disk) -> PRESENT, anything else -> MISSING.
_FROM_DISK = bytes(PRESENT if b == DISK_PRESENT else MISSING for b in range(256))


class _Cancelled(Exception):
    """Internal: a fetch stopped because nobody needs it any more (or the blob failed)."""


class _Pending:
    """A claimed chunk: readers wait on `event`; `error`/`cancelled` say why it did not arrive."""

    __slots__ = ("cancelled", "error", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None
        self.cancelled = False


class BufferPool:
    """Chunk-sized buffers, recycled: allocating and freeing megabytes per chunk in many
    threads leaves each thread's malloc arena holding some, which shows as resident memory."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self._keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def get(self) -> bytearray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return bytearray(self.size)

    def put(self, buffer: bytearray) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buffer)


class Partial:
    """Lazy, shared, verified download of one blob into a PartialFiles pair."""

    def __init__(
        self,
        digest: Digest,
        files: PartialFiles,
        *,
        complete_path: Path,
        tmp_dir: Path,
        readahead: int,
        max_request: int,
        buffers: BufferPool,
        submit: Callable[[Partial, Callable[[], None]], bool],
        on_done: Callable[[Partial, bool], None],
        verify_full: bool = False,
        background_timeout: float | None = None,
    ) -> None:
        self.digest = digest
        self._verify_full = verify_full
        self._background_timeout = background_timeout
        self.files = files
        self.size = files.size
        self.chunk_size = files.chunk_size
        self.nchunks = files.nchunks
        self._complete_path = complete_path
        self._tmp_dir = tmp_dir
        self._window = max(1, readahead // self.chunk_size)
        self._request_chunks = max(1, max_request // self.chunk_size)
        self._buffers = buffers
        self._submit_to_store = submit
        self._on_done = on_done
        # Guarded by the store's lock, not ours: they decide when the files may be closed.
        self.users = 0
        self.tasks = 0

        self._lock = threading.Lock()
        self._state = bytearray(files.initial.translate(_FROM_DISK))
        self._pending: dict[int, _Pending] = {}
        self._stopping = False
        self._error: OcifsError | None = None

        self._hash_lock = threading.Lock()
        self._hash_next = 0
        self._verifier = DigestVerifier(digest, self.size)
        self._done = threading.Event()

    # ------------------------------------------------------------------ state

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def stop(self) -> None:
        """No handle left: prefetches end at their next chunk boundary."""
        with self._lock:
            self._stopping = True

    def resume(self) -> None:
        with self._lock:
            self._stopping = False

    def _check_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _should_stop(self) -> bool:
        return self._stopping or self._error is not None

    def _chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    # ------------------------------------------------------------------ reading

    def read(self, offset: int, end: int, fetch: Fetch, sequential: bool, ahead: int | None = None) -> bytes:
        """Bytes [offset, end), fetching the chunks they need; 0 <= offset < end <= size.
        A sequential read also keeps `ahead` chunks (at most the read-ahead) in flight."""
        self._check_failed()
        first, last = offset // self.chunk_size, (end - 1) // self.chunk_size
        if sequential and ahead != 0:
            self._prefetch(last + 1, fetch, ahead)  # before our own fetch, so both run at once
        self._ensure(first, last, fetch)
        if self._verify_full or (sequential and end == self.size):
            # A sequential reader never sees EOF unverified; with verify_full no reader sees
            # any byte unverified: every chunk, then the digest.
            self._ensure(0, self.nchunks - 1, fetch)
            self._advance_hash()
            deadline.wait(self._done, f"blob {self.digest}: verification")
        self._check_failed()
        data = self.files.pread(offset, end - offset)
        self._check_failed()  # declared bad while we read: do not hand those bytes out
        return data

    def kick(self) -> None:
        """Start hashing if the next chunk to hash is present (e.g. a resumed, full partial)."""
        with self._lock:
            i = self._hash_next
            ready = (not self._done.is_set() and i < self.nchunks
                     and self._state[i] == PRESENT)
        if ready and not self._submit_to_store(self, self._advance_hash):
            self._advance_hash()

    def _ensure(self, first: int, last: int, fetch: Fetch) -> None:
        """Return once chunks first..last are on disk; fetch the missing ones in this thread.
        A connection dropped in the middle of this thread's own fetch is tried once more (what
        arrived whole is kept); a timeout is not (the deadline is spent)."""
        retried = False
        while True:
            runs = self._claim(first, last)
            done = 0
            try:
                for a, b in runs:
                    self._fetch_run(a, b, fetch, background=False)
                    done += 1
            except _Cancelled:
                continue  # the blob failed meanwhile: _claim raises its error
            except NetworkError as exc:
                if retried or isinstance(exc, RequestTimeout):
                    raise
                log.info("%s: %s; fetching again", self.digest, exc)
                retried = True
                continue
            finally:
                for a, b in runs[done + 1:]:
                    self._release(a, b, None)
                if done:
                    self.kick()  # hash in a worker, not in this reader's latency
            if self._wait(first, last):
                return

    def _claim(self, first: int, last: int) -> list[tuple[int, int]]:
        with self._lock:
            self._check_failed()
            if self._state.find(MISSING, first, last + 1) < 0:
                return []
            newly = self._refresh(first, last)
            runs = self._claim_locked(first, last + 1, last + 1)
        if newly:
            self.kick()
        return runs

    def _prefetch(self, start: int, fetch: Fetch, ahead: int | None = None) -> None:
        """Keep `ahead` chunks (at most about `readahead` bytes) ahead of a sequential reader
        in flight or on disk. At the full window, requests of up to `max_request` (so a request
        usually starts well before it is needed); while the window still grows, no further."""
        if start >= self.nchunks:
            return
        window = self._window if ahead is None else min(ahead, self._window)
        limit = min(self.nchunks, start + window)
        with self._lock:
            if self._should_stop() or self._state.find(MISSING, start, limit) < 0:
                return
            newly = self._refresh(start, min(self.nchunks, limit + self._request_chunks) - 1)
            runs = self._claim_locked(start, limit, self.nchunks if window >= self._window else limit)
        if newly:
            self.kick()
        for a, b in runs:
            task = functools.partial(self._prefetch_task, a, b, fetch)
            if not self._submit_to_store(self, task):
                self._release(a, b, None)  # store closed: readers fetch for themselves

    def _prefetch_task(self, a: int, b: int, fetch: Fetch) -> None:
        try:
            # A read-ahead has a deadline too: one that trickles must not hold its chunks (and
            # the readers waiting on them) for ever; what it did not get is fetched again.
            with deadline.limit(self._background_timeout):
                self._fetch_run(a, b, fetch, background=True)
        except _Cancelled:
            pass
        except Exception as exc:  # noqa: BLE001 - delivered to the waiting readers already
            log.info("%s: prefetch of chunks %d-%d failed: %s", self.digest, a, b, exc)

    def _refresh(self, first: int, last: int) -> bool:
        """Under _lock: take chunks other processes wrote since we looked. True if any."""
        if self._state.find(MISSING, first, last + 1) < 0:
            return False
        disk = self.files.read_map(first, last).translate(_FROM_DISK)
        newly = False
        i = self._state.find(MISSING, first, last + 1)
        while i >= 0:
            if disk[i - first] == PRESENT:
                self._state[i] = PRESENT
                newly = True
            i = self._state.find(MISSING, i + 1, last + 1)
        return newly

    def _claim_locked(self, start: int, find_stop: int, extend_to: int) -> list[tuple[int, int]]:
        """Under _lock: claim runs of missing chunks that start in [start, find_stop), each
        extended while missing up to `max_request` and `extend_to`."""
        runs: list[tuple[int, int]] = []
        pos = start
        while pos < find_stop:
            a = self._state.find(MISSING, pos, find_stop)
            if a < 0:
                break
            cap = min(extend_to, a + self._request_chunks)
            ends = [x for x in (self._state.find(INFLIGHT, a, cap),
                                self._state.find(PRESENT, a, cap)) if x >= 0]
            b = min(ends) if ends else cap
            for i in range(a, b):
                self._state[i] = INFLIGHT
                self._pending[i] = _Pending()
            runs.append((a, b - 1))
            pos = b
        return runs

    def _wait(self, first: int, last: int) -> bool:
        """Wait for chunks first..last. True when all are present; False when one was let go
        (cancelled, or missing again) and the caller should claim again."""
        with self._lock:
            if (self._state.find(MISSING, first, last + 1) < 0
                    and self._state.find(INFLIGHT, first, last + 1) < 0):
                return True
        for i in range(first, last + 1):
            with self._lock:
                state = self._state[i]
                pending = self._pending.get(i)
            if state == PRESENT:
                continue
            if pending is None:
                return False
            deadline.wait(pending.event, f"blob {self.digest}: chunk {i}")  # no lock held
            if pending.error is not None:
                if isinstance(pending.error, IntegrityError) or self._error is not None:
                    raise pending.error
                # Another fetch of this chunk failed (a read-ahead whose connection dropped):
                # this reader claims the chunk again and fetches it itself.
                return False
            if pending.cancelled:
                return False
        return True

    # ------------------------------------------------------------------ fetching

    def _fetch_run(self, a: int, b: int, fetch: Fetch, *, background: bool) -> None:
        """Fetch claimed chunks a..b in one request, writing each as soon as it is whole.

        One chunk is buffered at a time (bounded memory); a chunk is written only when all its
        bytes arrived, so a short or failed fetch leaves nothing half-marked. On any error the
        chunks not yet written are released with it (their waiters get it; later reads retry).
        A background (prefetch) run also stops when no handle needs it any more; a reader's own
        run only when the blob failed.
        """
        def give_up() -> bool:
            return self._should_stop() if background else self._error is not None

        index = a
        try:
            if give_up():
                raise _Cancelled
            offset = a * self.chunk_size
            length = min(self.size, (b + 1) * self.chunk_size) - offset
            iterator = iter(fetch(offset, length))
            buffer = self._buffers.get()
            try:
                view = memoryview(buffer)
                rest = memoryview(b"")
                got = 0
                while index <= b:
                    chunk = view[:self._chunk_len(index)]
                    filled = 0
                    while filled < len(chunk):
                        if not rest:
                            piece = next(iterator, None)
                            if piece is None:
                                raise RangeError(
                                    f"{self.digest}: fetch of {length} bytes at {offset} "
                                    f"ended after {got}")
                            rest = memoryview(piece).cast("B")
                            got += len(rest)
                            continue
                        take = min(len(rest), len(chunk) - filled)
                        chunk[filled:filled + take] = rest[:take]
                        filled += take
                        rest = rest[take:]
                    self._store(index, chunk)
                    index += 1
                    if background:
                        self._advance_hash()  # keep the digest in step with the download
                    if index <= b and give_up():
                        raise _Cancelled
                if rest:
                    log.debug("%s: fetch returned more than the %d bytes asked", self.digest, length)
            finally:
                self._buffers.put(buffer)
                close = getattr(iterator, "close", None)
                if callable(close):
                    close()  # let an HTTP response go back to its pool early
        except _Cancelled:
            self._release(index, b, None)
            raise
        except BaseException as exc:
            self._release(index, b, exc)
            raise

    def _store(self, index: int, chunk: memoryview) -> None:
        if not self.files.store_chunk(index, chunk):
            log.debug("%s: chunk %d was written by another process", self.digest, index)
        with self._lock:
            self._state[index] = PRESENT
            pending = self._pending.pop(index, None)
        if pending is not None:
            pending.event.set()

    def _release(self, a: int, b: int, error: BaseException | None) -> None:
        """Give back claimed chunks a..b that were not written; wake their waiters."""
        woken: list[_Pending] = []
        with self._lock:
            for i in range(a, b + 1):
                if self._state[i] == INFLIGHT:
                    self._state[i] = MISSING
                    pending = self._pending.pop(i, None)
                    if pending is not None:
                        pending.error = error
                        pending.cancelled = error is None
                        woken.append(pending)
        for pending in woken:
            pending.event.set()

    # ------------------------------------------------------------------ verifying

    def _advance_hash(self) -> None:
        """Hash forward over present chunks; finish the blob after the last one.

        Non-blocking: if another thread is hashing, it will also hash our chunk (it re-checks
        after letting go of the lock, so no chunk is left behind).
        """
        while True:
            if not self._hash_lock.acquire(blocking=False):
                return
            try:
                outcome = self._hash_locked()
            finally:
                self._hash_lock.release()
            if outcome is not None:
                self._on_done(self, outcome)
                return
            with self._lock:
                i = self._hash_next
                if (self._done.is_set() or self._error is not None or i >= self.nchunks
                        or self._state[i] != PRESENT):
                    return

    def _hash_locked(self) -> bool | None:
        """Under _hash_lock. True: verified and published; False: failed; None: not yet."""
        if self._done.is_set():
            return None
        buffer: bytearray | None = None
        try:
            view: memoryview | None = None
            while True:
                with self._lock:
                    i = self._hash_next
                    if (i >= self.nchunks or self._state[i] != PRESENT
                            or self._error is not None):
                        break
                if view is None:
                    buffer = self._buffers.get()
                    view = memoryview(buffer)
                part = view[:self._chunk_len(i)]
                self.files.read_into(i * self.chunk_size, part)  # what is on disk is what counts
                self._verifier.update(part)  # big buffers: hashlib releases the GIL
                with self._lock:
                    self._hash_next = i + 1
            if self._hash_next < self.nchunks or self._error is not None:
                return None
            return self._finalize()
        except OcifsError as exc:
            self._fail(exc)
            return False
        finally:
            if buffer is not None:
                self._buffers.put(buffer)

    def _finalize(self) -> bool:
        try:
            self._verifier.check()
        except IntegrityError as exc:
            try:
                self.files.discard()
            except StoreError as discard_error:
                log.warning("%s: %s", self.digest, discard_error)
            self._fail(IntegrityError(f"{exc}; the partial download was discarded"))
            return False
        try:
            self.files.publish(self._complete_path, self._tmp_dir)
        except StoreError as exc:
            self._fail(exc)
            return False
        self._done.set()
        return True

    def _fail(self, error: OcifsError) -> None:
        log.warning("%s: %s", self.digest, error)
        with self._lock:
            if self._error is None:
                self._error = error
        self._done.set()
