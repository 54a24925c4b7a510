"""The FUSE adapter: the only module that imports the FUSE binding.

Every operation goes through `_errors`, which turns ocifs errors into their errno (never
an accidental EINVAL). One open object per file handle; reads work from the handle, never
from the path. No lock is held over network I/O: the handle table's mutex guards a dict.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy would load libfuse 2 first

import mfusepy as fuse

from . import deadline
from .errors import NotFound, OcifsError
from .layout import inode_number
from .view import Attributes, Opened, View

log = logging.getLogger(__name__)

# Operations that finish within `--timeout` (plus a margin), however the registry behaves.
# Writes are not bounded so: a push or a download for writing takes what the data takes.
BOUNDED = frozenset({"getattr", "readdir", "read", "readlink", "getxattr", "listxattr", "access", "statfs"})
# Readers are told to ask for big blocks (cp, cat and friends size their buffers by it).
BLOCK_SIZE = 1 << 20
XATTR_PREFIX = "user.oci."  # what can be set
# What can be read: also a GGUF model file's header fields (ocifs.gguf.XATTR_PREFIX).
READABLE_XATTR_PREFIXES = (XATTR_PREFIX, "user.gguf.")
ENODATA = getattr(errno, "ENODATA", 61)

F = TypeVar("F", bound=Callable[..., Any])


def _errors(method: F) -> F:
    """Map whatever an operation raises to a real errno, and log what was unexpected."""

    @functools.wraps(method)
    def wrapper(self: Operations, *args: Any) -> Any:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s", method.__name__, args[0] if args else "")
        bound = self._operation_timeout if method.__name__ in BOUNDED else None
        try:
            with deadline.limit(bound):
                return method(self, *args)
        except fuse.FuseOSError:
            raise
        except OcifsError as exc:
            level = logging.DEBUG if exc.errno == errno.ENOENT else logging.WARNING
            log.log(level, "%s %s: %s", method.__name__, args[0] if args else "", exc)
            raise fuse.FuseOSError(exc.errno) from None
        except OSError as exc:
            code = exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else errno.EIO
            log.warning("%s %s: %s", method.__name__, args[0] if args else "", exc)
            raise fuse.FuseOSError(code) from None
        except Exception:
            log.exception("%s %s failed unexpectedly", method.__name__, args[0] if args else "")
            raise fuse.FuseOSError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class Operations(fuse.Operations):  # type: ignore[misc]
    """ocifs as FUSE operations. Attribute names start with `_`: mfusepy registers any
    attribute named like a FUSE operation as one."""

    use_ns = True

    def __init__(
        self,
        view: View,
        *,
        on_ready: Callable[[], None] | None = None,
        on_destroy: Callable[[], None] | None = None,
        operation_timeout: float | None = None,
    ) -> None:
        self._view = view
        self._operation_timeout = operation_timeout
        self._read_only = view.writer is None
        self._started = view.tree.started
        self._cache_root = view.tree.store.root
        self._on_ready = on_ready
        self._on_destroy = on_destroy
        self._ready = False
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._handles: dict[int, Any] = {}
        self._handle_ids = itertools.count(1)
        self._handles_mutex = threading.Lock()
        self._opened: dict[str, Any] = {}  # path -> digest whose pages the kernel may cache
        self._open_digests: dict[str, Counter[Any]] = {}  # path -> open handles per digest

    # ---- lifecycle -----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether init() has run: the mount is live."""
        return self._ready

    def init(self, path: str) -> None:
        self._ready = True
        if self._on_ready is not None:
            self._on_ready()
        self._view.start()

    def destroy(self, path: str) -> None:
        try:
            self._view.stop()
        finally:
            self._close_all()

    def _close_all(self) -> None:
        with self._handles_mutex:
            handles = [entry[0] for entry in self._handles.values()]
            self._handles.clear()
        for handle in handles:
            try:
                handle.close()
            except Exception:
                log.exception("closing a handle at unmount")
        if self._on_destroy is not None:
            self._on_destroy()

    # ---- attributes ----------------------------------------------------------------------

    def _mode(self, is_dir: bool) -> int:
        if is_dir:
            return stat.S_IFDIR | (0o555 if self._read_only else 0o755)
        return stat.S_IFREG | (0o444 if self._read_only else 0o644)

    def _stat(self, attributes: Attributes) -> dict[str, int]:
        ns = int(attributes.mtime * 1e9)
        # Inside packed directories: the tar headers' modes, never writable.
        mode = self._mode(attributes.is_dir) if attributes.mode is None else attributes.mode & ~0o222
        uid, gid = (self._uid, self._gid) if attributes.owner is None else attributes.owner
        return {
            "st_mode": mode,
            "st_nlink": 2 if attributes.is_dir else 1,
            "st_size": attributes.size,
            "st_uid": uid,
            "st_gid": gid,
            "st_atime": ns,
            "st_mtime": ns,
            "st_ctime": ns,
            "st_ino": attributes.inode,
            "st_blksize": BLOCK_SIZE,
            "st_blocks": (attributes.size + 511) // 512,
        }

    @_errors
    def getattr(self, path: str | None, fh: Any = None) -> dict[str, int]:
        if path is None:
            # A file removed while open (hard_remove): answer from its handle.
            return self._handle_stat(fh)
        if path == "/":
            # Answered without the network: `stat`, `df` and the kernel ask for it a lot.
            return self._stat(Attributes(True, 0, self._started, 1))
        return self._stat(self._view.attributes(path))

    def _handle_stat(self, fi: Any) -> dict[str, int]:
        if fi is None:
            raise fuse.FuseOSError(errno.ESTALE)
        handle, opened_path = self._entry(fi)
        return self._stat(self._view.handle_attributes(handle, opened_path))

    @_errors
    def readdir(self, path: str, fh: Any) -> Iterator[tuple[str, dict[str, int], int]]:
        try:
            listed = self._view.children(path)
        except NotFound:
            if path == "/":
                # The pinned tag went away. ENOENT from getdents would read as an empty
                # directory to readdir(3).
                raise fuse.FuseOSError(errno.ESTALE) from None
            raise
        # With use_ino an entry needs its inode: readdir(3) skips entries whose d_ino is 0.
        directory = {"st_mode": self._mode(True), "st_ino": 1 if path == "/" else inode_number(path.strip("/"), None)}
        listing = [(".", directory, 0), ("..", directory, 0)]
        for entry in listed:
            mode = self._mode(entry.is_dir) if entry.mode is None else entry.mode & ~0o222
            listing.append((entry.name, {"st_mode": mode, "st_ino": entry.inode}, 0))
        return iter(listing)

    @_errors
    def readlink(self, path: str) -> str:
        # Symbolic links inside packed directories: their target as stored, never resolved here.
        return self._view.readlink(path)

    @_errors
    def statfs(self, path: str) -> dict[str, int]:
        # From the cache's file system, without the network.
        try:
            vfs = os.statvfs(self._cache_root)
            free, total, unit = vfs.f_bavail, vfs.f_blocks, vfs.f_frsize
        except OSError:
            free, total, unit = 0, 0, 4096
        return {"f_bsize": BLOCK_SIZE, "f_frsize": unit, "f_blocks": total, "f_bfree": free,
                "f_bavail": free, "f_files": 0, "f_ffree": 0, "f_namemax": 255}

    @_errors
    def access(self, path: str, amode: int) -> int:
        if amode & os.W_OK and self._read_only:
            raise fuse.FuseOSError(errno.EROFS)
        mode = self.getattr(path)["st_mode"]
        if amode & os.X_OK and not mode & 0o111:
            raise fuse.FuseOSError(errno.EACCES)  # files are never executable here
        return 0

    # ---- extended attributes -------------------------------------------------------------

    @_errors
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if not name.startswith(READABLE_XATTR_PREFIXES):
            # security.capability, system.posix_acl_*: answered at once, no lookup.
            raise fuse.FuseOSError(ENODATA)
        value = self._view.xattr(path, name)
        if value is None:
            raise fuse.FuseOSError(ENODATA)
        return value

    @_errors
    def listxattr(self, path: str) -> list[str]:
        return self._view.xattr_names(path)

    @_errors
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        if not name.startswith(XATTR_PREFIX):
            raise fuse.FuseOSError(errno.ENOTSUP)
        self._writable()
        try:
            text = value.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise fuse.FuseOSError(errno.EINVAL) from None
        if not text or len(text) > 255 or any(c.isspace() for c in text):
            raise fuse.FuseOSError(errno.EINVAL)
        self._view.set_xattr(path, name, text)
        return 0

    @_errors
    def removexattr(self, path: str, name: str) -> int:
        if not name.startswith(XATTR_PREFIX):
            raise fuse.FuseOSError(errno.ENOTSUP)
        raise fuse.FuseOSError(errno.EROFS if self._read_only else errno.ENOTSUP)

    # ---- files ---------------------------------------------------------------------------

    def _writable(self) -> None:
        if self._read_only:
            raise fuse.FuseOSError(errno.EROFS)

    def _add_handle(self, opened: Opened, path: str, fi: Any) -> None:
        """Register a handle and choose how the kernel may cache its pages.

        The kernel caches pages by path, not by digest: keep them only while the path names
        the same bytes as at its previous open. While handles on other bytes of the same path
        are still open (the tag moved under a reader), this one bypasses the page cache, so
        neither reader is served the other's bytes."""
        handle, digest = opened.handle, opened.digest
        with self._handles_mutex:
            fh = next(self._handle_ids)
            self._handles[fh] = (handle, path, digest)
            counts = self._open_digests.setdefault(path, Counter())
            if opened.direct or any(n and d != digest for d, n in counts.items()):
                fi.direct_io = 1
                fi.keep_cache = 0
            else:
                fi.keep_cache = 1 if digest is not None and self._opened.get(path) == digest else 0
                self._opened[path] = digest
            counts[digest] += 1
        fi.fh = fh

    @_errors
    def open(self, path: str, fi: Any) -> int:
        truncate = bool(fi.flags & os.O_TRUNC)
        writing = fi.flags & os.O_ACCMODE != os.O_RDONLY or truncate
        if writing:
            self._writable()
        # Opening for reading is bounded like a read; opening for writing may download the file.
        with deadline.limit(None if writing else self._operation_timeout):
            opened = self._view.open(path, write=bool(writing), truncate=truncate)
        self._add_handle(opened, path, fi)
        return 0

    @_errors
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        self._writable()
        truncate = bool(fi.flags & os.O_TRUNC) if fi is not None else False
        self._add_handle(self._view.create(path, truncate=truncate), path, fi)
        return 0

    def _entry(self, fi: Any) -> tuple[Any, str]:
        """(handle, path at open) of a file handle."""
        with self._handles_mutex:
            entry = self._handles.get(fi.fh)
        if entry is None:
            raise fuse.FuseOSError(errno.EBADF)
        return entry[0], entry[1]

    @_errors
    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        handle, opened_path = self._entry(fi)
        try:
            return handle.read(offset, size)  # type: ignore[no-any-return]
        except BaseException as exc:
            # Pages the kernel cached from this handle may be bad: the next open drops them.
            with self._handles_mutex:
                self._opened.pop(opened_path, None)
            if isinstance(exc, NotFound):
                # The file exists (ls shows it): a blob the registry lost is an I/O error.
                raise fuse.FuseOSError(errno.EIO) from None
            raise

    @_errors
    def release(self, path: str | None, fi: Any) -> int:
        with self._handles_mutex:
            entry = self._handles.pop(fi.fh, None)
            if entry is not None:
                counts = self._open_digests.get(entry[1])
                if counts is not None:
                    counts[entry[2]] -= 1
                    if counts[entry[2]] <= 0:
                        del counts[entry[2]]
                    if not counts:
                        del self._open_digests[entry[1]]
        if entry is not None:
            entry[0].close()
        return 0

    @_errors
    def flush(self, path: str | None, fi: Any) -> int:
        handle, _ = self._entry(fi)
        flush = getattr(handle, "flush", None)
        if flush is not None:
            flush()  # pushes a changed file; its failure is close()'s failure
        return 0

    @_errors
    def fsync(self, path: str | None, datasync: int, fi: Any) -> int:
        handle, _ = self._entry(fi)
        fsync = getattr(handle, "fsync", None)
        if fsync is not None:
            fsync()
        return 0

    # ---- writes --------------------------------------------------------------------------

    @_errors
    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        handle, _ = self._entry(fi)
        if not hasattr(handle, "write"):
            raise fuse.FuseOSError(errno.EBADF)
        return handle.write(data, offset)  # type: ignore[no-any-return]

    @_errors
    def truncate(self, path: str | None, length: int, fh: Any = None) -> int:
        self._writable()
        if fh is not None:  # ftruncate: from the handle, whatever the path is now
            handle, _ = self._entry(fh)
            if not hasattr(handle, "truncate"):
                raise fuse.FuseOSError(errno.EBADF)
            handle.truncate(length)
            return 0
        if path is None:
            raise fuse.FuseOSError(errno.EBADF)
        self._view.truncate(path, length)
        return 0

    @_errors
    def mkdir(self, path: str, mode: int) -> int:
        self._writable()
        self._view.mkdir(path)
        return 0

    @_errors
    def unlink(self, path: str) -> int:
        self._writable()
        self._view.unlink(path)
        with self._handles_mutex:
            self._opened.pop(path, None)
        return 0

    @_errors
    def rmdir(self, path: str) -> int:
        self._writable()
        self._view.rmdir(path)
        return 0

    @_errors
    def rename(self, old: str, new: str) -> int:
        self._writable()
        self._view.rename(old, new)
        with self._handles_mutex:
            self._opened.pop(old, None)
            self._opened.pop(new, None)
        return 0

    # chmod, chown and utimens succeed so that `cp -p` and `cp -a` work; the registry has
    # no place for modes, owners or times.
    @_errors
    def chmod(self, path: str | None, mode: int) -> int:
        self._writable()
        return 0

    @_errors
    def chown(self, path: str | None, uid: int, gid: int) -> int:
        self._writable()
        return 0

    @_errors
    def utimens(self, path: str | None, times: Any = None) -> int:
        self._writable()
        return 0

    @_errors
    def symlink(self, target: str, source: str) -> int:
        self._writable()
        raise fuse.FuseOSError(errno.EPERM)

    @_errors
    def link(self, target: str, source: str) -> int:
        self._writable()
        raise fuse.FuseOSError(errno.EPERM)

    @_errors
    def mknod(self, path: str, mode: int, dev: int) -> int:
        self._writable()
        raise fuse.FuseOSError(errno.EPERM)


class _FUSE(fuse.FUSE):  # type: ignore[misc]
    """mfusepy drops rename(2)'s flags on libfuse 3: RENAME_EXCHANGE would silently
    overwrite and RENAME_NOREPLACE would replace. Refuse both instead."""

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        if flags:
            return -errno.EINVAL
        return super().rename_fuse_3(old, new, flags)  # type: ignore[no-any-return]

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        # mfusepy drops the handle of ftruncate(2); a file removed while open needs it.
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        handle = fip.contents if fip else None
        return self.operations.truncate(decoded, length, handle)  # type: ignore[no-any-return]


def run(
    operations: Operations,
    mountpoint: str,
    *,
    fsname: str,
    read_only: bool,
    allow_other: bool,
    extra_options: dict[str, Any],
) -> None:
    """Mount and serve until unmounted (blocks). A RuntimeError after SIGTERM/SIGINT is
    libfuse reporting the interrupted loop: a clean exit."""
    options: dict[str, Any] = {
        "fsname": fsname,
        "subtype": "ocifs",
        "max_idle_threads": 16,
        "use_ino": True,
        "hard_remove": True,
    }
    if read_only:
        options["ro"] = True
    if allow_other:
        options["allow_other"] = True
    options.update(extra_options)
    if options.get("allow_other"):
        # Other users must not act with the mounting user's rights: the modes shown are enforced.
        options["default_permissions"] = True
    _FUSE(operations, mountpoint, foreground=True, nothreads=False, raw_fi=True, **options)
