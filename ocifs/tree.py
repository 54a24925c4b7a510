"""Path -> node: the layout rules of DESIGN.md section 2.

The tree turns mount-relative paths into nodes (directories of repositories, tag and
manifest directories, files) using the registry client, and keeps mutable metadata (catalog,
tag lists, tag -> digest) in TTL caches and immutable metadata (manifests by digest) for good.
No lock is held over network I/O. When the registry cannot be reached, the last known
answers are served (and the failure logged) instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from cachetools import LRUCache, TTLCache

from .digest import Digest
from .errors import (
    Denied,
    NetworkError,
    NotADirectory,
    NotFound,
    OcifsError,
    RegistryError,
    Unauthorized,
    Unsupported,
)
from .model import (
    ANNOTATION_CREATED,
    ANNOTATION_DOCKER_REFERENCE_TYPE,
    HELM_CHART,
    HELM_CONFIG,
    HELM_PROVENANCE,
    Descriptor,
    Index,
    Manifest,
    is_placeholder_layer,
    parse_manifest,
)
from .reference import Source, is_valid_component, is_valid_repository, is_valid_tag
from .registry.client import RegistryClient
from .registry.hub import HubClient
from .store import BlobHandle, BlobStore
from .store.refs import RefStore

log = logging.getLogger(__name__)

MANIFEST_FILE = ".manifest.json"
CONFIG_FILE = ".config.json"
RESERVED_NAMES = frozenset({MANIFEST_FILE, CONFIG_FILE})
NAME_MAX = 255
# Configs above this are not read to name Helm charts (chart metadata is a few KiB).
MAX_HELM_CONFIG = 1024 * 1024
ATTESTATION = "attestation-manifest"

T = TypeVar("T")


# ---- nodes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    path: str  # relative to the mount root, "" for the root


@dataclass(frozen=True)
class PrefixDir(Node):
    """A registry path: the root of a registry, a namespace, or a repository (or both)."""

    prefix: str


@dataclass(frozen=True)
class ManifestDir(Node):
    """A tag, a `sha256:` lookup or a platform of an index: the files of one manifest."""

    repository: str
    descriptor: Descriptor  # the manifest's digest, media type and size
    manifest: Manifest | Index = field(compare=False, repr=False)
    tag: str | None = None


@dataclass(frozen=True)
class TitleDir(Node):
    """A directory made by nested titles (`docs/a.md` -> `docs/`)."""

    manifest_dir: ManifestDir
    parts: tuple[str, ...]


@dataclass(frozen=True)
class BlobFile(Node):
    repository: str
    descriptor: Descriptor
    manifest_dir: ManifestDir = field(compare=False, repr=False)


@dataclass(frozen=True)
class BytesFile(Node):
    """`.manifest.json`: the exact bytes the registry served."""

    data: bytes = field(repr=False)
    digest: Digest
    media_type: str
    manifest_dir: ManifestDir = field(compare=False, repr=False)


Dir = PrefixDir | ManifestDir | TitleDir
File = BlobFile | BytesFile


@dataclass(frozen=True)
class Entry:
    """One name a directory lists; `digest` is a file's (for its inode)."""

    name: str
    is_dir: bool
    digest: Digest | None = None


@dataclass(frozen=True)
class Layout:
    """What a manifest directory shows: files by relative path, and the directories titles make."""

    files: dict[tuple[str, ...], Descriptor]
    dirs: frozenset[tuple[str, ...]]
    manifests: dict[str, Descriptor]  # index entries by directory name

    def children(self, parts: tuple[str, ...]) -> list[Entry]:
        """The entries directly under `parts`."""
        depth = len(parts)
        names: dict[str, Digest | None] = {}
        for path in self.dirs:
            if len(path) == depth + 1 and path[:depth] == parts:
                names[path[-1]] = None
        for path, descriptor in self.files.items():
            if len(path) == depth + 1 and path[:depth] == parts:
                names[path[-1]] = descriptor.digest
        if depth == 0:
            for name in self.manifests:
                names[name] = None
        return [Entry(name, digest is None, digest) for name, digest in sorted(names.items())]


# ---- naming rules -------------------------------------------------------------------------


def title_parts(title: str | None) -> tuple[str, ...] | None:
    """The path a layer title names, or None when it is unsafe (absolute, `..`, `.`,
    empty components, NUL, over NAME_MAX, a reserved name)."""
    if not title or "\0" in title or title.startswith("/"):
        return None
    parts = tuple(title.split("/"))
    for part in parts:
        try:
            encoded = part.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from JSON: not a name
            return None
        if part in ("", ".", "..") or len(encoded) > NAME_MAX:
            return None
    if parts[0] in RESERVED_NAMES:
        return None
    return parts


def digest_name(descriptor: Descriptor) -> str:
    """`sha256-<hex>` plus an extension for tar layers, for untitled or unsafe layers."""
    media_type = descriptor.media_type.lower()
    extension = ""
    if media_type.endswith("+gzip") or media_type.endswith(".tar.gzip"):
        extension = ".tar.gz"
    elif media_type.endswith("+zstd") or media_type.endswith(".tar.zstd"):
        extension = ".tar.zst"
    elif media_type.endswith(".tar"):
        extension = ".tar"
    return descriptor.digest.filename + extension


def platform_name(descriptor: Descriptor) -> str | None:
    """`<os>-<arch>[-<variant>]`, or None when the entry has no usable platform."""
    platform = descriptor.platform
    if platform is None:
        return None
    name = f"{platform.os}-{platform.architecture}"
    if platform.variant:
        name += f"-{platform.variant}"
    if title_parts(name) is None or "/" in name:
        return None
    return name


def is_attestation(descriptor: Descriptor) -> bool:
    platform = descriptor.platform
    if descriptor.annotations.get(ANNOTATION_DOCKER_REFERENCE_TYPE) == ATTESTATION:
        return True
    return platform is not None and platform.os == "unknown" and platform.architecture == "unknown"


def build_layout(manifest: Manifest | Index, helm_name: str | None = None) -> Layout:
    """Apply the naming rules to a manifest: titles, nested titles, digest names for the
    untitled, unsafe or clashing, Helm chart names, platform directories for indexes."""
    files: dict[tuple[str, ...], Descriptor] = {}
    dirs: set[tuple[str, ...]] = set()
    manifests: dict[str, Descriptor] = {}

    def free(parts: tuple[str, ...]) -> bool:
        if parts in files or parts in dirs:
            return False
        return all(parts[:i] not in files for i in range(1, len(parts)))

    # Digest names belong to their digest: a title or platform that spells another entry's
    # digest name would hide that entry, so it is named by its own digest instead.
    entries = manifest.manifests if isinstance(manifest, Index) else manifest.layers
    digest_names: dict[str, Digest] = {}
    for entry in entries:
        digest_names[entry.digest.filename] = entry.digest
        digest_names[digest_name(entry)] = entry.digest

    def spoofs(name: str, entry: Descriptor) -> bool:
        owner = digest_names.get(name)
        return owner is not None and owner != entry.digest

    if isinstance(manifest, Index):
        listed: set[Digest] = set()
        for entry in manifest.manifests:
            if is_attestation(entry) or entry.digest in listed:
                continue  # attestations are not platforms; the same manifest twice shows once
            name = platform_name(entry)
            if name is None or name in manifests or spoofs(name, entry):
                name = entry.digest.filename
            if name in manifests:
                continue
            manifests[name] = entry
            listed.add(entry.digest)
        return Layout(files, frozenset(dirs), manifests)

    for layer in manifest.layers:
        if is_placeholder_layer(layer):
            continue  # the placeholder of an artifact without files
        parts: tuple[str, ...] | None
        if helm_name and layer.media_type == HELM_CHART:
            parts = (f"{helm_name}.tgz",)
        elif helm_name and layer.media_type == HELM_PROVENANCE:
            parts = (f"{helm_name}.tgz.prov",)
        else:
            parts = title_parts(layer.title)
        if parts is not None and spoofs(parts[0], layer):
            parts = None
        if parts is None or not free(parts):
            if parts is not None:
                log.info("title %r of %s clashes with another entry: named by digest",
                         layer.title, layer.digest)
            parts = (digest_name(layer),)
            if not free(parts):
                continue  # the same blob twice without a usable title
        files[parts] = layer
        for i in range(1, len(parts)):
            dirs.add(parts[:i])
    return Layout(files, frozenset(dirs), manifests)


def helm_chart_name(config: bytes) -> str | None:
    """`<name>-<version>` from Helm chart metadata, as `helm pull` names the file."""
    try:
        data = json.loads(config)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    name, version = data.get("name"), data.get("version")
    if not isinstance(name, str) or not isinstance(version, str):
        return None
    result = f"{name}-{version}"
    if title_parts(result) is None or "/" in result or len(result) > NAME_MAX - 9:
        return None
    return result


def inode_number(path: str, digest: Digest | None) -> int:
    """Stable per path, and for files per digest: a file path that names other bytes gets
    another inode (directories keep theirs). Never 0 or 1 (1 is the root)."""
    key = f"{path}\0{digest or ''}".encode("utf-8", "surrogateescape")
    return (int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 2) | 2


def parse_created(annotations: Any) -> float | None:
    value = annotations.get(ANNOTATION_CREATED) if annotations else None
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# ---- the tree -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeOptions:
    ttl: float = 60.0  # seconds that catalogs, tag lists and tags are trusted


@dataclass(frozen=True)
class Persist:
    """How a cache keeps its answers on disk for offline use: kind, and (de)serialisers."""

    refs: RefStore
    kind: str
    dump: Callable[[Any], Any]
    load: Callable[[Any], Any]


class _Cache:
    """A TTL cache with stale fallback: when loading fails because the registry cannot be
    reached, the last value ever loaded is served (and the failure logged): from memory, or
    from disk when `persist` is given (so `--offline` works after a restart)."""

    def __init__(self, ttl: float, maxsize: int = 4096, persist: Persist | None = None) -> None:
        self._fresh: TTLCache[Any, Any] = TTLCache(maxsize=maxsize, ttl=ttl) if ttl > 0 else None  # type: ignore[assignment]
        self._stale: LRUCache[Any, Any] = LRUCache(maxsize=maxsize)
        self._persist = persist
        self._mutex = threading.Lock()

    def get(self, key: Any, load: Callable[[], T]) -> T:
        with self._mutex:
            if self._fresh is not None and key in self._fresh:
                return self._fresh[key]  # type: ignore[no-any-return]
        try:
            value = load()
        except NetworkError as exc:
            with self._mutex:
                if key in self._stale:
                    log.warning("registry unreachable (%s); serving cached %s", exc, key)
                    return self._stale[key]  # type: ignore[no-any-return]
            saved = self._persist.refs.load(self._persist.kind, repr(key)) if self._persist else None
            if saved is None:
                raise
            log.warning("registry unreachable (%s); serving %s as last seen", exc, key)
            value = self._persist.load(saved)  # type: ignore[union-attr]
            with self._mutex:
                self._stale[key] = value
            return value
        with self._mutex:
            if self._fresh is not None:
                self._fresh[key] = value
            changed = self._stale.get(key, _MISSING) != value
            self._stale[key] = value
        if self._persist is not None and changed:
            self._persist.refs.save(self._persist.kind, repr(key), self._persist.dump(value))
        return value

    def invalidate(self, key: Any) -> None:
        with self._mutex:
            if self._fresh is not None:
                self._fresh.pop(key, None)

    def put(self, key: Any, value: Any) -> None:
        """What this mount just wrote is the freshest answer there is."""
        with self._mutex:
            if self._fresh is not None:
                self._fresh[key] = value
            self._stale[key] = value
        if self._persist is not None:
            self._persist.refs.save(self._persist.kind, repr(key), self._persist.dump(value))


# A catalog or tag list the registry will not give us is None (not an empty set).
_MISSING = object()


def _names_to_json(value: Any) -> Any:
    return None if value is None else sorted(value)


def _names_from_json(value: Any) -> Any:
    return None if value is None else set(value)


def _catalog_to_json(value: Any) -> Any:
    return None if value is None else {k: sorted(v) for k, v in value.items()}


def _catalog_from_json(value: Any) -> Any:
    return None if value is None else {k: set(v) for k, v in value.items()}


def _descriptor_to_json(value: Descriptor) -> Any:
    return {"mediaType": value.media_type, "digest": str(value.digest), "size": value.size}


def _descriptor_from_json(value: Any) -> Descriptor:
    return Descriptor(value["mediaType"], Digest.parse(value["digest"]), int(value["size"]))


class Tree:
    """Resolves mount paths to nodes and answers what they contain."""

    def __init__(
        self,
        source: Source,
        client: RegistryClient,
        store: BlobStore,
        *,
        hub: HubClient | None = None,
        options: TreeOptions = TreeOptions(),
    ) -> None:
        self.source = source
        self.client = client
        self.store = store
        self.hub = hub
        self.options = options
        self.started = time.time()
        ttl = options.ttl
        refs = RefStore(store.root, client.base_url)
        self._catalog = _Cache(ttl, 4, Persist(refs, "catalog", _catalog_to_json, _catalog_from_json))
        self._tags = _Cache(ttl, 4096, Persist(refs, "tags", _names_to_json, _names_from_json))
        self._resolved = _Cache(ttl, 65536, Persist(refs, "tag", _descriptor_to_json, _descriptor_from_json))
        self._hub_repos = _Cache(ttl, 4096, Persist(refs, "hub", _names_to_json, _names_from_json))
        self._manifests: LRUCache[Digest, Manifest | Index] = LRUCache(maxsize=4096)
        self._layouts: LRUCache[Digest, Layout] = LRUCache(maxsize=4096)
        self._identities: LRUCache[str, tuple[Digest, float]] = LRUCache(maxsize=200_000)
        self._mutex = threading.Lock()  # guards the LRU caches above; never held over I/O

    # ---- entry points --------------------------------------------------------------------

    def root(self) -> Dir:
        if self.source.is_pinned:
            reference = self.source.reference or ""
            tag = None if self.source.digest is not None else self.source.tag
            return self._manifest_dir("", self.source.path, reference, tag=tag)
        return PrefixDir("", self.source.path)

    def lookup(self, path: str) -> Dir | File:
        """The node at a mount path (`/a/b` or `a/b`); NotFound (ENOENT) when nothing is there."""
        node: Dir | File = self.root()
        for name in (part for part in path.split("/") if part):
            if isinstance(node, (BlobFile, BytesFile)):
                raise NotADirectory(f"{node.path} is not a directory")
            node = self.child(node, name)
        return node

    def child(self, node: Dir, name: str) -> Dir | File:
        path = f"{node.path}/{name}" if node.path else name
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
            layout = self.layout(node)
            entry = layout.manifests.get(name)
            if entry is not None:
                return self._manifest_dir(path, node.repository, str(entry.digest), entry)
            return self._layout_child(node, layout, (name,), path)
        if isinstance(node, TitleDir):
            return self._layout_child(node.manifest_dir, self.layout(node.manifest_dir),
                                      node.parts + (name,), path)
        raise NotFound(f"{path}: no such file or directory")

    def children(self, node: Dir) -> list[Entry]:
        """What a directory lists (hidden names excluded)."""
        if isinstance(node, PrefixDir):
            return self._prefix_children(node)
        if isinstance(node, ManifestDir):
            return self.layout(node).children(())
        return self.layout(node.manifest_dir).children(node.parts)

    def open(self, node: File) -> BlobHandle | BytesReader:
        if isinstance(node, BytesFile):
            return BytesReader(node.data)
        descriptor = node.descriptor
        fetch = partial(self.client.fetch_blob_range, node.repository, descriptor.digest)
        return self.store.open(descriptor.digest, descriptor.size, fetch)

    # ---- attributes ----------------------------------------------------------------------

    def digest_of(self, node: Dir | File) -> Digest | None:
        if isinstance(node, ManifestDir):
            return node.descriptor.digest
        if isinstance(node, BlobFile):
            return node.descriptor.digest
        if isinstance(node, BytesFile):
            return node.digest
        return None

    def mtime(self, node: Dir | File) -> float:
        """The manifest's `created` annotation, else the mount's start; a path whose digest
        changes gets the time the change was seen, so tools notice it."""
        if isinstance(node, PrefixDir):
            return self.started
        owner = node.manifest_dir if isinstance(node, (BlobFile, BytesFile, TitleDir)) else node
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

    def inode(self, node: Dir | File) -> int:
        digest = self.digest_of(node) if isinstance(node, (BlobFile, BytesFile)) else None
        return inode_number(node.path, digest)

    def size(self, node: Dir | File) -> int:
        if isinstance(node, BlobFile):
            return node.descriptor.size
        if isinstance(node, BytesFile):
            return len(node.data)
        return 0

    def xattrs(self, node: Dir | File) -> dict[str, bytes]:
        """`user.oci.*` attributes: digest and media type of files and manifests,
        artifact type of manifests where set."""
        if isinstance(node, BlobFile):
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

    # ---- registry paths ------------------------------------------------------------------

    def _prefix_child(self, node: PrefixDir, name: str, path: str) -> Dir:
        prefix = node.prefix
        is_repository = self._may_have_tags(prefix)
        if is_repository and name.startswith("sha256:"):
            if not Digest.is_valid(name):
                raise NotFound(f"{path}: not a digest")
            return self._manifest_dir(path, prefix, name)
        tags = self.tags(prefix) if is_repository else set()
        if tags is None:
            # Tags we may not list can still be resolved one by one.
            if is_valid_tag(name):
                try:
                    return self._manifest_dir(path, prefix, name, tag=name)
                except NotFound:
                    pass
        elif name in tags:
            return self._manifest_dir(path, prefix, name, tag=name)
        child_prefix = f"{prefix}/{name}" if prefix else name
        if not is_valid_component(name) or not is_valid_repository(child_prefix):
            raise NotFound(f"{path}: no such file or directory")
        listed = self._listed_children(prefix)
        # Where nothing lists this level, any valid name is reachable; where something
        # does, an unlisted name must be a repository the registry serves anyway.
        if listed is None or name in listed or self._exists_unlisted(child_prefix):
            return PrefixDir(path, child_prefix)
        raise NotFound(f"{path}: no such file or directory")

    def _prefix_children(self, node: PrefixDir) -> list[Entry]:
        names: set[str] = set()
        listed = self._listed_children(node.prefix)
        if listed is not None:
            names.update(listed)
        tags = self.tags(node.prefix) if self._may_have_tags(node.prefix) else set()
        if tags is not None:
            for tag in tags & names:
                log.info("%s: tag %s hides the repository path of the same name", node.prefix, tag)
            names.update(tags)
        return [Entry(name, True) for name in sorted(names)]

    def _may_have_tags(self, prefix: str) -> bool:
        if not prefix or not is_valid_repository(prefix):
            return False
        # On Docker Hub a one-component path is a namespace, never a repository.
        return not (self.source.registry.is_docker_hub and "/" not in prefix)

    def tags(self, repository: str) -> set[str] | None:
        """The repository's tags (TTL-cached); empty when it is not a repository;
        None when the registry will not list them."""

        def load() -> set[str] | None:
            try:
                return {t for t in self.client.tags(repository) if is_valid_tag(t)}
            except NotFound:
                return set()
            except (Unauthorized, Denied, Unsupported) as exc:
                log.info("cannot list tags of %s: %s", repository, exc)
                return None

        return self._tags.get(repository, load)

    def _listed_children(self, prefix: str) -> set[str] | None:
        """The next path components under `prefix`, from the catalog or the Hub API."""
        registry = self.source.registry
        if registry.is_docker_hub:
            if self.hub is not None and prefix and "/" not in prefix:
                try:
                    return self._hub_repos.get(prefix, partial(self._load_hub, prefix))
                except NetworkError as exc:
                    # hub.docker.com down: repositories stay reachable by name.
                    log.warning("Docker Hub API unavailable (%s)", exc)
            return None
        try:
            catalog: dict[str, set[str]] | None = self._catalog.get("catalog", self._load_catalog)
        except NetworkError as exc:
            # Tags may still be known: list what we can rather than fail the directory.
            log.warning("catalog unavailable (%s)", exc)
            return None
        if catalog is None:
            return None
        return catalog.get(prefix, set())

    def _load_hub(self, namespace: str) -> set[str] | None:
        assert self.hub is not None
        try:
            return set(self.hub.repositories(namespace))
        except NotFound:
            return set()
        except RegistryError as exc:
            log.info("cannot list Docker Hub namespace %s: %s", namespace, exc)
            return None

    def _load_catalog(self) -> dict[str, set[str]] | None:
        try:
            repositories = list(self.client.catalog())
        except (Unauthorized, Denied, Unsupported, NotFound) as exc:
            log.info("the registry's catalog cannot be listed: %s", exc)
            return None
        children: dict[str, set[str]] = {}
        for repository in repositories:
            if not is_valid_repository(repository):
                continue
            parts = repository.split("/")
            for i in range(len(parts)):
                children.setdefault("/".join(parts[:i]), set()).add(parts[i])
        return children

    def _exists_unlisted(self, repository: str) -> bool:
        """Whether an unlisted path is a repository the registry serves anyway."""
        if not self._may_have_tags(repository):
            return False
        tags = self.tags(repository)
        return tags is None or bool(tags)

    # ---- manifests -----------------------------------------------------------------------

    def resolve(self, repository: str, tag: str) -> Descriptor:
        """tag -> manifest descriptor, with HEAD, cached for the TTL."""
        return self._resolved.get((repository, tag), partial(self.client.resolve, repository, tag))

    def note_pushed(self, repository: str, tag: str, manifest: Manifest | Index) -> Descriptor:
        """This mount just PUT `manifest` as `tag`: show it at once, without asking again."""
        descriptor = Descriptor(manifest.media_type, manifest.digest, len(manifest.raw))
        with self._mutex:
            self._manifests[manifest.digest] = manifest
        try:
            self.store.add_bytes(manifest.digest, manifest.raw)
        except OcifsError as exc:
            log.info("could not keep manifest %s in the cache: %s", manifest.digest, exc)
        self._resolved.put((repository, tag), descriptor)
        self._tags.invalidate(repository)
        self._catalog.invalidate("catalog")
        return descriptor

    def note_file_time(self, path: str, digest: Digest, when: float) -> None:
        """A file this mount just pushed shows the time it was written, not the tag's."""
        with self._mutex:
            self._identities[path.strip("/")] = (digest, when)

    def forget_tag(self, repository: str, tag: str) -> None:
        """The tag was deleted by this mount."""
        self._resolved.invalidate((repository, tag))
        self._tags.invalidate(repository)
        self._catalog.invalidate("catalog")

    def manifest(self, repository: str, descriptor: Descriptor) -> Manifest | Index:
        """The manifest by digest: from memory, the store, or the registry (then kept)."""
        digest = descriptor.digest
        with self._mutex:
            cached = self._manifests.get(digest)
        if cached is not None:
            return cached
        manifest: Manifest | Index | None = None
        path = self.store.complete_path(digest)
        if path is not None:
            try:
                manifest = parse_manifest(path.read_bytes(), content_type=descriptor.media_type,
                                          digest=digest)
            except (OSError, OcifsError) as exc:
                log.warning("cached manifest %s unusable: %s", digest, exc)
        if manifest is None:
            manifest = self.client.get_manifest(repository, str(digest))
            try:
                self.store.add_bytes(digest, manifest.raw)
            except OcifsError as exc:
                log.info("could not keep manifest %s in the cache: %s", digest, exc)
        with self._mutex:
            self._manifests[digest] = manifest
        return manifest

    def _manifest_dir(
        self,
        path: str,
        repository: str,
        reference: str,
        descriptor: Descriptor | None = None,
        *,
        tag: str | None = None,
    ) -> ManifestDir:
        if descriptor is None:
            if ":" in reference:
                digest = Digest.parse(reference)
                descriptor = Descriptor("", digest, 0)
            else:
                descriptor = self.resolve(repository, reference)
        manifest = self.manifest(repository, descriptor)
        if not descriptor.media_type or descriptor.size == 0:
            descriptor = Descriptor(manifest.media_type, manifest.digest, len(manifest.raw))
        return ManifestDir(path, repository, descriptor, manifest, tag)

    def layout(self, node: ManifestDir) -> Layout:
        digest = node.descriptor.digest
        with self._mutex:
            cached = self._layouts.get(digest)
        if cached is not None:
            return cached
        helm_name = None
        manifest = node.manifest
        if isinstance(manifest, Manifest) and manifest.config is not None \
                and manifest.config.media_type == HELM_CONFIG \
                and manifest.config.size <= MAX_HELM_CONFIG:
            try:
                config = self.read_small(node.repository, manifest.config)
                helm_name = helm_chart_name(config)
            except OcifsError as exc:
                log.warning("cannot read the Helm chart metadata of %s: %s", digest, exc)
        layout = build_layout(manifest, helm_name)
        with self._mutex:
            self._layouts[digest] = layout
        return layout

    def read_small(self, repository: str, descriptor: Descriptor) -> bytes:
        fetch = partial(self.client.fetch_blob_range, repository, descriptor.digest)
        return self.store.read_all(descriptor.digest, descriptor.size, fetch)

    def _layout_child(self, owner: ManifestDir, layout: Layout, parts: tuple[str, ...],
                      path: str) -> Dir | File:
        descriptor = layout.files.get(parts)
        if descriptor is not None:
            return BlobFile(path, owner.repository, descriptor, owner)
        if parts in layout.dirs:
            return TitleDir(path, owner, parts)
        raise NotFound(f"{path}: no such file or directory")


class BytesReader:
    """An open `.manifest.json`: bytes in memory, same interface as a blob handle."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, offset: int, size: int) -> bytes:
        return self._data[offset:offset + size]

    def close(self) -> None:
        pass
