"""Archive indexes: the members of a tar layer, read without unpacking it (issue 11).

No FUSE, no HTTP. A layer's index is built once per blob digest from the verified blob:

    archives = Archives(store)
    index = archives.index(digest, open_blob)   # open_blob() -> a handle on the blob
    member = index.entries[("dir", "file")]
    reader = archives.open_member(digest, member); reader.read(offset, size); reader.close()

Building streams the blob into an uncompressed tar file in the cache (one pass, in pieces of
PIECE: memory flat whatever the size), walks its headers with `tarfile` (no data is read), and
writes the index as JSON. Both are kept next to the blob (`blobs/<alg>/<hex>.tar` and
`<hex>.index`), counted in the cache's usage and evicted with the blob. A member's bytes are a
pread at its data offset in the tar file. The blob is read sequentially from its start, so the
store checks its digest before the last bytes are handed over: an index is only ever built from
a verified blob.

The blob's first bytes, not its media type, say how it is read:
  - gzip (`tar+gzip`, Docker's `tar.gzip`): through zlib, several members in a row (estargz);
  - zstd (`tar+zstd`, `tar.zstd`): through libzstd (the `zstandard` package), several frames in
    a row and skippable frames among them (zstd:chunked). Its output is taken in pieces too, as
    a few KiB of frames can hold GiBs of zeros. A frame asking for a window above libzstd's
    default limit (128 MiB; `zstd --long=28` and up) is refused, not allocated. libzstd stops
    silently when its input ends inside a frame, so `ZstdFrames` follows the frame and block
    headers to tell a truncated blob;
  - anything else is taken as an uncompressed tar (`tarfile` says whether it is one).
Garbage and truncated streams are ArchiveErrors (EIO for whoever looks inside).

What an index shows (the safety rules; every member not shown is logged):
  - names are split on `/`; empty and `.` components are dropped (`./a//b` is `a/b`);
  - a name that is absolute, has a `..` component, a control or bidi formatting character,
    a component over 255 bytes or bytes that are not UTF-8 is not shown;
  - regular files, directories and symbolic links are shown; a symlink's target is shown as
    stored and never resolved by ocifs; device nodes, FIFOs and sparse files are not shown;
  - a hard link is shown as a regular file with its target's bytes when the target is a regular
    file shown earlier in the archive; otherwise it is not shown;
  - a member below something that is not a directory (a file, a symlink) is not shown: a
    symlink never makes a path of the archive lead elsewhere;
  - duplicates: the last member of a name wins, as `tar -x` leaves it, except that a directory
    is never replaced by a non-directory (its members would be lost);
  - directories that members imply but the archive lacks are shown with mode 0755;
  - modes are the permission bits (setuid, setgid and sticky bits are dropped).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Protocol, cast

import zstandard
from cachetools import LRUCache

from .digest import Digest
from .errors import OcifsError
from .store import BlobStore

log = logging.getLogger(__name__)

INDEX_VERSION = 2
TAR_SUFFIX = ".tar"
INDEX_SUFFIX = ".index"
NAME_MAX = 255
PIECE = 1 << 20  # bytes of the blob read at a time while building
# C0, DEL, C1 and bidi formatting characters (as layout.py's titles).
UNSAFE_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")

FILE, DIR, SYMLINK = "file", "dir", "symlink"


class ArchiveError(OcifsError):
    """The blob is not a tar archive, plain or compressed with gzip or zstd (or not a readable one)."""

    errno = errno.EIO


class ArchiveTooLarge(ArchiveError):
    """The uncompressed tar would take more than the cache allows one archive (a decompression
    bomb, or a layer bigger than the cache): not kept, not built again by this mount."""

    errno = errno.EFBIG


# The uncompressed tar of one archive may take at most this share of the cache's bound, and
# must leave this much of its disk free: a small compressed blob can expand a thousandfold.
MAX_CACHE_SHARE = 0.5
DISK_RESERVE = 256 << 20


class _CappedFile:
    """A binary file that refuses to grow beyond `cap` bytes (ArchiveTooLarge)."""

    def __init__(self, out: Any, cap: int, what: str) -> None:
        self._out = out
        self._cap = cap
        self._what = what
        self._written = 0

    def write(self, data: bytes) -> int:
        self._written += len(data)
        if self._written > self._cap:
            raise ArchiveTooLarge(f"{self._what}: its uncompressed tar exceeds {self._cap >> 20} MiB, what the "
                                  "cache can give one archive (a decompression bomb, or a layer bigger than "
                                  "the cache: raise --cache-size)")
        return int(self._out.write(data))

    def tell(self) -> int:
        return int(self._out.tell())


class Reader(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Member:
    kind: str  # FILE, DIR or SYMLINK
    mode: int  # permission bits
    size: int  # bytes of a file (0 otherwise)
    mtime: float
    offset: int = 0  # where a file's bytes start in the uncompressed tar
    target: str = ""  # a symlink's target, as stored
    uid: int = 0
    gid: int = 0
    implied: bool = False  # a directory the archive lacks but its members imply
    layer: int = 0  # in a merged index (an image's root filesystem): the layer it comes from


@dataclass
class ArchiveIndex:
    """The members of one archive by path (a tuple of components; () is the archive's root)."""

    entries: dict[tuple[str, ...], Member]
    children: dict[tuple[str, ...], list[str]]  # directory -> sorted names
    tar_size: int = 0

    def root_for(self, name: str) -> tuple[str, ...]:
        """What a packed directory called `name` shows: oras packs a directory's files under its
        name (`name/...`), so when the archive holds exactly one directory `name` at its root,
        that directory; otherwise the whole archive."""
        if self.children.get((), []) == [name] and self.entries[(name,)].kind == DIR:
            return (name,)
        return ()

    def to_json(self) -> bytes:
        rows = [["/".join(path), m.kind, m.mode, m.size, m.mtime, m.offset, m.target,
                 m.uid, m.gid, m.implied, m.layer]
                for path, m in self.entries.items() if path]
        root = self.entries[()]
        return json.dumps({"version": INDEX_VERSION, "tar_size": self.tar_size,
                           "root": [root.mode, root.mtime, root.uid, root.gid, root.implied],
                           "members": rows}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ArchiveIndex:
        doc = json.loads(data)
        if doc.get("version") != INDEX_VERSION:
            raise ValueError("index version")
        mode, mtime, uid, gid, implied = doc["root"]
        entries: dict[tuple[str, ...], Member] = {(): Member(DIR, mode, 0, mtime, uid=uid, gid=gid,
                                                             implied=implied)}
        for name, kind, mode, size, mtime, offset, target, uid, gid, implied, layer in doc["members"]:
            entries[tuple(name.split("/"))] = Member(kind, mode, size, mtime, offset, target, uid, gid,
                                                     implied, layer)
        return cls(entries, _children(entries), doc["tar_size"])


def _children(entries: dict[tuple[str, ...], Member]) -> dict[tuple[str, ...], list[str]]:
    children: dict[tuple[str, ...], list[str]] = {path: [] for path, m in entries.items() if m.kind == DIR}
    for path in entries:
        if path:
            children[path[:-1]].append(path[-1])
    for names in children.values():
        names.sort()
    return children


# ---- reading tar headers --------------------------------------------------------------------


def member_parts(name: str) -> tuple[str, ...] | None:
    """The path a member's name stands for, or None when it is unsafe (see the module's doc)."""
    if not name or name.startswith("/") or UNSAFE_CHARACTERS.search(name):
        return None
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    for part in parts:
        if part == "..":
            return None
        try:
            if len(part.encode("utf-8")) > NAME_MAX:
                return None
        except UnicodeEncodeError:  # undecodable bytes (surrogateescape)
            return None
    return parts


def index_tar(path: Path, *, default_mtime: float = 0.0) -> ArchiveIndex:
    """Index an uncompressed tar file by walking its headers."""
    entries: dict[tuple[str, ...], Member] = {(): Member(DIR, 0o755, 0, default_mtime, implied=True)}
    size = path.stat().st_size

    def skip(info: tarfile.TarInfo, why: str) -> None:
        log.info("%s: member %r not shown: %s", path.name, info.name, why)

    def place(parts: tuple[str, ...], member: Member, info: tarfile.TarInfo) -> None:
        for i in range(1, len(parts)):
            above = entries.get(parts[:i])
            if above is None:
                entries[parts[:i]] = Member(DIR, 0o755, 0, member.mtime, implied=True)
            elif above.kind != DIR:
                return skip(info, f"{'/'.join(parts[:i])} is not a directory")
        existing = entries.get(parts)
        if existing is not None and existing.kind == DIR and member.kind != DIR:
            return skip(info, "a directory of that name comes first")
        if existing is not None:
            log.info("%s: member %r appears again: the last one is shown", path.name, info.name)
        entries[parts] = member

    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                tar.members = []  # type: ignore[attr-defined]  # tarfile keeps every header otherwise
                parts = member_parts(info.name)
                if parts is None:
                    skip(info, "unsafe name")
                    continue
                mode, mtime = info.mode & 0o777, float(info.mtime)
                if not parts:
                    if info.isdir():
                        entries[()] = Member(DIR, mode, 0, mtime, uid=info.uid, gid=info.gid)
                    else:
                        skip(info, "names the archive's root")
                    continue
                if info.issparse():
                    skip(info, "sparse file")
                elif info.isreg():
                    place(parts, Member(FILE, mode, info.size, mtime, info.offset_data,
                                        uid=info.uid, gid=info.gid), info)
                elif info.isdir():
                    place(parts, Member(DIR, mode, 0, mtime, uid=info.uid, gid=info.gid), info)
                elif info.issym():
                    if "\0" in info.linkname or not info.linkname:
                        skip(info, "bad symlink target")
                    else:
                        place(parts, Member(SYMLINK, 0o777, len(info.linkname.encode("utf-8", "surrogateescape")),
                                            mtime, target=info.linkname, uid=info.uid, gid=info.gid), info)
                elif info.islnk():
                    target_parts = member_parts(info.linkname)
                    target = entries.get(target_parts) if target_parts else None
                    if target is None or target.kind != FILE:
                        skip(info, f"hard link to {info.linkname!r}, not a file shown before it")
                    else:
                        place(parts, Member(FILE, mode, target.size, mtime, target.offset,
                                            uid=info.uid, gid=info.gid), info)
                else:
                    skip(info, "device node, FIFO or other special file")
    except (tarfile.TarError, EOFError) as exc:
        raise ArchiveError(f"{path.name}: not a tar archive: {exc}") from exc
    return ArchiveIndex(entries, _children(entries), size)


def gunzip(read: Callable[[int, int], bytes], size: int, out: Any) -> None:
    """Decompress a gzip stream (maybe several members) of `size` bytes, read in pieces from
    offset 0 onwards, into the binary file `out`; memory stays bounded by PIECE."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    fed = False  # the current decompressor has had input
    offset = 0
    try:
        while offset < size:
            data = read(offset, min(PIECE, size - offset))
            if not data:
                raise ArchiveError(f"blob ended at {offset} of {size} bytes")
            offset += len(data)
            while data:
                fed = True
                out.write(decompressor.decompress(data, PIECE))
                data = decompressor.unconsumed_tail
                if decompressor.eof:  # the next gzip member, unless only padding is left
                    rest = decompressor.unused_data
                    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    fed = False
                    data = rest if rest.strip(b"\0") else b""
    except zlib.error as exc:
        raise ArchiveError(f"not gzip data: {exc}") from exc
    if offset == 0 or fed:
        raise ArchiveError("truncated or empty gzip data")


GZIP_MAGIC = b"\x1f\x8b"
ZSTD_FRAME = 0xFD2FB528  # b"\x28\xb5\x2f\xfd", little-endian
ZSTD_SKIPPABLE = 0x184D2A50  # skippable frames: 0x184D2A50 to 0x184D2A5F


def is_zstd(head: bytes) -> bool:
    """Whether a blob starting with these 4 bytes is zstd: a frame or a skippable frame."""
    magic = int.from_bytes(head[:4], "little") if len(head) >= 4 else 0
    return magic == ZSTD_FRAME or magic & ~0xF == ZSTD_SKIPPABLE


class ZstdFrames:
    """Follows the frames of a zstd stream (RFC 8878) through its headers alone, to tell whether
    the stream ends where a frame ends: libzstd's streaming API stops silently when its input
    ends inside a frame. Block contents are skipped, not decoded (libzstd does that)."""

    MAGIC, SKIP_SIZE, DESCRIPTOR, HEADER, BLOCK, CHECKSUM = range(6)

    def __init__(self) -> None:
        self._state = self.MAGIC
        self._need = 4  # bytes of the next header field to gather
        self._buf = bytearray()
        self._skip = 0  # bytes to pass over (a block's or a skippable frame's content)
        self._checksum = False
        self._offset = 0  # of the stream, for messages

    @property
    def at_frame_end(self) -> bool:
        return self._state == self.MAGIC and not self._buf and not self._skip

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            take = min(self._need - len(self._buf), end - pos)
            self._buf += data[pos:pos + take]
            pos += take
            if len(self._buf) == self._need:
                field = bytes(self._buf)
                self._buf.clear()
                self._next(field, self._offset + pos - len(field))
        self._offset += end

    def _next(self, field: bytes, at: int) -> None:
        value = int.from_bytes(field, "little")
        state, self._need = self._state, 4
        if state == self.MAGIC:
            if value == ZSTD_FRAME:
                self._state, self._need = self.DESCRIPTOR, 1
            elif value & ~0xF == ZSTD_SKIPPABLE:
                self._state = self.SKIP_SIZE
            else:
                raise ArchiveError(f"not zstd data: no frame starts at byte {at}")
        elif state == self.SKIP_SIZE:
            self._state, self._skip = self.MAGIC, value
        elif state == self.DESCRIPTOR:
            if value & 0x08:
                raise ArchiveError(f"bad zstd data: reserved bit set in the frame header at byte {at}")
            single_segment = bool(value & 0x20)
            self._checksum = bool(value & 0x04)
            content_size = (1 if single_segment else 0, 2, 4, 8)[value >> 6]
            self._state = self.HEADER
            self._need = (0 if single_segment else 1) + (0, 1, 2, 4)[value & 0x03] + content_size
        elif state in (self.HEADER, self.BLOCK):
            if state == self.BLOCK:
                kind, size = (value >> 1) & 0x03, value >> 3
                if kind == 3:
                    raise ArchiveError(f"bad zstd data: reserved block type at byte {at}")
                self._skip = 1 if kind == 1 else size  # an RLE block stores its byte once
                if value & 0x01:  # the frame's last block
                    self._state = self.CHECKSUM if self._checksum else self.MAGIC
                    return
            self._state, self._need = self.BLOCK, 3
        else:  # CHECKSUM
            self._state = self.MAGIC


class _ZstdSource:
    """The blob as a file for zstandard's reader, in pieces, its bytes followed by ZstdFrames."""

    def __init__(self, read: Callable[[int, int], bytes], size: int) -> None:
        self._read, self._size, self.offset = read, size, 0
        self.frames = ZstdFrames()

    def read(self, size: int = -1) -> bytes:
        if self.offset >= self._size:
            return b""
        data = self._read(self.offset, min(PIECE, self._size - self.offset))
        if not data:
            raise ArchiveError(f"blob ended at {self.offset} of {self._size} bytes")
        self.offset += len(data)
        self.frames.feed(data)
        return data


def unzstd(read: Callable[[int, int], bytes], size: int, out: Any) -> None:
    """Decompress a zstd stream (several frames, skippable frames among them, as zstd:chunked
    writes) of `size` bytes, read in pieces from offset 0 onwards, into the binary file `out`.
    The output is taken in pieces of PIECE too (a few KiB of frame can hold GiBs of zeros);
    libzstd's default limit on a frame's window (128 MiB) bounds what it holds."""
    source = _ZstdSource(read, size)
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(  # it only calls source.read()
            cast("IO[bytes]", source), read_size=PIECE, read_across_frames=True, closefd=False)
        while data := reader.read(PIECE):
            out.write(data)
    except zstandard.ZstdError as exc:
        raise ArchiveError(f"bad zstd data: {exc}") from exc
    if not source.frames.at_frame_end:
        raise ArchiveError(f"truncated zstd data: the blob ends inside a frame (at {size} bytes)")


def copy(read: Callable[[int, int], bytes], size: int, out: Any) -> None:
    """Copy an uncompressed tar blob into `out`, in pieces."""
    offset = 0
    while offset < size:
        data = read(offset, min(PIECE, size - offset))
        if not data:
            raise ArchiveError(f"blob ended at {offset} of {size} bytes")
        out.write(data)
        offset += len(data)


def unpack(read: Callable[[int, int], bytes], size: int, out: Any) -> None:
    """The tar a layer blob holds, into `out`: gzip and zstd are decompressed, an uncompressed
    tar copied (told apart by their first bytes, whatever the media type says)."""
    head = read(0, min(4, size)) if size else b""
    if head.startswith(GZIP_MAGIC):
        gunzip(read, size, out)
    elif is_zstd(head):
        unzstd(read, size, out)
    else:
        copy(read, size, out)  # tarfile says whether it is a tar


# ---- an image's root filesystem: layers merged --------------------------------------------

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def merge_layers(indexes: list[ArchiveIndex]) -> ArchiveIndex:
    """The root filesystem of an image whose layers (bottom first) have these indexes, as the
    OCI image spec applies them: in each layer, `.wh..wh..opq` hides what lower layers have in
    its directory, `.wh.<name>` deletes `<name>` of lower layers; then the layer's members are
    laid over (a non-directory replaces whatever was there, a directory keeps what lower
    layers put in it, and a directory the layer only implies keeps the lower one's attributes).
    Whiteout files themselves are not shown. Each member records its layer (`Member.layer`)."""
    entries: dict[tuple[str, ...], Member] = {(): Member(DIR, 0o755, 0, 0.0, implied=True)}
    children: dict[tuple[str, ...], set[str]] = {(): set()}

    def remove(path: tuple[str, ...]) -> None:
        if entries.pop(path, None) is None:
            return
        for name in children.pop(path, set()):
            remove((*path, name))
        if path:
            children.get(path[:-1], set()).discard(path[-1])

    def clear(path: tuple[str, ...]) -> None:
        for name in list(children.get(path, ())):
            remove((*path, name))

    for number, index in enumerate(indexes):
        for path in index.entries:  # deletions first: they only touch lower layers
            if not path or not path[-1].startswith(WHITEOUT):
                continue
            parent = path[:-1]
            if path[-1] == OPAQUE:
                clear(parent)
            else:
                remove((*parent, path[-1][len(WHITEOUT):]))
        for path in sorted(index.entries):  # parents before their members
            member = index.entries[path]
            if any(part.startswith(WHITEOUT) for part in path):
                continue
            existing = entries.get(path)
            if member.kind == DIR:
                if existing is not None and existing.kind == DIR:
                    if member.implied:
                        continue
                else:
                    remove(path)
                    children[path] = set()
            else:
                remove(path)
            if path:
                parent = path[:-1]
                if entries.get(parent) is None or entries[parent].kind != DIR:  # a lower file there
                    continue  # cannot happen: sorted() put the parent (a directory) first
                children[parent].add(path[-1])
            entries[path] = replace(member, layer=number)
    return ArchiveIndex(entries, _children(entries), 0)


# ---- the cache of indexes -------------------------------------------------------------------


class MemberReader:
    """An open member: preads from the archive's tar file. Same interface as a blob handle."""

    def __init__(self, tar_path: Path, member: Member) -> None:
        self._fd = os.open(tar_path, os.O_RDONLY | os.O_CLOEXEC)
        self._offset = member.offset
        self.size = member.size

    def read(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        return os.pread(self._fd, size, self._offset + offset) if size else b""

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class Archives:
    """Indexes of archive layers, built once per digest and kept in the store beside the blob."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._loaded: LRUCache[Digest, ArchiveIndex] = LRUCache(maxsize=64)
        self._mutex = threading.Lock()  # guards the two dicts; never held over I/O
        self._building: dict[Digest, threading.Lock] = {}
        self._too_large: LRUCache[Digest, ArchiveTooLarge] = LRUCache(maxsize=1024)  # not built again

    def cached(self, digest: Digest) -> ArchiveIndex | None:
        """The index when it is in memory or on disk, without building it."""
        with self._mutex:
            index = self._loaded.get(digest)
        if index is not None:
            return index
        return self._load(digest)

    def index(self, digest: Digest, open_blob: Callable[[], Reader], size: int) -> ArchiveIndex:
        """The index of the tar blob `digest` (`size` bytes; plain, gzip or zstd), built from
        `open_blob()` when neither memory nor the cache has it. ArchiveError when it is no such
        archive."""
        index = self.cached(digest)
        if index is not None:
            return index
        with self._mutex:
            refused = self._too_large.get(digest)
            lock = self._building.setdefault(digest, threading.Lock())
        if refused is not None:
            raise refused
        try:
            with lock:  # one build per digest at a time in this process
                index = self.cached(digest)
                if index is None:
                    index = self._build(digest, open_blob, size)
                    with self._mutex:
                        self._loaded[digest] = index
        except ArchiveTooLarge as exc:
            with self._mutex:
                self._too_large[digest] = exc
            raise
        finally:
            with self._mutex:
                self._building.pop(digest, None)
        return index

    def _cap(self) -> int:
        """How big one archive's uncompressed tar may grow: a share of the cache's bound, and
        what its disk has free beyond a reserve."""
        cap = 1 << 62
        if self.store.max_bytes is not None:
            cap = int(self.store.max_bytes * MAX_CACHE_SHARE)
        try:
            disk = os.statvfs(self.store.temporary_dir())
            cap = min(cap, disk.f_bavail * disk.f_frsize - DISK_RESERVE)
        except OSError:
            pass
        return max(0, cap)

    def open_member(self, digest: Digest, member: Member) -> MemberReader:
        self.store.touch(digest)
        try:
            return MemberReader(self.store.derived_path(digest, TAR_SUFFIX), member)
        except FileNotFoundError:  # evicted since it was indexed: index it again on next use
            with self._mutex:
                self._loaded.pop(digest, None)
            raise ArchiveError(f"{digest}: its archive left the cache; try again") from None

    def _load(self, digest: Digest) -> ArchiveIndex | None:
        index_path = self.store.derived_path(digest, INDEX_SUFFIX)
        tar_path = self.store.derived_path(digest, TAR_SUFFIX)
        try:
            index = ArchiveIndex.from_json(index_path.read_bytes())
            if tar_path.stat().st_size != index.tar_size:
                raise ValueError("tar file size")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: archive index unusable (%s): building it again", digest, exc)
            return None
        self.store.touch(digest)
        with self._mutex:
            self._loaded[digest] = index
        return index

    def _build(self, digest: Digest, open_blob: Callable[[], Reader], size: int) -> ArchiveIndex:
        tmp_dir = self.store.temporary_dir()
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="archive-", suffix=TAR_SUFFIX)
        tar_tmp = Path(name)
        index_tmp: Path | None = None
        try:
            handle = open_blob()
            try:
                with os.fdopen(fd, "wb") as tar_file:
                    out = _CappedFile(tar_file, self._cap(), str(digest))
                    unpack(handle.read, size, out)
                    # Some writers (umoci 0.4 `insert`) end a layer without padding or the two
                    # zero blocks: pad it as `tar -x` tolerates; zeros after a tar's end are ignored.
                    out.write(b"\0" * (-out.tell() % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE))
            finally:
                handle.close()
            index = index_tar(tar_tmp)
            fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="archive-", suffix=INDEX_SUFFIX)
            index_tmp = Path(name)
            with os.fdopen(fd, "wb") as index_file:
                index_file.write(index.to_json())
            # The tar first: an index on disk always has its tar beside it.
            self.store.add_derived(digest, TAR_SUFFIX, tar_tmp)
            self.store.add_derived(digest, INDEX_SUFFIX, index_tmp)
            log.info("%s: indexed %d archive members", digest, len(index.entries) - 1)
            return index
        finally:
            for leftover in (tar_tmp, index_tmp):
                if leftover is not None:
                    try:
                        os.unlink(leftover)
                    except FileNotFoundError:
                        pass
