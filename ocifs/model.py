"""Descriptors, manifests and indexes: parsed from the exact bytes served, built for push.

A parsed manifest keeps its `raw` bytes and its digest is over those bytes: nothing here
re-serialises a manifest that came from a registry. Unknown media types are carried as-is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .digest import Digest
from .errors import IntegrityError, InvalidReference, ManifestError, ManifestTooLarge

# Manifests above this size are refused before they are read (registries accept at least
# 4 MiB; distribution's own default limit is 4 MiB).
MAX_MANIFEST_SIZE = 4 * 1024 * 1024

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_ARTIFACT_MANIFEST = "application/vnd.oci.artifact.manifest.v1+json"  # withdrawn from the spec

MANIFEST_ACCEPT = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
IMAGE_CONFIG_MEDIA_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
UNKNOWN_CONFIG = "application/vnd.unknown.config.v1+json"  # oras-py's config

OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_CHART = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
HELM_PROVENANCE = "application/vnd.cncf.helm.chart.provenance.v1.prov"

# AI models (issue 12). Docker's model spec (docker/model-spec, docker/model-runner): a
# config of this type (v0.1, v0.2...) and one layer per file, uncompressed.
DOCKER_MODEL_CONFIG_PREFIX = "application/vnd.docker.ai.model.config"
DOCKER_MODEL_CONFIG = "application/vnd.docker.ai.model.config.v0.1+json"
DOCKER_AI_GGUF = "application/vnd.docker.ai.gguf.v3"
DOCKER_AI_GGUF_MMPROJ = "application/vnd.docker.ai.gguf.v3.mmproj"
DOCKER_AI_GGUF_LORA = "application/vnd.docker.ai.gguf.v3.lora"
DOCKER_AI_MMPROJ = "application/vnd.docker.ai.mmproj"
DOCKER_AI_LICENSE = "application/vnd.docker.ai.license"
DOCKER_AI_CHAT_TEMPLATE = "application/vnd.docker.ai.chat.template.jinja"
DOCKER_AI_SAFETENSORS = "application/vnd.docker.ai.safetensors"
DOCKER_AI_DDUF = "application/vnd.docker.ai.dduf"
DOCKER_AI_DIR_TAR = "application/vnd.docker.ai.dir.tar"
DOCKER_AI_VLLM_CONFIG_TAR = "application/vnd.docker.ai.vllm.config.tar"
# CNCF ModelPack (modelpack/model-spec) and Docker's newer layers: the file's path.
ANNOTATION_MODEL_FILEPATH = "org.cncf.model.filepath"
MODELPACK_PREFIX = "application/vnd.cncf.model."
# Ollama's registry: `application/vnd.ollama.image.<kind>`.
OLLAMA_PREFIX = "application/vnd.ollama.image."

UNKNOWN_ARTIFACT = "application/vnd.unknown.artifact.v1"
DOCKER_VOLUME = "application/vnd.docker.volume.v1+tar.gz"

ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_CREATED = "org.opencontainers.image.created"
ANNOTATION_DOCKER_REFERENCE_TYPE = "vnd.docker.reference.type"

EMPTY_JSON = b"{}"
EMPTY_DIGEST = Digest.of(EMPTY_JSON)


def base_media_type(content_type: str | None) -> str | None:
    """`application/json; charset=utf-8` -> `application/json`; parameters are ignored."""
    if not content_type:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None

    @classmethod
    def from_dict(cls, data: Any) -> Platform | None:
        if not isinstance(data, dict):
            return None
        os_name, arch = data.get("os"), data.get("architecture")
        if not isinstance(os_name, str) or not isinstance(arch, str):
            return None
        variant = data.get("variant")
        os_version = data.get("os.version")
        return cls(
            os_name,
            arch,
            variant if isinstance(variant, str) and variant else None,
            os_version if isinstance(os_version, str) and os_version else None,
        )


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor. `raw` is the JSON object it came from, kept for round trips."""

    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    platform: Platform | None = None
    artifact_type: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "descriptor") -> Descriptor:
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: not a JSON object")
        media_type = data.get("mediaType")
        if not isinstance(media_type, str):
            raise ManifestError(f"{where}: mediaType missing or not a string")
        size = data.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ManifestError(f"{where}: size missing or not a non-negative integer")
        try:
            digest = Digest.parse(data.get("digest"))  # type: ignore[arg-type]
        except InvalidReference as exc:
            raise ManifestError(f"{where}: {exc}") from None
        artifact_type = data.get("artifactType")
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            annotations=_string_map(data.get("annotations"), f"{where}: annotations"),
            platform=Platform.from_dict(data.get("platform")),
            artifact_type=artifact_type if isinstance(artifact_type, str) else None,
            raw=data,
        )

    @classmethod
    def for_bytes(
        cls, media_type: str, data: bytes, annotations: Mapping[str, str] | None = None
    ) -> Descriptor:
        return cls(media_type, Digest.of(data), len(data), dict(annotations or {}))

    @property
    def title(self) -> str | None:
        return self.annotations.get(ANNOTATION_TITLE)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object for this descriptor: its original fields, updated with ours."""
        data: dict[str, Any] = dict(self.raw)
        if data.get("digest") not in (None, str(self.digest)):
            # Other content: inline `data` and `urls` described the old bytes.
            data.pop("data", None)
            data.pop("urls", None)
        data["mediaType"] = self.media_type
        data["digest"] = str(self.digest)
        data["size"] = self.size
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        else:
            data.pop("annotations", None)
        if self.artifact_type:
            data["artifactType"] = self.artifact_type
        return data


EMPTY_DESCRIPTOR = Descriptor(OCI_EMPTY, EMPTY_DIGEST, len(EMPTY_JSON))


def is_empty_descriptor(descriptor: Descriptor) -> bool:
    """A `{}` config (whatever its media type: oras-py's is not the empty one)."""
    return descriptor.size == len(EMPTY_JSON) and descriptor.digest == EMPTY_DIGEST


def is_placeholder_layer(descriptor: Descriptor) -> bool:
    """The only layer of an artifact without files: the empty descriptor, untitled. A file
    that holds `{}` is a layer of another media type, or titled: a file."""
    return (is_empty_descriptor(descriptor) and descriptor.media_type == OCI_EMPTY
            and descriptor.title is None)


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker v2), also how ORAS and Helm artifacts are stored."""

    raw: bytes = field(repr=False)
    digest: Digest
    media_type: str
    config: Descriptor | None
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    artifact_type: str | None = None
    subject: Descriptor | None = None

    @property
    def is_image(self) -> bool:
        """A runnable container image: its config is an image config."""
        return self.config is not None and self.config.media_type in IMAGE_CONFIG_MEDIA_TYPES

    @property
    def effective_artifact_type(self) -> str | None:
        """`artifactType`, else the config's media type unless that is empty (image-spec)."""
        if self.artifact_type:
            return self.artifact_type
        if self.config is not None and self.config.media_type != OCI_EMPTY:
            return self.config.media_type
        return None


@dataclass(frozen=True)
class Index:
    """An image index or Docker manifest list."""

    raw: bytes = field(repr=False)
    digest: Digest
    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    artifact_type: str | None = None
    subject: Descriptor | None = None


def _string_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ManifestError(f"{where}: not an object of strings")
    return dict(value)


def parse_manifest(
    raw: bytes, *, content_type: str | None = None, digest: Digest | None = None
) -> Manifest | Index:
    """Parse a manifest or index from the exact bytes a registry served.

    The media type comes from the body's `mediaType`, else the response's Content-Type,
    else the shape (`manifests` = index, `layers` = manifest). When `digest` is given the
    bytes must match it.
    """
    if len(raw) > MAX_MANIFEST_SIZE:
        raise ManifestTooLarge(
            f"manifest of {len(raw)} bytes is above the limit of {MAX_MANIFEST_SIZE}"
        )
    if digest is not None:
        digest.verify(raw)
    else:
        digest = Digest.of(raw)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ManifestError(f"manifest {digest} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"manifest {digest} is not a JSON object")
    if data.get("schemaVersion") == 1 and data.get("schemaVersion") is not True:
        raise ManifestError(f"manifest {digest}: Docker schema 1 manifests are not supported")
    body_type = data.get("mediaType")
    media_type = body_type if isinstance(body_type, str) else base_media_type(content_type)
    where = f"manifest {digest}"
    annotations = _string_map(data.get("annotations"), f"{where}: annotations")
    artifact_type = data.get("artifactType")
    if not isinstance(artifact_type, str):
        artifact_type = None
    subject = (
        Descriptor.from_dict(data["subject"], where=f"{where}: subject")
        if data.get("subject") is not None
        else None
    )

    is_index = media_type in INDEX_MEDIA_TYPES or (
        media_type not in MANIFEST_MEDIA_TYPES and "manifests" in data and "layers" not in data
    )
    if is_index:
        entries = _descriptor_list(data.get("manifests", []), f"{where}: manifests")
        return Index(
            raw=raw,
            digest=digest,
            media_type=media_type or OCI_INDEX,
            manifests=entries,
            annotations=annotations,
            artifact_type=artifact_type,
            subject=subject,
        )
    if "layers" in data or "config" in data or media_type in MANIFEST_MEDIA_TYPES:
        layers = _descriptor_list(data.get("layers", []), f"{where}: layers")
        config = (
            Descriptor.from_dict(data["config"], where=f"{where}: config")
            if data.get("config") is not None
            else None
        )
        return Manifest(
            raw=raw,
            digest=digest,
            media_type=media_type or OCI_MANIFEST,
            config=config,
            layers=layers,
            annotations=annotations,
            artifact_type=artifact_type,
            subject=subject,
        )
    if "blobs" in data:  # the withdrawn OCI artifact manifest: its blobs are its files
        return Manifest(
            raw=raw,
            digest=digest,
            media_type=media_type or OCI_ARTIFACT_MANIFEST,
            config=None,
            layers=_descriptor_list(data.get("blobs", []), f"{where}: blobs"),
            annotations=annotations,
            artifact_type=artifact_type,
            subject=subject,
        )
    raise ManifestError(f"{where}: neither a manifest (layers) nor an index (manifests)")


def _descriptor_list(value: Any, where: str) -> tuple[Descriptor, ...]:
    if not isinstance(value, list):
        raise ManifestError(f"{where}: not a list")
    return tuple(Descriptor.from_dict(item, where=f"{where}[{i}]") for i, item in enumerate(value))


def encode_json(data: Mapping[str, Any]) -> bytes:
    """Compact JSON, as Go's encoding/json writes it (ORAS, Helm)."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def build_manifest(
    layers: Sequence[Descriptor],
    *,
    config: Descriptor = EMPTY_DESCRIPTOR,
    artifact_type: str | None = UNKNOWN_ARTIFACT,
    annotations: Mapping[str, str] | None = None,
    subject: Descriptor | None = None,
) -> bytes:
    """A new OCI image manifest, laid out as ORAS lays it out."""
    data: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST}
    if artifact_type:
        data["artifactType"] = artifact_type
    data["config"] = config.to_dict()
    data["layers"] = [layer.to_dict() for layer in layers] or [EMPTY_DESCRIPTOR.to_dict()]
    if subject is not None:
        data["subject"] = subject.to_dict()
    if annotations:
        data["annotations"] = dict(annotations)
    return encode_json(data)


def replace_layers(
    manifest: Manifest, layers: Sequence[Descriptor], *, artifact_type: str | None = None
) -> bytes:
    """The manifest with other layers (and another artifactType, if given), everything else
    (media type, config, annotations, unknown fields) kept as it was."""
    try:
        data = json.loads(manifest.raw)
    except ValueError as exc:  # parse_manifest accepted it, so this is a programming error
        raise IntegrityError(f"manifest {manifest.digest} no longer parses: {exc}") from None
    data["layers"] = [layer.to_dict() for layer in layers] or [EMPTY_DESCRIPTOR.to_dict()]
    if artifact_type is not None:
        data["artifactType"] = artifact_type
    return encode_json(data)


# ---- referrers (OCI 1.1) ------------------------------------------------------------------


def fallback_tag(digest: Digest) -> str:
    """The tag-schema fallback of the referrers API: `<alg>-<hex>` (algorithm cut to 32,
    hex to 64 characters, as the distribution spec says)."""
    algorithm, _, hex_part = str(digest).partition(":")
    return f"{algorithm[:32]}-{hex_part[:64]}"


def parse_referrers(raw: bytes, *, content_type: str | None = None) -> tuple[Descriptor, ...]:
    """The descriptors of a referrers answer (an image index): ManifestError when it is not
    one (not JSON, a manifest, an entry without a valid digest), ManifestTooLarge when big."""
    parsed = parse_manifest(raw, content_type=content_type)
    if not isinstance(parsed, Index):
        raise ManifestError(f"referrers answer {parsed.digest} is not an image index")
    return parsed.manifests


def referrer_descriptor(manifest: Manifest | Index) -> Descriptor:
    """The index entry that lists `manifest` as a referrer: its artifactType (the config's
    media type when it has none) and annotations, as the distribution spec asks."""
    artifact_type = manifest.artifact_type
    if artifact_type is None and isinstance(manifest, Manifest):
        artifact_type = manifest.effective_artifact_type
    data: dict[str, Any] = {"mediaType": manifest.media_type, "digest": str(manifest.digest),
                            "size": len(manifest.raw)}
    if artifact_type:
        data["artifactType"] = artifact_type
    if manifest.annotations:
        data["annotations"] = dict(manifest.annotations)
    return Descriptor.from_dict(data)


def add_referrer(index: Index | None, entry: Descriptor) -> bytes | None:
    """A tag-schema fallback index with `entry` added (a new index when `index` is None);
    None when it lists that digest already. Everything else in the index is kept."""
    if index is None:
        data: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    else:
        if any(existing.digest == entry.digest for existing in index.manifests):
            return None
        try:
            data = json.loads(index.raw)
        except ValueError as exc:
            raise IntegrityError(f"index {index.digest} no longer parses: {exc}") from None
        if not isinstance(data.get("manifests"), list):
            data["manifests"] = []
    data["manifests"].append(entry.to_dict())
    return encode_json(data)
