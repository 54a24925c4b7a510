"""BlobStore (the cache directory) and BlobHandle (one open blob)."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..digest import ALGORITHMS, Digest, DigestVerifier, update_from_fd
from ..errors import IntegrityError, OcifsError, RangeError, StoreError
from .files import (
    PartialFiles,
    copy_fd_to,
    pread_all,
    remove_partial,
    unlink_quietly,
    write_then_rename,
)
from .layout import FILE_MODE, MAP_SUFFIX, Layout
from .partial import BufferPool, Partial

log = logging.getLogger(__name__)

Fetch = Callable[[int, int], Iterator[bytes]]
"""(offset, length) -> the bytes of that range, in pieces of any size. May raise OcifsError."""

MiB = 1024 * 1024
T = TypeVar("T")
# The read-ahead window grows up to the store's `readahead`; this only bounds the doubling.
MAX_AHEAD_CHUNKS = 1 << 16

# A read is still "sequential" if it starts at most this far past the furthest end read so far:
# the kernel sends its readahead as several concurrent requests that may arrive out of order.
SEQUENTIAL_SLACK = 1 * MiB

# The running usage total is trusted for this long, then the cache is scanned again.
RESCAN_SECONDS = 60.0

# Temporary files older than this are left over from a killed process.
_STALE_TMP_SECONDS = 24 * 3600
# Suffixes of files derived from a blob (`<hex>.tar`, `<hex>.index`), kept beside it.
DERIVED_SUFFIX = re.compile(r"^\.[a-z0-9]{1,16}$")


# `prune` leaves a partial alone whose data or map changed this recently: another process is
# probably downloading it (its chunk-write flock is held only briefly).
BUSY_GRACE = 120.0

# Chunk buffers kept for reuse when idle (more are allocated while busy, then freed).
_IDLE_BUFFERS = 4


class BlobHandle:
    """One open blob. `read` is thread-safe and blocks until the bytes are on disk."""

    def __init__(
        self,
        store: BlobStore,
        digest: Digest,
        size: int,
        *,
        fd: int | None = None,
        partial: Partial | None = None,
        fetch: Fetch | None = None,
    ) -> None:
        self.digest = digest
        self.size = size
        self._store = store
        self._fd = fd
        self._partial = partial
        self._fetch = fetch
        self._lock = threading.Lock()
        self._sequential = False
        self._end = 0  # furthest end read while sequential
        self._ahead = 0  # chunks to keep ahead: grows while the reading stays sequential
        self._closed = False
        self._direct: DirectReader | None = None  # set when the blob cannot be cached

    def read(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset` (fewer only at the end of the blob).

        On a sequential handle the read that reaches the end of the blob waits until the whole
        blob was verified (IntegrityError, errno EIO, if it does not match its digest).
        """
        counters = self._store.counters
        counters.add(reads_in_flight=1)
        try:
            data = self._read(offset, size)
        finally:
            counters.add(reads_in_flight=-1)
        counters.add(served=len(data))
        return data

    def _read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        if self._closed:
            raise StoreError(f"{self.digest}: read on a closed handle", errno=errno.EBADF)
        end = min(self.size, offset + size)
        if offset >= end:
            return b""
        if self._fd is not None:
            try:
                return pread_all(self._fd, end - offset, offset)
            except OSError as exc:
                raise StoreError.from_oserror(exc, f"cannot read blob {self.digest}") from exc
        assert self._fetch is not None
        sequential = self._track(offset, end)
        direct = self._direct
        if direct is not None:
            return direct.read(offset, end, sequential)
        partial = self._partial
        assert partial is not None
        fetch = self._fetch
        try:
            return self._store.with_room(
                self.digest, lambda: partial.read(offset, end, fetch, sequential, self._ahead))
        except StoreError as exc:
            if exc.errno not in CACHE_FULL_ERRNOS:
                raise
            # The cache cannot take this blob (full even after making room, or read-only):
            # serve it straight from the registry.
            return self._go_direct(exc).read(offset, end, sequential)

    def _go_direct(self, why: StoreError) -> DirectReader:
        with self._lock:
            direct = self._direct
            if direct is None:
                log.warning("%s cannot be cached (%s): read from the registry", self.digest, why)
                assert self._fetch is not None
                direct = self._direct = DirectReader(self.digest, self.size, self._fetch,
                                                     verify_full=self._store.verify_full)
                partial = self._partial
            else:
                partial = None
        if partial is not None:
            self._store.abandon_partial(partial)
        return direct

    def _track(self, offset: int, end: int) -> bool:
        """Is this read part of a sequential scan from offset 0? Like the kernel's, the
        read-ahead grows while it stays one: none for the first chunk (a 4 KiB read costs one
        chunk), then doubling with each chunk the reader enters."""
        with self._lock:
            was = self._sequential
            sequential = offset == 0 or (was and offset <= self._end + SEQUENTIAL_SLACK)
            previous = self._end if was else 0
            self._end = max(self._end, end) if (sequential and was) else end
            self._sequential = sequential
            if not sequential or not was:
                self._ahead = 0
            elif (self._end - 1) // self._store.chunk_size > (previous - 1) // self._store.chunk_size:
                self._ahead = min(MAX_AHEAD_CHUNKS, max(1, self._ahead * 2))
            return sequential

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._store._release_handle(self)

    def __enter__(self) -> BlobHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Counters:
    """What the store did since it was created (shown in `.ocifs/status`). Thread-safe; the
    lock guards only the additions, never I/O."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = {"fetched": 0, "served": 0, "reads_in_flight": 0}

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._values[name] += delta

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def counting(self, fetch: Fetch) -> Fetch:
        """`fetch` whose pieces are added to `fetched` as they arrive."""
        def counted(offset: int, length: int) -> Iterator[bytes]:
            iterator = fetch(offset, length)
            try:
                for piece in iterator:
                    self.add(fetched=len(piece))
                    yield piece
            finally:
                close = getattr(iterator, "close", None)
                if callable(close):
                    close()  # the caller closing us early must still free the response
        return counted


@dataclass
class PruneResult:
    """What `prune`/`clear` did: entries removed and their bytes, entries left because they
    are in use, and the usage afterwards."""

    removed: int = 0
    freed: int = 0
    busy: int = 0
    usage: int = 0


@dataclass
class _Entry:
    """One blob or partial found on disk, for usage and eviction."""

    digest: Digest
    partial: bool
    size: int
    mtime: float
    path: Path  # the blob, or the partial's data file
    derived: list[Path] = field(default_factory=list)  # files made from a complete blob


class BlobStore:
    """Content-addressed cache of blobs on local disk, filled lazily through fetch functions.

    Keyword options:
      max_bytes    bound for usage(); None = unbounded. Enforced after each completed blob and
                   by evict(): least recently opened blobs and partials no handle holds go first.
      chunk_size   unit of claims and of the chunk map (default 1 MiB); a random read fetches
                   the chunks it touches.
      workers      threads of the pool (streams, hashing), created on first use (default 32).
      readahead    how far ahead of a sequential reader to keep fetching (default 64 MiB).
      max_request  largest range asked of one request of a stream (default 64 MiB).
      verify_full  serve no byte of a blob before the whole blob is verified (--verify=full);
                   by default (eof) only a sequential reader's last read waits for it.
      background_timeout  the deadline of each read-ahead request (None: its request timeouts).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        max_bytes: int | None = None,
        chunk_size: int = 1 * MiB,
        workers: int = 32,
        readahead: int = 64 * MiB,
        max_request: int = 64 * MiB,
        verify_full: bool = False,
        background_timeout: float | None = None,
    ) -> None:
        if chunk_size <= 0 or workers <= 0 or readahead < 0 or max_request <= 0:
            raise ValueError("chunk_size, workers and max_request must be positive")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.chunk_size = chunk_size
        self._workers = workers
        self._readahead = readahead
        self._max_request = max_request
        self.verify_full = verify_full
        self.background_timeout = background_timeout
        self._layout = Layout(self.root)
        self._layout.create()
        self._buffers = BufferPool(chunk_size, keep=_IDLE_BUFFERS)
        self._lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self._usage: int | None = None  # bytes used as of the last scan, plus adds since
        self._usage_at = 0.0
        self._partials: dict[Digest, Partial] = {}
        self._complete_open: dict[Digest, int] = {}
        self.counters = Counters()
        # No threads here: the process forks after creating the store (see DESIGN.md 1).
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    # ------------------------------------------------------------------ queries

    def has(self, digest: Digest) -> bool:
        """Is the complete, verified blob on disk?"""
        return self._layout.blob(digest).is_file()

    def complete_path(self, digest: Digest) -> Path | None:
        path = self._layout.blob(digest)
        return path if path.is_file() else None

    # ------------------------------------------------------------------ derived files

    def derived_path(self, digest: Digest, suffix: str) -> Path:
        """A file made from a blob (an archive's index, its uncompressed tar), kept next to
        it as `blobs/<alg>/<hex><suffix>`: counted in usage() and evicted with the blob."""
        if not DERIVED_SUFFIX.match(suffix):
            raise ValueError(f"bad derived suffix {suffix!r}")
        self._layout.prepare(digest)
        return self._layout.blob(digest).with_name(digest.hex + suffix)

    def temporary_dir(self) -> Path:
        """Where files are written before add_derived() renames them into place."""
        self._layout.create()
        return self._layout.tmp

    def add_derived(self, digest: Digest, suffix: str, tmp: Path) -> Path:
        """Rename `tmp` (under temporary_dir()) into place as a derived file of `digest`."""
        path = self.derived_path(digest, suffix)
        try:
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
            size = path.stat().st_size
        except OSError as exc:
            raise StoreError.from_oserror(exc, f"cannot keep {path}") from exc
        self._evict_quietly({digest}, added=size)
        return path

    def touch(self, digest: Digest) -> None:
        """Mark a blob as used now (its derived files are being used): eviction is LRU."""
        _touch_quietly(self._layout.blob(digest))

    # ------------------------------------------------------------------ opening

    def open(self, digest: Digest, size: int, fetch: Fetch) -> BlobHandle:
        """A handle on the blob; no network I/O (reads fetch what they need). When the cache
        cannot take it (a full or read-only disk, even after making room), the handle reads
        from the registry directly."""
        fetch = self.counters.counting(fetch)
        try:
            return self.with_room(digest, lambda: self._open(digest, size, fetch))
        except StoreError as exc:
            if exc.errno not in CACHE_FULL_ERRNOS:
                raise
            handle = BlobHandle(self, digest, size, fetch=fetch)
            handle._go_direct(exc)
            return handle

    def with_room(self, digest: Digest, attempt: Callable[[], T]) -> T:
        """`attempt()`; when the disk is full, make room (never evicting `digest`) and attempt
        once more. A StoreError with an errno of CACHE_FULL_ERRNOS means the blob cannot be
        cached now (a read-only cache is not worth evicting from)."""
        try:
            return attempt()
        except StoreError as exc:
            if exc.errno not in CACHE_FULL_ERRNOS or exc.errno == errno.EROFS \
                    or not self.make_room(protect={digest}):
                raise
        return attempt()

    def _open(self, digest: Digest, size: int, fetch: Fetch) -> BlobHandle:
        if size < 0:
            raise ValueError("negative size")
        self._layout.prepare(digest)
        if size == 0 and not self.has(digest):
            self.add_bytes(digest, b"")  # nothing to fetch; IntegrityError if not the empty digest
        kick: Partial | None = None
        with self._lock:
            handle = self._open_complete(digest, size)
            if handle is not None:
                return handle
            partial = self._partials.get(digest)
            if partial is not None and partial.size != size:
                raise IntegrityError(
                    f"{digest}: opened with size {size} while open with size {partial.size}")
            if partial is None or partial.failed:
                files = PartialFiles.open(
                    self._layout.partial_data(digest), self._layout.partial_map(digest),
                    size, self.chunk_size, self._layout.blob(digest))
                if files is None:  # completed by another process a moment ago
                    handle = self._open_complete(digest, size)
                    if handle is None:
                        raise StoreError(f"{digest}: blob vanished while opening", errno=errno.EAGAIN)
                    return handle
                partial = Partial(
                    digest, files,
                    complete_path=self._layout.blob(digest), tmp_dir=self._layout.tmp,
                    readahead=self._readahead, max_request=self._max_request,
                    buffers=self._buffers, verify_full=self.verify_full,
                    background_timeout=self.background_timeout,
                    submit=self._submit, on_done=self._partial_done)
                self._partials[digest] = partial
                kick = partial
            else:
                try:
                    os.utime(partial.files.map_fd)  # LRU clock
                except OSError:
                    pass
            partial.users += 1
            partial.resume()
        if kick is not None:
            kick.kick()  # a resumed partial may hold every chunk: verify it (in a worker)
        return BlobHandle(self, digest, size, partial=partial, fetch=fetch)

    def _open_complete(self, digest: Digest, size: int) -> BlobHandle | None:
        """Under _lock (so eviction cannot slip in between the check and the count)."""
        try:
            fd = os.open(self._layout.blob(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError.from_oserror(exc, f"cannot open blob {digest}") from exc
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise IntegrityError(f"{digest}: the cached blob has {actual} bytes, not {size}")
            try:
                os.utime(fd)  # LRU clock, best effort (a read-only cache still serves)
            except OSError:
                pass
            try:
                # Says "in use" to `ocifs cache prune` in other processes (see _remove_entry).
                # Never waits: a pruner holds its exclusive lock only around an unlink, and a
                # blob unlinked under us still reads through this fd.
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                pass
        except OSError as exc:
            os.close(fd)
            raise StoreError.from_oserror(exc, f"cannot open blob {digest}") from exc
        except BaseException:
            os.close(fd)
            raise
        self._complete_open[digest] = self._complete_open.get(digest, 0) + 1
        return BlobHandle(self, digest, size, fd=fd)

    def abandon_partial(self, partial: Partial) -> None:
        """A handle reads its blob from the registry now (the disk is full): free the space
        the partial download holds when no other handle reads it. Its files stay open for
        reads in flight; they are closed when the last handle goes, as always."""
        with self._lock:
            if partial.users > 1:
                return
            partial.stop()
            if self._partials.get(partial.digest) is partial:
                del self._partials[partial.digest]  # the next open starts afresh
        try:
            partial.files.discard()
        except StoreError as exc:
            log.warning("%s", exc)

    def make_room(self, protect: set[Digest]) -> bool:
        """The cache's disk is full: evict least recently opened blobs and partials (none
        in use) until a few chunks fit. True when something was freed."""
        want = 4 * self.chunk_size
        freed = False
        with self._evict_lock:
            try:
                entries, _ = self._scan(clean_tmp=True)
            except OSError:
                return False
            for entry in sorted(entries, key=lambda e: e.mtime):
                if _free_space(self.root) >= want:
                    break
                if entry.digest in protect:
                    continue
                freed = self._remove_entry(entry) or freed
        return freed

    def _remove_entry(self, entry: _Entry, *, busy_grace: float = 0.0, spare_open: bool = True) -> bool:
        """Delete one blob or partial unless it is in use: open in this process, a partial
        another process is writing (its flock; with `busy_grace`, also one whose files changed
        that recently), a complete blob a live mount holds open (its shared flock, taken at
        open; `spare_open=False` removes it anyway: the mount keeps reading through its fd)."""
        with self._lock:  # against open() of the same digest
            if entry.digest in self._partials or entry.digest in self._complete_open:
                return False
            try:
                if entry.partial:
                    map_path = entry.path.with_name(entry.path.name + MAP_SUFFIX)
                    if busy_grace and _changed_within(busy_grace, entry.path, map_path):
                        return False
                    return remove_partial(entry.path, map_path)
                if spare_open:
                    removed = _unlink_unless_locked(entry.path)
                else:
                    unlink_quietly(entry.path)
                    removed = True
                if removed:  # what was made from it goes with it
                    for derived in entry.derived:
                        unlink_quietly(derived)
                return removed
            except OSError as exc:
                log.warning("cannot evict %s: %s", entry.path, exc)
                return False

    def _release_handle(self, handle: BlobHandle) -> None:
        with self._lock:
            if handle._fd is not None:
                left = self._complete_open.get(handle.digest, 1) - 1
                if left:
                    self._complete_open[handle.digest] = left
                else:
                    self._complete_open.pop(handle.digest, None)
                os.close(handle._fd)
                return
            partial = handle._partial
            if partial is None:  # opened straight from the registry
                return
            partial.users -= 1
            if partial.users == 0:
                partial.stop()
                if partial.tasks == 0:
                    self._retire(partial)

    def _retire(self, partial: Partial) -> None:
        """Under _lock: no handle and no task uses the partial any more."""
        partial.files.close()
        if self._partials.get(partial.digest) is partial:
            del self._partials[partial.digest]

    # ------------------------------------------------------------------ workers

    def _submit(self, partial: Partial, fn: Callable[[], None]) -> bool:
        """Run fn in the pool on behalf of partial. False once the store is closed."""
        with self._lock:
            if self._closed:
                return False
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="ocifs-store")
            partial.tasks += 1
            self._pool.submit(self._run_task, partial, fn)
            return True

    def _run_task(self, partial: Partial, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("%s: background task failed", partial.digest)
        finally:
            with self._lock:
                partial.tasks -= 1
                if partial.tasks == 0 and partial.users == 0:
                    self._retire(partial)

    def _partial_done(self, partial: Partial, ok: bool) -> None:
        """Called once per partial, with no lock held, after it was published or failed."""
        if not ok:
            with self._lock:  # the next open starts afresh
                if self._partials.get(partial.digest) is partial:
                    del self._partials[partial.digest]
            return
        self._evict_quietly(added=partial.size)

    # ------------------------------------------------------------------ adding

    def add_bytes(self, digest: Digest, data: bytes) -> None:
        """Store a small blob held in memory, after checking its digest."""
        digest.verify(data)
        self._layout.prepare(digest)
        dest = self._layout.blob(digest)
        try:
            if dest.is_file():
                os.utime(dest)
                return
            def fill(fd: int) -> None:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]

            write_then_rename(dest, self._layout.tmp, fill)
        except OSError as exc:
            raise StoreError.from_oserror(exc, f"cannot store blob {digest}") from exc
        self._evict_quietly(protect={digest}, added=len(data))

    def add_file(self, digest: Digest, path: Path) -> None:
        """Adopt a staged file as blob `digest`: it is moved into the store (copied, then removed,
        across filesystems) once its digest is checked. On a mismatch it stays at `path` and
        IntegrityError is raised. The caller must not write to it any more."""
        path = Path(path)
        self._layout.prepare(digest)
        dest = self._layout.blob(digest)
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self._layout.tmp, prefix=".adopt-")
            os.close(fd)
            tmp = Path(tmp_name)
            moved = True
            try:
                # Take it out of the caller's reach before hashing, so we publish what we hashed.
                os.rename(path, tmp)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    unlink_quietly(tmp)
                    raise
                moved = False
                with open(path, "rb") as src:
                    copy_fd_to(src.fileno(), os.fstat(src.fileno()).st_size, tmp, self._layout.tmp)
            try:
                _hash_file(tmp, digest)
            except IntegrityError:
                if moved:
                    os.rename(tmp, path)  # give it back untouched
                else:
                    unlink_quietly(tmp)
                raise
            os.chmod(tmp, FILE_MODE)
            os.rename(tmp, dest)
            if not moved:
                os.unlink(path)
        except OSError as exc:
            raise StoreError.from_oserror(exc, f"cannot adopt {path} as {digest}") from exc
        self._evict_quietly(protect={digest}, added=dest.stat().st_size if dest.exists() else 0)

    def read_all(self, digest: Digest, size: int, fetch: Fetch) -> bytes:
        """The whole (small) blob, verified: from the store, else fetched and then stored."""
        path = self._layout.blob(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError.from_oserror(exc, f"cannot read blob {digest}") from exc
        else:
            if len(data) != size:
                raise IntegrityError(f"{digest}: the cached blob has {len(data)} bytes, not {size}")
            _touch_quietly(path)
            return data
        verifier = DigestVerifier(digest, size)
        parts: list[bytes] = []
        pieces: Iterable[bytes] = self.counters.counting(fetch)(0, size) if size else ()
        for piece in pieces:
            verifier.update(piece)
            parts.append(bytes(piece))
        if verifier.size != size:
            raise RangeError(f"{digest}: fetch of {size} bytes ended after {verifier.size}")
        verifier.check()
        data = b"".join(parts)
        try:
            self.add_bytes(digest, data)
        except StoreError as exc:  # the bytes are good; caching them is a bonus
            log.warning("%s: not cached: %s", digest, exc)
        return data

    # ------------------------------------------------------------------ usage and eviction

    def usage(self) -> int:
        """Bytes used: complete blobs by size, partials by allocated blocks (they are sparse)."""
        try:
            entries, tmp_bytes = self._scan()
        except OSError as exc:
            raise StoreError.from_oserror(exc, f"cannot scan {self.root}") from exc
        return sum(e.size for e in entries) + tmp_bytes

    def evict(self) -> None:
        """Delete least recently opened blobs and partials, none that a handle of this process
        holds, until usage() <= max_bytes. Nothing to do without max_bytes."""
        self._evict(protect=frozenset(), added=None)

    def _evict_quietly(self, protect: set[Digest] | frozenset[Digest] = frozenset(), *, added: int) -> None:
        try:
            self._evict(protect, added)
        except OcifsError as exc:  # eviction is housekeeping: it must not fail a read or an add
            log.warning("eviction in %s failed: %s", self.root, exc)

    def _evict(self, protect: set[Digest] | frozenset[Digest], added: int | None) -> None:
        """Evict down to max_bytes. After an add of `added` bytes, the cache is scanned only
        when the running total says it is over (or the total is older than RESCAN_SECONDS:
        other processes add too): a scan per add made filling a big cache quadratic."""
        if self.max_bytes is None:
            return
        with self._evict_lock:
            now = time.monotonic()
            if added is not None and self._usage is not None and now - self._usage_at < RESCAN_SECONDS:
                self._usage += added
                if self._usage <= self.max_bytes:
                    return
            try:
                entries, tmp_bytes = self._scan(clean_tmp=True)
            except OSError as exc:
                raise StoreError.from_oserror(exc, f"cannot scan {self.root}") from exc
            self._usage_at = now
            self._usage = self._evict_entries(entries, tmp_bytes, self.max_bytes, protect).usage

    def _evict_entries(self, entries: list[_Entry], tmp_bytes: int, limit: int,
                       protect: set[Digest] | frozenset[Digest], **remove: Any) -> PruneResult:
        """Under _evict_lock: remove entries, least recently opened first, until the total is
        at most `limit`. `remove`: options of _remove_entry."""
        result = PruneResult(usage=sum(e.size for e in entries) + tmp_bytes)
        # One LRU order for both kinds: a partial nobody opened for long is worth no more
        # than a complete blob nobody opened for long.
        for entry in sorted(entries, key=lambda e: e.mtime):
            if result.usage <= limit:
                break
            if entry.digest in protect:
                continue
            if self._remove_entry(entry, **remove):
                log.debug("evicted %s%s (%d bytes)", entry.digest,
                          " (partial)" if entry.partial else "", entry.size)
                result.usage -= entry.size
                result.freed += entry.size
                result.removed += 1
            else:
                result.busy += 1
        return result

    def prune(self, max_bytes: int, *, busy_grace: float = BUSY_GRACE) -> PruneResult:
        """Evict down to `max_bytes` now (`ocifs cache prune`), sparing what any process uses:
        handles of this one, blobs a live mount holds open, partials being downloaded (see
        _remove_entry)."""
        with self._evict_lock:
            try:
                entries, tmp_bytes = self._scan(clean_tmp=True)
            except OSError as exc:
                raise StoreError.from_oserror(exc, f"cannot scan {self.root}") from exc
            result = self._evict_entries(entries, tmp_bytes, max_bytes, frozenset(), busy_grace=busy_grace)
            self._usage = None
        return result

    def clear(self) -> PruneResult:
        """Remove every blob and partial (`ocifs cache clear`). Safe beside live mounts: a blob
        they hold open stays readable through their fd, and a partial they download is
        published from theirs; only a partial whose chunk lock is held right now stays."""
        with self._evict_lock:
            try:
                entries, tmp_bytes = self._scan(clean_tmp=True)
            except OSError as exc:
                raise StoreError.from_oserror(exc, f"cannot scan {self.root}") from exc
            result = self._evict_entries(entries, tmp_bytes, 0, frozenset(), spare_open=False)
            self._usage = None
        return result

    def entries(self) -> list[_Entry]:
        """The blobs and partials on disk (for `ocifs cache info`)."""
        try:
            return self._scan()[0]
        except OSError as exc:
            raise StoreError.from_oserror(exc, f"cannot scan {self.root}") from exc

    def stats(self) -> dict[str, Any]:
        """Counters and the blobs being fetched now, with their bytes on disk (progress).
        The store's lock is held only to copy the list; each partial's only to count."""
        with self._lock:
            partials = list(self._partials.values())
            open_blobs = sum(self._complete_open.values())
        fetching = [{"digest": str(p.digest), "size": p.size, "on_disk": p.progress()}
                    for p in partials if not p.done and not p.failed]
        return {**self.counters.snapshot(), "open_blobs": open_blobs,
                "fetching": sorted(fetching, key=lambda f: f["digest"])}

    def _scan(self, *, clean_tmp: bool = False) -> tuple[list[_Entry], int]:
        entries: list[_Entry] = []
        for partial, base in ((False, self._layout.blobs), (True, self._layout.partial)):
            for algorithm in ALGORITHMS:
                folder = base / algorithm
                found: dict[str, _Entry] = {}
                try:
                    listing = list(os.scandir(folder))
                except FileNotFoundError:
                    continue
                for item in listing:
                    name = item.name
                    is_map = partial and name.endswith(MAP_SUFFIX)
                    hexpart = name[: -len(MAP_SUFFIX)] if is_map else name
                    suffix = ""
                    if not partial and "." in name:  # a derived file: `<hex><suffix>`
                        hexpart, dot, rest = name.partition(".")
                        suffix = dot + rest
                        if not DERIVED_SUFFIX.match(suffix):
                            continue
                    if not Digest.is_valid(f"{algorithm}:{hexpart}"):
                        continue
                    try:
                        st = item.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    size = st.st_blocks * 512 if partial else st.st_size
                    entry = found.get(hexpart)
                    if entry is None:
                        # mtime 0 until the blob is seen: derived files whose blob is gone go first
                        entry = found[hexpart] = _Entry(
                            Digest(algorithm, hexpart), partial, 0, 0.0 if suffix else st.st_mtime,
                            folder / hexpart)
                    entry.size += size
                    if suffix:
                        entry.derived.append(Path(item.path))
                    elif is_map or not partial:
                        entry.mtime = st.st_mtime  # a partial's clock is its map (touched on open)
                entries.extend(found.values())
        tmp_bytes = 0
        now = time.time()
        try:
            listing = list(os.scandir(self._layout.tmp))
        except FileNotFoundError:
            listing = []
        for item in listing:
            try:
                st = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if clean_tmp and now - st.st_mtime > _STALE_TMP_SECONDS:
                unlink_quietly(Path(item.path))
                continue
            tmp_bytes += st.st_blocks * 512
        return entries, tmp_bytes

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Stop the prefetch workers (at unmount). Open handles still read, fetching in the
        reading thread. Waits for running fetches to reach their next chunk boundary."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, None
            partials = list(self._partials.values())
        for partial in partials:
            partial.stop()
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> BlobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hash_file(path: Path, digest: Digest) -> None:
    verifier = DigestVerifier(digest)
    with open(path, "rb", buffering=0) as f:
        update_from_fd(verifier, f.fileno())
    verifier.check()


def _changed_within(seconds: float, *paths: Path) -> bool:
    now = time.time()
    for path in paths:
        try:
            if now - path.stat().st_mtime < seconds:
                return True
        except FileNotFoundError:
            continue
    return False


def _unlink_unless_locked(path: Path) -> bool:
    """Unlink a complete blob unless a live mount holds it open (its shared flock). Done
    under an exclusive flock, so a mount opening it meanwhile either sees it gone or has it
    unlinked under its fd (still readable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        unlink_quietly(path)
        return True
    finally:
        os.close(fd)


def _touch_quietly(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


# Disk errors of the cache after which a blob is read from the registry instead.
CACHE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
# Blobs up to this size that cannot be cached are read whole into memory and verified
# before a byte is served; bigger ones are served as they come (sequential readers still
# get their last bytes only after the digest matched).
DIRECT_WHOLE_MAX = 16 * MiB


def _free_space(path: Path) -> int:
    try:
        vfs = os.statvfs(path)
    except OSError:
        return 0
    return vfs.f_bavail * vfs.f_frsize


class DirectReader:
    """A blob the cache cannot hold (full or read-only disk), read from the registry."""

    def __init__(self, digest: Digest, size: int, fetch: Fetch, *, verify_full: bool) -> None:
        self.digest = digest
        self.size = size
        self._fetch = fetch
        self._whole_first = size <= DIRECT_WHOLE_MAX or verify_full
        self._whole: bytes | None = None
        self._verifier = DigestVerifier(digest, size)
        self._hashed = 0  # bytes hashed so far, while reads are sequential from 0
        self._lock = threading.Lock()

    def read(self, offset: int, end: int, sequential: bool) -> bytes:
        if self._whole_first:
            with self._lock:
                if self._whole is None:
                    if self.size > DIRECT_WHOLE_MAX:
                        raise StoreError(f"{self.digest}: too big to verify without the cache "
                                         "(--verify=full)", errno=errno.ENOSPC)
                    data = b"".join(self._fetch(0, self.size))
                    self.digest.verify(data)
                    if len(data) != self.size:
                        raise IntegrityError(f"{self.digest}: {len(data)} bytes, not {self.size}")
                    self._whole = data
                return self._whole[offset:end]
        data = b"".join(self._fetch(offset, end - offset))
        with self._lock:
            if offset <= self._hashed < end:
                self._verifier.update(memoryview(data)[self._hashed - offset:])
                self._hashed = end
            if end == self.size:
                if sequential:
                    # A sequential reader never gets EOF unverified: hash what out-of-order
                    # reads skipped (fetched again), then check.
                    if self._hashed < offset:
                        for piece in self._fetch(self._hashed, offset - self._hashed):
                            self._verifier.update(piece)
                        self._verifier.update(data)
                        self._hashed = self.size
                    self._verifier.check()
                else:
                    log.info("%s: served unverified (random reads, no cache)", self.digest)
        return data

