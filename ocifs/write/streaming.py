"""Uploads that start while a file is written (DESIGN.md section 3: "big uploads may stream
during `write` so that `close` only finishes them").

While a staged file is written sequentially from offset 0, a `StreamingUpload` opens an
upload session and a background thread sends the file in pieces as they accumulate, reading
the staged file from disk behind the writer. Writes never wait for it: they only move the
mark of what is written for good (`extend`). At close, the pusher calls `finish`, which sends
the last bytes with the PUT that names the digest (hashed by the writes as they came, see
`StagedFile.digest`); the registry checks that digest against every byte it received.

Anything else (a write out of order, a truncate, a second writer, an upload error, a rename
into another repository) abandons the stream: its session is cancelled and the file goes up
the usual way at close. An abandoned or interrupted session is never committed, so it never
becomes a blob, let alone a layer of a manifest.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..digest import Digest
from ..errors import OcifsError
from ..registry.client import CHUNK_SIZE, RegistryClient, UploadSession
from ..store.files import pread_all

log = logging.getLogger(__name__)

# Bytes per PATCH, as for an upload at close: big enough that a request's round trip is small
# beside its transfer (8 MiB pieces went ~6% slower on loopback), small enough to keep the
# daemon's memory flat (one piece is in memory at a time).
PIECE_SIZE = CHUNK_SIZE
# A file opens an upload session only once it holds this much: smaller files go up in one PUT
# at close, with no session to open and cancel for nothing.
STREAM_FROM = PIECE_SIZE
# How long unmounting waits for an abandoned session to be cancelled.
CANCEL_WAIT = 5.0


class StreamingUpload:
    """The upload of one staged file that follows its sequential writes. Thread-safe: the
    writer calls `extend`/`abandon` (never blocking on the network), the pusher `finish` or
    `cancel`, and one background thread sends."""

    def __init__(self, client: RegistryClient, repository: str, data_path: Path, what: str, *,
                 piece_size: int = PIECE_SIZE) -> None:
        self.repository = repository
        self._client = client
        self._data_path = data_path
        self._what = what  # the file's path in the mount, for the log
        self._piece_size = piece_size
        self._cond = threading.Condition()
        self._written = 0  # bytes [0, written) of the staged file are final
        self._sent = 0  # bytes the registry holds
        self._closing = False  # the file is complete: send whole pieces, then stop
        self._abandoned: str | None = None  # why the stream was given up by this side
        self._failed: str | None = None  # why sending failed
        self._session: UploadSession | None = None
        self._thread = threading.Thread(target=self._send, name="ocifs-upload", daemon=True)

    def start(self, written: int) -> None:
        self._written = written
        self._thread.start()

    # ---- the writer's side: never waits on the network --------------------------------------

    def extend(self, written: int) -> None:
        """Bytes [0, written) of the staged file are final: they may be sent."""
        with self._cond:
            if written > self._written:
                self._written = written
                self._cond.notify_all()

    def abandon(self, why: str) -> None:
        """Give the stream up: the sender stops and cancels the session (in its own thread)."""
        with self._cond:
            if self._abandoned is None:
                self._abandoned = why
                self._cond.notify_all()

    # ---- the pusher's side --------------------------------------------------------------------

    def finish(self, digest: Digest, size: int) -> bool:
        """Send what is left and commit the blob as `digest`, the hash of the file's `size`
        bytes. False when the stream cannot do it (it failed or was given up; its session is
        cancelled): the caller uploads the file the usual way."""
        with self._cond:
            if size < self._written:
                self._abandoned = self._abandoned or "the file is shorter than what was streamed"
            self._written = max(self._written, size)
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        session = self._session
        if self._abandoned is not None or self._failed is not None or session is None:
            log.info("%s: streamed upload not used (%s); uploading at close", self._what,
                     self._abandoned or self._failed or "no session")
            return False
        try:
            tail = self._read(self._sent, size - self._sent)
            session.finish(digest, tail)
        except (OcifsError, OSError) as exc:
            log.warning("%s: finishing the streamed upload failed (%s); uploading at close", self._what, exc)
            session.cancel()
            return False
        log.debug("%s: streamed upload of %s committed (%d bytes at close)", self._what, digest, len(tail))
        return True

    def cancel(self, timeout: float | None = None) -> None:
        """Give the stream up and wait (up to `timeout`) until its session is cancelled."""
        self.abandon("cancelled")
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the sender -------------------------------------------------------------------------

    def _read(self, offset: int, length: int) -> bytes:
        """Bytes of the staged file, opened only for the read: a file removed meanwhile frees
        its disk space at once, not when a slow PATCH ends."""
        with open(self._data_path, "rb") as file:
            return pread_all(file.fileno(), length, offset)

    def _send(self) -> None:
        """Open the session, then send every whole piece as soon as it is written, until the
        stream is finished or given up. On an error, stop: `finish` then falls back."""
        try:
            session = self._client.open_upload(self.repository)
            self._session = session
            piece_size = max(self._piece_size, session.min_chunk_length)
            while True:
                with self._cond:
                    while self._abandoned is None and not self._closing \
                            and self._written - self._sent < piece_size:
                        self._cond.wait()
                    if self._abandoned is not None or self._written - self._sent < piece_size:
                        break  # given up, or closing with less than a piece left (sent with the PUT)
                    start = self._sent
                session.append(self._read(start, piece_size))
                with self._cond:
                    self._sent = session.offset
        except (OcifsError, OSError) as exc:
            with self._cond:
                self._failed = str(exc)
            log.info("%s: streaming upload stopped: %s", self._what, exc)
        except Exception as exc:  # a bug must not kill the push: it falls back
            with self._cond:
                self._failed = repr(exc)
            log.exception("%s: streaming upload failed", self._what)
        with self._cond:
            given_up = self._abandoned is not None or self._failed is not None
        if given_up and self._session is not None:
            self._session.cancel()
