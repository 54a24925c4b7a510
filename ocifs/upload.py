"""Staging and pushing: files written into the mount become OCI artifacts (DESIGN.md section 3).

A file created or opened for writing is staged under the cache directory. `flush` (every
close) and `fsync` push it when it changed: the blob first (skipped when the registry has
it), then a new manifest for the tag with that layer added or replaced. A failed push fails
the flush with its errno (EIO for most) and the staged file stays, visible in the mount, until
a later flush succeeds or it is removed: nothing is lost silently.

Manifest edits of one tag are serialised inside the mount, and each starts by resolving the
tag again with HEAD, so edits made elsewhere in the meantime are kept. New manifests are laid
out as ORAS lays them out; existing ones keep everything but the layers they change.

Directories made with mkdir (repositories, tags, title directories) and editors' scratch files
live only in this mount until a file is pushed into them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .digest import HASH_BLOCK, Digest, update_from_fd
from .errors import NotFound, OcifsError, PushFailed, Refused, RegistryError, Unsupported
from .model import (
    ANNOTATION_CREATED,
    ANNOTATION_TITLE,
    EMPTY_JSON,
    HELM_CHART,
    HELM_CONFIG,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    UNKNOWN_ARTIFACT,
    Descriptor,
    Index,
    Manifest,
    build_manifest,
    encode_json,
    is_placeholder_layer,
    parse_manifest,
    replace_layers,
)
from .reference import is_valid_component, is_valid_repository, is_valid_tag
from .registry.client import RegistryClient
from .store import BlobStore
from .tree import (
    NAME_MAX,
    RESERVED_NAMES,
    BlobFile,
    BytesFile,
    Entry,
    ManifestDir,
    PrefixDir,
    TitleDir,
    Tree,
)

log = logging.getLogger(__name__)

# Editors' and tools' scratch files: kept in the mount, never pushed.
SCRATCH_RE = re.compile(r"^(?:\..*\.sw[a-p]|.*~|4913|\.#.*)$")
# Refuse to start staging a file when the cache's file system has less free space than this.
MIN_FREE_SPACE = 64 * 1024 * 1024
# Helm charts are read whole to find their Chart.yaml; bigger files are not charts.
MAX_CHART_SIZE = 256 * 1024 * 1024
# What ORAS puts on a directory's tarball layer; wrong once the content is replaced.
ORAS_CONTENT_ANNOTATIONS = ("io.deis.oras.content.digest", "io.deis.oras.content.unpack")
HELM_STRING_FIELDS = ("name", "home", "version", "description", "icon", "apiVersion", "condition",
                      "tags", "appVersion", "kubeVersion", "type")
# Helm's chart.Metadata fields, in the order Helm writes them into the config blob.
HELM_METADATA_FIELDS = (
    "name", "home", "sources", "version", "description", "keywords", "maintainers", "icon",
    "apiVersion", "condition", "tags", "appVersion", "deprecated", "annotations", "kubeVersion",
    "dependencies", "type",
)


def check_name(path: str, name: str) -> None:
    """A name the registry can hold as a title: UTF-8, at most NAME_MAX bytes."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(f"{path!r}: names must be UTF-8", errno.EINVAL) from None
    if len(encoded) > NAME_MAX:
        raise Refused(f"{path}: name longer than {NAME_MAX} bytes", errno.ENAMETOOLONG)


def is_scratch(name: str) -> bool:
    return SCRATCH_RE.match(name) is not None


def split_path(path: str) -> tuple[str, str]:
    """`/a/b/c` -> ("a/b", "c"); mount paths are handled without their leading slash."""
    path = path.strip("/")
    parent, _, name = path.rpartition("/")
    return parent, name


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- where a written file goes ------------------------------------------------------------


@dataclass(frozen=True)
class LayerTarget:
    """A file of a tag: layer titled `title` (a path relative to the tag directory)."""

    repository: str
    tag: str
    title: str


@dataclass(frozen=True)
class HelmTarget:
    """A chart package copied into a namespace directory: pushed as `helm push` would."""

    namespace: str


@dataclass(frozen=True)
class ScratchTarget:
    """An editor's scratch file: local to the mount."""


Target = LayerTarget | HelmTarget | ScratchTarget


@dataclass(frozen=True)
class LocalDir:
    """A directory made with mkdir that the registry does not have yet."""

    kind: str  # "repository", "tag" or "title"
    repository: str
    tag: str | None = None
    parts: tuple[str, ...] = ()


# ---- staged files -------------------------------------------------------------------------


class Staged:
    """A file written through the mount, on local disk until pushed. Thread-safe.

    The data file is flock'ed while a mount owns it; next to it, `<name>.json` says where
    it goes, so a daemon killed before the push does not lose it (`Writer.recover`)."""

    def __init__(self, path: str, target: Target, staging: Path, *,
                 replaces: Descriptor | None = None) -> None:
        self.path = path
        self.target = target
        self.staging = staging
        self.journal = staging.with_name(staging.name + ".json")
        self.fd = os.open(staging, os.O_RDWR)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise
        self.size = os.fstat(self.fd).st_size
        self.replaces = replaces  # the registry layer this file overwrites, if any
        self.media_type: str | None = replaces.media_type if replaces else None
        self.pushed: Descriptor | None = None  # the layer this file last became
        self.dirty = False
        self.removed = False  # unlinked while open: never pushed again
        self.write_error: int | None = None  # a write failed: the content is incomplete
        self.handles = 0
        self.mtime = time.time()
        self.mutex = threading.Lock()  # orders writes against pushes of this one file
        self._hasher = hashlib.sha256()
        self._hashed = 0  # bytes hashed so far, while writes are sequential from 0
        self._sequential = True
        if self.size:
            self._sequential = False

    def write(self, data: bytes, offset: int) -> int:
        with self.mutex:
            try:
                written = os.pwrite(self.fd, data, offset)
            except OSError as exc:
                self.write_error = exc.errno or errno.EIO
                raise Refused(f"{self.path}: cannot stage: {exc.strerror}", self.write_error) from None
            if self._sequential and offset == self._hashed:
                self._hasher.update(data[:written])
                self._hashed += written
            else:
                self._sequential = False
            self.size = max(self.size, offset + written)
            self.dirty = True
            self.mtime = time.time()
            return written

    def truncate(self, length: int) -> None:
        with self.mutex:
            os.ftruncate(self.fd, length)
            if length == 0:  # `>` and O_TRUNC: hashing (and a failed write) start over
                self._hasher, self._hashed, self._sequential = hashlib.sha256(), 0, True
                self.write_error = None
            elif length != self._hashed:
                self._sequential = False
            self.size = length
            self.dirty = True
            self.mtime = time.time()

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def digest(self) -> Digest:
        """sha256 of the content: from the hash kept while writing when writes were
        sequential, else by reading the staged file."""
        if self._sequential and self._hashed == self.size:
            return Digest("sha256", self._hasher.hexdigest())
        hasher = hashlib.sha256()
        update_from_fd(hasher, self.fd, self.size)
        return Digest("sha256", hasher.hexdigest())

    def close_fd(self) -> None:
        """Close the staging descriptor once (a second close could hit a reused number)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def save_journal(self, source: str) -> None:
        """Record where this file goes (atomically), for recovery after a crash."""
        target: dict[str, Any]
        if isinstance(self.target, LayerTarget):
            target = {"kind": "layer", "repository": self.target.repository,
                      "tag": self.target.tag, "title": self.target.title}
        elif isinstance(self.target, HelmTarget):
            target = {"kind": "helm", "namespace": self.target.namespace}
        else:
            target = {"kind": "scratch"}
        record = {"source": source, "path": self.path, "target": target,
                  "replaces": self.replaces.to_dict() if self.replaces else None,
                  "media_type": self.media_type}
        tmp = self.journal.with_name(self.journal.name + ".tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.journal)
        except OSError as exc:
            log.warning("%s: cannot record it for recovery: %s", self.path, exc)

    def forget_journal(self) -> None:
        try:
            self.journal.unlink()
        except FileNotFoundError:
            pass

    def discard(self) -> None:
        try:
            self.close_fd()
        except OSError:
            pass
        for path in (self.staging, self.journal):
            try:
                path.unlink()
            except FileNotFoundError:
                pass


class WriteHandle:
    """An open file handle on a staged file (what fs.py keeps per `fh`)."""

    def __init__(self, writer: Writer, staged: Staged, *, writable: bool = True) -> None:
        self.writer = writer
        self.staged = staged
        self.writable = writable

    def read(self, offset: int, size: int) -> bytes:
        return self.staged.read(offset, size)

    def write(self, data: bytes, offset: int) -> int:
        return self.staged.write(data, offset)

    def truncate(self, length: int) -> None:
        self.staged.truncate(length)

    def flush(self) -> None:
        """close(): a handle opened for writing pushes what changed. A reader of a staged
        file does not: its close should not fail because of someone else's push."""
        if self.writable:
            self.writer.push(self.staged)

    def fsync(self) -> None:
        self.writer.push(self.staged)

    def close(self) -> None:
        self.writer.release(self.staged)


# ---- the writer ---------------------------------------------------------------------------


class Writer:
    """Every write operation of the mount, and the local state they create."""

    def __init__(
        self,
        tree: Tree,
        client: RegistryClient,
        store: BlobStore,
        *,
        artifact_type: str | None = None,
    ) -> None:
        self.tree = tree
        self.client = client
        self.store = store
        self.artifact_type = artifact_type or UNKNOWN_ARTIFACT
        self.staging_dir = Path(store.root) / "staging"
        self._source = str(tree.source)
        self._staged: dict[str, Staged] = {}
        self._dirs: dict[str, LocalDir] = {}
        self._pending_types: dict[tuple[str, str], str] = {}
        self._mutex = threading.Lock()  # guards the dicts above; never held over I/O
        self._tag_locks: dict[tuple[str, str], threading.Lock] = {}

    # ---- the overlay the fs layer consults ------------------------------------------------

    def staged_at(self, path: str) -> Staged | None:
        with self._mutex:
            return self._staged.get(path.strip("/"))

    def local_dir(self, path: str) -> LocalDir | None:
        with self._mutex:
            return self._dirs.get(path.strip("/"))

    def children(self, path: str) -> list[Entry]:
        """Names this mount adds to directory `path`: staged files and new directories."""
        prefix = path.strip("/")
        entries: list[Entry] = []
        with self._mutex:
            for child in self._dirs:
                parent, name = split_path(child)
                if parent == prefix:
                    entries.append(Entry(name, True))
            for child in self._staged:
                parent, name = split_path(child)
                if parent == prefix:
                    entries.append(Entry(name, False))
        return entries

    # ---- creating and opening -------------------------------------------------------------

    def create(self, path: str) -> WriteHandle:
        path = path.strip("/")
        target = self._target_for(path)
        existing = self._acquire(path)
        if existing is not None:
            existing.truncate(0)
            return WriteHandle(self, existing)
        self._check_free_space()
        staged = self._stage(path, target)
        staged.dirty = True  # a new file is pushed even if nothing is written (`touch`)
        return self._open(staged)

    def open_for_write(self, path: str, *, truncate: bool) -> WriteHandle:
        """Open an existing file for writing: a staged file, or a registry file whose
        content is staged (downloaded unless truncated)."""
        path = path.strip("/")
        staged = self._acquire(path)
        if staged is not None:
            if truncate:
                staged.truncate(0)
            return WriteHandle(self, staged)
        node = self._registry_file(path, "written")
        target = self._target_for(path)
        self._check_free_space()
        staged = self._stage(path, target, replaces=node.descriptor,
                             source=None if truncate else node)
        if truncate and node.descriptor.size:
            staged.dirty = True
        return self._open(staged)

    def open_staged(self, path: str) -> WriteHandle | None:
        """A read handle on a staged file (its content is newer than the registry's)."""
        staged = self._acquire(path)
        return WriteHandle(self, staged, writable=False) if staged is not None else None

    def _acquire(self, path: str) -> Staged | None:
        """The staged file at `path` with one more handle counted, in one step: a release or
        unlink in between could otherwise close it under the new handle."""
        with self._mutex:
            staged = self._staged.get(path.strip("/"))
            if staged is not None:
                staged.handles += 1
            return staged

    def _open(self, staged: Staged) -> WriteHandle:
        with self._mutex:
            staged.handles += 1
        return WriteHandle(self, staged)

    def _stage(self, path: str, target: Target, *, replaces: Descriptor | None = None,
               source: BlobFile | None = None) -> Staged:
        self.staging_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.staging_dir, prefix="stage-")
        try:
            if source is not None:
                self._copy_into(source, fd)
        except BaseException:
            os.close(fd)
            os.unlink(name)
            raise
        os.close(fd)
        staged = Staged(path, target, Path(name), replaces=replaces)
        staged.save_journal(self._source)
        with self._mutex:
            self._staged[path] = staged
        return staged

    def recover(self) -> int:
        """Take back files a killed daemon of this SOURCE left staged: visible again, pushed
        by `push_pending` (at mount) or a later close. Files another live mount owns (locked)
        or of another SOURCE are left alone. Returns how many were recovered."""
        recovered = 0
        try:
            journals = sorted(self.staging_dir.glob("stage-*.json"))
        except OSError:
            return 0
        for journal in journals:
            data_path = journal.with_name(journal.name[: -len(".json")])
            try:
                record = json.loads(journal.read_text())
                if record.get("source") != self._source:
                    continue
                if not data_path.exists():
                    journal.unlink()  # pushed and adopted; the journal outlived it
                    continue
                target = _target_from_json(record["target"])
                replaces = record.get("replaces")
                staged = Staged(str(record["path"]), target, data_path,
                                replaces=Descriptor.from_dict(replaces) if replaces else None)
            except (OSError, ValueError, KeyError, TypeError, OcifsError) as exc:
                log.debug("staged file %s not recovered: %s", data_path.name, exc)
                continue
            staged.media_type = record.get("media_type") or staged.media_type
            staged.dirty = not isinstance(target, ScratchTarget)
            with self._mutex:
                if staged.path in self._staged:
                    staged.close_fd()
                    continue
                self._staged[staged.path] = staged
            recovered += 1
            log.warning("recovered %s, staged before the last daemon stopped", staged.path)
        return recovered

    def push_pending(self) -> None:
        """Push staged files nobody has open (recovered ones), once; failures stay staged."""
        with self._mutex:
            pending = [s for s in self._staged.values() if s.handles == 0 and s.dirty]
        for staged in pending:
            try:
                self.push(staged)
                self.release_if_idle(staged)
            except (OcifsError, OSError) as exc:
                log.warning("%s still staged: %s", staged.path, exc)

    def _copy_into(self, node: BlobFile, fd: int) -> None:
        reader = self.tree.open(node)
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

    def _check_free_space(self) -> None:
        try:
            self.staging_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            vfs = os.statvfs(self.staging_dir)
        except OSError as exc:
            raise Refused(f"cannot stage in {self.staging_dir}: {exc.strerror}", exc.errno or errno.EIO) from None
        if vfs.f_bavail * vfs.f_frsize < MIN_FREE_SPACE:
            raise Refused(f"not enough free space to stage files in {self.staging_dir}", errno.ENOSPC)

    # ---- where a path's file goes -----------------------------------------------------------

    def _target_for(self, path: str) -> Target:
        parent, name = split_path(path)
        check_name(path, name)
        if name in RESERVED_NAMES:
            raise Refused(f"{path}: {name} is reserved", errno.EPERM)
        if is_scratch(name):
            return ScratchTarget()
        local = self.local_dir(parent)
        if local is not None and self._registry_dir(parent) is None:
            if local.kind == "repository":
                if name.endswith(".tgz"):
                    return HelmTarget(local.repository)
                raise Refused(f"{path}: files go into tag directories", errno.EPERM)
            assert local.tag is not None
            return LayerTarget(local.repository, local.tag, "/".join(local.parts + (name,)))
        node = self.tree.lookup(parent) if parent else self.tree.root()
        if isinstance(node, PrefixDir):
            if name.endswith(".tgz"):
                return HelmTarget(node.prefix)
            raise Refused(f"{path}: only Helm charts (.tgz) can be copied into a repository "
                          "or namespace directory; files go into tag directories", errno.EPERM)
        if isinstance(node, ManifestDir):
            self._check_writable(node)
            assert node.tag is not None
            return LayerTarget(node.repository, node.tag, name)
        if isinstance(node, TitleDir):
            self._check_writable(node.manifest_dir)
            assert node.manifest_dir.tag is not None
            return LayerTarget(node.manifest_dir.repository, node.manifest_dir.tag,
                               "/".join(node.parts + (name,)))
        raise Refused(f"{parent}: not a directory", errno.ENOTDIR)

    def _registry_file(self, path: str, verb: str) -> BlobFile:
        """The registry file at `path`, one that may be changed: EISDIR for directories,
        EPERM for `.manifest.json` and `.config.json`."""
        node = self.tree.lookup(path)
        if not isinstance(node, (BlobFile, BytesFile)):
            raise Refused(f"{path}: is a directory", errno.EISDIR)
        if isinstance(node, BytesFile) or _is_reserved(node):
            raise Refused(f"{path}: cannot be {verb}", errno.EPERM)
        return node

    def _edit_file_layer(self, path: str, verb: str,
                         edit: Callable[[list[Descriptor], Descriptor], list[Descriptor]]) -> None:
        """Edit the manifest of the registry file at `path`: `edit(layers, its layer)`."""
        node = self._registry_file(path, verb)
        owner = node.manifest_dir
        self._check_writable(owner)
        assert owner.tag is not None
        layer = node.descriptor
        self.edit_manifest(owner.repository, owner.tag, lambda layers: edit(layers, layer),
                           must_exist=True)

    def _registry_dir(self, path: str) -> Any:
        try:
            node = self.tree.lookup(path) if path else self.tree.root()
        except NotFound:
            return None
        return None if isinstance(node, (BlobFile, BytesFile)) else node

    @staticmethod
    def _check_writable(node: ManifestDir) -> None:
        if node.tag is None:
            raise Refused(f"{node.path}: a manifest by digest or a platform cannot change", errno.EPERM)
        if isinstance(node.manifest, Index):
            raise Refused(f"{node.path}: an image index cannot take files", errno.EPERM)
        if node.manifest.is_image:
            raise Refused(f"{node.path}: a runnable container image is never modified", errno.EPERM)

    # ---- pushing ------------------------------------------------------------------------------

    def push(self, staged: Staged) -> None:
        """Push `staged` if it changed since its last push (flush, fsync)."""
        if not staged.dirty or staged.removed or isinstance(staged.target, ScratchTarget):
            return
        with staged.mutex:
            if not staged.dirty or staged.removed:
                return
            if staged.write_error is not None:
                # Never push what a failed write left incomplete; it stays staged.
                raise Refused(f"{staged.path}: a write failed ({os.strerror(staged.write_error)}); "
                              "not pushed", staged.write_error)
            try:
                if isinstance(staged.target, HelmTarget):
                    self._push_chart(staged)
                else:
                    self._push_layer(staged, staged.target)
            except Refused:
                raise  # EINVAL (not a chart), EPERM (an image tag): the caller's mistake
            except OcifsError as exc:
                log.warning("push of %s failed, keeping it staged: %s", staged.path, exc)
                raise PushFailed(f"{staged.path}: push failed, kept staged: {exc}") from None
            staged.dirty = False

    def release(self, staged: Staged) -> None:
        """A handle closed. The last one adopts a pushed file into the cache (no download
        to read it back) and drops it from the overlay; a file whose push failed stays."""
        with self._mutex:
            staged.handles -= 1
            if staged.handles > 0:
                return
            done = staged.removed or (not staged.dirty and not isinstance(staged.target, ScratchTarget))
            if done and self._staged.get(staged.path) is staged:
                del self._staged[staged.path]
        if not done:
            return
        if staged.removed or staged.pushed is None:
            staged.discard()
            return
        try:
            staged.close_fd()
            self.store.add_file(staged.pushed.digest, staged.staging)
            staged.forget_journal()
        except (OSError, OcifsError) as exc:
            log.info("could not keep %s in the cache: %s", staged.path, exc)
            staged.discard()

    def _push_layer(self, staged: Staged, target: LayerTarget) -> None:
        digest = staged.digest()
        with open(staged.staging, "rb") as file:
            self.client.push_blob(target.repository, file, digest, staged.size)
        annotations = dict(staged.replaces.annotations) if staged.replaces else {}
        for stale in ORAS_CONTENT_ANNOTATIONS:  # they describe the old content
            annotations.pop(stale, None)
        annotations[ANNOTATION_TITLE] = target.title
        layer = Descriptor(staged.media_type or OCI_LAYER_TAR, digest, staged.size, annotations,
                           raw=staged.replaces.raw if staged.replaces else {})
        old = staged.pushed or staged.replaces

        def edit(layers: list[Descriptor]) -> list[Descriptor]:
            return _put_layer(layers, layer, old)

        self.edit_manifest(target.repository, target.tag, edit)
        staged.pushed = layer
        staged.replaces = layer
        self.tree.note_file_time(staged.path, digest, time.time())

    def edit_manifest(
        self,
        repository: str,
        tag: str,
        edit: Callable[[list[Descriptor]], list[Descriptor]],
        *,
        artifact_type: str | None = None,
        must_exist: bool = False,
    ) -> Manifest:
        """Apply `edit` to the layers of `repository:tag` as the registry has it now (HEAD,
        ignoring the TTL) and PUT the result. Serialised per tag inside the mount."""
        key = (repository, tag)
        with self._mutex:
            lock = self._tag_locks.setdefault(key, threading.Lock())
        with lock:
            try:
                current = self.client.resolve(repository, tag)
            except NotFound:
                current = None
            if current is not None:
                manifest = self.tree.manifest(repository, current)
                if isinstance(manifest, Index):
                    raise Refused(f"{repository}:{tag} is an image index", errno.EPERM)
                if manifest.is_image:
                    raise Refused(f"{repository}:{tag} is a container image: never modified", errno.EPERM)
                layers = [layer for layer in manifest.layers if not is_placeholder_layer(layer)]
                raw = replace_layers(manifest, edit(layers), artifact_type=artifact_type)
                media_type = manifest.media_type
            else:
                if must_exist:
                    raise NotFound(f"{repository}:{tag} does not exist")
                with self._mutex:
                    pending = self._pending_types.get(key)
                self._ensure_blob(repository, EMPTY_JSON)
                raw = build_manifest(edit([]), artifact_type=artifact_type or pending or self.artifact_type,
                                     annotations={ANNOTATION_CREATED: now_rfc3339()})
                media_type = OCI_MANIFEST
            self.client.put_manifest(repository, tag, raw, media_type)
            pushed = parse_manifest(raw, content_type=media_type)
            assert isinstance(pushed, Manifest)
            self.tree.note_pushed(repository, tag, pushed)
            return pushed

    def _ensure_blob(self, repository: str, data: bytes) -> Digest:
        digest = Digest.of(data)
        self.client.push_blob(repository, io.BytesIO(data), digest, len(data))
        return digest

    # ---- Helm -----------------------------------------------------------------------------------

    def _push_chart(self, staged: Staged) -> None:
        assert isinstance(staged.target, HelmTarget)
        if staged.size > MAX_CHART_SIZE:
            raise Refused(f"{staged.path}: too big for a Helm chart", errno.EINVAL)
        data = staged.read(0, staged.size)
        metadata = chart_metadata(data)
        if metadata is None:
            raise Refused(f"{staged.path}: not a Helm chart package (no <name>/Chart.yaml)", errno.EINVAL)
        name, version = str(metadata["name"]), str(metadata["version"])
        namespace = staged.target.namespace
        repository = f"{namespace}/{name}" if namespace else name
        tag = version.replace("+", "_")
        if not is_valid_repository(repository) or not is_valid_tag(tag):
            raise Refused(f"{staged.path}: chart {name} {version} cannot be {repository}:{tag}",
                          errno.EINVAL)
        config = encode_json({k: metadata[k] for k in HELM_METADATA_FIELDS if k in metadata})
        self._ensure_blob(repository, config)
        chart_digest = staged.digest()
        with open(staged.staging, "rb") as file:
            self.client.push_blob(repository, file, chart_digest, staged.size)
        annotations = {ANNOTATION_CREATED: now_rfc3339(), ANNOTATION_TITLE: name,
                       "org.opencontainers.image.version": version}
        if isinstance(metadata.get("description"), str):
            annotations["org.opencontainers.image.description"] = metadata["description"]
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": Descriptor.for_bytes(HELM_CONFIG, config).to_dict(),
            "layers": [Descriptor(HELM_CHART, chart_digest, staged.size).to_dict()],
            "annotations": annotations,
        }
        raw = encode_json(manifest)
        self.client.put_manifest(repository, tag, raw, OCI_MANIFEST)
        pushed = parse_manifest(raw, content_type=OCI_MANIFEST)
        self.tree.note_pushed(repository, tag, pushed)
        staged.pushed = Descriptor(HELM_CHART, chart_digest, staged.size)
        log.info("pushed Helm chart %s %s as %s:%s", name, version, repository, tag)

    # ---- removing -------------------------------------------------------------------------------

    def unlink(self, path: str) -> None:
        path = path.strip("/")
        with self._mutex:
            staged = self._staged.pop(path, None)
            if staged is not None:
                staged.removed = True
                open_handles = staged.handles
        if staged is not None:
            if open_handles == 0:
                staged.discard()
            in_registry = staged.pushed or staged.replaces
            if in_registry is None or not isinstance(staged.target, LayerTarget):
                return
            target = staged.target
            self.edit_manifest(target.repository, target.tag,
                               lambda layers: _drop_layer(layers, in_registry), must_exist=True)
            return
        self._edit_file_layer(path, "removed", _drop_layer)

    # ---- directories ----------------------------------------------------------------------------

    def mkdir(self, path: str) -> None:
        path = path.strip("/")
        parent, name = split_path(path)
        check_name(path, name)
        if self._exists(path):
            raise Refused(f"{path}: exists", errno.EEXIST)
        if name in RESERVED_NAMES:
            raise Refused(f"{path}: {name} is reserved", errno.EPERM)
        local = self.local_dir(parent)
        registry_parent = self._registry_dir(parent)
        made: LocalDir
        if registry_parent is None and local is not None:
            if local.kind == "repository":
                made = self._new_tag(path, local.repository, name)
            else:
                assert local.tag is not None
                made = LocalDir("title", local.repository, local.tag, local.parts + (name,))
        elif isinstance(registry_parent, PrefixDir):
            prefix = registry_parent.prefix
            if self._is_repository(prefix):
                made = self._new_tag(path, prefix, name)
            else:
                repository = f"{prefix}/{name}" if prefix else name
                if not is_valid_component(name) or not is_valid_repository(repository):
                    raise Refused(f"{path}: {name!r} cannot be a repository name", errno.EINVAL)
                made = LocalDir("repository", repository)
        elif isinstance(registry_parent, ManifestDir):
            self._check_writable(registry_parent)
            assert registry_parent.tag is not None
            made = LocalDir("title", registry_parent.repository, registry_parent.tag, (name,))
        elif isinstance(registry_parent, TitleDir):
            owner = registry_parent.manifest_dir
            self._check_writable(owner)
            assert owner.tag is not None
            made = LocalDir("title", owner.repository, owner.tag, registry_parent.parts + (name,))
        else:
            raise NotFound(f"{parent}: no such directory")
        with self._mutex:
            self._dirs[path] = made

    def _new_tag(self, path: str, repository: str, name: str) -> LocalDir:
        if not is_valid_tag(name):
            raise Refused(f"{path}: {name!r} cannot be a tag", errno.EINVAL)
        return LocalDir("tag", repository, name)

    def _is_repository(self, prefix: str) -> bool:
        tags = self.tree.tags(prefix) if prefix and is_valid_repository(prefix) else set()
        return not isinstance(tags, set) or bool(tags)

    def _exists(self, path: str) -> bool:
        if self.local_dir(path) is not None or self.staged_at(path) is not None:
            return True
        try:
            self.tree.lookup(path)
        except NotFound:
            return False
        return True

    def rmdir(self, path: str) -> None:
        path = path.strip("/")
        if self.children(path):
            raise Refused(f"{path}: not empty", errno.ENOTEMPTY)
        node = self._registry_dir(path)
        local = self.local_dir(path)
        if node is None:
            if local is None and not self._in_writable_tag(split_path(path)[0]):
                raise NotFound(f"{path}: no such directory")
            # Never pushed, or a title directory whose last file just went (`rm -r`): gone.
        elif isinstance(node, ManifestDir):
            if self.tree.children(node):
                raise Refused(f"{path}: not empty", errno.ENOTEMPTY)
            self._check_writable(node)
            assert node.tag is not None
            self._delete_tag(node)
        elif self.tree.children(node):
            raise Refused(f"{path}: not empty", errno.ENOTEMPTY)
        elif local is None:
            raise Refused(f"{path}: registries cannot delete repositories", errno.EPERM)
        self._forget_dir(path)

    def _forget_dir(self, path: str) -> None:
        with self._mutex:
            local = self._dirs.pop(path, None)
            if local is not None and local.kind == "tag" and local.tag is not None:
                self._pending_types.pop((local.repository, local.tag), None)

    def _in_writable_tag(self, path: str) -> bool:
        """Whether `path` is, or was until its last file went, a directory of a tag that
        takes files: the nearest ancestor that still exists says."""
        while True:
            local = self.local_dir(path)
            if local is not None:
                return local.kind in ("tag", "title")
            node = self._registry_dir(path)
            if node is not None:
                owner = node.manifest_dir if isinstance(node, TitleDir) else node
                return isinstance(owner, ManifestDir) and owner.tag is not None
            if not path:
                return False
            path = split_path(path)[0]

    def _delete_tag(self, node: ManifestDir) -> None:
        repository, tag = node.repository, node.tag
        assert tag is not None
        current = self.client.resolve(repository, tag)
        digest = current.digest
        # Judge emptiness on the manifest as it is now, not as this mount last saw it.
        manifest = self.tree.manifest(repository, current)
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
                if other != tag and is_valid_tag(other) and self.client.resolve(repository, other).digest == digest:
                    raise Refused(f"{repository}:{tag}: tag {other} shares its manifest", errno.EBUSY) from None
            try:
                self.client.delete_manifest(repository, str(digest))
            except Unsupported as exc:
                log.warning("%s:%s: the registry refuses deletes: %s", repository, tag, exc)
                raise Refused(f"{repository}:{tag}: the registry refuses deletes", errno.EPERM) from None
        self.tree.forget_tag(repository, tag)

    # ---- renaming -------------------------------------------------------------------------------

    def rename(self, old: str, new: str) -> None:
        old, new = old.strip("/"), new.strip("/")
        if self.local_dir(old) is not None or self._registry_dir(old) is not None:
            raise Refused(f"{old}: directories of tags and repositories are not renamed", errno.EXDEV)
        new_parent, new_name = split_path(new)
        if self._registry_dir(new) is not None or self.local_dir(new) is not None:
            raise Refused(f"{new}: is a directory", errno.EISDIR)
        target = self._target_for(new)
        staged = self.staged_at(old)
        if staged is not None:
            self._rename_staged(staged, old, new, target)
            return
        node = self._registry_file(old, "renamed")
        if not isinstance(target, LayerTarget):
            raise Refused(f"{new}: a registry file moves only into tag directories", errno.EXDEV)
        owner = node.manifest_dir
        self._check_writable(owner)
        assert owner.tag is not None
        old_layer = node.descriptor
        annotations = dict(old_layer.annotations)
        annotations[ANNOTATION_TITLE] = target.title
        moved = replace(old_layer, annotations=annotations)
        replaced = self._replaced_layer(new)
        if (owner.repository, owner.tag) == (target.repository, target.tag):
            def retitle(layers: list[Descriptor]) -> list[Descriptor]:
                kept = _drop_if_present(layers, replaced) if replaced is not None else layers
                return _put_layer(kept, moved, old_layer)

            self.edit_manifest(target.repository, target.tag, retitle, must_exist=True)
            return
        if target.repository != owner.repository:
            if not self.client.mount_blob(target.repository, old_layer.digest, owner.repository):
                raise Refused(f"{new}: the registry would not mount {old_layer.digest} from "
                              f"{owner.repository}", errno.EXDEV)
        self.edit_manifest(target.repository, target.tag,
                           lambda layers: _put_layer(layers, moved, replaced))
        self.edit_manifest(owner.repository, owner.tag,
                           lambda layers: _drop_if_present(layers, old_layer), must_exist=True)

    def _replaced_layer(self, path: str) -> Descriptor | None:
        try:
            node = self.tree.lookup(path)
        except NotFound:
            return None
        return node.descriptor if isinstance(node, BlobFile) else None

    def _rename_staged(self, staged: Staged, old: str, new: str, target: Target) -> None:
        """A staged file changes place; in the registry it leaves its old place (if it was
        pushed there) and arrives at the new one when pushed."""
        replaced = self._replaced_layer(new)  # network: before any lock
        with staged.mutex:  # not while a push of this file runs
            previous = (staged.pushed or staged.replaces) if isinstance(staged.target, LayerTarget) else None
            previous_target = staged.target
            with self._mutex:
                if self._staged.get(old) is staged:
                    del self._staged[old]
                displaced = self._staged.pop(new, None)
                self._staged[new] = staged
            staged.path = new
            staged.target = target
            staged.replaces = replaced
            staged.pushed = None
            staged.dirty = True
            staged.save_journal(self._source)
        if displaced is not None and displaced is not staged:
            displaced.removed = True
            if displaced.handles == 0:
                displaced.discard()
        if staged.handles == 0:
            self.push(staged)
            self.release_if_idle(staged)
        if previous is not None and isinstance(previous_target, LayerTarget):
            # The old name goes now; the new one arrives with this file's next push.
            try:
                self.edit_manifest(previous_target.repository, previous_target.tag,
                                   lambda layers: _drop_layer(layers, previous), must_exist=True)
            except NotFound:
                pass  # already gone

    def release_if_idle(self, staged: Staged) -> None:
        with self._mutex:
            staged.handles += 1
        self.release(staged)

    # ---- attributes -----------------------------------------------------------------------------

    def truncate(self, path: str, length: int) -> None:
        """truncate(2) on a path with no open handle: stage, truncate, push at once."""
        handle = self.open_for_write(path, truncate=length == 0)
        try:
            handle.truncate(length)
            handle.flush()
        finally:
            handle.close()

    def set_artifact_type(self, path: str, value: str) -> None:
        path = path.strip("/")
        local = self.local_dir(path)
        node = self._registry_dir(path)
        if isinstance(node, ManifestDir):
            self._check_writable(node)
            assert node.tag is not None
            self.edit_manifest(node.repository, node.tag, lambda layers: layers,
                               artifact_type=value, must_exist=True)
            return
        if local is not None and local.kind == "tag" and node is None:
            assert local.tag is not None
            with self._mutex:
                self._pending_types[(local.repository, local.tag)] = value
            return
        raise Refused(f"{path}: user.oci.artifacttype is set on tag directories", errno.EPERM)

    def pending_artifact_type(self, path: str) -> str | None:
        local = self.local_dir(path)
        if local is None or local.tag is None:
            return None
        with self._mutex:
            return self._pending_types.get((local.repository, local.tag))

    def set_media_type(self, path: str, value: str) -> None:
        path = path.strip("/")
        staged = self.staged_at(path)
        if staged is not None:
            with staged.mutex:
                staged.media_type = value
                staged.dirty = True
                staged.save_journal(self._source)
            if staged.handles == 0:
                self.push(staged)
            return
        self._edit_file_layer(path, "given a media type", lambda layers, old: _put_layer(
            layers, replace(old, media_type=value), old))

    def shutdown(self) -> None:
        """At unmount: push what is still dirty (best effort); failures stay staged on disk."""
        with self._mutex:
            pending = list(self._staged.values())
        for staged in pending:
            try:
                self.push(staged)
            except (OcifsError, OSError) as exc:
                log.warning("%s not pushed at unmount, left in %s: %s", staged.path, staged.staging, exc)
            except Exception:  # noqa: BLE001 - one file's bug must not strand the others
                log.exception("%s not pushed at unmount, left in %s", staged.path, staged.staging)


def _is_reserved(node: BlobFile | BytesFile) -> bool:
    """`.manifest.json` and `.config.json` of a tag directory."""
    parent, name = split_path(node.path)
    return isinstance(node, BytesFile) or (parent == node.manifest_dir.path and name in RESERVED_NAMES)


def _same_layer(a: Descriptor, b: Descriptor) -> bool:
    return a.digest == b.digest and a.size == b.size and a.title == b.title and a.media_type == b.media_type


def _put_layer(layers: Sequence[Descriptor], layer: Descriptor, old: Descriptor | None) -> list[Descriptor]:
    """`layer` in place of `old` (or of the first layer with its title), else added at the end.
    Other layers are kept, even one that shares the title (it is listed by digest)."""
    out = list(layers)
    for i, current in enumerate(out):
        if old is not None and _same_layer(current, old):
            out[i] = layer
            return out
    for i, current in enumerate(out):
        if layer.title is not None and current.title == layer.title:
            out[i] = layer
            return out
    out.append(layer)
    return out


def _drop_layer(layers: Sequence[Descriptor], layer: Descriptor) -> list[Descriptor]:
    """`layers` without `layer`; when another client changed it meanwhile, without the layer
    of the same title. NotFound when neither is there (nothing to PUT)."""
    out = list(layers)
    for i, current in enumerate(out):
        if _same_layer(current, layer):
            del out[i]
            return out
    if layer.title is not None:
        for i, current in enumerate(out):
            if current.title == layer.title:
                del out[i]
                return out
    raise NotFound(f"{layer.title or layer.digest} is no longer in the manifest")


def _target_from_json(data: dict[str, Any]) -> Target:
    kind = data["kind"]
    if kind == "layer":
        return LayerTarget(str(data["repository"]), str(data["tag"]), str(data["title"]))
    if kind == "helm":
        return HelmTarget(str(data["namespace"]))
    if kind == "scratch":
        return ScratchTarget()
    raise ValueError(f"unknown target kind {kind!r}")


def _drop_if_present(layers: Sequence[Descriptor], layer: Descriptor) -> list[Descriptor]:
    try:
        return _drop_layer(layers, layer)
    except NotFound:
        return list(layers)


def chart_metadata(data: bytes) -> dict[str, Any] | None:
    """The Chart.yaml of a chart package (`<name>/Chart.yaml` in a gzipped tar), or None."""
    import yaml

    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            for member in archive:
                parts = member.name.split("/")
                if len(parts) == 2 and parts[1] == "Chart.yaml" and member.isfile():
                    extracted = archive.extractfile(member)
                    if extracted is None or member.size > 1024 * 1024:
                        return None
                    text = extracted.read()
                    break
            else:
                return None
        metadata = yaml.safe_load(text)
        # Helm reads its string fields as written (`appVersion: 1.10` is "1.10", not 1.1):
        # the base loader keeps every scalar as its text.
        literal = yaml.load(text, Loader=yaml.BaseLoader)  # noqa: S506 - BaseLoader builds no objects
    except (tarfile.TarError, OSError, EOFError, yaml.YAMLError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(metadata, dict) or not isinstance(literal, dict):
        return None
    for key in HELM_STRING_FIELDS:
        if isinstance(literal.get(key), str):
            metadata[key] = literal[key]
    if not isinstance(metadata.get("name"), str) or not isinstance(metadata.get("version"), str):
        return None
    return json.loads(json.dumps(metadata, default=str))  # dates and the like as text
