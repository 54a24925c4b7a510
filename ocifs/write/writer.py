"""The writer: every write operation of the mount (DESIGN.md section 3), on nodes the view
has already resolved. It owns the overlay (what this mount holds locally), the staging area,
the pusher and the tag editor; it asks the shared `Metadata` about tags, never the tree.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from ..digest import HASH_BLOCK, Digest
from ..errors import NotFound, OcifsError, Refused, RegistryError, Unsupported
from ..layout import (
    REFERRERS_DIR,
    RESERVED_NAMES,
    BlobFile,
    BytesFile,
    Dir,
    File,
    ManifestDir,
    PrefixDir,
    ReferrersDir,
    TitleDir,
    split_path,
)
from ..metadata import Metadata
from ..model import (
    DOCKER_MODEL_CONFIG_PREFIX,
    OCI_LAYER_TAR,
    UNKNOWN_ARTIFACT,
    Descriptor,
    Index,
    Manifest,
    is_placeholder_layer,
)
from ..reference import is_valid_tag
from ..registry.client import RegistryClient
from ..store import BlobStore
from .dockermodel import is_model_type, layer_media_type, retitled
from .edits import TagEditor, artifact_type_change, drop_change, move_change, put_change
from .overlay import Overlay
from .push import Pusher
from .referrers import detach
from .staging import Fragment, StagedFile, StagingArea
from .streaming import CANCEL_WAIT
from .targets import (
    LayerTarget,
    LocalDir,
    Parent,
    ScratchTarget,
    Target,
    check_writable,
    file_target,
    new_directory,
)

log = logging.getLogger(__name__)


class BlobReader(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...
    def close(self) -> None: ...


class WriteHandle:
    """An open file handle on a staged file (what fs.py keeps per `fh`)."""

    def __init__(self, writer: Writer, staged: StagedFile, *, writable: bool = True) -> None:
        self.writer = writer
        self.staged = staged
        self.writable = writable

    def read(self, offset: int, size: int) -> bytes:
        return self.staged.read(offset, size)

    def write(self, data: bytes, offset: int) -> int:
        if not self.writable:
            raise Refused(f"{self.staged.path}: not open for writing", errno.EBADF)
        written = self.staged.write(data, offset)
        if self.staged.may_stream:  # a big file written in order: its upload may start now
            self.staged.start_streaming(self.writer.client)
        return written

    def truncate(self, length: int) -> None:
        if not self.writable:
            raise Refused(f"{self.staged.path}: not open for writing", errno.EBADF)
        self.staged.truncate(length)

    def flush(self) -> None:
        """close(): a handle opened for writing pushes what changed. A reader of a staged
        file does not: its close should not fail because of someone else's push."""
        if self.writable:
            self.writer.pusher.push(self.staged)

    def fsync(self) -> None:
        self.writer.pusher.push(self.staged)

    def close(self) -> None:
        self.writer.release(self.staged, writable=self.writable)


class Writer:
    """Every write operation of the mount, and the local state they create."""

    def __init__(
        self,
        metadata: Metadata,
        client: RegistryClient,
        store: BlobStore,
        *,
        source: str,
        open_blob: Callable[[BlobFile], BlobReader],
        on_pushed: Callable[[str, Digest], None] = lambda path, digest: None,
        artifact_type: str | None = None,
    ) -> None:
        self.metadata = metadata
        self.client = client
        self.store = store
        self.overlay = Overlay()
        self.staging = StagingArea(Path(store.root), source)
        self.editor = TagEditor(client, metadata, artifact_type=artifact_type or UNKNOWN_ARTIFACT,
                                pending_artifact_type=self.overlay.pending_artifact_type)
        self.pusher = Pusher(client, metadata, self.editor,
                             on_pushed=lambda staged, digest: on_pushed(staged.path, digest),
                             after_retry=self.release_if_idle)
        self._open_blob = open_blob
        self.fragments: list[Fragment] = []
        # Removing what is attached: a referrer goes whole, when nothing of it is left here.
        self._referrers_mutex = threading.Lock()
        self._hidden: dict[str, set[tuple[str, ...]]] = {}  # referrer dir -> its paths removed here
        self._removed_referrers: set[str] = set()  # referrer dirs this mount removed

    # ---- files ----------------------------------------------------------------------------

    def _target(self, path: str, parent: Parent) -> Target:
        """Where a file at `path` goes; the first file in an undecided directory makes it a tag."""
        target = file_target(parent, path, split_path(path)[1])
        if isinstance(parent, LocalDir) and parent.kind == "path" and isinstance(target, LayerTarget):
            self.overlay.decide_tag(split_path(path)[0], target.repository, target.tag)
        return target

    def create(self, path: str, parent: Parent, *, truncate: bool) -> WriteHandle:
        target = self._target(path, parent)
        staged, made = self.overlay.claim(path, lambda: self.staging.new(path, target), writer=True)
        if made:
            staged.dirty = True  # a new file is pushed even if nothing is written (`touch`)
            staged.may_stream = True
        return self._handle(staged, write=True, truncate=truncate and not made, made=made)

    def open_staged(self, path: str, *, write: bool, truncate: bool) -> WriteHandle | None:
        """A handle on the staged file at `path`, if there is one."""
        staged = self.overlay.acquire(path, writer=write)
        if staged is None:
            return None
        return self._handle(staged, write=write, truncate=truncate, made=False)

    def _handle(self, staged: StagedFile, *, write: bool, truncate: bool, made: bool) -> WriteHandle:
        """A handle on a staged file whose handle is already counted (O_TRUNC applied). A file
        opened again for writing goes up at close, not during the writes: the stream follows
        one writer from offset 0."""
        if write and not made:
            staged.stop_streaming("opened again for writing")
        try:
            if truncate:
                staged.truncate(0)
        except BaseException:
            self.release(staged, writable=write)
            raise
        return WriteHandle(self, staged, writable=write)

    def open_registry_file(self, path: str, node: BlobFile, parent: Parent, *, truncate: bool) -> WriteHandle:
        """Open a registry file for writing: its content is staged (downloaded unless truncated)
        and pushed back in its place."""
        self._writable_owner(path, node)
        target = file_target(parent, path, split_path(path)[1])

        def stage() -> StagedFile:
            fill = None if truncate else (lambda fd: self._copy_into(node, fd))
            staged = self.staging.new(path, target, replaces=node.descriptor, fill=fill)
            staged.dirty = truncate and node.descriptor.size > 0
            staged.may_stream = truncate  # written from scratch (`cp` over it), not edited
            return staged

        staged, made = self.overlay.claim(path, stage, writer=True)
        return self._handle(staged, write=True, truncate=truncate and not made, made=made)

    def _copy_into(self, node: BlobFile, fd: int) -> None:
        reader = self._open_blob(node)
        try:
            offset = 0
            while offset < node.descriptor.size:
                block = reader.read(offset, min(HASH_BLOCK, node.descriptor.size - offset))
                if not block:
                    break
                view = memoryview(block)
                while view:
                    written = os.pwrite(fd, view, offset)
                    offset += written
                    view = view[written:]
        finally:
            reader.close()

    def release(self, staged: StagedFile, *, writable: bool) -> None:
        """A handle closed. The last one adopts a pushed file into the cache (no download
        to read it back) and drops it from the overlay; a file still owed a push, or one a
        write failed on, stays (visible, and in the status)."""
        if self.overlay.release(staged, writer=writable):
            self._dispose(staged)

    def release_if_idle(self, staged: StagedFile) -> None:
        """A file nobody holds a handle on (recovered, renamed, pushed by a retry) leaves
        the overlay once it is settled."""
        if self.overlay.release(staged, handle=False):
            self._dispose(staged)

    def _push_unheld(self, staged: StagedFile) -> None:
        """A change made without a handle open for writing (rename, truncate, setxattr):
        push it now; with a writer open, that writer's close pushes it."""
        self.pusher.push(staged, background=True)

    def _dispose(self, staged: StagedFile) -> None:
        if staged.removed or staged.pushed is None:
            staged.discard()
            return
        try:
            staged.close_fd()
            self.store.add_file(staged.pushed.digest, staged.data_path)
            staged.forget_record()
        except (OSError, OcifsError) as exc:
            log.info("could not keep %s in the cache: %s", staged.path, exc)
            staged.discard()

    def unlink(self, path: str, node: StagedFile | File) -> None:
        if isinstance(node, StagedFile):
            with node.mutex:  # not while a push of it runs: what it pushed is dropped below
                removed = self.overlay.remove(path, node)
                if removed:
                    node.stop_streaming("removed")  # a writer may still hold it: never pushed now
                if not removed and (node.pushed is None or node.path != path):
                    raise NotFound(f"{path}: no such file")
                # Not removed: its push just finished and it left the overlay; drop that layer.
                changes = [(drop.target, drop_change(drop.layer, exact=True)) for drop in node.drops]
                in_registry = node.pushed or node.replaces
                if in_registry is not None and isinstance(node.target, LayerTarget):
                    changes.append((node.target, drop_change(in_registry)))
                if removed and node.handles == 0:
                    node.discard()
            for target, change in changes:
                try:
                    self.editor.edit(target.repository, target.tag, change)
                except NotFound:
                    pass  # already gone
            return
        owner = self._writable_owner(path, node)
        assert owner.tag is not None and isinstance(node, BlobFile)
        self.editor.edit(owner.repository, owner.tag, drop_change(node.descriptor))

    def _writable_owner(self, path: str, node: File) -> ManifestDir:
        """The tag a registry file belongs to, when the file may change: EPERM for
        `.manifest.json`, `.config.json` and files of tags that never change."""
        if isinstance(node, BytesFile) or _is_reserved(node):
            raise Refused(f"{path}: cannot be changed", errno.EPERM)
        check_writable(node.manifest_dir)
        return node.manifest_dir

    def truncate(self, path: str, node: StagedFile | BlobFile, parent: Parent, length: int) -> None:
        """truncate(2) on a path: push at once when no handle is open on it."""
        if isinstance(node, StagedFile):
            node.truncate(length)
            self._push_unheld(node)
            self.release_if_idle(node)
            return
        handle = self.open_registry_file(path, node, parent, truncate=length == 0)
        try:
            handle.truncate(length)
            handle.flush()
        finally:
            handle.close()

    # ---- directories ----------------------------------------------------------------------

    def mkdir(self, path: str, parent: Parent) -> None:
        is_repository = isinstance(parent, PrefixDir) and self.metadata.is_repository(parent.prefix)
        self.overlay.add_dir(path, new_directory(parent, path, split_path(path)[1],
                                                 parent_is_repository=is_repository))

    def rmdir(self, path: str, node: Dir | None, local: LocalDir | None) -> None:
        """Remove an empty directory (the view checked that it lists nothing)."""
        if isinstance(node, ReferrersDir) and local is None:
            raise Refused(f"{path}: what refers to a manifest is not removed here", errno.EPERM)
        if isinstance(node, ManifestDir):
            check_writable(node)
            self._delete_tag(node)
        elif isinstance(node, PrefixDir):
            if not node.prefix or path == "":
                raise Refused(f"{path}: the mount's root", errno.EBUSY)
            tags = self.metadata.tags(node.prefix) if self.metadata.may_have_tags(node.prefix) else set()
            if tags:
                raise Refused(f"{path}: the repository holds tags", errno.ENOTEMPTY)
            if tags is None:
                raise Refused(f"{path}: the registry does not say which tags it holds", errno.EPERM)
            # The registry API cannot delete a repository; with no tags left it is only a name
            # in the catalog: hidden here while it has none.
            log.info("%s: repository has no tags left; hidden in this mount", node.prefix)
            self.overlay.mark_removed(path)
        self.overlay.forget_dir(path)

    def _delete_tag(self, node: ManifestDir) -> None:
        repository, tag = node.repository, node.tag
        assert tag is not None
        found = self.metadata.tag_manifest(repository, tag, fresh=True)
        if found is None:
            self.metadata.forget_tag(repository, tag)
            return
        # Judge emptiness on the manifest as it is now, not as this mount last saw it.
        current, manifest = found
        if isinstance(manifest, Manifest) and any(not is_placeholder_layer(layer) for layer in manifest.layers):
            raise Refused(f"{repository}:{tag}: not empty", errno.ENOTEMPTY)
        try:
            self.client.delete_manifest(repository, tag)
        except Unsupported as exc:
            log.warning("%s:%s: the registry refuses deletes: %s", repository, tag, exc)
            raise Refused(f"{repository}:{tag}: the registry refuses deletes", errno.EPERM) from None
        except RegistryError:
            # Deleting by tag is newer than deleting by digest; a digest delete removes every
            # tag on it, so only when no other tag shares it.
            for other in self.client.tags(repository):
                if other != tag and is_valid_tag(other) and \
                        self.client.resolve(repository, other).digest == current.digest:
                    raise Refused(f"{repository}:{tag}: tag {other} shares its manifest", errno.EBUSY) from None
            try:
                self.client.delete_manifest(repository, str(current.digest))
            except Unsupported as exc:
                log.warning("%s:%s: the registry refuses deletes: %s", repository, tag, exc)
                raise Refused(f"{repository}:{tag}: the registry refuses deletes", errno.EPERM) from None
        self.metadata.forget_tag(repository, tag)

    # ---- what is attached (`.referrers/`) ------------------------------------------------------

    def remove_in_referrer(self, path: str, node: BlobFile | ManifestDir | TitleDir, referrer: ManifestDir,
                           subject: ManifestDir, files: Iterable[tuple[str, ...]]) -> None:
        """unlink of a file or rmdir of a directory (the view checked it lists nothing) in the
        directory of `referrer`, an artifact whose subject is `subject`'s manifest; `files`:
        every file the referrer shows. A referrer is one immutable manifest: its files are not
        removed one by one. What is removed is hidden in this mount, and when nothing of the
        referrer is left the manifest is deleted (`detach`); if that fails, everything of it
        shows again and the error is this operation's (EPERM where the registry refuses
        deletes)."""
        if isinstance(node, BlobFile) and _is_reserved(node):
            raise Refused(f"{path}: cannot be changed", errno.EPERM)
        if isinstance(referrer.manifest, Index):
            raise Refused(f"{path}: an image index that refers to a manifest is not removed here", errno.EPERM)
        below = path.strip("/")[len(referrer.path.strip("/")):].strip("/")
        parts = tuple(below.split("/")) if below else ()
        with self._referrers_mutex:
            hidden = self._hidden.setdefault(referrer.path, set())
            if parts:
                hidden.add(parts)
            left = [file for file in files if not any(file[:i] in hidden for i in range(1, len(file) + 1))]
            if left:
                log.info("%s: hidden in this mount; %s@%s is removed when the rest of it is (%d more)", path,
                         referrer.repository, referrer.descriptor.digest, len(left))
                return
            try:
                detach(self.client, referrer.repository, subject.descriptor.digest, referrer.descriptor.digest)
            except BaseException:
                self._hidden.pop(referrer.path, None)  # nothing changed: all of it shows again
                raise
            finally:
                self.metadata.forget_referrers(subject.repository, subject.descriptor.digest)
            self._hidden.pop(referrer.path, None)
            self._removed_referrers.add(referrer.path)

    def hidden_in_referrer(self, path: str) -> bool:
        """Whether `path` is something of a referrer removed in this mount, not deleted yet."""
        path = path.strip("/")
        if REFERRERS_DIR not in path:  # every lookup asks: most are nowhere near a referrer
            return False
        with self._referrers_mutex:
            for where, hidden in self._hidden.items():
                if path.startswith(where + "/"):
                    parts = tuple(path[len(where) + 1:].split("/"))
                    if any(parts[:i] in hidden for i in range(1, len(parts) + 1)):
                        return True
        return False

    def removed_referrer(self, path: str) -> bool:
        """Whether `path` went with a referrer this mount removed: its directory, something in
        it, or a type directory of `.referrers/` that it left empty (`rm -r` removes those
        after the referrer is gone)."""
        path = path.strip("/")
        in_referrers = REFERRERS_DIR in path.split("/")
        with self._referrers_mutex:
            return in_referrers and any(path == where or path.startswith(where + "/") or where.startswith(path + "/")
                                        for where in self._removed_referrers)

    # ---- renaming -------------------------------------------------------------------------

    def rename(self, old: str, new: str, node: StagedFile | File, new_parent: Parent,
               replaced: Descriptor | None) -> None:
        """`mv old new` of a file; `replaced` is the registry layer at `new`, if any."""
        target = self._target(new, new_parent)
        if isinstance(node, StagedFile):
            self._rename_staged(node, old, new, target, replaced)
            return
        displaced = self.overlay.displace(new)
        if displaced is not None:  # a staged file at the new name: the moved layer replaces it
            replaced = displaced.pushed or displaced.replaces
            displaced.stop_streaming("replaced by a rename")
            if displaced.handles == 0:
                displaced.discard()
        owner = self._writable_owner(old, node)
        assert owner.tag is not None and isinstance(node, BlobFile)
        if not isinstance(target, LayerTarget):
            raise Refused(f"{new}: a registry file moves only into tag directories", errno.EXDEV)
        old_layer = node.descriptor
        moved = replace(old_layer, annotations=retitled(old_layer.annotations, target.title))
        if (owner.repository, owner.tag) == (target.repository, target.tag):
            self.editor.edit(target.repository, target.tag, move_change(old_layer, moved, replaced))
            return
        if target.repository != owner.repository and \
                not self.client.mount_blob(target.repository, old_layer.digest, owner.repository):
            raise Refused(f"{new}: the registry would not mount {old_layer.digest} from "
                          f"{owner.repository}", errno.EXDEV)
        self.editor.edit(target.repository, target.tag, put_change(moved, replaced))
        self.editor.edit(owner.repository, owner.tag, drop_change(old_layer))

    def _rename_staged(self, staged: StagedFile, old: str, new: str, target: Target,
                       replaced: Descriptor | None) -> None:
        """A staged file changes place. Its next push puts it at the new name and drops the
        layer of the old one (in one PUT inside a tag), so a failed push loses neither."""
        self.overlay.hold(staged)  # not retired by a concurrent close meanwhile
        try:
            with staged.mutex:  # not while a push of this file runs
                displaced = self.overlay.move(staged, old, new)
                staged.retarget(old, new, target, replaced)
            if displaced is not None:
                displaced.stop_streaming("replaced by a rename")
                with displaced.mutex:
                    if displaced.handles == 0:
                        displaced.discard()
            self._push_unheld(staged)
        finally:
            self.release(staged, writable=False)

    # ---- attributes -----------------------------------------------------------------------

    def set_artifact_type(self, path: str, node: Dir | None, local: LocalDir | None, value: str) -> None:
        if isinstance(node, ManifestDir):
            check_writable(node)
            assert node.tag is not None
            config = node.manifest.config if isinstance(node.manifest, Manifest) else None
            if config is not None and is_model_type(config.media_type) and not is_model_type(value):
                # Its type is its config's media type: another type would leave a model config
                # that nothing keeps up to date.
                raise Refused(f"{path}: a model's artifact type is its config type; only another "
                              f"{DOCKER_MODEL_CONFIG_PREFIX} type can replace it", errno.EINVAL)
            self.editor.edit(node.repository, node.tag, artifact_type_change(value))
            return
        if node is None and local is not None and (local.kind == "tag" or local.as_tag() is not None):
            self.overlay.set_artifact_type(path, value)  # for when its first file makes the tag
            return
        raise Refused(f"{path}: user.oci.artifacttype is set on tag directories", errno.EPERM)

    def media_type_of(self, staged: StagedFile) -> str:
        """The media type a staged file will be pushed with: in a model tag, the one its name
        (or a Docker AI type set on it) gives it, as the pusher decides it."""
        target = staged.target
        if isinstance(target, LayerTarget):
            try:
                model_type = self.editor.model_type(target.repository, target.tag)
            except OcifsError as exc:
                log.info("%s: cannot tell whether %s:%s is a model: %s", staged.path, target.repository,
                         target.tag, exc)
                model_type = None
            if model_type is not None:
                return layer_media_type(target.title, staged.media_type)
        return staged.media_type or OCI_LAYER_TAR

    def set_media_type(self, path: str, node: StagedFile | File, value: str) -> None:
        if isinstance(node, StagedFile):
            node.set_media_type(value)
            self._push_unheld(node)
            self.release_if_idle(node)
            return
        owner = self._writable_owner(path, node)
        assert owner.tag is not None and isinstance(node, BlobFile)
        old = node.descriptor
        self.editor.edit(owner.repository, owner.tag, put_change(replace(old, media_type=value), old))

    # ---- the mount's lifetime ---------------------------------------------------------------

    def recover(self) -> tuple[list[StagedFile], list[Fragment]]:
        """Take back files a stopped daemon of this SOURCE left staged; set fragments aside."""
        recovered, fragments = self.staging.recover()
        taken = []
        for staged in recovered:
            if self.overlay.adopt(staged):
                taken.append(staged)
                log.warning("recovered %s, staged before the last daemon stopped", staged.path)
            else:
                staged.close_fd()
        self.fragments = self.staging.fragments()
        return taken, fragments

    def push_pending(self) -> None:
        """Push staged files nobody has open (recovered ones); failures are retried later."""
        for staged in self.overlay.files():
            if staged.handles == 0 and staged.pending:
                try:
                    self.pusher.push(staged, background=True)
                    self.release_if_idle(staged)
                except (OcifsError, OSError) as exc:
                    log.warning("%s still staged: %s", staged.path, exc)

    def status(self) -> dict[str, Any]:
        """Staged files not in the registry yet, and fragments kept aside."""
        staged = []
        for item in sorted(self.overlay.files(), key=lambda s: s.path):
            if isinstance(item.target, ScratchTarget) or item.settled:
                continue
            if item.write_error is not None:
                state, error = "fragment", os.strerror(item.write_error)
            elif item.writers > 0:
                state, error = "writing", None
            elif item.push_error is not None:
                state, error = "failed", item.push_error
            else:
                state, error = "pending", None
            staged.append({"path": item.path, "state": state, "size": item.size, "error": error,
                           "file": str(item.data_path)})
        fragments = [{"path": f.path, "file": str(f.file), "reason": f.reason}
                     for f in self.staging.fragments()]
        return {"staged": staged, "fragments": fragments}

    def shutdown(self) -> None:
        """At unmount: push what is still owed (best effort); failures stay staged on disk.
        A file still open for writing (a lazy unmount, SIGTERM) is not complete: never pushed."""
        self.pusher.retries.stop()
        for staged in self.overlay.files():
            try:
                self.pusher.push(staged, background=True)
            except (OcifsError, OSError) as exc:
                log.warning("%s not pushed at unmount, left in %s: %s", staged.path, staged.data_path, exc)
            except Exception:
                log.exception("%s not pushed at unmount, left in %s", staged.path, staged.data_path)
            # Still open for writing: its upload session is dropped, not left to the registry's purge.
            staged.stop_streaming("unmounted", wait=CANCEL_WAIT)


def _is_reserved(node: BlobFile) -> bool:
    """`.config.json` of a tag directory."""
    parent, name = split_path(node.path)
    return parent == node.manifest_dir.path and name in RESERVED_NAMES

