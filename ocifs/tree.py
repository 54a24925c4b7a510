"""Path -> node: the registry side of the mount (DESIGN.md section 2).

The tree turns mount-relative paths into nodes (directories of repositories, tag and
manifest directories, files) with the layout rules of `layout.py`, asking the shared
`Metadata` for tags, catalogs and manifests. It knows nothing of what this mount wrote:
`view.py` lays the writer's overlay over it.
"""

from __future__ import annotations

import bisect
import errno
import logging
import stat
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from functools import partial

from cachetools import LRUCache

from . import deadline
from .archive import DIR, FILE, SYMLINK, ArchiveIndex, Archives, Member, MemberReader, merge_layers
from .digest import Digest
from .errors import NotADirectory, NotFound, OcifsError, RequestTimeout
from .gguf import XATTR_PREFIX as GGUF_XATTR_PREFIX
from .gguf import GGUFError, read_header
from .helm import MAX_CONFIG_SIZE, chart_file_stem
from .layout import (
    CONFIG_FILE,
    MANIFEST_FILE,
    REFERRERS_DIR,
    BlobFile,
    BytesFile,
    Dir,
    Entry,
    File,
    Layout,
    ManifestDir,
    PrefixDir,
    ReferrersDir,
    TitleDir,
    build_layout,
    inode_number,
    is_gguf,
    is_ollama_model,
    parse_created,
    referrer_entries,
)
from .metadata import Metadata
from .model import HELM_CONFIG, Descriptor, Manifest
from .reference import Source, is_valid_component, is_valid_repository, is_valid_tag
from .store import BlobHandle, BlobStore

log = logging.getLogger(__name__)

# How soon after a listing lookups of its tags count as a walk (seconds).
WALK_WINDOW = 30.0
# How many repositories a walk through a namespace has fetched ahead of the walker (their
# tag lists, then their first manifests).
WALK_LOOKAHEAD = 8
# How long a layout made without its chart's name is used before the config is asked again.
PROVISIONAL_LAYOUT_SECONDS = 5.0
# How many layers of an image are downloaded and indexed at once on a first look at `rootfs/`.
LAYER_BUILDS = 4
# GGUF headers' attributes kept in memory (by blob), so that `getfattr -d` asking for each
# attribute in turn parses a header once.
GGUF_HEADERS_KEPT = 64


# What an ArchiveDir shows (issue 11): a packed directory, an image's root filesystem
# (`rootfs/`), the list of its layers (`layers/`) or one layer's own files (`layers/<n>/`).
PACKED, ROOTFS, LAYERS, LAYER = "", "rootfs", "layers", "layer"
IMAGE_VIEWS = (ROOTFS, LAYERS)  # the hidden names in an image's directory


@dataclass(frozen=True)
class ArchiveDir:
    """A packed directory (`parts == ()`, the layer itself) or a directory inside it; in an
    image, `rootfs/`, `layers/`, `layers/<n>/` and the directories inside them (`view`)."""

    path: str
    repository: str
    descriptor: Descriptor  # the layer (in `rootfs/`: the one the directory comes from)
    manifest_dir: ManifestDir = field(compare=False, repr=False)
    parts: tuple[str, ...] = ()  # below the packed directory
    member: Member | None = field(default=None, compare=False, repr=False)  # None: the layer
    view: str = PACKED
    layers: tuple[Descriptor, ...] = field(default=(), compare=False, repr=False)  # the image's


@dataclass(frozen=True)
class ArchiveFile:
    """A file or symbolic link inside a packed directory (or an image's layers)."""

    path: str
    descriptor: Descriptor  # the layer
    member: Member = field(compare=False, repr=False)
    view: str = PACKED


ArchiveNode = ArchiveDir | ArchiveFile


@dataclass
class _Walk:
    """What happened under a registry path since it was listed: how walks are recognised."""

    since: float
    children: list[str]  # what it listed, sorted
    tags: set[str] = field(default_factory=set)  # its tags looked up since
    deeper: set[str] = field(default_factory=set)  # its children something below was listed in
    ahead: int = 0  # its children up to this index were handed to Metadata.prefetch


class Tree:
    """Resolves mount paths to nodes and answers what they contain."""

    def __init__(self, source: Source, metadata: Metadata) -> None:
        self.source = source
        self.metadata = metadata
        self.client = metadata.client
        self.store: BlobStore = metadata.store
        self.started = time.time()
        self._layouts: LRUCache[Digest, Layout] = LRUCache(maxsize=4096)
        self._provisional: dict[Digest, tuple[Layout, float]] = {}  # layouts without chart names
        # registry path -> what a walk did under it since it was listed
        self._walks: LRUCache[str, _Walk] = LRUCache(maxsize=1024)
        self._identities: LRUCache[str, tuple[Digest, float]] = LRUCache(maxsize=200_000)
        self._mutex = threading.Lock()  # guards the LRU caches above; never held over I/O
        self.archives = Archives(self.store)
        # manifest digest -> its root filesystem (the layers' indexes merged)
        self._rootfs: LRUCache[Digest, ArchiveIndex] = LRUCache(maxsize=8)
        self._rootfs_building: dict[Digest, threading.Lock] = {}
        # layer digest -> its index being built in the background (see _layer_indexes)
        self._layer_builds: dict[Digest, Future[ArchiveIndex]] = {}
        self._builder = ThreadPoolExecutor(LAYER_BUILDS, thread_name_prefix="ocifs-layers")
        self._closed = threading.Event()
        # (blob digest, offset of the file in it) -> its `user.gguf.*` attributes, None: not GGUF
        self._gguf: LRUCache[tuple[Digest, int], dict[str, bytes] | None] = LRUCache(maxsize=GGUF_HEADERS_KEPT)
        self._gguf_reading: dict[tuple[Digest, int], threading.Lock] = {}

    def close(self) -> None:
        """Unmounting: layer builds not started are dropped; running ones end with the store's
        downloads (the store closes after)."""
        self._closed.set()
        self._builder.shutdown(wait=False, cancel_futures=True)
        with self._mutex:
            pending = list(self._layer_builds.values())
        for future in pending:  # builds never started: their lookers get an errno, not a hang
            _settle(future, exception=Unmounting("unmounting: the layer was not indexed"))

    # ---- entry points --------------------------------------------------------------------

    def root(self) -> Dir:
        if self.source.is_pinned:
            reference = self.source.reference or ""
            tag = None if self.source.digest is not None else self.source.tag
            return self._manifest_dir("", self.source.path, reference, tag=tag)
        return PrefixDir("", self.source.path)

    def lookup(self, path: str) -> Dir | File | ArchiveNode:
        """The node at a mount path (`/a/b` or `a/b`); NotFound (ENOENT) when nothing is there."""
        node: Dir | File | ArchiveNode = self.root()
        for name in (part for part in path.split("/") if part):
            if isinstance(node, (BlobFile, BytesFile, ArchiveFile)):
                raise NotADirectory(f"{node.path} is not a directory")
            node = self.child(node, name)
        return node

    def child(self, node: Dir | ArchiveDir, name: str) -> Dir | File | ArchiveNode:
        path = f"{node.path}/{name}" if node.path else name
        if isinstance(node, ArchiveDir):
            return self._archive_child(node, name, path)
        if isinstance(node, PrefixDir):
            return self._prefix_child(node, name, path)
        if isinstance(node, ManifestDir):
            if name == MANIFEST_FILE:
                return BytesFile(path, node.manifest.raw, node.descriptor.digest,
                                 node.descriptor.media_type, node)
            if name == CONFIG_FILE:
                config = node.manifest.config if isinstance(node.manifest, Manifest) else None
                if config is None:
                    raise NotFound(f"{path}: this manifest has no config")
                return BlobFile(path, node.repository, config, node)
            if name == REFERRERS_DIR:
                return ReferrersDir(path, node)
            layout = self.layout(node)
            entry = layout.manifests.get(name)
            if entry is not None:
                return self._manifest_dir(path, node.repository, str(entry.digest), entry)
            try:
                return self._layout_child(node, layout, (name,), path)
            except NotFound:
                image = self._image_view(node, name, path)
                if image is None:
                    raise
                return image
        if isinstance(node, TitleDir):
            return self._layout_child(node.manifest_dir, self.layout(node.manifest_dir),
                                      (*node.parts, name), path)
        if isinstance(node, ReferrersDir):
            return self._referrers_child(node, name, path)
        raise NotFound(f"{path}: no such file or directory")

    def children(self, node: Dir | ArchiveDir) -> list[Entry]:
        """What a directory lists (hidden names excluded)."""
        if isinstance(node, ArchiveDir):
            return self._archive_children(node)
        if isinstance(node, PrefixDir):
            return self._prefix_children(node)
        if isinstance(node, ManifestDir):
            if node.tag is not None:
                self._note_entered(node.repository, node.tag)
            return self.layout(node).children(())
        if isinstance(node, ReferrersDir):
            return self._referrers_children(node)
        return self.layout(node.manifest_dir).children(node.parts)

    def open(self, node: File | ArchiveFile) -> BlobHandle | BytesReader | MemberReader:
        if isinstance(node, ArchiveFile):
            return self.archives.open_member(node.descriptor.digest, node.member)
        if isinstance(node, BytesFile):
            return BytesReader(node.data)
        descriptor = node.descriptor
        fetch = partial(self.client.fetch_blob_range, node.repository, descriptor.digest)
        return self.store.open(descriptor.digest, descriptor.size, fetch)

    # ---- attributes ----------------------------------------------------------------------

    def digest_of(self, node: Dir | File | ArchiveNode) -> Digest | None:
        if isinstance(node, (ArchiveDir, ArchiveFile)):
            return node.descriptor.digest  # the layer's: what the bytes inside come from
        if isinstance(node, ManifestDir):
            return node.descriptor.digest
        if isinstance(node, BlobFile):
            return node.descriptor.digest
        if isinstance(node, BytesFile):
            return node.digest
        return None

    def mtime(self, node: Dir | File | ArchiveNode) -> float:
        """The manifest's `created` annotation, else the mount's start; a path whose digest
        changes gets the time the change was seen, so tools notice it. Inside a packed
        directory, the tar headers' times."""
        if isinstance(node, (ArchiveDir, ArchiveFile)) and node.member is not None:
            return node.member.mtime
        if isinstance(node, ArchiveDir):
            node = node.manifest_dir  # the packed directory itself: its tag's time
        if isinstance(node, PrefixDir):
            return self.started
        owner = node.subject if isinstance(node, ReferrersDir) else \
            node.manifest_dir if isinstance(node, (BlobFile, BytesFile, TitleDir)) else node
        base = parse_created(owner.manifest.annotations) or self.started
        digest = self.digest_of(node) or owner.descriptor.digest
        with self._mutex:
            known = self._identities.get(node.path)
            if known is None:
                self._identities[node.path] = (digest, base)
                return base
            if known[0] == digest:
                return known[1]
            changed = max(base, time.time())
            self._identities[node.path] = (digest, changed)
            return changed

    def inode(self, node: Dir | File | ArchiveNode) -> int:
        digest = self.digest_of(node) if isinstance(node, (BlobFile, BytesFile, ArchiveFile)) else None
        return inode_number(node.path, digest)

    def mode(self, node: Dir | File | ArchiveNode) -> int | None:
        """File type and permission bits from the tar headers inside packed directories (None
        elsewhere: the mount's own)."""
        if isinstance(node, (ArchiveDir, ArchiveFile)) and node.member is not None:
            kind = {DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK}.get(node.member.kind, stat.S_IFREG)
            return kind | node.member.mode
        return None

    def owner(self, node: Dir | File | ArchiveNode) -> tuple[int, int] | None:
        """Owner and group from the tar headers in an image's `rootfs/` and `layers/<n>/`
        (None elsewhere: the mount's user)."""
        if isinstance(node, (ArchiveDir, ArchiveFile)) and node.member is not None \
                and node.view in (ROOTFS, LAYER):
            return node.member.uid, node.member.gid
        return None

    def readlink(self, node: Dir | File | ArchiveNode) -> str | None:
        if isinstance(node, ArchiveFile) and node.member.kind == SYMLINK:
            return node.member.target
        return None

    def size(self, node: Dir | File | ArchiveNode) -> int:
        if isinstance(node, ArchiveFile):
            return node.member.size
        if isinstance(node, BlobFile):
            return node.descriptor.size
        if isinstance(node, BytesFile):
            return len(node.data)
        return 0

    def xattrs(self, node: Dir | File | ArchiveNode) -> dict[str, bytes]:
        """`user.oci.*` attributes: digest and media type of files and manifests,
        artifact type of manifests where set; a packed directory has its layer's."""
        if isinstance(node, ArchiveFile) or (isinstance(node, ArchiveDir) and (node.parts or node.view in IMAGE_VIEWS)):
            return {}
        if isinstance(node, (BlobFile, ArchiveDir)):
            return {"user.oci.digest": str(node.descriptor.digest).encode(),
                    "user.oci.mediatype": node.descriptor.media_type.encode()}
        if isinstance(node, BytesFile):
            return {"user.oci.digest": str(node.digest).encode(),
                    "user.oci.mediatype": node.media_type.encode()}
        if isinstance(node, ManifestDir):
            values = {"user.oci.digest": str(node.descriptor.digest).encode(),
                      "user.oci.mediatype": node.manifest.media_type.encode()}
            artifact_type = node.manifest.artifact_type
            if artifact_type is None and isinstance(node.manifest, Manifest):
                artifact_type = node.manifest.effective_artifact_type
            if artifact_type:
                values["user.oci.artifacttype"] = artifact_type.encode()
            return values
        return {}

    def xattr_names(self, node: Dir | File | ArchiveNode) -> list[str]:
        """What listxattr shows: `user.oci.*`, and for a GGUF file the `user.gguf.*` keys its
        header has (read for it: only tools that copy or dump attributes list them, and every
        name listed must read, or `cp --preserve=xattr` fails)."""
        names = list(self.xattrs(node))
        if self._is_gguf(node):
            assert isinstance(node, (BlobFile, ArchiveFile))
            names.extend(self._gguf_xattrs(node) or ())
        return names

    def xattr(self, node: Dir | File | ArchiveNode, name: str) -> bytes | None:
        """One attribute's value, None when there is none. `user.gguf.*` reads the file's
        header (its first bytes only, through the cache) once per blob."""
        if name.startswith(GGUF_XATTR_PREFIX):
            if not self._is_gguf(node):
                return None
            assert isinstance(node, (BlobFile, ArchiveFile))
            values = self._gguf_xattrs(node)
            return None if values is None else values.get(name)
        return self.xattrs(node).get(name)

    def _is_gguf(self, node: Dir | File | ArchiveNode) -> bool:
        if isinstance(node, BlobFile):
            return is_gguf(node.descriptor, node.path.rsplit("/", 1)[-1])
        if isinstance(node, ArchiveFile):  # inside packed directories: by name
            return node.member.kind == FILE and node.path.lower().endswith(".gguf")
        return False

    def _gguf_xattrs(self, node: BlobFile | ArchiveFile) -> dict[str, bytes] | None:
        key = (node.descriptor.digest, node.member.offset if isinstance(node, ArchiveFile) else -1)
        with self._mutex:
            if key in self._gguf:
                return self._gguf[key]
            lock = self._gguf_reading.setdefault(key, threading.Lock())
        deadline.acquire(lock, f"{node.path}: waiting for its GGUF header, read by another look")  # one parse at a time
        try:
            with self._mutex:
                if key in self._gguf:
                    return self._gguf[key]
            handle = self.open(node)
            try:
                values: dict[str, bytes] | None = read_header(
                    handle.read, self.size(node), tick=partial(deadline.check, f"{node.path}: GGUF header")).xattrs()
            except GGUFError as exc:  # kept as None: logged once, not read again
                log.warning("%s has no GGUF attributes: %s", node.path, exc)
                values = None
            finally:
                handle.close()
            with self._mutex:
                self._gguf[key] = values
            return values
        finally:
            lock.release()
            with self._mutex:
                self._gguf_reading.pop(key, None)

    # ---- registry paths ------------------------------------------------------------------

    def _prefix_child(self, node: PrefixDir, name: str, path: str) -> Dir:
        prefix = node.prefix
        is_repository = self.metadata.may_have_tags(prefix)
        if is_repository and name.startswith("sha256:"):
            if not Digest.is_valid(name):
                raise NotFound(f"{path}: not a digest")
            return self._manifest_dir(path, prefix, name)
        if is_repository and is_valid_tag(name):
            # A tag is found by its name, never by waiting for a (maybe huge) tag list: from
            # the list when this mount has a fresh one, else asked for by name. Not asked
            # for: a name the listings at hand show as a path below, when the fresh tag list
            # does not have it or the catalog says this is no repository (a walk through a
            # namespace would otherwise ask each repository's name as a tag).
            tags = self.metadata.cached_tags(prefix)
            if tags is not None and name in tags:
                self._note_walk(prefix, name, tags)
                return self._manifest_dir(path, prefix, name, tag=name)
            path_below = self.metadata.lists_now(prefix, name) and \
                (tags is not None or self.metadata.only_a_path(prefix))
            if not path_below and self.metadata.has_tag(prefix, name):
                if tags is not None:  # pushed since the list was fetched
                    self.metadata.forget_tag_list(prefix)
                return self._manifest_dir(path, prefix, name, tag=name)
        child_prefix = f"{prefix}/{name}" if prefix else name
        if not is_valid_component(name) or not is_valid_repository(child_prefix):
            raise NotFound(f"{path}: no such file or directory")
        # Where nothing lists this level (or the listing could not say in time), any valid
        # name is reachable; where a listing does, an unlisted name must be a repository the
        # registry serves anyway (asked for by name: made elsewhere since the listing).
        listed = self.metadata.lists(prefix, name)
        if listed is None or listed or self.metadata.is_repository(child_prefix):
            return PrefixDir(path, child_prefix)
        raise NotFound(f"{path}: no such file or directory")

    def _recent(self, prefix: str, now: float) -> _Walk | None:
        """What a walk did under `prefix`, if it was listed within WALK_WINDOW; mutex held."""
        walk = self._walks.get(prefix)
        return walk if walk is not None and now - walk.since <= WALK_WINDOW else None

    def _note_walk(self, repository: str, tag: str, tags: set[str]) -> None:
        """A second tag of a repository looked up soon after it was listed is a walk (`ls -l`,
        `find`, `ls -R`): fetch the other tags' manifests at once, a few at a time."""
        with self._mutex:
            walk = self._recent(repository, time.monotonic())
            if walk is None:
                return
            walk.tags.add(tag)
            walk.since = time.monotonic()  # a walk through many tags stays one walk
            walking = len(walk.tags) == 2
        if walking:
            self.metadata.warm(repository, sorted(tags))

    def _note_entered(self, parent: str, name: str) -> _Walk | None:
        """Directory `name` under registry path `parent` (a path or a tag) is being listed.
        Returns `parent`'s walk when it is recursive (`find`, `ls -R`, `du`): it went below
        another of `parent`'s children before coming to this one, so it will go through the
        rest as well."""
        with self._mutex:
            now = time.monotonic()
            walk = self._recent(parent, now)
            if walk is None:
                return None
            walk.since = now  # a walk through many children stays one walk
            if parent != self.source.path:  # tell the walk a level up that it goes deeper
                grandparent, _, me = parent.rpartition("/")
                above = self._recent(grandparent, now)
                if above is not None:
                    above.deeper.add(me)
            return walk if walk.deeper - {name} else None

    def _prefix_children(self, node: PrefixDir) -> list[Entry]:
        prefix = node.prefix
        names: set[str] = set()
        listed = self.metadata.listed_children(prefix)
        if listed is not None:
            names.update(listed)
        # A path the catalog shows as only a namespace has no tag list to ask for.
        may_have_tags = self.metadata.may_have_tags(prefix) and not self.metadata.only_a_path(prefix)
        tags = self.metadata.tags(prefix) if may_have_tags else set()
        if tags is not None:
            for tag in tags & names:
                log.info("%s: tag %s hides the repository path of the same name", prefix, tag)
            names.update(tags)
        children = sorted(names)
        with self._mutex:
            now = time.monotonic()
            walk = self._recent(prefix, now)
            if walk is None:
                self._walks[prefix] = _Walk(now, children)
            else:  # listed again while a walk goes on (or a second walk): keep what it did
                walk.since, walk.children, walk.tags = now, children, set()
        if prefix != self.source.path:  # the mount's root has no parent in the mount
            parent, _, name = prefix.rpartition("/")
            walk = self._note_entered(parent, name)
            if walk is not None:
                self._walk_ahead(parent, walk, name, tags)
        return [Entry(name, True) for name in children]

    def _walk_ahead(self, parent: str, walk: _Walk, name: str, tags: set[str] | None) -> None:
        """A recursive walk through `parent` reached its child `name`: its tags' manifests
        are wanted now, and the next WALK_LOOKAHEAD repositories' tag lists and manifests
        soon, fetched in the background while the walker works here."""
        if tags:
            self.metadata.warm(f"{parent}/{name}" if parent else name, sorted(tags))
        with self._mutex:
            start = bisect.bisect_right(walk.children, name)
            end = start + WALK_LOOKAHEAD
            if end <= walk.ahead:
                return
            ahead = walk.children[max(start, walk.ahead):end]
            walk.ahead = end
        self.metadata.prefetch(f"{parent}/{child}" if parent else child for child in ahead)

    # ---- manifests -----------------------------------------------------------------------

    def note_file_time(self, path: str, digest: Digest, when: float | None = None) -> None:
        """A file this mount just pushed shows the time it was written, not the tag's."""
        with self._mutex:
            self._identities[path.strip("/")] = (digest, time.time() if when is None else when)

    def _manifest_dir(
        self,
        path: str,
        repository: str,
        reference: str,
        descriptor: Descriptor | None = None,
        *,
        tag: str | None = None,
    ) -> ManifestDir:
        if descriptor is None and ":" not in reference:
            found = self.metadata.tag_manifest(repository, reference)
            if found is None:
                raise NotFound(f"{path}: no such tag")
            descriptor, manifest = found
        else:
            if descriptor is None:
                descriptor = Descriptor("", Digest.parse(reference), 0)
            manifest = self.metadata.manifest(repository, descriptor)
        if not descriptor.media_type or descriptor.size == 0:
            descriptor = Descriptor(manifest.media_type, manifest.digest, len(manifest.raw))
        return ManifestDir(path, repository, descriptor, manifest, tag)

    def layout(self, node: ManifestDir) -> Layout:
        """The names a manifest directory shows, kept by digest. A Helm chart whose config
        could not be read is named by digest for now, and asked again after a short while:
        a registry blip must not cost the chart its name for good."""
        digest = node.descriptor.digest
        now = time.monotonic()
        with self._mutex:
            cached = self._layouts.get(digest)
            provisional = self._provisional.get(digest)
        if cached is not None:
            return cached
        if provisional is not None and provisional[1] > now:
            return provisional[0]
        chart_stem = None
        complete = True
        manifest = node.manifest
        if isinstance(manifest, Manifest) and manifest.config is not None \
                and manifest.config.media_type == HELM_CONFIG \
                and manifest.config.size <= MAX_CONFIG_SIZE:
            try:
                chart_stem = chart_file_stem(self.metadata.read_small(node.repository, manifest.config))
            except OcifsError as exc:
                log.warning("cannot read the Helm chart metadata of %s: %s", digest, exc)
                complete = False
        layout = build_layout(manifest, chart_stem)
        with self._mutex:
            if complete:
                self._layouts[digest] = layout
                self._provisional.pop(digest, None)
            else:
                self._provisional[digest] = (layout, now + PROVISIONAL_LAYOUT_SECONDS)
        return layout

    def _layout_child(self, owner: ManifestDir, layout: Layout, parts: tuple[str, ...],
                      path: str) -> Dir | File | ArchiveDir:
        descriptor = layout.files.get(parts)
        if descriptor is not None:
            if parts in layout.packed:
                return ArchiveDir(path, owner.repository, descriptor, owner)
            return BlobFile(path, owner.repository, descriptor, owner)
        if parts in layout.dirs:
            return TitleDir(path, owner, parts)
        # Reachable but not listed: the raw blob of packed directory `d` (`d.tar.gz`), the
        # digest name of a layer named by its filepath or media type.
        alias = layout.aliases.get(parts)
        if alias is not None:
            return BlobFile(path, owner.repository, layout.files[alias], owner)
        raise NotFound(f"{path}: no such file or directory")

    # ---- packed directories (issue 11) ---------------------------------------------------

    def _layer_index(self, repository: str, descriptor: Descriptor) -> ArchiveIndex:
        """A layer's index, built on first use: download, verify, index."""
        return self._layer_indexes(repository, (descriptor,))[0]

    def _build_layer(self, repository: str, descriptor: Descriptor) -> ArchiveIndex:
        fetch = partial(self.client.fetch_blob_range, repository, descriptor.digest)
        return self.archives.index(descriptor.digest,
                                   lambda: _StoppedBy(self._closed, self.store.open(descriptor.digest,
                                                                                    descriptor.size, fetch)),
                                   descriptor.size)

    def _run_build(self, future: Future[ArchiveIndex], repository: str, descriptor: Descriptor) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            index = self._build_layer(repository, descriptor)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the build
            _settle(future, exception=exc)
        else:
            _settle(future, result=index)

    def _layer_indexes(self, repository: str, layers: tuple[Descriptor, ...]) -> list[ArchiveIndex]:
        """The indexes of these layers, bottom first. Those not indexed yet are built in the
        background, up to LAYER_BUILDS side by side (each download waits on the network, each
        gunzip on a core), without this operation's deadline: a look that times out (ETIMEDOUT)
        leaves them running, and the next look waits for the same builds instead of starting
        over. A failed build is forgotten, so the next look tries again."""
        futures: list[Future[ArchiveIndex]] = []
        for layer in layers:
            index = self.archives.cached(layer.digest)
            if index is not None:
                done: Future[ArchiveIndex] = Future()
                done.set_result(index)
                futures.append(done)
                continue
            with self._mutex:
                future = self._layer_builds.get(layer.digest)
                started = future is None
                if future is None:
                    future = self._layer_builds[layer.digest] = Future()
            if started:  # not under the mutex: the pool's shutdown and a done build call back
                future.add_done_callback(partial(self._layer_built, layer.digest))
                try:
                    self._builder.submit(self._run_build, future, repository, layer)
                except RuntimeError:  # shut down
                    _settle(future, exception=Unmounting("unmounting: the layer was not indexed"))
            futures.append(future)
        indexes = []
        for future in futures:
            try:
                indexes.append(future.result(timeout=deadline.remaining()))
            except FutureTimeout:
                raise RequestTimeout("downloading and indexing the layers took longer than --timeout; they go on "
                                     "in the background: look again later") from None
        return indexes

    def _layer_built(self, digest: Digest, future: Future[ArchiveIndex]) -> None:
        with self._mutex:
            if self._layer_builds.get(digest) is future:
                del self._layer_builds[digest]

    def _archive(self, node: ArchiveDir) -> tuple[ArchiveIndex, tuple[str, ...]]:
        """The index the directory's files are in and where they lie in it."""
        if node.view == ROOTFS:
            return self._image_rootfs(node.manifest_dir, node.layers), ()
        index = self._layer_index(node.repository, node.descriptor)
        if node.view == LAYER:
            return index, ()
        return index, _packed_root(index, _packed_parts(node))

    def _image_rootfs(self, owner: ManifestDir, layers: tuple[Descriptor, ...]) -> ArchiveIndex:
        """An image's root filesystem: its layers' indexes merged, kept per manifest digest."""
        digest = owner.descriptor.digest
        with self._mutex:
            merged = self._rootfs.get(digest)
            if merged is None:
                lock = self._rootfs_building.setdefault(digest, threading.Lock())
        if merged is not None:
            return merged
        deadline.acquire(lock, "waiting for the layers another look is indexing")  # one merge per image at a time
        try:
            with self._mutex:
                merged = self._rootfs.get(digest)
            if merged is None:
                merged = merge_layers(self._layer_indexes(owner.repository, layers))
                with self._mutex:
                    self._rootfs[digest] = merged
                    self._rootfs_building.pop(digest, None)
        finally:
            lock.release()
        return merged

    def _image_view(self, node: ManifestDir, name: str, path: str) -> ArchiveDir | None:
        """`rootfs/` and `layers/` of an image: reachable, not listed."""
        manifest = node.manifest
        if name not in IMAGE_VIEWS or not isinstance(manifest, Manifest) or not manifest.is_image \
                or not manifest.layers or is_ollama_model(manifest):
            return None
        return ArchiveDir(path, node.repository, manifest.layers[-1], node, view=name, layers=manifest.layers)

    def _archive_child(self, node: ArchiveDir, name: str, path: str) -> ArchiveNode:
        if node.view == LAYERS:
            if not name.isdigit() or str(int(name)) != name or int(name) >= len(node.layers):
                raise NotFound(f"{path}: no such layer")
            return ArchiveDir(path, node.repository, node.layers[int(name)], node.manifest_dir, view=LAYER)
        index, root = self._archive(node)
        parts = (*node.parts, name)
        member = index.entries.get((*root, *parts))
        if member is None:
            raise NotFound(f"{path}: no such file or directory")
        descriptor = node.layers[member.layer] if node.view == ROOTFS else node.descriptor
        if member.kind == DIR:
            return ArchiveDir(path, node.repository, descriptor, node.manifest_dir, parts, member,
                              node.view, node.layers)
        return ArchiveFile(path, descriptor, member, node.view)

    def _archive_children(self, node: ArchiveDir) -> list[Entry]:
        if node.view == LAYERS:
            return [Entry(str(number), True) for number in range(len(node.layers))]
        index, root = self._archive(node)
        at = (*root, *node.parts)
        entries = []
        for name in index.children.get(at, []):
            member = index.entries[(*at, name)]
            kind = {DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK}.get(member.kind, stat.S_IFREG)
            digest = (node.layers[member.layer] if node.view == ROOTFS else node.descriptor).digest
            entries.append(Entry(name, member.kind == DIR, digest if member.kind != DIR else None,
                                 kind | member.mode))
        return entries


    # ---- referrers (`.referrers/`) -----------------------------------------------------------

    def _referrers_child(self, node: ReferrersDir, name: str, path: str) -> Dir:
        subject = node.subject
        found = referrer_entries(self.metadata.referrers(subject.repository, subject.descriptor.digest),
                                 node.parts)
        if name not in found:
            raise NotFound(f"{path}: no such referrer")
        entry = found[name]
        if entry is None:
            return ReferrersDir(path, subject, (*node.parts, name))
        return self._manifest_dir(path, subject.repository, str(entry.digest), entry)

    def _referrers_children(self, node: ReferrersDir) -> list[Entry]:
        subject = node.subject
        found = referrer_entries(self.metadata.referrers(subject.repository, subject.descriptor.digest),
                                 node.parts)
        return [Entry(name, True) for name in sorted(found)]


def _packed_parts(node: ArchiveDir) -> tuple[str, ...]:
    """The path of the packed directory `node` is in (or is), relative to its manifest's directory."""
    owner = node.manifest_dir.path
    below = node.path[len(owner) + 1:] if owner else node.path
    parts = tuple(below.split("/"))
    return parts[:len(parts) - len(node.parts)]


def _packed_root(index: ArchiveIndex, parts: tuple[str, ...]) -> tuple[str, ...]:
    """What a packed directory at `parts` shows of its archive. oras packs a directory under its
    base name (`site/...`), modctl under its path from the model's root (`code/utils/...`): when
    the archive holds nothing but that directory, its contents; otherwise the whole archive."""
    lone = all(index.children.get(parts[:i], []) == [parts[i]] for i in range(len(parts)))
    member = index.entries.get(parts)
    if len(parts) > 1 and lone and member is not None and member.kind == DIR:
        return parts
    return index.root_for(parts[-1])


class Unmounting(OcifsError):
    """The mount is going away: what was asked of it will not be done."""

    errno = errno.ENOTCONN  # what a mount that went away answers


def _settle(future: Future[ArchiveIndex], *, result: ArchiveIndex | None = None,
            exception: BaseException | None = None) -> None:
    """Complete a build's future unless it already is (a build and unmounting may race)."""
    try:
        if exception is not None:
            future.set_exception(exception)
        elif result is not None:
            future.set_result(result)
    except InvalidStateError:
        pass


class _StoppedBy:
    """A blob handle whose reads stop once `stop` is set: a layer build does not go on
    downloading after unmount."""

    def __init__(self, stop: threading.Event, handle: BlobHandle) -> None:
        self._stop = stop
        self._handle = handle

    def read(self, offset: int, size: int) -> bytes:
        if self._stop.is_set():
            raise Unmounting("unmounting: the layer's download stopped")
        return self._handle.read(offset, size)

    def close(self) -> None:
        self._handle.close()


class BytesReader:
    """An open `.manifest.json`: bytes in memory, same interface as a blob handle."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, offset: int, size: int) -> bytes:
        return self._data[offset:offset + size]

    def close(self) -> None:
        pass
