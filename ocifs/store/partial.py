"""One blob being downloaded, shared by every handle of this process that reads it.

Streams. Bytes arrive through streams: a stream writes the blob forward from a chunk boundary,
as a sequence of range requests, each piece written to the data file as soon as it arrives (a
reader waiting for the first bytes of a chunk gets them before the chunk is whole). A stream
follows its readers: they move its `limit` forward as they read on, its requests grow (one
chunk, then doubling up to `max_request`) while its limit is ahead, and it ends at its limit
(the next stream there goes on with its request size), at a chunk someone else fetches, or when
nobody needs it any more: no stream waits in the pool. A sequential reader is served by one
stream at a time; a random read fetches its own chunks in its own thread, with a fixed limit.
A stream handed to the pool may wait there for a worker; until it starts, a reader fetching in
its own thread takes the chunks it needs from it (the stream then starts after them, or ends
before them), so a busy pool never delays such a reader.

Runs. Random reads that walk forward, each starting near where an earlier one ended (the
kernel's read-arounds as a loader copies a tensor out of a mapping, a reader that seeked), form
a run. Once a run has read two chunks it gets read-ahead: fixed segments in the pool, each half
its window, the window being what the run has read so far (rounded down to a power of two, at
most the read-ahead). A run therefore never has more fetched ahead of it than it has read, and
a single page fault (one read-around, under two chunks) never starts one. A run is no
sequential reader: reaching the end of the blob does not make it wait for the whole blob.

Per chunk, in memory: MISSING, INFLIGHT (claimed by exactly one stream of this process, which
holds the chunk's claim against other processes too, see files.py) or PRESENT. Claims and
plans happen under the partial's lock; fetching, writing and hashing happen with no lock held.
Readers wait on one condition, notified at every piece.

The digest is computed by one hash task at a time, trailing the streams: it hashes forward over
the contiguous present chunks from disk (so the hash describes the bytes on disk), in a thread
of its own, so hashing and receiving run side by side. When it passes the last chunk the blob is
verified and published (or discarded), exactly once.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
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

# A reader waiting for a chunk another process fetches looks at the map this often, and after
# FOREIGN_PATIENCE fetches it itself.
FOREIGN_POLL = 0.02
FOREIGN_PATIENCE = 2.0
# A request of at least SLOW_PROBE bytes that arrives below SLOW_RATE bytes/s says that one
# connection is capped (a CDN's per-connection limit, a long round trip): read-aheads are
# then split into up to PARALLEL_STREAMS segments of at least PARALLEL_SEGMENT, side by side.
SLOW_PROBE = 4 * 1024 * 1024
SLOW_RATE = 128 * 1024 * 1024
PARALLEL_STREAMS = 4
PARALLEL_SEGMENT = 4 * 1024 * 1024
# A random read continues a run if it starts within RUN_SLACK (at most a quarter chunk) of
# where the run ended, either side: the kernel sends a walk's read-arounds, 128 KiB each by
# default, a few at a time, and they may arrive out of order. Runs idle for RUN_IDLE seconds are forgotten; a blob keeps
# the MAX_RUNS most recent ones (several readers, or threads of one loader, walk side by side).
RUN_SLACK = 256 * 1024
RUN_IDLE = 2.0
MAX_RUNS = 8


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


class _Stream:
    """Writes the blob forward from `pos`, one request at a time. Guarded by the partial's lock."""

    __slots__ = ("block", "claimed", "done", "error", "follows", "limit", "pooled", "pos", "wanted", "whole")

    def __init__(self, pos: int, limit: int, block: int) -> None:
        self.pos = pos  # next byte to write: bytes from its chunk's start up to here are on disk
        self.limit = limit  # may fetch up to here (a chunk boundary or the blob's end)
        self.block = block  # size of its next request (chunks, doubling up to max_request)
        self.claimed = pos  # end of the chunks it holds claimed (its request in progress)
        self.wanted = pos  # a reader waits for the bytes up to here
        self.done = False
        self.error: BaseException | None = None
        self.whole = False  # one chunk, fetched whole and written only if still unmarked
        self.follows = True  # readers move its limit; False: a fixed segment (parallel streams)
        self.pooled = False  # handed to the pool, not yet started there: a reader may take its bytes


class _Run:
    """Random reads walking forward: from `start`, read up to `end`, last read at `seen`."""

    __slots__ = ("end", "seen", "start")

    def __init__(self, start: int, end: int, seen: float) -> None:
        self.start = start
        self.end = end
        self.seen = seen


class _Cancelled(Exception):
    """Internal: a stream stopped because nobody needs it any more (or the blob failed)."""


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
        self._readahead = max(self.chunk_size, readahead)
        self._max_request = max(self.chunk_size, max_request - max_request % self.chunk_size)
        self._buffers = buffers
        self._submit_to_store = submit
        self._on_done = on_done
        # Guarded by the store's lock, not ours: they decide when the files may be closed.
        self.users = 0
        self.tasks = 0

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state = bytearray(files.initial.translate(_FROM_DISK))
        self._owner: dict[int, _Stream] = {}  # INFLIGHT chunk -> its stream
        self._streams: list[_Stream] = []  # live streams
        self._slow = False  # the last big request ran below SLOW_RATE
        self._carry_at, self._carry_block = -1, 0  # where a stream ended at its limit, its block
        self._foreign_since: dict[int, float] = {}  # chunk -> when we found another process on it
        self._runs: list[_Run] = []  # random readers walking forward, most recent first
        self._run_slack = min(RUN_SLACK, self.chunk_size // 4)
        self._stopping = False
        self._error: OcifsError | None = None

        self._hash_next = 0  # chunks before it are hashed
        self._hashing = False  # a hash task is scheduled or running
        self._verifier = DigestVerifier(digest, self.size)
        self._done = threading.Event()

    # ------------------------------------------------------------------ state

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def progress(self) -> int:
        """Bytes on disk so far: present chunks, and what streams wrote into their chunks."""
        with self._lock:
            done = self._state.count(PRESENT) * self.chunk_size
            if self.nchunks and self._state[-1] == PRESENT:
                done -= self.nchunks * self.chunk_size - self.size  # the last chunk is short
            for index, stream in self._owner.items():
                done += max(0, min(stream.pos, self._chunk_end(index)) - index * self.chunk_size)
        return done

    def stop(self) -> None:
        """No handle left: streams end at their next chunk boundary."""
        with self._lock:
            self._stopping = True
            self._changed.notify_all()

    def resume(self) -> None:
        with self._lock:
            self._stopping = False

    def _check_failed(self) -> None:
        if self._error is not None:
            raise self._error.with_traceback(None)  # raised again and again: keep no frames

    def _chunk_end(self, index: int) -> int:
        return min(self.size, (index + 1) * self.chunk_size)

    def _boundary(self, offset: int) -> int:
        """`offset` rounded up to a chunk boundary (or the blob's end)."""
        return min(self.size, -(-offset // self.chunk_size) * self.chunk_size)

    # ------------------------------------------------------------------ reading

    def read(self, offset: int, end: int, fetch: Fetch, sequential: bool, ahead: int | None = None) -> bytes:
        """Bytes [offset, end), fetching what they need; 0 <= offset < end <= size. A sequential
        read also keeps `ahead` chunks (at most the read-ahead) coming after `end`."""
        self._check_failed()
        window = segment = 0
        if sequential:
            chunks = self._readahead // self.chunk_size if ahead is None else ahead
            window = min(self._readahead, chunks * self.chunk_size)
        else:
            with self._lock:
                window = self._run_window(offset, end)
            segment = max(self.chunk_size, window // 2 - window // 2 % self.chunk_size) if window else 0
        # A random read fetches in this thread; a run's read-ahead goes to the pool.
        self._need(offset, end, min(self.size, end + window), fetch, inline=not sequential and not window,
                   segment=segment)
        if self._verify_full or (sequential and end == self.size):
            # A sequential reader never sees EOF unverified; with verify_full no reader sees
            # any byte unverified: every chunk, then the digest.
            self._need(0, self.size, self.size, fetch, inline=False)
            self._schedule_hash()
            deadline.wait(self._done, f"blob {self.digest}: verification")
        self._check_failed()
        data = self.files.pread(offset, end - offset)
        self._check_failed()  # declared bad while we read: do not hand those bytes out
        return data

    def _run_window(self, offset: int, end: int) -> int:
        """Under _lock: the read-ahead (bytes) of a random read [offset, end): none unless it
        continues a run that has read at least two chunks; else what the run has read, rounded
        down to a power of two chunks, at most the read-ahead."""
        now = time.monotonic()
        self._runs = [run for run in self._runs if now - run.seen <= RUN_IDLE]
        for run in self._runs:
            if run.end - self._run_slack <= offset <= run.end + self._run_slack and offset >= run.start:
                run.end = max(run.end, end)
                run.seen = now
                self._runs.remove(run)
                self._runs.insert(0, run)
                chunks = (run.end - run.start) // self.chunk_size
                if chunks < 2:
                    return 0
                return min(self._readahead, (1 << (chunks.bit_length() - 1)) * self.chunk_size)
        self._runs.insert(0, _Run(offset, end, now))
        del self._runs[MAX_RUNS:]
        return 0

    def kick(self) -> None:
        """Start hashing if the next chunk to hash is present (e.g. a resumed, full partial)."""
        self._schedule_hash()

    def _need(self, offset: int, end: int, want: int, fetch: Fetch, *, inline: bool, segment: int = 0) -> None:
        """Return once bytes [offset, end) are on disk, with streams started or moved on so
        that [end, want) keeps coming too. A stream this read started for bytes [offset, end)
        that loses its connection is started again once (what arrived is kept); any other
        stream's failure (its read-ahead's too) makes this read start its own. `inline`: run
        the streams this read starts in this thread (a random read: no hand-over to the pool,
        which then never starts for it). `segment`: a run's read: its own bytes are fetched in
        this thread, [end, want) in the pool, in fixed segments of this size. Either takes its
        bytes back from streams still waiting in the pool."""
        started: list[_Stream] = []  # the streams this call started for [offset, end)
        retried = False
        while True:
            self._schedule_hash()  # chunks found written by another process may be next
            with self._lock:
                self._check_failed()
                failure = self._failure(offset, end, started)
                if failure is None:
                    launch: list[_Stream] = []
                    try:
                        foreign = self._plan(offset, end, want, launch, inline=inline, segment=segment)
                    except BaseException:
                        for stream in launch:
                            self._end_locked(stream)  # made, never to run
                        raise
                    # The streams that bring this read's own bytes: only their errors are its.
                    mine = [s for s in launch if s.pos < end]
                    covered = self._covered(offset, end)
                    if not covered and not launch:
                        # In the section that planned: a stream ending now cannot be missed.
                        self._wait_locked(offset, end, FOREIGN_POLL if foreign else None)
                        continue
            if failure is not None:
                failure = failure.with_traceback(None)
                if isinstance(failure, (IntegrityError, StoreError)):
                    raise failure
                if retried or isinstance(failure, RequestTimeout) or not isinstance(failure, NetworkError):
                    raise failure
                log.info("%s: %s; fetching again", self.digest, failure)
                retried = True
                started = [s for s in started if s.error is None]
                continue
            started += mine
            # A run's own bytes come in this thread (a busy pool never delays them), after its
            # read-ahead went to the pool, so that both run side by side.
            here = [s for s in launch if inline or (segment and (s.whole or s.wanted > s.pos))]
            ordered = [s for s in launch if s not in here] + here
            for n, stream in enumerate(ordered):
                try:
                    if stream in here:
                        self._run(stream, fetch, background=False)
                    else:
                        self._launch(stream, fetch)
                except BaseException:
                    with self._lock:
                        for rest in ordered[n + 1:]:
                            self._end_locked(rest)
                    raise
            if covered:
                return

    def _wait_locked(self, offset: int, end: int, poll: float | None) -> None:
        """Under _lock: wait for a change (any stream's progress or end), until the deadline."""
        left = deadline.remaining()
        if left is not None and left <= 0:
            raise RequestTimeout(f"blob {self.digest}: bytes {offset}-{end}: timed out "
                                 "(the operation's deadline, --timeout)")
        timeout = poll if left is None else (left if poll is None else min(poll, left))
        self._changed.wait(timeout)

    def _covered(self, offset: int, end: int) -> bool:
        """Under _lock: are bytes [offset, end) on disk?"""
        first, last = offset // self.chunk_size, (end - 1) // self.chunk_size
        if self._state.find(MISSING, first, last + 1) >= 0:
            return False
        i = self._state.find(INFLIGHT, first, last + 1)
        while i >= 0:
            if self._owner[i].pos < min(end, self._chunk_end(i)):
                return False
            i = self._state.find(INFLIGHT, i + 1, last + 1)
        return True

    def _failure(self, offset: int, end: int, started: list[_Stream]) -> BaseException | None:
        """Under _lock: the error of a stream that should have brought bytes [offset, end)
        and ended without them, once no live stream is on its way there."""
        first = offset // self.chunk_size
        missing = self._state.find(MISSING, first, (end - 1) // self.chunk_size + 1)
        if missing < 0:
            return None
        for stream in started:
            if stream.done and stream.error is not None:
                return stream.error
        return None

    def _plan(self, offset: int, end: int, want: int, launch: list[_Stream], *, inline: bool,
              segment: int = 0) -> bool:
        """Under _lock: make sure a stream is on its way to every missing byte of [offset,
        want): move the limit of a stream already headed there, else start one (appended to
        `launch`, for the caller to run: in its own thread when `inline`, and then with a
        fixed limit, so no other reader can make it fetch their read-ahead; for a run, whose
        read-ahead goes in fixed segments of `segment` bytes, in the pool). Returns True
        when a needed chunk is fetched by another process (the caller polls for it)."""
        first = offset // self.chunk_size
        last_needed = (end - 1) // self.chunk_size
        stop = (want - 1) // self.chunk_size + 1
        limit = self._boundary(want)
        self._refresh(first, stop - 1)
        foreign = False
        own = inline or bool(segment)  # this read fetches its own bytes in its thread
        if own:
            self._take_back(first, last_needed, end)
        # Streams already on these chunks follow the reader.
        i = self._state.find(INFLIGHT, first, stop)
        while i >= 0:
            stream = self._owner[i]
            self._follow(stream, limit, end if i <= last_needed else 0)
            nxt = max(i + 1, -(-stream.claimed // self.chunk_size))
            i = self._state.find(INFLIGHT, nxt, stop) if nxt < stop else -1
        c = self._state.find(MISSING, first, stop)
        while c >= 0:
            start = c * self.chunk_size
            headed = self._stream_headed_to(start, pooled=not own or c > last_needed)
            if headed is not None:
                self._follow(headed, limit, end if c <= last_needed else 0)
                nxt = max(c + 1, -(-headed.limit // self.chunk_size))
            elif segment and c > last_needed:
                # A run's read-ahead: a segment at a time, each started once there is room for
                # a whole one under the window, so that no request goes past it.
                live = sum(1 for s in self._streams if not s.whole)
                if (live >= PARALLEL_STREAMS or (limit - start < segment and limit < self.size)
                        or not self._claim(c)):
                    break
                seg_end = min(self.size, start + segment)
                stream = self._new_stream(c, seg_end, seg_end - start)
                stream.follows = False
                launch.append(stream)
                nxt = -(-seg_end // self.chunk_size)
            elif self._slow and c > last_needed:
                # One connection is capped: the read-ahead goes in segments side by side, each
                # started once there is room for a whole one under the window.
                segment = max(PARALLEL_SEGMENT, self._readahead // PARALLEL_STREAMS)
                segment -= segment % self.chunk_size
                live = sum(1 for s in self._streams if not s.whole)
                if (segment <= 0 or live >= PARALLEL_STREAMS
                        or (limit - start < segment and limit < self.size) or not self._claim(c)):
                    break
                seg_end = min(self.size, start + segment)
                stream = self._new_stream(c, seg_end, seg_end - start)
                stream.follows = False
                launch.append(stream)
                nxt = -(-seg_end // self.chunk_size)
            elif (self._slow and not inline and not segment and any(not s.whole for s in self._streams)
                  and sum(1 for s in self._streams if not s.whole) >= PARALLEL_STREAMS):
                break  # as many streams as a slow link gets: wait for one to end
            elif self._claim(c):
                # Its first request brings what the reader waits for, in one piece; a stream
                # that takes over where one ended at its limit goes on with that one's size.
                block = min(self._max_request, max(self.chunk_size, self._boundary(end) - start))
                if not inline and not segment and start == self._carry_at:
                    block = max(block, self._carry_block)
                fixed = self._slow or inline or bool(segment)
                # On a slow link, for a run (or run inline) it brings only that: segments (or
                # nobody) take the read-ahead.
                stream = self._new_stream(c, min(self.size, start + block) if fixed else limit, block)
                stream.follows = not fixed
                stream.wanted = end if c <= last_needed else start
                launch.append(stream)
                nxt = -(-stream.limit // self.chunk_size)
            elif c <= last_needed and self._overdue(c):
                # Another process holds this chunk's claim and has not delivered for a while
                # (stalled, or stopped while alive): fetch it ourselves, whole.
                stream = self._new_stream(c, self._chunk_end(c), self.chunk_size)
                stream.whole = True
                stream.follows = False
                launch.append(stream)
                nxt = c + 1
            else:
                foreign = foreign or c <= last_needed
                nxt = c + 1
            c = self._state.find(MISSING, nxt, stop) if nxt < stop else -1
        return foreign

    def _new_stream(self, index: int, limit: int, block: int) -> _Stream:
        """Under _lock: a stream from chunk `index` (claimed by the caller, or taken over from
        another process), to be launched."""
        start = index * self.chunk_size
        stream = _Stream(start, limit, block)
        stream.claimed = self._chunk_end(index)
        stream.wanted = start
        self._state[index] = INFLIGHT
        self._owner[index] = stream
        self._streams.append(stream)
        return stream

    def _overdue(self, index: int) -> bool:
        """Under _lock: has another process held chunk `index` for longer than we wait?"""
        now = time.monotonic()
        since = self._foreign_since.setdefault(index, now)
        if now - since < FOREIGN_PATIENCE:
            return False
        del self._foreign_since[index]
        return True

    def _follow(self, stream: _Stream, limit: int, wanted: int) -> None:
        """Under _lock: the stream goes on to `limit`; a reader waits up to `wanted`."""
        if not stream.follows or self._slow or stream.whole:
            limit = stream.limit  # a segment ends where it ends; on a slow link, more segments
        if stream.limit < limit or stream.wanted < wanted:
            stream.limit = max(stream.limit, limit)
            stream.wanted = max(stream.wanted, wanted)
            self._changed.notify_all()

    def _take_back(self, first: int, last: int, end: int) -> None:
        """Under _lock: chunks `first` to `last` (ending at `end`), needed by a reader that
        fetches in its own thread, are taken from streams that wait in the pool (a busy pool
        never delays such a reader): one that would start with them goes on after `end` (or
        ends, if that is its limit), one that would come to them later ends before them."""
        for c in range(first, last + 1):
            start = c * self.chunk_size
            if self._state[c] == PRESENT:
                continue
            for stream in self._streams:
                if (not stream.pooled or stream.done or not stream.pos <= start < stream.limit
                        or (self._state[c] == INFLIGHT and self._owner.get(c) is not stream)):
                    continue
                if start > stream.pos:
                    stream.limit = start  # it keeps what comes before
                else:
                    for i in range(c, -(-stream.claimed // self.chunk_size)):
                        if self._state[i] == INFLIGHT and self._owner.get(i) is stream:
                            self._state[i] = MISSING
                            del self._owner[i]
                            self.files.unclaim(i)
                    if stream.whole:  # a take-over of another process's stalled claim: now ours
                        self._foreign_since[c] = time.monotonic() - FOREIGN_PATIENCE
                    stream.pos = stream.claimed = min(stream.limit, self._boundary(end))
                    stream.wanted = max(stream.wanted, stream.pos)
                if not stream.follows:
                    stream.block = max(self.chunk_size, stream.limit - stream.pos)  # not past it
                if stream.pos >= stream.limit:
                    stream.done = True  # its task finds it so and returns
                    self._streams.remove(stream)
                self._changed.notify_all()
                break

    def _stream_headed_to(self, start: int, pooled: bool = True) -> _Stream | None:
        """Under _lock: a live stream that will write byte `start` without being asked (it is
        before it and `start` is under its limit), or that is close behind it, with nothing
        in between that someone else fetches. `pooled`: one still waiting in the pool counts."""
        for stream in self._streams:
            if stream.done or stream.pos > start or stream.whole or (stream.pooled and not pooled):
                continue
            if start >= stream.limit and (not stream.follows or self._slow
                                          or start - stream.pos > 2 * self.chunk_size):
                continue
            a, b = stream.pos // self.chunk_size, start // self.chunk_size
            if any(state == INFLIGHT and self._owner.get(a + k) is not stream
                   for k, state in enumerate(self._state[a:b])):
                continue
            return stream
        return None

    def _claim(self, index: int) -> bool:
        """Under _lock: claim a MISSING chunk against other processes. False when another
        process fetches it (or it turned out present: then it is marked so)."""
        if not self.files.claim(index):
            return False
        if self.files.read_map(index, index).translate(_FROM_DISK)[0] == PRESENT:
            self.files.unclaim(index)  # written by another process just now
            self._state[index] = PRESENT
            self._changed.notify_all()
            return False
        self._state[index] = INFLIGHT
        self._foreign_since.pop(index, None)
        return True

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
        if newly:
            self._changed.notify_all()
        return newly

    # ------------------------------------------------------------------ streams

    def _launch(self, stream: _Stream, fetch: Fetch) -> None:
        """Run the stream in the store's pool; in this thread once the store is closed or the
        partial is stopping (a pool stream would end at once), then only up to what the
        reader waits for."""
        with self._lock:
            pooled = stream.pooled = not self._stopping
            self._changed.notify_all()  # a reader waiting for its bytes may take them back
        if not pooled or not self._submit_to_store(self, lambda: self._run(stream, fetch, background=True)):
            with self._lock:
                stream.pooled = False
                stream.follows = False
                stream.limit = min(stream.limit, self._boundary(max(stream.wanted, stream.pos + 1)))
            self._run(stream, fetch, background=False)

    def _run(self, stream: _Stream, fetch: Fetch, *, background: bool) -> None:
        """A stream's life: requests while there is room under its limit; then wait (in the
        pool) for a reader to move the limit, or end."""
        if background:
            with self._lock:
                stream.pooled = False  # started: its bytes are its own now
                if stream.done:
                    return  # readers took all its bytes while it waited
        try:
            if stream.whole:
                with deadline.limit(self._background_timeout if background else None):
                    self._fetch_whole(stream, fetch)
                return
            while True:
                end = self._next_request(stream, background)
                if end is None:
                    return
                if background:
                    # A read-ahead has a deadline too: one that trickles must not hold its chunks
                    # (and the readers waiting on them) for ever; what it did not get is fetched again.
                    with deadline.limit(self._background_timeout):
                        self._fetch(stream, end, fetch, background)
                else:
                    self._fetch(stream, end, fetch, background)
        except _Cancelled:
            pass
        except BaseException as exc:
            if isinstance(exc, OcifsError):
                log.info("%s: fetch from %d failed: %s", self.digest, stream.pos, exc)
                stream.error = exc
            else:  # a reader must get an errno, not a stray exception
                log.exception("%s: fetch from %d failed", self.digest, stream.pos)
                stream.error = StoreError(f"{self.digest}: fetch failed: {exc!r}", errno=errno.EIO)
        finally:
            self._end(stream)

    def _next_request(self, stream: _Stream, background: bool) -> int | None:
        """Claim the stream's next request and return its end; None when the stream ends.

        A stream asks for its next request while its limit is ahead of it, as big as its
        block (which doubles with each request, up to `max_request`), even past the limit:
        few big requests are what makes a stream fast, since each costs a round trip. At
        its limit it ends (parked streams would hold the pool's workers); the stream a reader
        starts there goes on with its block size. Requests end at chunk boundaries, so
        between two a stream holds no claim.
        """
        with self._lock:
            while True:
                if self._error is not None or (background and self._stopping):
                    return None
                pos = stream.pos
                if pos >= self.size:
                    return None
                if pos >= stream.limit:
                    return None
                end = min(self.size, pos + stream.block)
                claimed = pos
                c = pos // self.chunk_size
                while claimed < end:
                    if self._state[c] == INFLIGHT and self._owner.get(c) is stream:
                        pass  # claimed for it when it was started
                    elif self._state[c] != MISSING or self._refresh(c, c) or not self._claim(c):
                        break
                    else:
                        self._owner[c] = stream
                    claimed = stream.claimed = self._chunk_end(c)  # at once: _end releases it
                    c += 1
                if claimed > pos:
                    stream.claimed = claimed
                    stream.block = min(self._max_request, stream.block * 2)
                    return claimed
                if self._state[c] != PRESENT:
                    return None  # the next chunk is someone else's to fetch
                # Written meanwhile (by another reader or process): go on after it.
                stream.pos = stream.claimed = self._chunk_end(c)

    def _fetch(self, stream: _Stream, end: int, fetch: Fetch, background: bool) -> None:
        """One range request [stream.pos, end): each piece is written as it arrives, each
        chunk marked once whole. A short body raises RangeError (nothing half-marked)."""
        offset = pos = stream.pos
        overtaken = -1
        started = time.monotonic()
        iterator = iter(fetch(offset, end - offset))
        try:
            for piece in iterator:
                view = memoryview(piece).cast("B")
                if len(view) > end - pos:
                    log.debug("%s: fetch returned more than the %d bytes asked", self.digest, end - offset)
                    view = view[:end - pos]
                while view:
                    index = pos // self.chunk_size
                    chunk_end = self._chunk_end(index)
                    part = view[:chunk_end - pos]
                    whole = pos + len(part) == chunk_end
                    if index != overtaken and not self.files.write_piece(index, pos, part, last=whole):
                        # Another process wrote it although we held its claim (it waited too
                        # long): its bytes stay, ours of this chunk go nowhere.
                        overtaken = index
                    pos += len(part)
                    view = view[len(part):]
                    self._advance(stream, pos, whole)
                    if whole and pos < end and (self._error is not None
                                                or (background and self._stopping)):
                        raise _Cancelled
                if pos >= end:
                    break
            if pos < end:
                raise RangeError(f"{self.digest}: fetch of {end - offset} bytes at {offset} "
                                 f"ended after {pos - offset}")
            if end - offset >= SLOW_PROBE:
                rate = (end - offset) / max(1e-6, time.monotonic() - started)
                self._slow = rate < SLOW_RATE  # one connection is not enough: go parallel
        finally:
            close = getattr(iterator, "close", None)
            if callable(close):
                close()  # let an HTTP response go back to its pool early

    def _fetch_whole(self, stream: _Stream, fetch: Fetch) -> None:
        """Fetch the stream's one chunk into memory, then write it unless it got marked."""
        index = stream.pos // self.chunk_size
        chunk_end = self._chunk_end(index)
        length = chunk_end - stream.pos
        buffer = self._buffers.get()
        try:
            view = memoryview(buffer)[:length]
            got = 0
            for piece in fetch(stream.pos, length):
                part = memoryview(piece).cast("B")[:length - got]
                view[got:got + len(part)] = part
                got += len(part)
                if got >= length:
                    break
            if got < length:
                raise RangeError(f"{self.digest}: fetch of {length} bytes at {stream.pos} "
                                 f"ended after {got}")
            self.files.store_chunk(index, view)
        finally:
            self._buffers.put(buffer)
        self._advance(stream, chunk_end, True)

    def _advance(self, stream: _Stream, pos: int, whole: bool) -> None:
        with self._lock:
            stream.pos = pos
            if whole:
                index = (pos - 1) // self.chunk_size
                self._state[index] = PRESENT
                self._owner.pop(index, None)
                self.files.unclaim(index)
            self._changed.notify_all()
        if whole:
            self._schedule_hash()

    def _end(self, stream: _Stream) -> None:
        with self._lock:
            self._end_locked(stream)

    def _end_locked(self, stream: _Stream) -> None:
        """Under _lock: the stream is over: give back the chunks it claimed and did not
        finish. One that ended at its limit leaves its block size to the next one there."""
        if stream.follows and stream.error is None and stream.pos >= stream.limit:
            self._carry_at, self._carry_block = stream.pos, stream.block
        stream.done = True
        first = stream.pos // self.chunk_size
        for i in range(first, -(-stream.claimed // self.chunk_size)):
            if self._state[i] == INFLIGHT and self._owner.get(i) is stream:
                self._state[i] = MISSING
                del self._owner[i]
                self.files.unclaim(i)
        if stream in self._streams:
            self._streams.remove(stream)
        self._changed.notify_all()

    # ------------------------------------------------------------------ verifying

    def _schedule_hash(self) -> None:
        """Start the hash task if the next chunk to hash is present and none runs. Never
        called under _lock: the store's lock is taken to submit (the store takes ours under
        its own)."""
        with self._lock:
            i = self._hash_next
            if (self._hashing or self._done.is_set() or self._error is not None
                    or i >= self.nchunks or self._state[i] != PRESENT):
                return
            self._hashing = True
        try:
            submitted = self._submit_to_store(self, self._hash_task)
        except BaseException:
            with self._lock:
                self._hashing = False
            raise
        if not submitted:
            self._hash_task()  # the store is closed: hash in this thread

    def _hash_task(self) -> None:
        """Hash forward over present chunks; finish the blob after the last one."""
        buffer = self._buffers.get()
        view = memoryview(buffer)
        outcome: bool | None = None
        try:
            while True:
                with self._lock:
                    i = self._hash_next
                    if ((i < self.nchunks and self._state[i] != PRESENT)
                            or self._error is not None or self._done.is_set()):
                        self._hashing = False  # in the section that looked: no lost wake-up
                        return
                    if i >= self.nchunks:
                        break
                part = view[:self._chunk_end(i) - i * self.chunk_size]
                self.files.read_into(i * self.chunk_size, part)  # what is on disk is what counts
                self._verifier.update(part)  # big buffers: hashlib releases the GIL
                with self._lock:
                    self._hash_next = i + 1
            outcome = self._finalize()
        except OcifsError as exc:
            self._fail(exc)
            outcome = False
        except BaseException as exc:
            # Readers waiting for the verdict must get one, not wait for ever.
            self._fail(StoreError(f"{self.digest}: verification failed: {exc!r}", errno=errno.EIO))
            with self._lock:
                self._hashing = False
            raise
        finally:
            self._buffers.put(buffer)
        with self._lock:
            self._hashing = False
        if outcome is not None:
            self._on_done(self, outcome)

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
            self._changed.notify_all()
        self._done.set()

