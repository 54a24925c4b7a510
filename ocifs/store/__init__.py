"""The content-addressed cache on disk: lazy chunks, verification, eviction, locking.

    store = BlobStore(root, max_bytes=None, chunk_size=1 MiB, workers=8)
    handle = store.open(digest, size, fetch)   # fetch(offset, length) -> Iterator[bytes]
    handle.read(offset, size); handle.close()
    store.close()                              # at unmount

The store never talks to a registry: it is given a fetch function per open. It never imports
FUSE either; its errors are OcifsError subclasses that carry an errno (disk errors become
StoreError with the OSError's errno, e.g. ENOSPC).

Layout under root (directories 0700, files 0600): `blobs/<alg>/<hex>` complete verified blobs,
`partial/<alg>/<hex>` (sparse data) + `<hex>.map` (chunk map, format in files.py), `tmp/`.

Reading. Bytes arrive through streams (see partial.py): a stream writes the blob forward from a
chunk boundary in range requests that double in size (one chunk, then up to `max_request`), each
piece written as it arrives, so a reader waits for its own bytes, not for a whole chunk or
request. A handle whose reads start at 0 and continue at or before the furthest end read so far
(plus SEQUENTIAL_SLACK, for the kernel's out-of-order readahead) is sequential: one stream
follows it, kept up to `readahead` bytes ahead by a window that grows while the reading stays
sequential (a 4 KiB read of a cold file costs one chunk). A random read fetches the chunks it
covers, in the reading thread. When a big request arrives slowly (one connection is capped),
read-aheads are split into a few streams side by side. A chunk is claimed by one stream; in one
process and, through open-file-description locks on the chunk map, across processes: nothing is
fetched twice by concurrent readers (a claim held by a process that stalls is overtaken after a
while, and the whole chunk is then written only if it is still unmarked).

Verification. The digest is hashed incrementally, from disk, as chunks become contiguous from the
start; after the last chunk the blob is checked against digest and size and renamed into blobs/
(atomic). A mismatch deletes the partial (data and map) and fails the blob: every handle on it
then raises IntegrityError (EIO), and the next open starts afresh.
  - The read of a *sequential* handle that reaches the end of the blob waits for that check, so
    a sequential reader (cat, cp, tar) never reaches EOF on bytes that do not match.
  - A *random* read (not part of a sequential scan) is served as soon as its chunks are on disk,
    verified or not, including reads of the tail: waiting for the whole blob would turn every
    lazy random access (a tar index, a zip directory at the end of a file) into a full download.
    Random readers get bytes the registry served for that digest, not yet checked; once a
    mismatch is detected no handle serves bytes of that partial again.

Failures. A fetch that raises, or yields fewer bytes than asked (RangeError), fails the readers
waiting for its chunks with that error (errno kept) and marks nothing it did not fully write; the
next read that needs those chunks fetches them again. Disk errors (ENOSPC, ...) do the same as
StoreError.

Processes. Several processes may share one root. Chunk writes, publishing and discarding take an
exclusive flock on the map, briefly (never across network I/O or hashing); a piece is written only
if the map on disk does not have its chunk yet, and a marked chunk is never rewritten, so processes
never corrupt a partial nor publish unverified bytes. A partial left by a killed process is
resumed: its map is trusted, the final digest check catches anything wrong.

Eviction. With max_bytes, after each completed blob and on evict(): blobs and partials are deleted
least recently opened first (their mtime, touched on open, is the clock) until usage() <= max_bytes,
skipping any digest a handle of this process holds and any partial another process is writing at
that moment. usage() counts complete blobs by size and partials by allocated blocks.

Threads: no lock is held across network I/O or across waiting for another thread; the worker pool
starts on first use (the daemon forks after creating the store).
"""

from __future__ import annotations

from .blobstore import SEQUENTIAL_SLACK, BlobHandle, BlobStore, Fetch

__all__ = ["SEQUENTIAL_SLACK", "BlobHandle", "BlobStore", "Fetch"]
