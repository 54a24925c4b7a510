"""Helm charts, shared by reading (how a chart's file is named) and writing (what a chart
package pushes as, the way `helm push` does it)."""

from __future__ import annotations

import errno
import io
import json
import tarfile
from datetime import UTC, datetime
from typing import Any

from .digest import Digest
from .errors import Refused
from .layout import NAME_MAX, title_parts
from .model import (
    ANNOTATION_CREATED,
    ANNOTATION_TITLE,
    HELM_CHART,
    HELM_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    encode_json,
)
from .reference import is_valid_repository, is_valid_tag

# Configs above this are not read to name charts (chart metadata is a few KiB).
MAX_CONFIG_SIZE = 1024 * 1024
# Chart packages are read whole to find their Chart.yaml; bigger files are not charts.
MAX_CHART_SIZE = 256 * 1024 * 1024
# Chart.yaml fields Helm reads as strings, whatever YAML would make of them.
STRING_FIELDS = ("name", "home", "version", "description", "icon", "apiVersion", "condition",
                 "tags", "appVersion", "kubeVersion", "type")
# Helm's chart.Metadata fields, in the order Helm writes them into the config blob.
METADATA_FIELDS = (
    "name", "home", "sources", "version", "description", "keywords", "maintainers", "icon",
    "apiVersion", "condition", "tags", "appVersion", "deprecated", "annotations", "kubeVersion",
    "dependencies", "type",
)


def chart_file_stem(config: bytes) -> str | None:
    """`<name>-<version>` from a chart's config blob, as `helm pull` names the file."""
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
        # the base loader keeps every scalar as its text and builds no objects.
        literal = yaml.load(text, Loader=yaml.BaseLoader)  # noqa: S506 - BaseLoader builds no objects
    except (tarfile.TarError, OSError, EOFError, yaml.YAMLError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(metadata, dict) or not isinstance(literal, dict):
        return None
    for key in STRING_FIELDS:
        if isinstance(literal.get(key), str):
            metadata[key] = literal[key]
    if not isinstance(metadata.get("name"), str) or not isinstance(metadata.get("version"), str):
        return None
    return json.loads(json.dumps(metadata, default=str))  # type: ignore[no-any-return]


class Chart:
    """A chart package about to be pushed: where it goes and the manifest it gets."""

    def __init__(self, metadata: dict[str, Any], namespace: str) -> None:
        self.name = str(metadata["name"])
        self.version = str(metadata["version"])
        self.repository = f"{namespace}/{self.name}" if namespace else self.name
        self.tag = self.version.replace("+", "_")  # as helm push does
        if not is_valid_repository(self.repository) or not is_valid_tag(self.tag):
            raise Refused(f"chart {self.name} {self.version} cannot be {self.repository}:{self.tag}",
                          errno.EINVAL)
        self.metadata = metadata
        self.config = encode_json({k: metadata[k] for k in METADATA_FIELDS if k in metadata})

    @classmethod
    def from_package(cls, data: bytes, namespace: str, path: str) -> Chart:
        metadata = chart_metadata(data)
        if metadata is None:
            raise Refused(f"{path}: not a Helm chart package (no <name>/Chart.yaml)", errno.EINVAL)
        return cls(metadata, namespace)

    def manifest(self, chart_digest: Digest, size: int) -> bytes:
        annotations = {ANNOTATION_CREATED: now_rfc3339(), ANNOTATION_TITLE: self.name,
                       "org.opencontainers.image.version": self.version}
        if isinstance(self.metadata.get("description"), str):
            annotations["org.opencontainers.image.description"] = self.metadata["description"]
        return encode_json({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": Descriptor.for_bytes(HELM_CONFIG, self.config).to_dict(),
            "layers": [Descriptor(HELM_CHART, chart_digest, size).to_dict()],
            "annotations": annotations,
        })


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
