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
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy would load libfuse 2 first

import mfusepy as fuse  # noqa: E402

from .errors import OcifsError  # noqa: E402
from .tree import BlobFile, BytesFile, Tree, inode_number  # noqa: E402

log = logging.getLogger(__name__)

# Readers are told to ask for big blocks (cp, cat and friends size their buffers by it).
BLOCK_SIZE = 1 << 20
XATTR_PREFIX = "user.oci."
ENODATA = getattr(errno, "ENODATA", 61)

F = TypeVar("F", bound=Callable[..., Any])


def _errors(method: F) -> F:
    """Map whatever an operation raises to a real errno, and log what was unexpected."""

    @functools.wraps(method)
    def wrapper(self: Operations, *args: Any) -> Any:
        try:
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
        tree: Tree,
        *,
        read_only: bool,
        on_ready: Callable[[], None] | None = None,
        on_destroy: Callable[[], None] | None = None,
    ) -> None:
        self._tree = tree
        self._read_only = read_only
        self._on_ready = on_ready
        self._on_destroy = on_destroy
        self._ready = False
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._handles: dict[int, Any] = {}
        self._handle_ids = itertools.count(1)
        self._handles_mutex = threading.Lock()
        self._opened: dict[str, Any] = {}  # path -> digest at its last open (for keep_cache)

    # ---- lifecycle -----------------------------------------------------------------------

    def init(self, path: str) -> None:
        self._ready = True
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path: str) -> None:
        with self._handles_mutex:
            handles = [handle for handle, _ in self._handles.values()]
            self._handles.clear()
        for handle in handles:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - shutting down: log and go on
                log.exception("closing a handle at unmount")
        if self._on_destroy is not None:
            self._on_destroy()

    # ---- attributes ----------------------------------------------------------------------

    def _mode(self, is_dir: bool) -> int:
        if is_dir:
            return stat.S_IFDIR | (0o555 if self._read_only else 0o755)
        return stat.S_IFREG | (0o444 if self._read_only else 0o644)

    def _stat(self, node: Any) -> dict[str, int]:
        is_dir = not isinstance(node, (BlobFile, BytesFile))
        size = self._tree.size(node)
        mtime = int(self._tree.mtime(node) * 1e9)
        return {
            "st_mode": self._mode(is_dir),
            "st_nlink": 2 if is_dir else 1,
            "st_size": size,
            "st_uid": self._uid,
            "st_gid": self._gid,
            "st_atime": mtime,
            "st_mtime": mtime,
            "st_ctime": mtime,
            "st_ino": self._tree.inode(node),
            "st_blksize": BLOCK_SIZE,
            "st_blocks": (size + 511) // 512,
        }

    @_errors
    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        if path == "/":
            # Answered without the network: `stat`, `df` and the kernel ask for it a lot.
            started = int(self._tree.started * 1e9)
            return {"st_mode": self._mode(True), "st_nlink": 2, "st_uid": self._uid,
                    "st_gid": self._gid, "st_atime": started, "st_mtime": started,
                    "st_ctime": started, "st_ino": 1, "st_blksize": BLOCK_SIZE}
        return self._stat(self._tree.lookup(path))

    @_errors
    def readdir(self, path: str, fh: Any) -> Iterator[tuple[str, dict[str, int], int]]:
        node = self._tree.lookup(path)
        if isinstance(node, (BlobFile, BytesFile)):
            raise fuse.FuseOSError(errno.ENOTDIR)
        # With use_ino an entry needs its inode: readdir(3) skips entries whose d_ino is 0.
        directory = {"st_mode": self._mode(True), "st_ino": self._tree.inode(node)}
        entries = [(".", directory, 0), ("..", directory, 0)]
        prefix = node.path + "/" if node.path else ""
        for entry in self._tree.children(node):
            attrs = {"st_mode": self._mode(entry.is_dir),
                     "st_ino": inode_number(prefix + entry.name, entry.digest)}
            entries.append((entry.name, attrs, 0))
        return iter(entries)

    @_errors
    def statfs(self, path: str) -> dict[str, int]:
        # From the cache's file system, without the network.
        try:
            vfs = os.statvfs(self._tree.store.root)
            free, total, unit = vfs.f_bavail, vfs.f_blocks, vfs.f_frsize
        except OSError:
            free, total, unit = 0, 0, 4096
        return {"f_bsize": BLOCK_SIZE, "f_frsize": unit, "f_blocks": total, "f_bfree": free,
                "f_bavail": free, "f_files": 0, "f_ffree": 0, "f_namemax": 255}

    @_errors
    def access(self, path: str, amode: int) -> int:
        if amode & os.W_OK and self._read_only:
            raise fuse.FuseOSError(errno.EROFS)
        if path != "/":
            self._tree.lookup(path)
        return 0

    # ---- extended attributes -------------------------------------------------------------

    @_errors
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if not name.startswith(XATTR_PREFIX):
            # security.capability, system.posix_acl_*: answered at once, no lookup.
            raise fuse.FuseOSError(ENODATA)
        node = self._tree.lookup(path) if path != "/" else self._tree.root()
        value = self._tree.xattrs(node).get(name)
        if value is None:
            raise fuse.FuseOSError(ENODATA)
        return value

    @_errors
    def listxattr(self, path: str) -> list[str]:
        node = self._tree.lookup(path) if path != "/" else self._tree.root()
        return sorted(self._tree.xattrs(node))

    @_errors
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        if not name.startswith(XATTR_PREFIX):
            raise fuse.FuseOSError(errno.ENOTSUP)
        raise fuse.FuseOSError(errno.EROFS if self._read_only else errno.ENOTSUP)

    @_errors
    def removexattr(self, path: str, name: str) -> int:
        if not name.startswith(XATTR_PREFIX):
            raise fuse.FuseOSError(errno.ENOTSUP)
        raise fuse.FuseOSError(errno.EROFS if self._read_only else errno.ENOTSUP)

    # ---- files ---------------------------------------------------------------------------

    @_errors
    def open(self, path: str, fi: Any) -> int:
        if fi.flags & os.O_ACCMODE != os.O_RDONLY or fi.flags & os.O_TRUNC:
            raise fuse.FuseOSError(errno.EROFS)
        node = self._tree.lookup(path)
        if not isinstance(node, (BlobFile, BytesFile)):
            raise fuse.FuseOSError(errno.EISDIR)
        digest = self._tree.digest_of(node)
        handle = self._tree.open(node)
        with self._handles_mutex:
            fh = next(self._handle_ids)
            self._handles[fh] = (handle, path)
            # The kernel caches pages by path: keep them only while the path names the
            # same bytes as at its previous open.
            fi.keep_cache = 1 if self._opened.get(path) == digest else 0
            self._opened[path] = digest
        fi.fh = fh
        return 0

    @_errors
    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        with self._handles_mutex:
            entry = self._handles.get(fi.fh)
        if entry is None:
            raise fuse.FuseOSError(errno.EBADF)
        handle, opened_path = entry
        try:
            return handle.read(offset, size)  # type: ignore[no-any-return]
        except BaseException:
            # Pages the kernel cached from this handle may be bad: the next open drops them.
            with self._handles_mutex:
                self._opened.pop(opened_path, None)
            raise

    @_errors
    def release(self, path: str | None, fi: Any) -> int:
        with self._handles_mutex:
            entry = self._handles.pop(fi.fh, None)
        if entry is not None:
            entry[0].close()
        return 0

    @_errors
    def flush(self, path: str | None, fi: Any) -> int:
        return 0

    # ---- writes (refused until the write path lands) -------------------------------------

    def _refuse(self, *args: Any) -> int:
        raise fuse.FuseOSError(errno.EROFS)

    @_errors
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        return self._refuse()

    @_errors
    def mkdir(self, path: str, mode: int) -> int:
        return self._refuse()

    @_errors
    def unlink(self, path: str) -> int:
        return self._refuse()

    @_errors
    def rmdir(self, path: str) -> int:
        return self._refuse()

    @_errors
    def rename(self, old: str, new: str) -> int:
        return self._refuse()

    @_errors
    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        return self._refuse()

    @_errors
    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        return self._refuse()

    @_errors
    def chmod(self, path: str, mode: int) -> int:
        return self._refuse()

    @_errors
    def chown(self, path: str, uid: int, gid: int) -> int:
        return self._refuse()

    @_errors
    def utimens(self, path: str, times: Any = None) -> int:
        return self._refuse()

    @_errors
    def symlink(self, target: str, source: str) -> int:
        return self._refuse()

    @_errors
    def link(self, target: str, source: str) -> int:
        return self._refuse()

    @_errors
    def mknod(self, path: str, mode: int, dev: int) -> int:
        return self._refuse()


def run(
    operations: Operations,
    mountpoint: str,
    *,
    fsname: str,
    read_only: bool,
    allow_other: bool,
    extra_options: dict[str, Any],
    debug: bool = False,
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
        options["default_permissions"] = True
    options.update(extra_options)
    fuse.FUSE(operations, mountpoint, foreground=True, nothreads=False, raw_fi=True,
              debug=debug, **options)
