"""Registry content for tests, pushed with ocifs' own client where third-party clients
cannot make it (unsafe titles, clashes, hand-made indexes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ocifs.digest import Digest
from ocifs.model import (
    ANNOTATION_TITLE,
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    HELM_CHART,
    HELM_CONFIG,
    OCI_INDEX,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    Descriptor,
    build_manifest,
    encode_json,
)
from ocifs.registry import RegistryClient

Layer = tuple[str | None, bytes] | tuple[str | None, bytes, str]


def push_blob(client: RegistryClient, repo: str, data: bytes) -> Digest:
    digest = Digest.of(data)
    if client.blob_size(repo, digest) is None:
        client.upload_monolithic(repo, data, digest)
    return digest


def push_layers(
    client: RegistryClient,
    repo: str,
    tag: str,
    layers: Sequence[Layer],
    *,
    config: tuple[str, bytes] | None = None,
    artifact_type: str | None = "application/vnd.unknown.artifact.v1",
    annotations: Mapping[str, str] | None = None,
) -> Digest:
    """An ORAS-style manifest: each layer (title or None, bytes[, media type])."""
    descriptors = []
    for layer in layers:
        title, data = layer[0], layer[1]
        media_type = layer[2] if len(layer) > 2 else OCI_LAYER_TAR  # type: ignore[misc]
        push_blob(client, repo, data)
        descriptors.append(Descriptor.for_bytes(media_type, data,
                                                {ANNOTATION_TITLE: title} if title is not None else {}))
    if config is None:
        push_blob(client, repo, EMPTY_JSON)
        config_descriptor = EMPTY_DESCRIPTOR
    else:
        push_blob(client, repo, config[1])
        config_descriptor = Descriptor.for_bytes(config[0], config[1])
    raw = build_manifest(descriptors, config=config_descriptor, artifact_type=artifact_type,
                         annotations=annotations)
    return client.put_manifest(repo, tag, raw, OCI_MANIFEST)


def push_artifact(client: RegistryClient, repo: str, tag: str, files: Mapping[str, bytes]) -> Digest:
    return push_layers(client, repo, tag, list(files.items()))


def push_helm_chart(client: RegistryClient, repo: str, name: str, version: str, chart: bytes) -> Digest:
    """A manifest shaped as `helm push` makes it (no titles on layers, no mediaType)."""
    import json

    config = json.dumps({"name": name, "version": version, "apiVersion": "v2"}).encode()
    push_blob(client, repo, config)
    push_blob(client, repo, chart)
    data: dict[str, Any] = {
        "schemaVersion": 2,
        "config": Descriptor.for_bytes(HELM_CONFIG, config).to_dict(),
        "layers": [Descriptor.for_bytes(HELM_CHART, chart).to_dict()],
        "annotations": {ANNOTATION_TITLE: name, "org.opencontainers.image.version": version},
    }
    return client.put_manifest(repo, version.replace("+", "_"), encode_json(data), OCI_MANIFEST)


def push_index(
    client: RegistryClient, repo: str, tag: str, entries: Sequence[tuple[Digest, dict[str, str] | None,
                                                                          dict[str, str] | None]]
) -> Digest:
    """An image index over manifests already in `repo`: (digest, platform, annotations)."""
    manifests = []
    for digest, platform, entry_annotations in entries:
        descriptor = client.resolve(repo, str(digest))
        item: dict[str, Any] = {"mediaType": descriptor.media_type, "digest": str(digest),
                                "size": descriptor.size}
        if platform is not None:
            item["platform"] = platform
        if entry_annotations:
            item["annotations"] = entry_annotations
        manifests.append(item)
    raw = encode_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
    return client.put_manifest(repo, tag, raw, OCI_INDEX)
