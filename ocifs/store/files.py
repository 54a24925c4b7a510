"""The on-disk half of a partial download: a sparse data file and its chunk map.

Chunk map format (`<hex>.map`, next to the data file `<hex>`):

    offset 0   8 bytes   magic b"OCIFSCM1"
    offset 8   8 bytes   blob size, big-endian unsigned
    offset 16  8 bytes   chunk size, big-endian unsigned
    offset 24  n bytes   one byte per chunk: 1 = the chunk's bytes are in the data file, else missing

A chunk's byte is set only after its data was written (pwrite of the data, then of the byte), so a
process killed at any point leaves no chunk marked that is not on disk (the page cache survives the
process). A map whose header does not match what the opener expects (another chunk size, another
size for this digest, a truncated file) is discarded, not repaired.

Claims between processes: a chunk being fetched is claimed with an open-file-description
(OFD) write lock on its byte of the map, taken without waiting. Another process that fails to
take it knows the chunk is on its way and waits for its byte to be set (polling) instead of
fetching it too; the kernel drops the lock when the claimer closes the map or dies, so a claim
never outlives its process. A claimed chunk is written by its claimer only, piece by piece as
its bytes arrive, and marked when whole.

Locking between processes: `flock` on the map file. Exclusive, briefly, to create or discard a pair,
to write one chunk (re-check its byte, pwrite, mark), and to publish (rename into blobs/). Never held
across network I/O or hashing. Because the pair can be renamed or unlinked by another process, every
lock holder that renames or unlinks checks first that the paths still name the inodes it holds
(`is_current`). A holder whose pair has gone keeps using its (now private) file descriptors: writes
into an unlinked pair harm nobody, and writes into a pair that was published are impossible because
that pair's map has every byte set, and a chunk whose byte is set is never written again.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import StoreError
from .layout import FILE_MODE

MAGIC = b"OCIFSCM1"
HEADER = struct.Struct(">8sQQ")
PRESENT = 1

_OPEN_RETRIES = 20

# Open file description locks (Linux >= 3.15): owned by the open map, not by the process, so
# a process's other opens of the map (eviction, a second partial) cannot release them.
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


def _same_file(fd: int, path: Path) -> bool:
    """Does `path` still name the inode behind `fd`? (Not if it was renamed, unlinked, replaced.)"""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return mine.st_nlink > 0 and (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class PartialFiles:
    """File descriptors of one partial (data + map) and the operations on them.

    Thread-safe: flock belongs to the open file description, which all threads of this object
    share, so a threading lock serializes the flock'ed sections inside the process.
    """

    def __init__(self, data_path: Path, map_path: Path, data_fd: int, map_fd: int,
                 size: int, chunk_size: int, present: bytes) -> None:
        self.data_path = data_path
        self.map_path = map_path
        self.data_fd = data_fd
        self.map_fd = map_fd
        self.size = size
        self.chunk_size = chunk_size
        self.nchunks = chunk_count(size, chunk_size)
        self.initial = present  # the map as found when opened
        self._tlock = threading.Lock()
        self._closed = False

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(cls, data_path: Path, map_path: Path, size: int, chunk_size: int,
             complete_path: Path) -> PartialFiles | None:
        """Open (resume) or create the partial pair. None when the blob turned out complete."""
        try:
            return cls._open(data_path, map_path, size, chunk_size, complete_path)
        except OSError as exc:
            raise StoreError.from_oserror(exc, f"cannot open partial {data_path}") from exc

    @classmethod
    def _open(cls, data_path: Path, map_path: Path, size: int, chunk_size: int,
              complete_path: Path) -> PartialFiles | None:
        nchunks = chunk_count(size, chunk_size)
        flags = os.O_RDWR | os.O_CLOEXEC
        for _ in range(_OPEN_RETRIES):
            map_fd = os.open(map_path, flags | os.O_CREAT, FILE_MODE)
            data_fd = -1
            try:
                fcntl.flock(map_fd, fcntl.LOCK_EX)
                if not _same_file(map_fd, map_path):
                    continue  # discarded or published while we waited for the lock
                st = os.fstat(map_fd)
                if st.st_size == 0:
                    # New map: the blob may have been published just before we created it.
                    if os.path.exists(complete_path):
                        unlink_quietly(map_path)
                        return None
                    unlink_quietly(data_path)  # a data file without a map is not trustworthy
                    os.pwrite(map_fd, HEADER.pack(MAGIC, size, chunk_size), 0)
                    os.ftruncate(map_fd, HEADER.size + nchunks)
                    data_fd = os.open(data_path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
                    os.ftruncate(data_fd, size)  # sparse: only fetched chunks take space
                    present = bytes(nchunks)
                else:
                    header = os.pread(map_fd, HEADER.size, 0)
                    valid = (st.st_size == HEADER.size + nchunks
                             and header == HEADER.pack(MAGIC, size, chunk_size))
                    if valid:
                        try:
                            data_fd = os.open(data_path, flags)
                        except FileNotFoundError:
                            valid = False
                    if valid and os.fstat(data_fd).st_size > size:
                        valid = False
                    if not valid:
                        # Discard rather than repair: new inodes, so a process still holding the
                        # old pair cannot write into ours.
                        unlink_quietly(data_path)
                        unlink_quietly(map_path)
                        continue
                    if os.fstat(data_fd).st_size < size:
                        os.ftruncate(data_fd, size)
                    present = pread_all(map_fd, nchunks, HEADER.size)
                os.utime(map_fd)  # LRU clock for eviction
                files = cls(data_path, map_path, data_fd, map_fd, size, chunk_size, present)
                data_fd = map_fd = -1  # owned by `files` now
                fcntl.flock(files.map_fd, fcntl.LOCK_UN)
                return files
            finally:
                if data_fd >= 0:
                    os.close(data_fd)
                if map_fd >= 0:
                    os.close(map_fd)  # also drops the flock
        raise StoreError(f"partial {data_path} keeps changing under us", errno=errno.EAGAIN)

    # ---------------------------------------------------------------- locking

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive against other threads of this object and other processes (flock)."""
        with self._tlock:
            if self._closed:
                raise StoreError(f"partial {self.data_path} is closed", errno=errno.EBADF)
            fcntl.flock(self.map_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self.map_fd, fcntl.LOCK_UN)

    def is_current(self) -> bool:
        """Do the paths still name our pair? Call while locked()."""
        return _same_file(self.map_fd, self.map_path)

    # ---------------------------------------------------------------- chunks

    def read_map(self, first: int, last: int) -> bytes:
        """Map bytes of chunks first..last, as on disk now (no lock: single bytes are atomic)."""
        try:
            return pread_all(self.map_fd, last - first + 1, HEADER.size + first)
        except OSError as exc:
            raise StoreError.from_oserror(exc, f"cannot read chunk map {self.map_path}") from exc

    def claim(self, index: int) -> bool:
        """Claim chunk `index` against other processes (see the module docstring). False when
        another process holds it."""
        return self._ofd_lock(index, fcntl.F_WRLCK)

    def unclaim(self, index: int) -> None:
        self._ofd_lock(index, fcntl.F_UNLCK)

    def _ofd_lock(self, index: int, kind: int) -> bool:
        request = _FLOCK.pack(kind, os.SEEK_SET, HEADER.size + index, 1, 0)
        try:
            fcntl.fcntl(self.map_fd, _F_OFD_SETLK, request)
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            if exc.errno == errno.EBADF and kind == fcntl.F_UNLCK:
                return True  # closed meanwhile: the kernel dropped the lock
            if exc.errno == errno.EINVAL:
                return True  # no OFD locks here (old kernel): processes may fetch twice
            raise StoreError.from_oserror(exc, f"cannot lock {self.map_path}") from exc

    def write_piece(self, index: int, offset: int, data: memoryview, *, last: bool) -> bool:
        """Write bytes of chunk `index` at `offset`, and mark the chunk when `last` (its bytes
        are then all written), unless the map says the chunk is there already: then nothing
        is written and False is returned. A marked chunk is never written again, which is what
        lets a hash computed from disk stay true, even when a claim was overtaken (see
        store_chunk)."""
        try:
            with self.locked():
                if os.pread(self.map_fd, 1, HEADER.size + index) == bytes([PRESENT]):
                    return False
                _pwrite_all(self.data_fd, data, offset)
                if last:
                    os.pwrite(self.map_fd, bytes([PRESENT]), HEADER.size + index)  # after the data
                return True
        except OSError as exc:
            raise StoreError.from_oserror(exc, f"cannot write to {self.data_path}") from exc

    def store_chunk(self, index: int, data: memoryview) -> bool:
        """Write one whole chunk and mark it, unless the map says it is there already (False).
        For a chunk fetched without its claim: another process held it too long."""
        return self.write_piece(index, index * self.chunk_size, data, last=True)

    def pread(self, offset: int, length: int) -> bytes:
        try:
            return pread_all(self.data_fd, length, offset)
        except OSError as exc:
            raise StoreError.from_oserror(exc, f"cannot read {self.data_path}") from exc

    def read_into(self, offset: int, buffer: memoryview) -> None:
        try:
            done = 0
            while done < len(buffer):
                n = os.preadv(self.data_fd, [buffer[done:]], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, "unexpected end of file")
                done += n
        except OSError as exc:
            raise StoreError.from_oserror(exc, f"cannot read {self.data_path}") from exc

    # ---------------------------------------------------------------- endings

    def publish(self, complete_path: Path, tmp_dir: Path) -> None:
        """Make the (verified) data the complete blob, atomically."""
        try:
            with self.locked():
                if self.is_current():
                    try:
                        os.rename(self.data_path, complete_path)
                        renamed = True
                    except FileNotFoundError:  # data file lost (removed by hand?): copy below
                        renamed = False
                    unlink_quietly(self.map_path)
                    if renamed:
                        return
            # Our pair was discarded or published by someone else meanwhile.
            if not os.path.exists(complete_path):
                copy_fd_to(self.data_fd, self.size, complete_path, tmp_dir)
        except OSError as exc:
            raise StoreError.from_oserror(exc, f"cannot publish {complete_path}") from exc

    def discard(self) -> None:
        """Delete the pair (bad bytes must never be served again), if it is still ours."""
        try:
            with self.locked():
                if self.is_current():
                    unlink_quietly(self.data_path)
                    unlink_quietly(self.map_path)
        except OSError as exc:
            raise StoreError.from_oserror(exc, f"cannot remove {self.data_path}") from exc

    def close(self) -> None:
        with self._tlock:
            if self._closed:
                return
            self._closed = True
            os.close(self.data_fd)
            os.close(self.map_fd)


def remove_partial(data_path: Path, map_path: Path, *, orphan_age: float = 3600.0) -> bool:
    """Delete a partial pair unless some process is busy with it right now (eviction)."""
    try:
        fd = os.open(map_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        # A data file without a map is worthless, unless it is a pair being created right now.
        try:
            if time.time() - os.stat(data_path).st_mtime < orphan_age:
                return False
        except FileNotFoundError:
            return True
        unlink_quietly(data_path)
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if _same_file(fd, map_path):
            unlink_quietly(data_path)
            unlink_quietly(map_path)
        return True
    finally:
        os.close(fd)


def write_then_rename(dest: Path, tmp_dir: Path, fill: Callable[[int], None]) -> None:
    """`fill(fd)` a temporary file in tmp_dir, then rename it to `dest`: readers see the whole
    file or none. On any failure the temporary file goes."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=".new-")
    try:
        fill(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, dest)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        unlink_quietly(Path(tmp))
        raise


def copy_fd_to(src_fd: int, size: int, dest: Path, tmp_dir: Path) -> None:
    """Copy `size` bytes of src_fd to `dest`, through a temporary file."""
    write_then_rename(dest, tmp_dir, lambda fd: _copy_fd(src_fd, fd, size))


def _copy_fd(src_fd: int, fd: int, size: int) -> None:
    offset = 0
    while offset < size:
        try:
            n = os.copy_file_range(src_fd, fd, size - offset, offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = 0
        if n <= 0:  # no kernel copy here: plain reads of bounded size
            block = os.pread(src_fd, min(size - offset, 4 << 20), offset)
            if not block:
                raise OSError(errno.EIO, "unexpected end of file")
            _pwrite_all(fd, memoryview(block), offset)
            n = len(block)
        offset += n


def pread_all(fd: int, length: int, offset: int) -> bytes:
    """Exactly `length` bytes at `offset` (pread may return fewer); EIO at an early end."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise OSError(errno.EIO, f"unexpected end of file at {offset + got}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n
