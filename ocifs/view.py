"""The one place where this mount's overlay meets the registry tree.

One precedence rule, used by every operation:
  1. `.ocifs/` at the mount root is the mount's own (its `status` file);
  2. a staged file at a path hides whatever the registry has there (its bytes are newer);
  3. then the registry's node, except that a directory made here wins over a bare registry
     path (a `PrefixDir`) that is not known to be a repository yet;
  4. then a directory made here with mkdir;
  5. a repository removed here that the registry still lists with no tags is hidden.
fs.py asks only this module: it maps errors to errnos and builds stat results.
"""

from __future__ import annotations

import errno
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import NotADirectory, NotFound, Refused
from .layout import (
    CONTROL_DIR,
    BlobFile,
    BytesFile,
    Dir,
    File,
    ManifestDir,
    PrefixDir,
    ReferrersDir,
    TitleDir,
    inode_number,
    split_path,
)
from .tree import ArchiveDir, ArchiveFile, BytesReader, Tree
from .write import LocalDir, Parent, StagedFile, WriteHandle, Writer

STATUS_FILE = "status"


@dataclass(frozen=True)
class ControlNode:
    """`.ocifs/` and the files in it."""

    path: str
    name: str | None = None  # None: the directory


Node = Dir | File | StagedFile | LocalDir | ControlNode | ArchiveDir | ArchiveFile
LOCAL_NODES = (StagedFile, LocalDir, ControlNode)  # this mount's own, not the registry's


@dataclass(frozen=True)
class Attributes:
    is_dir: bool
    size: int
    mtime: float
    inode: int
    mode: int | None = None  # file type and permission bits where not the mount's own (archives)
    owner: tuple[int, int] | None = None  # uid and gid where not the mount's user (image layers)


@dataclass(frozen=True)
class Listed:
    name: str
    is_dir: bool
    inode: int
    mode: int | None = None


@dataclass(frozen=True)
class Opened:
    handle: Any
    digest: Any  # what the kernel may cache the pages of; None for local files
    direct: bool = False  # bypass the page cache (content generated at open)


class View:
    def __init__(self, tree: Tree, writer: Writer | None,
                 status: Callable[[], dict[str, Any]] = dict) -> None:
        self.tree = tree
        self.writer = writer
        self._status = status

    # ---- resolving --------------------------------------------------------------------------

    def lookup(self, path: str) -> Node:
        path = path.strip("/")
        if path == CONTROL_DIR or path.startswith(CONTROL_DIR + "/"):
            return self._control(path)
        writer = self.writer
        if writer is None:
            return self.tree.lookup(path) if path else self.tree.root()
        staged = writer.overlay.file(path)
        if staged is not None:
            return staged
        local = writer.overlay.dir(path)
        if local is None and writer.overlay.renamed_away(path):
            raise NotFound(f"{path}: renamed")
        try:
            node = self.tree.lookup(path) if path else self.tree.root()
        except NotFound:
            local = local or writer.overlay.implied_dir(path)
            if local is not None:
                return local
            raise
        if local is not None and isinstance(node, PrefixDir) and \
                (local.kind != "path" or not self.tree.metadata.is_repository(node.prefix)):
            return local  # the registry has only a bare path there: what was made here says more
        if local is None and self._hidden(path):
            raise NotFound(f"{path}: removed")
        if writer.hidden_in_referrer(path):
            raise NotFound(f"{path}: removed")
        return node

    def _control(self, path: str) -> ControlNode:
        if path == CONTROL_DIR:
            return ControlNode(path)
        if path == f"{CONTROL_DIR}/{STATUS_FILE}":
            return ControlNode(path, STATUS_FILE)
        raise NotFound(f"{path}: no such file")

    def _hidden(self, path: str) -> bool:
        """Whether `path` lies in a repository removed here that still has no tags."""
        assert self.writer is not None
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if self.writer.overlay.is_removed(prefix):
                repository = self._prefix_of(prefix)
                if repository is None:
                    return True
                tags = self.tree.metadata.tags(repository)
                if tags is not None and not tags:
                    return True
                self.writer.overlay.unmark_removed(prefix)  # tags came back
        return False

    def _prefix_of(self, path: str) -> str | None:
        root = self.tree.source.path
        if self.tree.source.is_pinned:
            return None
        return f"{root}/{path}" if root else path

    def parent(self, path: str) -> Parent:
        """The directory something is made in: a registry directory or a local one."""
        parent_path = split_path(path)[0]
        node = self.lookup(parent_path)
        if isinstance(node, ControlNode):
            raise Refused(f"{path}: the mount's own directory", errno.EPERM)
        if isinstance(node, (ArchiveDir, ArchiveFile)):
            raise _in_archive(path)
        if isinstance(node, (PrefixDir, ManifestDir, TitleDir, ReferrersDir, LocalDir)):
            return node
        raise NotADirectory(f"{parent_path}: not a directory")

    def start(self) -> None:
        """The mount is live: push what a stopped daemon left staged, off the FUSE threads."""
        writer = self.writer
        if writer is not None and any(staged.pending for staged in writer.overlay.files()):
            threading.Thread(target=writer.push_pending, name="ocifs-recover", daemon=True).start()

    def stop(self) -> None:
        """Unmounting: push what is still owed (best effort); background fetches stop."""
        try:
            if self.writer is not None:
                self.writer.shutdown()
        finally:
            self.tree.close()
            self.tree.metadata.close()

    # ---- attributes ------------------------------------------------------------------------

    def handle_attributes(self, handle: Any, path: str) -> Attributes:
        """Attributes of an open file whose path is gone (removed while open)."""
        path = path.strip("/")
        if isinstance(handle, WriteHandle):
            return self.attributes_of(path, handle.staged)
        size = getattr(handle, "size", None)
        if size is None:
            size = len(handle.read(0, 1 << 30))
        return Attributes(False, size, self.tree.started, inode_number(path, None))

    def attributes(self, path: str) -> Attributes:
        path = path.strip("/")
        node = self.lookup(path)
        return self.attributes_of(path, node)

    def attributes_of(self, path: str, node: Node) -> Attributes:
        if isinstance(node, StagedFile):
            return Attributes(False, node.size, node.mtime, inode_number(path, None))
        if isinstance(node, LocalDir):
            return Attributes(True, 0, self.tree.started, inode_number(path, None))
        if isinstance(node, ControlNode):
            size = len(self._status_bytes()) if node.name else 0
            return Attributes(node.name is None, size, self.tree.started, inode_number(path, None))
        is_dir = isinstance(node, (PrefixDir, ManifestDir, TitleDir, ReferrersDir, ArchiveDir))
        return Attributes(is_dir, self.tree.size(node), self.tree.mtime(node), self.tree.inode(node),
                          self.tree.mode(node), self.tree.owner(node))

    def readlink(self, path: str) -> str:
        node = self.lookup(path.strip("/"))
        target = self.tree.readlink(node) if isinstance(node, ArchiveFile) else None
        if target is None:
            raise Refused(f"{path}: not a symbolic link", errno.EINVAL)
        return target

    def children(self, path: str) -> list[Listed]:
        """What directory `path` lists: registry entries, overlaid by this mount's."""
        path = path.strip("/")
        node = self.lookup(path)
        if isinstance(node, (BlobFile, BytesFile, StagedFile, ArchiveFile)):
            raise NotADirectory(f"{path}: not a directory")
        prefix = f"{path}/" if path else ""
        listed: dict[str, Listed] = {}
        if isinstance(node, ControlNode):
            return [Listed(STATUS_FILE, False, inode_number(prefix + STATUS_FILE, None))]
        registry: Node | None = node
        if isinstance(node, LocalDir):
            try:  # a directory made here over a registry path that has gained entries since
                registry = self.tree.lookup(path)
            except (NotFound, NotADirectory):
                registry = None
        if isinstance(registry, (PrefixDir, ManifestDir, TitleDir, ReferrersDir, ArchiveDir)):
            for entry in self.tree.children(registry):
                listed[entry.name] = Listed(entry.name, entry.is_dir, inode_number(prefix + entry.name, entry.digest),
                                            entry.mode)
        if self.writer is not None:
            for name in self.writer.overlay.renamed_away_under(path):
                listed.pop(name, None)
            for name in [n for n in listed if self.writer.hidden_in_referrer(prefix + n)]:
                del listed[name]
            for name, local in self.writer.overlay.children(path).items():
                if isinstance(local, StagedFile):
                    listed[name] = Listed(name, False, inode_number(prefix + name, None))
                else:
                    listed.setdefault(name, Listed(name, True, inode_number(prefix + name, None)))
            for name in [n for n, entry in listed.items() if entry.is_dir]:
                if self.writer.overlay.is_removed(prefix + name) and self.writer.overlay.dir(prefix + name) is None \
                        and self._hidden(prefix + name):
                    del listed[name]
        return sorted(listed.values(), key=lambda entry: entry.name)

    def xattrs(self, path: str) -> dict[str, bytes]:
        """The `user.oci.*` attributes of a path."""
        node = self.lookup(path)
        if isinstance(node, LOCAL_NODES):
            return self._local_xattrs(path, node)
        return self.tree.xattrs(node)

    def xattr_names(self, path: str) -> list[str]:
        """What listxattr shows (GGUF files have `user.gguf.*` too); nothing is read for it."""
        node = self.lookup(path)
        if isinstance(node, LOCAL_NODES):
            return sorted(self._local_xattrs(path, node))
        return sorted(self.tree.xattr_names(node))

    def xattr(self, path: str, name: str) -> bytes | None:
        """One attribute, None when the path has none of that name."""
        node = self.lookup(path)
        if isinstance(node, LOCAL_NODES):
            return self._local_xattrs(path, node).get(name)
        return self.tree.xattr(node, name)

    def _local_xattrs(self, path: str, node: StagedFile | LocalDir | ControlNode) -> dict[str, bytes]:
        """The attributes of what is this mount's own: staged files (the media type they will
        be pushed with), local directories, `.ocifs`."""
        if isinstance(node, StagedFile):
            assert self.writer is not None
            return {"user.oci.mediatype": self.writer.media_type_of(node).encode()}
        if isinstance(node, LocalDir):
            assert self.writer is not None
            pending = self.writer.overlay.artifact_type(path.strip("/"))
            return {"user.oci.artifacttype": pending.encode()} if pending else {}
        return {}

    # ---- opening --------------------------------------------------------------------------

    def open(self, path: str, *, write: bool, truncate: bool) -> Opened:
        path = path.strip("/")
        node = self.lookup(path)
        if isinstance(node, ControlNode):
            if node.name is None:
                raise Refused(f"{path}: is a directory", errno.EISDIR)
            if write:
                raise Refused(f"{path}: read-only", errno.EACCES)
            return Opened(BytesReader(self._status_bytes()), None, direct=True)
        if isinstance(node, (PrefixDir, ManifestDir, TitleDir, ReferrersDir, LocalDir, ArchiveDir)):
            raise Refused(f"{path}: is a directory", errno.EISDIR)
        if isinstance(node, ArchiveFile):
            if write:
                raise _in_archive(path)
            return Opened(self.tree.open(node), self.tree.digest_of(node))
        if isinstance(node, StagedFile):
            assert self.writer is not None
            handle = self.writer.open_staged(path, write=write, truncate=truncate)
            if handle is None:  # it went meanwhile: try again from the registry
                return self.open(path, write=write, truncate=truncate)
            return Opened(handle, None)
        if write:
            writer = self._writer()
            if isinstance(node, BytesFile):
                raise Refused(f"{path}: cannot be changed", errno.EPERM)
            self._not_alias(path, node)
            return Opened(writer.open_registry_file(path, node, self.parent(path), truncate=truncate), None)
        return Opened(self.tree.open(node), self.tree.digest_of(node))

    def create(self, path: str, *, truncate: bool) -> Opened:
        path = path.strip("/")
        return Opened(self._writer().create(path, self.parent(path), truncate=truncate), None)

    def _status_bytes(self) -> bytes:
        status = dict(self._status())
        if self.writer is not None:
            status.update(self.writer.status())
        else:
            status.update({"staged": [], "fragments": []})
        return json.dumps(status, indent=2, sort_keys=True).encode() + b"\n"

    # ---- changing -------------------------------------------------------------------------

    def _writer(self) -> Writer:
        if self.writer is None:
            raise Refused("read-only mount", errno.EROFS)
        return self.writer

    def _file(self, path: str) -> StagedFile | File:
        node = self.lookup(path)
        if isinstance(node, (ArchiveDir, ArchiveFile)):
            raise _in_archive(path)
        if isinstance(node, ControlNode):
            raise Refused(f"{path}: the mount's own file", errno.EPERM)
        if isinstance(node, (PrefixDir, ManifestDir, TitleDir, ReferrersDir, LocalDir)):
            raise Refused(f"{path}: is a directory", errno.EISDIR)
        return node

    def _not_alias(self, path: str, node: object) -> None:
        """EPERM for a registry file reached by another name than the one it is listed by
        (a digest name kept for a layer named by its media type or file path, the raw blob
        of a packed directory): a change through it would publish the file under that name
        and take the listed one away. Reading through it stays."""
        if not isinstance(node, BlobFile):
            return
        owner = node.manifest_dir
        relative = path.strip("/")[len(owner.path.strip("/")):].strip("/")
        parts = tuple(relative.split("/"))
        layout = self.tree.layout(owner)
        canonical = layout.aliases.get(parts)
        if canonical is not None and parts not in layout.files:
            raise Refused(f"{path}: another name of {'/'.join(canonical)}; change the file by that name",
                          errno.EPERM)

    def mkdir(self, path: str) -> None:
        path = path.strip("/")
        writer = self._writer()
        try:
            self.lookup(path)
        except NotFound:
            pass
        else:
            raise Refused(f"{path}: exists", errno.EEXIST)
        writer.mkdir(path, self.parent(path))

    def unlink(self, path: str) -> None:
        path = path.strip("/")
        writer = self._writer()
        node = self._file(path)
        self._not_alias(path, node)
        if isinstance(node, BlobFile):
            subject = self._subject_of(node.manifest_dir)
            if subject is not None:
                referrer = node.manifest_dir
                writer.remove_in_referrer(path, node, referrer, subject, self.tree.layout(referrer).files)
                return
        writer.unlink(path, node)

    def rmdir(self, path: str) -> None:
        path = path.strip("/")
        writer = self._writer()
        try:
            node = self.lookup(path)
        except NotFound:
            if self._in_writable_tag(split_path(path)[0]):
                return  # a title directory whose last file just went (`rm -r`)
            if writer.removed_referrer(path):
                return  # what went with a referrer removed here (`rm -r`)
            raise
        if isinstance(node, (ArchiveDir, ArchiveFile)):
            raise _in_archive(path)
        if isinstance(node, ControlNode):
            raise Refused(f"{path}: the mount's own directory", errno.EPERM)
        if isinstance(node, (BlobFile, BytesFile, StagedFile)):
            raise NotADirectory(f"{path}: not a directory")
        if self.children(path):
            raise Refused(f"{path}: not empty", errno.ENOTEMPTY)
        if isinstance(node, (ManifestDir, TitleDir)):
            referrer = node.manifest_dir if isinstance(node, TitleDir) else node
            subject = self._subject_of(referrer)
            if subject is not None:
                writer.remove_in_referrer(path, node, referrer, subject, self.tree.layout(referrer).files)
                return
        registry: Node | None = node
        if isinstance(node, LocalDir):
            try:  # what the registry has there, under what was made here
                registry = self.tree.lookup(path)
            except NotFound:
                registry = None
        writer.rmdir(path, registry if isinstance(registry, (PrefixDir, ManifestDir, TitleDir, ReferrersDir)) else None,
                     writer.overlay.dir(path))

    def _subject_of(self, owner: ManifestDir) -> ManifestDir | None:
        """The manifest `owner` is listed as a referrer of, when `owner` is a directory
        `.referrers/<type>/<subtype>/sha256-<hex>` (or `_untyped/sha256-<hex>`); else None."""
        if owner.tag is not None or not owner.path:
            return None
        try:
            parent = self.lookup(split_path(owner.path)[0])
        except NotFound:
            return None
        return parent.subject if isinstance(parent, ReferrersDir) and parent.parts else None

    def _in_writable_tag(self, path: str) -> bool:
        """Whether `path` is, or was until its last file went, a directory of a tag that
        takes files: the nearest ancestor that still exists says."""
        while True:
            try:
                node = self.lookup(path)
            except NotFound:
                node = None
            if isinstance(node, LocalDir):
                return node.kind in ("tag", "title")
            if isinstance(node, (ManifestDir, TitleDir)):
                owner = node.manifest_dir if isinstance(node, TitleDir) else node
                return owner.tag is not None
            if node is not None or not path:
                return False
            path = split_path(path)[0]

    def rename(self, old: str, new: str) -> None:
        old, new = old.strip("/"), new.strip("/")
        writer = self._writer()
        node = self.lookup(old)
        if isinstance(node, (ArchiveDir, ArchiveFile)):
            raise _in_archive(old)
        if isinstance(node, (PrefixDir, ManifestDir, TitleDir, ReferrersDir, LocalDir)):
            raise Refused(f"{old}: directories of tags and repositories are not renamed", errno.EXDEV)
        if isinstance(node, ControlNode):
            raise Refused(f"{old}: the mount's own file", errno.EPERM)
        self._not_alias(old, node)
        try:
            existing: Node | None = self.lookup(new)
        except NotFound:
            existing = None
        self._not_alias(new, existing)
        if isinstance(existing, (PrefixDir, ManifestDir, TitleDir, ReferrersDir, LocalDir, ControlNode)):
            raise Refused(f"{new}: is a directory", errno.EISDIR)
        replaced = None  # the registry layer the renamed file replaces, if any
        if isinstance(existing, BlobFile):
            replaced = existing.descriptor
        elif isinstance(existing, StagedFile):
            replaced = existing.pushed or existing.replaces
        writer.rename(old, new, node, self.parent(new), replaced)

    def truncate(self, path: str, length: int) -> None:
        path = path.strip("/")
        writer = self._writer()
        node = self._file(path)
        if isinstance(node, BytesFile):
            raise Refused(f"{path}: cannot be changed", errno.EPERM)
        self._not_alias(path, node)
        writer.truncate(path, node, self.parent(path), length)

    def set_xattr(self, path: str, name: str, value: str) -> None:
        path = path.strip("/")
        writer = self._writer()
        if isinstance(self.lookup(path), (ArchiveDir, ArchiveFile)):
            raise _in_archive(path)
        if name == "user.oci.artifacttype":
            node = self.lookup(path)
            local = writer.overlay.dir(path)
            registry = node if isinstance(node, (PrefixDir, ManifestDir, TitleDir, ReferrersDir)) else None
            writer.set_artifact_type(path, registry, local, value)
        elif name in ("user.oci.mediatype", "user.oci.digest") and isinstance(
                self.lookup(path), (PrefixDir, ManifestDir, TitleDir, ReferrersDir, LocalDir)):
            # A directory's digest and media type are its manifest's, which ocifs writes itself;
            # `mv` and `cp -a` of a tag directory carry the old ones along: nothing to do, and
            # no error for them to print.
            return
        elif name == "user.oci.mediatype":
            writer.set_media_type(path, self._file(path), value)
        elif name == "user.oci.digest":
            # The digest is what the bytes say. `cp -a` and mv's copy fallback carry it along:
            # accepted when it is (or will be) true, refused otherwise.
            node = self.lookup(path)
            if not isinstance(node, StagedFile) and self.xattrs(path).get(name) != value.encode():
                raise Refused(f"{path}: user.oci.digest is what the bytes say", errno.EPERM)
        else:
            raise Refused(f"{path}: {name} is not an attribute ocifs keeps", errno.ENOTSUP)


def _in_archive(path: str) -> Refused:
    """Packed directories and everything in them are read-only (EROFS), in any mount."""
    return Refused(f"{path}: inside a packed directory (read-only)", errno.EROFS)
