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
    ANNOTATION_MODEL_FILEPATH,
    DOCKER_AI_CHAT_TEMPLATE,
    DOCKER_AI_DDUF,
    DOCKER_AI_DIR_TAR,
    DOCKER_AI_GGUF,
    DOCKER_AI_GGUF_LORA,
    DOCKER_AI_GGUF_MMPROJ,
    DOCKER_AI_LICENSE,
    DOCKER_AI_MMPROJ,
    DOCKER_AI_SAFETENSORS,
    DOCKER_AI_VLLM_CONFIG_TAR,
    HELM_CHART,
    HELM_PROVENANCE,
    MODELPACK_PREFIX,
    OCI_LAYER_TAR_GZIP,
    OLLAMA_PREFIX,
    Descriptor,
    Index,
    Manifest,
    base_media_type,
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
    # Reachable, not listed: another name of a file of `files` (always its raw blob): the digest
    # name of a layer named by its filepath or media type, the archive name of a packed directory.
    aliases: dict[tuple[str, ...], tuple[str, ...]] = field(default_factory=dict)

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


def archive_extension(media_type: str) -> str:
    """`.tar.gz`, `.tar.zst` or `.tar` for (compressed) tar media types, else ""."""
    media_type = media_type.lower()
    if media_type.endswith("+gzip") or media_type.endswith(".tar.gzip"):
        return ".tar.gz"
    if media_type.endswith("+zstd") or media_type.endswith(".tar.zstd"):
        return ".tar.zst"
    if media_type.endswith(".tar"):
        return ".tar"
    return ""


def digest_name(descriptor: Descriptor) -> str:
    """`sha256-<hex>` plus an extension for tar layers, for untitled or unsafe layers."""
    return descriptor.digest.filename + archive_extension(descriptor.media_type)


# ---- names from media types: AI models (issue 12) -------------------------------------------

# Docker's generic model file (config v0.2: one layer per file, named by its filepath).
DOCKER_AI_MODEL_FILE = "application/vnd.docker.ai.model.file"
# What modctl wrote before ModelPack moved to the CNCF (`org.cnai.*`, `vnd.cnai.model.*`).
ANNOTATION_MODEL_FILEPATH_LEGACY = "org.cnai.model.filepath"
MODELPACK_LEGACY_PREFIX = "application/vnd.cnai.model."

# How a tar layer of a known type shows (KnownType.packed).
AS_FILE = "file"
AS_DIRECTORY = "directory"  # always a directory; an archive extension of its name is dropped
UNLESS_ARCHIVE_NAME = "unless archive name"  # a directory, unless its name ends like an archive's


@dataclass(frozen=True)
class KnownType:
    """What a layer of a well-known media type is, and its name when it has no usable title and
    no filepath annotation."""

    name: str | None = None  # None: by its filepath annotation only, else by its digest
    shards: bool = False  # several layers: `model-00001-of-00003.gguf`... (else `LICENSE`, `LICENSE-2`...)
    gguf: bool = False  # a GGUF file: `user.gguf.*` attributes
    packed: str = AS_FILE  # a tar of a directory shown as a directory (AS_DIRECTORY, UNLESS_ARCHIVE_NAME)


def _modelpack_types(prefix: str) -> dict[str, KnownType]:
    """ModelPack (modelpack/model-spec docs/spec.md): weights, their config, docs, code and
    datasets, each raw (one file) or a tar, maybe compressed; all named by their filepath."""
    table = {}
    for kind in ("weight", "weight.config", "doc", "code", "dataset"):
        table[f"{prefix}{kind}.v1.raw"] = KnownType()
        for variant in ("tar", "tar+gzip", "tar+zstd"):
            table[f"{prefix}{kind}.v1.{variant}"] = KnownType(packed=UNLESS_ARCHIVE_NAME)
    return table


# The one table of well-known layer media types (compared without parameters, lower case).
KNOWN_TYPES: dict[str, KnownType] = {
    # Docker Model Runner (docker/model-spec spec.md, docker/model-runner types/config.go): one
    # uncompressed file per layer; the names are those `docker model` unpacks them as.
    DOCKER_AI_GGUF: KnownType("model.gguf", shards=True, gguf=True),
    DOCKER_AI_GGUF_MMPROJ: KnownType("mmproj.gguf", gguf=True),
    DOCKER_AI_MMPROJ: KnownType("mmproj.gguf", gguf=True),
    DOCKER_AI_GGUF_LORA: KnownType("adapter.gguf", gguf=True),
    DOCKER_AI_LICENSE: KnownType("LICENSE"),
    DOCKER_AI_CHAT_TEMPLATE: KnownType("template.jinja"),
    DOCKER_AI_SAFETENSORS: KnownType("model.safetensors", shards=True),
    DOCKER_AI_DDUF: KnownType("model.dduf"),
    DOCKER_AI_MODEL_FILE: KnownType(),
    DOCKER_AI_DIR_TAR: KnownType(packed=AS_DIRECTORY),
    # vLLM's config files (config.json, tokenizer files), which `docker model` extracts beside the
    # weights: a directory `config/` of them (its raw tar is `config.tar`).
    DOCKER_AI_VLLM_CONFIG_TAR: KnownType("config", packed=AS_DIRECTORY),
    **_modelpack_types(MODELPACK_PREFIX),
    **_modelpack_types(MODELPACK_LEGACY_PREFIX),
    # Ollama's registry (docker v2 manifests whose layers are `application/vnd.ollama.image.*`).
    OLLAMA_PREFIX + "model": KnownType("model.gguf", gguf=True),
    OLLAMA_PREFIX + "projector": KnownType("mmproj.gguf", gguf=True),
    OLLAMA_PREFIX + "adapter": KnownType("adapter.gguf", gguf=True),
    OLLAMA_PREFIX + "license": KnownType("LICENSE"),
    OLLAMA_PREFIX + "template": KnownType("template"),
    OLLAMA_PREFIX + "system": KnownType("system"),
    OLLAMA_PREFIX + "params": KnownType("params.json"),
    OLLAMA_PREFIX + "messages": KnownType("messages.json"),
}


# The media types of GGUF files (they have `user.gguf.*` attributes; a model tag checks them).
GGUF_MEDIA_TYPES = frozenset(media_type for media_type, known in KNOWN_TYPES.items() if known.gguf)


def known_type(descriptor: Descriptor) -> KnownType | None:
    return KNOWN_TYPES.get(base_media_type(descriptor.media_type) or "")


def model_filepath(descriptor: Descriptor) -> str | None:
    """The `org.cncf.model.filepath` annotation (ModelPack, Docker), else modctl's older key."""
    annotations = descriptor.annotations
    return annotations.get(ANNOTATION_MODEL_FILEPATH) or annotations.get(ANNOTATION_MODEL_FILEPATH_LEGACY)


def is_gguf(descriptor: Descriptor, name: str) -> bool:
    """Whether a file is a GGUF model file: by its media type, or a name ending `.gguf`."""
    known = known_type(descriptor)
    return (known is not None and known.gguf) or name.lower().endswith(".gguf")


def is_ollama_model(manifest: Manifest) -> bool:
    """Ollama's models have an image config but are no container image (no rootfs/)."""
    return any((base_media_type(layer.media_type) or "").startswith(OLLAMA_PREFIX) for layer in manifest.layers)


def _numbered(name: str, number: int, count: int, shards: bool) -> str:
    """The name of the `number`th (from 1) of `count` layers of one type: `model-00002-of-00003.gguf`
    (as `docker model` names shards), or `LICENSE-2`, `template-2.jinja`."""
    stem, dot, extension = name.partition(".")
    extension = dot + extension
    if shards and count > 1:
        return f"{stem}-{number:05d}-of-{count:05d}{extension}"
    return name if number == 1 else f"{stem}-{number}{extension}"


def _strip_archive_extension(parts: tuple[str, ...]) -> tuple[str, ...] | None:
    last = ARCHIVE_FILE_NAME.sub("", parts[-1])
    last = re.sub(r"\.tar$", "", last, flags=re.IGNORECASE)  # `.tar.gz`, `.tar.zst` whole
    return title_parts("/".join((*parts[:-1], last)))


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

    # Each layer's name by the first rule that gives a usable one: its title (or Helm chart
    # name), its filepath annotation, its media type (KNOWN_TYPES). Explicit names go first: a
    # title is never displaced by a name a media type made up. A name that is taken, or spelled
    # like a digest name, is not used: the layer is named by its digest (as a clashing title is).
    TITLE, FILEPATH, MEDIA_TYPE = range(3)
    layers = [layer for layer in manifest.layers if not is_placeholder_layer(layer)]
    wanted: list[tuple[int, tuple[str, ...], bool] | None] = []  # per layer: (rule, path, packed)
    by_type: dict[str, list[tuple[int, KnownType]]] = {}  # a default name -> the layers that take it
    for number, layer in enumerate(layers):
        known = known_type(layer)
        parts: tuple[str, ...] | None
        if helm_name and layer.media_type == HELM_CHART:
            wanted.append((TITLE, (f"{helm_name}.tgz",), False))
            continue
        if helm_name and layer.media_type == HELM_PROVENANCE:
            wanted.append((TITLE, (f"{helm_name}.tgz.prov",), False))
            continue
        parts = title_parts(layer.title)
        if parts is not None:
            packed = is_packed_dir(layer) or (known is not None and known.packed != AS_FILE
                                              and ARCHIVE_FILE_NAME.search(parts[-1]) is None)
            wanted.append((TITLE, parts, packed))
            continue
        parts = title_parts(model_filepath(layer))
        if parts is not None:
            packed = False
            if known is not None and known.packed == AS_DIRECTORY:
                parts, packed = _strip_archive_extension(parts), True
            elif known is not None and known.packed == UNLESS_ARCHIVE_NAME:
                packed = ARCHIVE_FILE_NAME.search(parts[-1]) is None
            if parts is not None:
                wanted.append((FILEPATH, parts, packed))
                continue
        if known is not None and known.name is not None:
            by_type.setdefault(known.name, []).append((number, known))
        wanted.append(None)  # named below, or by its digest
    for name, takers in by_type.items():  # several layers of one name: numbered in manifest order
        for order, (number, known) in enumerate(takers, 1):
            wanted[number] = (MEDIA_TYPE, (_numbered(name, order, len(takers), known.shards),),
                              known.packed != AS_FILE)

    packed_parts: set[tuple[str, ...]] = set()
    aliases: dict[tuple[str, ...], tuple[str, ...]] = {}
    named: set[int] = set()
    for rule in (TITLE, FILEPATH, MEDIA_TYPE):
        for number, layer in enumerate(layers):
            choice = wanted[number]
            if choice is None or choice[0] != rule:
                continue
            _, parts, packed = choice
            if spoofs(parts[0], layer) or not free(parts):
                log.info("name %r of %s clashes with another entry: named by digest",
                         "/".join(parts), layer.digest)
                continue
            files[parts] = layer
            for i in range(1, len(parts)):
                dirs.add(parts[:i])
            named.add(number)
            if packed:
                packed_parts.add(parts)
                extension = archive_extension(layer.media_type)
                if extension:  # the raw blob: `d.tar.gz` beside directory `d`
                    aliases.setdefault((*parts[:-1], parts[-1] + extension), parts)
            if rule != TITLE:  # these layers were named by digest before issue 12: still reachable so
                aliases.setdefault((digest_name(layer),), parts)
    for number, layer in enumerate(layers):
        if number in named:
            continue
        parts = (digest_name(layer),)
        if free(parts):  # else the same blob twice without a usable name: listed once
            files[parts] = layer
    return Layout(files, frozenset(dirs), manifests, frozenset(packed_parts), aliases)


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
