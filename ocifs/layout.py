"""The layout rules of DESIGN.md section 2, without I/O: the nodes a mount path can be, how
a manifest's layers and platforms are named, and stable inode numbers.

The tree (registry side) and the writer (local side) both speak in these nodes; the view
merges the two.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .digest import ALGORITHMS, Digest
from .model import (
    ANNOTATION_CREATED,
    ANNOTATION_DOCKER_REFERENCE_TYPE,
    HELM_CHART,
    HELM_PROVENANCE,
    OCI_LAYER_TAR_GZIP,
    Descriptor,
    Index,
    Manifest,
    is_placeholder_layer,
)

log = logging.getLogger(__name__)

MANIFEST_FILE = ".manifest.json"
CONFIG_FILE = ".config.json"
# The mount's own hidden directory at its root (`.ocifs/status`).
CONTROL_DIR = ".ocifs"
# Hidden in each manifest directory: the artifacts that refer to it (OCI 1.1 referrers).
REFERRERS_DIR = ".referrers"
RESERVED_NAMES = frozenset({MANIFEST_FILE, CONFIG_FILE, CONTROL_DIR, REFERRERS_DIR})
NAME_MAX = 255
# What `digest_name` makes: `<algorithm>-<hex>`, maybe with a tar extension.
DIGEST_NAME_RE = re.compile(
    "^(?:" + "|".join(f"{name}-[0-9a-f]{{{length}}}" for name, length in ALGORITHMS.items())
    + r")(?:\.tar(?:\.gz|\.zst)?)?$")
# C0 (NUL included), DEL, C1, and the bidi formatting characters that make a name display
# as another (U+202E would show `evil\u202etxt.exe` as `evilexe.txt`).
UNSAFE_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
ATTESTATION = "attestation-manifest"

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


@dataclass(frozen=True)
class ReferrersDir(Node):
    """`.referrers/` of a manifest directory and the artifact-type directories below it
    (`parts`: (), (type,) or (type, subtype)); see `referrer_type_parts`."""

    subject: ManifestDir
    parts: tuple[str, ...] = ()


Dir = PrefixDir | ManifestDir | TitleDir | ReferrersDir
File = BlobFile | BytesFile


@dataclass(frozen=True)
class Entry:
    """One name a directory lists; `digest` is a file's (for its inode)."""

    name: str
    is_dir: bool
    digest: Digest | None = None
    mode: int | None = None  # file type and permission bits, where not the mount's own (archives)


@dataclass(frozen=True)
class Layout:
    """What a manifest directory shows: files by relative path, and the directories titles make."""

    files: dict[tuple[str, ...], Descriptor]
    dirs: frozenset[tuple[str, ...]]
    manifests: dict[str, Descriptor]  # index entries by directory name
    packed: frozenset[tuple[str, ...]] = frozenset()  # files of `files` shown as directories

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
        return [Entry(name, digest is None or (*parts, name) in self.packed, digest)
                for name, digest in sorted(names.items())]


# ---- naming rules -------------------------------------------------------------------------


def title_parts(title: str | None) -> tuple[str, ...] | None:
    """The path a layer title names, or None when it is unsafe (absolute, `..`, `.`,
    empty components, control or bidi formatting characters, over NAME_MAX, a reserved name)."""
    if not title or title.startswith("/") or UNSAFE_CHARACTERS.search(title):
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


# ---- packed directories (issue 11) ----------------------------------------------------------

ANNOTATION_UNPACK = "io.deis.oras.content.unpack"
PACKED_SUFFIX = ".tar.gz"  # the raw blob of a packed directory `d` is reachable as `d.tar.gz`
# Names that say "this file is an archive": such a layer stays a file unless marked.
ARCHIVE_FILE_NAME = re.compile(r"\.(?:tar|tgz|gz|tar\.gz|taz|zst|tzst|xz|txz|bz2|tbz2?|zip)$", re.IGNORECASE)


def is_packed_dir(descriptor: Descriptor) -> bool:
    """Whether a layer is a directory packed by oras: a tar+gzip layer with a title that is
    marked `io.deis.oras.content.unpack: "true"` (the oras CLI), or whose title does not end
    like an archive file's name (oras-py marks nothing; its `pull` unpacks every tar+gzip
    layer). A `.tar.gz` (or other archive-named) layer without the mark stays a file."""
    if descriptor.media_type.lower() != OCI_LAYER_TAR_GZIP or not descriptor.title:
        return False
    if descriptor.annotations.get(ANNOTATION_UNPACK) == "true":
        return True
    return ARCHIVE_FILE_NAME.search(descriptor.title) is None


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

    # Digest names belong to their digest: a title or platform spelled like a digest name
    # (another entry's, which it would hide, or any other) is named by its own digest instead.
    def spoofs(name: str, entry: Descriptor) -> bool:
        return DIGEST_NAME_RE.match(name) is not None and name not in (entry.digest.filename, digest_name(entry))

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
    # Packed directories: named by their title only (a digest name stays a file).
    packed = frozenset(parts for parts, layer in files.items()
                       if is_packed_dir(layer) and title_parts(layer.title) == parts)
    return Layout(files, frozenset(dirs), manifests, packed)


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



def split_path(path: str) -> tuple[str, str]:
    """`/a/b/c` -> ("a/b", "c"); mount paths are handled without their leading slash."""
    path = path.strip("/")
    parent, _, name = path.rpartition("/")
    return parent, name


# ---- referrers ----------------------------------------------------------------------------

# What the directory of referrers without a usable artifact type is called: it cannot be the
# first part of a media type (those start with a letter or digit, RFC 6838).
UNTYPED_REFERRERS = "_untyped"
_MEDIA_TYPE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")


def referrer_type_parts(artifact_type: str | None) -> tuple[str, ...]:
    """Where a referrer of this artifact type is listed under `.referrers/`: a media type
    `type/subtype` is two directories (`application/vnd.example.sbom+json` ->
    `application/vnd.example.sbom+json/`), so that the path spells the type; anything else
    (none, no slash, parameters, odd characters) goes under `_untyped/`."""
    if artifact_type:
        parts = tuple(artifact_type.split("/"))
        if len(parts) == 2 and all(_MEDIA_TYPE_PART.match(part) for part in parts):
            return parts
    return (UNTYPED_REFERRERS,)


def type_of_referrer_dir(parts: tuple[str, ...]) -> str | None:
    """The artifact type files copied into `.referrers/<parts>/` are attached with, or None
    when that directory cannot take them (not `type/subtype`, or not a media type)."""
    if len(parts) == 2 and all(_MEDIA_TYPE_PART.match(part) for part in parts):
        return "/".join(parts)
    return None


def referrer_entries(referrers: tuple[Descriptor, ...], parts: tuple[str, ...]) -> dict[str, Descriptor | None]:
    """What `.referrers/<parts>/` lists: the next type directories (None), or at the end of
    a type, the referrers by digest name (`sha256-<hex>`), each once."""
    found: dict[str, Descriptor | None] = {}
    depth = len(parts)
    for entry in referrers:
        where = referrer_type_parts(entry.artifact_type)
        if where[:depth] != parts:
            continue
        if depth < len(where):
            found.setdefault(where[depth], None)
        elif depth == len(where):
            found.setdefault(entry.digest.filename, entry)
    return found
